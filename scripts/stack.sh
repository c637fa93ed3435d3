#!/usr/bin/env bash
# The local stack without Docker: real Apache Kafka (KRaft, single node), real ClickHouse 26.9 (from
# the chdb-core wheel) and nginx proxies, all on 127.0.0.1, started as plain processes.
#
#   scripts/stack.sh up                      install what is missing, start what is not running
#   scripts/stack.sh down                    stop everything this script started (by PID)
#   scripts/stack.sh status                  one line per component
#   scripts/stack.sh reset                   down, then delete all data (keeps installed software)
#   scripts/stack.sh logs                    where the logs are
#   scripts/stack.sh proxy-start NAME PORT RATE   an extra nginx proxy (e.g. fast 8126 10r/s)
#   scripts/stack.sh proxy-stop NAME
#   scripts/stack.sh proxy-mode NAME MODE    reload a proxy as normal|budget|503|504 (fault injection)
#   scripts/stack.sh restart kafka|clickhouse [--kill]   stop (or SIGKILL) and start again
#
# Components and ports:
#   kafka        127.0.0.1:9092 (controller 9093)   Apache Kafka $KAFKA_VERSION from Maven Central
#   clickhouse   127.0.0.1:8123 (native 9000)       chdb-core==$CHDB_VERSION from PyPI
#   proxy        127.0.0.1:8124 rate 1r/m           the original ch-proxy config (no burst, 1 MiB)
#   proxy-fast   127.0.0.1:8125 rate 600r/m         same config, faster, for tests
#
# Software is cached in $EDGESTACK_HOME/opt, state (data, logs, pids) in $EDGESTACK_HOME/run;
# EDGESTACK_HOME defaults to ~/.cache/edgelog-stack, outside the clone, so a second start is fast.
# (Not EDGELOG_*: that prefix is the application's configuration, where unknown keys are errors.)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STACK_HOME=${EDGESTACK_HOME:-$HOME/.cache/edgelog-stack}
OPT=$STACK_HOME/opt
RUN=$STACK_HOME/run
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/kafka/pom.xml")
CHDB_VERSION=26.9.0
KAFKA_HOME=$OPT/kafka-$KAFKA_VERSION
CHDB_VENV=$OPT/chdb-core-$CHDB_VERSION
KAFKA_CLUSTER_ID=ZWRnZWxvZy1sb2NhbC0x   # fixed: the data dir is formatted once

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f s", e - s }'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_until DESCRIPTION SECONDS PIDFILE LOGFILE COMMAND...: polls COMMAND every 0.2 s.
wait_until() {
  local what=$1 secs=$2 pidfile=$3 logfile=$4; shift 4
  local deadline=$(( $(date +%s) + secs ))
  until "$@"; do
    if [ -n "$pidfile" ] && ! pid_alive "$pidfile"; then
      log "$what: process exited; last log lines:"; tail -n 40 "$logfile" >&2 || true; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$what: not ready after ${secs}s; last log lines:"; tail -n 40 "$logfile" >&2 || true; return 1
    fi
    sleep 0.2
  done
}

