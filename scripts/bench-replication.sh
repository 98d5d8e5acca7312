#!/usr/bin/env bash
# Replication benchmarks against the release binary, relay and clients on 127.0.0.1 only:
#   W1  cold sync of N documents into a fresh replica (N = 1,000 and 10,000; median of 3 runs)
#   W2  the same replica syncs again (warm reconnect, nothing to do)
#   W3  live fan-out: `weft bench fanout`, one writer, 50 (and 10) receivers, 500 edits at 100/s
#       (and 50 receivers at 20/s) on a fresh relay; then 10 receivers at 20/s on the relay that
#       holds 10,000 documents (every receiver cold-syncs them first)
#   mem relay memory holding 10,000 documents, before and with 1,000 idle sessions
#       (`weft bench idle`)
# Prints a results table at the end. Everything happens in a temporary directory that is removed
# on exit, with every background process stopped. Not part of CI (scripts/test.sh).
#
# Knobs (environment): WEFT_BENCH_RUNS (3), WEFT_BENCH_SIZES ("1000 10000"),
# WEFT_BENCH_IDLE_CLIENTS (1000), WEFT_BENCH_IDLE_HOLD (30 s), WEFT_BENCH_SKIP_BUILD=1 (use
# target/release/weft as is).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${WEFT_BENCH_RUNS:-3}
SIZES=${WEFT_BENCH_SIZES:-"1000 10000"}
IDLE_CLIENTS=${WEFT_BENCH_IDLE_CLIENTS:-1000}
IDLE_HOLD=${WEFT_BENCH_IDLE_HOLD:-30} # seconds the idle sessions stay connected after measuring
SYNC_TIMEOUT=120 # seconds, per `sync --once`

step() { printf '\n==> %s  (%ss so far)\n' "$*" "$SECONDS" >&2; }
die() {
    echo "error: $*" >&2
    exit 1
}

if [[ -z ${WEFT_BENCH_SKIP_BUILD:-} ]]; then
    step "cargo build --release"
    cargo build --release
fi
W=$PWD/target/release/weft
[[ -x $W ]] || die "$W not found"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed"
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

# The relay and the idle generator each hold one socket per session.
ulimit -n 20000 2>/dev/null || true
if (($(ulimit -n) < IDLE_CLIENTS + 200)); then
    echo "warning: ulimit -n is $(ulimit -n); $IDLE_CLIENTS idle sessions may fail" >&2
fi

