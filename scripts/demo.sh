#!/usr/bin/env bash
# The demo: the local stack, the topics and schema, then producer -> anonymizer -> loader through
# the REAL one-request-per-minute proxy, printing traffic totals from ClickHouse as they land.
#
#   scripts/demo.sh            run until Ctrl-C (totals refresh after each insert, ~every 64 s)
#   scripts/demo.sh --once     stop after the first totals have been shown
#
# Environment: DEMO_RATE (records/s, default 200). Logs of the three processes go to
# $EDGESTACK_HOME/run/demo/*.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ONCE=false
[ "${1:-}" = "--once" ] && ONCE=true
RATE=${DEMO_RATE:-200}
RUN=${EDGESTACK_HOME:-$HOME/.cache/edgelog-stack}/run/demo

scripts/install-build-deps.sh
echo "[demo] building release binaries"
cargo build --release --locked --bins
BIN=target/release
scripts/stack.sh up
"$BIN/edgelog" setup

mkdir -p "$RUN"
pids=()
cleanup() {
  echo "[demo] stopping producer, anonymizer, loader"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  echo "[demo] the stack is still up: scripts/stack.sh down stops it"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export EDGELOG_CLICKHOUSE__PASSWORD=edgelog-dev-password   # the local stack's development secret
"$BIN/anonymizer" > "$RUN/anonymizer.log" 2>&1 & pids+=($!)
"$BIN/loader" > "$RUN/loader.log" 2>&1 & pids+=($!)
"$BIN/producer" --rate "$RATE" > "$RUN/producer.log" 2>&1 & pids+=($!)
echo "[demo] producer ($RATE records/s), anonymizer and loader running; logs in $RUN"
echo "[demo] metrics: http://127.0.0.1:9101/metrics (producer) 9102 (anonymizer) 9103 (loader)"

rows() { curl -sf 'http://127.0.0.1:8123/' --data-binary 'SELECT sum(requests) FROM edgelog.http_log_totals' || echo 0; }
shown=$(rows)
echo "[demo] totals so far: $shown requests; waiting for the loader's next insert through the 1r/m proxy"
deadline=$(( $(date +%s) + 300 ))
while true; do
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "[demo] a process died; see $RUN/*.log"; tail -n 20 "$RUN"/*.log; exit 1; }
  done
  now_rows=$(rows)
  if [ "$now_rows" != "$shown" ] && [ "$now_rows" != 0 ]; then
    shown=$now_rows
    echo; echo "[demo] $(date +%T) traffic totals (last 60 minutes), from edgelog.http_log_totals:"
    "$BIN/edgelog" totals --minutes 60
    $ONCE && exit 0
    deadline=$(( $(date +%s) + 300 ))
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "[demo] no new totals for 300 s; loader log:"; tail -n 30 "$RUN/loader.log"; exit 1
  fi
  sleep 2
done
