#!/usr/bin/env bash
# Several relay nodes over PostgreSQL, next to the single SQLite relay, in one run (release
# binary, everything on 127.0.0.1):
#
#   sqlite  one relay, `weft serve --data DIR` (a fresh data directory per workload)
#   pg      two relays, `weft serve --store postgres://...` on two ports, sharing one database:
#           one private PostgreSQL cluster per script run (scripts/pg.sh, default settings but
#           pg_stat_statements loaded), a fresh database per workload
#
# Workloads (N = 10,000 five-field documents):
#   W1  a source replica (`weft import` of NDJSON) pushes N documents to node 1 (`sync --once`);
#       then fresh replicas cold-sync them from node 2 (sqlite: the same relay, restarted after
#       the push as in scripts/bench-replication.sh; pg: node 2 keeps running, it never held
#       them). Median of 3 fresh replicas.
#   W2  the last fresh replica syncs again from node 2 (warm reconnect). Median of 3.
#   W3  `weft bench fanout`: the writer on node 1, receivers round-robin on node 1 and node 2
#       (`--receivers-at` both), 500 edits at 100/s, with 10 and with 50 receivers; fresh relays
#       and database per run. sqlite: all on the one relay.
# For pg it also counts the SQL statements PostgreSQL ran per phase (pg_stat_statements) and the
# CPU time of the relays and of PostgreSQL's processes.
#
# Prints a results table at the end, with the machine and the weft commit. A temporary
# directory holds everything and is removed on exit; relays and PostgreSQL are stopped. Not part
# of CI (scripts/test.sh).
#
# Knobs (environment): WEFT_BENCH_RUNS (3: W1/W2 replicas and W3 repeats), WEFT_BENCH_N (10000),
# WEFT_BENCH_RECEIVERS ("10 50"), WEFT_BENCH_CHANGES (500), WEFT_BENCH_RATE (100),
# WEFT_BENCH_CONFIGS ("sqlite pg"), WEFT_BENCH_PG_STATEMENTS (1; 0: no pg_stat_statements),
# WEFT_BENCH_LIMIT (2400: seconds the whole script may take), WEFT_BENCH_SKIP_BUILD=1 (use
# target/release/weft as is).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${WEFT_BENCH_RUNS:-3}
N=${WEFT_BENCH_N:-10000}
RECEIVERS=${WEFT_BENCH_RECEIVERS:-"10 50"}
CHANGES=${WEFT_BENCH_CHANGES:-500}
RATE=${WEFT_BENCH_RATE:-100}
CONFIGS=${WEFT_BENCH_CONFIGS:-"sqlite pg"}
PG_STATEMENTS=${WEFT_BENCH_PG_STATEMENTS:-1}
LIMIT=${WEFT_BENCH_LIMIT:-2400}
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
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
W=$TARGET/release/weft
[[ -x $W ]] || die "$W not found"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed"
for tool in python3 curl psql; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    COMMIT="$COMMIT (+ uncommitted changes)"
fi

T=$(mktemp -d -t weft-bench-pg-XXXXXX)
# As root, PostgreSQL runs as user postgres (scripts/pg.sh), which must reach its directory.
chmod 755 "$T"
PIDS=()
PG_DIR=
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
    if [[ -n $PG_DIR ]]; then
        scripts/pg.sh stop "$PG_DIR" >/dev/null 2>&1 || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Bounded in time: the whole run ends after LIMIT seconds whatever happens (every command also
# has a timeout of its own).
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$LIMIT" &
    sleeper=$!
    wait "$sleeper"
    echo "error: the benchmark took more than $LIMIT s; stopping it" >&2
    kill -TERM $$
) &
PIDS+=("$!")

RESULTS=$T/results.md
DETAILS=$T/details.md
: >"$RESULTS"
: >"$DETAILS"
detail() { printf '%s\n' "$*" >>"$DETAILS"; }

# ----- helpers ----------------------------------------------------------------------------------

