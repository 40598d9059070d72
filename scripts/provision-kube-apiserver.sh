#!/usr/bin/env bash
# Provision a real kube-apiserver v1.20.2 for the integration tests.
#
# Builds cmd/kube-apiserver offline from Debian's `kubernetes` source package
# (1.20.5+really1.20.2, vendor/ included) and caches the binary OUTSIDE the repo at
#   ${MAAS_CACHE_DIR:-$HOME/.cache/maas-gateway}/kube-apiserver-v1.20.2-r2/kube-apiserver
# The vendored github.com/modern-go/reflect2 (v1.0.1) is replaced by Debian's v1.0.2
# (golang-github-modern-go-reflect2-dev): with v1.0.1, a binary built by Debian 12's Go 1.19
# segfaults (fatal error: fault, in json-iterator's map encoder) the first time it serializes a
# custom resource. "-r2" in the cache path marks binaries built with the fix.
# Also makes sure etcd (etcd-server), go (golang-go), rsync and openssl are installed.
#
# Idempotent; run as root on Debian 12. If the cached binary exists and runs, only the
# (fast, no-network) package check is done. The last line of stdout is the binary path.
# See shared/docs/kubernetes.md for background.
set -euo pipefail

K8S_VERSION="v1.20.2"
CACHE_DIR="${MAAS_CACHE_DIR:-$HOME/.cache/maas-gateway}"
BIN_DIR="$CACHE_DIR/kube-apiserver-$K8S_VERSION-r2"
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
BIN="$BIN_DIR/kube-apiserver"
LOG="$CACHE_DIR/kube-apiserver-build.log"

log() { echo "provision-kube-apiserver: $*" >&2; }

# --- 1. packages --------------------------------------------------------------------------
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v make >/dev/null 2>&1 || missing+=(make)
[[ -f "$REFLECT2_SRC/reflect2.go" ]] || missing+=(golang-github-modern-go-reflect2-dev)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages (${missing[*]}) and not root; install them first"
        exit 1
    fi
    log "installing ${missing[*]}"
    mkdir -p "$CACHE_DIR"
    apt_log="$CACHE_DIR/apt.log"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"$apt_log" 2>&1; then
        log "apt-get failed; $apt_log (last 40 lines follow)"
        tail -n 40 "$apt_log" >&2 || true
        exit 1
    fi
fi

# --- 2. fast path ---------------------------------------------------------------------------
if [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -q "$K8S_VERSION"; then
    echo "$BIN"
    exit 0
fi

# --- 3. build ---------------------------------------------------------------------------------
mkdir -p "$BIN_DIR"
work=$(mktemp -d "${TMPDIR:-/tmp}/maas-kube-build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
: >"$LOG"

fail() {
    log "FAILED: $*"
    log "build log: $LOG (last 40 lines follow)"
    tail -n 40 "$LOG" >&2 || true
    exit 1
}

log "building kube-apiserver $K8S_VERSION from Debian source (several minutes); log: $LOG"
start=$(date +%s)

# Source lines are derived from the machine's own apt configuration; the system lists are not
# touched (private SourceParts / Lists directories).
mkdir -p "$work/apt/parts" "$work/apt/lists/partial" "$work/src"
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    sed -E 's/^Types:.*$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        >"$work/apt/parts/src.sources"
fi
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    sed -nE 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' "$f" >>"$work/apt/parts/src.list"
done
[[ -s "$work/apt/parts/src.list" ]] || rm -f "$work/apt/parts/src.list"
ls "$work/apt/parts"/* >/dev/null 2>&1 || fail "no apt sources found to derive deb-src lines from"

apt_opts=(-o Dir::Etc::SourceList=/dev/null
    -o "Dir::Etc::SourceParts=$work/apt/parts"
    -o "Dir::State::Lists=$work/apt/lists")
apt-get "${apt_opts[@]}" update >>"$LOG" 2>&1 || fail "apt-get update (deb-src)"
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only kubernetes) >>"$LOG" 2>&1 \
    || fail "apt-get source kubernetes"

orig=$(ls "$work"/src/kubernetes_*.orig.tar.* 2>/dev/null | head -n1 || true)
[[ -n "$orig" ]] || fail "no kubernetes orig tarball downloaded"
mkdir -p "$work/tree"
tar -xf "$orig" -C "$work/tree" --strip-components=1 >>"$LOG" 2>&1 || fail "unpack $orig"
rm -rf "$work/src" "$work/apt"
vendored="$work/tree/vendor/github.com/modern-go/reflect2"
[[ -d "$vendored" ]] || fail "no vendored reflect2 at $vendored"
rsync -a --delete --exclude '*_test.go' "$REFLECT2_SRC/" "$vendored/" >>"$LOG" 2>&1 \
    || fail "replace the vendored reflect2 with $REFLECT2_SRC"

(
    cd "$work/tree"
    mkdir -p .go/src/k8s.io
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    export GOPATH="$work/tree/.go" GOPROXY=off CGO_ENABLED=0 GOFLAGS= \
        GOCACHE="$work/gocache" GO111MODULE=
    make WHAT=cmd/kube-apiserver
) >>"$LOG" 2>&1 || fail "make WHAT=cmd/kube-apiserver"

built=$(find "$work/tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1 || true)
[[ -n "$built" ]] || fail "kube-apiserver binary not found under _output"
"$built" --version >>"$LOG" 2>&1 || fail "built binary does not run"

tmp_bin="$BIN.tmp.$$"
cp "$built" "$tmp_bin"
chmod 0755 "$tmp_bin"
mv -f "$tmp_bin" "$BIN"

log "built $("$BIN" --version) in $(($(date +%s) - start)) s"
echo "$BIN"
