#!/usr/bin/env bash
# Change-tracked failback of a real QEMU VM, ferry side by side with its own hash scan and rsync,
# in one run.
#
#   SIZE=4GiB bench/qemu.sh                # the published benchmark (default SIZE=4GiB)
#   SIZE=256MiB bench/qemu.sh              # quick run
#
# One ferry home (qemu driver at both sites: hosts h1 at site prim, r1 at site dr; QEMU with TCG
# unless FERRY_QEMU_ACCEL says otherwise) and one VM `db` with a SIZE qcow2 disk filled with
# incompressible data, protected, failed over (planned) and committed. Then ROUNDS (3) rounds of
# the first two contenders, alternating which goes first, and one of rsync, each after its own
# planned failover and after the running recovery guest overwrote CHANGE_PCT% (default 1) of the
# 64 KiB blocks at
# random offsets through QEMU (QMP `human-monitor-command` + `qemu-io write -s`):
#   tracked: `ferry failback db` (phase 1, recovery VM running) and `ferry complete db` (phase 2),
#            timed separately, with FINAL_DELTA (10 MiB) written by the guest in between (phase
#            2's final delta): ferry follows its dirty bitmaps and reads only the changed blocks
#   scan:    the same after ferry's tracking bitmaps were removed from both images (QMP
#            `block-dirty-bitmap-remove` on the running recovery VM, `qemu-img bitmap --remove` on
#            the stopped primary), so ferry cannot trust tracking and hash-scans both disks
#   rsync:   both VMs stopped, `rsync --inplace --no-whole-file` of the recovery qcow2 onto a copy
#            of the primary qcow2 (REPEAT runs, median)
# Before each timed run both disk images are evicted from the page cache (CACHE=cold, the default:
# `posix_fadvise(DONTNEED)` on both after a sync; how a failback meets a primary disk untouched
# since the failover and a recovery disk bigger than the host's memory, while QEMU's and ferry's
# programs stay cached as on a host that runs them all day), or read once (CACHE=warm: both 4 GiB
# images served from memory, which only a host with spare RAM for every disk sees), or the whole
# page cache is dropped (CACHE=drop: `echo 3 > /proc/sys/vm/drop_caches`, needs root; programs too);
# after each ferry round both copies are stopped and compared (`qemu-img compare`, not timed).
# Targets: tracked total ≤ 5% of the scan total; rsync ≥ 20× the tracked total; tracked bytes
# read ≤ 2% of the disk; phase 2 downtime < 3 s.
# Results: Markdown on stdout and in bench/out/qemu-results.md (and qemu-results-SIZE.md); every raw
# number in qemu-measurements-SIZE.txt, the JSON of every ferry job in qemu-jobs-SIZE/, every command
# and its stderr in qemu-SIZE.log.
#
# Options:
#   --no-build      don't run `cargo build --release` (use target/release/ferry or $FERRY as is)
#   --keep          keep the work folder (ferry home, disks) under OUT after a successful run
#                   (a failed run always keeps it, with its VMs stopped)
#   --update-docs   replace the block between <!-- qemu-results --> and <!-- /qemu-results --> in
#                   docs/benchmarks.md with this run's results (without the markers: append a
#                   section "## Change-tracked failback on QEMU" holding them)
#   -h, --help      this text
# Environment:
#   CACHE (cold): cold, warm or drop: the page cache before each timed run (see above)
#   FINAL_DELTA (10MiB): what the guest writes between phase 1 and `complete` (phase 2's delta)
#   SIZE (4GiB)  CHANGE_PCT (1)  SEED (42)  OUT (bench/out)  FERRY (path to a ferry binary;
#   implies --no-build)  REPEAT (1): rsync runs, the median is reported
#   ROUNDS (3): rounds of the change-tracked and the hash-scan failback (each after its own
#   failover and guest writes), alternating which goes first; medians are reported
#   FERRY_QEMU_ACCEL (tcg): QEMU accelerator for every ferry command (tcg, kvm or auto)
# Needs qemu-system-x86_64, qemu-img, qemu-nbd, rsync and python3, and about 6 × SIZE of free disk
# space under OUT (checked first). The exit status is 0 whether targets pass or fail; only a
# broken run (a failed command, a job that did not succeed, tracking notes where none belong)
# exits non-zero.
set -Eeuo pipefail
shopt -s inherit_errexit # command substitutions stop at the first failure too

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FHELP="$ROOT/bench/failback_helpers.py"
QHELP="$ROOT/bench/qemu_helpers.py"
OUT=${OUT:-$ROOT/bench/out}
SIZE=${SIZE:-4GiB}
CHANGE_PCT=${CHANGE_PCT:-1}
SEED=${SEED:-42}
REPEAT=${REPEAT:-1}
ROUNDS=${ROUNDS:-3}
CACHE=${CACHE:-cold}
FINAL_DELTA=${FINAL_DELTA:-10MiB}
case "$CACHE" in
    warm | cold | drop) ;;
    *) echo "error: CACHE=$CACHE: use warm, cold or drop" >&2; exit 2 ;;
