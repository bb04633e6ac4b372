#!/usr/bin/env bash
# Control-plane and agent overhead: the same delta failback embedded, through `ferry serve`, and
# through `ferry serve` with one `ferry agent` per site, side by side in one run, on identical data.
#
#   SIZE=1GiB bench/serve.sh                # quick run
#   SIZE=4GiB bench/serve.sh --update-docs  # the published run (into docs/benchmarks.md)
#
# Each round builds three identical installations (same generated disk, same CHANGE_PCT% of
# changed blocks at the recovery site), then times `ferry failback app --auto-complete` (phase 1
# + 2) in each:
#   embedded  one process (--home), hosts driven in-process;
#   served    a client of `ferry serve` over the other home, hosts driven by the server;
#   agents    a client of `ferry serve` whose two hosts are served by `ferry agent` processes
#             (each with its own root, a store folder outside the server's home): the control
#             plane moves metadata only, the recovery agent captures its disk into the store,
#             the primary agent writes the differing blocks from it.
# ROUNDS rounds rotate which goes first; the report gives medians, the byte counters and the
# ratios to embedded (target for agents: <= 1.15x the time, the same bytes transferred and written).
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
A_SERVER_PID=
A_PIDS=()
A_URL= A_TOKEN=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$A_SERVER_PID" ] && kill "$A_SERVER_PID" 2>/dev/null || true
    stop_agents
    if [ "$keep" -eq 0 ] && [ "${ok:-0}" -eq 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

now() { python3 -c 'import time; print(f"{time.monotonic():.6f}")'; }

# failed_over FERRY…: on an installation with hosts h1 (site prim) and r1 (site dr), a VM with
# one SIZE disk of generated data, protected, failed over, committed, and CHANGE_PCT% of its
# blocks rewritten at the recovery site. FERRY… is the ferry command with its --home or --server.
failed_over() {
    local f=("$@")
    "${f[@]}" vm create app --host h1 --disk "$bytes" --switch lan >>"$LOG"
    local disk
    disk=$("${f[@]}" --json vm show app | python3 "$HELP" json disks.0.path)
    python3 "$HELP" gen "$disk" "$bytes" "$SEED"
    # Past the change stamps' racy window (2 s): every contender trusts the primary's stamp alike.
    sleep 2.1
    "${f[@]}" vm start app >>"$LOG"
    "${f[@]}" --json protect app --to dr >>"$LOG"
    "${f[@]}" --json failover app --planned >>"$LOG"
    "${f[@]}" --json commit app >>"$LOG"
    local rdisk
    rdisk=$("${f[@]}" --json vm show app --host r1 | python3 "$HELP" json disks.0.path)
    python3 "$HELP" mutate "$rdisk" "$CHANGE_PCT" "$((SEED + 1))" >>"$LOG"
    sync
    sleep 2.1 # every contender starts outside the stamps' racy window
}

stop_agents() {
    local p
    for p in "${A_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${A_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    A_PIDS=()
}

# start_server HOME OUTFILE: starts `ferry serve` on a free port (SERVER_PID); OUTFILE gets its URL.
start_server() {
    "$FERRY_BIN" --home "$1" serve --listen 127.0.0.1:0 >"$2" 2>>"$LOG" &
    SERVER_PID=$!
    for _ in $(seq 200); do grep -q '^listening on ' "$2" && break; sleep 0.05; done
}

# prepare_agents DIR: the installation of prepare(), but with a control plane left running
# (A_SERVER_PID, A_URL, A_TOKEN) and an agent per host (A_PIDS) whose roots are DIR/h1 and
# DIR/r1; the recovery site's store is DIR/store.
prepare_agents() {
    local dir=$1 home=$1/home
    mkdir -p "$dir"
    "$FERRY_BIN" --home "$home" init >>"$LOG"
    local admin
    admin=$("$FERRY_BIN" --home "$home" token new admin --role admin 2>>"$LOG")
    A_TOKEN=$("$FERRY_BIN" --home "$home" token new bench --role operator 2>>"$LOG")
    start_server "$home" "$dir/serve.out"
    A_SERVER_PID=$SERVER_PID SERVER_PID=
    A_URL=$(sed -n 's/^listening on //p' "$dir/serve.out")
    local f=("$FERRY_BIN" --server "$A_URL" --token "$admin")
    "${f[@]}" site add prim --role primary >>"$LOG"
    "${f[@]}" site add dr --role recovery --store "file://$dir/store" >>"$LOG"
    local host site t
    for host in h1 r1; do
        site=prim; [ "$host" = r1 ] && site=dr
        "${f[@]}" host add "$host" --site "$site" --driver dir --switch lan --agent >>"$LOG"
        t=$("${f[@]}" token new "$host-agent" --role agent --host "$host" 2>>"$LOG")
        "$FERRY_BIN" agent --server "$A_URL" --token "$t" --host "$host" --root "$dir/$host" >>"$LOG" 2>&1 &
        A_PIDS+=($!)
    done
    for host in h1 r1; do
        for _ in $(seq 200); do
            [ "$("${f[@]}" --json host show "$host" | python3 "$HELP" json agent.connected)" = true ] && break
            sleep 0.05
        done
    done
    failed_over "${f[@]}"
}

# prepare HOME: two sites, two hosts driven in-process, then failed_over.
prepare() {
    local home=$1
    local f=("$FERRY_BIN" --home "$home")
    "${f[@]}" init >>"$LOG"
    "${f[@]}" site add prim --role primary >>"$LOG"
    "${f[@]}" site add dr --role recovery >>"$LOG"
    "${f[@]}" host add h1 --site prim --driver dir --switch lan >>"$LOG"
    "${f[@]}" host add r1 --site dr --driver dir --switch lan >>"$LOG"
    failed_over "${f[@]}"
}

# run MODE HOME: times the failback; prints "seconds read transferred written".
run() {
    local mode=$1 home=$2 args
    if [ "$mode" = served ]; then
        local token url
        token=$("$FERRY_BIN" --home "$home" token new bench --role operator 2>>"$LOG")
        start_server "$home" "$WORK/serve.out"
        url=$(sed -n 's/^listening on //p' "$WORK/serve.out")
        args=(--server "$url" --token "$token")
    elif [ "$mode" = agents ]; then
        args=(--server "$A_URL" --token "$A_TOKEN")
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

declare -a emb srv agt
for r in $(seq "$ROUNDS"); do
    prepare "$WORK/e$r"
    prepare "$WORK/s$r"
    prepare_agents "$WORK/a$r"
    case $((r % 3)) in
        1) order="embedded served agents" ;;
        2) order="agents embedded served" ;;
        *) order="served agents embedded" ;;
    esac
    e= s= a=
    for m in $order; do
        case $m in
            embedded) e=$(run embedded "$WORK/e$r") ;;
            served) s=$(run served "$WORK/s$r") ;;
            agents) a=$(run agents "$WORK/a$r") ;;
        esac
    done
    kill "$A_SERVER_PID" 2>/dev/null || true
    wait "$A_SERVER_PID" 2>/dev/null || true
    A_SERVER_PID=
    stop_agents
    echo "round $r ($order): embedded $e | served $s | agents $a" | tee -a "$LOG" >&2
    emb+=("$e"); srv+=("$s"); agt+=("$a")
    rm -rf "$WORK/e$r" "$WORK/s$r" "$WORK/a$r"
