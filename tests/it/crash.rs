//! Crash safety with real processes and `kill -9`.
//!
//! * `kill_9_loses_no_acknowledged_write`: a child process (this test binary re-executed, acting
//!   as [`crash_child_writer`]) writes in a loop and acknowledges each write on stdout after the
//!   call returned (after commit). The parent SIGKILLs it at a random moment, then checks with
//!   `weft::Replica` that the file is intact and holds exactly what was acknowledged — at least 30
//!   times on the same file, each child reopening what the previous one left.
//! * `killed_import_leaves_only_whole_batches`: `weft import` of a large NDJSON file, SIGKILLed
//!   mid-way, leaves every batch fully present or fully absent.
//!
//! Random choices come from `WEFT_SEED` (printed; set it to replay a run).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{LineEvent, SplitMix64};
use weft::{DocumentId, Error, Replica};

/// Set in the environment of a child process: the database it writes to.
const CHILD_DB_ENV: &str = "WEFT_CRASH_CHILD_DB";
/// The child's seed and run number.
const CHILD_SEED_ENV: &str = "WEFT_CRASH_CHILD_SEED";
const CHILD_RUN_ENV: &str = "WEFT_CRASH_CHILD_RUN";
/// The name of the test that acts as the child, without its module path.
const CHILD_TEST: &str = "crash_child_writer";

/// The child's full test name for `--exact`: libtest names a test by its module path without
/// the crate (`crash::crash_child_writer` in `tests/it`).
fn child_test_name() -> String {
    match module_path!().split_once("::") {
        Some((_crate, module)) => format!("{module}::{CHILD_TEST}"),
        None => CHILD_TEST.to_owned(),
    }
}
/// Prefix of the child's protocol lines, so libtest's own output on the same stdout (which may
/// even share a line: "test crash_child_writer ... ") is never mistaken for one.
const MARK: &str = "@@WEFT ";
const COLLECTION: &str = "crash";
/// Failure bound for any single awaited event (a line, an exit).
const BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The child: a writer that acknowledges after commit.

/// Writes one protocol line and flushes it: the parent sees it as soon as this returns.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent ignores a line the kill cut short (it has no newline).
    let text = format!("{MARK}{line}\n");
    out.write_all(text.as_bytes()).expect("write to parent");
    out.flush().expect("flush to parent");
}

