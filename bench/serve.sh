#!/usr/bin/env bash
# Control-plane overhead: the same delta failback embedded and through `ferry serve`, side by
# side in one run, on identical data.
#
#   SIZE=1GiB bench/serve.sh                # quick run
#   SIZE=4GiB bench/serve.sh --update-docs  # the published run (into docs/benchmarks.md)
#
# Each round builds two identical installations (same generated disk, same CHANGE_PCT% of
# changed blocks at the recovery site), then times `ferry failback app --auto-complete` (phase 1
# + 2) in each: once as an embedded command (--home), once as a client of a `ferry serve` over
# the other home (--server, --token). ROUNDS rounds alternate which goes first; the report gives
# medians, the byte counters of both and the ratio served / embedded (target: ≤ 1.15, same bytes).
#
# Hosts are driven by the control plane itself (dir driver): this measures what the API, the
# tokens and the per-request engine cost on top of the same data path. Failback through agents
# (the control plane moving metadata only) is measured once agents move disk data (docs/agents.md).
#
# Options: --no-build (use target/release/ferry or $FERRY as is), --keep, --update-docs.
# Environment: SIZE (1GiB), CHANGE_PCT (1), ROUNDS (3), SEED (42), OUT (bench/out), FERRY.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELP="$ROOT/bench/failback_helpers.py"
OUT=${OUT:-$ROOT/bench/out}
SIZE=${SIZE:-1GiB}
CHANGE_PCT=${CHANGE_PCT:-1}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-42}
FERRY_BIN=${FERRY:-}
build=1 keep=0 update_docs=0
[ -n "$FERRY_BIN" ] && build=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --keep) keep=1 ;;
        --update-docs) update_docs=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/serve-$SIZE"
LOG="$OUT/serve-$SIZE.log"
RESULTS="$OUT/results-serve-$SIZE.md"
rm -rf "$WORK"
mkdir -p "$WORK"
: >"$LOG"

if [ "$build" -eq 1 ]; then
    (cd "$ROOT" && cargo build --release --bin ferry >>"$LOG" 2>&1)
fi
FERRY_BIN=${FERRY_BIN:-$ROOT/target/release/ferry}
[ -x "$FERRY_BIN" ] || { echo "error: no ferry binary at $FERRY_BIN" >&2; exit 1; }
bytes=$(python3 "$HELP" size "$SIZE")

SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    if [ "$keep" -eq 0 ] && [ "${ok:-0}" -eq 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

now() { python3 -c 'import time; print(f"{time.monotonic():.6f}")'; }

# prepare HOME: two sites, a VM with one SIZE disk of generated data, protected, failed over,
# committed, CHANGE_PCT% of its blocks rewritten at the recovery site.
prepare() {
    local home=$1
    local f=("$FERRY_BIN" --home "$home")
    "${f[@]}" init >>"$LOG"
    "${f[@]}" site add prim --role primary >>"$LOG"
    "${f[@]}" site add dr --role recovery >>"$LOG"
    "${f[@]}" host add h1 --site prim --driver dir --switch lan >>"$LOG"
    "${f[@]}" host add r1 --site dr --driver dir --switch lan >>"$LOG"
    "${f[@]}" vm create app --host h1 --disk "$bytes" --switch lan >>"$LOG"
    local disk
    disk=$("${f[@]}" --json vm show app | python3 "$HELP" json disks.0.path)
    python3 "$HELP" gen "$disk" "$bytes" "$SEED"
    "${f[@]}" vm start app >>"$LOG"
    "${f[@]}" --json protect app --to dr >>"$LOG"
    "${f[@]}" --json failover app --planned >>"$LOG"
    "${f[@]}" --json commit app >>"$LOG"
    local rdisk
    rdisk=$("${f[@]}" --json vm show app --host r1 | python3 "$HELP" json disks.0.path)
    python3 "$HELP" mutate "$rdisk" "$CHANGE_PCT" "$((SEED + 1))" >>"$LOG"
    sync
}

# run MODE HOME: times the failback; prints "seconds read transferred written".
run() {
    local mode=$1 home=$2 args
    if [ "$mode" = served ]; then
        local token
        token=$("$FERRY_BIN" --home "$home" token new bench --role operator 2>>"$LOG")
        "$FERRY_BIN" --home "$home" serve --listen 127.0.0.1:0 >"$WORK/serve.out" 2>>"$LOG" &
        SERVER_PID=$!
        for _ in $(seq 100); do grep -q '^listening on ' "$WORK/serve.out" && break; sleep 0.05; done
        local url
        url=$(sed -n 's/^listening on //p' "$WORK/serve.out")
        args=(--server "$url" --token "$token")
    else
        args=(--home "$home")
    fi
    local t0 t1 job
    t0=$(now)
    job=$("$FERRY_BIN" "${args[@]}" --json failback app --auto-complete 2>>"$LOG")
    t1=$(now)
    if [ "$mode" = served ]; then kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; fi
    [ "$(echo "$job" | python3 "$HELP" json state)" = succeeded ] || { echo "error: $mode failback did not succeed: $job" >&2; exit 1; }
    echo "$(python3 -c "print(f'{$t1 - $t0:.3f}')") $(echo "$job" | python3 "$HELP" json bytes_read) $(echo "$job" | python3 "$HELP" json bytes_transferred) $(echo "$job" | python3 "$HELP" json bytes_written)"
}

declare -a emb srv
for r in $(seq "$ROUNDS"); do
    prepare "$WORK/e$r"
    prepare "$WORK/s$r"
    if [ $((r % 2)) -eq 1 ]; then
        e=$(run embedded "$WORK/e$r"); s=$(run served "$WORK/s$r")
    else
        s=$(run served "$WORK/s$r"); e=$(run embedded "$WORK/e$r")
    fi
    echo "round $r: embedded $e | served $s" | tee -a "$LOG" >&2
    emb+=("$e"); srv+=("$s")
    rm -rf "$WORK/e$r" "$WORK/s$r"
done

python3 - "$SIZE" "$CHANGE_PCT" "${#emb[@]}" "${emb[@]}" "${srv[@]}" >"$RESULTS" <<'EOF'
import statistics, sys
size, pct, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [list(map(float, x.split())) for x in sys.argv[4:]]
emb, srv = rows[:n], rows[n:]
med = lambda xs, i: statistics.median(x[i] for x in xs)
def b(x): return f"{x / 2**20:.1f} MiB"
ratio = med(srv, 0) / med(emb, 0)
same = all(e[1:] == s[1:] for e, s in zip(emb, srv))
print(f"Delta failback of a {size} disk with {pct}% of its blocks changed, phase 1 + 2, {n} alternating rounds (medians).\n")
print("| | embedded (`--home`) | served (`--server`) | served ÷ embedded |")
print("|---|---|---|---|")
print(f"| time | {med(emb, 0):.2f} s | {med(srv, 0):.2f} s | **{ratio:.2f}×** |")
for i, name in [(1, "bytes read"), (2, "bytes transferred"), (3, "bytes written")]:
    print(f"| {name} | {b(med(emb, i))} | {b(med(srv, i))} | {'same' if med(emb, i) == med(srv, i) else 'DIFFERENT'} |")
print(f"| each round (s) | {' / '.join(f'{x[0]:.2f}' for x in emb)} | {' / '.join(f'{x[0]:.2f}' for x in srv)} | |")
print()
print(f"Target ≤ 1.15× and the same bytes: **{'PASS' if ratio <= 1.15 and same else 'FAIL'}** (hosts driven by the control plane; not yet through agents).")
EOF
cat "$RESULTS"
if [ "$update_docs" -eq 1 ]; then
    python3 "$HELP" splice-docs "$ROOT/docs/benchmarks.md" "$RESULTS" serve "Control plane: failback through ferry serve"
fi
ok=1
