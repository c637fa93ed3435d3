#!/usr/bin/env bash
# The test command: installs what the tests need, starts the local stack (real Kafka, ClickHouse,
# nginx, the secure parts: `scripts/stack.sh up --secure`, and two ClickHouse shards:
# `shards-up`) if it is not running, then runs formatting and lint checks, the Docker and Helm
# checks, every test, and a short fault-injection run (scripts/chaos.sh; CHAOS_SECONDS, default 90).
# The three-node Kafka cluster (`scripts/stack.sh cluster-up`) is started too, in the background
# while the code builds: for tests/kafka_cluster.rs (about 2.5 minutes) and a short cluster fault
# run (chaos.sh --cluster --in-order, each node fault once; CLUSTER_CHAOS_SECONDS, default 60;
# 3 to 4 minutes with the node restarts, BENCHMARKS.md).
# A stack this script started is stopped again when it exits; one that was running stays up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)

scripts/install-build-deps.sh
# Capture first: `status | grep -q` under pipefail fails whenever grep exits before status has
# written its last line (SIGPIPE), which skipped `up` in about one run in five.
stack_status=$(scripts/stack.sh status)
stop_at_exit=()
if grep -qE '^(kafka|clickhouse|proxy|proxy-fast) +stopped' <<<"$stack_status"; then
  scripts/stack.sh up
  stop_at_exit+=(down)
fi
# The secure parts (tests/secure.rs): a SASL_SSL broker with ACLs and the HTTPS proxies.
if [ "$(grep -cE '^(kafka-secure|proxy-tls|proxy-tls-fast) +running' <<<"$stack_status")" -lt 3 ]; then
  scripts/stack.sh secure-up
  stop_at_exit+=(secure-down)
fi
# Two ClickHouse shards and their proxy (tests/cluster_clickhouse.rs, cluster mode).
if [ "$(grep -cE '^(clickhouse-shard1|clickhouse-shard2|proxy-shards) +running' <<<"$stack_status")" -lt 3 ]; then
  scripts/stack.sh shards-up
  stop_at_exit+=(shards-down)
fi
# The cluster's cold start (about a minute) overlaps the lint and build below.
cluster_up=""
if [ "$(grep -cE '^kafka-node-[123] +running' <<<"$stack_status")" -lt 3 ]; then
  cluster_log=$(mktemp)
  scripts/stack.sh cluster-up > "$cluster_log" 2>&1 &
  cluster_up=$!
  stop_at_exit+=(cluster-down)
fi
trap 'for c in "${stop_at_exit[@]}"; do scripts/stack.sh "$c" >/dev/null; done' EXIT

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# The Docker checks include the built `edgelog` reading each compose service's environment through
# the real settings loader, so they run after the build, with that binary.
cargo build --locked --bins
DOCKER_CHECK_EDGELOG_BIN=target/debug/edgelog bash docker/check.sh
# The Helm chart: lint, render, strict decode into the Kubernetes API types, and the same binary
# loading each rendered container's environment. helm and the checker are built with Go once and
# cached in ~/.cache/edgelog-tools (scripts/install-helm-tools.sh).
HELM_CHECK_EDGELOG_BIN=target/debug/edgelog scripts/check-helm.sh
# --all-targets would also run the benches (harness = false); clippy above compiles them.
# The timeout turns a hung test into a loud failure well inside CI's 90 minutes.
if [ -n "$cluster_up" ] && ! wait "$cluster_up"; then
  cat "$cluster_log" >&2; echo "[test] the Kafka cluster did not start" >&2; exit 1
fi
timeout 45m cargo test --locked --lib --bins --tests
# Fault injection on the real stack (kills, proxy faults, ClickHouse and Kafka restarts), then the
# exactly-once audit; exits non-zero on any missing, duplicated or unexpected record.
scripts/chaos.sh --duration "${CHAOS_SECONDS:-90}" --rate 300
# The same on the cluster: each node fault once (partition leader, transaction coordinator and
# group coordinator SIGKILLed, a node stopped for 20 s), each node back and in sync before the
# next, then the audit.
scripts/chaos.sh --cluster --in-order --duration "${CLUSTER_CHAOS_SECONDS:-60}" --stop-seconds 20 --rate 300 \
  --faults kill-partition-leader,kill-txn-coordinator,kill-group-coordinator,stop-node
echo "[test] all checks passed in $(( $(date +%s) - t0 )) s"
