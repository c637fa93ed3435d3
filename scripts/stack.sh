#!/usr/bin/env bash
# The local stack without Docker: real Apache Kafka (KRaft, single node), real ClickHouse 26.9 (from
# the chdb-core wheel) and nginx proxies, all on 127.0.0.1, started as plain processes.
#
#   scripts/stack.sh up [--secure]           install what is missing, start what is not running
#                                            (--secure: also the secure parts below)
#   scripts/stack.sh secure-up               start only the secure parts (the plain stack's
#                                            ClickHouse must be running: the HTTPS proxies use it)
#   scripts/stack.sh secure-down             stop only the secure parts
#   scripts/stack.sh down                    stop everything this script started (by PID)
#   scripts/stack.sh status                  one line per component
#   scripts/stack.sh reset                   down, then delete all data (keeps installed software)
#   scripts/stack.sh logs                    where the logs are
#   scripts/stack.sh proxy-start NAME PORT RATE   an extra nginx proxy (e.g. fast 8126 10r/s)
#   scripts/stack.sh proxy-stop NAME
#   scripts/stack.sh proxy-mode NAME MODE    reload a proxy as normal|budget|503|504 (fault injection)
#   scripts/stack.sh restart kafka|clickhouse [--kill]   stop (or SIGKILL) and start again
#   scripts/stack.sh shards-up | shards-down  two ClickHouse shards and their proxy (cluster mode)
#   scripts/stack.sh shard-stop N | shard-start N   stop or start shard 1 or 2 (a shard outage)
#   scripts/stack.sh cluster-up | cluster-down    a three-node Kafka cluster (see below)
#   scripts/stack.sh cluster-node 1|2|3 start|stop|kill   one node of it (kill: SIGKILL)
#   scripts/stack.sh cluster-role leader TOPIC PARTITION | txn-coordinator TRANSACTIONAL_ID |
#                                 group-coordinator GROUP     prints the id of the node holding it
#   scripts/stack.sh cluster-wait-in-sync [SECONDS]  until all nodes are up and every replica in sync
#
# Components and ports:
#   kafka        127.0.0.1:9092 (controller 9093)   Apache Kafka $KAFKA_VERSION from Maven Central
#   clickhouse   127.0.0.1:8123 (native 9000)       chdb-core==$CHDB_VERSION from PyPI
#   proxy        127.0.0.1:8124 rate 1r/m           the original ch-proxy config (no burst, 1 MiB)
#   proxy-fast   127.0.0.1:8125 rate 600r/m         same config, faster, for tests
# Secure parts (`up --secure`; a second broker, so the plain one everyone's tests use is unchanged):
#   kafka-secure 127.0.0.1:9192 SASL_SSL (controller 9193 SASL_SSL)  SCRAM-SHA-512 users, ACLs
#                from scripts/kafka/secure-acls.txt (StandardAuthorizer; nothing else allowed)
#   proxy-tls    https://127.0.0.1:8443 rate 1r/m   the proxy's config, serving HTTPS
#   proxy-tls-fast https://127.0.0.1:8444 600r/m    same, faster, for tests
# Shards (`shards-up`; cluster mode, section "clickhouse shards" below):
#   clickhouse-shard1/2  127.0.0.1:8133/8143 (native 9010/9020), cluster edgelog_shards
#   proxy-shards         127.0.0.1:8135 rate 600r/m, in front of shard 1
# Kafka cluster (`cluster-up`; not part of `up`, but `down` stops it too):
#   kafka-node-1..3  127.0.0.1:19092,19093,19094 (controllers 19192-19194): KRaft, replication
#                factor 3, min.insync.replicas 2 (internal topics too), unclean leader election off
# A throw-away CA and a server certificate (SAN 127.0.0.1, localhost) are made with openssl in
# $RUN/secure/tls (clients trust ca.pem); the SCRAM passwords are generated once per stack into
# $RUN/secure/passwords/<user> (mode 600) and never printed. $RUN/secure/admin.properties lets
# Kafka's Java tools connect as the super user `admin`.
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
SECURE_CLUSTER_ID=ZWRnZWxvZy1zZWN1cmUtMQ
SECURE=$RUN/secure
# SCRAM users of the secure broker: `broker` is the controller and inter-broker principal, `admin`
# the operator's super user (ACLs); the stages' users get only scripts/kafka/secure-acls.txt.
SECURE_USERS=(broker admin edgelog-anonymizer edgelog-loader edgelog-operator edgelog-producer)

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
# kafka_node_properties DIR REPLICAS MIN_ISR: the settings every broker shares (the plain and secure
# single nodes, the cluster's nodes): data in DIR/data; topics and the internal ones (consumer
# offsets, transactions) on REPLICAS replicas, writes acknowledged by MIN_ISR of them; never an
# out-of-sync replica as leader (it would drop acknowledged records).
kafka_node_properties() {
  cat <<EOF
log.dirs=$1/data
num.partitions=4
auto.create.topics.enable=false
default.replication.factor=$2
min.insync.replicas=$3
unclean.leader.election.enable=false
offsets.topic.replication.factor=$2
transaction.state.log.replication.factor=$2
transaction.state.log.min.isr=$3
share.coordinator.state.topic.replication.factor=$2
share.coordinator.state.topic.min.isr=$3
group.initial.rebalance.delay.ms=0
log.retention.hours=168
EOF
}

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
EOF
  kafka_node_properties "$dir" 1 1 >> "$dir/server.properties"
  write_kafka_log4j "$dir"
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

