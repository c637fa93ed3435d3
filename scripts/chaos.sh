#!/usr/bin/env bash
# Fault injection on the real local stack, then the exactly-once audit.
#
#   scripts/chaos.sh [--duration SECONDS] [--rate RECORDS_PER_S] [--seed N] [--no-server-restarts]
#                    [--faults fault,fault,...|none] [--soak]
#
# Runs the producer at a steady rate, two anonymizer instances and a loader (each restarted by a
# small supervisor whenever it exits, as an orchestrator would) through a dedicated nginx proxy
# `chaos` on 127.0.0.1:8126. For DURATION seconds (default 120) it injects, at random every 3-10 s:
#   kill-anonymizer      SIGKILL one anonymizer instance
#   kill-anonymizers     SIGKILL both at once
#   kill-loader          SIGKILL the loader
#   proxy-503            every request answered 503 for a few seconds
#   proxy-504            nginx gives up after 1 ms: inserts land but the loader sees 504
#   proxy-budget         1 request per minute: 503 outside the budget
#   proxy-refused        the proxy is stopped (connection refused) for a few seconds
#   clickhouse-restart   ClickHouse SIGKILLed or stopped, then started again
#   kafka-restart        the broker stopped (or SIGKILLed), then started again
# Then it stops the producer, lets the pipeline drain and runs `edgelog verify --wait-drained`.
# Exit status: verify's. Every run uses fresh topics, groups and database (prefix chaos_<time>).
# --no-server-restarts leaves ClickHouse and Kafka alone (when others share the stack); --faults
# picks from a list of your own (`none`: no faults).
# --soak: the soak test instead: release binaries, no faults, the loader through the REAL 1r/m
# proxy (127.0.0.1:8124, slots every 64 s), one anonymizer; every 30 s the resident memory of each
# stage and both lags go to $DIR/samples.tsv. Ends with the same drain and verify. Both modes log
# the end-to-end latency quantiles from the loader's histogram (of the last loader process).
# Logs: $EDGESTACK_HOME/run/chaos-runs/<name>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION=120 RATE=300 SEED=$RANDOM SERVER_RESTARTS=true ONLY="" SOAK=false
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --no-server-restarts) SERVER_RESTARTS=false; shift ;;
    --faults) ONLY=$2; shift 2 ;;
    --soak) SOAK=true; ONLY=none; shift ;;
    *) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
RANDOM=$SEED

NAME=$($SOAK && echo soak || echo chaos)_$(date +%s)
STACK_RUN=${EDGESTACK_HOME:-$HOME/.cache/edgelog-stack}/run
DIR=$STACK_RUN/chaos-runs/$NAME
mkdir -p "$DIR"
log() { printf '[chaos %s] %s\n' "$(date +%T)" "$*" | tee -a "$DIR/chaos.log" >&2; }

scripts/install-build-deps.sh
if $SOAK; then
  cargo build --release --locked --bins 2>&1 | tail -n 1
  BIN=$PWD/target/release
else
  cargo build --locked --bins 2>&1 | tail -n 1
  BIN=$PWD/target/debug
fi
scripts/stack.sh up > "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-start chaos 8126 600r/m >> "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-mode chaos normal

export EDGELOG_TOPICS__INPUT=${NAME}_in EDGELOG_TOPICS__ANONYMIZED=${NAME}_anon \
  EDGELOG_TOPICS__DEAD_LETTER=${NAME}_dlq EDGELOG_TOPICS__LOADER_DEAD_LETTER=${NAME}_anon_dlq EDGELOG_ANONYMIZER__GROUP_ID=${NAME}_anonymizer \
  EDGELOG_LOADER__GROUP_ID=${NAME}_loader EDGELOG_CLICKHOUSE__DATABASE=$NAME \
  EDGELOG_CLICKHOUSE__URL=http://127.0.0.1:8126 EDGELOG_LOADER__SLOT_SPACING=300ms \
  EDGELOG_CLICKHOUSE__PASSWORD=edgelog-dev-password EDGELOG_PRODUCER__GARBAGE_SHARE=0.005 EDGELOG_PRODUCER__HOSTILE_SHARE=0.005 \
  EDGELOG_PRODUCER__METRICS_LISTEN=127.0.0.1:9111 EDGELOG_LOADER__METRICS_LISTEN=127.0.0.1:9113
if $SOAK; then
  # Its own client IP: the proxy budgets per IP, and tests share 127.0.0.1's budget on 8124.
  export EDGELOG_CLICKHOUSE__URL=http://127.0.0.1:8124 EDGELOG_LOADER__SLOT_SPACING=64s \
    EDGELOG_LOADER__SOURCE_ADDRESS=127.0.0.2
fi
"$BIN/edgelog" setup >> "$DIR/chaos.log"

# supervise NAME COMMAND...: runs COMMAND again whenever it exits, until $DIR/stop exists. The
# current PID is in $DIR/NAME.pid; unexpected exits are counted in $DIR/NAME.exits.
supervise() {
  local name=$1; shift
  (
    while [ ! -e "$DIR/stop" ]; do
      "$@" >> "$DIR/$name.log" 2>&1 &
      echo $! > "$DIR/$name.pid"
      set +e; wait $!; local code=$?; set -e
      echo "$(date +%T) exit $code" >> "$DIR/$name.exits"
      [ -e "$DIR/stop" ] || sleep 1
    done
  ) 2>> "$DIR/supervisor.log" &
}
supervise anonymizer-a env EDGELOG_ANONYMIZER__INSTANCE_ID=a \
  EDGELOG_ANONYMIZER__METRICS_LISTEN=127.0.0.1:9112 "$BIN/anonymizer"