apt_install() {
  local updated=$RUN/.apt-updated
  mkdir -p "$RUN"
  if [ ! -f "$updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && touch "$updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------- install
install_kafka() {
  [ -f "$KAFKA_HOME/.complete" ] && return 0
  command -v java >/dev/null || die "java not found (Java 17 is needed for Kafka $KAFKA_VERSION)"
  command -v mvn >/dev/null || apt_install maven
  log "installing Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME"
  rm -rf "$KAFKA_HOME"; mkdir -p "$KAFKA_HOME/libs"
  mvn -q -B -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/libs" > "$OPT/kafka-mvn.log" 2>&1 \
    || { cat "$OPT/kafka-mvn.log" >&2; die "mvn could not fetch the Kafka jars"; }
  [ -f "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" ] || die "kafka jar missing after mvn"
  touch "$KAFKA_HOME/.complete"
}

install_clickhouse() {
  [ -f "$CHDB_VENV/.complete" ] && return 0
  log "installing chdb-core==$CHDB_VERSION (ClickHouse $CHDB_VERSION) from PyPI into $CHDB_VENV"
  rm -rf "$CHDB_VENV"
  python3 -m venv "$CHDB_VENV" || { apt_install python3-venv; python3 -m venv "$CHDB_VENV"; }
  # --no-deps: the server path (chdb._chdb) needs neither pandas nor pyarrow.
  "$CHDB_VENV/bin/pip" install -q --disable-pip-version-check --no-deps "chdb-core==$CHDB_VERSION" >&2
  touch "$CHDB_VENV/.complete"
}

install_nginx() {
  command -v nginx >/dev/null && return 0
  log "installing nginx from Debian's packages"
  apt_install nginx-light
  # The package may start the system service on port 80; we run our own instances only.
  if command -v systemctl >/dev/null; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
  [ -f /run/nginx.pid ] && kill "$(cat /run/nginx.pid)" 2>/dev/null || true
}

# ---------------------------------------------------------------- kafka
kafka_ready() { port_open 9092 && grep -q "Kafka Server started" "$RUN/kafka/server.log" 2>/dev/null; }

start_kafka() {
  local dir=$RUN/kafka
  if pid_alive "$dir/pid"; then log "kafka already running (pid $(cat "$dir/pid"))"; return 0; fi
  port_open 9092 && die "port 9092 is taken by another process"
  mkdir -p "$dir/data"
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:9093
listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://127.0.0.1:9092
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
EOF
  cat > "$dir/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.clients.name = org.apache.kafka
logger.clients.level = WARN
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
EOF
  local java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format --standalone \
      -t "$KAFKA_CLUSTER_ID" -c "$dir/server.properties" > "$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "formatting the KRaft storage failed"; }
  fi
  : > "$dir/server.log"
  nohup java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties" \
    >> "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_until kafka 120 "$dir/pid" "$dir/server.log" kafka_ready
}

# ---------------------------------------------------------------- clickhouse
clickhouse_ready() { curl -sf -m 2 http://127.0.0.1:8123/ping >/dev/null; }

start_clickhouse() {
  local dir=$RUN/clickhouse
  if pid_alive "$dir/pid"; then log "clickhouse already running (pid $(cat "$dir/pid"))"; return 0; fi
  port_open 8123 && die "port 8123 is taken by another process"
  mkdir -p "$dir/data"
  nohup "$CHDB_VENV/bin/python" "$HERE/clickhouse/clickhouse_server.py" --data "$dir/data" \
    --http-port 8123 --tcp-port 9000 --users-xml "$HERE/clickhouse/users.xml" \
    > "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_until clickhouse 120 "$dir/pid" "$dir/server.log" clickhouse_ready
}

# ---------------------------------------------------------------- nginx proxies
# The original ch-proxy: limit_req per client IP, no burst (over budget = 503), nginx's default
# client_max_body_size of 1 MiB (413 above it), default proxy timeouts.
proxy_start() {
  local name=$1 port=$2 rate=$3 dir=$RUN/$1
  if pid_alive "$dir/nginx.pid"; then log "$name already running (pid $(cat "$dir/nginx.pid"))"; return 0; fi
  port_open "$port" && die "port $port is taken by another process"
  mkdir -p "$dir/tmp"
  echo "$port" > "$dir/port"; echo "$rate" > "$dir/rate"
  proxy_conf "$name" normal
  nginx -c "$dir/nginx.conf" -p "$dir" 2>> "$dir/error.log"
  wait_until "$name" 20 "" "$dir/error.log" port_open "$port"
}

# proxy_conf NAME MODE: writes the proxy's nginx.conf. Modes other than `normal` are faults for
# scripts/chaos.sh: `budget` (1r/m: 503 outside the budget), `503` (every request), `504` (nginx
# gives up on ClickHouse after 1 ms: the insert usually lands, the client sees 504).
proxy_conf() {
  local name=$1 mode=$2 dir=$RUN/$1 port rate location
  port=$(cat "$dir/port"); rate=$(cat "$dir/rate")
  case $mode in
    normal) location="limit_req zone=ch-limit;" ;;
    budget) rate=1r/m; location="limit_req zone=ch-limit;" ;;
    503) location="return 503;" ;;
    504) location="limit_req zone=ch-limit; proxy_read_timeout 1ms;" ;;
    *) die "unknown proxy mode $mode (normal, budget, 503, 504)" ;;
  esac
  cat > "$dir/nginx.conf" <<EOF
# generated by scripts/stack.sh: $name on 127.0.0.1:$port, rate $rate, mode $mode
user root;
worker_processes 1;
daemon on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 512; }
http {
    access_log $dir/access.log;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;

    limit_req_zone \$binary_remote_addr zone=ch-limit:10m rate=$rate;

    server {
        listen 127.0.0.1:$port;
        location / {
            $location
            proxy_pass http://127.0.0.1:8123;
        }
    }
}
EOF
  nginx -q -t -c "$dir/nginx.conf" -p "$dir" 2>> "$dir/error.log" || { tail -n 5 "$dir/error.log" >&2; die "bad nginx config for $name"; }
}