/// Not a test on its own: without `WEFT_CRASH_CHILD_DB` it returns at once. With it, this process
/// is the crash test's writer and loops until it is killed.
///
/// Protocol (each line prefixed with [`MARK`]):
/// * `READY` once the replica is open;
/// * `WILL C k` before creating k documents in one transaction, `ACK C [[id, body], ...]` after;
/// * `WILL U id patch` before a merge-patch update, `ACK U id patch` after;
/// * `WILL D id` before a delete, `ACK D id` after.
#[test]
#[ignore = "the child process of the crash tests, which run it; not a test on its own"]
fn crash_child_writer() {
    let Some(db) = std::env::var_os(CHILD_DB_ENV) else {
        panic!(
            "{CHILD_TEST} is the crash tests' child process: they run it with {CHILD_DB_ENV} set"
        );
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let run: u64 = std::env::var(CHILD_RUN_ENV).unwrap().parse().unwrap();
    let mut rng = SplitMix64::new(seed);
    let replica = Replica::open(&db).expect("child opens the database");
    // Documents earlier children created are fair game for updates and deletes.
    let mut known: Vec<DocumentId> = replica
        .list(COLLECTION)
        .expect("child lists documents")
        .into_iter()
        .map(|d| d.id)
        .collect();
    emit("READY");
    for i in 0u64.. {
        let roll = rng.below(20);
        if roll < 6 && !known.is_empty() {
            let id = known[rng.below(known.len() as u64) as usize];
            let note_len = rng.below(40) as usize;
            let mut patch = json!({
                "rev": format!("r{run}-{i}"),
                "touched_by": run,
                "note": rng.text(note_len),
            });
            if rng.chance(1, 4) {
                patch["extra"] = Value::Null; // delete a key (if present)
            } else if rng.chance(1, 3) {
                patch["extra"] = json!({"at": i, "list": [run, i, 0.5]});
            }
            emit(&format!("WILL U {id} {patch}"));
            replica.update(&id, patch.clone()).expect("child update");
            emit(&format!("ACK U {id} {patch}"));
        } else if roll < 7 && known.len() > 3 {
            let at = rng.below(known.len() as u64) as usize;
            let id = known.swap_remove(at);
            emit(&format!("WILL D {id}"));
            replica.delete(&id).expect("child delete");
            emit(&format!("ACK D {id}"));
        } else {
            let k = if roll < 9 { rng.range(2, 6) } else { 1 };
            let bodies: Vec<Value> = (0..k)
                .map(|j| {
                    // Now and then a large body, so a transaction spans many pages.
                    let pad = if rng.chance(1, 12) {
                        rng.range(4_000, 40_000)
                    } else {
                        rng.below(60)
                    };
                    json!({
                        "run": run,
                        "i": i,
                        "j": j,
                        "tag": format!("crash-r{run}-i{i}-j{j}-{:016x}", rng.next_u64()),
                        "f": 1.0,
                        "n": i as i64 - 500,
                        "nested": {"list": [j, {"deep": rng.text(8)}], "empty": {}},
                        "pad": rng.text(pad as usize),
                    })
                })
                .collect();
            emit(&format!("WILL C {k}"));
            let ids = if k == 1 {
                vec![
                    replica
                        .create(COLLECTION, bodies[0].clone())
                        .expect("child create"),
                ]
            } else {
                replica
                    .create_many(COLLECTION, bodies.clone())
                    .expect("child create_many")
            };
            let acked: Vec<Value> = ids
                .iter()
                .zip(&bodies)
                .map(|(id, body)| json!([id.to_string(), body]))
                .collect();
            known.extend(&ids);
            emit(&format!("ACK C {}", Value::Array(acked)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent's model of what must be in the file.

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Live(Value),
    Deleted,
}

/// A write the child announced but whose acknowledgement the parent never saw.
#[derive(Debug)]
enum Pending {
    Create { k: usize },
    Update { id: DocumentId, patch: Value },
    Delete { id: DocumentId },
}

#[derive(Default)]
struct Model {
    docs: BTreeMap<DocumentId, Expect>,
    /// Creation order, to check that listing follows it.
    order: Vec<DocumentId>,
    /// Durable writes: each is exactly one change-feed entry.
    writes: u64,
    /// Documents written in the current run (their Automerge data is re-checked after the kill).
    touched: BTreeSet<DocumentId>,
}

/// RFC 7386 merge patch on plain JSON (the reference the engine must agree with).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn parse_id(text: &str) -> DocumentId {
    text.parse()
        .unwrap_or_else(|e| panic!("child printed a bad id {text:?}: {e}"))
}

/// Applies one protocol line (without the mark) to the model.
fn apply_line(model: &mut Model, pending: &mut Option<Pending>, run: u64, line: &str) {
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    match verb {
        "READY" => assert!(pending.is_none()),
        "WILL" => {
            assert!(pending.is_none(), "WILL before the previous ACK: {line}");
            let (kind, arg) = rest.split_once(' ').expect("WILL kind arg");
            *pending = Some(match kind {
                "C" => Pending::Create {
                    k: arg.parse().unwrap(),
                },
                "U" => {
                    let (id, patch) = arg.split_once(' ').unwrap();
                    let id = parse_id(id);
                    assert!(
                        matches!(model.docs.get(&id), Some(Expect::Live(_))),
                        "child updates {id}, which the model has as {:?}",
                        model.docs.get(&id)
                    );
                    model.touched.insert(id);
                    Pending::Update {
                        id,
                        patch: serde_json::from_str(patch).unwrap(),
                    }
                }
                "D" => {
                    let id = parse_id(arg);
                    model.touched.insert(id);
                    Pending::Delete { id }
                }
                other => panic!("unknown WILL {other}"),
            });
        }
        "ACK" => {
            let (kind, arg) = rest.split_once(' ').expect("ACK kind arg");
            match (kind, pending.take()) {
                ("C", Some(Pending::Create { k })) => {
                    let pairs: Vec<(String, Value)> = serde_json::from_str(arg).unwrap();
                    assert_eq!(pairs.len(), k);
                    for (id, body) in pairs {
                        assert_eq!(body["run"], json!(run));
                        let id = parse_id(&id);
                        let old = model.docs.insert(id, Expect::Live(body));
                        assert!(old.is_none(), "id {id} acknowledged twice");
                        model.order.push(id);
                        model.touched.insert(id);
                        model.writes += 1;
                    }
                }
                ("U", Some(Pending::Update { id, patch })) => {
                    let (ack_id, ack_patch) = arg.split_once(' ').unwrap();
                    assert_eq!(parse_id(ack_id), id);
                    assert_eq!(serde_json::from_str::<Value>(ack_patch).unwrap(), patch);
                    let Some(Expect::Live(body)) = model.docs.get_mut(&id) else {
                        unreachable!()
                    };
                    merge_patch(body, &patch);
                    model.writes += 1;
                }
                ("D", Some(Pending::Delete { id })) => {
                    assert_eq!(parse_id(arg), id);
                    model.docs.insert(id, Expect::Deleted);
                    model.writes += 1;
                }
                (kind, p) => panic!("ACK {kind} does not match the pending {p:?}"),
            }
        }
        other => panic!("unknown protocol line {other:?}: {line}"),
    }
}

/// Checks the file against the model after a kill, and folds the one write that may have
/// committed without its acknowledgement being seen into the model (returns whether it had).
/// `full`: check the Automerge data of every document, not only those written in this run.
fn verify(db: &Path, model: &mut Model, pending: Option<Pending>, run: u64, full: bool) -> bool {
    let mut in_flight_committed = false;
    let replica = Replica::open(db).expect("reopen after kill -9");
    replica
        .integrity_check()
        .expect("integrity_check after kill -9");

    let state = |id: &DocumentId| -> Expect {
        match replica.get(id) {
            Ok(doc) => {
                assert_eq!(doc.collection, COLLECTION);
                assert!(!doc.heads.is_empty(), "{id} has no heads");
                Expect::Live(doc.body)
            }
            Err(Error::Deleted(_)) => Expect::Deleted,
            Err(e) => panic!("run {run}: acknowledged document {id} is unreadable: {e}"),
        }
    };

    // Every acknowledged document, with exactly the acknowledged content.
    let ids: Vec<DocumentId> = model.docs.keys().copied().collect();
    for id in ids {
        let want = model.docs[&id].clone();
        let got = state(&id);
        if got == want {
            continue;
        }
        let alternative = match &pending {
            Some(Pending::Update { id: pid, patch }) if *pid == id => {
                let Expect::Live(body) = &want else {
                    unreachable!()
                };
                let mut after = body.clone();
                merge_patch(&mut after, patch);
                assert_ne!(&after, body, "every patch changes the document");
                Some(Expect::Live(after))
            }
            Some(Pending::Delete { id: pid }) if *pid == id => Some(Expect::Deleted),
            _ => None,
        };
        match alternative {
            // The unacknowledged write committed before the kill: the new state is durable now.
            Some(alt) if got == alt => {
                model.docs.insert(id, alt);
                model.writes += 1;
                in_flight_committed = true;
            }
            _ => panic!(
                "run {run}: document {id} differs from what was acknowledged\n want: {want:?}\n  got: {got:?}\n pending: {pending:?}"
            ),
        }
    }

    // No document beyond those, except a whole unacknowledged batch.
    let listed = replica.list(COLLECTION).expect("list after kill");
    let unknown: Vec<_> = listed
        .iter()
        .filter(|d| !model.docs.contains_key(&d.id))
        .collect();
    match pending {
        Some(Pending::Create { k }) => assert!(
            unknown.is_empty() || unknown.len() == k,
            "run {run}: a batch of {k} creates is all or nothing, found {} of it",
            unknown.len()
        ),
        _ => assert!(
            unknown.is_empty(),
            "run {run}: documents nobody created: {unknown:?}"
        ),
    }
    for doc in unknown {
        let tag = doc.body["tag"].as_str().unwrap_or_default();
        assert!(
            doc.body["run"] == json!(run) && tag.starts_with(&format!("crash-r{run}-")),
            "run {run}: unexpected document {:?}",
            doc
        );
        model.docs.insert(doc.id, Expect::Live(doc.body.clone()));
        model.order.push(doc.id);
        model.touched.insert(doc.id);
        model.writes += 1;
        in_flight_committed = true;
    }

    // The listing is exactly the live documents, in creation order.
    let live: Vec<DocumentId> = model
        .order
        .iter()
        .filter(|id| matches!(model.docs[*id], Expect::Live(_)))
        .copied()
        .collect();
    let listed_ids: Vec<DocumentId> = listed.iter().map(|d| d.id).collect();
    assert_eq!(listed_ids, live, "run {run}: listing");

    // The change feed committed with the documents: one entry per durable write, in order.
    let feed = replica
        .changes_since(0, usize::MAX, None)
        .expect("feed after kill");
    assert_eq!(
        feed.len() as u64,
        model.writes,
        "run {run}: one feed entry per durable write"
    );
    for pair in feed.windows(2) {
        assert!(
            pair[0].seq < pair[1].seq,
            "feed seq not increasing: {pair:?}"
        );
    }
    assert!(feed.iter().all(|e| model.docs.contains_key(&e.id)));
    assert_eq!(replica.last_seq(), feed.last().map_or(0, |e| e.seq));
    let tombstones = model
        .docs
        .values()
        .filter(|e| **e == Expect::Deleted)
        .count();
    assert_eq!(
        replica.counts().unwrap(),
        (live.len() as u64, tombstones as u64, model.writes),
        "run {run}: counts"
    );

    // The Automerge data (chunks) agrees with the catalog: it loads, has the recorded heads, and
    // materializes to the stored body. `get` alone reads only the materialized JSON.
    let to_check: Vec<DocumentId> = if full {
        live.clone()
    } else {
        live.iter()
            .filter(|id| model.touched.contains(*id))
            .copied()
            .collect()
    };
    for id in to_check {
        let doc = replica.get(&id).unwrap();
        let past = replica
            .get_at(&id, &doc.heads)
            .unwrap_or_else(|e| panic!("run {run}: Automerge data of {id} does not load: {e}"));
        assert_eq!(
            past.body, doc.body,
            "run {run}: {id}: chunks and body disagree"
        );
    }
    model.touched.clear();
    in_flight_committed
}

/// Receives the next line event, failing the test after [`BOUND`].
fn next_event(rx: &Receiver<LineEvent>, what: &str) -> LineEvent {
    match rx.recv_timeout(BOUND) {
        Ok(ev) => ev,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: no output within {BOUND:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: reader thread gone"),
    }
}

fn spawn_child(db: &Path, seed: u64, run: u64) -> Child {
    let exe = std::env::current_exe().expect("current_exe");
    Command::new(exe)
        .args([
            "--exact",
            &child_test_name(),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB_ENV, db)
        .env(CHILD_SEED_ENV, seed.to_string())
        .env(CHILD_RUN_ENV, run.to_string())
        .env_remove("WEFT_SEED")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child writer")
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let seed = support::seed("kill_9_loses_no_acknowledged_write");
    let mut rng = SplitMix64::new(seed);
    let kills: u64 = std::env::var("WEFT_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let started = Instant::now();
    let mut model = Model::default();
    let mut acks_total = 0u64;
    let mut in_flight_kills = 0u64;
    let mut in_flight_committed = 0u64;

    for run in 1..=kills {
        let mut child = spawn_child(&db, rng.next_u64(), run);
        let stderr = support::stderr_collector(&mut child);
        let (rx, reader) = support::line_reader(child.stdout.take().unwrap());
        let mut pending: Option<Pending> = None;
        let mut protocol_lines = 0u64;

        // When to kill: right away (possibly before the child opened the file), or after a random
        // number of protocol lines — at once (usually inside the write just announced), after a
        // sub-millisecond delay, or a few milliseconds later.
        let (target, delay_us) = if rng.chance(1, 10) {
            (0, rng.below(3_000))
        } else {
            let delay = match rng.below(3) {
                0 => 0,
                1 => rng.below(1_000),
                _ => rng.below(5_000),
            };
            (rng.range(1, 60), delay)
        };
        while protocol_lines < target {
            match next_event(&rx, &format!("run {run}")) {
                LineEvent::Line(l) => {
                    if let Some(at) = l.find(MARK) {
                        apply_line(&mut model, &mut pending, run, &l[at + MARK.len()..]);
                        protocol_lines += 1;
                        acks_total += u64::from(l[at..].starts_with("@@WEFT ACK"));
                    }
                }
                LineEvent::Eof(rest) => {
                    let status = child.wait().unwrap();
                    panic!(
                        "run {run}: the child ended by itself ({status:?}, partial {rest:?}); stderr:\n{}",
                        stderr.join().unwrap()
                    );
                }
            }
        }
        if delay_us > 0 {
            // Fault injection, not synchronization: move the kill to a random instant.
            std::thread::sleep(Duration::from_micros(delay_us));
        }
        child.kill().expect("kill -9 the child");
        let status = child.wait().expect("reap the child");
        // Lines written before the kill still count: they were printed after their commit.
        // A line cut short by the kill (in `Eof`) was never complete, so it acknowledges nothing.
        while let LineEvent::Line(l) = next_event(&rx, &format!("run {run} drain")) {
            if let Some(at) = l.find(MARK) {
                apply_line(&mut model, &mut pending, run, &l[at + MARK.len()..]);
                acks_total += u64::from(l[at..].starts_with("@@WEFT ACK"));
            }
        }
        reader.join().unwrap();
        let err_text = stderr.join().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "run {run}: the child was not killed by SIGKILL: {status:?}; stderr:\n{err_text}"
        );
        assert!(
            !err_text.contains("panicked"),
            "run {run}: the child failed: {err_text}"
        );
        in_flight_kills += u64::from(pending.is_some());
        in_flight_committed += u64::from(verify(&db, &mut model, pending, run, run == kills));
    }

    let live = model
        .docs
        .values()
        .filter(|e| matches!(e, Expect::Live(_)))
        .count();
    println!(
        "{kills} kills ({in_flight_kills} with a write in flight, of which {in_flight_committed} had committed), {acks_total} acknowledged writes, {} documents ({live} live), {:.1} s",
        model.docs.len(),
        started.elapsed().as_secs_f64()
    );
    // The run exercised something: writes were acknowledged and some kills hit a write in flight.
    assert!(acks_total >= kills, "too few writes: {acks_total}");
    assert!(
        live > 0 && model.docs.len() > live,
        "creates and deletes both happened"
    );

    // Everything survives a trip through a bundle into a fresh replica (every document is loaded
    // and its heads checked by the importer).
    let replica = Replica::open(&db).unwrap();
    let fresh = Replica::open(dir.path().join("copy.db")).unwrap();
    let report = fresh
        .import_bundle(&replica.export_bundle(&weft::BundleScope::All).unwrap())
        .expect("bundle of the crashed file imports");
    assert_eq!(report.created as usize, live);
    let bodies = |r: &Replica| -> Vec<(DocumentId, Value)> {
        r.list(COLLECTION)
            .unwrap()
            .into_iter()
            .map(|d| (d.id, d.body))
            .collect()
    };
    assert!(bodies(&fresh) == bodies(&replica), "the copy differs");
}

// ---------------------------------------------------------------------------------------------
// A killed `weft import`.

fn import_line(round: usize, n: usize, pad: usize) -> Value {
    json!({"round": round, "n": n, "f": n as f64 + 0.5, "pad": "p".repeat(pad), "nested": {"n": n, "e": {}}})
}

#[test]
fn killed_import_leaves_only_whole_batches() {
    let seed = support::seed("killed_import_leaves_only_whole_batches");
    let mut rng = SplitMix64::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("import.db");
    const LINES: usize = 12_000;
    let mut survivors: BTreeMap<String, Vec<Value>> = BTreeMap::new();

    for round in 0..4 {
        let batch = rng.range(20, 300) as usize;
        let collection = format!("imp{round}");
        let pads: Vec<usize> = (0..LINES)
            .map(|_| {
                if rng.chance(1, 50) {
                    rng.range(2_000, 8_000) as usize
                } else {
                    rng.below(100) as usize
                }
            })
            .collect();
        let bodies: Vec<Value> = (0..LINES).map(|n| import_line(round, n, pads[n])).collect();
        let path = dir.path().join(format!("{collection}.ndjson"));
        let mut text = String::new();
        for b in &bodies {
            text.push_str(&b.to_string());
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();

        // Watch progress through our own connection (the import prints nothing until the end).
        let watcher = Replica::open(&db).unwrap();
        let (live_before, _, feed_before) = watcher.counts().unwrap();
        // Round 0 kills right away (while the file is still being parsed, or before); the others
        // once at least `threshold` documents of this round are committed.
        let threshold = if round == 0 {
            0
        } else {
            rng.range(1, (LINES / 4) as u64)
        };
        let delay_us = rng.below(2_000);
        let mut child = support::weft_command()
            .arg("--db")
            .arg(&db)
            .args([
                "import",
                path.to_str().unwrap(),
                "--collection",
                &collection,
            ])
            .args(["--batch", &batch.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft import");
        let stderr = support::stderr_collector(&mut child);
        let deadline = Instant::now() + Duration::from_secs(30);
        if threshold > 0 {
            // No event is published per batch, so poll the committed count (a read in WAL mode
            // never blocks the writer); the deadline is a failure bound.
            loop {
                let (live, _, _) = watcher.counts().unwrap();
                if live - live_before >= threshold {
                    break;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "round {round}: import ended before the kill ({status:?}): {}",
                        stderr.join().unwrap()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: import made no progress"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Fault injection: a random instant after the trigger.
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().expect("kill -9 weft import");
        let status = child.wait().unwrap();
        let err_text = stderr.join().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: import was not killed mid-way: {status:?} {err_text}"
        );
        drop(watcher);

        let replica = Replica::open(&db).expect("reopen after killed import");
        replica
            .integrity_check()
            .expect("integrity after killed import");
        let docs = replica.list(&collection).unwrap();
        let count = docs.len();
        assert!(
            count as u64 >= threshold,
            "round {round}: {count} < {threshold} seen before the kill"
        );
        assert!(count < LINES, "round {round}: the import was not cut short");
        assert_eq!(
            count % batch,
            0,
            "round {round}: {count} documents is not a whole number of batches of {batch}"
        );
        // Exactly the first `count` lines, in order, with exact content.
        let got: Vec<Value> = docs.into_iter().map(|d| d.body).collect();
        assert!(
            got == bodies[..count],
            "round {round}: the surviving documents are not the first {count} lines"
        );
        let (live, _, feed) = replica.counts().unwrap();
        assert_eq!(live, live_before + count as u64);
        assert_eq!(
            feed,
            feed_before + count as u64,
            "one feed entry per document"
        );
        // Earlier rounds are untouched.
        for (c, want) in &survivors {
            let now: Vec<Value> = replica
                .list(c)
                .unwrap()
                .into_iter()
                .map(|d| d.body)
                .collect();
            assert!(&now == want, "round {round}: collection {c} changed");
        }
        println!("round {round}: batch {batch}, threshold {threshold}, {count} documents survived");
        survivors.insert(collection, got);
    }

    // The file still takes a complete import afterwards.
    let path = dir.path().join("final.ndjson");
    let lines: Vec<Value> = (0..500).map(|n| import_line(99, n, 3)).collect();
    std::fs::write(
        &path,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    support::weft(
        &db,
        &[
            "import",
            path.to_str().unwrap(),
            "-c",
            "final",
            "--batch",
            "64",
        ],
    )
    .ok();
    let replica = Replica::open(&db).unwrap();
    let got: Vec<Value> = replica
        .list("final")
        .unwrap()
        .into_iter()
        .map(|d| d.body)
        .collect();
    assert!(got == lines, "complete import after the crashes");
    let ids: BTreeSet<DocumentId> = replica
        .list("final")
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids.len(), 500);
    replica.integrity_check().unwrap();
}
