#!/usr/bin/env bash
# What building edgelog needs beyond Rust: the Cap'n Proto compiler (build.rs runs capnpc) and a
# C toolchain for librdkafka (built from source by rdkafka-sys). Idempotent; installs from Debian.
set -euo pipefail
missing=()
command -v capnp >/dev/null || missing+=(capnproto)
command -v cc >/dev/null || missing+=(build-essential)
command -v make >/dev/null || missing+=(make)
command -v curl >/dev/null || missing+=(curl)
# System roots for https ClickHouse URLs (and tests/tls.rs, which checks a client without
# clickhouse.ca_file distrusts a private CA).
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing ${missing[*]} from Debian's packages" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "[deps] cargo not found: install Rust (rustup) first" >&2; exit 1; }
