#!/usr/bin/env bash
# Time and peak memory of `edgelog verify` on a large table: a full audit, then an incremental one
# after 1% more records arrived (docs/BENCHMARKS.md, "verify at scale").
#
#   scripts/bench-verify.sh [ROWS]        (default 100000000; needs scripts/stack.sh up)
#
# Input: ROWS empty records on partition 0 of a fresh input topic (scripts/kafka/FillInput.java,
# anonymizer group committed at the end), and ROWS rows in a fresh database's http_log with the
# matching source_offsets, written by INSERT ... SELECT FROM numbers() (the materialized views fill
# every rollup, so the per-day recount runs for real). Rows spread over the three days before
# today (closed days, ~ROWS/3 a day). Everything it creates is dropped at the end.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROWS=${1:-100000000}
MORE=$((ROWS / 100))
BIN=${BIN:-$HERE/../target/release/edgelog}
KAFKA_HOME=${KAFKA_HOME:-$(ls -d "${EDGESTACK_HOME:-$HOME/.cache/edgelog-stack}"/opt/kafka-* | head -n 1)}
CH=${CH:-http://127.0.0.1:8123}
ID=benchverify_$(date +%s)
OUT=${OUT:-/tmp/$ID}
mkdir -p "$OUT"
log() { echo "[bench-verify $(date -u +%T)] $*"; }
ch() { curl -sSf "$CH/" --data-binary "$1"; }

[ -x "$BIN" ] || (cd "$HERE/.." && cargo build --release --bin edgelog)
export EDGELOG_KAFKA__BROKERS=127.0.0.1:9092
export EDGELOG_TOPICS__INPUT=${ID}_in EDGELOG_TOPICS__ANONYMIZED=${ID}_anon
export EDGELOG_TOPICS__DEAD_LETTER=${ID}_dlq EDGELOG_TOPICS__LOADER_DEAD_LETTER=${ID}_anon_dlq
export EDGELOG_TOPICS__PARTITIONS=1
export EDGELOG_ANONYMIZER__GROUP_ID=${ID}_anonymizer EDGELOG_LOADER__GROUP_ID=${ID}_loader
export EDGELOG_CLICKHOUSE__DATABASE=$ID EDGELOG_CLICKHOUSE__ADMIN_URL=$CH

cleanup() {
  log "dropping database $ID and topics ${ID}_*"
  ch "DROP DATABASE IF EXISTS $ID" || true
  java -cp "$KAFKA_HOME/libs/*" "$HERE/kafka/DeleteTopics.java" 127.0.0.1:9092 \
    "${ID}_in" "${ID}_anon" "${ID}_dlq" "${ID}_anon_dlq" || true
}
trap cleanup EXIT

"$BIN" setup >/dev/null

# Fills offsets [FROM, FROM + N) of partition 0 on both sides.
fill() {
  local from=$1 n=$2 t0
  t0=$(date +%s)
  java -Xmx512m -cp "$KAFKA_HOME/libs/*" "$HERE/kafka/FillInput.java" 127.0.0.1:9092 \
    "${ID}_in" "${ID}_anonymizer" "$n" 2>&1 | grep -v "^SLF4J" | tail -n 1
  log "kafka: $n records in $(( $(date +%s) - t0 )) s"
  t0=$(date +%s)
  ch "INSERT INTO $ID.http_log (timestamp, resource_id, bytes_sent, request_time_milli,
        response_status, cache_status, method, remote_addr, url, source_partition, source_offset)
      SELECT toStartOfDay(now()) - INTERVAL 3 DAY + toIntervalSecond(intDiv(o * 259199, $ROWS + $MORE)),
             o % 1000, o % 5000, o % 100, [200, 404, 500][1 + o % 3], 'HIT', 'GET',
             concat('10.0.', toString(o % 250), '.X'), '/r', 0, o
      FROM (SELECT number + $from AS o FROM numbers($n))
      SETTINGS max_insert_threads = 2, max_block_size = 1048576, min_insert_block_size_rows = 1048576"
  log "clickhouse: $n rows in $(( $(date +%s) - t0 )) s"
}

# Runs verify under /usr/bin/time while sampling ClickHouse's tracked memory (the whole server's,
# so other users of the shared server count too); prints verdict, wall time, peak RSS, peaks.
run() {
  local name=$1; shift
  ( while :; do ch "SELECT value FROM system.metrics WHERE metric = 'MemoryTracking' FORMAT TSV"
      sleep 0.5; done ) > "$OUT/$name.chmem" 2>/dev/null &
  local sampler=$!
  /usr/bin/time -v "$BIN" verify "$@" > "$OUT/$name.txt" 2> "$OUT/$name.time" || true
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  log "$name ($*): $(tail -n 1 "$OUT/$name.txt")"
  log "$name: $(grep -h 'audited now' "$OUT/$name.txt")"
  log "$name: wall $(grep 'Elapsed (wall' "$OUT/$name.time" | awk '{print $NF}'), peak RSS $(grep 'Maximum resident' "$OUT/$name.time" | awk '{print $NF}') KiB, CPU $(grep 'Percent of CPU' "$OUT/$name.time" | awk '{print $NF}'); ClickHouse MemoryTracking peak $(sort -n "$OUT/$name.chmem" | tail -n 1 | numfmt --to=iec) (idle before: $IDLE_MEM)"
}

log "filling $ROWS rows"
fill 0 "$ROWS"
IDLE_MEM=$(ch "SELECT value FROM system.metrics WHERE metric = 'MemoryTracking' FORMAT TSV" | numfmt --to=iec)
log "http_log: $(ch "SELECT count(), formatReadableSize(sum(bytes_on_disk)) FROM system.parts WHERE database = '$ID' AND table = 'http_log' AND active FORMAT TSV")"
run full --full
run incremental-unchanged
log "adding $MORE rows"
fill "$ROWS" "$MORE"
run incremental
log "outputs in $OUT"