# proxy_mode NAME MODE: rewrites the config and reloads the running proxy.
proxy_mode() {
  local name=$1 mode=$2 dir=$RUN/$1
  pid_alive "$dir/nginx.pid" || die "$name is not running"
  proxy_conf "$name" "$mode"
  nginx -c "$dir/nginx.conf" -p "$dir" -s reload 2>> "$dir/error.log"
}

proxy_stop() { stop_pidfile "$1" "$RUN/$1/nginx.pid"; }

# ---------------------------------------------------------------- stop / status
stop_pidfile() {
  local name=$1 pidfile=$2 pid
  if ! pid_alive "$pidfile"; then rm -f "$pidfile"; echo "$name: not running"; return 0; fi
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) still running after 30 s; SIGKILL"; kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

status_line() {
  local name=$1 pidfile=$2 port=$3
  if pid_alive "$pidfile"; then
    printf '%-12s running  pid %-8s 127.0.0.1:%s\n' "$name" "$(cat "$pidfile")" "$port"
  else
    printf '%-12s stopped\n' "$name"
  fi
}

status() {
  status_line kafka "$RUN/kafka/pid" 9092
  status_line clickhouse "$RUN/clickhouse/pid" 8123
  status_line proxy "$RUN/proxy/nginx.pid" 8124
  status_line proxy-fast "$RUN/proxy-fast/nginx.pid" 8125
  local extra
  for extra in "$RUN"/*/nginx.pid; do
    [ -e "$extra" ] || continue
    local name; name=$(basename "$(dirname "$extra")")
    case $name in proxy|proxy-fast) continue ;; esac
    status_line "$name" "$extra" "$(sed -n 's/.*listen 127.0.0.1:\([0-9]*\);/\1/p' "$(dirname "$extra")/nginx.conf")"
  done
}

# restart kafka|clickhouse [--kill]: a clean stop (or SIGKILL of the server and its children),
# then a start that waits until the server is ready again.
restart() {
  local name=$1 how=$2 pidfile pid port
  case $name in
    kafka) pidfile=$RUN/kafka/pid; port=9092 ;;
    clickhouse) pidfile=$RUN/clickhouse/pid; port=8123 ;;
    *) die "restart kafka or clickhouse, not $name" ;;
  esac
  if [ "$how" = --kill ] && pid_alive "$pidfile"; then
    pid=$(cat "$pidfile")
    pkill -9 -P "$pid" 2>/dev/null || true
    kill -9 "$pid" 2>/dev/null || true
    wait_until "$name to die" 30 "" /dev/null port_closed "$port"
    rm -f "$pidfile"; echo "$name: killed (pid $pid)"
  else
    stop_pidfile "$name" "$pidfile"
  fi
  "start_$name"
}
port_closed() { ! port_open "$1"; }

up() {
  local t0; t0=$(now)
  mkdir -p "$RUN"
  install_kafka; install_clickhouse; install_nginx
  log "installed in $(since "$t0")"
  local t1; t1=$(now); start_clickhouse; log "clickhouse ready in $(since "$t1")"
  t1=$(now); start_kafka; log "kafka ready in $(since "$t1")"
  proxy_start proxy 8124 1r/m
  proxy_start proxy-fast 8125 600r/m
  log "stack up in $(since "$t0"): $(curl -s 'http://127.0.0.1:8123/?query=SELECT+%27ClickHouse+%27||version()'), Kafka $KAFKA_VERSION"
  status
}

down() {
  local pidfile
  for pidfile in "$RUN"/*/nginx.pid; do
    [ -e "$pidfile" ] || continue
    proxy_stop "$(basename "$(dirname "$pidfile")")"
  done
  stop_pidfile kafka "$RUN/kafka/pid"
  stop_pidfile clickhouse "$RUN/clickhouse/pid"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  reset) down; rm -rf "$RUN"; echo "data deleted ($RUN)" ;;
  logs) ls -1 "$RUN"/*/*.log 2>/dev/null || echo "no logs yet" ;;
  proxy-start) [ $# -eq 4 ] || die "usage: $0 proxy-start NAME PORT RATE"; install_nginx; proxy_start "$2" "$3" "$4" ;;
  proxy-stop) [ $# -eq 2 ] || die "usage: $0 proxy-stop NAME"; proxy_stop "$2" ;;
  proxy-mode) [ $# -eq 3 ] || die "usage: $0 proxy-mode NAME normal|budget|503|504"; proxy_mode "$2" "$3" ;;
  restart) [ $# -ge 2 ] || die "usage: $0 restart kafka|clickhouse [--kill]"; restart "$2" "${3:-}" ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
