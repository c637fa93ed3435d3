#!/usr/bin/env bash
# Error and size of the unique-client states (sql/009-011) on the producer's traffic.
#
#   scripts/uniques-error.sh [DATABASE] [CLICKHOUSE_URL]
#
# DATABASE (default edgelog_bench) must hold http_log and the uniques rollups, e.g. loaded by
#   cargo bench --bench queries -- --rows 10000000 --days 3 --database DATABASE --no-queries
# (10M rows over 3 days is the rate of 100M rows over 30 days, 38.6 records/s, so every minute,
# hour and day bucket is as full as at 100M rows).
#
# Prints, per rollup, the relative error |estimate - uniqExact| / uniqExact over its 100 busiest
# buckets (most distinct clients) at p50, p99 and max: for the shipped states as merged from the
# rollup (`uniq`, or `uniqCombined(17)` in 011's tables), and for the alternatives uniqCombined(12/17) and uniqHLL12 computed from the
# raw rows. Then bytes on disk per row of each uniques table and of its `clients` column, and
# the serialized size of one state of each function at the 100 busiest buckets.
set -euo pipefail
db=${1:-edgelog_bench}
url=${2:-http://127.0.0.1:8123/}
q() { curl -sS --fail-with-body "$url" --data-binary "$1"; }

# table | bucket of a raw timestamp | key columns (comma-prefixed) | -Merge of its state
# (UNIQUES_ERROR_TABLES, a space-separated list of table names, picks some of them;
# UNIQUES_ERROR_RESOURCES=N looks only at resources 1..N in the per-resource tables, whose recount
# of every resource-bucket exceeds the server's query memory at 100M rows: the busiest buckets
# are the busiest resources')
six_hours="toStartOfInterval(timestamp, INTERVAL 6 HOUR)"
combined="uniqCombinedMerge(17)"
rollups=(
  "http_log_uniques_by_resource|toStartOfMinute(timestamp)|, resource_id|uniqMerge"
  "http_log_uniques_by_resource_1d|toStartOfDay(timestamp)|, resource_id|uniqMerge"
  "http_log_uniques_by_status|toStartOfMinute(timestamp)|, response_status, cache_status|uniqMerge"
  "http_log_uniques_by_status_1h|toStartOfHour(timestamp)|, response_status, cache_status|uniqMerge"
  "http_log_uniques|toStartOfMinute(timestamp)||uniqMerge"
  "http_log_uniques_1h|toStartOfHour(timestamp)||uniqMerge"
  "http_log_uniques_by_resource_1h|toStartOfHour(timestamp)|, resource_id|uniqMerge"
  "http_log_uniques_by_resource_keyed_1d|toStartOfDay(timestamp)|, resource_id|uniqMerge"
  "http_log_uniques_6h|$six_hours||$combined"
  "http_log_uniques_1d|toStartOfDay(timestamp)||$combined"
  "http_log_uniques_by_status_6h|$six_hours|, response_status, cache_status|$combined"
  "http_log_uniques_by_status_1d|toStartOfDay(timestamp)|, response_status, cache_status|$combined"
  "http_log_uniques_by_resource_combined_1d|toStartOfDay(timestamp)|, resource_id|$combined"
)

echo "raw rows: $(q "SELECT count() FROM $db.http_log")"
printf '%-34s %-16s %10s %10s %10s %10s\n' table function exact_p50 p50 p99 max
for r in "${rollups[@]}"; do
  IFS='|' read -r table bucket keys merge <<<"$r"
  if [ -n "${UNIQUES_ERROR_TABLES:-}" ] && [[ " $UNIQUES_ERROR_TABLES " != *" $table "* ]]; then
    continue
  fi
  only=""
  if [ -n "${UNIQUES_ERROR_RESOURCES:-}" ] && [[ $keys == *resource_id* ]]; then
    only="WHERE resource_id <= ${UNIQUES_ERROR_RESOURCES}"
  fi
  using="ts${keys}"
  q "
    WITH busiest AS (
      SELECT ${bucket} AS ts${keys}, uniqExact(remote_addr) AS exact,
             uniqCombined(12)(remote_addr) AS c12, uniqCombined(17)(remote_addr) AS c17,
             uniqHLL12(remote_addr) AS h12
      FROM ${db}.http_log ${only} GROUP BY ALL ORDER BY exact DESC LIMIT 100),
    shipped AS (
      SELECT ts${keys}, ${merge}(clients) AS u FROM ${db}.${table}
      WHERE (${using}) IN (SELECT ${using} FROM busiest) GROUP BY ALL)
    SELECT '${table}', f, quantileExact(0.5)(exact), quantileExact(0.5)(e), quantileExact(0.99)(e), max(e)
    FROM (
      SELECT exact, arrayJoin([('shipped', u), ('uniqCombined(12)', c12),
                               ('uniqCombined(17)', c17), ('uniqHLL12', h12)]) AS p,
             p.1 AS f, abs(toInt64(p.2) - toInt64(exact)) / exact AS e
      FROM busiest JOIN shipped USING (${using}))
    GROUP BY f ORDER BY f
    FORMAT TSV" | awk -F'\t' '{printf "%-34s %-16s %10d %9.4f%% %9.4f%% %9.4f%%\n", $1, $2, $3, $4*100, $5*100, $6*100}'
done

echo
echo "bytes on disk per row (active parts, compressed):"
q "
  SELECT table, sum(rows) AS table_rows,
         round(sum(data_compressed_bytes) / sum(rows), 2) AS bytes_per_row
  FROM system.parts WHERE database = '${db}' AND active AND startsWith(table, 'http_log_uniques')
  GROUP BY table ORDER BY table FORMAT PrettyCompactMonoBlock"
q "
  SELECT table, round(sum(column_data_compressed_bytes) / sum(rows), 2) AS clients_bytes_per_row
  FROM system.parts_columns
  WHERE database = '${db}' AND active AND startsWith(table, 'http_log_uniques') AND column = 'clients'
  GROUP BY table ORDER BY table FORMAT PrettyCompactMonoBlock"

echo "serialized state size at the 100 busiest (resource, minute) and (minute) buckets, bytes:"
for r in "toStartOfMinute(timestamp) AS ts, resource_id" "toStartOfMinute(timestamp) AS ts"; do
  q "
    SELECT '${r}' AS bucket,
           round(avg(length(CAST(u, 'String')))) AS uniq,
           round(avg(length(CAST(c17, 'String')))) AS uniqCombined17,
           round(avg(length(CAST(c12, 'String')))) AS uniqCombined12,
           round(avg(length(CAST(h12, 'String')))) AS uniqHLL12
    FROM (SELECT ${r}, uniqExact(remote_addr) AS exact, uniqState(remote_addr) AS u,
                 uniqCombinedState(17)(remote_addr) AS c17, uniqCombinedState(12)(remote_addr) AS c12,
                 uniqHLL12State(remote_addr) AS h12
          FROM ${db}.http_log GROUP BY ALL ORDER BY exact DESC LIMIT 100)
    FORMAT PrettyCompactMonoBlock"
done
