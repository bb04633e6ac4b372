#!/usr/bin/env bash
# Failback benchmark (DESIGN.md §7), ferry side by side with its peers in one run.
#
#   SIZE=4GiB bench/failback.sh            # the published benchmark (default SIZE=4GiB)
#   SIZE=1GiB bench/failback.sh            # quick run
#   SIZE=1GiB bench/failback.sh --peers-only   # rsync / b3sum / cp only, no ferry needed
#
# What it measures, on the same pair of files:
#   delta: a disk with CHANGE_PCT% (default 1) of its 64 KiB blocks changed at the recovery site;
#          `ferry failback --sync delta --auto-complete` (phase 1 + 2) vs
#          `rsync --inplace --no-whole-file` and `b3sum` of both disks (the hashing floor)
#   full:  `ferry failback --sync full --auto-complete` vs `cp` of the recovery disk
#   memory: ferry's peak RSS for a delta failback at MEM_SIZE (default 1GiB) vs SIZE, with the
#           same number of changed bytes in both runs (so only the disk size differs)
# Results: Markdown on stdout and in bench/out/results.md (and results-SIZE.md).
#
# Options:
#   --peers-only    make two files with the generator and time only rsync, b3sum and cp
#   --no-build      don't run `cargo build --release` (use target/release/ferry or $FERRY as is)
#   --no-full       skip the full-download round
#   --keep          keep the ferry homes under bench/out/ after a successful run
#   --update-docs   replace the block between <!-- results --> and <!-- /results --> in
#                   docs/benchmarks.md with this run's results
# Environment:
#   SIZE (4GiB)  MEM_SIZE (1GiB; empty or equal to SIZE skips the memory run)
#   CHANGE_PCT (1)  SEED (42)  OUT (bench/out)  FERRY (path to a ferry binary; implies --no-build)
#   REPEAT (3): runs of each peer command, the median is reported (ferry runs once per mode)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELP="$ROOT/bench/failback_helpers.py"
OUT=${OUT:-$ROOT/bench/out}
SIZE=${SIZE:-4GiB}
MEM_SIZE=${MEM_SIZE-1GiB}
CHANGE_PCT=${CHANGE_PCT:-1}
SEED=${SEED:-42}
REPEAT=${REPEAT:-3}
FERRY_BIN=${FERRY:-}

peers_only=0
build=1
do_full=1
keep=0
update_docs=0
[ -n "$FERRY_BIN" ] && build=0

for arg in "$@"; do
    case "$arg" in
        --peers-only) peers_only=1 ;;
        --no-build) build=0 ;;
        --no-full) do_full=0 ;;
        --keep) keep=1 ;;
        --update-docs) update_docs=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/failback-$SIZE.log"
MEAS="$OUT/measurements-$SIZE.txt"
SCRATCH="$OUT/scratch.$$"
: >"$LOG"
: >"$MEAS"
HOMES=()
success=0

say() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
py() { python3 "$HELP" "$@"; }
record() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n' ' ')" >>"$MEAS"; }
jget() { py json "$1"; } # reads JSON on stdin

