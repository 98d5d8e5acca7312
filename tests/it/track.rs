//! Tracked tables with writers that are not weft: Python's `sqlite3` module runs plain
//! INSERT/UPDATE/DELETE on two app files, each tracked by its own replica, synced through a
//! relay. Waits are bounded polls of the app's file (another process's SQLite file has no
//! event to await); they fail the test at their deadline.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::types::Value as SqlValue;
use support::relay::{Relay, synced};
use weft::net::ConnectOptions;
use weft::track::{TrackSpec, Tracker};
use weft::{Origin, Replica};

const SCHEMA: &str = "CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT, done INTEGER NOT NULL DEFAULT 0, note TEXT, score REAL);";
const WAIT: Duration = Duration::from_secs(30);

/// Runs `sql` on `app` with Python's sqlite3 module, as an app would (a separate process).
fn py(app: &Path, sql: &str) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=30)\nc.executescript(sys.argv[2])\nc.commit()\nc.close()",
        ])
        .arg(app)
        .arg(sql)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 failed on {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `sql` with Python and returns its error message (it must fail).
fn py_err(app: &Path, sql: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.executescript(sys.argv[2])\nc.commit()",
        ])
        .arg(app)
        .arg(sql)
        .output()
        .expect("python3 runs");
    assert!(!out.status.success(), "{sql:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The rows of `todos` in `app`, ordered by key, as text.
fn rows(app: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(app).unwrap();
    conn.busy_timeout(WAIT).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, title, done, note, score FROM todos ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        let cols: Vec<String> = (0..5)
            .map(|i| match r.get::<_, SqlValue>(i).unwrap() {
                SqlValue::Null => "NULL".to_owned(),
                SqlValue::Integer(n) => n.to_string(),
                SqlValue::Real(x) => format!("{x:?}"),
                SqlValue::Text(t) => t,
                SqlValue::Blob(_) => "BLOB".to_owned(),
            })
            .collect();
        Ok(cols.join("|"))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The highest capture id ever handed out in `app` (SQLite's AUTOINCREMENT high-water mark):
/// how many row changes its triggers ever captured.
fn captures_ever(app: &Path) -> i64 {
    let conn = rusqlite::Connection::open(app).unwrap();
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = '_weft_capture'), 0)",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// Polls until `f` holds (bounded), then returns; fails with `what` and the last state.
fn wait_until<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    f: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let value = probe();
        if f(&value) {
            return value;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: still {value:?} after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn app(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    py(&path, SCHEMA);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_writers_converge_live_without_echo() {
    let dir = tempfile::tempdir().unwrap();
    let relay_replica = Replica::open(dir.path().join("relay.db")).unwrap();
    let relay = Relay::with_replica(relay_replica.clone(), &dir.path().join("relay"), |_| {}).await;
    let (app_a, app_b) = (app(dir.path(), "a.sqlite"), app(dir.path(), "b.sqlite"));
    py(
        &app_a,
        "INSERT INTO todos (id, title, score) VALUES ('t1', 'milk', 1.5), ('t2', 'eggs', NULL), ('t3', 'it''s \"quoted\"', 2);",
    );
    let ra = Replica::open(dir.path().join("a.db")).unwrap();
    let rb = Replica::open(dir.path().join("b.db")).unwrap();
    let (tracked, report) = ra.track(TrackSpec::new(&app_a, "todos")).unwrap();
    assert_eq!((tracked.collection.as_str(), report.folded), ("todos", 3));
    assert_eq!(ra.list("todos").unwrap().len(), 3);
    rb.track(TrackSpec::new(&app_b, "todos")).unwrap();
    let (ta, tb) = (Tracker::spawn(&ra).unwrap(), Tracker::spawn(&rb).unwrap());
    let ca = ra.connect(&relay.url(), ConnectOptions::default());
    let cb = rb.connect(&relay.url(), ConnectOptions::default());

    let want = rows(&app_a);
    wait_until("b receives a's rows", || rows(&app_b), |r| *r == want);
    assert_eq!(want[2], "t3|it's \"quoted\"|0|NULL|2.0");

    // Live, both directions: an update and a delete in a, an insert in b.
    py(
        &app_a,
        "UPDATE todos SET done = 1 WHERE id = 't1'; DELETE FROM todos WHERE id = 't2';",
    );
    py(
        &app_b,
        "INSERT INTO todos (id, title) VALUES ('t4', 'bread');",
    );
    let expected = vec![
        "t1|milk|1|NULL|1.5".to_owned(),
        "t3|it's \"quoted\"|0|NULL|2.0".to_owned(),
        "t4|bread|0|NULL|NULL".to_owned(),
    ];
    wait_until("a has b's insert", || rows(&app_a), |r| *r == expected);
    wait_until("b has a's edits", || rows(&app_b), |r| *r == expected);

    // No echo, shown with frame counts: 20 edits made in a while b's write-back is stopped
    // (b's replica receives them, its table does not), then 20 with b's tracker writing each
    // into b's table. An echo would make b capture the write, change its document and send
    // the change: more frames from b, a change in the relay's feed from b, a capture in b.
    let t3 = weft::track::row_document_id("todos", &[serde_json::json!("t3")], 0);
    let edits = |from: usize, wait_table: bool| {
        for i in from..from + 20 {
            py(
                &app_a,
                &format!("UPDATE todos SET note = 'edit {i}' WHERE id = 't3';"),
            );
            let note = format!("edit {i}");
            if wait_table {
                wait_until(
                    "b's table has the edit",
                    || rows(&app_b)[1].clone(),
                    |r| r.contains(&format!("{note}|")),
                );
            } else {
                wait_until(
                    "b's replica has the edit",
                    || rb.get(&t3).unwrap().body["note"].clone(),
                    |n| *n == note.as_str(),
                );
            }
        }
    };
    tb.stop();
    synced(&cb).await;
    let frames_before = relay.metric("weft_frames_in_total").await;
    edits(0, false);
    synced(&cb).await;
    let without_write_back = relay.metric("weft_frames_in_total").await - frames_before;
    let tb = Tracker::spawn(&rb).unwrap();
    wait_until(
        "b's tracker catches up",
        || rows(&app_b)[1].clone(),
        |r| r.contains("edit 19|"),
    );
    synced(&cb).await;
    let b_captured = captures_ever(&app_b);
    let b_seq = rb.last_seq();
    let relay_seq = relay_replica.last_seq();
    let frames_before = relay.metric("weft_frames_in_total").await;
    edits(20, true);
    synced(&cb).await;
    let with_write_back = relay.metric("weft_frames_in_total").await - frames_before;
    eprintln!(
        "frames the relay received for 20 edits in a: {without_write_back} without b's write-back, {with_write_back} with it"
    );
    assert_eq!(
        captures_ever(&app_b),
        b_captured,
        "b captured a remote write: echo"
    );
    let b_local = rb
        .changes_since(b_seq, usize::MAX, None)
        .unwrap()
        .into_iter()
        .filter(|e| e.origin == Origin::Local)
        .count();
    assert_eq!(b_local, 0, "b's replica changed a document by itself: echo");
    let from_b = relay_replica
        .changes_since(relay_seq, usize::MAX, None)
        .unwrap()
        .into_iter()
        .filter(|e| e.origin == Origin::Peer(rb.replica_id()))
        .count();
    assert_eq!(from_b, 0, "the relay stored a change sent by b: echo");
    // Timing may batch acknowledgements differently; an echo adds about three frames per edit.
    assert!(
        with_write_back <= without_write_back + without_write_back / 4 + 4,
        "{with_write_back} frames with write-back, {without_write_back} without"
    );
    assert_eq!(ta.last_error(), None);
    assert_eq!(tb.last_error(), None);

    ca.close().await;
    cb.close().await;
    ta.stop();
    tb.stop();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_merge_by_column_and_a_stopped_replica_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |_| {}).await;
    let (app_a, app_b) = (app(dir.path(), "a.sqlite"), app(dir.path(), "b.sqlite"));
    py(
        &app_a,
        "INSERT INTO todos (id, title) VALUES ('r1', 'draft'), ('r2', 'keep'), ('r3', 'old');",
    );
    let ra = Replica::open(dir.path().join("a.db")).unwrap();
    let rb = Replica::open(dir.path().join("b.db")).unwrap();
    ra.track(TrackSpec::new(&app_a, "todos")).unwrap();
    rb.track(TrackSpec::new(&app_b, "todos")).unwrap();
    // Manual sync (the `sync --once` path): fold, sync, write back.
    let once = |r: &Replica| {
        let r = r.clone();
        let url = relay.url();
        async move {
            r.sync_tracked().unwrap();
            let c = r.connect(&url, ConnectOptions::default());
            synced(&c).await;
            c.close().await;
            r.sync_tracked().unwrap()
        }
    };
    once(&ra).await;
    once(&rb).await;
    assert_eq!(rows(&app_b), rows(&app_a));

    // Both offline (nothing of weft runs): different columns of one row, a delete on one side
    // and an edit of the same row on the other, the same new key inserted on both sides.
    py(
        &app_a,
        "UPDATE todos SET title = 'final' WHERE id = 'r1'; DELETE FROM todos WHERE id = 'r3'; INSERT INTO todos (id, title, score) VALUES ('n1', 'from a', 1);",
    );
    py(
        &app_b,
        "UPDATE todos SET done = 1, note = 'b was here' WHERE id = 'r1'; UPDATE todos SET title = 'edited in b' WHERE id = 'r3'; INSERT INTO todos (id, note) VALUES ('n1', 'from b');",
    );
    // The captured changes wait in the app files until weft runs again.
    for app in [&app_a, &app_b] {
        let pending: i64 = rusqlite::Connection::open(app)
            .unwrap()
            .query_row("SELECT count(*) FROM _weft_capture", [], |r| r.get(0))
            .unwrap();
        assert!(pending >= 3, "{pending}");
    }
    once(&ra).await;
    once(&rb).await;
    once(&ra).await;
    let merged = rows(&app_a);
    assert_eq!(rows(&app_b), merged);
    assert_eq!(
        merged[1], "r1|final|1|b was here|NULL",
        "both sides' columns survive: {merged:?}"
    );
    assert_eq!(merged[2], "r2|keep|0|NULL|NULL");
    assert!(
        !merged.iter().any(|r| r.starts_with("r3|")),
        "the delete wins: {merged:?}"
    );
    // The same key inserted on both sides is one document; every column was set by both
    // inserts, so one insert's values win (Automerge's rule), the same on both sides.
    assert!(
        ["n1|from a|0|NULL|1.0", "n1|NULL|0|from b|NULL"].contains(&merged[0].as_str()),
        "{merged:?}"
    );
    assert_eq!(ra.list("todos").unwrap().len(), 3);

    // A key deleted and inserted again is a new document, and it replicates.
    py(
        &app_b,
        "INSERT INTO todos (id, title) VALUES ('r3', 'back again');",
    );
    once(&rb).await;
    once(&ra).await;
    assert!(rows(&app_a).contains(&"r3|back again|0|NULL|NULL".to_owned()));

    // b stops (no tracker, no connection) while a keeps writing live; b catches up on start.
    let ta = Tracker::spawn(&ra).unwrap();
    let ca = ra.connect(&relay.url(), ConnectOptions::default());
    py(
        &app_a,
        "INSERT INTO todos (id, title) VALUES ('late', 'written while b was down'); UPDATE todos SET score = 9.5 WHERE id = 'r2';",
    );
    let a_now = wait_until(
        "a's tracker folds the writes",
        || ra.list("todos").unwrap().len(),
        |n| *n == 5,
    );
    assert_eq!(a_now, 5);
    synced(&ca).await;
    let tb = Tracker::spawn(&rb).unwrap();
    let cb = rb.connect(&relay.url(), ConnectOptions::default());
    let want = rows(&app_a);
    wait_until("b catches up", || rows(&app_b), |r| *r == want);
    assert!(want.contains(&"r2|keep|0|NULL|9.5".to_owned()), "{want:?}");
    ca.close().await;
    cb.close().await;
    ta.stop();
    tb.stop();
    relay.stop().await;
}

#[test]
fn tables_weft_cannot_carry_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.sqlite");
    py(
        &app,
        "CREATE TABLE plain (a TEXT, b TEXT);
         CREATE TABLE counted (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
         CREATE TABLE numbered (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE files (id TEXT PRIMARY KEY, content BLOB);
         CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);",
    );
    let db = dir.path().join("r.db");
    let refused = |table: &str, needle: &str| {
        let out = support::weft(
            &db,
            &[
                "track",
                "add",
                "--app",
                app.to_str().unwrap(),
                "--table",
                table,
            ],
        )
        .runtime_error();
        assert!(out.stderr.contains(needle), "{table}: {}", out.stderr);
    };
    refused("plain", "no primary key");
    refused("counted", "AUTOINCREMENT");
    refused("numbered", "--allow-integer-key");
    refused("files", "BLOB");
    refused("missing", "no table");
    refused("_weft_state", "no table");
    // Nothing was installed for the refused tables.
    let conn = rusqlite::Connection::open(&app).unwrap();
    let triggers: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(triggers, 0);
    drop(conn);

    // --allow-integer-key for an app that chooses its ids; then a BLOB value written into an
    // untyped column is refused by the trigger, with the reason, and nothing is captured.
    support::weft(
        &db,
        &[
            "track",
            "add",
            "--app",
            app.to_str().unwrap(),
            "--table",
            "numbered",
            "--allow-integer-key",
        ],
    )
    .ok();
    support::weft(
        &db,
        &[
            "track",
            "add",
            "--app",
            app.to_str().unwrap(),
            "--table",
            "notes",
        ],
    )
    .ok();
    let err = py_err(&app, "INSERT INTO notes VALUES ('n', x'00ff');");
    assert!(err.contains("BLOB"), "{err}");
    let again = support::weft(
        &db,
        &[
            "track",
            "add",
            "--app",
            app.to_str().unwrap(),
            "--table",
            "notes",
        ],
    )
    .runtime_error();
    assert!(again.stderr.contains("tracked already"), "{}", again.stderr);

    let list = support::weft(&db, &["track", "list", "--json"]).ok();
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    assert!(list.stdout.contains("\"table\":\"notes\"") && list.stdout.contains("\"pending\":0"));

    // Another replica may not take a tracked table over.
    let other = dir.path().join("other.db");
    let taken = support::weft(
        &other,
        &[
            "track",
            "add",
            "--app",
            app.to_str().unwrap(),
            "--table",
            "notes",
        ],
    )
    .runtime_error();
    assert!(
        taken.stderr.contains("tracked by replica"),
        "{}",
        taken.stderr
    );

    // A row whose key is NULL (SQLite allows it in a TEXT key of a rowid table) is refused,
    // counted and logged; the pass goes on.
    py(
        &app,
        "INSERT INTO notes VALUES (NULL, 'no key'); INSERT INTO notes VALUES ('n1', 'fine');",
    );
    let pass = support::weft(&db, &["track", "sync"]).ok();
    assert!(pass.stderr.contains("1 refused"), "{}", pass.stderr);

    // An app file that went away: passes fail saying so and how to forget it; remove forgets.
    let gone = dir.path().join("gone.sqlite");
    py(&gone, SCHEMA);
    support::weft(
        &db,
        &[
            "track",
            "add",
            "--app",
            gone.to_str().unwrap(),
            "--table",
            "todos",
        ],
    )
    .ok();
    std::fs::remove_file(&gone).unwrap();
    let failed = support::weft(&db, &["track", "sync"]).runtime_error();
    assert!(
        failed.stderr.contains("no such file") && failed.stderr.contains("track remove"),
        "{}",
        failed.stderr
    );
    support::weft(
        &db,
        &[
            "track",
            "remove",
            "--app",
            gone.to_str().unwrap(),
            "--table",
            "todos",
        ],
    )
    .ok();

    // Remove folds in what was captured first, then leaves the app's file as it was.
    py(
        &app,
        "INSERT INTO notes VALUES ('n2', 'captured, not yet folded');",
    );
    for table in ["notes", "numbered"] {
        support::weft(
            &db,
            &[
                "track",
                "remove",
                "--app",
                app.to_str().unwrap(),
                "--table",
                table,
            ],
        )
        .ok();
    }
    let replica = Replica::open(&db).unwrap();
    assert!(
        replica
            .list("notes")
            .unwrap()
            .iter()
            .any(|d| d.body["body"] == "captured, not yet folded")
    );
    let conn = rusqlite::Connection::open(&app).unwrap();
    let weft_objects: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE '_weft%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(weft_objects, 0);
}

#[test]
fn added_columns_keep_replicating() {
    let dir = tempfile::tempdir().unwrap();
    let (app_a, app_b) = (app(dir.path(), "a.sqlite"), app(dir.path(), "b.sqlite"));
    py(
        &app_a,
        "INSERT INTO todos (id, title) VALUES ('x', 'before');",
    );
    let ra = Replica::open(dir.path().join("a.db")).unwrap();
    let rb = Replica::open(dir.path().join("b.db")).unwrap();
    ra.track(TrackSpec::new(&app_a, "todos")).unwrap();
    rb.track(TrackSpec::new(&app_b, "todos")).unwrap();
    // Both apps migrate; a writes the new column, also in the same script as the migration
    // (before weft saw the new schema).
    py(
        &app_b,
        "ALTER TABLE todos ADD COLUMN priority INTEGER DEFAULT 0;",
    );
    py(
        &app_a,
        "ALTER TABLE todos ADD COLUMN priority INTEGER DEFAULT 0; UPDATE todos SET priority = 3 WHERE id = 'x'; INSERT INTO todos (id, title, priority) VALUES ('y', 'after', 7);",
    );
    ra.sync_tracked().unwrap();
    let x = ra
        .list("todos")
        .unwrap()
        .into_iter()
        .find(|d| d.body["id"] == "x")
        .unwrap();
    assert_eq!(x.body["priority"], 3, "{}", x.body);
    let bundle = ra.export_bundle(&weft::BundleScope::All).unwrap();
    rb.import_bundle(&bundle).unwrap();
    rb.sync_tracked().unwrap();
    let conn = rusqlite::Connection::open(&app_b).unwrap();
    let got: Vec<(String, i64)> = conn
        .prepare("SELECT id, priority FROM todos ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, [("x".to_owned(), 3), ("y".to_owned(), 7)]);
    // A column b does not have stays in the document, and b's table is written without it.
    py(
        &app_a,
        "ALTER TABLE todos ADD COLUMN tag TEXT; UPDATE todos SET tag = 'only in a', title = 'renamed' WHERE id = 'x';",
    );
    ra.sync_tracked().unwrap();
    rb.import_bundle(&ra.export_bundle(&weft::BundleScope::All).unwrap())
        .unwrap();
    rb.sync_tracked().unwrap();
    assert_eq!(rows(&app_b)[0], "x|renamed|0|NULL|NULL");
    let doc = rb
        .list("todos")
        .unwrap()
        .into_iter()
        .find(|d| d.body["id"] == "x")
        .unwrap();
    assert_eq!(doc.body["tag"], "only in a");
}

/// `weft track sync` on `db`, as a child process.
fn track_sync(db: &Path) -> std::process::Child {
    support::weft_command()
        .args(["--db"])
        .arg(db)
        .args(["track", "sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGKILLs `weft track sync` runs at random moments until one finishes by itself (at most
/// `kills` kills), then runs one to the end. Returns how many were killed.
fn kill_until_done(
    db: &Path,
    rng: &mut support::SplitMix64,
    kills: usize,
    max_delay_ms: u64,
) -> usize {
    let mut killed = 0;
    while killed < kills {
        let mut child = track_sync(db);
        let delay = Duration::from_millis(rng.range(2, max_delay_ms));
        let start = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "track sync failed: {status:?}");
                break true;
            }
            if start.elapsed() >= delay {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if finished {
            return killed;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed += 1;
    }
    let status = track_sync(db).wait().unwrap();
    assert!(status.success());
    killed
}

#[test]
fn kill_9_while_folding_or_applying_loses_nothing_and_doubles_nothing() {
    let seed = support::seed("track kill -9");
    let mut rng = support::SplitMix64::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let (app_a, app_b) = (app(dir.path(), "a.sqlite"), app(dir.path(), "b.sqlite"));
    let (db_a, db_b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for (db, app) in [(&db_a, &app_a), (&db_b, &app_b)] {
        support::weft(
            db,
            &[
                "track",
                "add",
                "--app",
                app.to_str().unwrap(),
                "--table",
                "todos",
            ],
        )
        .ok();
    }
    // 1,500 rows, each inserted and then updated twice, in separate statements: 4,500
    // captured changes while weft is not running.
    const ROWS: usize = 1500;
    py(
        &app_a,
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
             INSERT INTO todos (id, title, score) SELECT printf('row%05d', i), 'v0', i FROM n;
             UPDATE todos SET title = 'v1';
             UPDATE todos SET title = 'v2', done = 1;"
        ),
    );
    let killed = kill_until_done(&db_a, &mut rng, 6, 500);
    eprintln!("fold: {killed} runs of `weft track sync` killed with SIGKILL");

    // Every captured change is in the replica exactly once: each row's document is the row,
    // and has exactly three local changes (created, v1, v2), none folded twice.
    let ra = Replica::open(&db_a).unwrap();
    let docs = ra.list("todos").unwrap();
    assert_eq!(docs.len(), ROWS);
    let mut per_doc = std::collections::HashMap::new();
    for e in ra.changes_since(0, usize::MAX, Some("todos")).unwrap() {
        assert_eq!(e.origin, Origin::Local);
        *per_doc.entry(e.id).or_insert(0) += 1;
    }
    assert!(
        per_doc.values().all(|n| *n == 3),
        "changes per document: {:?}",
        per_doc
            .values()
            .filter(|n| **n != 3)
            .take(5)
            .collect::<Vec<_>>()
    );
    for d in &docs {
        assert_eq!(
            (d.body["title"].as_str(), d.body["done"].as_i64()),
            (Some("v2"), Some(1)),
            "{}",
            d.body
        );
    }
    let pending: i64 = rusqlite::Connection::open(&app_a)
        .unwrap()
        .query_row("SELECT count(*) FROM _weft_capture", [], |r| r.get(0))
        .unwrap();
    assert_eq!(pending, 0);

    // Every applied remote change is in the table: b gets a's documents by bundle, and its
    // write-back is killed as often.
    let bundle = dir.path().join("a.bundle");
    support::weft(&db_a, &["export-bundle", bundle.to_str().unwrap()]).ok();
    support::weft(&db_b, &["import-bundle", bundle.to_str().unwrap()]).ok();
    let killed = kill_until_done(&db_b, &mut rng, 6, 150);
    eprintln!("write-back: {killed} runs killed");
    assert_eq!(rows(&app_b), rows(&app_a));
    assert_eq!(
        captures_ever(&app_b),
        0,
        "b's write-back was captured: echo"
    );
    let rb = Replica::open(&db_b).unwrap();
    let applied: i64 = rusqlite::Connection::open(&app_b)
        .unwrap()
        .query_row("SELECT applied_seq FROM _weft_state", [], |r| r.get(0))
        .unwrap();
    assert_eq!(applied as u64, rb.last_seq());
}

/// The README's worked example, with real processes: `weft track add` twice, `weft serve`,
/// two `weft sync --watch`, plain SQL on both app files.
#[test]
fn the_readme_example_converges_with_real_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (app_a, app_b) = (app(dir.path(), "a.sqlite"), app(dir.path(), "b.sqlite"));
    let (db_a, db_b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for (db, app) in [(&db_a, &app_a), (&db_b, &app_b)] {
        support::weft(
            db,
            &[
                "track",
                "add",
                "--app",
                app.to_str().unwrap(),
                "--table",
                "todos",
            ],
        )
        .ok();
    }
    let relay = support::relay::RelayProcess::start_with(&dir.path().join("relay"), &[]);
    let watch = |db: &Path| {
        KillOnDrop(
            support::weft_command()
                .arg("--db")
                .arg(db)
                .args(["sync", "--watch", "--server", &relay.url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _children = [watch(&db_a), watch(&db_b)];

    py(
        &app_a,
        "INSERT INTO todos (id, title) VALUES ('t1', 'buy milk');",
    );
    wait_until(
        "b sees a's insert",
        || rows(&app_b),
        |r| *r == ["t1|buy milk|0|NULL|NULL"],
    );
    py(
        &app_b,
        "UPDATE todos SET done = 1 WHERE id = 't1'; INSERT INTO todos (id, title) VALUES ('t2', 'call mum');",
    );
    let want = vec![
        "t1|buy milk|1|NULL|NULL".to_owned(),
        "t2|call mum|0|NULL|NULL".to_owned(),
    ];
    wait_until("a sees b's edits", || rows(&app_a), |r| *r == want);
    py(&app_a, "DELETE FROM todos WHERE id = 't1';");
    wait_until("b sees a's delete", || rows(&app_b), |r| *r == want[1..]);
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
