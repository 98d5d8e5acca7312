//! Foundation benchmarks: weft over real SQLite files vs plain in-memory Automerge.
//!
//! Run with `cargo bench --bench foundation` (release profile). Every measurement is repeated
//! `runs` times on fresh files in a temporary directory and the median is reported.
//!
//! Environment:
//! * `WEFT_BENCH_QUICK=1` — smoke test: 1 run, 1,000 documents / updates (goals still printed,
//!   but the numbers are not comparable with a full run).
//! * `WEFT_BENCH_RUNS=N` — override the number of runs.
//! * `WEFT_BENCH_FSYNC_UPDATES=N` — fewer updates for the fsync-per-commit measurement (for
//!   disks where a flush takes milliseconds).
//!
//! What is measured (N = 10,000 in a full run):
//! 1. bulk import of N small documents with `Replica::create_many`, batches of 1,000 (and, as a
//!    diagnostic, the same with `max_loaded_docs = N` so that no document is evicted);
//! 2. N single acknowledged `update`s of one document, one transaction each, with
//!    `Durability::Process` (WAL, synchronous=NORMAL) and with `Durability::PowerLoss` (WAL,
//!    synchronous=FULL: an fsync per commit);
//! 3. `get` of a random document among N;
//! 4. `Replica::open` of an existing N-document file plus the first `get`;
//! 5. file size after `checkpoint()` vs the sum of the documents' Automerge `save()` sizes,
//!    with a per-table breakdown (SQLite `dbstat`);
//! 6. the same operations on plain in-memory Automerge (`weft::json` helpers), and the ratio.
//!
//! Goals are judged on wall-clock medians. Next to them the table shows the median computed from
//! the benchmark thread's on-CPU time (Linux `/proc/thread-self/schedstat`, spans of 0.1 s or
//! more): on a shared or loaded machine wall time includes time spent waiting for a core, on-CPU
//! time does not (nor does it include waiting for fsync).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Map, Value, json};
use weft::automerge::transaction::CommitOptions;
use weft::automerge::{ActorId, Automerge};
use weft::{Bundle, BundleEntry, BundleScope, DocumentId, Durability, Replica, ReplicaOptions};

const COLLECTION: &str = "items";
const BATCH: usize = 1_000;

struct Config {
    quick: bool,
    runs: usize,
    docs: usize,
    updates: usize,
    /// Updates measured with an fsync per commit (`WEFT_BENCH_FSYNC_UPDATES` lowers it).
    powerloss_updates: usize,
    gets: usize,
}

fn env_count(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace(['_', ','], "").parse::<usize>().ok())
        .filter(|&n| n > 0)
}

impl Config {
    fn from_env() -> Self {
        let quick = std::env::var("WEFT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut cfg = if quick {
            Config {
                quick,
                runs: 1,
                docs: 1_000,
                updates: 1_000,
                powerloss_updates: 1_000,
                gets: 5_000,
            }
        } else {
            Config {
                quick,
                runs: 5,
                docs: 10_000,
                updates: 10_000,
                powerloss_updates: 10_000,
                gets: 50_000,
            }
        };
        if let Some(count) = env_count("WEFT_BENCH_FSYNC_UPDATES") {
            cfg.powerloss_updates = count;
        }
        if let Some(runs) = env_count("WEFT_BENCH_RUNS") {
            cfg.runs = runs;
        }
        cfg
    }
}

// ----- data --------------------------------------------------------------------------------

const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
];

/// A small document: a string, an int, a float, a bool, and a short array (even `i`) or a
/// nested object (odd `i`).
fn body(i: usize, rng: &mut StdRng) -> Value {
    let word = WORDS[rng.random_range(0..WORDS.len())];
    let price = rng.random_range(0..100_000) as f64 / 100.0 + 0.005;
    let mut doc = json!({
        "title": format!("{word} item {i}"),
        "count": rng.random_range(0..1_000_000i64),
        "price": price,
        "done": rng.random_bool(0.5),
    });
    let (key, value) = if i.is_multiple_of(2) {
        (
            "tags",
            json!([WORDS[i % WORDS.len()], WORDS[(i / 7) % WORDS.len()]]),
        )
    } else {
        (
            "owner",
            json!({"name": format!("user{}", i % 97), "level": (i % 5) as i64}),
        )
    };
    doc.as_object_mut()
        .expect("an object")
        .insert(key.to_owned(), value);
    doc
}

