#!/usr/bin/env bash
# Fills rollup tables that a migration added after the data (e.g. sql/011 on a database loaded by
# scripts/uniques-load.sh without it) from http_log, each with its own view's SELECT, then merges
# them (OPTIMIZE FINAL), and prints each table's fill time. Scratch databases only: `edgelog
# backfill` is the real thing.
#
#   scripts/uniques-fill.sh DATABASE TABLE... [-- CLICKHOUSE_URL]
set -euo pipefail
db=${1:?database}
shift
tables=()
url=http://127.0.0.1:8123/
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then url=${2:?url}; break; fi
  tables+=("$1")
  shift
done
q() { curl -sS --fail-with-body "$url" --data-binary "$1"; }
for t in "${tables[@]}"; do
  select=$(q "SELECT as_select FROM system.tables WHERE database = '$db' AND name = '${t}_mv'
              FORMAT TSVRaw")
  [ -n "$select" ] || { echo "$db.${t}_mv: no such view" >&2; exit 1; }
  started=$(date +%s.%N)
  q "INSERT INTO $db.$t $select"
  q "OPTIMIZE TABLE $db.$t FINAL"
  printf '%s: %.1f s\n' "$t" "$(echo "$(date +%s.%N) - $started" | bc)"
done
