#!/usr/bin/env bash
# Checks the Docker deployment without a Docker engine (none runs on the CI machines):
#  - docker-compose.yml, Prometheus and Grafana provisioning parse; dashboards are valid JSON;
#  - every EDGELOG_* variable in the compose file is a real configuration key (the binaries
#    reject unknown keys at start-up, so a typo here would be a crash loop there);
#  - the proxy config is the original one and nginx accepts it;
#  - the compose ports/topics agree with the local stack.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fail() { echo "docker/check: FAIL: $*" >&2; exit 1; }

python3 - <<'PY' || fail "YAML/JSON"
import json, sys, glob
try:
    import yaml
except ImportError:
    yaml = None
files = ["docker-compose.yml", "docker/prometheus/prometheus.yml",
         *glob.glob("docker/grafana/provisioning/*/*.yml")]
if yaml is None:
    print("docker/check: PyYAML missing; installing it", file=sys.stderr)
    import subprocess
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "pyyaml"])
    import yaml
for f in files:
    yaml.safe_load(open(f))
for f in glob.glob("docker/grafana/dashboards/*.json"):
    d = json.load(open(f))
    assert d["panels"], f
compose = yaml.safe_load(open("docker-compose.yml"))
env = {}
for name, svc in compose["services"].items():
    e = svc.get("environment") or {}
    for k, v in e.items():
        if k.startswith("EDGELOG_"):
            env[k] = str(v)
open("target/compose-edgelog-env", "w").write("\n".join(f"{k}={v}" for k, v in sorted(env.items())) + "\n")
ports = {p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])}
for p in ["9092", "8123", "8124", "9101", "9102", "9103"]:
    assert p in ports, f"port {p} missing from compose"
PY

# Every EDGELOG_* key the compose file sets must load (unknown keys and bad values fail).
[ -x target/debug/edgelog ] || cargo build -q --bin edgelog
env -i PATH="$PATH" $(cat target/compose-edgelog-env) target/debug/edgelog config > /dev/null \
  || fail "the compose file's EDGELOG_* variables do not load (see the error above)"

grep -q 'limit_req_zone $binary_remote_addr zone=ch-limit:10m rate=1r/m;' docker/nginx/ch-proxy.conf || fail "proxy rate"
directives=$(grep -v '^[[:space:]]*#' docker/nginx/ch-proxy.conf)
grep -q 'burst' <<<"$directives" && fail "the original proxy has no burst"
grep -q 'client_max_body_size' <<<"$directives" && fail "the original proxy keeps the 1 MiB default"
if command -v nginx >/dev/null; then
  tmp=$(mktemp -d)
  sed 's#http://clickhouse:8123#http://127.0.0.1:8123#; s#listen 8124#listen 127.0.0.1:18124#' docker/nginx/ch-proxy.conf > "$tmp/proxy.conf"
  printf 'pid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\nhttp { include %s/proxy.conf; }\n' "$tmp" "$tmp" "$tmp" > "$tmp/nginx.conf"
  nginx -q -t -c "$tmp/nginx.conf" -p "$tmp" || fail "nginx rejects docker/nginx/ch-proxy.conf"
  rm -rf "$tmp"
fi
grep -q "http_log" sql/001_http_log.sql || fail "sql"
echo "docker/check: ok"
