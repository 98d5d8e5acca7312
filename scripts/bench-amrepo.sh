#!/usr/bin/env bash
# W1 with automerge-repo's own client: cold `find()` of N documents that already exist on the
# server, for N in 1,000 and 10,000, against
#   reference  automerge-repo's sync server (bench/amrepo/server.mjs: Repo + NodeFSStorageAdapter
#              + WebSocketServerAdapter on ws, as @automerge/automerge-repo-sync-server does)
#   weft       `weft serve` ($WEFT_BIN, default target/release/weft), client URL ws://ADDR/automerge;
#              skipped ("weft: skipped (no /automerge endpoint)") while the relay answers that
#              path with 404, or when the binary is missing. This script never builds it.
# Per kind and N: a fresh server; a seeding client (bench/amrepo/driver.mjs seed, automerge-repo
# 2.x, no storage) creates N todo documents {title, done, n} and waits until the server's heads
# equal its own for every one; the server is stopped (SIGTERM: the reference server writes every
# document to disk first) and the seeded data directory kept. Then RUNS times: a copy of that
# directory, a new server process on it (cold: nothing loaded; the OS page cache is warm), a
# fresh client repo (no storage) that find()s all N URLs at once and waits until all are ready.
# Also printed: the client's CPU seconds, and how many find()s ended unavailable.
# Measured: the client's wall time (Repo construction to the last ready handle), the server
# process's peak RSS (VmHWM of /proc/PID/status, the whole process life) and its CPU seconds
# during the find (utime+stime of /proc/PID/stat, after minus before). Median (min–max).
# Everything runs on 127.0.0.1 in a temporary directory that is removed on exit; every wait is
# bounded. Not part of CI; needs node and npm (installs bench/amrepo's packages on first use).
#
# Knobs (environment): AMREPO_BENCH_NS ("1000 10000"), AMREPO_BENCH_RUNS (3),
# AMREPO_BENCH_KINDS ("reference weft"), WEFT_BIN, AMREPO_BENCH_TIMEOUT (seconds per seed or
# find, 900), AMREPO_BENCH_CONCURRENCY (find()s in flight; 0, the default: all at once).
# A find() that automerge-repo gives up on (a handle not ready 60 s after its find() began is
# unavailable) is counted in "unavailable", not retried.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

NS=${AMREPO_BENCH_NS:-"1000 10000"}
RUNS=${AMREPO_BENCH_RUNS:-3}
KINDS=${AMREPO_BENCH_KINDS:-"reference weft"}
WEFT_BIN=${WEFT_BIN:-$ROOT/target/release/weft}
TIMEOUT=${AMREPO_BENCH_TIMEOUT:-900}
CONCURRENCY=${AMREPO_BENCH_CONCURRENCY:-0}
BENCH=$ROOT/bench/amrepo

step() { printf '\n==> %s  (%ss so far)\n' "$*" "$SECONDS" >&2; }
die() {
    echo "error: $*" >&2
    exit 1
}
command -v node >/dev/null || die "node is needed"
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

if [[ ! -d $BENCH/node_modules/@automerge/automerge-repo ]]; then
    step "npm ci in bench/amrepo"
    # npm ci refuses this lock on some npm versions (cbor-x's optional native packages for other
    # platforms "missing"); npm install with the same lock installs the same versions.
    (cd "$BENCH" && { timeout 600 npm ci --no-audit --no-fund >&2 ||
        timeout 600 npm install --no-audit --no-fund >&2; })
fi