on_err() {
    local rc=$? line=$1 cmd=$2
    echo "bench/failback.sh: failed (exit $rc) at line $line: $cmd" >&2
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2 || true
}
on_exit() {
    rm -rf "$SCRATCH"
    rm -f "$OUT"/.time.*
    if [ "$success" -eq 1 ] && [ "$keep" -eq 0 ]; then
        for h in "${HOMES[@]}"; do rm -rf "$h"; done
    elif [ "${#HOMES[@]}" -gt 0 ]; then
        echo "ferry homes kept for inspection: ${HOMES[*]}" >&2
    fi
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
trap on_exit EXIT

# timed KEY CMD... : run CMD (stdout to $TIMED_STDOUT or /dev/null, stderr to the log) and
# record KEY_s (wall seconds, from date +%s.%N) and KEY_rss (max RSS KiB, from GNU time).
timed() {
    local key=$1
    shift
    local tf t0 t1
    tf=$(mktemp "$OUT/.time.XXXXXX")
    echo "+ $*" >>"$LOG"
    t0=$(date +%s.%N)
    /usr/bin/time -f '%e %M' -o "$tf" "$@" >"${TIMED_STDOUT:-/dev/null}" 2>>"$LOG"
    t1=$(date +%s.%N)
    record "${key}_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
    record "${key}_rss" "$(tail -n 1 "$tf" | awk '{ print $2 }')"
    rm -f "$tf"
}
last() { awk -F= -v k="$1" '$1 == k { v = $2 } END { print v }' "$MEAS"; }

# Flush dirty pages, then read the files once so every contender starts with a warm cache.
warm() {
    sync
    cat "$@" >/dev/null
}

same() { if cmp -s "$1" "$2"; then echo yes; else echo no; fi; }

# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------

# summarize KEY : KEY_s = median of the KEY_run_s samples, KEY_rss = max of KEY_run_rss.
summarize() {
    local k=$1
    record "${k}_s" "$(awk -F= -v k="${k}_run_s" '$1 == k { print $2 }' "$MEAS" | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
    record "${k}_rss" "$(awk -F= -v k="${k}_run_rss" '$1 == k && $2 > m { m = $2 } END { print m + 0 }' "$MEAS")"
    record "${k}_runs" "$(awk -F= -v k="${k}_run_s" '$1 == k { printf "%s%s", sep, $2; sep = " " }' "$MEAS")"
}

# peer_delta NEW STALE : rsync NEW onto a copy of STALE; b3sum of NEW and STALE (REPEAT runs each).
peer_delta() {
    local new=$1 stale=$2 p2="$SCRATCH/rsync-target.img" i
    for i in $(seq "$REPEAT"); do
        say "peer: rsync --inplace --no-whole-file onto a fresh copy of the stale disk ($i/$REPEAT)"
        cp "$stale" "$p2"
        warm "$new" "$p2"
        TIMED_STDOUT="$OUT/rsync-stats.txt" timed rsync_run rsync --inplace --no-whole-file --stats "$new" "$p2"
    done
    summarize rsync
    record rsync_literal "$(awk -F: '/^Literal data/ { gsub(/[^0-9]/, "", $2); print $2 }' "$OUT/rsync-stats.txt")"
    record rsync_identical "$(same "$new" "$p2")"
    rm -f "$p2"
    warm "$new" "$stale"
    for i in $(seq "$REPEAT"); do
        say "peer: b3sum of both disks ($i/$REPEAT)"
        timed b3sum_run b3sum "$new" "$stale"
    done
    summarize b3sum
    say "peer: rsync $(last rsync_s)s, b3sum $(last b3sum_s)s (medians)"
}

# peer_full SRC : cp SRC to a scratch file; once more followed by an fsync of the copy.
peer_full() {
    local src=$1 dst="$SCRATCH/cp-target.img" i
    for i in $(seq "$REPEAT"); do
        warm "$src"
        say "peer: cp ($i/$REPEAT)"
        timed cp_run cp "$src" "$dst"
        rm -f "$dst"
        warm "$src"
        # shellcheck disable=SC2016 # $1/$2 expand in the inner sh
        timed cpsync_run sh -c 'cp "$1" "$2" && sync "$2"' sh "$src" "$dst"
        rm -f "$dst"
    done
    summarize cp
    summarize cpsync
    say "peer: cp $(last cp_s)s, cp+sync $(last cpsync_s)s (medians)"
}

# ---------------------------------------------------------------------------
# ferry
# ---------------------------------------------------------------------------
FHOME=
FER=()
fer() { "${FER[@]}" "$@"; }
q() {
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
disk_of() { fer --json vm show bench "$@" 2>>"$LOG" | jget disks.0.path; }

# record_job PREFIX JSONFILE
record_job() {
    local p=$1 f=$2 k
    for k in state bytes_read bytes_transferred bytes_written downtime_ms error; do
        record "${p}_${k#bytes_}" "$(jget "$k" <"$f")"
    done
    if [ "$(jget state <"$f")" != "succeeded" ]; then
        echo "ferry job did not succeed: $(cat "$f")" >&2
        return 1
    fi
}

# scenario PREFIX SIZE WITH_PEERS WITH_FULL
scenario() {
    local p=$1 size=$2 with_peers=$3 with_full=$4 pct=${5:-$CHANGE_PCT}
    local prim rec changed
    FHOME="$OUT/home-${p}${size}"
    rm -rf "$FHOME"
    mkdir -p "$FHOME"
    HOMES+=("$FHOME")
    FER=("$FERRY_BIN" --home "$FHOME") # timed needs a real command, not the fer function
    say "[$p$size] set-up in $FHOME"
    q fer init
    q fer site add prim --role primary
    q fer site add dr --role recovery
    q fer host add h1 --site prim --driver dir
    q fer host add h2 --site dr --driver dir
    q fer vm create bench --host h1 --disk "$size"
    prim=$(disk_of)
    [ -n "$prim" ] || { echo "vm show bench: no disks[0].path" >&2; return 1; }
    say "[$p$size] generating $size of disk content in $prim"
    py gen "$prim" "$size" "$SEED" 2>>"$LOG"
    q fer vm start bench
    say "[$p$size] protect (initial replication)"
    timed "${p}protect" "${FER[@]}" protect bench --to dr
    say "[$p$size] failover --planned + commit"
    timed "${p}failover" "${FER[@]}" failover bench --planned
    q fer commit bench
    rec=$(disk_of)
    prim=$(disk_of --host h1)
    if [ -z "$rec" ] || [ -z "$prim" ] || [ "$rec" = "$prim" ]; then
        echo "expected distinct recovery and primary disks, got '$rec' and '$prim'" >&2
        return 1
    fi
    changed=$(py mutate "$rec" "$pct" $((SEED + 1)))
    record "${p}changed_bytes" "$changed"
    say "[$p$size] changed $changed bytes of the recovery disk $rec"
    sleep 2
    if [ "$with_peers" -eq 1 ]; then peer_delta "$rec" "$prim"; fi

    warm "$rec" "$prim"
    say "[$p$size] ferry failback --sync delta --auto-complete"
    TIMED_STDOUT="$OUT/${p}failback-delta.json" timed "${p}ferry_delta" \
        "${FER[@]}" --json failback bench --sync delta --auto-complete
    record_job "${p}ferry_delta" "$OUT/${p}failback-delta.json"
    record "${p}ferry_delta_identical" "$(same "$(disk_of)" "$rec")"
    say "[$p$size] delta failback $(last "${p}ferry_delta_s")s, identical: $(last "${p}ferry_delta_identical")"

    if [ "$with_full" -eq 1 ]; then
        say "[$p$size] commit, reverse-replicate, failover again for the full round"
        q fer commit bench
        q fer reverse-replicate bench
        q fer failover bench --planned
        q fer commit bench
        rec=$(disk_of)
        changed=$(py mutate "$rec" "$CHANGE_PCT" $((SEED + 2)))
        record "${p}changed_bytes_full" "$changed"
        sleep 2
        if [ "$with_peers" -eq 1 ]; then peer_full "$rec"; fi
        warm "$rec"
        say "[$p$size] ferry failback --sync full --auto-complete"
        TIMED_STDOUT="$OUT/${p}failback-full.json" timed "${p}ferry_full" \
            "${FER[@]}" --json failback bench --sync full --auto-complete
        record_job "${p}ferry_full" "$OUT/${p}failback-full.json"
        record "${p}ferry_full_identical" "$(same "$(disk_of)" "$rec")"
        say "[$p$size] full failback $(last "${p}ferry_full_s")s, identical: $(last "${p}ferry_full_identical")"
    fi
    if [ "$keep" -eq 0 ]; then
        rm -rf "$FHOME"
    fi
}

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
say "deps: scripts/install-deps.sh --bench"
bash "$ROOT/scripts/install-deps.sh" --bench 2>>"$LOG"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

size_bytes=$(py size "$SIZE")
if [ $((size_bytes % 65536)) -ne 0 ]; then
    echo "error: SIZE=$SIZE is not a multiple of 64 KiB" >&2
    exit 2
fi
need=$((size_bytes * 5))
if [ -n "$MEM_SIZE" ] && [ "$peers_only" -eq 0 ]; then need=$((need + $(py size "$MEM_SIZE") * 4)); fi
avail=$(df --output=avail -B1 "$OUT" | tail -n 1 | tr -d ' ')
if [ "$avail" -lt "$need" ]; then
    echo "error: $OUT has $((avail / 1048576)) MiB free, the benchmark needs about $((need / 1048576)) MiB" >&2
    exit 1
fi
mkdir -p "$SCRATCH"

record size_label "$SIZE"
record size_bytes "$size_bytes"
record change_pct "$CHANGE_PCT"
record date "$(date -u +%Y-%m-%dT%H:%MZ)"
record cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
record cores "$(nproc)"
record mem "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
record kernel "$(uname -r)"
record loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
record repeat "$REPEAT"
record fstype "$(df --output=fstype "$OUT" | sed -n 2p)"
# (sed/awk read all input: `| head` would SIGPIPE the writer under pipefail)
record rsync_version "$(rsync --version | awk 'NR == 1 { print $1, $3 }')"
record b3sum_version "$(b3sum --version)"
record cp_version "cp (coreutils) $(cp --version | awk 'NR == 1 { print $NF }')"

if [ "$peers_only" -eq 1 ]; then
    record mode "peers only"
    P="$SCRATCH/primary.img"
    R="$SCRATCH/recovery.img"
    say "peers only: generating $SIZE in $P"
    py gen "$P" "$SIZE" "$SEED" 2>>"$LOG"
    cp "$P" "$R"
    record changed_bytes "$(py mutate "$R" "$CHANGE_PCT" $((SEED + 1)))"
    sleep 2
    peer_delta "$R" "$P"
    peer_full "$R"
    results="$OUT/results-peers-only-$SIZE.md"
else
    record mode "ferry and peers"
    if [ "$build" -eq 1 ]; then
        say "cargo build --release"
        (cd "$ROOT" && cargo build --release --bin ferry) 2>>"$LOG"
        FERRY_BIN="$ROOT/target/release/ferry"
    fi
    FERRY_BIN=${FERRY_BIN:-$ROOT/target/release/ferry}
    [ -x "$FERRY_BIN" ] || { echo "error: no ferry binary at $FERRY_BIN" >&2; exit 1; }
    record ferry_version "$("$FERRY_BIN" --version 2>/dev/null || echo ferry) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo uncommitted))"

    if [ -n "$MEM_SIZE" ] && [ "$(py size "$MEM_SIZE")" -ne "$size_bytes" ]; then
        record mem_size_label "$MEM_SIZE"
        # Same changed bytes as the main run, so only the disk size differs.
        mem_pct=$(python3 -c "print(min(100.0, $CHANGE_PCT * $size_bytes / $(py size "$MEM_SIZE")))")
        scenario mem_ "$MEM_SIZE" 0 0 "$mem_pct"
    fi
    scenario "" "$SIZE" 1 "$do_full"
    results="$OUT/results-$SIZE.md"
fi

py report "$MEAS" >"$results"
cp "$results" "$OUT/results.md"
echo
cat "$results"
echo "(written to $results and $OUT/results.md; raw numbers in $MEAS, log in $LOG)" >&2

if [ "$update_docs" -eq 1 ]; then
    py splice-docs "$ROOT/docs/benchmarks.md" "$results" results
fi
success=1
