#!/usr/bin/env bash
# Start, stop or check the local object-store servers ferry's store tests run against.
#
#   scripts/services.sh start [SERVICE...]    # Azurite (Azure Blob API) on 127.0.0.1:10000 and
#                                             # moto (S3 API) on 127.0.0.1:9000; waits until they answer
#   scripts/services.sh stop [SERVICE...]     # stop what `start` started (by PID)
#   scripts/services.sh status [SERVICE...]   # running / stopped per service (exit 1 if one is not up)
#   scripts/services.sh pause|resume SERVICE  # SIGSTOP / SIGCONT: a hung server that keeps its data
#   scripts/services.sh env                   # print the environment lines for the tests
#
# SERVICE is `azurite` or `s3` (default: both). Install them first with scripts/install-deps.sh.
# `start` exports nothing: it prints the environment to use (or `eval "$(scripts/services.sh env)"`).
#
# Settings (environment):
#   FERRY_SERVICES_DIR   PID, log (and data) files; default /tmp/ferry-services. A second set
#                        of servers (e.g. for a fault test that stops its server) needs its own
#                        directory and ports.
#   FERRY_AZURITE_PORT   default 10000      FERRY_S3_PORT   default 9000
#   FERRY_AZURITE_DISK=1 Azurite keeps blobs in FERRY_SERVICES_DIR/azurite-data, so they survive
#                        stop + start (default: in memory; a restart empties it). moto is always in
#                        memory: to make it unreachable without losing data, pause/resume it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${FERRY_SERVICES_DIR:-/tmp/ferry-services}"
AZURITE_BIN="$ROOT/.ci/node/node_modules/.bin/azurite-blob"
AZURITE_HOST=127.0.0.1
AZURITE_PORT="${FERRY_AZURITE_PORT:-10000}"
S3_HOST=127.0.0.1
S3_PORT="${FERRY_S3_PORT:-9000}"
READY_TIMEOUT="${FERRY_SERVICES_READY_TIMEOUT:-30}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

env_lines() {
    local azurite_url=""
    [ "$AZURITE_PORT" = 10000 ] || azurite_url="export AZURITE_BLOB_STORAGE_URL=http://$AZURITE_HOST:$AZURITE_PORT
"
    cat <<EOF
export AZURE_STORAGE_USE_EMULATOR=true
${azurite_url}export AWS_ENDPOINT_URL=http://$S3_HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
EOF
}

pid_file() { echo "$RUN_DIR/$1.pid"; }

# running NAME : is the service's recorded PID alive?
running() {
    local f pid
    f="$(pid_file "$1")"
    [ -f "$f" ] || return 1
    pid="$(cat "$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# answers URL : does anything answer HTTP there (any status, e.g. Azurite's 403)?
answers() {
    local code
    code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true)"
    [ -n "$code" ] && [ "$code" != "000" ]
}

# wait_ready NAME URL : poll until URL answers; fail (with the log's tail) if the process dies
# or READY_TIMEOUT passes.
wait_ready() {
    local name="$1" url="$2" start
    start=$(date +%s)
    until answers "$url"; do
        if ! running "$name"; then
            tail -n 20 "$RUN_DIR/$name.log" >&2 || true
            die "$name exited during start-up (log: $RUN_DIR/$name.log)"
        fi
        if [ $(($(date +%s) - start)) -ge "$READY_TIMEOUT" ]; then
            tail -n 20 "$RUN_DIR/$name.log" >&2 || true
            die "$name did not answer at $url within ${READY_TIMEOUT}s (log: $RUN_DIR/$name.log)"
        fi
        sleep 0.2
    done
    log "$name ready at $url ($(($(date +%s) - start))s)"
}

# launch NAME CMD... : start CMD detached in its own session, record its PID.
launch() {
    local name="$1"
    shift
    mkdir -p "$RUN_DIR"
    # setsid: own process group, so `stop` can end the service and its children together
    # without touching anything else. Run from RUN_DIR so nothing is written into the tree.
    (cd "$RUN_DIR" && exec setsid "$@" </dev/null >"$RUN_DIR/$name.log" 2>&1) &
    echo $! >"$(pid_file "$name")"
}

