#!/usr/bin/env bash
# Debian's podman and what it needs here (../shared/docs/containers.md): runc (crun fails on
# this kernel's cgroups), catatonit (the pause process of `podman kube play`), debootstrap
# (the local base image: no registry is reachable), uidmap and fuse-overlayfs.
# Installs only what is missing.
set -euo pipefail

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v newuidmap >/dev/null 2>&1 || missing+=(uidmap)
command -v fuse-overlayfs >/dev/null 2>&1 || missing+=(fuse-overlayfs)
[[ -x /usr/libexec/podman/catatonit || -x /usr/bin/catatonit ]] || missing+=(catatonit)
source "$(dirname "$0")/lib/apt-install.sh"
apt_install_missing install-podman "${missing[@]}"
