#!/usr/bin/env bash
# Fault injection on the real local stack, then the exactly-once audit.
#
#   scripts/chaos.sh [--duration SECONDS] [--rate RECORDS_PER_S] [--seed N] [--no-server-restarts]
#                    [--faults fault,fault,...|none] [--soak]
#                    [--cluster [--stop-seconds S]] [--in-order]
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
# --cluster: the same run on the three-node Kafka cluster (`scripts/stack.sh cluster-up`, started if
# needed; topics with 3 replicas, min.insync.replicas 2) through its own proxy `chaos-cluster` on
# 127.0.0.1:8127 (metrics 9131-9134, so it can run beside a plain run), with the faults only a
# cluster has, besides kill-anonymizer and kill-loader:
#   kill-partition-leader   SIGKILL the node leading a random partition of the input or anonymized topic
#   kill-txn-coordinator    SIGKILL the node coordinating a random anonymizer's transactions
#   kill-group-coordinator  SIGKILL the node coordinating the anonymizer's or the loader's group
#   stop-node               stop a random node cleanly for --stop-seconds (default 30)
# A killed node is started again after 3-8 s; after each node fault the run waits until every
# replica is back in sync, so no two nodes are ever down together. A node that will not start
# again (after 3 tries) fails the run even if verify is clean.
# --in-order: each fault of the list once, in order (DURATION still sets the producer's run).
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

DURATION=120 RATE=300 SEED=$RANDOM SERVER_RESTARTS=true ONLY="" SOAK=false CLUSTER=false
IN_ORDER=false STOP_SECONDS=30
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --no-server-restarts) SERVER_RESTARTS=false; shift ;;
    --faults) ONLY=$2; shift 2 ;;
    --soak) SOAK=true; ONLY=none; shift ;;
    --cluster) CLUSTER=true; shift ;;
    --in-order) IN_ORDER=true; shift ;;
    --stop-seconds) STOP_SECONDS=$2; shift 2 ;;
    *) sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
RANDOM=$SEED

NAME=$($SOAK && echo soak || echo chaos)$($CLUSTER && echo _cluster)_$(date +%s)
# The plain run's proxy and metrics ports, or the cluster run's own.
PROXY=chaos PROXY_PORT=8126 PRODUCER_METRICS=9111 ANON_A_METRICS=9112 ANON_B_METRICS=9122 LOADER_METRICS=9113
$CLUSTER && PROXY=chaos-cluster PROXY_PORT=8127 PRODUCER_METRICS=9131 ANON_A_METRICS=9132 \
  ANON_B_METRICS=9134 LOADER_METRICS=9133
PARTITIONS=4
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
if $CLUSTER; then
  scripts/stack.sh cluster-up >> "$DIR/stack.log" 2>&1
  scripts/stack.sh cluster-wait-in-sync 300 >> "$DIR/stack.log" 2>&1
fi
scripts/stack.sh proxy-start "$PROXY" "$PROXY_PORT" 600r/m >> "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-mode "$PROXY" normal

export EDGELOG_TOPICS__INPUT=${NAME}_in EDGELOG_TOPICS__ANONYMIZED=${NAME}_anon \
  EDGELOG_TOPICS__DEAD_LETTER=${NAME}_dlq EDGELOG_TOPICS__LOADER_DEAD_LETTER=${NAME}_anon_dlq EDGELOG_ANONYMIZER__GROUP_ID=${NAME}_anonymizer \
  EDGELOG_LOADER__GROUP_ID=${NAME}_loader EDGELOG_CLICKHOUSE__DATABASE=$NAME \
  EDGELOG_CLICKHOUSE__URL=http://127.0.0.1:$PROXY_PORT EDGELOG_LOADER__SLOT_SPACING=300ms \
  EDGELOG_CLICKHOUSE__PASSWORD=edgelog-dev-password EDGELOG_PRODUCER__GARBAGE_SHARE=0.005 EDGELOG_PRODUCER__HOSTILE_SHARE=0.005 \
  EDGELOG_PRODUCER__METRICS_LISTEN=127.0.0.1:$PRODUCER_METRICS EDGELOG_LOADER__METRICS_LISTEN=127.0.0.1:$LOADER_METRICS \
  EDGELOG_TOPICS__PARTITIONS=$PARTITIONS
if $CLUSTER; then
  export EDGELOG_KAFKA__BROKERS=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094 \
    EDGELOG_TOPICS__REPLICATION_FACTOR=3
fi
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
  EDGELOG_ANONYMIZER__METRICS_LISTEN=127.0.0.1:$ANON_A_METRICS "$BIN/anonymizer"
$SOAK || supervise anonymizer-b env EDGELOG_ANONYMIZER__INSTANCE_ID=b \
  EDGELOG_ANONYMIZER__METRICS_LISTEN=127.0.0.1:$ANON_B_METRICS "$BIN/anonymizer"
