#!/usr/bin/env bash
# Checks the Docker deployment files without a Docker engine (none runs on the CI machines, and
# nothing here needs network access or cargo):
#   1. docker-compose.yml, Prometheus and Grafana provisioning YAML parse; dashboards are JSON.
#   2. EDGELOG_* variables only on edgelog services (that each is a real key with a value of the
#      right type is step 7's: the built binary loads them; a typo would be a crash loop), and
#      the addresses agree with each other: brokers
#      with Kafka's listeners, clickhouse.url with ch-proxy, admin_url with ClickHouse, each
#      metrics_listen with its published port and Prometheus' targets, the loader's password and
#      Grafana's with the hashes in docker/clickhouse/users.xml.
#   3. The compose structure: pinned images, 127.0.0.1 host ports equal to the local stack's,
#      health checks and start order (setup after Kafka+ClickHouse are healthy, stages after
#      setup completed), the Kafka settings transactions need on one node.
#   4. The proxy config is the original (1r/m per IP, no burst, default body size) and
#      `nginx -t` accepts it (upstream host replaced by 127.0.0.1); Grafana reads ClickHouse
#      directly, never through the proxy.
#   5. Dashboards: data source uids exist, ClickHouse queries read edgelog.http_log_totals (whose
#      columns are taken from sql/) with $__timeFilter(ts) and sum(); variables are defined;
#      Prometheus metric names are the required ones (a name that no Rust source emits is a
#      warning: the code may still be on its way).
#   6. The Dockerfile: pinned bases, capnproto, `cargo build --release --locked --bins`, every
#      [[bin]] of Cargo.toml copied, libssl3 + ca-certificates, non-root user, .dockerignore.
#   7. `docker compose config -q` when the compose plugin is installed (not an engine); a built
#      `edgelog` binary loading each service's environment with `edgelog config`, through the
#      real settings loader (DOCKER_CHECK_EDGELOG_BIN=path names it, as scripts/test.sh does
#      after its build; otherwise one newer than shared/config.rs is used if found; =none skips).
#      This script never builds anything.
# Steps 1-6 are docker/check_static.py; the comparison of step 7 is docker/compare_env.py.
# Exit status 0 = all checks passed; any problem is printed and the exit status is 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

red() { printf '\033[1;31m%s\033[0m\n' "$*" >&2; }
die() { red "docker/check: FAILED: $*"; exit 1; }
note() { printf 'docker/check: %s\n' "$*" >&2; }

command -v python3 >/dev/null || die "python3 is required"
if ! python3 -c 'import yaml' 2>/dev/null; then
  note "PyYAML missing; installing it with pip"
  python3 -m pip install -q --disable-pip-version-check pyyaml >&2 \
    || die "PyYAML is required (pip install pyyaml, or apt-get install python3-yaml)"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ------------------------------------------------------------------------------------------------
# The built binary, if any (step 7), also gives the static checks the settings' defaults: they
# come from the real settings loader (`edgelog config` with an empty environment), not from
# reading shared/config.rs.
bin=${DOCKER_CHECK_EDGELOG_BIN:-}
if [ -z "$bin" ]; then
  for candidate in target/release/edgelog target/debug/edgelog; do
    if [ -x "$candidate" ] && [ "$candidate" -nt shared/config.rs ]; then bin=$candidate; break; fi
  done
fi
defaults=()
if [ -n "$bin" ] && [ "$bin" != none ]; then
  [ -x "$bin" ] || die "DOCKER_CHECK_EDGELOG_BIN=$bin is not an executable"
  env -i PATH=/usr/bin:/bin "$bin" config > "$tmp/defaults.toml" \
    || die "$bin config fails with an empty environment"
  defaults=("$tmp/defaults.toml")
fi

# ------------------------------------------------------------------------------------------------
# 1-6: static checks (Python). Writes one env file per edgelog service for step 7.
python3 docker/check_static.py "$tmp" "${defaults[@]}" || die "static checks (see above)"

# ------------------------------------------------------------------------------------------------
# 4. nginx accepts the proxy config (upstream host replaced: "clickhouse" does not resolve here).
if command -v nginx >/dev/null; then
  mkdir -p "$tmp/nginx"
  sed -E 's#(proxy_pass[[:space:]]+http://)[A-Za-z0-9_.-]+:#\1127.0.0.1:#' \
    docker/nginx/ch-proxy.conf > "$tmp/nginx/ch-proxy.conf"
  grep -q 'proxy_pass http://127.0.0.1:8123;' "$tmp/nginx/ch-proxy.conf" \
    || die "could not rewrite the upstream host of docker/nginx/ch-proxy.conf for nginx -t"
  # Same context as the nginx image: conf.d/*.conf is included inside http { }.
  cat > "$tmp/nginx/nginx.conf" <<EOF
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log;
events {}
http {
    access_log off;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    include $tmp/nginx/ch-proxy.conf;
}
EOF
  if ! out=$(nginx -t -q -p "$tmp/nginx" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf" 2>&1); then
    printf '%s\n' "$out" >&2
    die "nginx -t rejects docker/nginx/ch-proxy.conf"
  fi
  note "nginx -t: ch-proxy.conf ok ($(nginx -v 2>&1 | sed 's/.*: //'))"
else
  note "SKIPPED nginx -t: nginx is not installed (apt-get install nginx-light)"
fi

# ------------------------------------------------------------------------------------------------
# 7a. The compose file against Compose's own schema, if the compose plugin is installed.
if docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config -q || die "docker compose config rejects docker-compose.yml"
  note "docker compose config: ok"
else
  note "SKIPPED docker compose config: the compose plugin is not installed"
fi

# 7b. An existing edgelog binary loads each service's environment (never builds one).
if [ -n "$bin" ] && [ "$bin" != none ]; then
  [ -x "$bin" ] || die "DOCKER_CHECK_EDGELOG_BIN=$bin is not an executable"
  for envfile in "$tmp"/*.env; do
    svc=$(basename "$envfile" .env)
    mapfile -t vars < "$envfile"
    # env -i: only this service's EDGELOG_* variables, none from the caller's environment.
    if ! out=$(env -i PATH=/usr/bin:/bin "${vars[@]}" "$bin" config 2>&1); then
      printf '%s\n' "$out" >&2
      die "$bin rejects the environment of compose service $svc"
    fi
    printf '%s\n' "$out" > "$tmp/$svc.toml"
    python3 docker/compare_env.py "$envfile" "$tmp/$svc.toml" "$svc" \
      || die "$bin read the environment of $svc differently"
  done
  note "$bin config: every edgelog service's environment loads"
else
  note "SKIPPED binary check: no edgelog binary newer than shared/config.rs (set DOCKER_CHECK_EDGELOG_BIN)"
fi

note "ok"
