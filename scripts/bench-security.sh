#!/usr/bin/env bash
# What security costs, measured in one run against the release binary on 127.0.0.1 only: the
# same workloads on a relay without auth (plain ws://), with tokens (ws://), and with tokens and
# TLS (wss://, a self-signed certificate made with openssl):
#   W1  cold sync of N documents into a fresh replica (`sync --once`), median of RUNS runs
#   W3  live fan-out, `weft bench fanout` with 10 receivers, 500 edits at 100/s
#   hs  1,000 sessions opening at once (`weft bench idle`; ws:// only, it speaks raw frames)
# Prints a results table. Not part of CI. Knobs: WEFT_BENCH_RUNS (3), WEFT_BENCH_N (10000),
# WEFT_BENCH_MODES ("plain token tls": the order they run in), WEFT_BENCH_SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${WEFT_BENCH_RUNS:-3}
N=${WEFT_BENCH_N:-10000}

die() {
    echo "error: $*" >&2
    exit 1
}
step() { printf '\n==> %s  (%ss so far)\n' "$*" "$SECONDS" >&2; }

if [[ -z ${WEFT_BENCH_SKIP_BUILD:-} ]]; then
    step "cargo build --release"
    cargo build --release
fi
W=$PWD/target/release/weft
for tool in openssl python3 /usr/bin/time; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
ulimit -n 20000 2>/dev/null || true

T=$(mktemp -d -t weft-bench-sec-XXXXXX)
RELAY_PID=
cleanup() {
    [[ -n $RELAY_PID ]] && kill -KILL "$RELAY_PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() {
    python3 -c 'import sys, statistics; print("%.3f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}

# start_relay DATA MODE: MODE is plain, token or tls; sets RELAY_PID and URL.
start_relay() {
    local data=$1 mode=$2 args=()
    case $mode in
    token) args=(--auth-secret-file "$T/secret") ;;
    tls) args=(--auth-secret-file "$T/secret" --tls-cert "$T/cert.pem" --tls-key "$T/key.pem") ;;
    esac
    "$W" serve --listen 127.0.0.1:0 --data "$data" "${args[@]}" >"$data.out" 2>"$data.log" &
    RELAY_PID=$!
    for _ in $(seq 100); do
        grep -q '^weft relay listening on' "$data.out" 2>/dev/null && break
        kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited: $(cat "$data.log")"
        sleep 0.1
    done
    URL=$(awk '/^weft relay listening on/{print $NF; exit}' "$data.out")
    [[ -n $URL ]] || die "no address from the relay"
    [[ $mode == tls ]] && URL=${URL/127.0.0.1/localhost}
    return 0
}

stop_relay() {
    kill -TERM "$RELAY_PID" 2>/dev/null || true
    wait "$RELAY_PID" 2>/dev/null || true
    RELAY_PID=
}

# client_args MODE: the token and CA options for that mode.
client_args() {
    case $1 in
    plain) ;;
    token) echo "--token $TOKEN" ;;
    tls) echo "--token $TOKEN --ca-file $T/cert.pem" ;;
    esac
}

step "secret, token, self-signed certificate for localhost"
head -c 48 /dev/urandom | base64 >"$T/secret"
TOKEN=$("$W" token issue --secret-file "$T/secret" --sub bench --read '*' --write '*' --ttl 1h)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE \
    -keyout "$T/key.pem" -out "$T/cert.pem" 2>/dev/null

step "seed: $N documents"
python3 -c "import json
for i in range($N): print(json.dumps({'title':'todo %d'%i,'n':i,'done':i%2==0}))" >"$T/docs.ndjson"
"$W" --db "$T/seed.db" import "$T/docs.ndjson" -c todos 2>/dev/null
start_relay "$T/relay" plain
"$W" --db "$T/seed.db" sync --server "$URL" --once 2>/dev/null
stop_relay

declare -A W1 W3 HS
for mode in ${WEFT_BENCH_MODES:-plain token tls}; do
    start_relay "$T/relay" "$mode"
    walls=()
    for run in $(seq "$RUNS"); do
        step "W1 $mode run $run"
        # shellcheck disable=SC2046
        /usr/bin/time -f %e -o "$T/w1.time" "$W" --db "$T/fresh-$mode-$run.db" sync --server "$URL" \
            --once $(client_args "$mode") 2>"$T/w1.err" || die "W1 failed: $(cat "$T/w1.err")"
        walls+=("$(cat "$T/w1.time")")
        echo "  $(tail -1 "$T/w1.err") [$(cat "$T/w1.time") s]" >&2
    done
    W1[$mode]=$(median "${walls[@]}")
    if [[ $mode != tls ]]; then
        step "1,000 handshakes $mode"
        # shellcheck disable=SC2046
        "$W" bench idle --server "$URL" --clients 1000 --from "$T/fresh-$mode-1.db" --hold 0 \
            $(client_args "$mode") >"$T/hs.out" 2>"$T/hs.err" || die "idle failed: $(cat "$T/hs.err")"
        HS[$mode]=$(sed -n 's/^idle: //p' "$T/hs.out")
    fi
    step "W3 $mode"
    # shellcheck disable=SC2046
    "$W" bench fanout --server "$URL" --clients 10 --changes 500 --rate 100 --dir "$T" \
        $(client_args "$mode") >"$T/w3.out" 2>"$T/w3.err" || die "W3 failed: $(cat "$T/w3.err")"
    W3[$mode]=$(sed -n 's/^ *latency ms: \(.*\)  (over.*/\1 ms/p' "$T/w3.out" | tr -s ' ')
    stop_relay
done

echo
echo "## Security overhead ($N documents; $(nproc) cores; $(date -u +%F))"
echo
echo "| relay | W1 cold sync, median of $RUNS (s) | W3 10 receivers @ 100/s | 1,000 sessions opening |"
echo "|---|---:|---|---|"
echo "| no auth, ws:// | ${W1[plain]} | ${W3[plain]} | ${HS[plain]} |"
echo "| tokens, ws:// | ${W1[token]} | ${W3[token]} | ${HS[token]} |"
echo "| tokens, wss:// | ${W1[tls]} | ${W3[tls]} | (not measured) |"
