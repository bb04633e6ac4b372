#!/usr/bin/env bash
# Cloud-store and encryption benchmark (issue 4), ferry side by side with a plain client in one run.
#
#   SIZE=1GiB bench/cloud.sh               # the published benchmark (default SIZE=1GiB)
#   SIZE=256MiB bench/cloud.sh             # quick run
#
# What it measures, for two disks of SIZE: "mixed" (bench/failback_helpers.py gen: ~55% random,
# ~30% text-like, ~15% zero 64 KiB blocks) and "random" (incompressible, so the bytes on the
# wire equal the disk bytes):
#   Azurite:    `ferry protect` (initial replication) into az://CONTAINER and
#               `ferry failover --unplanned` (full download: the recovery VM restored from the
#               store), against a plain client (Python azure-storage-blob) putting and getting the
#               same disk bytes in 16 MiB objects (ferry's pack size) on the same Azurite server,
#               with 1 and 8 threads; AZ_REPEAT rounds, alternating who goes first, each
#               contender on a fresh Azurite; medians. Target: ferry ≥ 80% of the best plain
#               throughput.
#   encryption: on the local store (file://), `protect` and `failover --unplanned` with and without
#               `--key` (fresh homes, ENC_REPEAT runs each, alternating; medians).
#               Target: with key ≤ 1.15× the time without.
# Results: Markdown on stdout and in bench/out/cloud-results.md (and cloud-results-SIZE.md).
#
# Azurite: its own instance (scripts/services.sh with FERRY_SERVICES_DIR under OUT and a free port,
# never 10000), in memory, stopped at the end. The plain client lives in a venv under OUT.
#
# Options:
#   --no-build      don't run `cargo build --release` (use target/release/ferry or $FERRY as is)
#   --no-random     skip the incompressible disk (mixed only)
#   --keep          keep the ferry homes and disk images under bench/out/ after a successful run
#   --update-docs   replace the block between <!-- cloud-results --> and <!-- /cloud-results -->
#                   in docs/benchmarks.md with this run's results
# Environment:
#   SIZE (1GiB)  SEED (42)  OUT (bench/out)  FERRY (path to a ferry binary; implies --no-build)
#   FERRY_LABEL (what the report names as the code measured; default: the commit, and whether the
#   work tree had uncommitted Rust changes when this script built it)
#   PLAIN_THREADS ("1 8")  OBJ (16MiB)  ENC_REPEAT (9)  AZ_PORT (a free port; not 10000)
#   AZ_REPEAT (3: rounds of ferry and the plain client through Azurite, alternating; medians)
#   FERRY_THREADS (empty: ferry's default --threads, the number of cores)
#   DATASETS ("mixed random"; a subset to measure one disk)
#   FERRY_LOG (passed to ferry: e.g. `ferry=debug` puts every timed section in the log)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FHELP="$ROOT/bench/failback_helpers.py"
CHELP="$ROOT/bench/cloud_helpers.py"
OUT=${OUT:-$ROOT/bench/out}
SIZE=${SIZE:-1GiB}
SEED=${SEED:-42}
PLAIN_THREADS=${PLAIN_THREADS:-1 8}
OBJ=${OBJ:-16MiB}
ENC_REPEAT=${ENC_REPEAT:-9}
AZ_REPEAT=${AZ_REPEAT:-3}
AZ_PORT=${AZ_PORT:-}
FERRY_THREADS=${FERRY_THREADS:-}
FERRY_BIN=${FERRY:-}
FERRY_LABEL=${FERRY_LABEL:-}
SDK_VERSION=12.31.1 # azure-storage-blob, pinned

build=1
keep=0
update_docs=0
datasets="${DATASETS:-mixed random}"
[ -n "$FERRY_BIN" ] && build=0

for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --no-random) datasets="mixed" ;;
        --keep) keep=1 ;;
        --update-docs) update_docs=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/cloud-$SIZE.log"
MEAS="$OUT/cloud-measurements-$SIZE.txt"
WORK="$OUT/cloud-work.$$"
SVC_DIR="$OUT/cloud-services.$$"
VENV="$OUT/pyenv-azure"
: >"$LOG"
: >"$MEAS"
success=0
azurite_up=0

