#!/usr/bin/env bash
# Debian packages the test suite runs for real: redis-server, luajit (the Lua of Envoy, for
# envoy/lua/usage.lua), h2load (nghttp2-client, the load generator of `make bench`) and
# PostgreSQL (postgresql: maas-api's api_keys table; the tests start their own server),
# Chromium (headless, for the operator console's tests; Debian's, no browser download) and
# Prometheus (the dashboards' queries are checked against a real one scraping the stack).
# Installs only what is missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v luajit >/dev/null 2>&1 || missing+=(luajit)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
((${#missing[@]})) || exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "install-test-packages: missing ${missing[*]}; run as root or install them" >&2
    exit 1
fi
echo "install-test-packages: installing ${missing[*]}" >&2
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    exit 1
fi
# The packages start a system-wide Redis on 6379 (and PostgreSQL on 5432, Prometheus on 9090
# where services run); the tests start their own on free ports.
rm -f "$log"
