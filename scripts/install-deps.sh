#!/usr/bin/env bash
# Install what ferry's tests and benchmarks need on a Debian 12 (bookworm) machine.
#
#   scripts/install-deps.sh            # test deps: rsync, hyperfine, GNU time
#   scripts/install-deps.sh --bench    # + b3sum (cargo install; a few minutes the first time)
#   scripts/install-deps.sh --qemu     # + qemu-system-x86 and libnbd-bin from bookworm-backports
#
# Idempotent and fast when everything is present: each tool is checked first, and
# `apt-get update` only runs when a package actually has to be installed.
# Needs root for apt-get (CI and the dev machines run as root); no systemd is assumed.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

want_bench=0
want_qemu=0

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

for arg in "$@"; do
    case "$arg" in
        --bench) want_bench=1 ;;
        --qemu) want_qemu=1 ;;
        --all) want_bench=1; want_qemu=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[install-deps] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# apt helpers
# ---------------------------------------------------------------------------
APT_UPDATED=0

apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# apt_install PKG... : install the packages (after one apt-get update). Extra apt-get
# options may be given before the packages via APT_OPTS (an array).
apt_install() {
    apt_update_once
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "${APT_OPTS[@]}" "$@" >/dev/null
}
APT_OPTS=()

# have CMD : is CMD an executable on PATH (not a shell builtin/keyword)?
have() { [ -n "$(type -P "$1" 2>/dev/null)" ]; }

# ---------------------------------------------------------------------------
# components (one function each; add new ones here and call them below)
# ---------------------------------------------------------------------------

# rsync, hyperfine, GNU time (/usr/bin/time -v / -f '%M' for peak RSS).
install_base() {
    local missing=()
    have rsync || missing+=(rsync)
    have hyperfine || missing+=(hyperfine)
    # `time` is also a bash keyword; we need the GNU binary.
    [ -x /usr/bin/time ] || missing+=(time)
    have python3 || missing+=(python3)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    else
        log "base tools present (rsync, hyperfine, /usr/bin/time, python3)"
    fi
}

# b3sum: the BLAKE3 hashing floor for the failback benchmark. Only from crates.io.
install_b3sum() {
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    if have b3sum; then
        log "b3sum present ($(b3sum --version 2>/dev/null || echo '?'))"
        return
    fi
    log "cargo install b3sum --locked (takes a few minutes)"
    cargo install b3sum --locked --quiet
}

# QEMU (real hypervisor) from bookworm-backports: qemu-utils 10.0 is preinstalled from
# backports, so bookworm's qemu-system-x86 7.2 conflicts with it (see shared/INFRA.md).
BACKPORTS_FILE=/etc/apt/sources.list.d/bookworm-backports.sources

add_backports_suite() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    local src=/etc/apt/sources.list.d/debian.sources
    if [ ! -f "$src" ]; then
        echo "error: $src not found; cannot derive the bookworm-backports suite" >&2
        exit 1
    fi
    # Copy the first deb822 stanza whose Suites include plain `bookworm` (same URI and
    # keyring as the main archive), with Suites replaced by bookworm-backports.
    awk '
        BEGIN { RS = ""; FS = "\n" }
        $0 ~ /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ {
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^Suites:/) print "Suites: bookworm-backports"
                else if ($i !~ /^#/) print $i
            }
            exit
        }
    ' "$src" >"$BACKPORTS_FILE.tmp"
    if ! grep -q '^URIs:' "$BACKPORTS_FILE.tmp"; then
        rm -f "$BACKPORTS_FILE.tmp"
        echo "error: no bookworm stanza found in $src" >&2
        exit 1
    fi
    mv "$BACKPORTS_FILE.tmp" "$BACKPORTS_FILE"
    log "added $BACKPORTS_FILE"
    APT_UPDATED=0 # the new suite needs an update
}

install_qemu() {
    if have qemu-system-x86_64 && have nbdinfo; then
        log "qemu-system-x86_64 and nbdinfo present"
        return
    fi
    add_backports_suite
    APT_OPTS=(-t bookworm-backports)
    apt_install qemu-system-x86 libnbd-bin
    APT_OPTS=()
}

# (Azurite, the Azure Blob emulator, will get its own install_azurite here: npm install azurite@3.35.0.)

# ---------------------------------------------------------------------------
install_base
if [ "$want_bench" -eq 1 ]; then install_b3sum; fi
if [ "$want_qemu" -eq 1 ]; then install_qemu; fi
log "done"
