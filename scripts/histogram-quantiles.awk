# Quantiles of a Prometheus histogram from one scrape (cumulative `_bucket{le=...}` lines), by
# linear interpolation inside the bucket, as Prometheus' histogram_quantile does.
#   awk -f scripts/histogram-quantiles.awk -v metric=NAME metrics.txt
# Prints e.g. "n=12345 p50=31.2s p90=57.0s p99=63.4s max<=65s".
$1 ~ ("^" metric "_bucket\\{") {
  le = $1; sub(/.*le="/, "", le); sub(/".*/, "", le)
  n++; bound[n] = (le == "+Inf") ? "+Inf" : le + 0; count[n] = $2 + 0
}
function q(p,    target, i, lo, below) {
  target = p * count[n]; lo = 0; below = 0
  for (i = 1; i <= n; i++) {
    if (count[i] >= target) {
      if (bound[i] == "+Inf") return lo
      if (count[i] == below) return bound[i]
      return lo + (bound[i] - lo) * (target - below) / (count[i] - below)
    }
    lo = bound[i]; below = count[i]
  }
  return lo
}
END {
  if (n == 0 || count[n] == 0) exit 1
  top = "+Inf"
  for (i = 1; i <= n; i++) if (count[i] == count[n]) { top = bound[i]; break }
  printf "n=%d p50=%.1fs p90=%.1fs p99=%.1fs max<=%ss\n", count[n], q(0.5), q(0.9), q(0.99), top
}
