#!/usr/bin/env bash
# The measurements behind migration 011's design (docs/BENCHMARKS.md, "Unique clients at 100M rows
# (migration 011)"): `uniq` against `uniqCombined(17)` states, granule sizes, and the top 10 from
# trailing states or finalized counts, on a database filled by scripts/uniques-load.sh with 011
# applied and its tables filled.
#
#   scripts/uniques-designs.sh DATABASE [RUNS] [CLICKHOUSE_URL]
#
# Builds scratch tables (x_*) in DATABASE from http_log and http_log_uniques_by_resource_combined_1d,
# times each query RUNS times (default 20) with curl (wall ms: min / median / max), and drops the
# scratch tables. The windows end at the queries bench's DATA_END, like scripts/uniques-load.sh.
set -euo pipefail
db=${1:?database}
runs=${2:-20}
url=${3:-http://127.0.0.1:8123/}
q() { curl -sS --fail-with-body "$url" --data-binary "$1"; }
timed() { # label, sql
  local ts=()
  for _ in $(seq "$runs"); do
    ts+=("$(curl -sS --fail-with-body -o /dev/null -w '%{time_total}' "$url" --data-binary "$2")")
  done
  printf '%s\n' "${ts[@]}" | sort -n | awk -v l="$1" '{a[NR] = $1 * 1000}
    END {printf "%-62s %6.0f %6.0f %6.0f\n", l, a[1], a[int((NR + 1) / 2)], a[NR]}'
}
end=1795392000 # benches/queries.rs DATA_END_S
window() { echo "ts >= toDateTime($((end - $1 * 86400))) AND ts < toDateTime($end)"; }
scratch=(x_all_6h x_all_1d x_res_g16 x_res_g256 x_trail7 x_trail30 x_final7 x_final30)
drop() { for t in "${scratch[@]}"; do q "DROP TABLE IF EXISTS $db.$t"; done; }
trap drop EXIT
drop

both="requests SimpleAggregateFunction(sum, UInt64), u AggregateFunction(uniq, String),
      c AggregateFunction(uniqCombined(17), String)"
states="count(), uniqState(remote_addr), uniqCombinedState(17)(remote_addr)"
for g in "6h|toStartOfInterval(timestamp, INTERVAL 6 HOUR)" "1d|toStartOfDay(timestamp)"; do
  q "CREATE TABLE $db.x_all_${g%%|*} (ts DateTime, $both) ENGINE = AggregatingMergeTree
     ORDER BY ts SETTINGS index_granularity = 8"
  q "INSERT INTO $db.x_all_${g%%|*} SELECT ${g#*|} AS ts, $states FROM $db.http_log GROUP BY ts"
done
for g in 16 256; do
  q "CREATE TABLE $db.x_res_g$g (ts DateTime, resource_id UInt64, $both)
     ENGINE = AggregatingMergeTree ORDER BY (resource_id, ts) SETTINGS index_granularity = $g"
  q "INSERT INTO $db.x_res_g$g SELECT toStartOfDay(timestamp) AS ts, resource_id, $states
     FROM $db.http_log GROUP BY ts, resource_id"
  q "OPTIMIZE TABLE $db.x_res_g$g FINAL"
done

printf '%-62s %6s %6s %6s\n' "query ($runs runs, wall ms)" min median max
for f in "uniq|uniqMerge(u)" "uniqCombined(17)|uniqCombinedMerge(17)(c)"; do
  timed "all traffic, 30 daily states, ${f%%|*}" \
    "SELECT ts, ${f#*|} FROM $db.x_all_1d WHERE $(window 30) GROUP BY ts FORMAT Null"
  timed "all traffic, 28 six-hour states, ${f%%|*}" \
    "SELECT ts, ${f#*|} FROM $db.x_all_6h WHERE $(window 7) GROUP BY ts FORMAT Null"
done
for r in 1 5 30 300; do
  for g in 256 16; do
    for f in "uniq|uniqMerge(u)" "uniqCombined(17)|uniqCombinedMerge(17)(c)"; do
      timed "resource ranked $r, 30 days, $g-row granules, ${f%%|*}" \
        "SELECT ts, ${f#*|} FROM $db.x_res_g$g WHERE $(window 30) AND resource_id = $r
         GROUP BY ts FORMAT Null"
    done
  done
done

# The top 10: candidates by requests, as the dashboard picks them.
candidates() { # days, how many
  echo "resource_id IN (SELECT resource_id FROM $db.http_log_uniques_by_resource_1d
        WHERE $(window "$1") GROUP BY resource_id ORDER BY sum(requests) DESC, resource_id
        LIMIT $2)"
}
for days in 7 30; do
  for k in 10 100; do
    for f in "uniq|uniqMerge(u)" "uniqCombined(17)|uniqCombinedMerge(17)(c)"; do
      timed "top 10, $days days of daily states, $k candidates, ${f%%|*}" \
        "SELECT resource_id, ${f#*|} AS n FROM $db.x_res_g16 WHERE $(window "$days")
         AND $(candidates "$days" "$k") GROUP BY resource_id ORDER BY n DESC LIMIT 10 FORMAT Null"
    done
  done
  # Each resource's state over the window's days but the last (what a refresh would keep), merged
  # with the last day's state; then the same as finalized counts.
  q "CREATE TABLE $db.x_trail$days (resource_id UInt64,
     clients AggregateFunction(uniqCombined(17), String))
     ENGINE = AggregatingMergeTree ORDER BY resource_id SETTINGS index_granularity = 16"
  t=$(date +%s.%N)
  q "INSERT INTO $db.x_trail$days SELECT resource_id, uniqCombinedMergeState(17)(clients)
     FROM $db.http_log_uniques_by_resource_combined_1d
     WHERE ts >= toDateTime($((end - days * 86400))) AND ts < toDateTime($((end - 86400)))
     GROUP BY resource_id"
  printf 'trailing %d-day states of every resource made in %.1f s\n' $((days - 1)) \
    "$(echo "$(date +%s.%N) - $t" | bc)"
  two="SELECT resource_id, clients FROM $db.x_trail$days UNION ALL
       SELECT resource_id, clients FROM $db.http_log_uniques_by_resource_combined_1d
       WHERE ts = toDateTime($((end - 86400)))"
  for k in 20 100; do
    timed "top 10, $days days from trailing + last day, $k candidates" \
      "SELECT resource_id, uniqCombinedMerge(17)(clients) AS n FROM ($two)
       WHERE $(candidates "$days" "$k") GROUP BY resource_id ORDER BY n DESC LIMIT 10 FORMAT Null"
  done
  q "CREATE TABLE $db.x_final$days ENGINE = MergeTree ORDER BY resource_id AS
     SELECT resource_id, uniqCombinedMerge(17)(clients) AS clients FROM $db.x_trail$days
     GROUP BY resource_id"
  timed "top 10, $days days, finalized trailing counts" \
    "SELECT resource_id, clients FROM $db.x_final$days ORDER BY clients DESC LIMIT 10 FORMAT Null"
done
timed "the 50 busiest trailing 30-day states merged into one" \
  "SELECT uniqCombinedMerge(17)(clients) FROM $db.x_trail30 WHERE resource_id <= 50 FORMAT Null"