supervise loader "$BIN/loader"
"$BIN/producer" --rate "$RATE" --duration "${DURATION}s" > "$DIR/producer.log" 2>&1 &
PRODUCER=$!

stop_all() {
  touch "$DIR/stop"
  for f in "$DIR"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  kill "$PRODUCER" 2>/dev/null || true
  wait 2>/dev/null || true
  scripts/stack.sh proxy-stop "$PROXY" > /dev/null 2>&1 || true
}
trap stop_all EXIT

kill9() { local f=$DIR/$1.pid; [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; }
if $CLUSTER; then
  FAULTS=(kill-anonymizer kill-loader kill-partition-leader kill-txn-coordinator kill-group-coordinator stop-node)
else
  FAULTS=(kill-anonymizer kill-anonymizers kill-loader proxy-503 proxy-504 proxy-budget proxy-refused)
  $SERVER_RESTARTS && FAULTS+=(clickhouse-restart kafka-restart)
fi
[ -n "$ONLY" ] && IFS=, read -r -a FAULTS <<< "$ONLY"
[ "$ONLY" = none ] && FAULTS=()

# sample: elapsed seconds, resident memory (KiB) of anonymizer-a and loader, both lags.
rss() { local f=$DIR/$1.pid; awk '/VmRSS/ {print $2}' "/proc/$(cat "$f" 2>/dev/null)/status" 2>/dev/null || echo NA; }
lag() { curl -s -m 2 "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}' | head -n 1; }
sample() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$(( $(date +%s) - started ))" "$(rss anonymizer-a)" "$(rss loader)" \
    "$(lag "127.0.0.1:$ANON_A_METRICS" edgelog_anonymizer_lag)" "$(lag "127.0.0.1:$LOADER_METRICS" edgelog_loader_lag)" >> "$DIR/samples.tsv"
}
# The cluster's faults. node_for FAULT: the node holding that fault's role, picked at random among
# the run's partitions, anonymizers and groups (cluster-role fails while no one holds it yet).
role_node() { scripts/stack.sh cluster-role "$@" 2>> "$DIR/stack.log"; }
node_for() {
  local topic group
  case $1 in
    kill-partition-leader)
      topic=$([ $((RANDOM % 2)) = 0 ] && echo "$EDGELOG_TOPICS__INPUT" || echo "$EDGELOG_TOPICS__ANONYMIZED")
      role_node leader "$topic" $((RANDOM % PARTITIONS)) ;;
    kill-txn-coordinator)
      role_node txn-coordinator "${EDGELOG_ANONYMIZER__GROUP_ID}-$([ $((RANDOM % 2)) = 0 ] && echo a || echo b)" ;;
    kill-group-coordinator)
      group=$([ $((RANDOM % 2)) = 0 ] && echo "$EDGELOG_ANONYMIZER__GROUP_ID" || echo "$EDGELOG_LOADER__GROUP_ID")
      role_node group-coordinator "$group" ;;
    stop-node) echo $((1 + RANDOM % 3)) ;;
  esac
}
node_failures=0
# node_start N: starts node N again, three tries; a node that never comes back is counted (the run
# then fails) rather than ending the run here, so verify still reports on the data.
node_start() {
  local try
  for try in 1 2 3; do
    if scripts/stack.sh cluster-node "$1" start >> "$DIR/stack.log" 2>&1; then return 0; fi
    log "ERROR: node $1 did not start (try $try of 3); see $DIR/stack.log"
  done
  node_failures=$(( node_failures + 1 ))
  return 1
}
cluster_fault() {
  local fault=$1 hold=$2 node="" try
  # Right after a start or a fault a role may have no holder yet (no transaction begun, a group
  # rebalancing): ask again for up to a minute.
  for try in $(seq 1 20); do
    node=$(node_for "$fault") && [ -n "$node" ] && break
    node=""; sleep 3
  done
  if [ -z "$node" ]; then log "skip $fault: no node held that role for a minute"; return 1; fi
  if [ "$fault" = stop-node ]; then
    log "stop node $node for $STOP_SECONDS s"
    scripts/stack.sh cluster-node "$node" stop >> "$DIR/stack.log" 2>&1 || log "ERROR: stopping node $node failed"
    sleep "$STOP_SECONDS"
  else
    log "SIGKILL node $node ($fault), start it again in $hold s"
    scripts/stack.sh cluster-node "$node" kill >> "$DIR/stack.log" 2>&1 || log "ERROR: killing node $node failed"
    sleep "$hold"
  fi
  node_start "$node" || return 0
  scripts/stack.sh cluster-wait-in-sync 300 >> "$DIR/stack.log" 2>&1 \
    || { log "ERROR: replicas not in sync 300 s after node $node came back"; node_failures=$(( node_failures + 1 )); }
  log "node $node back and in sync"
}