fn bodies(n: usize) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..n).map(|i| body(i, &mut rng)).collect()
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("bodies are objects"),
    }
}

// ----- timing ------------------------------------------------------------------------------

/// Nanoseconds this thread has spent on a CPU (Linux only).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Wall-clock and on-CPU seconds of one measured span.
#[derive(Clone, Copy, Debug)]
struct Span {
    wall: f64,
    cpu: Option<f64>,
}

struct Timer {
    cpu: Option<u64>,
    start: Instant,
}

impl Timer {
    fn start() -> Self {
        let cpu = thread_cpu_ns();
        Timer {
            cpu,
            start: Instant::now(),
        }
    }

    fn stop(self) -> Span {
        let wall = self.start.elapsed().as_secs_f64();
        let cpu = match (self.cpu, thread_cpu_ns()) {
            // The kernel updates this counter at scheduler ticks (4 ms at HZ=250): only spans
            // of 0.1 s or more are measured meaningfully.
            (Some(a), Some(b)) if wall >= 0.1 => Some(b.saturating_sub(a) as f64 / 1e9),
            _ => None,
        };
        Span { wall, cpu }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ----- files -------------------------------------------------------------------------------

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The database file plus its WAL (if any).
fn db_size(path: &Path) -> u64 {
    file_len(path) + file_len(&sidecar(path, "-wal"))
}

fn open(path: &Path, durability: Durability) -> Replica {
    Replica::open_with(
        path,
        ReplicaOptions {
            durability,
            ..ReplicaOptions::default()
        },
    )
    .expect("open replica")
}

// ----- the measured operations -------------------------------------------------------------

/// Imports the bodies in batches of [`BATCH`]; returns the time and the ids.
fn weft_import(replica: &Replica, bodies: &[Value]) -> (Span, Vec<DocumentId>) {
    // Cloning the input is not part of the measurement.
    let batches: Vec<Vec<Value>> = bodies.chunks(BATCH).map(|c| c.to_vec()).collect();
    let mut ids = Vec::with_capacity(bodies.len());
    let timer = Timer::start();
    for batch in batches {
        ids.extend(replica.create_many(COLLECTION, batch).expect("create_many"));
    }
    (timer.stop(), ids)
}

fn weft_updates(replica: &Replica, id: &DocumentId, count: usize) -> Span {
    let timer = Timer::start();
    for i in 1..=count {
        replica.update(id, json!({"n": i})).expect("update");
    }
    timer.stop()
}

fn weft_gets(replica: &Replica, ids: &[DocumentId], picks: &[usize]) -> Span {
    let mut fields = 0usize;
    let timer = Timer::start();
    for &k in picks {
        let doc = replica.get(&ids[k]).expect("get");
        fields += doc.body.as_object().map_or(0, |m| m.len());
    }
    let span = timer.stop();
    assert!(fields >= picks.len());
    span
}

fn actor() -> ActorId {
    ActorId::from([7u8; 16].as_slice())
}

fn commit_options() -> CommitOptions {
    CommitOptions::default().with_time(1_700_000_000)
}

/// Creates every document in memory and saves it (as weft's create does), keeping them for the
/// read baseline. Returns the time, the documents and the total saved bytes.
fn baseline_create(maps: &[Map<String, Value>]) -> (Span, Vec<Automerge>, usize) {
    let mut docs = Vec::with_capacity(maps.len());
    let mut saved = 0usize;
    let timer = Timer::start();
    for map in maps {
        let mut doc = Automerge::new().with_actor(actor());
        let mut tx = doc.transaction();
        weft::json::create_root(&mut tx, map).expect("create_root");
        tx.commit_with(commit_options());
        saved += doc.save().len();
        docs.push(doc);
    }
    (timer.stop(), docs, saved)
}

fn baseline_updates(first: &Map<String, Value>, count: usize) -> (Span, Automerge) {
    let mut doc = Automerge::new().with_actor(actor());
    let mut tx = doc.transaction();
    weft::json::create_root(&mut tx, first).expect("create_root");
    tx.commit_with(commit_options());
    let timer = Timer::start();
    for i in 1..=count {
        let patch = object(json!({"n": i}));
        let mut tx = doc.transaction();
        weft::json::merge_patch(&mut tx, &patch).expect("merge_patch");
        tx.commit_with(commit_options());
    }
    (timer.stop(), doc)
}

fn baseline_reads(docs: &[Automerge], picks: &[usize]) -> Span {
    let mut fields = 0usize;
    let timer = Timer::start();
    for &k in picks {
        let body = weft::json::materialize(&docs[k], None);
        fields += body.as_object().map_or(0, |m| m.len());
    }
    let span = timer.stop();
    assert!(fields >= picks.len());
    span
}

/// Sum over documents of `Automerge::load(bytes).save().len()`, from a bundle of everything.
fn automerge_bytes(replica: &Replica) -> (u64, usize) {
    let bundle = Bundle::decode(&replica.export_bundle(&BundleScope::All).expect("export"))
        .expect("decode bundle");
    let mut total = 0u64;
    let mut docs = 0;
    for entry in &bundle.entries {
        if let BundleEntry::Document { bytes, .. } = entry {
            let doc = Automerge::load(bytes).expect("load exported document");
            total += doc.save().len() as u64;
            docs += 1;
        }
    }
    (total, docs)
}

// ----- size breakdown ----------------------------------------------------------------------

struct SizeReport {
    label: String,
    docs: usize,
    db_bytes: u64,
    automerge_bytes: u64,
    page_size: u64,
    free_pages: u64,
    /// (b-tree name, bytes of pages, payload bytes)
    btrees: Vec<(String, u64, u64)>,
    /// (what, bytes): sums of column lengths.
    columns: Vec<(&'static str, u64)>,
    chunk_rows: u64,
    change_rows: u64,
    /// Size of a freshly created, empty weft database (fixed page overhead).
    empty_db_bytes: u64,
}

fn size_report(label: &str, replica: &Replica, path: &Path) -> SizeReport {
    replica.checkpoint().expect("checkpoint");
    let db_bytes = db_size(path);
    let (automerge_bytes, docs) = automerge_bytes(replica);
    // `rusqlite` is a regular dependency of weft (feature "sqlite", which this bench requires).
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("read-only connection");
    let q = |sql: &str| -> u64 {
        conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .expect(sql)
            .unwrap_or(0) as u64
    };
    let columns = vec![
        (
            "documents.body (materialized JSON)",
            q("SELECT sum(length(body)) FROM documents"),
        ),
        (
            "documents.snapshot (Automerge)",
            q("SELECT sum(length(snapshot)) FROM documents"),
        ),
        (
            "documents.heads",
            q("SELECT sum(length(heads)) FROM documents"),
        ),
        (
            "documents.doc_id",
            q("SELECT sum(length(doc_id)) FROM documents"),
        ),
        (
            "chunks.bytes (Automerge incremental)",
            q("SELECT sum(length(bytes)) FROM chunks"),
        ),
        ("changes.heads", q("SELECT sum(length(heads)) FROM changes")),
        (
            "changes.origin",
            q("SELECT sum(length(origin)) FROM changes"),
        ),
    ];
    let mut stmt = conn
        .prepare(
            "SELECT name, sum(pgsize), sum(payload) FROM dbstat GROUP BY name ORDER BY sum(pgsize) DESC",
        )
        .expect("dbstat");
    let btrees = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })
        .expect("dbstat rows")
        .collect::<Result<Vec<_>, _>>()
        .expect("dbstat rows");
    SizeReport {
        label: label.to_owned(),
        docs,
        db_bytes,
        automerge_bytes,
        page_size: q("PRAGMA page_size"),
        free_pages: q("PRAGMA freelist_count"),
        btrees,
        columns,
        chunk_rows: q("SELECT count(*) FROM chunks"),
        change_rows: q("SELECT count(*) FROM changes"),
        empty_db_bytes: {
            let dir = tempfile::tempdir().expect("temp dir");
            let empty = dir.path().join("empty.db");
            let r = Replica::open(&empty).expect("empty replica");
            r.checkpoint().expect("checkpoint");
            db_size(&empty)
        },
    }
}

// ----- output ------------------------------------------------------------------------------

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    Below(f64),
    None,
}