$SOAK || supervise anonymizer-b env EDGELOG_ANONYMIZER__INSTANCE_ID=b \
  EDGELOG_ANONYMIZER__METRICS_LISTEN=127.0.0.1:9122 "$BIN/anonymizer"
supervise loader "$BIN/loader"
"$BIN/producer" --rate "$RATE" --duration "${DURATION}s" > "$DIR/producer.log" 2>&1 &
PRODUCER=$!

stop_all() {
  touch "$DIR/stop"
  for f in "$DIR"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  kill "$PRODUCER" 2>/dev/null || true
  wait 2>/dev/null || true
  scripts/stack.sh proxy-stop chaos > /dev/null 2>&1 || true
}
trap stop_all EXIT

kill9() { local f=$DIR/$1.pid; [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; }
FAULTS=(kill-anonymizer kill-anonymizers kill-loader proxy-503 proxy-504 proxy-budget proxy-refused)
$SERVER_RESTARTS && FAULTS+=(clickhouse-restart kafka-restart)
[ -n "$ONLY" ] && IFS=, read -r -a FAULTS <<< "$ONLY"
[ "$ONLY" = none ] && FAULTS=()

# sample: elapsed seconds, resident memory (KiB) of anonymizer-a and loader, both lags.
rss() { local f=$DIR/$1.pid; awk '/VmRSS/ {print $2}' "/proc/$(cat "$f" 2>/dev/null)/status" 2>/dev/null || echo NA; }
lag() { curl -s -m 2 "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}' | head -n 1; }
sample() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$(( $(date +%s) - started ))" "$(rss anonymizer-a)" "$(rss loader)" \
    "$(lag 127.0.0.1:9112 edgelog_anonymizer_lag)" "$(lag 127.0.0.1:9113 edgelog_loader_lag)" >> "$DIR/samples.tsv"
}
started=$(date +%s)
printf 'seconds\tanonymizer_rss_kib\tloader_rss_kib\tanonymizer_lag\tloader_lag\n' > "$DIR/samples.tsv"
declare -A injected=()
log "$NAME: seed $SEED, $DURATION s of faults at $RATE records/s; faults: ${FAULTS[*]}"
end=$(( $(date +%s) + DURATION ))
while [ "$(date +%s)" -lt "$end" ]; do
  if [ ${#FAULTS[@]} -eq 0 ]; then sleep 30; sample; continue; fi
  sleep $(( 3 + RANDOM % 8 ))
  fault=${FAULTS[RANDOM % ${#FAULTS[@]}]}
  hold=$(( 3 + RANDOM % 6 ))
  log "inject $fault"
  case $fault in
    kill-anonymizer) kill9 "anonymizer-$([ $((RANDOM % 2)) = 0 ] && echo a || echo b)" ;;
    kill-anonymizers) kill9 anonymizer-a; kill9 anonymizer-b ;;
    kill-loader) kill9 loader ;;
    proxy-503|proxy-504|proxy-budget)
      scripts/stack.sh proxy-mode chaos "${fault#proxy-}"; sleep "$hold"
      scripts/stack.sh proxy-mode chaos normal ;;
    proxy-refused)
      scripts/stack.sh proxy-stop chaos > /dev/null; sleep "$hold"
      scripts/stack.sh proxy-start chaos 8126 600r/m >> "$DIR/stack.log" 2>&1 ;;
    clickhouse-restart)
      scripts/stack.sh restart clickhouse "$([ $((RANDOM % 2)) = 0 ] && echo --kill)" >> "$DIR/stack.log" 2>&1 ;;
    kafka-restart)
      scripts/stack.sh restart kafka "$([ $((RANDOM % 2)) = 0 ] && echo --kill)" >> "$DIR/stack.log" 2>&1 ;;
  esac
  injected[$fault]=$(( ${injected[$fault]:-0} + 1 ))
done

log "faults over; every server up again, waiting for the producer to finish"
scripts/stack.sh up >> "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-start chaos 8126 600r/m >> "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-mode chaos normal
wait "$PRODUCER" || log "the producer exited with $?"
tail -n 1 "$DIR/producer.log" | tee -a "$DIR/chaos.log"
log "draining, then auditing"
set +e
"$BIN/edgelog" verify --wait-drained 10m | tee "$DIR/verify.txt"
verdict=${PIPESTATUS[0]}
set -e
# End-to-end latency (edge timestamp -> insert confirmed, per row) from the loader's histogram.
curl -s -m 5 http://127.0.0.1:9113/metrics > "$DIR/loader-metrics.txt" || true
latency=$(awk -f scripts/histogram-quantiles.awk -v metric=edgelog_loader_end_to_end_seconds \
  "$DIR/loader-metrics.txt" 2>/dev/null || true)
[ -n "$latency" ] && log "end-to-end latency: $latency"
total=0 summary=""
for f in "${!injected[@]}"; do total=$(( total + injected[$f] )); summary+=" $f=${injected[$f]}"; done
restarts=""
for f in "$DIR"/*.exits; do [ -e "$f" ] && restarts+=" $(basename "$f" .exits)=$(wc -l < "$f")"; done
log "RESULT $NAME: $total faults ($summary ), process exits:${restarts:- none}; $(tail -n 1 "$DIR/verify.txt")"
exit "$verdict"
