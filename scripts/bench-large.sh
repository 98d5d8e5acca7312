#!/usr/bin/env bash
# Large documents as a user meets them, with the release binary, relay and clients on 127.0.0.1:
#   one   one 11 MB structured JSON document (50,000 records: strings, numbers, a boolean, a
#         nested object, short arrays; ~950,000 Automerge operations): `weft doc create`, then
#         `sync --once` pushes it to a fresh relay, then a fresh replica pulls it
#   many  42 MB in 8 documents of ~5 MB (23,000 such records each): `weft import`, push, pull
# Measured for every process: wall time and peak RSS (GNU time); for the relay its VmRSS 2 s
# after the push and after the pull (idle), and its VmHWM. Each run uses a fresh relay and fresh
# replicas; the table shows median (min–max) of the runs. Everything happens in a temporary
# directory that is removed on exit. Not part of CI (scripts/test.sh).
#
# Knobs (environment): WEFT_BENCH_RUNS (3), WEFT_BENCH_SKIP_BUILD=1 (use target/release/weft as
# is), WEFT_BENCH_BASELINE=/path/to/another/weft (measure that binary too, in the same run,
# alternating with this one: before/after comparisons).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${WEFT_BENCH_RUNS:-3}
SYNC_TIMEOUT=300 # seconds, per `sync --once`

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
BINARIES=("$W")
LABELS=("this build")
if [[ -n ${WEFT_BENCH_BASELINE:-} ]]; then
    [[ -x $WEFT_BENCH_BASELINE ]] || die "WEFT_BENCH_BASELINE=$WEFT_BENCH_BASELINE is not executable"
    BINARIES=("$WEFT_BENCH_BASELINE" "$W")
    LABELS=("baseline ($WEFT_BENCH_BASELINE)" "this build")
fi
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed"
command -v python3 >/dev/null || die "python3 is needed"

T=$(mktemp -d -t weft-large-XXXXXX)
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

# ----- helpers ----------------------------------------------------------------------------------