# start_relay NAME ARGS...: `weft serve --listen 127.0.0.1:0 ARGS...`; sets RELAY_PID and
# RELAY_URL (ws://), and remembers NAME's pid and url in NODE_PID[NAME], NODE_URL[NAME].
declare -A NODE_PID NODE_URL
start_relay() {
    local name=$1 out=$T/$1.out log=$T/$1.log
    shift
    rm -f "$out"
    "$W" serve --listen 127.0.0.1:0 "$@" >"$out" 2>"$log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    for _ in $(seq 300); do
        grep -q '^weft relay listening on ws://' "$out" 2>/dev/null && break
        kill -0 "$RELAY_PID" 2>/dev/null || die "relay $name exited: $(cat "$log")"
        sleep 0.1
    done
    RELAY_URL=$(awk '/^weft relay listening on ws:\/\//{print $NF; exit}' "$out")
    [[ $RELAY_URL == ws://127.0.0.1:* ]] || die "no address from relay $name: $(cat "$out" "$log")"
    NODE_PID[$name]=$RELAY_PID
    NODE_URL[$name]=$RELAY_URL
}

# stop_relay NAME: SIGTERM (graceful), then SIGKILL after 10 s.
stop_relay() {
    local pid=${NODE_PID[$1]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
    unset "NODE_PID[$1]" "NODE_URL[$1]"
}

stop_all_relays() {
    local name
    for name in "${!NODE_PID[@]}"; do stop_relay "$name"; done
}

# forget PID: a process that has been waited for is no longer cleaned up on exit.
forget() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ $pid == "$1" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# cpu PID...: user+system CPU seconds so far, summed.
cpu() {
    local pid total=0
    for pid in "$@"; do
        total=$(awk -v t="$total" -v hz="$(getconf CLK_TCK)" '{printf "%.2f", t + ($14 + $15) / hz}' \
            "/proc/$pid/stat" 2>/dev/null || echo "$total")
    done
    echo "$total"
}

# pg_cpu: CPU seconds of PostgreSQL's processes (the postmaster and its children) so far.
pg_cpu() {
    [[ -n $PG_DIR ]] || {
        echo 0
        return
    }
    local master
    master=$(head -1 "$PG_DIR/data/postmaster.pid")
    # shellcheck disable=SC2046
    cpu "$master" $(pgrep -P "$master" || true)
}

sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b - a}'; }

# snap: CPU seconds so far, "relays PostgreSQL machine-busy steal" (machine: all CPUs, from
# /proc/stat: user, nice and system time; interrupts, idle, iowait and steal not counted).
snap() {
    # shellcheck disable=SC2046
    echo "$(cpu $(relay_pids)) $(pg_cpu) $(awk -v hz="$(getconf CLK_TCK)" \
        '/^cpu /{printf "%.2f %.2f", ($2 + $3 + $4) / hz, $9 / hz}' /proc/stat)"
}

# cpu_delta "SNAP_BEFORE" "SNAP_AFTER" CLIENT_CPU: sets D_RELAY, D_PG, D_OTHER (CPU of every
# other process on the machine: another benchmark, say) and D_STEAL, in seconds.
cpu_delta() {
    local r0 p0 b0 s0 r1 p1 b1 s1
    read -r r0 p0 b0 s0 <<<"$1"
    read -r r1 p1 b1 s1 <<<"$2"
    D_RELAY=$(sub "$r0" "$r1") D_PG=$(sub "$p0" "$p1") D_STEAL=$(sub "$s0" "$s1")
    D_OTHER=$(awk -v b="$(sub "$b0" "$b1")" -v r="$D_RELAY" -v p="$D_PG" -v c="$3" \
        'BEGIN{o = b - r - p - c; printf "%.2f", o < 0 ? 0 : o}')
}

# busy_processes: processes that used more than 5% of a CPU over one second, as "name pid %".
busy_processes() {
    top -bn2 -d1 -w 200 | awk '/^top -/{n++} n == 2 && $1 ~ /^[0-9]+$/ && $9 + 0 > 5 {printf "%s(%s) %s%%; ", $12, $1, $9}'
}

# metric HTTP_BASE NAME: a counter from a relay's /metrics.
metric() {
    curl -s --max-time 5 "$1/metrics" | awk -v n="$2" '$1 == n {print $2}'
}
http_of() { echo "http://${1#ws://}"; }

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
    if ! /usr/bin/time -f "%e %M %U %S" -o "$prefix.time" "$@" 2>"$prefix.err"; then
        cat "$prefix.err" >&2
        die "failed: $*"
    fi
    local user sys
    read -r T_WALL T_RSS user sys <"$prefix.time"
    T_CPU=$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u + s}')
}

