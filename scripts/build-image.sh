#!/usr/bin/env bash
# `make image`: builds localhost/maas-gateway:<version> from the Containerfile with podman.
# FROM is the Containerfile's build argument PYTHON_IMAGE: by default a local base built from
# Debian's packages (scripts/build-base-image.sh; no registry needed), or any image given as
# BASE (e.g. BASE=docker.io/library/python:3.11-slim-bookworm where a registry is reachable).
# Prints the image's name and size.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-podman.sh
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=${IMAGE:-localhost/maas-gateway:$version}
base=${BASE:-$(scripts/build-base-image.sh)}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "build-image: $image from $base" >&2
# --network host: the build stage installs the pinned dependencies from the package index,
# trusting this machine's CA bundle (it has the CA of the proxy in front of the index, if any)
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
mount=()
[[ -f $ca ]] && mount=(--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
if ! podman build --network host "${mount[@]}" --build-arg "PYTHON_IMAGE=$base" \
    --tag "$image" --file Containerfile . >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    exit 1
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "$image $((size / 1000000)) MB"
