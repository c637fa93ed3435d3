#!/usr/bin/env bash
# Fills a scratch database with synthetic traffic quickly, for measuring the rollups' queries at
# scale (docs/BENCHMARKS.md, "Unique clients"): every migration of sql/ (TTLs off), then ROWS rows
# over DAYS days ending at the queries bench's DATA_END (2026-11-22 00:00 UTC), inserted one day
# at a time with INSERT ... SELECT FROM numbers() into http_log, so that every row goes through
# the real materialized views. Prints each day's insert time.
#
#   scripts/uniques-load.sh ROWS DAYS DATABASE [CLICKHOUSE_URL]
#
# UNIQUES_LOAD_MIGRATIONS (default: all) names the migrations to apply by number, e.g.
# "001 003 009 010": the raw table, the sums the top-10 panel ranks by, and the unique-client
# rollups, which loads 100M rows in half the time of every view (the top-N summaries of 005 and
# the per-client sums cost most). 007 needs 002-006 (it alters their views).
#
# The rows follow the producer's model (shared/synth.rs, ProducerSettings defaults) closely
# enough for the rollups' sizes and the queries bench's samples: 10,000 resources Zipf(1.1),
# 100,000 clients Zipf(1.05) with 5% IPv6, anonymized as the anonymizer writes them (`a.b.c.X`,
# a /48), the producer's status and cache weights; times evenly spread (the bench's load does
# the same). Zipf draws are the continuous inverse CDF, so ranks are close, not identical, to
# the Rust model's. The database is not dropped: DROP DATABASE it when done.
set -euo pipefail
rows=${1:?rows}
days=${2:?days}
db=${3:?database}
url=${4:-http://127.0.0.1:8123/}
cd "$(dirname "$0")/.."
q() { curl -sS --fail-with-body "$url" --data-binary "$1"; }

data_end=1795392000 # benches/queries.rs DATA_END_S
q "CREATE DATABASE IF NOT EXISTS $db"
migrations=()
for f in sql/[0-9]*.sql; do
  n=$(basename "$f" | cut -c1-3)
  if [ -z "${UNIQUES_LOAD_MIGRATIONS:-}" ] || [[ " $UNIQUES_LOAD_MIGRATIONS " == *" $n "* ]]; then
    migrations+=("$f")
  fi
done
scripts/apply-migrations.py "$db" "$url" "${migrations[@]}"
if [ "$(q "SELECT count() FROM $db.http_log")" != 0 ]; then
  echo "$db.http_log is not empty; DROP DATABASE $db first" >&2
  exit 1
fi
per_day=$((rows / days))
started=$(date +%s)
for d in $(seq 0 $((days - 1))); do
  day_start=$((data_end - (days - d) * 86400))
  offset=$((d * per_day))
  # u(n, k): a uniform draw in [0, 1) from row n's k-th hash.
  sql="INSERT INTO $db.http_log
  SELECT
    toDateTime($day_start + intDiv(n * 86400, $per_day)) AS timestamp,
    least(10000, toUInt64(pow(1 - u1 * (1 - pow(10001, -0.1)), -10))) AS resource_id,
    if(method = 'HEAD' OR response_status >= 300, 150 + h3 % 450, 200 + h3 % 2000000) AS bytes_sent,
    toUInt64(exp(3 + 1.5 * u3)) AS request_time_milli,
    multiIf(s < 820, 200, s < 850, 301, s < 865, 400, s < 880, 403, s < 960, 404,
            s < 975, 500, s < 990, 502, 504) AS response_status,
    multiIf(c < 620, 'HIT', c < 820, 'MISS', c < 860, 'STALE', c < 920, 'BYPASS',
            c < 960, 'REVALIDATED', c < 985, 'UPDATING', 'SCARCE') AS cache_status,
    if(h2 % 100 < 93, 'GET', 'HEAD') AS method,
    if(ch % 100 < 5,
       concat('2001:', lower(hex(toUInt16(bitShiftRight(ch, 16)))), ':', lower(hex(toUInt16(bitShiftRight(ch, 32)))), '::'),
       concat(toString(1 + ch % 223), '.', toString(bitShiftRight(ch, 8) % 256), '.',
              toString(bitShiftRight(ch, 16) % 256), '.X')) AS remote_addr,
    concat('/r', toString(resource_id), '/assets/', toString(h3 % 1000), '.jpg') AS url,
    0 AS source_partition,
    $offset + n AS source_offset
  FROM (
    SELECT number AS n,
           sipHash64(n + $offset, 1) AS h1, sipHash64(n + $offset, 2) AS h2,
           sipHash64(n + $offset, 3) AS h3,
           h1 / 18446744073709551616 AS u1, h3 / 18446744073709551616 AS u3,
           h2 % 1000 AS s, intDiv(h2, 1000) % 1000 AS c,
           -- the client's rank (Zipf), then its address as a function of the rank
           sipHash64(least(100000, toUInt64(pow(1 - (h2 / 18446744073709551616)
               * (1 - pow(100001, -0.05)), -20)))) AS ch
    FROM numbers($per_day)
  )
  SETTINGS max_insert_threads = 1, max_block_size = 1048576, parallel_view_processing = 1,
           min_insert_block_size_rows_for_materialized_views = 1048576,
           min_insert_block_size_bytes_for_materialized_views = 268435456"
  t=$(date +%s.%N)
  q "$sql"
  printf 'day %2d: %d rows in %.1f s\n' "$((d + 1))" "$per_day" "$(echo "$(date +%s.%N) - $t" | bc)"
done
echo "loaded $((per_day * days)) rows into $db in $(($(date +%s) - started)) s"