write_kafka_log4j() {
  cat > "$1/log4j2.properties" <<'EOF'
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
}

# ---------------------------------------------------------------- clickhouse
clickhouse_ready() { curl -sf -m 2 http://127.0.0.1:8123/ping >/dev/null; }

users_xml_hash() { sha256sum "$HERE/clickhouse/users.xml" | cut -d' ' -f1; }

start_clickhouse() {
  local dir=$RUN/clickhouse
  if pid_alive "$dir/pid"; then
    log "clickhouse already running (pid $(cat "$dir/pid"))"
    # The chdb-core server reads users.xml once: a changed file needs a restart to apply.
    if [ "$(cat "$dir/users.sha256" 2>/dev/null)" != "$(users_xml_hash)" ]; then
      log "WARNING: clickhouse runs with another scripts/clickhouse/users.xml than this one; apply it with: scripts/stack.sh restart clickhouse"
    fi
    return 0
  fi
  port_open 8123 && die "port 8123 is taken by another process"
  mkdir -p "$dir/data"
  users_xml_hash > "$dir/users.sha256"
  nohup "$CHDB_VENV/bin/python" "$HERE/clickhouse/clickhouse_server.py" --data "$dir/data" \
    --http-port 8123 --tcp-port 9000 --users-xml "$HERE/clickhouse/users.xml" \
    > "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_until clickhouse 120 "$dir/pid" "$dir/server.log" clickhouse_ready
}

# ---------------------------------------------------------------- nginx proxies
# The original ch-proxy: limit_req per client IP, no burst (over budget = 503), nginx's default
# client_max_body_size of 1 MiB (413 above it), default proxy timeouts.
# proxy_start NAME PORT RATE [tls]: `tls` serves HTTPS with the secure stack's certificate.
proxy_start() {
  local name=$1 port=$2 rate=$3 tls=${4:-} dir=$RUN/$1
  if pid_alive "$dir/nginx.pid"; then log "$name already running (pid $(cat "$dir/nginx.pid"))"; return 0; fi
  port_open "$port" && die "port $port is taken by another process"
  mkdir -p "$dir/tmp"
  echo "$port" > "$dir/port"; echo "$rate" > "$dir/rate"
  if [ "$tls" = tls ]; then echo "$SECURE/tls" > "$dir/tls"; else rm -f "$dir/tls"; fi
  proxy_conf "$name" normal
  nginx -c "$dir/nginx.conf" -p "$dir" 2>> "$dir/error.log"
  wait_until "$name" 20 "" "$dir/error.log" port_open "$port"
}

# proxy_conf NAME MODE: writes the proxy's nginx.conf. Modes other than `normal` are faults for
# scripts/chaos.sh: `budget` (1r/m: 503 outside the budget), `503` (every request), `504` (nginx
# gives up on ClickHouse after 1 ms: the insert usually lands, the client sees 504).
proxy_conf() {
  local name=$1 mode=$2 dir=$RUN/$1 port rate location listen upstream
  port=$(cat "$dir/port"); rate=$(cat "$dir/rate")
  # The ClickHouse HTTP port behind it: the stack's server unless the proxy's dir names another.
  upstream=$(cat "$dir/upstream" 2>/dev/null || echo 8123)
  listen="listen 127.0.0.1:$port;"
  if [ -f "$dir/tls" ]; then
    local certs; certs=$(cat "$dir/tls")
    # Only TLS differs from the plain proxy: same budget, body limit and timeouts.
    listen="listen 127.0.0.1:$port ssl;
        ssl_certificate $certs/server.crt;
        ssl_certificate_key $certs/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;"
  fi
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
        $listen
        location / {
            $location
            proxy_pass http://127.0.0.1:$upstream;
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

# ---------------------------------------------------------------- secure parts
# The throw-away CA and one server certificate for everything on 127.0.0.1 (Kafka, nginx).
secure_certs() {
  local d=$SECURE/tls
  [ -f "$d/server.crt" ] && return 0
  command -v openssl >/dev/null || apt_install openssl
  rm -rf "$d"; mkdir -p "$d"; chmod 700 "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=edgelog local stack CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile server.ext -out server.crt 2>/dev/null
    # Kafka's PEM key store: the unencrypted PKCS#8 key followed by the certificate chain.
    cat server.key server.crt ca.pem > kafka-keystore.pem
    chmod 600 ./*.key kafka-keystore.pem
    chmod 644 ca.pem server.crt
    rm -f server.csr server.ext
  ) || die "openssl could not make the stack's certificates"
  log "made a throw-away CA and a server certificate in $d (clients trust ca.pem)"
}

# One random password per SCRAM user, made once per stack (the broker's data is formatted with them).
secure_passwords() {
  local d=$SECURE/passwords user
  mkdir -p "$d"; chmod 700 "$d"
  for user in "${SECURE_USERS[@]}"; do
    [ -s "$d/$user" ] && continue
    (umask 077; openssl rand -hex 24 | tr -d '\n' > "$d/$user")
  done
}
secure_password() { cat "$SECURE/passwords/$1"; }

secure_kafka_ready() {
  port_open 9192 && grep -q "Kafka Server started" "$SECURE/kafka/server.log" 2>/dev/null
}

start_secure_kafka() {
  local dir=$SECURE/kafka
  if pid_alive "$dir/pid"; then log "kafka-secure already running (pid $(cat "$dir/pid"))"; return 0; fi
  port_open 9192 && die "port 9192 is taken by another process"
  mkdir -p "$dir/data"; chmod 700 "$dir"
  local broker_pw tls=$SECURE/tls
  broker_pw=$(secure_password broker)
  # Written with umask 077: it holds the broker's own password (JAAS), like any broker's config.
  (umask 077; cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:9193
listeners=SASL_SSL://127.0.0.1:9192,CONTROLLER://127.0.0.1:9193
advertised.listeners=SASL_SSL://127.0.0.1:9192
controller.listener.names=CONTROLLER
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL
inter.broker.listener.name=SASL_SSL
# Clients: SCRAM-SHA-512 over TLS. The controller listener uses PLAIN (KRaft controllers cannot
# check SCRAM: the credentials live in the metadata they serve), also over TLS, as user broker.
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$broker_pw";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$broker_pw" user_broker="$broker_pw";
ssl.keystore.type=PEM
ssl.keystore.location=$tls/kafka-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:broker;User:admin
allow.everyone.if.no.acl.found=false
EOF
  kafka_node_properties "$dir" 1 1 >> "$dir/server.properties"
  cat > "$SECURE/admin.properties" <<EOF
bootstrap.servers=127.0.0.1:9192
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(secure_password admin)";
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
EOF
  )
  write_kafka_log4j "$dir"
  local java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    # SCRAM credentials are part of the formatted metadata, so every user exists before the first
    # client connects. (The passwords are on this one command line for the second it runs.)
    local scram=() user
    for user in "${SECURE_USERS[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$(secure_password "$user")]")
    done
    java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format --standalone \
      -t "$SECURE_CLUSTER_ID" -c "$dir/server.properties" "${scram[@]}" > "$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "formatting the secure KRaft storage failed"; }
  fi
  : > "$dir/server.log"
  nohup java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties" \
    >> "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_until kafka-secure 120 "$dir/pid" "$dir/server.log" secure_kafka_ready
}

# Makes the secure broker's ACLs exactly scripts/kafka/secure-acls.txt (one JVM, one connection).
secure_acls() {
  command -v javac >/dev/null || apt_install openjdk-17-jdk-headless
  java -Xmx256m -cp "$KAFKA_HOME/libs/*" "-Dlog4j2.configurationFile=$SECURE/kafka/log4j2.properties" \
    "$HERE/kafka/SetAcls.java" "$SECURE/admin.properties" "$HERE/kafka/secure-acls.txt" \
    > "$SECURE/acls.log" 2>&1 || { cat "$SECURE/acls.log" >&2; die "setting the secure broker's ACLs failed"; }
  log "kafka-secure: $(tail -n 1 "$SECURE/acls.log")"
}

secure_up() {
  local t0; t0=$(now)
  mkdir -p "$SECURE"; chmod 700 "$SECURE"
  install_kafka; install_nginx
  clickhouse_ready || die "ClickHouse is not running on 8123: start the stack first (scripts/stack.sh up --secure)"
  secure_certs; secure_passwords
  start_secure_kafka
  secure_acls
  proxy_start proxy-tls 8443 1r/m tls
  proxy_start proxy-tls-fast 8444 600r/m tls
  log "secure parts up in $(since "$t0"): SASL_SSL 127.0.0.1:9192, HTTPS 8443/8444, CA $SECURE/tls/ca.pem"
}

secure_down() {
  proxy_stop proxy-tls
  proxy_stop proxy-tls-fast
  stop_pidfile kafka-secure "$SECURE/kafka/pid"
}

# ---------------------------------------------------------------- clickhouse shards (cluster mode)
# Two more chdb-core ClickHouse servers: the two shards of cluster `edgelog_shards` (declared in
# each one's <remote_servers>), for `clickhouse.cluster` (docs/OPERATIONS.md, "Cluster mode";
# tests/cluster_clickhouse.rs). They shard but cannot replicate: the wheel has no Keeper
# (docs/LIMITATIONS.md). Same launcher, users and ClickHouse as the stack's own server.
#   clickhouse-shard1  HTTP 8133, native 9010      clickhouse-shard2  HTTP 8143, native 9020
#   proxy-shards       127.0.0.1:8135 rate 600r/m, in front of shard 1 (the loader's path)
SHARD_CLUSTER=edgelog_shards
shard_http_port() { echo $(( 8123 + 10 * $1 )); }
shard_tcp_port() { echo $(( 9000 + 10 * $1 )); }
shard_dir() { echo "$RUN/clickhouse-shard$1"; }
shard_ready() { curl -sf -m 2 "http://127.0.0.1:$(shard_http_port "$1")/ping" >/dev/null; }
shard_check() { case ${1:-} in 1|2) ;; *) die "shard 1 or 2, not '${1:-}'" ;; esac; }

shard_remote_servers() {
  cat <<EOF
<remote_servers>
  <$SHARD_CLUSTER>
    <shard><replica><host>127.0.0.1</host><port>$(shard_tcp_port 1)</port></replica></shard>
    <shard><replica><host>127.0.0.1</host><port>$(shard_tcp_port 2)</port></replica></shard>
  </$SHARD_CLUSTER>
</remote_servers>
EOF
}

shard_start() {
  local n=$1 dir http
  dir=$(shard_dir "$n"); http=$(shard_http_port "$n")
  if pid_alive "$dir/pid"; then log "clickhouse-shard$n already running (pid $(cat "$dir/pid"))"; return 0; fi
  port_open "$http" && die "port $http is taken by another process"
  mkdir -p "$dir/data"
  shard_remote_servers > "$dir/remote_servers.xml"
  nohup "$CHDB_VENV/bin/python" "$HERE/clickhouse/clickhouse_server.py" --data "$dir/data" \
    --http-port "$http" --tcp-port "$(shard_tcp_port "$n")" --users-xml "$HERE/clickhouse/users.xml" \
    --extra-config "$dir/remote_servers.xml" --display-name "edgelog-shard$n" \
    --max-server-memory-gib 1.5 > "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_until "clickhouse-shard$n" 120 "$dir/pid" "$dir/server.log" shard_ready "$n"
}

shard_stop() { stop_pidfile "clickhouse-shard$1" "$(shard_dir "$1")/pid"; }

shards_up() {
  local t0; t0=$(now)
  mkdir -p "$RUN/proxy-shards"
  install_clickhouse; install_nginx
  shard_start 1; shard_start 2
  shard_http_port 1 > "$RUN/proxy-shards/upstream"
  proxy_start proxy-shards 8135 600r/m
  log "shards up in $(since "$t0"): cluster $SHARD_CLUSTER, HTTP 8133/8143, proxy 8135"
}

# `down` stops every proxy itself; this stops the two servers (quietly when never started).
shards_down_servers() {
  local n
  for n in 1 2; do [ -d "$(shard_dir "$n")" ] && shard_stop "$n"; done
  return 0
}

shards_down() {
  proxy_stop proxy-shards
  shards_down_servers
}

shards_status() {
  local n
  for n in 1 2; do
    [ -d "$(shard_dir "$n")" ] && status_line "clickhouse-shard$n" "$(shard_dir "$n")/pid" "$(shard_http_port "$n")"
  done
  return 0
}

# ---------------------------------------------------------------- kafka cluster
# Three KRaft nodes on 127.0.0.1, each a combined broker and controller, from the same jars as the
# single broker: node N serves clients on 1909(N+1) and the controller quorum on 1919(N+1). Topics
# and the internal topics (consumer offsets, transactions) get 3 replicas and min.insync.replicas 2,
# unclean leader election off: any one node may be killed, stopped or restarting without stopping
# writes or losing an acknowledged one. Independent of the single broker on 9092. Each node takes
# 512 MiB of heap (~0.4-0.7 GiB resident); a cold start takes about a minute on 2 busy cores.
CLUSTER=$RUN/kafka-cluster
CLUSTER_ID=ZWRnZWxvZy1jbHVzdGVyMQ   # base64 of "edgelog-cluster1"; nodes are formatted once
CLUSTER_NODES=(1 2 3)
CLUSTER_BOOTSTRAP=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094
CLUSTER_VOTERS=1@127.0.0.1:19192,2@127.0.0.1:19193,3@127.0.0.1:19194
cluster_port() { echo $(( 19091 + $1 )); }

cluster_node_ready() {
  port_open "$(cluster_port "$1")" && grep -q "Kafka Server started" "$CLUSTER/node-$1/server.log" 2>/dev/null
}

# cluster_node_launch N: formats node N's storage the first time, then starts it without waiting
# (a node waits for a quorum, so the first start needs the others launched too).
cluster_node_launch() {
  local n=$1 dir=$CLUSTER/node-$1 port
  port=$(cluster_port "$n")
  if pid_alive "$dir/pid"; then log "kafka-node-$n already running (pid $(cat "$dir/pid"))"; return 0; fi
  port_open "$port" && die "port $port is taken by another process"
  mkdir -p "$dir/data"
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$CLUSTER_VOTERS
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$(( port + 100 ))
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
  kafka_node_properties "$dir" 3 2 >> "$dir/server.properties"
  write_kafka_log4j "$dir"
  local java_opts=(-Xms512m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    # No --standalone: the static voter list above is the quorum.
    java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format \
      -t "$CLUSTER_ID" -c "$dir/server.properties" > "$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "formatting kafka-node-$n's storage failed"; }
  fi
  # The previous run's log is kept once (a killed node's last words); readiness reads the new one.
  [ -f "$dir/server.log" ] && mv "$dir/server.log" "$dir/server.log.1"
  # Its own session: a node restarted by a test or a chaos run outlives that run's process group.
  setsid nohup java "${java_opts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties" \
    > "$dir/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
}

cluster_node_wait() {
  wait_until "kafka-node-$1" "${CLUSTER_START_TIMEOUT:-300}" "$CLUSTER/node-$1/pid" \
    "$CLUSTER/node-$1/server.log" cluster_node_ready "$1"
}

cluster_up() {
  local t0 n pids=() failed=0
  t0=$(now)
  install_kafka
  mkdir -p "$CLUSTER"
  # Formatting is one JVM per node: in parallel.
  for n in "${CLUSTER_NODES[@]}"; do cluster_node_launch "$n" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || failed=1; done
  [ "$failed" = 0 ] || die "a cluster node could not be launched"
  for n in "${CLUSTER_NODES[@]}"; do cluster_node_wait "$n" || die "kafka-node-$n did not start"; done
  log "kafka cluster up in $(since "$t0"): $CLUSTER_BOOTSTRAP"
}

cluster_down() {
  # In parallel: stopped one by one, the last node waits for a quorum that is gone until its
  # 30 s are up and it is SIGKILLed.
  local n pids=()
  for n in "${CLUSTER_NODES[@]}"; do stop_pidfile "kafka-node-$n" "$CLUSTER/node-$n/pid" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || true; done
}

# cluster_node N start|stop|kill: start waits until the node serves clients; stop is a clean
# shutdown (leadership moved away first); kill is SIGKILL, returning once its port is closed.
cluster_node() {
  local n=$1 action=$2 dir=$CLUSTER/node-$1 pid
  case $n in 1|2|3) ;; *) die "cluster nodes are 1, 2 and 3, not $n" ;; esac
  case $action in
    start) install_kafka; cluster_node_launch "$n"; cluster_node_wait "$n" ;;
    stop) stop_pidfile "kafka-node-$n" "$dir/pid" ;;
    kill)
      if ! pid_alive "$dir/pid"; then echo "kafka-node-$n: not running"; return 0; fi
      pid=$(cat "$dir/pid")
      kill -9 "$pid" 2>/dev/null || true
      wait_until "kafka-node-$n to die" 30 "" /dev/null port_closed "$(cluster_port "$n")"
      rm -f "$dir/pid"; echo "kafka-node-$n: killed (pid $pid)" ;;
    *) die "usage: $0 cluster-node 1|2|3 start|stop|kill" ;;
  esac
}

# ClusterRoles.java (Admin API), compiled once per version of the source.
cluster_tool() {
  local src=$HERE/kafka/ClusterRoles.java out=$CLUSTER/tools hash
  hash=$(sha256sum "$src" | cut -c1-16)
  if [ ! -f "$out/$hash" ]; then
    command -v javac >/dev/null || apt_install openjdk-17-jdk-headless
    rm -rf "$out"; mkdir -p "$out"
    javac -nowarn -cp "$KAFKA_HOME/libs/*" -d "$out" "$src" >&2 || die "compiling ClusterRoles.java failed"
    touch "$out/$hash"
    cat > "$out/log4j2.properties" <<'EOF'
status = error
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ERROR
rootLogger.appenderRef.err.ref = ERR
EOF
  fi
  java -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$out/log4j2.properties" \
    -cp "$out:$KAFKA_HOME/libs/*" ClusterRoles "$CLUSTER_BOOTSTRAP" "$@"
}

# cluster_wait_in_sync [SECONDS]: until all three brokers are registered and no partition
# (internal ones included) has a replica outside its ISR.
cluster_in_sync() {
  local brokers lagging
  brokers=$(cluster_tool brokers 2>/dev/null | wc -l) || return 1
  [ "$brokers" -eq "${#CLUSTER_NODES[@]}" ] || return 1
  lagging=$(cluster_tool out-of-sync 2>/dev/null) || return 1
  [ -z "$lagging" ]
}
cluster_wait_in_sync() {
  local t0 deadline
  t0=$(now); deadline=$(( $(date +%s) + ${1:-300} ))
  until cluster_in_sync; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "kafka cluster: replicas still out of sync after ${1:-300} s:"
      cluster_tool brokers | sed 's/^/  broker /' >&2 || true
      cluster_tool out-of-sync >&2 || true
      return 1
    fi
    sleep 1
  done
  log "kafka cluster: every replica in sync ($(since "$t0"))"
}

cluster_status() {
  local n
  for n in "${CLUSTER_NODES[@]}"; do
    status_line "kafka-node-$n" "$CLUSTER/node-$n/pid" "$(cluster_port "$n")"
  done
}

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
  if [ -d "$SECURE" ]; then
    status_line kafka-secure "$SECURE/kafka/pid" 9192
    status_line proxy-tls "$RUN/proxy-tls/nginx.pid" 8443
    status_line proxy-tls-fast "$RUN/proxy-tls-fast/nginx.pid" 8444
  fi
  shards_status
  if [ -d "$CLUSTER" ]; then cluster_status; fi
  local extra
  for extra in "$RUN"/*/nginx.pid; do
    [ -e "$extra" ] || continue
    local name; name=$(basename "$(dirname "$extra")")
    case $name in proxy|proxy-fast|proxy-tls|proxy-tls-fast) continue ;; esac
    status_line "$name" "$extra" "$(sed -n 's/.*listen 127.0.0.1:\([0-9]*\)[ ;].*/\1/p' "$(dirname "$extra")/nginx.conf")"
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
  stop_pidfile kafka-secure "$SECURE/kafka/pid"
  if [ -d "$CLUSTER" ]; then cluster_down; fi
  stop_pidfile kafka "$RUN/kafka/pid"
  stop_pidfile clickhouse "$RUN/clickhouse/pid"
  shards_down_servers
}

case ${1:-} in
  up)
    case ${2:-} in
      "") up ;;
      --secure) up; secure_up ;;
      *) die "usage: $0 up [--secure]" ;;
    esac ;;
  secure-up) secure_up ;;
  secure-down) secure_down ;;
  down) down ;;
  status) status ;;
  reset) down; rm -rf "$RUN"; echo "data deleted ($RUN)" ;;
  logs) ls -1 "$RUN"/*/*.log "$RUN"/secure/*/*.log 2>/dev/null || echo "no logs yet" ;;
  proxy-start) [ $# -eq 4 ] || die "usage: $0 proxy-start NAME PORT RATE"; install_nginx; proxy_start "$2" "$3" "$4" ;;
  proxy-stop) [ $# -eq 2 ] || die "usage: $0 proxy-stop NAME"; proxy_stop "$2" ;;
  proxy-mode) [ $# -eq 3 ] || die "usage: $0 proxy-mode NAME normal|budget|503|504"; proxy_mode "$2" "$3" ;;
  shards-up) shards_up ;;
  shards-down) shards_down ;;
  shard-stop) shard_check "${2:-}"; shard_stop "$2" ;;
  shard-start) shard_check "${2:-}"; shard_start "$2" ;;
  cluster-up) cluster_up ;;
  cluster-down) cluster_down ;;
  cluster-node) [ $# -eq 3 ] || die "usage: $0 cluster-node 1|2|3 start|stop|kill"; cluster_node "$2" "$3" ;;
  cluster-role)
    case ${2:-} in
      leader) [ $# -eq 4 ] || die "usage: $0 cluster-role leader TOPIC PARTITION" ;;
      txn-coordinator|group-coordinator) [ $# -eq 3 ] || die "usage: $0 cluster-role $2 ID" ;;
      *) die "usage: $0 cluster-role leader TOPIC PARTITION | txn-coordinator TRANSACTIONAL_ID | group-coordinator GROUP" ;;
    esac
    cluster_tool "${@:2}" ;;
  cluster-wait-in-sync) cluster_wait_in_sync "${2:-300}" ;;
  restart) [ $# -ge 2 ] || die "usage: $0 restart kafka|clickhouse [--kill]"; restart "$2" "${3:-}" ;;
  *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