started=$(date +%s)
printf 'seconds\tanonymizer_rss_kib\tloader_rss_kib\tanonymizer_lag\tloader_lag\n' > "$DIR/samples.tsv"
declare -A injected=()
log "$NAME: seed $SEED, $DURATION s of faults at $RATE records/s; faults$($IN_ORDER && echo " (each once, in order)"): ${FAULTS[*]}"
end=$(( $(date +%s) + DURATION ))
next=0
while if $IN_ORDER; then [ "$next" -lt ${#FAULTS[@]} ]; else [ "$(date +%s)" -lt "$end" ]; fi; do
  if [ ${#FAULTS[@]} -eq 0 ]; then sleep 30; sample; continue; fi
  sleep $(( 3 + RANDOM % 8 ))
  if $IN_ORDER; then fault=${FAULTS[next]}; next=$(( next + 1 )); else fault=${FAULTS[RANDOM % ${#FAULTS[@]}]}; fi
  hold=$(( 3 + RANDOM % 6 ))
  log "inject $fault"
  case $fault in
    kill-anonymizer) kill9 "anonymizer-$([ $((RANDOM % 2)) = 0 ] && echo a || echo b)" ;;
    kill-anonymizers) kill9 anonymizer-a; kill9 anonymizer-b ;;
    kill-loader) kill9 loader ;;
    proxy-503|proxy-504|proxy-budget)
      scripts/stack.sh proxy-mode "$PROXY" "${fault#proxy-}"; sleep "$hold"
      scripts/stack.sh proxy-mode "$PROXY" normal ;;
    proxy-refused)
      scripts/stack.sh proxy-stop "$PROXY" > /dev/null; sleep "$hold"
      scripts/stack.sh proxy-start "$PROXY" "$PROXY_PORT" 600r/m >> "$DIR/stack.log" 2>&1 ;;
    clickhouse-restart)
      scripts/stack.sh restart clickhouse "$([ $((RANDOM % 2)) = 0 ] && echo --kill)" >> "$DIR/stack.log" 2>&1 ;;
    kafka-restart)
      scripts/stack.sh restart kafka "$([ $((RANDOM % 2)) = 0 ] && echo --kill)" >> "$DIR/stack.log" 2>&1 ;;
    kill-partition-leader|kill-txn-coordinator|kill-group-coordinator|stop-node)
      $CLUSTER || { log "$fault needs --cluster"; exit 2; }
      cluster_fault "$fault" "$hold" || continue ;;
    *) log "unknown fault $fault"; exit 2 ;;
  esac
  injected[$fault]=$(( ${injected[$fault]:-0} + 1 ))
done

log "faults over; every server up again, waiting for the producer to finish"
scripts/stack.sh up >> "$DIR/stack.log" 2>&1
if $CLUSTER; then
  scripts/stack.sh cluster-up >> "$DIR/stack.log" 2>&1 || { log "ERROR: the cluster is not whole again"; node_failures=$(( node_failures + 1 )); }
fi
scripts/stack.sh proxy-start "$PROXY" "$PROXY_PORT" 600r/m >> "$DIR/stack.log" 2>&1
scripts/stack.sh proxy-mode "$PROXY" normal
wait "$PRODUCER" || log "the producer exited with $?"
tail -n 1 "$DIR/producer.log" | tee -a "$DIR/chaos.log"
log "draining, then auditing"
set +e
"$BIN/edgelog" verify --wait-drained 10m | tee "$DIR/verify.txt"
verdict=${PIPESTATUS[0]}
set -e
# End-to-end latency (edge timestamp -> insert confirmed, per row) from the loader's histogram.
curl -s -m 5 "http://127.0.0.1:$LOADER_METRICS/metrics" > "$DIR/loader-metrics.txt" || true
latency=$(awk -f scripts/histogram-quantiles.awk -v metric=edgelog_loader_end_to_end_seconds \
  "$DIR/loader-metrics.txt" 2>/dev/null || true)
[ -n "$latency" ] && log "end-to-end latency: $latency"
total=0 summary=""
for f in "${!injected[@]}"; do total=$(( total + injected[$f] )); summary+=" $f=${injected[$f]}"; done
restarts=""
for f in "$DIR"/*.exits; do [ -e "$f" ] && restarts+=" $(basename "$f" .exits)=$(wc -l < "$f")"; done
log "RESULT $NAME: $total faults ($summary ), process exits:${restarts:- none}; $(tail -n 1 "$DIR/verify.txt")"
if [ "$node_failures" -gt 0 ]; then
  log "FAILED: $node_failures time(s) a cluster node did not come back or catch up (see $DIR/stack.log)"
  [ "$verdict" = 0 ] && verdict=1
fi
exit "$verdict"