# ----- PostgreSQL -------------------------------------------------------------------------------

PG_URL=
psql_() { PGOPTIONS='-c client_min_messages=warning' psql "$PG_URL" -XAtq -v ON_ERROR_STOP=1 "$@"; }

pg_start() {
    PG_DIR=$T/pg
    step "PostgreSQL: a private cluster in $PG_DIR"
    PG_URL=$(scripts/pg.sh start "$PG_DIR")
    if [[ $PG_STATEMENTS == 1 ]]; then
        psql_ -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
        local port
        port=$(cat "$PG_DIR/port")
        scripts/pg.sh stop "$PG_DIR"
        PG_URL=$(scripts/pg.sh start "$PG_DIR" "$port")
        psql_ -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
    fi
    PG_VERSION=$(psql_ -c "SHOW server_version")
}

# pg_rtt: PostgreSQL's round trip here, "SELECT 1" over TCP from one client for 2 s (pgbench),
# in ms. On a VM whose idle vCPUs halt, this doubles when the machine is otherwise idle.
pg_rtt() {
    local bench
    bench=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)/pgbench
    [[ -x $bench ]] || {
        echo "?"
        return
    }
    echo "SELECT 1;" >"$T/select1.sql"
    "$bench" -n -M prepared -f "$T/select1.sql" -T 2 -c 1 "$PG_URL" 2>/dev/null |
        awk '/latency average/{print $4}'
}

# pg_db NAME: a fresh database; prints its URL.
pg_db() {
    psql_ -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
    echo "${PG_URL%/*}/$1"
}

# Statement counters (pg_stat_statements) of database DB.
pg_stmt_reset() { [[ $PG_STATEMENTS == 1 ]] && psql_ -c "SELECT pg_stat_statements_reset()" >/dev/null || true; }
pg_stmt_total() { # DB: statements run since the reset
    if [[ $PG_STATEMENTS == 1 ]]; then
        psql_ -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '$1'"
    else
        echo "?"
    fi
}
pg_stmt_top() { # DB LIMIT: the most frequent statements since the reset, as table rows
    [[ $PG_STATEMENTS == 1 ]] || return 0
    psql_ -F ' | ' -c "SELECT calls, round(total_exec_time::numeric, 1),
        left(regexp_replace(query, '\s+', ' ', 'g'), 110)
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '$1'
        ORDER BY calls DESC LIMIT $2" | sed 's/^/| /; s/$/ |/; s/`/'"'"'/g'
}

# ----- per configuration ------------------------------------------------------------------------

declare -A ROW # ROW[config:key] = value for the final table

# setup CONFIG TAG: fresh relay(s) for CONFIG; node1 and node2 (the same relay for sqlite);
# sets DB (pg: the database name) and NODE1, NODE2 (ws:// URLs).
setup() {
    local config=$1 tag=$2
    case $config in
    sqlite)
        DB=
        start_relay "$tag-relay" --data "$T/$tag-relay"
        NODE1=$RELAY_URL NODE2=$RELAY_URL
        ;;
    pg)
        DB=$tag
        local url
        url=$(pg_db "$DB")
        start_relay "$tag-node1" --data "$T/$tag-node1" --store "$url"
        NODE1=$RELAY_URL
        start_relay "$tag-node2" --data "$T/$tag-node2" --store "$url"
        NODE2=$RELAY_URL
        ;;
    esac
}

# relay_pids: the pids of the running relays.
relay_pids() { echo "${NODE_PID[@]}"; }