port_busy() {
    answers "http://$1:$2/"
}

start_azurite() {
    if running azurite; then
        log "azurite already running (pid $(cat "$(pid_file azurite)"))"
        return
    fi
    [ -x "$AZURITE_BIN" ] || die "azurite not installed at $AZURITE_BIN: run scripts/install-deps.sh"
    port_busy "$AZURITE_HOST" "$AZURITE_PORT" &&
        die "something else already answers on $AZURITE_HOST:$AZURITE_PORT; stop it first"
    local storage=(--inMemoryPersistence)
    if [ "${FERRY_AZURITE_DISK:-0}" = 1 ]; then
        mkdir -p "$RUN_DIR/azurite-data"
        storage=(--location "$RUN_DIR/azurite-data")
    fi
    launch azurite "$AZURITE_BIN" --silent --disableTelemetry "${storage[@]}" \
        --blobHost "$AZURITE_HOST" --blobPort "$AZURITE_PORT" --skipApiVersionCheck --loose
    wait_ready azurite "http://$AZURITE_HOST:$AZURITE_PORT/"
}

start_s3() {
    if running s3; then
        log "s3 (moto) already running (pid $(cat "$(pid_file s3)"))"
        return
    fi
    command -v moto_server >/dev/null 2>&1 || die "moto_server not found: run scripts/install-deps.sh"
    port_busy "$S3_HOST" "$S3_PORT" &&
        die "something else already answers on $S3_HOST:$S3_PORT; stop it first"
    launch s3 moto_server -H "$S3_HOST" -p "$S3_PORT"
    wait_ready s3 "http://$S3_HOST:$S3_PORT/"
}

# stop_one NAME : TERM the recorded process group, then KILL it if it lingers.
stop_one() {
    local name="$1" f pid i
    f="$(pid_file "$name")"
    if [ ! -f "$f" ]; then
        log "$name not running"
        return
    fi
    pid="$(cat "$f")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        # The PID leads its own session (setsid), so -PID is exactly the service's group.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        kill -CONT -- "-$pid" 2>/dev/null || true # a paused service acts on TERM only when resumed
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name stopped (pid $pid)"
    else
        log "$name not running (stale pid file)"
    fi
    rm -f "$f"
}

# signal_one NAME SIG : send SIG to the service's process group.
signal_one() {
    local name="$1" sig="$2"
    running "$name" || die "$name is not running"
    kill "-$sig" -- "-$(cat "$(pid_file "$name")")"
    log "$name: sent SIG$sig"
}

status_one() {
    local name="$1" url="$2"
    if running "$name"; then
        if answers "$url"; then
            echo "$name: running (pid $(cat "$(pid_file "$name")"), $url)"
        else
            echo "$name: running (pid $(cat "$(pid_file "$name")")) but not answering at $url"
            return 1
        fi
    else
        echo "$name: stopped"
        return 1
    fi
}

services_from_args() {
    if [ "$#" -eq 0 ]; then
        echo "azurite s3"
        return
    fi
    local s
    for s in "$@"; do
        case "$s" in
            azurite | s3) ;;
            *) die "unknown service '$s' (azurite | s3)" ;;
        esac
    done
    echo "$@"
}

cmd="${1:-}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
    start)
        for s in $(services_from_args "$@"); do "start_$s"; done
        echo "# environment for ferry's store tests:"
        env_lines
        ;;
    stop)
        for s in $(services_from_args "$@"); do stop_one "$s"; done
        ;;
    status)
        rc=0
        for s in $(services_from_args "$@"); do
            case "$s" in
                azurite) status_one azurite "http://$AZURITE_HOST:$AZURITE_PORT/" || rc=1 ;;
                s3) status_one s3 "http://$S3_HOST:$S3_PORT/" || rc=1 ;;
            esac
        done
        exit "$rc"
        ;;
    pause | resume)
        [ "$#" -ge 1 ] || die "usage: $0 $cmd SERVICE..."
        sig=STOP
        [ "$cmd" = resume ] && sig=CONT
        for s in $(services_from_args "$@"); do signal_one "$s" "$sig"; done
        ;;
    env)
        env_lines
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
