#!/usr/bin/env bash
# Tracked tables, live, with plain-SQL writers: two app files A and B (Python's sqlite3 module,
# `todos (id TEXT PRIMARY KEY, title, done, note)`), each tracked by its own replica
# (`weft track add`), one relay (`weft serve`), both replicas running `weft sync --watch`.
#   bulk     10,000 rows inserted into A by ONE transaction (executemany), timed from just before
#            COMMIT until B's table holds all 10,000 (Python polls B every 2 ms). RUNS runs in the
#            same live setup, each with fresh rows (its own id prefix, so A and B grow by 10,000
#            rows a run). Also shown per run, from the same poller: when A's `_weft_capture` was
#            empty again (A's tracker folded the rows into its replica and removed them), when B
#            showed its first row of the run (B's first write-back transaction committed).
#            After each run the poller waits until neither file changed for 0.5 s ("idle": the
#            trackers' last commit). Also per run: the CPU seconds of A's and B's `sync --watch`,
#            the relay and the poller, and of everything else on the machine (from /proc/stat).
#   latency  UPDATES single-row UPDATEs in A, each its own transaction with a unique value,
#            timed from its COMMIT until B's row shows the value (polled every 1 ms); before
#            each, a random 0–25 ms pause, so that commits fall at random points of the
#            trackers' 20 ms `PRAGMA data_version` poll. p50, p90, p99, max.
#   echo     B's `_weft_capture` high-water mark (sqlite_sequence) before and after: rows that
#            weft wrote into B must not be captured again (0 or unchanged). A's is shown too:
#            it must grow by exactly the changes the app made in A. Then A's and B's tables
#            must be identical (every column of every row).
# Each bulk run and the latency series start after a second in which the whole machine used
# less than 0.1 CPU seconds (waiting at most TRACK_BENCH_QUIET_WAIT s; a run that started
# without one is marked "not quiet before"): on 2 cores, anything else running is measured too.
# Everything is repeated per journal mode of the app files (JOURNALS): SQLite's default
# rollback journal ("delete") and WAL. With a rollback journal a reader and a writer of the same
# file exclude each other: a tracker's 20 ms `PRAGMA data_version` read that meets the app's
# commit gets SQLITE_BUSY and waits in SQLite's busy handler (sleeps of 1, 2, 5, 10, 15, 20,
# 25... ms), and the pollers wait for the trackers' commits likewise; with WAL readers do not
# wait. The replicas' own stores are WAL whatever the app's mode.
# Everything runs on 127.0.0.1 in a temporary directory removed on exit; every process is
# started and stopped here; every wait is bounded. Not part of CI (scripts/test.sh).
#
# Knobs (environment): TRACK_BENCH_RUNS (5), TRACK_BENCH_ROWS (10000), TRACK_BENCH_UPDATES (200),
# TRACK_BENCH_JOURNALS ("delete wal"), TRACK_BENCH_QUIET_WAIT (120), WEFT_BENCH_SKIP_BUILD=1
# (use the built binary as is), WEFT_BIN (the binary; default $CARGO_TARGET_DIR/release/weft or target/release/weft),
# TRACK_BENCH_LOG (WEFT_LOG of the two `sync --watch`, default warn; e.g.
# weft::track=debug keeps timestamped passes in TRACK_BENCH_KEEP), TRACK_BENCH_KEEP=DIR (copy
# the replicas' stderr logs there before the temporary directory goes).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${TRACK_BENCH_RUNS:-5}
ROWS=${TRACK_BENCH_ROWS:-10000}
UPDATES=${TRACK_BENCH_UPDATES:-200}
JOURNALS=${TRACK_BENCH_JOURNALS:-"delete wal"}
LOG=${TRACK_BENCH_LOG:-warn}
KEEP=${TRACK_BENCH_KEEP:-}

step() { printf '\n==> %s  (%ss so far)\n' "$*" "$SECONDS" >&2; }
die() {
    echo "error: $*" >&2
    exit 1
}
command -v python3 >/dev/null || die "python3 is needed"
python3 -c 'import sqlite3' || die "python3 lacks the sqlite3 module"

if [[ -z ${WEFT_BENCH_SKIP_BUILD:-} ]]; then
    step "cargo build --release --all-features --bin weft"
    cargo build --release --all-features --bin weft
fi
W=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/weft}
[[ -x $W ]] || die "$W not found"