w1w2() {
    local config=$1 dir=$T/$1-w1 walls=() rsss=() w2walls=() stmts=() push_wall
    local label=$config
    mkdir -p "$dir"
    step "[$config] W1: import $N documents, push to node 1"
    timeout 300 "$W" --db "$dir/seed.db" import "$T/docs.ndjson" -c todos 2>"$dir/import.err" ||
        die "import failed: $(cat "$dir/import.err")"
    setup "$config" "${config}_w1"
    local a b s rtt=
    pg_stmt_reset
    a=$(snap)
    timed "$dir/push" timeout 300 "$W" --db "$dir/seed.db" sync --server "$NODE1" --once --timeout "$SYNC_TIMEOUT"
    push_wall=$T_WALL
    b=$(snap)
    cpu_delta "$a" "$b" "$T_CPU"
    s=$( [[ -n $DB ]] && pg_stmt_total "$DB" || echo "–")
    echo "  push: $(tr '\n' ' ' <"$dir/push.err") [$push_wall s; cpu: relay $D_RELAY s, pg $D_PG s, client $T_CPU s, other $D_OTHER s; $s statements]" >&2
    detail ""
    detail "### [$label] push of $N documents from the source replica to node 1"
    detail ""
    detail "$push_wall s wall; CPU: relay $D_RELAY s, client $T_CPU s$([[ -n $DB ]] && echo ", PostgreSQL $D_PG s"), other processes $D_OTHER s$([[ -n $DB ]] && echo "; $s SQL statements ($(awk -v s="$s" -v n="$N" 'BEGIN{printf "%.1f", s / n}') per document)")."
    if [[ -n $DB && $PG_STATEMENTS == 1 ]]; then
        detail ""
        detail "| calls | total ms | statement |"
        detail "|---:|---:|---|"
        detail "$(pg_stmt_top "$DB" 12)"
    fi
    if [[ $config == sqlite ]]; then
        # As scripts/bench-replication.sh: a relay process that has not just received them.
        stop_relay "${config}_w1-relay"
        start_relay "${config}_w1-relay" --data "$T/${config}_w1-relay"
        NODE1=$RELAY_URL NODE2=$RELAY_URL
    else
        # Node 2 hears of the push by NOTIFY and reads the feed: let it settle.
        sleep 2
    fi
    local node2_http
    node2_http=$(http_of "$NODE2")
    detail ""
    detail "### [$label] W1 cold sync of $N documents from node 2 (per run)"
    detail ""
    if [[ -n $DB ]]; then
        rtt=$(pg_rtt)
        ROW[$config:rtt]=$rtt
        detail ""
        detail "PostgreSQL round trip before W1 (pgbench, \`SELECT 1\`, 1 client, 2 s): $rtt ms."
    fi
    detail ""
    detail "| run | wall s | client peak RSS MB | CPU s: client | relay | PostgreSQL | other processes | steal | SQL statements | per document | wall µs per statement |"
    detail "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for run in $(seq "$RUNS"); do
        step "[$config] W1 run $run"
        pg_stmt_reset
        a=$(snap)
        timed "$dir/w1-$run" timeout 300 "$W" --db "$dir/fresh-$run.db" sync --server "$NODE2" --once --timeout "$SYNC_TIMEOUT"
        b=$(snap)
        cpu_delta "$a" "$b" "$T_CPU"
        walls+=("$T_WALL")
        rsss+=("$(awk -v k="$T_RSS" 'BEGIN{printf "%.1f", k / 1024}')")
        s=$( [[ -n $DB ]] && pg_stmt_total "$DB" || echo "–")
        stmts+=("$s")
        echo "  $(tr '\n' ' ' <"$dir/w1-$run.err") [$T_WALL s, $T_RSS KB; cpu: relay $D_RELAY s, pg $D_PG s, client $T_CPU s, other $D_OTHER s; $s statements]" >&2
        local per=– us=–
        if [[ $s =~ ^[0-9]+$ ]]; then
            per=$(awk -v s="$s" -v n="$N" 'BEGIN{printf "%.1f", s / n}')
            us=$(awk -v s="$s" -v w="$T_WALL" 'BEGIN{printf "%.0f", w * 1e6 / s}')
        fi
        detail "| $run | $T_WALL | ${rsss[-1]} | $T_CPU | $D_RELAY | $([[ -n $DB ]] && echo "$D_PG" || echo –) | $D_OTHER | $D_STEAL | $s | $per | $us |"
        if [[ -n $DB && $run == 1 && $PG_STATEMENTS == 1 ]]; then
            W1_TOP=$(pg_stmt_top "$DB" 12)
        fi
    done
    if [[ -n ${W1_TOP:-} && $config == pg ]]; then
        detail ""
        detail "Statements PostgreSQL ran for W1 run 1 (cold node 2), most frequent first:"
        detail ""
        detail "| calls | total ms | statement |"
        detail "|---:|---:|---|"
        detail "$W1_TOP"
    fi
    ROW[$config:w1]=$(stats "${walls[@]}")
    ROW[$config:w1runs]=$(
        IFS=,
        echo "${walls[*]}"
    )
    ROW[$config:push]=$push_wall

    detail ""
    detail "### [$label] W2 warm reconnect from node 2 (per run)"
    detail ""
    detail "| run | wall s | relay frames in / out | SQL statements | summary line |"
    detail "|---:|---:|---:|---:|---|"
    for run in $(seq "$RUNS"); do
        step "[$config] W2 run $run"
        local f_in f_out s line
        pg_stmt_reset
        f_in=$(metric "$node2_http" weft_frames_in_total) f_out=$(metric "$node2_http" weft_frames_out_total)
        timed "$dir/w2-$run" timeout 300 "$W" --db "$dir/fresh-$RUNS.db" sync --server "$NODE2" --once --timeout "$SYNC_TIMEOUT"
        w2walls+=("$T_WALL")
        f_in=$(($(metric "$node2_http" weft_frames_in_total) - f_in))
        f_out=$(($(metric "$node2_http" weft_frames_out_total) - f_out))
        s=$( [[ -n $DB ]] && pg_stmt_total "$DB" || echo "–")
        line=$(tr '\n' ' ' <"$dir/w2-$run.err")
        echo "  $line [$T_WALL s; frames in/out $f_in/$f_out; $s statements]" >&2
        detail "| $run | $T_WALL | $f_in / $f_out | $s | \`${line% }\` |"
    done
    ROW[$config:w2]=$(stats "${w2walls[@]}")
    ROW[$config:w2runs]=$(
        IFS=,
        echo "${w2walls[*]}"
    )
    stop_all_relays
}