# start_relay BINARY DATA_DIR: starts `weft serve` on a free port; sets RELAY_PID, RELAY_URL.
start_relay() {
    local bin=$1 data=$2 out=$2.out
    "$bin" serve --listen 127.0.0.1:0 --data "$data" >"$out" 2>"$data.log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    for _ in $(seq 100); do
        grep -q '^weft relay listening on ws://' "$out" 2>/dev/null && break
        kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited: $(cat "$data.log")"
        sleep 0.1
    done
    RELAY_URL=$(awk '/^weft relay listening on ws:\/\//{print $NF; exit}' "$out")
    [[ $RELAY_URL == ws://127.0.0.1:* ]] || die "no address from the relay: $(cat "$out")"
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
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ $pid == "$RELAY_PID" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# mem PID: "VmRSS VmHWM" in KB.
mem() {
    awk '/^VmRSS:/{r=$2} /^VmHWM:/{h=$2} END{print r, h}' "/proc/$1/status"
}

mb() { awk -v k="$1" 'BEGIN{printf "%.0f", k / 1024}'; }

# stats V...: "median (min–max)".
stats() {
    python3 -c '
import sys, statistics
v = [float(x) for x in sys.argv[1:]]
fmt = lambda x: ("%.2f" % x).rstrip("0").rstrip(".")
print("%s (%s–%s)" % (fmt(statistics.median(v)), fmt(min(v)), fmt(max(v))) if len(v) > 1 else fmt(v[0]))' "$@"
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

# Values per binary index and metric: V[i,metric] = "v1 v2 ...".
declare -A V
record() { V["$1,$2"]+=" $3"; }

# ----- data -------------------------------------------------------------------------------------

step "generating the documents"
# records N SEED: one JSON object {"kind", "seed", "records": [N records]} on one line.
cat >"$T/gen.py" <<'EOF'
import json, random, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima"]
records = [{
    "id": i,
    "name": "%s %s %d" % (r.choice(words), r.choice(words), i),
    "email": "user%d@example.com" % i,
    "score": round(r.random() * 1000, 3),
    "active": r.random() < 0.5,
    "tags": [r.choice(words) for _ in range(r.randint(1, 4))],
    "address": {"city": r.choice(words).title() + "ville", "zip": "%05d" % r.randint(10000, 99999),
                "geo": [round(r.uniform(-90, 90), 5), round(r.uniform(-180, 180), 5)]},
    "history": [r.randint(0, 10000) for _ in range(r.randint(0, 5))],
} for i in range(n)]
print(json.dumps({"kind": "dataset", "seed": seed, "records": records}, separators=(",", ":")))
EOF
python3 "$T/gen.py" 50000 1 >"$T/one.json"
for seed in 11 12 13 14 15 16 17 18; do
    python3 "$T/gen.py" 23000 "$seed"
done >"$T/many.ndjson"
ONE_MB=$(awk -v b="$(stat -c %s "$T/one.json")" 'BEGIN{printf "%.1f", b / 1e6}')
MANY_MB=$(awk -v b="$(stat -c %s "$T/many.ndjson")" 'BEGIN{printf "%.1f", b / 1e6}')

# ----- runs -------------------------------------------------------------------------------------

for run in $(seq "$RUNS"); do
    for i in "${!BINARIES[@]}"; do
        bin=${BINARIES[$i]}
        dir=$T/r$run-b$i
        mkdir -p "$dir"

        step "run $run, ${LABELS[$i]}: one ${ONE_MB} MB document"
        start_relay "$bin" "$dir/relay-one"
        timed "$dir/create" "$bin" --db "$dir/one.db" doc create --json - <"$T/one.json"
        record "$i" one.make.wall "$T_WALL"
        record "$i" one.make.rss "$(mb "$T_RSS")"
        timed "$dir/push-one" "$bin" --db "$dir/one.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        record "$i" one.push.wall "$T_WALL"
        record "$i" one.push.rss "$(mb "$T_RSS")"
        sleep 2
        read -r rss _ < <(mem "$RELAY_PID")
        record "$i" one.relay.push "$(mb "$rss")"
        timed "$dir/pull-one" "$bin" --db "$dir/one-pulled.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        record "$i" one.pull.wall "$T_WALL"
        record "$i" one.pull.rss "$(mb "$T_RSS")"
        sleep 2
        read -r rss hwm < <(mem "$RELAY_PID")
        record "$i" one.relay.pull "$(mb "$rss")"
        record "$i" one.relay.hwm "$(mb "$hwm")"
        stop_relay

        step "run $run, ${LABELS[$i]}: ${MANY_MB} MB in 8 documents"
        start_relay "$bin" "$dir/relay-many"
        timed "$dir/import" "$bin" --db "$dir/many.db" import "$T/many.ndjson"
        record "$i" many.make.wall "$T_WALL"
        record "$i" many.make.rss "$(mb "$T_RSS")"
        timed "$dir/push-many" "$bin" --db "$dir/many.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        record "$i" many.push.wall "$T_WALL"
        record "$i" many.push.rss "$(mb "$T_RSS")"
        sleep 2
        read -r rss _ < <(mem "$RELAY_PID")
        record "$i" many.relay.push "$(mb "$rss")"
        timed "$dir/pull-many" "$bin" --db "$dir/many-pulled.db" sync --server "$RELAY_URL" --once --timeout "$SYNC_TIMEOUT"
        record "$i" many.pull.wall "$T_WALL"
        record "$i" many.pull.rss "$(mb "$T_RSS")"
        sleep 2
        read -r rss hwm < <(mem "$RELAY_PID")
        record "$i" many.relay.pull "$(mb "$rss")"
        record "$i" many.relay.hwm "$(mb "$hwm")"
        stop_relay
        rm -rf "$dir"
    done
done

# ----- results ----------------------------------------------------------------------------------

step "done"
echo
echo "# Large documents ($(date -u +%Y-%m-%d), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo
echo "Median (min–max) of $RUNS runs. one: one ${ONE_MB} MB document (\`doc create\`);"
echo "many: ${MANY_MB} MB in 8 documents (\`import\`). Each pushed to a fresh relay by"
echo "\`sync --once\`, then pulled by a fresh replica."
for i in "${!BINARIES[@]}"; do
    echo
    echo "## ${LABELS[$i]}"
    echo
    echo "| | one: wall s | one: peak RSS MB | many: wall s | many: peak RSS MB |"
    echo "|---|---:|---:|---:|---:|"
    for s in make push pull; do
        case $s in
        make) name='create / import' ;;
        push) name='push (client)' ;;
        pull) name='pull into a fresh replica (client)' ;;
        esac
        # shellcheck disable=SC2086
        echo "| $name | $(stats ${V[$i,one.$s.wall]}) | $(stats ${V[$i,one.$s.rss]}) | $(stats ${V[$i,many.$s.wall]}) | $(stats ${V[$i,many.$s.rss]}) |"
    done
    echo
    echo "| relay, MB | one | many |"
    echo "|---|---:|---:|"
    # shellcheck disable=SC2086
    {
        echo "| VmRSS 2 s after the push (idle) | $(stats ${V[$i,one.relay.push]}) | $(stats ${V[$i,many.relay.push]}) |"
        echo "| VmRSS 2 s after the pull (idle) | $(stats ${V[$i,one.relay.pull]}) | $(stats ${V[$i,many.relay.pull]}) |"
        echo "| VmHWM (peak) | $(stats ${V[$i,one.relay.hwm]}) | $(stats ${V[$i,many.relay.hwm]}) |"
    }
done
