# Sourced by the install-* scripts: apt_install_missing NAME PACKAGE... installs the Debian
# packages given (those the caller found missing), quietly, showing apt's log only on failure.
apt_install_missing() {
    local name=$1
    shift
    (($#)) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "$name: missing $*; run as root or install them" >&2
        return 1
    fi
    echo "$name: installing $*" >&2
    local log
    log=$(mktemp)
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; } \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