w3() {
    local config=$1 clients=$2 p50s=() p99s=() maxs=() run
    detail ""
    detail "### [$config] W3 \`weft bench fanout --clients $clients --changes $CHANGES --rate $RATE\`, writer on node 1$([[ $config == pg ]] && echo ", receivers round-robin on node 1 and node 2")"
    for run in $(seq "$RUNS"); do
        step "[$config] W3 $clients receivers, run $run"
        local tag=${config}_w3_${clients}_$run out status=0 a b s line
        out=$T/$tag
        setup "$config" "$tag"
        local at=()
        [[ $config == pg ]] && at=(--receivers-at "$NODE1" --receivers-at "$NODE2")
        pg_stmt_reset
        a=$(snap)
        /usr/bin/time -f "%e %U %S" -o "$out.time" timeout 600 "$W" bench fanout --server "$NODE1" "${at[@]}" \
            --clients "$clients" --changes "$CHANGES" --rate "$RATE" --dir "$T" >"$out.stdout" 2>"$out.err" || status=$?
        b=$(snap)
        s=$( [[ -n $DB ]] && pg_stmt_total "$DB" || echo "–")
        local b_wall b_user b_sys
        read -r b_wall b_user b_sys <"$out.time" || true
        cpu_delta "$a" "$b" "$(awk -v u="${b_user:-0}" -v s="${b_sys:-0}" 'BEGIN{print u + s}')"
        detail ""
        detail "run $run (exit status $status):"
        detail '```'
        while IFS= read -r line; do detail "$line"; done <"$out.stdout"
        detail "  cpu: relays $D_RELAY s; PostgreSQL $([[ -n $DB ]] && echo "$D_PG" || echo –) s; bench process ${b_user:-?} s user + ${b_sys:-?} s sys in ${b_wall:-?} s wall; other processes $D_OTHER s; steal $D_STEAL s"
        if [[ -n $DB ]]; then
            local n1 n2
            n1=$(http_of "$NODE1") n2=$(http_of "$NODE2")
            detail "  SQL statements: $s; node 1 commits $(metric "$n1" weft_pg_commits_total), saw others' $(metric "$n1" weft_pg_changed_elsewhere_total), notifications $(metric "$n1" weft_pg_notifications_total); node 2 commits $(metric "$n2" weft_pg_commits_total), saw others' $(metric "$n2" weft_pg_changed_elsewhere_total), notifications $(metric "$n2" weft_pg_notifications_total)"
        fi
        detail '```'
        if ((status != 0)); then
            echo "W3 run failed (exit $status); its stderr:" >&2
            tail -20 "$out.err" >&2
            detail "stderr: $(tail -5 "$out.err" | tr '\n' ' ')"
        fi
        line=$(grep 'latency ms:' "$out.stdout" || true)
        echo "  ${line:-no latency line} $(grep 'received:' "$out.stdout" || true)" >&2
        if [[ $line =~ p50\ ([0-9.]+)\ +p99\ ([0-9.]+)\ +max\ ([0-9.]+) ]]; then
            p50s+=("${BASH_REMATCH[1]}") p99s+=("${BASH_REMATCH[2]}") maxs+=("${BASH_REMATCH[3]}")
        fi
        if ! grep -q 'received: .*(all)' "$out.stdout"; then
            ROW[$config:w3_${clients}_missing]="$(grep -o 'received: [0-9/]*' "$out.stdout" || echo 'failed') "
        fi
        stop_all_relays
    done
    if ((${#p50s[@]})); then
        ROW[$config:w3_${clients}]="$(stats "${p50s[@]}") | $(stats "${p99s[@]}") | $(stats "${maxs[@]}")"
    else
        ROW[$config:w3_${clients}]="failed | failed | failed"
    fi
}

# ----- run --------------------------------------------------------------------------------------

step "generating $N documents"
gen_docs "$N" >"$T/docs.ndjson"
for config in $CONFIGS; do
    case $config in
    sqlite) ;;
    pg) [[ -n $PG_URL ]] || pg_start ;;
    *) die "unknown configuration $config (sqlite, pg)" ;;
    esac
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_BEFORE=$(busy_processes)
for config in $CONFIGS; do
    w1w2 "$config"