esac
FERRY_BIN=${FERRY:-}
export FERRY_QEMU_ACCEL=${FERRY_QEMU_ACCEL:-tcg}
COMMAND_LINE="$(printf '%q ' "SIZE=$SIZE" "CHANGE_PCT=$CHANGE_PCT" "SEED=$SEED" "REPEAT=$REPEAT" "ROUNDS=$ROUNDS" "CACHE=$CACHE" "FINAL_DELTA=$FINAL_DELTA" bench/qemu.sh "$@")"
COMMAND_LINE=${COMMAND_LINE% }

build=1
keep=0
update_docs=0
[ -n "$FERRY_BIN" ] && build=0

for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --keep) keep=1 ;;
        --update-docs) update_docs=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

missing=()
for c in qemu-system-x86_64 qemu-img qemu-nbd rsync python3; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "error: not installed: ${missing[*]} (scripts/install-deps.sh --bench installs QEMU and rsync)" >&2
    exit 1
fi
case "$REPEAT" in '' | *[!0-9]* | 0) echo "error: REPEAT=$REPEAT is not a positive integer" >&2; exit 2 ;; esac
case "$ROUNDS" in '' | *[!0-9]* | 0) echo "error: ROUNDS=$ROUNDS is not a positive integer" >&2; exit 2 ;; esac
python3 -c "import sys; p = float(sys.argv[1]); sys.exit(not 0 < p <= 100)" "$CHANGE_PCT" 2>/dev/null ||
    { echo "error: CHANGE_PCT=$CHANGE_PCT is not a percentage in (0, 100]" >&2; exit 2; }
case "$SEED" in '' | *[!0-9]*) echo "error: SEED=$SEED is not a non-negative integer" >&2; exit 2 ;; esac

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/qemu-$SIZE.log"
MEAS="$OUT/qemu-measurements-$SIZE.txt"
WORK="$OUT/qemu-$SIZE.$$"
JOBS="$OUT/qemu-jobs-$SIZE" # the JSON ferry printed for each job, and rsync --stats
FHOME="$WORK/home"
SCRATCH="$WORK/scratch"
size_bytes=$(python3 "$FHELP" size "$SIZE")
final_bytes=$(python3 "$FHELP" size "$FINAL_DELTA")
final_pct=$(awk -v f="$final_bytes" -v s="$size_bytes" 'BEGIN { printf "%.6f", 100 * f / s }')
if [ "$size_bytes" -le 0 ] || [ $((size_bytes % 65536)) -ne 0 ]; then
    echo "error: SIZE=$SIZE is not a positive multiple of 64 KiB" >&2
    exit 2
fi
# Primary and recovery qcow2, the raw fill file (deleted after conversion), the rsync copy and
# the site stores (deduplicated, ≤ SIZE each), plus headroom.
need=$((size_bytes * 6))
avail=$(df --output=avail -B1 "$OUT" | tail -n 1 | tr -d ' ')
if [ "$avail" -lt "$need" ]; then
    echo "error: $OUT has $((avail / 1048576)) MiB free, the benchmark needs about $((need / 1048576)) MiB" >&2
    exit 1
fi
sock="$FHOME/r1root/db/qmp.sock"
if [ "${#sock}" -gt 107 ]; then
    echo "error: OUT=$OUT is too deep: QMP socket paths like $sock exceed 107 bytes; use a shorter OUT" >&2
    exit 2
fi

: >"$LOG"
: >"$MEAS"
rm -rf "$JOBS"
mkdir -p "$JOBS"
success=0
started=0 # set once the ferry home exists (the exit trap then stops its VMs)

