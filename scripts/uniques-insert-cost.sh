#!/usr/bin/env bash
# What the unique-client views (sql/009-012; 012 adds no insert work) cost an insert.
#
#   scripts/uniques-insert-cost.sh [SOURCE_DATABASE] [ROWS] [RUNS] [CLICKHOUSE_URL]
#
# UNIQUES_COST_WITHOUT (default _http_log_uniques: 009-012) is the pattern of the migration files
# left out of the first database (grep), e.g. 011_ for what 011 alone adds; 012 reads 010's
# tables, so leaving out 010 takes '010_\|012_'.
#
# Makes two scratch databases, one with every migration but the unique-client ones and one with
# all of them (`edgelog setup`'s SQL, rendered with the TTLs off), and inserts the same ROWS rows of SOURCE_DATABASE.http_log
# (default edgelog_bench, 1000000 rows; the bench numbers its rows by source_offset) into each, RUNS times alternately (a different slice each
# run), with the loader's pinned insert settings. Prints the server's elapsed time of each insert
# (the first of the two alternating run by run) and the medians. The scratch databases are
# dropped at the end.
#
# Merges are stopped in both scratch databases, so that the merges of one insert's parts do not
# run into the next timed insert (with them, the medians of the same database moved between 3.0
# and 5.1 s from one run of this script to the next). When the server's PID is known
# (UNIQUES_COST_PID, default: the local stack's), each insert's CPU time is printed too: the
# server's user + system time over the insert, all threads, which a busy neighbour on the same
# cores changes less than the wall time.
set -euo pipefail
src=${1:-edgelog_bench}
rows=${2:-1000000}
runs=${3:-3}
url=${4:-http://127.0.0.1:8123/}
cd "$(dirname "$0")/.."
q() { curl -sS --fail-with-body "$url" --data-binary "$1"; }

apply() { # database, migration files...
  local db=$1
  shift
  q "CREATE DATABASE $db"
  scripts/apply-migrations.py "$db" "$url" "$@"
}

without=uq_cost_without_$$
with=uq_cost_with_$$
trap 'q "DROP DATABASE IF EXISTS $without"; q "DROP DATABASE IF EXISTS $with"' EXIT
apply "$without" $(ls sql/[0-9]*.sql | grep -v -- "${UNIQUES_COST_WITHOUT:-_http_log_uniques}")
apply "$with" sql/[0-9]*.sql
# Refreshable views (012) read the rollups, never the insert: keep their refreshes out too.
for db in "$without" "$with"; do
  q "SYSTEM STOP MERGES $db"
  for view in $(q "SELECT view FROM system.view_refreshes WHERE database = '$db' FORMAT TSVRaw"); do
    q "SYSTEM STOP VIEW $db.$view"
  done
done
pid=${UNIQUES_COST_PID:-$(cat "$HOME/.cache/edgelog-stack/run/clickhouse/pid" 2>/dev/null || true)}
[ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || pid=
tck=$(getconf CLK_TCK)
# The server's user + system CPU time so far, in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the command name, field 2, has no spaces here).
cpu_ticks() { if [ -n "$pid" ]; then awk '{print $14 + $15}' "/proc/$pid/stat"; else echo 0; fi; }
# The slices in memory first, so the timed inserts do not include reading the source table.
q "CREATE TABLE $without.source ENGINE = Memory AS SELECT * FROM $src.http_log
   WHERE source_offset < $((rows * runs))"
settings="async_insert=0&insert_deduplicate=1&deduplicate_blocks_in_dependent_materialized_views=1&max_insert_block_size=1048576&min_insert_block_size_rows=0&min_insert_block_size_bytes=0&min_insert_block_size_rows_for_materialized_views=1048576&min_insert_block_size_bytes_for_materialized_views=268435456&wait_end_of_query=1"
declare -A ms cpu
for run in $(seq 1 "$runs"); do
  offset=$(( (run - 1) * rows ))
  # Which database goes first alternates, so that neither always inserts into a server that
  # has just done the other's work.
  order="$without $with"
  [ $((run % 2)) -eq 0 ] && order="$with $without"
  for db in $order; do
    before=$(cpu_ticks)
    summary=$(curl -sS --fail-with-body -D - -o /dev/null "$url?$settings" --data-binary \
      "INSERT INTO $db.http_log SELECT * FROM $without.source WHERE source_offset >= $offset AND source_offset < $offset + $rows" |
      tr -d '\r' | sed -n 's/^X-ClickHouse-Summary: //p')
    cpu_ms=$(( ($(cpu_ticks) - before) * 1000 / tck ))
    elapsed=$(sed -n 's/.*"elapsed_ns":"\([0-9]*\)".*/\1/p' <<<"$summary")
    ms[$db]+="$((elapsed / 1000000)) "
    cpu[$db]+="$cpu_ms "
    echo "run $run ${db%_$$}: $((elapsed / 1000000)) ms for $rows rows${pid:+, server CPU $cpu_ms ms}"
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
a=$(median <<<"${ms[$without]}")
b=$(median <<<"${ms[$with]}")
echo "median: without $a ms, with $b ms: the unique-client views add $(( (b - a) * 100 / a ))% to the insert"
if [ -n "$pid" ]; then
  a=$(median <<<"${cpu[$without]}")
  b=$(median <<<"${cpu[$with]}")
  echo "median server CPU: without $a ms, with $b ms: the unique-client views add $(( (b - a) * 100 / a ))%"
fi