done
for clients in $RECEIVERS; do
    for config in $CONFIGS; do
        w3 "$config" "$clients"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
[[ -n $PG_URL ]] && RTT_AFTER=$(pg_rtt)

# ----- table ------------------------------------------------------------------------------------

name_of() {
    case $1 in
    sqlite) echo "SQLite relay (one)" ;;
    pg) echo "2 PostgreSQL nodes" ;;
    esac
}
{
    echo "| workload | $(for c in $CONFIGS; do printf '%s | ' "$(name_of "$c")"; done)goal |"
    echo "|---|$(for _ in $CONFIGS; do printf -- '---:|'; done)---|"
    echo "| W1 cold sync $N docs, s, median (min–max) of $RUNS | $(for c in $CONFIGS; do printf '%s | ' "${ROW[$c:w1]}"; done)< 2 s |"
    echo "| W2 warm reconnect, s | $(for c in $CONFIGS; do printf '%s | ' "${ROW[$c:w2]}"; done)< 0.1 s |"
    echo "| push of the seed to node 1, s (1 run) | $(for c in $CONFIGS; do printf '%s | ' "${ROW[$c:push]}"; done) |"
    for clients in $RECEIVERS; do
        for i in 1 2 3; do
            what=(x p50 p99 max)
            printf '| W3 %s receivers @ %s/s, %s ms | ' "$clients" "$RATE" "${what[$i]}"
            for c in $CONFIGS; do
                printf '%s%s | ' "${ROW[$c:w3_${clients}_missing]:-}" "$(cut -d'|' -f"$i" <<<"${ROW[$c:w3_$clients]}" | xargs)"
            done
            if [[ $clients == 10 && ${what[$i]} == p99 ]]; then echo "< 50 ms |"; else echo " |"; fi
        done
    done
} >>"$RESULTS"

step "done"
cpu_model=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
echo
echo "# weft relay: SQLite vs two PostgreSQL nodes ($(date -u +%Y-%m-%d))"
echo
echo "- machine: $(nproc) cores, ${cpu_model:-unknown CPU}, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
echo "- weft commit: $COMMIT; PostgreSQL: ${PG_VERSION:-not used} (private cluster, default settings$([[ $PG_STATEMENTS == 1 ]] && echo " + pg_stat_statements"), fresh database per workload)"
echo "- load average before / after: $LOAD_BEFORE / $LOAD_AFTER; processes above 5% of a CPU at the start: ${BUSY_BEFORE:-none}"
[[ -n $PG_URL ]] && echo "- PostgreSQL round trip (pgbench \`SELECT 1\`, 1 client): ${ROW[pg:rtt]:-?} ms before W1, ${RTT_AFTER:-?} ms at the end"
echo "- $N documents; $RUNS runs each; W3 $CHANGES edits at $RATE/s"
echo
cat "$RESULTS"
echo
echo "## Details"
cat "$DETAILS"