say() { printf '[qemu %s] %s\n' "$(date +%T)" "$*" >&2; }
fpy() { python3 "$FHELP" "$@"; }
qpy() { python3 "$QHELP" "$@"; }
record() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n' ' ')" >>"$MEAS"; }
jget() { fpy json "$1"; } # reads JSON on stdin
last() { awk -F= -v k="$1" '$1 == k { v = $2 } END { print v }' "$MEAS"; }
q() {
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
die() {
    echo "error: $*" >&2
    return 1
}

FER=()
fer() { "${FER[@]}" "$@"; }
# vm_field FIELD [--host H] : a field of `ferry --json vm show db` (e.g. disks.0.path, qmp, power)
vm_field() {
    local f=$1
    shift
    fer --json vm show db "$@" 2>>"$LOG" | jget "$f"
}

# Processes ferry started for this run (QEMU, qemu-nbd): their command line names the work folder.
leftover_pids() {
    local d pid comm
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        case "$comm" in qemu-system* | qemu-nbd) ;; *) continue ;; esac
        if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$WORK/"; then echo "$pid"; fi
    done
}

stop_vms() {
    local h pids i
    for h in h1 r1; do
        echo "+ ferry vm stop db --host $h (clean-up)" >>"$LOG"
        fer vm stop db --host "$h" >>"$LOG" 2>&1 || true
    done
    pids=$(leftover_pids)
    if [ -n "$pids" ]; then
        echo "clean-up: killing leftover QEMU processes of this run: $(echo "$pids" | tr '\n' ' ')" >&2
        # shellcheck disable=SC2086 # one pid a word
        kill -KILL $pids 2>/dev/null || true
        for i in $(seq 50); do
            [ -z "$(leftover_pids)" ] && break
            sleep 0.1
        done
    fi
}