say() { printf '[cloud %s] %s\n' "$(date +%T)" "$*" >&2; }
fpy() { python3 "$FHELP" "$@"; }
cpy() { "$VENV/bin/python" "$CHELP" "$@"; }
record() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n' ' ')" >>"$MEAS"; }
jget() { fpy json "$1"; } # reads JSON on stdin
last() { awk -F= -v k="$1" '$1 == k { v = $2 } END { print v }' "$MEAS"; }
q() {
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
# append KEY VALUE : add VALUE to the space-separated list recorded under KEY
append() {
    local cur
    cur=$(last "$1")
    record "$1" "${cur:+$cur }$2"
}

azurite() { FERRY_SERVICES_DIR="$SVC_DIR" FERRY_AZURITE_PORT="$AZ_PORT" bash "$ROOT/scripts/services.sh" "$@"; }

on_err() {
    local rc=$? line=$1 cmd=$2
    echo "bench/cloud.sh: failed (exit $rc) at line $line: $cmd" >&2
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2 || true
}
on_exit() {
    if [ "$azurite_up" -eq 1 ]; then azurite stop azurite >>"$LOG" 2>&1 || true; fi
    rm -f "$OUT"/.time.*
    rm -rf "$SVC_DIR"
    if [ "$success" -eq 1 ] && [ "$keep" -eq 0 ]; then
        rm -rf "$WORK"
    elif [ -d "$WORK" ]; then
        echo "work files kept for inspection: $WORK" >&2
    fi
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
trap on_exit EXIT

# timed KEY CMD... : run CMD (stdout to $TIMED_STDOUT or /dev/null, stderr to the log) and
# record KEY_s (wall seconds, from date +%s.%N), KEY_rss (max RSS KiB) and KEY_cpu (user + system
# CPU seconds), the last two from GNU time.
timed() {
    local key=$1
    shift
    local tf t0 t1
    tf=$(mktemp "$OUT/.time.XXXXXX")
    echo "+ $*" >>"$LOG"
    t0=$(date +%s.%N)
    /usr/bin/time -f '%e %M %U %S' -o "$tf" "$@" >"${TIMED_STDOUT:-/dev/null}" 2>>"$LOG"
    t1=$(date +%s.%N)
    record "${key}_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
    record "${key}_rss" "$(tail -n 1 "$tf" | awk '{ print $2 }')"
    record "${key}_cpu" "$(tail -n 1 "$tf" | awk '{ printf "%.2f", $3 + $4 }')"
    rm -f "$tf"
}

# record_job PREFIX JSONFILE : byte counters and state of a job; fails unless it succeeded
record_job() {
    local p=$1 f=$2 k
    for k in state bytes_read bytes_transferred bytes_written error; do
        record "${p}_${k#bytes_}" "$(jget "$k" <"$f")"
    done
    if [ "$(jget state <"$f")" != "succeeded" ]; then
        echo "ferry job did not succeed: $(cat "$f")" >&2
        return 1
    fi
}

same() { if cmp -s "$1" "$2"; then echo yes; else echo no; fi; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# CPU seconds (user + system) Azurite has used so far: its process leads its own session
# (scripts/services.sh), and Node's worker threads are counted in the process.
AZ_PID=
CLK_TCK=$(getconf CLK_TCK)
az_cpu() {
    if [ -n "$AZ_PID" ] && [ -r "/proc/$AZ_PID/stat" ]; then
        sed 's/.*) //' "/proc/$AZ_PID/stat" | awk -v hz="$CLK_TCK" '{ printf "%.2f", ($12 + $13) / hz }'
    else
        echo ""
    fi
}
# server_timed KEY CMD... : timed, plus KEY_server_cpu (Azurite CPU seconds during CMD)
server_timed() {
    local key=$1 a0
    a0=$(az_cpu)
    timed "$@"
    if [ -n "$a0" ]; then
        record "${key}_server_cpu" "$(awk -v a="$a0" -v b="$(az_cpu)" 'BEGIN { printf "%.2f", b - a }')"
    fi
}

start_azurite() {
    azurite start azurite >>"$LOG" 2>&1
    azurite_up=1
    AZ_PID=$(cat "$SVC_DIR/azurite.pid")
    # Warm the server up (JIT, buffers) so the first contender measured is not penalized.
    cpy plain "$AZ_URL" warmup "$WARM_FILE" "$OBJ" 4 >>"$LOG" 2>&1
    cpy clear "$AZ_URL" warmup >>"$LOG" 2>&1
}
stop_azurite() {
    azurite stop azurite >>"$LOG" 2>&1
    azurite_up=0
}

# ---------------------------------------------------------------------------
# ferry
# ---------------------------------------------------------------------------
FHOME=
FER=()
THR=()
fer() { "${FER[@]}" "$@"; }
disk_of() { fer --json vm show bench "$@" 2>>"$LOG" | jget disks.0.path; }

# new_home NAME STORE_URL_OR_EMPTY REF_IMAGE : a fresh home with VM bench on h1 whose disk
# holds the content of REF_IMAGE, running, and a recovery site dr (store STORE or the default local one).
new_home() {
    local name=$1 store=$2 ref=$3 prim
    FHOME="$WORK/home-$name"
    rm -rf "$FHOME"
    mkdir -p "$FHOME"
    FER=("$FERRY_BIN" --home "$FHOME")
    q fer init
    q fer site add prim --role primary
    if [ -n "$store" ]; then
        q fer site add dr --role recovery --store "$store"
    else
        q fer site add dr --role recovery
    fi
    q fer host add h1 --site prim --driver dir
    q fer host add h2 --site dr --driver dir
    q fer vm create bench --host h1 --disk "$SIZE"
    prim=$(disk_of)
    [ -n "$prim" ] || { echo "vm show bench: no disks[0].path" >&2; return 1; }
    # A full (non-sparse) copy of the reference content, like a written disk.
    cp --sparse=never "$ref" "$prim"
    q fer vm start bench
    sync
}

# protect_and_restore PREFIX REF [KEYFILE] : timed protect and failover --unplanned in the
# current home; checks the restored disk against REF.
protect_and_restore() {
    local p=$1 ref=$2 keyf=${3:-} rec
    local keyarg=()
    [ -n "$keyf" ] && keyarg=(--key "$keyf")
    TIMED_STDOUT="$WORK/${p}protect.json" server_timed "${p}protect" \
        "${FER[@]}" --json protect bench --to dr "${keyarg[@]}" "${THR[@]}"
    record_job "${p}protect" "$WORK/${p}protect.json"
    sync
    TIMED_STDOUT="$WORK/${p}restore.json" server_timed "${p}restore" \
        "${FER[@]}" --json failover bench --unplanned "${keyarg[@]}" "${THR[@]}"
    record_job "${p}restore" "$WORK/${p}restore.json"
    rec=$(disk_of)
    if [ -z "$rec" ] || [ "$rec" = "$(disk_of --host h1)" ]; then
        echo "expected the recovery disk after failover, got '$rec'" >&2
        return 1
    fi
    record "${p}identical" "$(same "$rec" "$ref")"
}

# azure_ferry DATASET REF ROUND : ferry's protect + restore through a fresh Azurite.
azure_ferry() {
    local d=$1 ref=$2 r=$3 out
    local container="ferry-bench-$d-$$-$r" p="az_${d}_"
    start_azurite
    say "[$d] round $r: ferry protect into az://$container, then failover --unplanned"
    new_home "az-$d-$r" "az://$container" "$ref"
    protect_and_restore "$p" "$ref"
    out=$(cpy stored "$AZ_URL" "$container" packs/)
    record "${p}stored_pack_bytes" "$(sed -n 's/^bytes=//p' <<<"$out")"
    record "${p}stored_packs" "$(sed -n 's/^objects=//p' <<<"$out")"
    say "[$d] round $r: ferry protect $(last "${p}protect_s")s ($(last "${p}protect_transferred") bytes transferred), restore $(last "${p}restore_s")s, identical: $(last "${p}identical")"
    [ "$keep" -eq 1 ] || rm -rf "$FHOME"
    cpy clear "$AZ_URL" "$container" >>"$LOG" 2>&1
    stop_azurite
}

# azure_plain DATASET REF THREADS ROUND : the plain client's put + gets through a fresh Azurite.
azure_plain() {
    local d=$1 ref=$2 t=$3 r=$4 k out p="az_${d}_" src="$WORK/plain-src.img"
    start_azurite
    # The same preparation as ferry's VM disk (a fresh full copy of the reference, synced) right
    # before the measured transfer: both contenders meet the same page cache and free memory.
    cp --sparse=never "$ref" "$src"
    sync
    say "[$d] round $r: plain client: put + get of $SIZE in $OBJ objects, $t thread(s)"
    echo "+ plain $t threads" >>"$LOG"
    out=$(cpy plain "$AZ_URL" "plain-$d-$$" "$src" "$OBJ" "$t" "" "$AZ_PID" 2>>"$LOG")
    rm -f "$src"
    for k in put_s get_s getfile_s put_cpu get_cpu getfile_cpu put_server_cpu get_server_cpu getfile_server_cpu; do
        record "${p}plain${t}_$k" "$(sed -n "s/^$k=//p" <<<"$out")"
    done
    record "${p}plain${t}_bytes" "$(sed -n 's/^bytes=//p' <<<"$out")"
    record "${p}plain${t}_objects" "$(sed -n 's/^objects=//p' <<<"$out")"
    say "[$d] round $r: plain $t thread(s): put $(last "${p}plain${t}_put_s")s, get $(last "${p}plain${t}_get_s")s"
    cpy clear "$AZ_URL" "plain-$d-$$" >>"$LOG" 2>&1
    stop_azurite
}

# azure_round DATASET REF : AZ_REPEAT rounds of ferry and the plain client, each contender on
# its own fresh, warmed-up, empty Azurite (a server holding a GiB more runs measurably slower,
# so sharing one would favour whoever goes first), the order alternating between rounds. Every
# round records the same keys again; the report takes medians.
azure_round() {
    local d=$1 ref=$2 r t
    for r in $(seq "$AZ_REPEAT"); do
        if [ $((r % 2)) -eq 1 ]; then
            azure_ferry "$d" "$ref" "$r"
            for t in $PLAIN_THREADS; do azure_plain "$d" "$ref" "$t" "$r"; done
        else
            for t in $PLAIN_THREADS; do azure_plain "$d" "$ref" "$t" "$r"; done
            azure_ferry "$d" "$ref" "$r"
        fi
    done
}

# enc_round DATASET REF : ENC_REPEAT × (without key, with key), alternating the order.
enc_round() {
    local d=$1 ref=$2 i mode order
    for i in $(seq "$ENC_REPEAT"); do
        if [ $((i % 2)) -eq 1 ]; then order="plain key"; else order="key plain"; fi
        for mode in $order; do
            say "[$d] local store, $([ "$mode" = key ] && echo 'with --key' || echo 'without key') ($i/$ENC_REPEAT)"
            new_home "enc-$d-$mode-$i" "" "$ref"
            if [ "$mode" = key ]; then
                protect_and_restore "enc_${d}_${mode}_" "$ref" "$KEYFILE"
            else
                protect_and_restore "enc_${d}_${mode}_" "$ref"
            fi
            append "enc_${d}_${mode}_protect_runs" "$(last "enc_${d}_${mode}_protect_s")"
            append "enc_${d}_${mode}_restore_runs" "$(last "enc_${d}_${mode}_restore_s")"
            append "enc_${d}_${mode}_protect_cpus" "$(last "enc_${d}_${mode}_protect_cpu")"
            append "enc_${d}_${mode}_restore_cpus" "$(last "enc_${d}_${mode}_restore_cpu")"
            if [ "$(last "enc_${d}_${mode}_identical")" != yes ]; then record "enc_${d}_identical" no; fi
            [ "$keep" -eq 1 ] || rm -rf "$FHOME"
        done
    done
    [ -n "$(last "enc_${d}_identical")" ] || record "enc_${d}_identical" yes
    say "[$d] local protect without/with key: $(last "enc_${d}_plain_protect_runs") / $(last "enc_${d}_key_protect_runs") s; restore: $(last "enc_${d}_plain_restore_runs") / $(last "enc_${d}_key_restore_runs") s"
}

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
say "deps: scripts/install-deps.sh (Azurite, GNU time, curl)"
bash "$ROOT/scripts/install-deps.sh" 2>>"$LOG"
if ! "$VENV/bin/python" -c "import azure.storage.blob, sys; sys.exit(azure.storage.blob.__version__ != '$SDK_VERSION')" 2>/dev/null; then
    say "plain client: python venv $VENV with azure-storage-blob==$SDK_VERSION"
    python3 -m venv "$VENV" >>"$LOG" 2>&1
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "azure-storage-blob==$SDK_VERSION" >>"$LOG" 2>&1
fi

size_bytes=$(fpy size "$SIZE")
obj_bytes=$(fpy size "$OBJ")
if [ $((size_bytes % 65536)) -ne 0 ]; then
    echo "error: SIZE=$SIZE is not a multiple of 64 KiB" >&2
    exit 2
fi
# Per dataset: reference image, primary and recovery disk, local store (≤ SIZE); one more image.
need=$((size_bytes * 5))
avail=$(df --output=avail -B1 "$OUT" | tail -n 1 | tr -d ' ')
if [ "$avail" -lt "$need" ]; then
    echo "error: $OUT has $((avail / 1048576)) MiB free, the benchmark needs about $((need / 1048576)) MiB" >&2
    exit 1
fi
# Azurite keeps blobs in memory: one contender's copy at a time (a fresh server for each).
mem_need=$((size_bytes * 3 + 1073741824))
mem_avail=$(awk '/^MemAvailable/ { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)
if [ "$mem_avail" -lt "$mem_need" ]; then
    echo "error: $((mem_avail / 1048576)) MiB of memory available, Azurite (in memory) needs about $((mem_need / 1048576)) MiB" >&2
    exit 1
fi

if [ "$build" -eq 1 ]; then
    say "cargo build --release"
    (cd "$ROOT" && cargo build --release --bin ferry) 2>>"$LOG"
    FERRY_BIN="$ROOT/target/release/ferry"
fi
FERRY_BIN=${FERRY_BIN:-$ROOT/target/release/ferry}
[ -x "$FERRY_BIN" ] || { echo "error: no ferry binary at $FERRY_BIN" >&2; exit 1; }
[ -n "$FERRY_THREADS" ] && THR=(--threads "$FERRY_THREADS")

[ -n "$AZ_PORT" ] || AZ_PORT=$(free_port)
if [ "$AZ_PORT" = 10000 ]; then
    echo "error: AZ_PORT=10000 is the default Azurite port other runs (CI) use; pick another" >&2
    exit 2
fi
AZ_URL="http://127.0.0.1:$AZ_PORT"
export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="$AZ_URL"

record size_label "$SIZE"
record size_bytes "$size_bytes"
record obj_bytes "$obj_bytes"
record plain_threads "$PLAIN_THREADS"
record datasets "$datasets"
record enc_repeat "$ENC_REPEAT"
record az_repeat "$AZ_REPEAT"
record date "$(date -u +%Y-%m-%dT%H:%MZ)"
record cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
record cores "$(nproc)"
record mem "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
record kernel "$(uname -r)"
record loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
record fstype "$(df --output=fstype "$OUT" | sed -n 2p)"
# Which code was measured: FERRY_LABEL if given; else the commit, marked "+ uncommitted changes"
# when this script built a tree whose Rust sources differ from it.
if [ -z "$FERRY_LABEL" ]; then
    FERRY_LABEL="commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [ "$build" -eq 1 ] && ! git -C "$ROOT" diff --quiet HEAD -- crates src Cargo.toml Cargo.lock 2>/dev/null; then
        FERRY_LABEL="$FERRY_LABEL + uncommitted changes"
    elif [ -n "${FERRY:-}" ]; then
        FERRY_LABEL="$FERRY (work tree at $FERRY_LABEL)"
    fi
fi
record ferry_version "$("$FERRY_BIN" --version 2>/dev/null || echo ferry), $FERRY_LABEL"
record ferry_threads "${FERRY_THREADS:-$(nproc)}"
record azurite_version "$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$ROOT/.ci/node/node_modules/azurite/package.json" | sed -n 1p)"
record python_version "$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
record sdk_version "$("$VENV/bin/python" -c 'import azure.storage.blob as b; print(b.__version__)')"
record az_port "$AZ_PORT"

mkdir -p "$WORK"
KEYFILE="$WORK/bench.key"
q "$FERRY_BIN" key new "$KEYFILE"
WARM_FILE="$WORK/warmup.img"
head -c $((8 * obj_bytes)) /dev/zero >"$WARM_FILE"

for d in $datasets; do
    ref="$WORK/ref-$d.img"
    say "[$d] generating $SIZE of disk content in $ref"
    if [ "$d" = mixed ]; then
        fpy gen "$ref" "$SIZE" "$SEED" 2>>"$LOG"
    else
        cpy rand "$ref" "$SIZE" "$SEED" 2>>"$LOG"
    fi
    # A fresh (empty) Azurite for each contender (azure_round starts and stops them), so that
    # every put starts on the same server state and no server's memory or background work
    # (extent garbage collection) lingers into the local rounds.
    say "[$d] Azurite on $AZ_URL (services dir $SVC_DIR)"
    azure_round "$d" "$ref"
    AZ_PID=
    enc_round "$d" "$ref"
    [ "$keep" -eq 1 ] || rm -f "$ref"
done
record loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"

results="$OUT/cloud-results-$SIZE.md"
python3 "$CHELP" report "$MEAS" >"$results"
cp "$results" "$OUT/cloud-results.md"
echo
cat "$results"
echo "(written to $results and $OUT/cloud-results.md; raw numbers in $MEAS, log in $LOG)" >&2

if [ "$update_docs" -eq 1 ]; then
    fpy splice-docs "$ROOT/docs/benchmarks.md" "$results" cloud-results
fi
success=1
