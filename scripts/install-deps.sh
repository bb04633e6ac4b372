#!/usr/bin/env bash
# Install what ferry's tests and benchmarks need on a Debian 12 (bookworm) machine.
#
#   scripts/install-deps.sh            # test deps: rsync, hyperfine, GNU time, curl, openssl
#                                      # (test certificates), unshare (agents' namespaces),
#                                      # QEMU (qemu-system-x86 + libnbd-bin from bookworm-backports),
#                                      # Azurite (npm, into .ci/node) and moto (pip; S3 API server),
#                                      # and the test guest image (scripts/guest-image.sh)
#   scripts/install-deps.sh --bench    # + b3sum (cargo install; a few minutes the first time)
#   scripts/install-deps.sh --no-qemu  # everything but QEMU (its e2e tests then skip with a note)
#
# Idempotent and fast when everything is present: each tool is checked first, and
# `apt-get update` only runs when a package actually has to be installed.
# Needs root for apt-get (CI and the dev machines run as root); no systemd is assumed.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

want_bench=0
want_qemu=1

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

for arg in "$@"; do
    case "$arg" in
        --bench) want_bench=1 ;;
        --qemu) want_qemu=1 ;; # the default; kept for older scripts
        --no-qemu) want_qemu=0 ;;
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
    have curl || missing+=(curl)
    have openssl || missing+=(openssl)
    have unshare || missing+=(util-linux)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    else
        log "base tools present (rsync, hyperfine, /usr/bin/time, python3, curl, openssl, unshare)"
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
    # The qemu driver runs qemu-system-x86_64, qemu-img and qemu-nbd; nbdinfo helps debugging.
    if have qemu-system-x86_64 && have qemu-img && have qemu-nbd && have nbdinfo; then
        log "QEMU present ($(qemu-system-x86_64 --version | head -n 1))"
        return
    fi
    add_backports_suite
    APT_OPTS=(-t bookworm-backports)
    apt_install qemu-system-x86 qemu-utils libnbd-bin
    APT_OPTS=()
}

# Azurite, the Azure Blob API emulator (scripts/services.sh starts it). Installed into the
# project (.ci/node/node_modules, git-ignored by a .gitignore written there), not globally.
# 3.35.0: 3.36+ needs a newer Node than Debian's 20.
AZURITE_VERSION=3.35.0
AZURITE_PREFIX="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.ci/node"

install_azurite() {
    local pkg="$AZURITE_PREFIX/node_modules/azurite/package.json"
    if [ -x "$AZURITE_PREFIX/node_modules/.bin/azurite-blob" ] && [ -f "$pkg" ] &&
        grep -q "\"version\": *\"$AZURITE_VERSION\"" "$pkg"; then
        log "azurite $AZURITE_VERSION present ($AZURITE_PREFIX)"
        return
    fi
    if ! have npm; then
        apt_install nodejs npm
    fi
    mkdir -p "$AZURITE_PREFIX"
    printf '*\n' >"$AZURITE_PREFIX/.gitignore"
    log "npm install azurite@$AZURITE_VERSION into $AZURITE_PREFIX (about 30 s)"
    npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$AZURITE_PREFIX" \
        "azurite@$AZURITE_VERSION" >/dev/null
}

# moto: an in-memory S3 API server (`moto_server`), for the S3 store tests.
install_moto() {
    # Run it, not just look for it: a pyenv shim exists for versions that lack the package.
    if have moto_server && moto_server -h >/dev/null 2>&1; then
        log "moto_server present"
        return
    fi
    if ! have pip3 && ! have pip; then
        apt_install python3-pip
    fi
    log "pip install 'moto[server]'"
    local pip=pip3
    have pip3 || pip=pip
    # Debian's own python refuses system-wide pip installs without this (PEP 668).
    PIP_BREAK_SYSTEM_PACKAGES=1 "$pip" install --quiet 'moto[server]'
    hash -r
    moto_server -h >/dev/null 2>&1 || {
        echo "error: moto_server does not run after pip install (is pip's bin directory on PATH?)" >&2
        exit 1
    }
}

# ---------------------------------------------------------------------------
install_base
# QEMU before the rest: the qemu driver's end-to-end tests need it (quick when present).
if [ "$want_qemu" -eq 1 ]; then
    install_qemu
    # The test guest (Debian's kernel + a busybox/qemu-guest-agent initramfs) the real-guest
    # tests and `ferry demo --guest` boot; a few seconds, skipped when current.
    bash "$(dirname "${BASH_SOURCE[0]}")/guest-image.sh"
fi
install_azurite
install_moto
if [ "$want_bench" -eq 1 ]; then install_b3sum; fi
log "done"