on_err() {
    local rc=$? line=$1 cmd=$2
    [ "$BASHPID" = "$$" ] || return "$rc" # report once, from the main shell
    local i where=""
    # The functions the failure happened in, innermost first, with the lines they were called from.
    for ((i = 1; i < ${#FUNCNAME[@]} - 1; i++)); do where+=" in ${FUNCNAME[$i]} (called at line ${BASH_LINENO[$i]})"; done
    echo "bench/qemu.sh: failed (exit $rc) at line $line$where; last command: $cmd" >&2
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2 || true
}
on_exit() {
    trap - ERR
    if [ "$started" -eq 1 ]; then stop_vms; fi
    rm -rf "$SCRATCH"
    if [ "$success" -eq 1 ] && [ "$keep" -eq 0 ]; then
        rm -rf "$WORK"
    elif [ -d "$WORK" ]; then
        echo "work folder kept for inspection (ferry home $FHOME; delete it when done): $WORK" >&2
    fi
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
trap on_exit EXIT
trap 'echo "bench/qemu.sh: interrupted" >&2; exit 130' INT
trap 'echo "bench/qemu.sh: terminated" >&2; exit 143' TERM

# timed KEY OUTFILE CMD... : run CMD with stdout to OUTFILE and stderr to the log; record
# KEY_s (wall seconds, monotonic clock) and KEY_cpu (user + system CPU seconds of CMD).
timed() {
    local key=$1 outf=$2 res rc=0
    shift 2
    echo "+ $*" >>"$LOG"
    res=$(qpy timed "$outf" "$@" 2>>"$LOG") || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "command failed (exit $rc): $*" >&2
        sed -n '1,40p' "$outf" >&2 || true
        return "$rc"
    fi
    record "${key}_s" "${res% *}"
    record "${key}_cpu" "${res#* }"
}

# Flush dirty pages, then read the files once so every contender starts with a warm page cache
# (CACHE=cold: evict the files from the page cache instead; CACHE=drop: drop the whole page cache).
warm() {
    sync
    case "$CACHE" in
        cold) qpy evict "$@" ;;
        drop) echo 3 >/proc/sys/vm/drop_caches || die "CACHE=drop needs root (writing /proc/sys/vm/drop_caches)" ;;
        *) cat "$@" >/dev/null ;;
    esac
}

# job_ok JSONFILE STATE : the job JSON in FILE is in STATE, else fail with the JSON
job_ok() {
    local st
    st=$(jget state <"$1")
    if [ "$st" != "$2" ]; then
        echo "ferry job is '$st', expected '$2': $(cat "$1")" >&2
        return 1
    fi
}

# fjob NAME STATE ARGS... : untimed `ferry --json ARGS`, job JSON kept in $OUT/qemu-NAME.json
fjob() {
    local name=$1 st=$2 f
    shift 2
    f="$JOBS/$name.json"
    echo "+ ferry --json $*" >>"$LOG"
    fer --json "$@" >"$f" 2>>"$LOG" || { echo "ferry $* failed: $(cat "$f")" >&2; return 1; }
    job_ok "$f" "$st"
}

# guest_writes SEED [PCT] : the running recovery guest overwrites PCT% (default CHANGE_PCT) of
# the blocks
guest_writes() {
    local qmp dev n pct=${2:-$CHANGE_PCT}
    [ "$(vm_field power)" = running ] || die "the recovery VM of db is not running"
    qmp=$(vm_field qmp)
    dev=$(vm_field disks.0.device)
    if [ -z "$qmp" ] || [ -z "$dev" ]; then die "vm show db: no qmp socket or disks[0].device"; fi
    echo "+ guest: write $pct% of the 64 KiB blocks through $qmp ($dev), seed $1" >>"$LOG"
    n=$(qpy guest-write "$qmp" "$dev" "$size_bytes" "$pct" "$1" "$SCRATCH" 2>>"$LOG")
    echo "$n"
}

# failover_round TAG : planned failover + commit; the recovery VM runs on r1
failover_round() {
    local tag=$1 p
    say "[$tag] failover --planned + commit"
    timed "failover$tag" "$JOBS/failover$tag.json" "${FER[@]}" --json failover db --planned
    job_ok "$JOBS/failover$tag.json" succeeded
    fjob "commit-failover$tag" succeeded commit db
    REC=$(vm_field disks.0.path)
    PRIM=$(vm_field disks.0.path --host h1)
    if [ -z "$REC" ] || [ -z "$PRIM" ] || [ "$REC" = "$PRIM" ]; then
        die "expected distinct recovery and primary disks, got '$REC' and '$PRIM'"
    fi
    [ "$(vm_field host)" = r1 ] || die "after failover, vm show db names host '$(vm_field host)', not r1"
    p=$(vm_field power --host h1)
    [ "$p" = stopped ] || die "after a planned failover the primary VM is '$p', not stopped"
}

# identical PREFIX : stop the primary (ferry started it in phase 2), compare both stopped copies
identical() {
    local p=$1 res
    q fer vm stop db --host h1
    [ "$(vm_field power --host r1)" = stopped ] || die "the recovery VM still runs after phase 2"
    echo "+ qemu-img compare -f qcow2 -F qcow2 $PRIM $REC" >>"$LOG"
    if qemu-img compare -f qcow2 -F qcow2 "$PRIM" "$REC" >>"$LOG" 2>&1; then res=yes; else res=no; fi
    record "${p}_identical" "$res"
    if [ "$res" != yes ]; then
        echo "warning: after the $p failback the primary and recovery disks differ (see $LOG)" >&2
    fi
}

# failback_round PREFIX : timed phase 1 + phase 2; job counters recorded under PREFIX_*
failback_round() {
    local p=$1 f1="$JOBS/$1-phase1.json" f2="$JOBS/$1-phase2.json" k id notes steps
    warm "$PRIM" "$REC"
    say "[$p] ferry failback db (phase 1)"
    timed "${p}_p1" "$f1" "${FER[@]}" --json failback db
    job_ok "$f1" waiting
    # The final delta: what the guest writes between phase 1 and `complete` (untimed).
    # (its own seed per round, so no round rewrites what an earlier one wrote)
    local fseed=$((SEED + 100))
    [ "$p" = tracked ] || fseed=$((SEED + 200))
    record "${p}_final_delta" "$(guest_writes "$fseed" "$final_pct")"
    say "[$p] ferry complete db (phase 2)"
    timed "${p}_p2" "$f2" "${FER[@]}" --json complete db
    job_ok "$f2" succeeded
    record "${p}_total_s" "$(awk -v a="$(last "${p}_p1_s")" -v b="$(last "${p}_p2_s")" 'BEGIN { printf "%.3f", a + b }')"
    record "${p}_read_p1" "$(jget bytes_read <"$f1")"
    for k in bytes_read bytes_transferred bytes_written downtime_ms; do
        record "${p}_${k#bytes_}" "$(jget "$k" <"$f2")"
    done
    notes=$(qpy notes <"$f2")
    record "${p}_notes" "$notes"
    steps=$(qpy steps <"$f2") # per-step wall time, when this ferry reports it
    record "${p}_steps" "$steps"
    id=$(jget id <"$f2")
    echo "+ ferry job show $id" >>"$LOG"
    fer job show "$id" >>"$LOG" 2>&1 || true
    say "[$p] phase 1 $(last "${p}_p1_s")s, phase 2 $(last "${p}_p2_s")s (downtime $(last "${p}_downtime_ms") ms), read $(last "${p}_read") bytes"
}

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
    say "cargo build --release"
    (cd "$ROOT" && cargo build --release --bin ferry) 2>>"$LOG" || die "cargo build --release failed (see $LOG)"
    FERRY_BIN="$ROOT/target/release/ferry"
fi
FERRY_BIN=${FERRY_BIN:-$ROOT/target/release/ferry}
[ -x "$FERRY_BIN" ] || die "no ferry binary at $FERRY_BIN (build it, or set FERRY)"
FER=("$FERRY_BIN" --home "$FHOME")

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
label="commit $commit"
if [ "$build" -eq 1 ] && ! git -C "$ROOT" diff --quiet HEAD -- crates src Cargo.toml Cargo.lock 2>/dev/null; then
    label="$label + uncommitted changes"
elif [ -n "${FERRY:-}" ]; then
    label="$FERRY (work tree at $label)"
elif [ "$build" -eq 0 ]; then
    label="target/release/ferry as found (--no-build; work tree at $label)"
fi
record command "$COMMAND_LINE"
record size_label "$SIZE"
record size_bytes "$size_bytes"
record change_pct "$CHANGE_PCT"
record seed "$SEED"
record repeat "$REPEAT"
record rounds "$ROUNDS"
record date "$(date -u +%Y-%m-%dT%H:%MZ)"
record cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
record cores "$(nproc)"
record mem "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
record kernel "$(uname -r)"
record loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
record fstype "$(df --output=fstype "$OUT" | sed -n 2p)"
record ferry_version "$("$FERRY_BIN" --version 2>/dev/null || echo ferry), $label"
record git_head "$commit"
# (awk reads all input: `| head` would SIGPIPE the writer under pipefail)
record qemu_version "$(qemu-system-x86_64 --version | awk 'NR == 1 { print $1, $4 }')"
record accel "$FERRY_QEMU_ACCEL"
record cache "$CACHE"
record rsync_version "$(rsync --version | awk 'NR == 1 { print $1, $3 }')"

# ---- set-up: home, hosts, VM with a full disk, protect, failover, commit
rm -rf "$WORK"
mkdir -p "$FHOME" "$SCRATCH"
started=1
say "set-up in $WORK (log: $LOG)"
q fer init
q fer site add prim --role primary
q fer site add dr --role recovery
q fer host add h1 --site prim --driver qemu --root "$FHOME/h1root" --switch lan
q fer host add r1 --site dr --driver qemu --root "$FHOME/r1root" --switch lan
q fer vm create db --host h1 --disk "$SIZE" --switch lan --memory 128MiB
PRIM=$(vm_field disks.0.path)
if [ -z "$PRIM" ] || [ ! -f "$PRIM" ]; then die "vm show db: no disks[0].path (or no such file: '$PRIM')"; fi
say "filling the primary disk with $SIZE of incompressible data"
raw="$WORK/fill.raw"
echo "+ fill $raw $SIZE $SEED" >>"$LOG"
qpy fill "$raw" "$SIZE" "$SEED" 2>>"$LOG"
q qemu-img convert -n -f raw -O qcow2 "$raw" "$PRIM"
rm -f "$raw"
q fer vm start db
say "protect (initial replication)"
timed protect "$JOBS/protect.json" "${FER[@]}" --json protect db --to dr
job_ok "$JOBS/protect.json" succeeded

# ---- ROUNDS rounds of the change-tracked and the hash-scan failback, alternating which goes
# first (every measurement recorded again under the same keys; the report takes medians)
tracked_round() {
    local r=$1
    failover_round "t$r"
    say "[tracked $r/$ROUNDS] the recovery guest writes $CHANGE_PCT% of the blocks"
    changed=$(guest_writes $((SEED + 10 * r + 1)))
    record tracked_changed "$changed"
    failback_round tracked
    case "$(last tracked_notes)" in
        *"cannot be trusted"* | *"hash scan"*)
            die "ferry did not trust its change tracking in the change-tracked round: $(last tracked_notes)" ;;
    esac
    identical tracked
    q fer vm start db --host h1
    fjob "commit-tracked$r" succeeded commit db
    say "[tracked $r/$ROUNDS] reverse-replicate"
    fjob "reverse-tracked$r" succeeded reverse-replicate db
}
scan_round() {
    local r=$1 removed prim_bitmaps b
    failover_round "s$r"
    say "[scan $r/$ROUNDS] the recovery guest writes $CHANGE_PCT% of the blocks"
    changed=$(guest_writes $((SEED + 10 * r + 2)))
    record scan_changed "$changed"
    removed=$(qpy remove-bitmaps "$(vm_field qmp)" disk0 2>>"$LOG")
    [ -n "$removed" ] || die "the running recovery VM has no ferry-* bitmaps on disk0 to remove"
    echo "+ removed from the running recovery VM: $removed" >>"$LOG"
    record scan_removed_recovery "$removed"
    prim_bitmaps=$(qpy image-bitmaps "$PRIM" 2>>"$LOG")
    [ -n "$prim_bitmaps" ] || die "the stopped primary image $PRIM has no ferry-* bitmaps to remove"
    for b in $prim_bitmaps; do q qemu-img bitmap --remove "$PRIM" "$b"; done
    record scan_removed_primary "$prim_bitmaps"
    failback_round scan
    case "$(last scan_notes)" in
        *"change tracking cannot be trusted"*) ;;
        *) die "the hash-scan failback's job does not say that change tracking cannot be trusted (notes: '$(last scan_notes)')" ;;
    esac
    identical scan
    q fer vm start db --host h1
    fjob "commit-scan$r" succeeded commit db
    say "[scan $r/$ROUNDS] reverse-replicate"
    fjob "reverse-scan$r" succeeded reverse-replicate db
}
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
        tracked_round "$r"
        scan_round "$r"
    else
        scan_round "$r"
        tracked_round "$r"
    fi
