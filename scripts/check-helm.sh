#!/usr/bin/env bash
# Checks the Helm chart (deploy/helm/edgelog) without a cluster (none can run where CI runs):
#   1. the checker's own tests (`go test` in deploy/helm/check: each rule catches its breakage);
#   2. `helm lint --strict`, with the default values and with ci/options-values.yaml (existing
#      Secret, ServiceMonitor, 3 replicas, per-stage settings, the verify CronJob);
#   3. `helm template` of both, for the oldest Kubernetes the chart supports (1.28), each checked
#      by chart-check: every object decoded strictly into the Kubernetes API types, plus the
#      chart's rules (probes, security context, PDBs, the setup hook, EDGELOG_* names against
#      the keys `edgelog config` prints);
#   4. every rendered container's environment loaded by the real settings loader
#      (`edgelog config`, unknown keys and bad values fatal), values compared with what it read.
# Step 4 needs a built edgelog: HELM_CHECK_EDGELOG_BIN=path (scripts/test.sh passes the one it
# built), else target/debug/edgelog or target/release/edgelog if newer than shared/config.rs;
# =none skips it. The tools come from scripts/install-helm-tools.sh (cached).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
note() { printf '[check-helm] %s\n' "$*" >&2; }
die() { printf '\033[1;31m[check-helm] FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

bin=$(scripts/install-helm-tools.sh)
export PATH="$bin:$PATH"
[ -x /usr/local/go/bin/go ] && PATH=$PATH:/usr/local/go/bin
chart=deploy/helm/edgelog
options=$chart/ci/options-values.yaml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# CGO off like the checker install-helm-tools.sh built: the test shares its compiled packages.
(cd deploy/helm/check && GOTOOLCHAIN=auto CGO_ENABLED=0 go test -count=1 ./... >&2) || die "chart-check's own tests"

helm lint --strict "$chart" >&2 || die "helm lint (default values)"
helm lint --strict "$chart" -f "$options" >&2 || die "helm lint ($options)"

render() { helm template edgelog "$chart" --namespace edgelog --kube-version 1.28.0 "$@"; }
render > "$tmp/default.yaml" || die "helm template (default values)"
render -f "$options" > "$tmp/options.yaml" || die "helm template ($options)"

edgelog=${HELM_CHECK_EDGELOG_BIN:-}
if [ -z "$edgelog" ]; then
  for candidate in target/debug/edgelog target/release/edgelog; do
    if [ -x "$candidate" ] && [ "$candidate" -nt shared/config.rs ]; then edgelog=$candidate; break; fi
  done
fi
[ "$edgelog" = none ] && edgelog=

keys=()
if [ -n "$edgelog" ]; then
  [ -x "$edgelog" ] || die "HELM_CHECK_EDGELOG_BIN=$edgelog is not an executable"
  # Every key the defaults print, as section.key (options unset by default, such as
  # loader.source_address, are not printed: the chart sets none of them).
  env -i PATH=/usr/bin:/bin "$edgelog" config > "$tmp/defaults.toml" || die "$edgelog config"
  python3 -c '
import sys, tomllib
for section, table in tomllib.load(open(sys.argv[1], "rb")).items():
    for key in table:
        print(f"{section}.{key}")' "$tmp/defaults.toml" > "$tmp/keys.txt"
  keys=(-keys "$tmp/keys.txt")
fi

mkdir -p "$tmp/env"
chart-check "${keys[@]}" -env-dir "$tmp/env" "$tmp/default.yaml" "$tmp/options.yaml" \
  || die "chart-check (rendered manifests above)"

if [ -n "$edgelog" ]; then
  n=0
  for envfile in "$tmp"/env/*.env; do
    name=$(basename "$envfile" .env)
    mapfile -t vars < "$envfile"
    # env -i: only the container's EDGELOG_* variables, none of the caller's.
    out=$(env -i PATH=/usr/bin:/bin "${vars[@]}" "$edgelog" config 2>&1) \
      || { printf '%s\n' "$out" >&2; die "$edgelog refuses the environment of $name"; }
    printf '%s\n' "$out" > "$tmp/$name.toml"
    python3 docker/compare_env.py "$envfile" "$tmp/$name.toml" "$name" \
      || die "$edgelog read the environment of $name differently"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || die "no container environment was written"
  note "$edgelog config: the environments of $n rendered containers load"
else
  note "SKIPPED loading the rendered environments: no edgelog binary newer than shared/config.rs (set HELM_CHECK_EDGELOG_BIN)"
fi
note "ok in $(( $(date +%s) - t0 )) s"
