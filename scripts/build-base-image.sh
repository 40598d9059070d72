#!/usr/bin/env bash
# A local stand-in for docker.io/library/python:3.11-slim-bookworm, for machines that reach
# Debian's packages but no container registry: Debian bookworm (debootstrap, minbase) with its
# Python 3.11, venv and CA certificates, `python` on PATH as in the official image, apt's caches,
# docs and translations removed. Imported as $BASE_IMAGE; prints the name. Built once per
# machine (podman's storage keeps it); REBUILD=1 builds it again.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}

name=${BASE_IMAGE:-localhost/maas-base/python:3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [[ -z ${REBUILD:-} ]] && podman image exists "$name"; then
    echo "$name"
    exit 0
fi

work=$(mktemp -d /var/tmp/maas-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
log=$work/debootstrap.log
echo "build-base-image: debootstrap bookworm from $mirror (about a minute)" >&2
if ! debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    exit 1
fi
# what the slim images leave out too
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/root/.cache
find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
ln -s /usr/bin/python3 "$rootfs"/usr/local/bin/python
cat >"$rootfs"/etc/apt/sources.list <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
SOURCES

tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase bookworm + python3, python3-venv, passwd" \
    - "$name" >/dev/null
echo "$name"