/// What a row's spans are turned into.
#[derive(Clone, Copy)]
enum Metric {
    /// Operations per second over `count` operations.
    Rate { count: usize, unit: &'static str },
    /// Milliseconds.
    Millis,
}

struct Row {
    name: String,
    metric: Metric,
    spans: Vec<Span>,
    goal: Goal,
    /// Index of the baseline row to compare with.
    baseline: Option<usize>,
}

impl Row {
    fn value(&self, seconds: f64) -> f64 {
        match self.metric {
            Metric::Rate { count, .. } => count as f64 / seconds,
            Metric::Millis => seconds * 1e3,
        }
    }

    fn walls(&self) -> Vec<f64> {
        self.spans.iter().map(|s| self.value(s.wall)).collect()
    }

    /// On-CPU values of the runs that have one; `None` if none has.
    fn cpus(&self) -> Option<Vec<f64>> {
        let v: Vec<f64> = self
            .spans
            .iter()
            .filter_map(|s| s.cpu.map(|c| self.value(c)))
            .collect();
        (!v.is_empty()).then_some(v)
    }

    fn wall_median(&self) -> f64 {
        median(&self.walls())
    }

    fn cpu_median(&self) -> Option<f64> {
        self.cpus().map(|v| median(&v))
    }

    fn fmt(&self, v: f64) -> String {
        match self.metric {
            Metric::Rate { unit, .. } => format!("{}{unit}", thousands(v)),
            Metric::Millis => format!("{v:.1} ms"),
        }
    }