done

# ---- rsync of the qcow2 files, both VMs stopped
failover_round r
say "[rsync] the recovery guest writes $CHANGE_PCT% of the blocks"
changed=$(guest_writes $((SEED + 3)))
record rsync_changed "$changed"
q fer vm stop db
[ "$(vm_field power --host h1)" = stopped ] || q fer vm stop db --host h1
copy="$WORK/primary-copy.qcow2"
for i in $(seq "$REPEAT"); do
    say "[rsync] rsync --inplace --no-whole-file onto a fresh copy of the primary qcow2 ($i/$REPEAT)"
    cp "$PRIM" "$copy"
    warm "$REC" "$copy"
    timed rsync_run "$JOBS/rsync-stats.txt" rsync --inplace --no-whole-file --stats "$REC" "$copy"
done
record rsync_s "$(awk -F= '$1 == "rsync_run_s" { print $2 }' "$MEAS" | sort -g |
    awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
record rsync_runs "$(awk -F= '$1 == "rsync_run_s" { printf "%s%s", sep, $2; sep = " " }' "$MEAS")"
record rsync_cpu "$(last rsync_run_cpu)"
record rsync_literal "$(awk -F: '/^Literal data/ { gsub(/[^0-9]/, "", $2); print $2 }' "$JOBS/rsync-stats.txt")"
if cmp -s "$REC" "$copy"; then record rsync_identical yes; else record rsync_identical no; fi
rm -f "$copy"
say "[rsync] $(last rsync_s)s"
record loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"

results="$OUT/qemu-results-$SIZE.md"
qpy report "$MEAS" >"$results"
cp "$results" "$OUT/qemu-results.md"
echo
cat "$results"
echo "(written to $results and $OUT/qemu-results.md; raw numbers in $MEAS, job JSON in $JOBS, log in $LOG)" >&2

if [ "$update_docs" -eq 1 ]; then
    fpy splice-docs "$ROOT/docs/benchmarks.md" "$results" qemu-results "Change-tracked failback on QEMU"
fi
success=1