T=$(mktemp -d -t weft-track-XXXXXX)
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
    if [[ -n $KEEP ]]; then
        mkdir -p "$KEEP"
        cp "$T"/*/*.log "$KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----- the app side: Python's sqlite3, as any app would write -----------------------------------

cat >"$T/app.py" <<'EOF'
import json, os, random, sqlite3, statistics, sys, time

SCHEMA = ("CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT, "
          "done INTEGER NOT NULL DEFAULT 0, note TEXT)")
DEADLINE = 120.0  # seconds, any single wait


def connect(path):
    # isolation_level=None: no implicit transactions; every BEGIN/COMMIT below is explicit.
    c = sqlite3.connect(path, timeout=30, isolation_level=None)
    return c


def one(c, sql, args=()):
    """The first row or None. fetchall(): the statement runs to its end, so no read
    transaction stays open (an open one would keep the tracker from committing)."""
    rows = c.execute(sql, args).fetchall()
    return rows[0] if rows else None


def high_water(c):
    r = one(c, "SELECT seq FROM sqlite_sequence WHERE name = '_weft_capture'")
    return r[0] if r else 0


def wait(what, probe, poll):
    start = time.perf_counter()
    while True:
        v = probe()
        if v:
            return v
        if time.perf_counter() - start > DEADLINE:
            sys.exit("timed out: %s" % what)
        time.sleep(poll)


def mkapp(path, journal):
    c = connect(path)
    c.execute("PRAGMA journal_mode = %s" % journal)
    c.execute(SCHEMA)
    c.close()


def probe(a, b):
    """One row A -> B and one B -> A: both directions are live."""
    ca, cb = connect(a), connect(b)
    t0 = time.perf_counter()
    ca.execute("INSERT INTO todos (id, title) VALUES ('probe-a', 'from A')")
    wait("probe A -> B", lambda: one(
        cb, "SELECT 1 FROM todos WHERE id = 'probe-a'"), 0.005)
    t1 = time.perf_counter()
    cb.execute("INSERT INTO todos (id, title) VALUES ('probe-b', 'from B')")
    wait("probe B -> A", lambda: one(
        ca, "SELECT 1 FROM todos WHERE id = 'probe-b'"), 0.005)
    t2 = time.perf_counter()
    print(json.dumps({"a_to_b": t1 - t0, "b_to_a": t2 - t1}))


def cpu():
    """CPU seconds (user + system) so far of the processes in TRACK_PIDS ("name=pid ...")."""
    out = {}
    hz = os.sysconf("SC_CLK_TCK")
    for item in os.environ.get("TRACK_PIDS", "").split():
        name, pid = item.split("=")
        with open("/proc/%s/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / hz
    t = os.times()
    out["python"] = t.user + t.system
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    out["machine"] = (sum(fields[:8]) - fields[3] - fields[4]) / hz
    return out


def machine_busy():
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / hz


def wait_quiet():
    """Waits (at most TRACK_BENCH_QUIET_WAIT seconds) for a second in which the machine was
    busy for less than 0.1 CPU seconds: other work on a 2-core machine would be measured too.
    Returns the seconds waited, negative when it gave up."""
    limit = float(os.environ.get("TRACK_BENCH_QUIET_WAIT", "120"))
    start = time.perf_counter()
    while True:
        b0 = machine_busy()
        time.sleep(1)
        if machine_busy() - b0 < 0.1:
            return time.perf_counter() - start
        if time.perf_counter() - start > limit:
            return -(time.perf_counter() - start)


def settle(ca, cb, t0, quiet=0.5):
    """When the trackers stopped committing to A and B: the last change of either file's
    PRAGMA data_version (polled every 10 ms) before QUIET seconds without one."""
    last, seen = time.perf_counter(), None
    while True:
        now = time.perf_counter()
        v = (one(ca, "PRAGMA data_version")[0], one(cb, "PRAGMA data_version")[0])
        if v != seen:
            seen, last = v, now
        elif now - last >= quiet:
            return last
        if now - t0 > DEADLINE:
            sys.exit("A and B still change %.0f s after the commit" % DEADLINE)
        time.sleep(0.01)


def bulk(a, b, run, n):
    ca, cb = connect(a), connect(b)
    lo, hi = "r%02d-" % run, "r%02d." % run  # '.' sorts right after '-': the run's id range
    rows = [("r%02d-%06d" % (run, i), "todo %d of run %d" % (i, run), i % 2,
             "note %08x" % random.getrandbits(32)) for i in range(n)]
    waited = wait_quiet()
    cpu0 = cpu()
    t_start = time.perf_counter()
    ca.execute("BEGIN")
    ca.executemany("INSERT INTO todos (id, title, done, note) VALUES (?, ?, ?, ?)", rows)
    t0 = time.perf_counter()  # just before the commit
    ca.execute("COMMIT")
    t_commit = time.perf_counter()
    folded = first = None
    while True:
        now = time.perf_counter()
        if folded is None and not one(ca, "SELECT EXISTS (SELECT 1 FROM _weft_capture)")[0]:
            folded = now
        got = one(cb, "SELECT count(*) FROM todos WHERE id >= ? AND id < ?", (lo, hi))[0]
        if first is None and got > 0:
            first = now
        if got == n:
            done = time.perf_counter()
            break
        if now - t0 > DEADLINE:
            sys.exit("run %d: B holds %d of %d rows after %.0f s" % (run, got, n, DEADLINE))
        time.sleep(0.002)
    if folded is None:
        folded = done
    cpu1 = cpu()
    settled = settle(ca, cb, t0)
    print(json.dumps({
        "run": run, "total": done - t0, "insert": t0 - t_start, "commit": t_commit - t0,
        "folded_a": folded - t0, "first_b": first - t0, "settled": settled - t0,
        "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0}, "waited_quiet": waited,
    }))


def latency(a, b, count):
    ca, cb = connect(a), connect(b)
    ca.execute("INSERT INTO todos (id, title) VALUES ('latency', 'the row the updates edit')")
    wait("the latency row on B", lambda: one(
        cb, "SELECT 1 FROM todos WHERE id = 'latency'"), 0.005)
    rng = random.Random(7)
    waited = wait_quiet()
    b0 = machine_busy()
    t_begin = time.perf_counter()
    samples, at = [], []  # at: each commit's wall clock time, to compare with weft's logs
    for i in range(count):
        time.sleep(rng.uniform(0, 0.025))
        value = "update %d %08x" % (i, rng.getrandbits(32))
        ca.execute("BEGIN")
        ca.execute("UPDATE todos SET note = ? WHERE id = 'latency'", (value,))
        ca.execute("COMMIT")
        t0 = time.perf_counter()
        at.append(time.time())
        while True:
            r = one(cb, "SELECT note FROM todos WHERE id = 'latency'")
            if r and r[0] == value:
                samples.append(time.perf_counter() - t0)
                break
            if time.perf_counter() - t0 > DEADLINE:
                sys.exit("update %d never reached B" % i)
            time.sleep(0.001)
    print(json.dumps({"samples": samples, "at": at, "waited_quiet": waited,
                      "machine_cores_busy": (machine_busy() - b0) / (time.perf_counter() - t_begin)}))


def hw(path):
    print(high_water(connect(path)))


def rowcount(path):
    print(one(connect(path), "SELECT count(*) FROM todos")[0])


def digest(path):
    """A digest of the whole table, every column, ordered by key: A and B must be equal."""
    import hashlib
    h = hashlib.sha256()
    for row in connect(path).execute("SELECT id, title, done, note FROM todos ORDER BY id"):
        h.update(repr(row).encode())
    print(h.hexdigest()[:16])


cmd, args = sys.argv[1], sys.argv[2:]
{"mkapp": mkapp, "probe": probe, "bulk": lambda a, b, r, n: bulk(a, b, int(r), int(n)),
 "latency": lambda a, b, n: latency(a, b, int(n)), "hw": hw, "rowcount": rowcount,
 "digest": digest}[cmd](*args)
EOF
app() { timeout 300 python3 "$T/app.py" "$@"; }

# ----- helpers ----------------------------------------------------------------------------------

# start_relay DIR: `weft serve` on a free port; sets RELAY_PID, RELAY_URL.
start_relay() {
    local dir=$1
    "$W" serve --listen 127.0.0.1:0 --data "$dir/relay" >"$dir/relay.out" 2>"$dir/relay.log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    for _ in $(seq 100); do
        grep -q '^weft relay listening on ws://' "$dir/relay.out" 2>/dev/null && break
        kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited: $(cat "$dir/relay.log")"
        sleep 0.1
    done
    RELAY_URL=$(awk '/^weft relay listening on ws:\/\//{print $NF; exit}' "$dir/relay.out")
    [[ $RELAY_URL == ws://127.0.0.1:* ]] || die "no address from the relay: $(cat "$dir/relay.out")"
}

# start_watch NAME DIR: `weft --db DIR/NAME.db sync --watch`; sets WATCH_PID. stderr (one line
# per changed document, the status lines, the log) goes to DIR/NAME.log.
start_watch() {
    local name=$1 dir=$2
    WEFT_LOG=$LOG "$W" --db "$dir/$name.db" sync --watch --server "$RELAY_URL" \
        >"$dir/$name.out" 2>"$dir/$name.log" &
    WATCH_PID=$!
    PIDS+=("$WATCH_PID")
}

# wait_synced LOG PID: until LOG has "status: synced" (30 s at most).
wait_synced() {
    for _ in $(seq 300); do
        grep -q '^status: synced' "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || die "sync --watch exited: $(tail -5 "$1")"
        sleep 0.1
    done
    die "no 'status: synced' in $1 after 30 s: $(tail -5 "$1")"
}

# stop PID...: SIGTERM, SIGKILL after 10 s; removed from PIDS.
stop() {
    local pid keep=()
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        [[ " $* " == *" $pid "* ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}


# ----- runs -------------------------------------------------------------------------------------

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || COMMIT+=" (with uncommitted changes to src)"
MACHINE="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(python3 -c 'import sqlite3,sys; print("Python %d.%d, SQLite %s" % (sys.version_info[0], sys.version_info[1], sqlite3.sqlite_version))')"
step "machine: $MACHINE; weft $COMMIT; load average $(cut -d' ' -f1-3 /proc/loadavg)"

REPORT=()
for journal in $JOURNALS; do
    dir=$T/$journal
    mkdir -p "$dir"
    step "$journal: app files, track add, relay, two sync --watch"
    app mkapp "$dir/a.sqlite" "$journal"
    app mkapp "$dir/b.sqlite" "$journal"
    "$W" --db "$dir/a.db" track add --app "$dir/a.sqlite" --table todos 2>>"$dir/track.log"
    "$W" --db "$dir/b.db" track add --app "$dir/b.sqlite" --table todos 2>>"$dir/track.log"
    start_relay "$dir"
    start_watch a "$dir"
    PID_A=$WATCH_PID
    start_watch b "$dir"
    PID_B=$WATCH_PID
    wait_synced "$dir/a.log" "$PID_A"
    wait_synced "$dir/b.log" "$PID_B"
    probe=$(app probe "$dir/a.sqlite" "$dir/b.sqlite")
    echo "probe round trips: $probe" >&2
    hw_b0=$(app hw "$dir/b.sqlite")
    hw_a0=$(app hw "$dir/a.sqlite")

    for run in $(seq "$RUNS"); do
        # Returns once neither file changed for 0.5 s (the trackers are idle again).
        res=$(TRACK_PIDS="A=$PID_A B=$PID_B relay=$RELAY_PID" app bulk "$dir/a.sqlite" "$dir/b.sqlite" "$run" "$ROWS")
        echo "$journal bulk run $run: $res" >&2
        REPORT+=("$journal|bulk|$res")
    done

    res=$(app latency "$dir/a.sqlite" "$dir/b.sqlite" "$UPDATES")
    echo "$journal latency: $res" >&2
    REPORT+=("$journal|latency|$res")
    sleep 1
    hw_b1=$(app hw "$dir/b.sqlite")
    hw_a1=$(app hw "$dir/a.sqlite")
    rows_a=$(app rowcount "$dir/a.sqlite")
    rows_b=$(app rowcount "$dir/b.sqlite")
    same=false
    [[ $(app digest "$dir/a.sqlite") == $(app digest "$dir/b.sqlite") ]] && same=true
    # The app's changes in A since the probe: RUNS*ROWS inserts, 1 insert + UPDATES updates.
    expect_a=$((hw_a0 + RUNS * ROWS + 1 + UPDATES))
    REPORT+=("$journal|echo|{\"b_before\": $hw_b0, \"b_after\": $hw_b1, \"a_before\": $hw_a0, \"a_after\": $hw_a1, \"a_expected\": $expect_a, \"rows_a\": $rows_a, \"rows_b\": $rows_b, \"same\": $same}")
    grep -E ' (WARN|ERROR) ' "$dir/a.log" "$dir/b.log" "$dir/relay.log" | head -5 >&2 || true
    stop "$PID_A" "$PID_B" "$RELAY_PID"
done

# ----- report -----------------------------------------------------------------------------------

echo
echo "machine: $MACHINE"
echo "weft: $COMMIT ($W)"
echo "rows per bulk transaction: $ROWS; runs: $RUNS; single-row updates: $UPDATES"
printf '%s\n' "${REPORT[@]}" | python3 -c '
import json, statistics, sys
from collections import defaultdict
bulk, lat, echo = defaultdict(list), {}, {}
for line in sys.stdin:
    journal, kind, data = line.rstrip("\n").split("|", 2)
    d = json.loads(data)
    {"bulk": lambda: bulk[journal].append(d), "latency": lambda: lat.__setitem__(journal, d),
     "echo": lambda: echo.__setitem__(journal, d)}[kind]()
ms = lambda s: "%.0f" % (s * 1000)
print()
print("bulk: %s rows in one transaction in A, from just before COMMIT until B holds all (ms)" % sys.argv[1])
print("(executemany: before the clock starts; A folded: _weft_capture of A empty again; B first: the first")
print("row of the run; idle: the last commit to A or B by the trackers; CPU: seconds from executemany to")
print("B complete, per process; other: CPU seconds the rest of the machine used meanwhile, /proc/stat;")
print("each run starts after a quiet second, waiting up to TRACK_BENCH_QUIET_WAIT s for one)")
print("| app journal | run | total | executemany | COMMIT | A folded | B first | idle | CPU A | CPU B | CPU relay | CPU poller | other |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
other = lambda c: c["machine"] - c["A"] - c["B"] - c["relay"] - c["python"]
for runs in bulk.values():
    for r in runs:
        r["cpu"]["other"] = max(0.0, other(r["cpu"]))
cpu = lambda r, k: "%.2f" % r["cpu"].get(k, float("nan"))
for j, runs in bulk.items():
    for r in runs:
        print("| %s | %d%s | **%s** | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (j, r["run"], " (not quiet before)" if r["waited_quiet"] < 0 else "", ms(r["total"]),
              ms(r["insert"]), ms(r["commit"]), ms(r["folded_a"]), ms(r["first_b"]), ms(r["settled"]),
              cpu(r, "A"), cpu(r, "B"), cpu(r, "relay"), cpu(r, "python"), cpu(r, "other")))
    med = lambda k: ms(statistics.median(r[k] for r in runs))
    mcpu = lambda k: "%.2f" % statistics.median(r["cpu"][k] for r in runs)
    print("| %s | median | **%s** | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (j, med("total"), med("insert"),
          med("commit"), med("folded_a"), med("first_b"), med("settled"), mcpu("A"), mcpu("B"), mcpu("relay"),
          mcpu("python"), mcpu("other")))
print()
print("single-row UPDATE in A, from COMMIT until B shows it (ms)")
print("(machine busy: cores busy on average during the updates, all processes, weft and the poller too)")
print("| app journal | n | p50 | p90 | p99 | max | min | machine busy |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for j, d in lat.items():
    s = sorted(d["samples"])
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    print("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f%s |" % (j, len(s), q(.5) * 1e3, q(.9) * 1e3,
          q(.99) * 1e3, s[-1] * 1e3, s[0] * 1e3, d["machine_cores_busy"],
          " (not quiet before)" if d["waited_quiet"] < 0 else ""))
print()
print("echo: _weft_capture high-water (sqlite_sequence) before the runs -> after")
for j, e in echo.items():
    ok_b = "ok, no echo" if e["b_after"] == e["b_before"] else "ECHO: B captured %d changes weft wrote" % (e["b_after"] - e["b_before"])
    ok_a = "ok" if e["a_after"] == e["a_expected"] else "UNEXPECTED (expected %d)" % e["a_expected"]
    print("  %s: B %d -> %d (%s); A %d -> %d (%s); rows A %d, B %d%s" % (j, e["b_before"], e["b_after"], ok_b,
          e["a_before"], e["a_after"], ok_a, e["rows_a"], e["rows_b"],
          ", tables identical" if e["same"] else ", TABLES DIFFER"))
' "$ROWS"
