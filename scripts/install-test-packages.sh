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
source "$(dirname "$0")/lib/apt-install.sh"
# The packages start a system-wide Redis on 6379 (and PostgreSQL on 5432, Prometheus on 9090
# where services run); the tests start their own on free ports.
apt_install_missing install-test-packages "${missing[@]}"