done

python3 - "$SIZE" "$CHANGE_PCT" "${#emb[@]}" "${emb[@]}" "${srv[@]}" "${agt[@]}" >"$RESULTS" <<'EOF'
import statistics, sys
size, pct, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [list(map(float, x.split())) for x in sys.argv[4:]]
emb, srv, agt = rows[:n], rows[n:2 * n], rows[2 * n:]
med = lambda xs, i: statistics.median(x[i] for x in xs)
def b(x): return f"{x / 2**20:.1f} MiB"
r_srv = med(srv, 0) / med(emb, 0)
r_agt = med(agt, 0) / med(emb, 0)
same = lambda xs, i: all(e[i] == x[i] for e, x in zip(emb, xs))
def cmp(xs, i): return "same" if same(xs, i) else f"{med(xs, i) / max(med(emb, i), 1):.2f}×"
print(f"Delta failback of a {size} disk with {pct}% of its blocks changed, phase 1 + 2, {n} rounds with the order rotated (medians).\n")
print("| | embedded (`--home`) | served (`--server`, hosts driven by the server) | server + one agent per site | served ÷ embedded | agents ÷ embedded |")
print("|---|---|---|---|---|---|")
print(f"| time | {med(emb, 0):.2f} s | {med(srv, 0):.2f} s | {med(agt, 0):.2f} s | **{r_srv:.2f}×** | **{r_agt:.2f}×** |")
for i, name in [(1, "bytes read"), (2, "bytes transferred"), (3, "bytes written")]:
    print(f"| {name} | {b(med(emb, i))} | {b(med(srv, i))} | {b(med(agt, i))} | {cmp(srv, i)} | {cmp(agt, i)} |")
print(f"| each round (s) | {' / '.join(f'{x[0]:.2f}' for x in emb)} | {' / '.join(f'{x[0]:.2f}' for x in srv)} | {' / '.join(f'{x[0]:.2f}' for x in agt)} | | |")
print()
ok_srv = r_srv <= 1.15 and same(srv, 2) and same(srv, 3)
ok_agt = r_agt <= 1.15 and same(agt, 2) and same(agt, 3)
print(f"Target ≤ 1.15× the embedded time with the same bytes transferred and written: served **{'PASS' if ok_srv else 'FAIL'}**, through agents **{'PASS' if ok_agt else 'FAIL'}**.")
print()
print("Bytes read may differ through agents: the recovery agent reads its disk into the store and the primary agent")
print("writes from the store, where embedded mode compares the two disks in one pass and then stores the delta.")
EOF
cat "$RESULTS"
if [ "$update_docs" -eq 1 ]; then
    python3 "$HELP" splice-docs "$ROOT/docs/benchmarks.md" "$RESULTS" serve "Control plane: failback through ferry serve"
fi
ok=1