T=$(mktemp -d -t weft-bench-XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

RESULTS=$T/results.md
: >"$RESULTS"
result() { printf '%s\n' "$*" >>"$RESULTS"; }

# ----- helpers ----------------------------------------------------------------------------------

# start_relay DATA_DIR: starts `weft serve` on a free port; sets RELAY_PID, RELAY_URL, RELAY_HTTP.
start_relay() {
    local data=$1 out=$1.out
    rm -f "$out"
    "$W" serve --listen 127.0.0.1:0 --data "$data" >"$out" 2>"$data.log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    for _ in $(seq 100); do
        grep -q '^weft relay listening on ws://' "$out" 2>/dev/null && break
        kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited: $(cat "$data.log")"
        sleep 0.1
    done
    RELAY_URL=$(awk '/^weft relay listening on ws:\/\//{print $NF; exit}' "$out")
    [[ $RELAY_URL == ws://127.0.0.1:* ]] || die "no address from the relay: $(cat "$out")"
    RELAY_HTTP=http://${RELAY_URL#ws://}
}

# stop_relay: SIGTERM (graceful), then SIGKILL after 10 s.
stop_relay() {
    kill -TERM "$RELAY_PID" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$RELAY_PID" 2>/dev/null || true
    wait "$RELAY_PID" 2>/dev/null || true
    forget "$RELAY_PID"
}

# forget PID: a process that has been waited for is no longer cleaned up on exit.
forget() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ $pid == "$1" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# mem PID: "VmRSS VmHWM" in KB.
mem() {
    awk '/^VmRSS:/{r=$2} /^VmHWM:/{h=$2} END{print r, h}' "/proc/$1/status"
}

# cpu PID: user+system CPU seconds so far.
cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / hz}' "/proc/$1/stat"
}

# metric NAME: a counter from the relay's /metrics.
metric() {
    curl -s --max-time 5 "$RELAY_HTTP/metrics" | awk -v n="$1" '$1 == n {print $2}'
}

mb() { awk -v k="$1" 'BEGIN{printf "%.1f", k / 1024}'; }

# stats V...: "median (min–max)"; 0 (below GNU time's 10 ms resolution) shows as <0.01.
stats() {
    python3 -c '
import sys, statistics
v = [float(x) for x in sys.argv[1:]]
fmt = lambda x: ("%.3f" % x).rstrip("0").rstrip(".") if x else "<0.01"
print("%s (%s–%s)" % (fmt(statistics.median(v)), fmt(min(v)), fmt(max(v))))' "$@"
}

gen_docs() {
    python3 -c "import json
for i in range($1): print(json.dumps({'title':'todo %d'%i,'n':i,'f':i*0.5,'done':i%2==0,'tags':['a','b']}))"
}

# timed OUT_PREFIX CMD...: runs CMD under GNU time; sets T_WALL (s), T_RSS (KB); stderr in
# OUT_PREFIX.err. Fails the script if CMD fails.
timed() {
    local prefix=$1
    shift
    if ! /usr/bin/time -f "%e %M" -o "$prefix.time" "$@" 2>"$prefix.err"; then
        cat "$prefix.err" >&2
        die "failed: $*"
    fi
    read -r T_WALL T_RSS <"$prefix.time"
}

# ----- W1 cold sync, W2 warm reconnect ----------------------------------------------------------

result "## W1 cold sync (fresh replica, \`sync --once\`; median (min–max) of $RUNS runs)"
result ""
result "| N | W1 wall s | W1 client peak RSS MB | relay VmRSS / VmHWM after W1, MB | push seed -> empty relay s |"
result "|---:|---:|---:|---:|---:|"
W2_ROWS=()
LAST_FRESH=
LAST_DATA=
for n in $SIZES; do
    step "W1/W2 with N=$n: import, fresh relay, push"
    dir=$T/n$n
    mkdir -p "$dir"
    gen_docs "$n" >"$dir/docs.ndjson"
    timeout 300 "$W" --db "$dir/seed.db" import "$dir/docs.ndjson" -c todos 2>"$dir/import.err" ||
        die "import failed: $(cat "$dir/import.err")"
    start_relay "$dir/relay"
    timed "$dir/push" "$W" --db "$dir/seed.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
    push_wall=$T_WALL
    # The relay's memory is measured per N from here: the push also went through it, so restart
    # it fresh on the same data before the cold syncs.
    stop_relay
    start_relay "$dir/relay"
    walls=() rsss=()
    for run in $(seq "$RUNS"); do
        step "W1 N=$n run $run"
        timed "$dir/w1-$run" "$W" --db "$dir/fresh-$run.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        walls+=("$T_WALL")
        rsss+=("$(mb "$T_RSS")")
        echo "  $(cat "$dir/w1-$run.err")  [$T_WALL s, $T_RSS KB]" >&2
    done
    read -r rss hwm < <(mem "$RELAY_PID")
    result "| $n | $(stats "${walls[@]}") | $(stats "${rsss[@]}") | $(mb "$rss") / $(mb "$hwm") | $push_wall |"

    # W2: the last fresh replica, now in sync, syncs again.
    w2walls=()
    for run in $(seq "$RUNS"); do
        step "W2 N=$n run $run"
        f_in=$(metric weft_frames_in_total) f_out=$(metric weft_frames_out_total)
        b_in=$(metric weft_bytes_in_total) b_out=$(metric weft_bytes_out_total)
        timed "$dir/w2-$run" "$W" --db "$dir/fresh-$RUNS.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        w2walls+=("$T_WALL")
        f_in=$(($(metric weft_frames_in_total) - f_in)) f_out=$(($(metric weft_frames_out_total) - f_out))
        b_in=$(($(metric weft_bytes_in_total) - b_in)) b_out=$(($(metric weft_bytes_out_total) - b_out))
        w2line=$(tr '\n' ' ' <"$dir/w2-$run.err")
        echo "  $w2line [$T_WALL s; relay frames in/out $f_in/$f_out, bytes in/out $b_in/$b_out]" >&2
    done
    W2_ROWS+=("| $n | $(stats "${w2walls[@]}") | $f_in / $f_out | $b_in / $b_out | \`${w2line% }\` |")
    stop_relay
    LAST_FRESH=$dir/fresh-$RUNS.db
    LAST_DATA=$dir/relay
done
result ""
result "## W2 warm reconnect (the synced replica syncs again; frames and bytes as the relay counts them, last run)"
result ""
result "| N | W2 wall s | frames in / out | bytes in / out | \`sync --once\` summary line (verbatim) |"
result "|---:|---:|---:|---:|---|"
for row in "${W2_ROWS[@]}"; do result "$row"; done

# ----- W3 live fan-out --------------------------------------------------------------------------

result ""
result "## W3 live fan-out (\`weft bench fanout\`, fresh relay per run; writer + receivers in one process)"
# fanout CLIENTS CHANGES RATE LABEL: one `weft bench fanout` against the running relay, with the
# relay's CPU time and memory; its output goes into the results.
fanout() {
    local clients=$1 changes=$2 rate=$3 label=$4 status=0 before relay_cpu rss hwm
    local b_wall b_user b_sys b_rss out=$T/fanout-$clients-$rate-$RELAY_PID
    before=$(cpu "$RELAY_PID")
    /usr/bin/time -f "%e %U %S %M" -o "$out.time" timeout 600 "$W" bench fanout --server "$RELAY_URL" \
        --clients "$clients" --changes "$changes" --rate "$rate" --dir "$T" >"$out.stdout" 2>"$out.err" || status=$?
    relay_cpu=$(awk -v a="$before" -v b="$(cpu "$RELAY_PID")" 'BEGIN{printf "%.2f", b - a}')
    read -r rss hwm < <(mem "$RELAY_PID")
    read -r b_wall b_user b_sys b_rss <"$out.time" || true
    result ""
    result "\`weft bench fanout --clients $clients --changes $changes --rate $rate\` $label (exit status $status):"
    result '```'
    while IFS= read -r line; do result "$line"; done <"$out.stdout"
    result "  cpu: relay ${relay_cpu} s; bench process ${b_user:-?} s user + ${b_sys:-?} s sys in ${b_wall:-?} s wall (2 cores)"
    result "  relay VmRSS / VmHWM after: $(mb "$rss") / $(mb "$hwm") MB; relay frames in/out since it started: $(metric weft_frames_in_total)/$(metric weft_frames_out_total)"
    result '```'
    if ((status != 0)); then
        echo "W3 run failed; its stderr:" >&2
        cat "$out.err" >&2
    fi
}

for spec in "50 500 100" "10 500 100" "50 500 20"; do
    read -r clients changes rate <<<"$spec"
    step "W3: $clients clients, $changes changes at $rate/s"
    start_relay "$T/w3-$clients-$rate"
    fanout "$clients" "$changes" "$rate" "on a fresh relay"
    stop_relay
done

# ----- relay memory with idle sessions ----------------------------------------------------------

if [[ -n $LAST_FRESH ]]; then
    n=${SIZES##* }
    step "relay memory: $n documents, $IDLE_CLIENTS idle sessions"
    # A fresh relay process on the data of the largest N (opening loads no document).
    start_relay "$LAST_DATA"
    sleep 1
    read -r rss0 hwm0 < <(mem "$RELAY_PID")
    idle_out=$T/idle.out
    "$W" bench idle --server "$RELAY_URL" --clients "$IDLE_CLIENTS" --from "$LAST_FRESH" --hold 600 \
        >"$idle_out" 2>"$T/idle.err" &
    IDLE_PID=$!
    PIDS+=("$IDLE_PID")
    for _ in $(seq 1200); do
        grep -q 'sessions connected and in sync' "$idle_out" 2>/dev/null && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    sleep 2 # let the relay settle
    connected=$(metric weft_connections)
    read -r rss1 hwm1 < <(mem "$RELAY_PID")
    # Stay idle a while longer: does the relay keep idle sessions, and does their memory hold?
    sleep "$IDLE_HOLD"
    connected_later=$(metric weft_connections)
    read -r rss1b hwm1b < <(mem "$RELAY_PID")
    kill -TERM "$IDLE_PID" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    wait "$IDLE_PID" 2>/dev/null || true
    forget "$IDLE_PID"
    sleep 1
    read -r rss2 hwm2 < <(mem "$RELAY_PID")
    per_client=$(awk -v a="$rss0" -v b="$rss1" -v c="$IDLE_CLIENTS" 'BEGIN{printf "%.0f", (b - a) / c}')
    result ""
    result "## Relay memory: $n documents, $IDLE_CLIENTS idle sessions (\`weft bench idle\`)"
    result ""
    result "| | VmRSS MB | VmHWM MB |"
    result "|---|---:|---:|"
    result "| fresh relay, before clients | $(mb "$rss0") | $(mb "$hwm0") |"
    result "| $connected sessions connected, in sync, idle (2 s after the last got in sync) | $(mb "$rss1") | $(mb "$hwm1") |"
    result "| $connected_later sessions still connected ${IDLE_HOLD} s later | $(mb "$rss1b") | $(mb "$hwm1b") |"
    result "| after they disconnected | $(mb "$rss2") | $(mb "$hwm2") |"
    result ""
    result "Per session: $per_client KB (VmRSS with sessions − before, / $IDLE_CLIENTS). \`weft bench idle\` said:"
    result '```'
    while IFS= read -r line; do result "$line"; done <"$idle_out"
    result '```'

    # Last, as it adds a document to the relay: live fan-out where the relay (and every receiver)
    # holds N documents in scope.
    step "W3 on the relay holding $n documents: 10 clients, 200 changes at 20/s"
    result ""
    result "## W3 on the relay holding $n documents (receivers cold-sync them first; scope: all)"
    fanout 10 200 20 "on the relay holding $n documents"
    stop_relay
fi

step "done"
echo
echo "# Replication benchmarks ($(date -u +%Y-%m-%d), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo
cat "$RESULTS"