T=$(mktemp -d -t weft-amrepo-XXXXXX)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    [[ -f $T/last-find.json ]] && cp "$T/last-find.json" /tmp/bench-amrepo-last-find.json
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server KIND DATA_DIR: sets SERVER_PID and URL (the client's URL).
start_server() {
    local kind=$1 data=$2 out=$2.out
    if [[ $kind == reference ]]; then
        DATA_DIR=$data PORT=0 node "$BENCH/server.mjs" >"$out" 2>"$data.log" &
    else
        "$WEFT_BIN" serve --listen 127.0.0.1:0 --data "$data" >"$out" 2>"$data.log" &
    fi
    SERVER_PID=$!
    for _ in $(seq 300); do
        grep -q 'listening on ws://' "$out" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "the $kind server exited: $(cat "$data.log")"
        sleep 0.1
    done
    local addr
    addr=$(awk '/listening on ws:\/\//{print $NF; exit}' "$out")
    [[ $addr == ws://127.0.0.1:* ]] || die "no address from the $kind server: $(cat "$out")"
    addr=${addr#ws://}
    addr=${addr%%/*}
    if [[ $kind == reference ]]; then URL=ws://$addr; else URL=ws://$addr/automerge; fi
}

# stop_server: SIGTERM, then SIGKILL after 90 s (the reference server flushes to disk first).
stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 900); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
hwm_mb() { awk '/^VmHWM:/{printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# The JSON comes on stdin: a result with every id is too long for an argument.
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2" <<<"$1"; }
stats() {
    python3 -c '
import sys, statistics
v = [float(x) for x in sys.argv[1:]]
fmt = lambda x: ("%.2f" % x).rstrip("0").rstrip(".")
print("%s (%s–%s)" % (fmt(statistics.median(v)), fmt(min(v)), fmt(max(v))) if len(v) > 1 else fmt(v[0]))' "$@"
}

# Is the weft side measurable?
weft_ok() {
    [[ -x $WEFT_BIN ]] || {
        echo "weft: skipped ($WEFT_BIN not found; this script does not build it)"
        return 1
    }
    start_server weft "$T/probe"
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
        -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
        -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "http://${URL#ws://}" || true)
    stop_server
    if [[ $code == 404 ]]; then
        echo "weft: skipped (no /automerge endpoint)"
        return 1
    fi
}

step "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), node $(node --version), load average $(cut -d' ' -f1-3 /proc/loadavg)"
ROWS=()
for kind in $KINDS; do
    if [[ $kind == weft ]] && ! weft_ok; then
        ROWS+=("| weft | $NS | skipped | | | | | |")
        continue
    fi
    for n in $NS; do
        seeded=$T/$kind-$n
        step "$kind N=$n: seed"
        start_server "$kind" "$seeded"
        seed=$(timeout "$((TIMEOUT + 30))" node "$BENCH/driver.mjs" seed "$URL" "$n" "$T/ids-$kind-$n" --timeout "$TIMEOUT") ||
            die "seeding $kind N=$n failed"
        echo "seed: $seed" >&2
        stop_server
        if [[ $kind == reference ]]; then
            stored=$(find "$seeded" -mindepth 2 -maxdepth 2 -type d | wc -l)
            ((stored >= n)) || die "the reference server stored $stored of $n documents"
        fi
        walls=() rss=() cpu=() ccpu=() unav=() lastok=()
        for run in $(seq "$RUNS"); do
            step "$kind N=$n: cold find, run $run/$RUNS"
            rm -rf "$T/run"
            cp -a "$seeded" "$T/run"
            start_server "$kind" "$T/run"
            cpu0=$(cpu_s "$SERVER_PID")
            res=$(timeout "$((TIMEOUT + 30))" node "$BENCH/driver.mjs" find "$URL" "$T/ids-$kind-$n" \
                --concurrency "$CONCURRENCY" --timeout "$TIMEOUT") ||
                die "find $kind N=$n failed"
            cpu1=$(cpu_s "$SERVER_PID")
            hwm=$(hwm_mb "$SERVER_PID")
            stop_server
            printf "%s" "$res" >"$T/last-find.json"
            wall=$(json_field "$res" wallS)
            echo "find: $res; server peak RSS $hwm MB, CPU $cpu0 -> $cpu1 s" >&2
            walls+=("$wall") rss+=("$hwm") cpu+=("$(python3 -c "print($cpu1 - $cpu0)")")
            ccpu+=("$(json_field "$res" clientCpuS)") unav+=("$(json_field "$res" unavailable)")
            lastok+=("$(json_field "$res" lastReadyS)")
        done
        ROWS+=("| $kind | $n | $(stats "${walls[@]}") | $(stats "${rss[@]}") | $(stats "${cpu[@]}") | $(stats "${ccpu[@]}") | ${unav[*]} | $(stats "${lastok[@]}") |")
    done
done

echo
echo "find() concurrency: ${CONCURRENCY/#0/all at once}"
echo "| server | N | cold find() wall, s | server peak RSS, MB | server CPU during find, s | client CPU, s | unavailable per run | last ready find(), s |"
echo "|---|---:|---:|---:|---:|---:|---|---:|"
printf '%s\n' "${ROWS[@]}"