    fn goal_text(&self) -> (String, &'static str) {
        let m = self.wall_median();
        match self.goal {
            Goal::AtLeast(g) => (
                format!(">= {}", self.fmt(g)),
                if m >= g { "ok" } else { "MISSED" },
            ),
            Goal::Below(g) => (
                format!("< {}", self.fmt(g)),
                if m < g { "ok" } else { "MISSED" },
            ),
            Goal::None => ("-".into(), ""),
        }
    }
}

/// weft time per operation / baseline time per operation (rates: baseline rate / weft rate).
fn ratio(weft: Option<f64>, base: Option<f64>) -> String {
    match (weft, base) {
        (Some(w), Some(b)) if w > 0.0 && b.is_finite() => format!("{:.1}x", b / w),
        _ => "-".into(),
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<42} {:>15} {:>16} {:>6} {:>9} | {:>15} {:>9} | runs: min .. max (wall)",
        "operation", "median (wall)", "goal", "status", "weft/base", "median (on-CPU)", "weft/base"
    );
    println!("{}", "-".repeat(150));
    for row in rows {
        let (goal, status) = row.goal_text();
        let base = row.baseline.map(|b| &rows[b]);
        let wall_ratio = ratio(Some(row.wall_median()), base.map(|b| b.wall_median()));
        let cpu_ratio = ratio(row.cpu_median(), base.and_then(|b| b.cpu_median()));
        let walls = row.walls();
        let min = walls.iter().copied().fold(f64::INFINITY, f64::min);
        let max = walls.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "{:<42} {:>15} {:>16} {:>6} {:>9} | {:>15} {:>9} | x{}: {} .. {}",
            row.name,
            row.fmt(row.wall_median()),
            goal,
            status,
            if base.is_some() {
                wall_ratio
            } else {
                "".into()
            },
            row.cpu_median().map_or("-".into(), |c| row.fmt(c)),
            if base.is_some() { cpu_ratio } else { "".into() },
            walls.len(),
            row.fmt(min),
            row.fmt(max)
        );
    }
    println!(
        "weft/base = weft time per operation / plain in-memory Automerge time per operation (same run, same data)."
    );
}

