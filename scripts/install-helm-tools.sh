#!/usr/bin/env bash
# Installs what scripts/check-helm.sh needs, into a cache outside the clone (EDGELOG_TOOLS_HOME,
# default ~/.cache/edgelog-tools), reused while present:
#   - helm (v4, pinned below), built with `go install` from the Go module proxy: release binaries
#     are downloads from a site CI cannot reach;
#   - chart-check, deploy/helm/check (decodes rendered manifests strictly into the Kubernetes API
#     types; kubeconform would need schema files from that same unreachable site), rebuilt when
#     its sources change.
# Needs Go (>= 1.21; a newer toolchain that go.mod asks for is fetched from the module proxy).
# Prints the directory holding both binaries on stdout; progress goes to stderr.
# Cost, measured 2026-12-03 on a shared 2-core machine (load average ~10) with empty tools, Go
# module and build caches (`scripts/check-helm.sh` in a fresh clone): 451 s for the whole check,
# of which helm's build 398 s (5 min of CPU); with the caches warm, 5-11 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HELM_VERSION=v4.3.2
tools=${EDGELOG_TOOLS_HOME:-$HOME/.cache/edgelog-tools}
note() { printf '[helm-tools] %s\n' "$*" >&2; }

if ! command -v go >/dev/null; then
  [ -x /usr/local/go/bin/go ] && PATH=/usr/local/go/bin:$PATH
fi
command -v go >/dev/null || { note "go not found: install Go (>= 1.21) first"; exit 1; }
# The machine may pin GOTOOLCHAIN=local; auto lets an older go fetch the toolchain a go.mod needs.
export GOTOOLCHAIN=auto
# Module and build caches stay in their defaults (~/go/pkg/mod, ~/.cache/go-build): reused too.

bin="$tools/bin"
mkdir -p "$bin"

helm_dir="$tools/helm-$HELM_VERSION"
# `helm version` reports what the link step stamped in (go install alone says "v4.3").
if [ "$("$helm_dir/helm" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]; then
  note "building helm $HELM_VERSION (go install; the first time takes minutes)"
  t0=$(date +%s)
  mkdir -p "$helm_dir"
  GOBIN="$helm_dir" go install -ldflags "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  note "helm built in $(( $(date +%s) - t0 )) s"
fi
ln -sfn "$helm_dir/helm" "$bin/helm"

# Keyed by the checker's sources, so an edit rebuilds it and an unchanged tree reuses it.
src=deploy/helm/check
key=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)
check_dir="$tools/chart-check-$key"
if ! [ -x "$check_dir/chart-check" ]; then
  note "building chart-check ($src)"
  mkdir -p "$check_dir"
  # -buildvcs=false: no git stamping (a clone owned by another user makes git refuse).
  (cd "$src" && CGO_ENABLED=0 go build -buildvcs=false -mod=readonly -o "$check_dir/chart-check" .)
fi
ln -sfn "$check_dir/chart-check" "$bin/chart-check"

printf '%s\n' "$bin"