fn print_size(report: &SizeReport) {
    let ratio = report.db_bytes as f64 / report.automerge_bytes.max(1) as f64;
    let status = if ratio <= 1.3 { "ok" } else { "MISSED" };
    println!(
        "\nSize {} ({} document(s)): file {} vs sum of Automerge save() {} = {:.2}x (goal <= 1.3x) {}",
        report.label,
        thousands(report.docs as f64),
        kib(report.db_bytes),
        kib(report.automerge_bytes),
        ratio,
        status
    );
    let body = report
        .columns
        .iter()
        .find(|(name, _)| name.starts_with("documents.body"))
        .map_or(0, |(_, b)| *b);
    println!(
        "  without the materialized JSON bodies ({}): {:.2}x; above an empty database ({}): {:.2}x; both: {:.2}x",
        kib(body),
        report.db_bytes.saturating_sub(body) as f64 / report.automerge_bytes.max(1) as f64,
        kib(report.empty_db_bytes),
        report.db_bytes.saturating_sub(report.empty_db_bytes) as f64
            / report.automerge_bytes.max(1) as f64,
        report.db_bytes.saturating_sub(report.empty_db_bytes + body) as f64
            / report.automerge_bytes.max(1) as f64,
    );
    println!(
        "  page size {} B, free pages {} ({}), {} chunk row(s), {} change-feed row(s)",
        report.page_size,
        report.free_pages,
        kib(report.free_pages * report.page_size),
        thousands(report.chunk_rows as f64),
        thousands(report.change_rows as f64),
    );
    println!(
        "  {:<36} {:>12} {:>12} {:>7}",
        "b-tree (table or index)", "pages", "payload", "of file"
    );
    for (name, pages, payload) in &report.btrees {
        println!(
            "  {:<36} {:>12} {:>12} {:>6.1}%",
            name,
            kib(*pages),
            kib(*payload),
            100.0 * *pages as f64 / report.db_bytes.max(1) as f64
        );
    }
    println!("  {:<36} {:>12}", "column (sum of lengths)", "bytes");
    for (name, bytes) in &report.columns {
        println!("  {:<36} {:>12}", name, kib(*bytes));
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ----- main --------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; with `harness = false` there is nothing else to parse.
    let cfg = Config::from_env();
    let n = cfg.docs;
    println!(
        "weft foundation benchmark: {} run(s); {} documents, {} updates ({} with fsync), {} gets{}",
        cfg.runs,
        thousands(n as f64),
        thousands(cfg.updates as f64),
        thousands(cfg.powerloss_updates as f64),
        thousands(cfg.gets as f64),
        if cfg.quick {
            " [QUICK MODE: smoke test, not comparable with the goals]"
        } else {
            ""
        }
    );
    println!("load average at start: {}", loadavg());
    let all_start = Instant::now();

    let bodies = bodies(n);
    let maps: Vec<Map<String, Value>> = bodies.iter().cloned().map(object).collect();
    let mut update_body = maps[0].clone();
    update_body.insert("n".into(), json!(0));
    let mut rng = StdRng::seed_from_u64(7);
    let picks: Vec<usize> = (0..cfg.gets).map(|_| rng.random_range(0..n)).collect();

    let mut import = Vec::new();
    let mut import_no_evict = Vec::new();
    let mut upd_process = Vec::new();
    let mut upd_powerloss = Vec::new();
    let mut gets = Vec::new();
    let mut open_get = Vec::new();
    let mut open_only = Vec::new();
    let mut open_update = Vec::new();
    let mut base_create = Vec::new();
    let mut base_update = Vec::new();
    let mut base_read = Vec::new();
    let mut sizes: Vec<SizeReport> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    for run in 0..cfg.runs {
        let dir = tempfile::tempdir().expect("temp dir");
        let last = run + 1 == cfg.runs;

        // 1. bulk import; 3. random gets.
        let import_path = dir.path().join("import.db");
        let replica = open(&import_path, Durability::Process);
        let (span, ids) = weft_import(&replica, &bodies);
        import.push(span);
        gets.push(weft_gets(&replica, &ids, &picks));
        if last {
            sizes.push(size_report(
                &format!("after importing {} documents", thousands(n as f64)),
                &replica,
                &import_path,
            ));
        }
        drop(replica);
        // Diagnostic: the same import with a cache large enough that nothing is evicted, to
        // show what evicting (dropping) the Automerge documents costs.
        let replica = Replica::open_with(
            dir.path().join("import-no-evict.db"),
            ReplicaOptions {
                max_loaded_docs: n,
                ..ReplicaOptions::default()
            },
        )
        .expect("open replica");
        import_no_evict.push(weft_import(&replica, &bodies).0);
        drop(replica);

        // 4. open an existing database, first operation included.
        let timer = Timer::start();
        let replica = open(&import_path, Durability::Process);
        let doc = replica.get(&ids[picks[0]]).expect("first get");
        open_get.push(timer.stop());
        assert!(doc.body.is_object());
        drop(replica);
        let timer = Timer::start();
        let replica = open(&import_path, Durability::Process);
        open_only.push(timer.stop());
        drop(replica);
        // The first operation is an update: loads the document's Automerge chunks.
        let timer = Timer::start();
        let replica = open(&import_path, Durability::Process);
        replica
            .update(&ids[picks[1]], json!({"done": "reopened"}))
            .expect("first update");
        open_update.push(timer.stop());
        drop(replica);

        // 2. single updates to one document, default durability.
        let path = dir.path().join("updates.db");
        let replica = open(&path, Durability::Process);
        let id = replica
            .create(COLLECTION, Value::Object(update_body.clone()))
            .expect("create");
        upd_process.push(weft_updates(&replica, &id, cfg.updates));
        if last {
            sizes.push(size_report(
                &format!(
                    "of one document after {} updates, before compact()",
                    thousands(cfg.updates as f64)
                ),
                &replica,
                &path,
            ));
            replica.compact().expect("compact");
            sizes.push(size_report(
                &format!(
                    "of one document after {} updates, after compact()",
                    thousands(cfg.updates as f64)
                ),
                &replica,
                &path,
            ));
        }
        drop(replica);

        // 2b. the same with an fsync per commit.
        let path = dir.path().join("updates-fsync.db");
        let replica = open(&path, Durability::PowerLoss);
        let id = replica
            .create(COLLECTION, Value::Object(update_body.clone()))
            .expect("create");
        upd_powerloss.push(weft_updates(&replica, &id, cfg.powerloss_updates));
        drop(replica);
        drop(dir);

        // 6. baseline: plain in-memory Automerge, same data.
        let (span, docs, saved) = baseline_create(&maps);
        base_create.push(span);
        base_read.push(baseline_reads(&docs, &picks));
        drop(docs);
        let (span, doc) = baseline_updates(&update_body, cfg.updates);
        base_update.push(span);
        if last {
            notes.push(format!(
                "baseline cross-check: the {} documents created in memory save to {}; the in-memory document after {} updates saves to {}",
                thousands(n as f64),
                kib(saved as u64),
                thousands(cfg.updates as f64),
                kib(doc.save().len() as u64)
            ));
        }
        eprintln!(
            "run {}/{} done ({:.1} s elapsed, load average {})",
            run + 1,
            cfg.runs,
            all_start.elapsed().as_secs_f64(),
            loadavg()
        );
    }

    let rate = |count: usize, unit: &'static str| Metric::Rate { count, unit };
    // Baseline rows come last; `baseline: Some(i)` points at them by index.
    let rows = vec![
        Row {
            name: format!("bulk import (create_many, batches of {BATCH})"),
            metric: rate(n, " docs/s"),
            spans: import,
            goal: Goal::AtLeast(20_000.0),
            baseline: Some(8),
        },
        Row {
            name: "  same, max_loaded_docs = all (diagnostic)".into(),
            metric: rate(n, " docs/s"),
            spans: import_no_evict,
            goal: Goal::None,
            baseline: Some(8),
        },
        Row {
            name: "single update, Durability::Process".into(),
            metric: rate(cfg.updates, " upd/s"),
            spans: upd_process,
            goal: Goal::AtLeast(3_000.0),
            baseline: Some(9),
        },
        Row {
            name: "single update, Durability::PowerLoss".into(),
            metric: rate(cfg.powerloss_updates, " upd/s"),
            spans: upd_powerloss,
            goal: Goal::None,
            baseline: Some(9),
        },
        Row {
            name: format!("get, random among {}", thousands(n as f64)),
            metric: rate(picks.len(), " gets/s"),
            spans: gets,
            goal: Goal::AtLeast(50_000.0),
            baseline: Some(10),
        },
        Row {
            name: format!("open {}-doc file + first get", thousands(n as f64)),
            metric: Metric::Millis,
            spans: open_get,
            goal: Goal::Below(100.0),
            baseline: None,
        },
        Row {
            name: "  Replica::open alone".into(),
            metric: Metric::Millis,
            spans: open_only,
            goal: Goal::None,
            baseline: None,
        },
        Row {
            name: "  open + first update (loads the CRDT)".into(),
            metric: Metric::Millis,
            spans: open_update,
            goal: Goal::None,
            baseline: None,
        },
        Row {
            name: "baseline: create_root + commit + save".into(),
            metric: rate(n, " docs/s"),
            spans: base_create,
            goal: Goal::None,
            baseline: None,
        },
        Row {
            name: "baseline: merge_patch + commit".into(),
            metric: rate(cfg.updates, " upd/s"),
            spans: base_update,
            goal: Goal::None,
            baseline: None,
        },
        Row {
            name: "baseline: materialize a random doc".into(),
            metric: rate(picks.len(), " reads/s"),
            spans: base_read,
            goal: Goal::None,
            baseline: None,
        },
    ];
    for row in &rows {
        if let Some(b) = row.baseline {
            assert!(
                rows[b].name.starts_with("baseline:"),
                "{} -> row {b}",
                row.name
            );
        }
    }
    println!();
    print_table(&rows);
    for report in &sizes {
        print_size(report);
    }
    println!();
    for note in &notes {
        println!("{note}");
    }
    println!(
        "total benchmark time {:.1} s; load average at end: {}",
        all_start.elapsed().as_secs_f64(),
        loadavg()
    );
}
