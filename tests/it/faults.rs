//! Honest under faults: when storage fails (a full disk, simulated deterministically without
//! root by a quota — SQLite's `max_page_count` through `--max-db-size` — or by a store wrapper
//! that fails commits), nothing reports "in sync", acknowledges or counts a write that was not
//! committed; the cause is on screen, in the exit code and in the status; the database stays
//! intact; and once the fault clears, everything converges with nothing lost. Also: a
//! connected replica forwards commits that another process makes to its file.
//!
//! Real `weft` processes and real relays on 127.0.0.1; every wait is bounded.
#![cfg(feature = "net")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use weft::net::{ConnectOptions, OfflineError, Status};
use weft::store::sqlite::{SqliteStore, StoreOptions};
use weft::{Replica, ReplicaOptions};

use crate::support::faulty_store::{FaultHandle, FaultyStore};
use crate::support::relay::{Relay, RelayProcess, await_status};
use crate::support::{self, KillOnDrop, LineEvent, weft, weft_command, weft_stdin};

const LIMIT: Duration = Duration::from_secs(30);

/// `count` documents as NDJSON, each about 300 bytes.
fn ndjson(count: usize) -> Vec<u8> {
    let pad = "x".repeat(250);
    (0..count)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{pad}\"}}\n"))
        .collect::<String>()
        .into_bytes()
}

fn live_count(db: &Path) -> usize {
    Replica::open(db).unwrap().list("todos").unwrap().len()
}

/// `GET /healthz` on the relay behind `url`: (status code, body).
fn healthz(url: &str) -> (u16, String) {
    let addr: SocketAddr = url.trim_start_matches("ws://").parse().unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// Waits (bounded) until `/healthz` answers `code`.
fn await_health(url: &str, code: u16) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (got, body) = healthz(url);
        if got == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still {got} {body:?}, expected {code}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_no_false_sync(what: &str, out: &support::Output) {
    assert!(
        !out.stderr.contains("in sync with") && !out.stdout.contains("in sync with"),
        "{what}: reported in sync: {out:?}"
    );
}

#[test]
fn a_full_client_disk_fails_the_sync_with_the_cause_and_a_later_sync_converges() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]);
    let source = dir.path().join("source.db");
    weft_stdin(&source, &["import", "-", "-c", "todos"], &ndjson(3000)).ok();
    weft(&source, &["sync", "--server", &relay.url, "--once"]).ok();

    // A client whose disk holds a few pages more than its empty database.
    let client = dir.path().join("client.db");
    weft(
        &client,
        &["doc", "create", "-c", "notes", "--json", "{\"a\":1}"],
    )
    .ok();
    let full = weft(
        &client,
        &[
            "--max-db-size",
            "150KB",
            "sync",
            "--server",
            &relay.url,
            "--once",
        ],
    )
    .runtime_error();
    assert_no_false_sync("client disk full", &full);
    assert!(
        full.stderr.contains("local storage failed") && full.stderr.contains("full"),
        "{}",
        full.stderr
    );
    Replica::open(&client).unwrap().integrity_check().unwrap();
    assert_eq!(live_count(&client), 0, "no partial, unreported writes");

    // Room again: the same command converges, nothing lost on either side.
    let ok = weft(&client, &["sync", "--server", &relay.url, "--once"]).ok();
    assert!(ok.stderr.contains("in sync with"), "{}", ok.stderr);
    assert_eq!(live_count(&client), 3000);
    assert_eq!(
        Replica::open(&client).unwrap().list("notes").unwrap().len(),
        1
    );
}

#[test]
fn a_full_relay_disk_refuses_the_push_says_so_on_healthz_and_converges_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let pusher = dir.path().join("pusher.db");
    weft_stdin(&pusher, &["import", "-", "-c", "todos"], &ndjson(3000)).ok();
    {
        let relay = RelayProcess::start(&data, &["--max-db-size".as_ref(), "300KB".as_ref()]);
        assert_eq!(healthz(&relay.url).0, 200);
        for attempt in ["first", "second"] {
            let out = weft(&pusher, &["sync", "--server", &relay.url, "--once"]).runtime_error();
            assert_no_false_sync(attempt, &out);
            assert!(
                out.stderr.contains("relay storage failed") && out.stderr.contains("full"),
                "{attempt}: {}",
                out.stderr
            );
        }
        let body = await_health(&relay.url, 503);
        assert!(body.contains("full"), "{body}");
        // Reads still work: a client that pulls gets what the relay holds, and is told the
        // truth about it (in sync with the relay's content).
        let reader = dir.path().join("reader.db");
        weft(&reader, &["sync", "--server", &relay.url, "--once"]).ok();
    }
    Replica::open(data.join("relay.db"))
        .unwrap()
        .integrity_check()
        .unwrap();
    // The disk has room again (no quota): the same push converges, and a second client
    // pulls everything.
    let relay = RelayProcess::start(&data, &[]);
    assert_eq!(healthz(&relay.url).0, 200);
    weft(&pusher, &["sync", "--server", &relay.url, "--once"]).ok();
    let puller = dir.path().join("puller.db");
    weft(&puller, &["sync", "--server", &relay.url, "--once"]).ok();
    assert_eq!(live_count(&puller), 3000);
}

#[test]
fn importing_into_a_full_database_fails_with_the_cause_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    weft(
        &db,
        &["doc", "create", "-c", "todos", "--json", "{\"keep\":true}"],
    )
    .ok();
    let out = weft_stdin(
        &db,
        &["--max-db-size", "150KB", "import", "-", "-c", "todos"],
        &ndjson(3000),
    )
    .runtime_error();
    assert!(out.stderr.contains("full"), "{}", out.stderr);
    let replica = Replica::open(&db).unwrap();
    replica.integrity_check().unwrap();
    assert_eq!(replica.list("todos").unwrap().len(), 1);
}

/// An in-process relay over a store whose commits the test can make fail.
struct FaultyRelay {
    url: String,
    faults: FaultHandle,
    replica: Replica,
    _relay: Relay,
    _dir: tempfile::TempDir,
}

impl FaultyRelay {
    async fn start() -> FaultyRelay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let (store, faults) = FaultyStore::new(store);
        let replica =
            Replica::with_store(Box::new(store), path, ReplicaOptions::default()).unwrap();
        let relay = Relay::with_replica(replica.clone(), dir.path(), |_| {}).await;
        FaultyRelay {
            url: relay.url(),
            faults,
            replica,
            _relay: relay,
            _dir: dir,
        }
    }

    fn fail_commits(&self, n: u32) {
        self.faults.lock().unwrap().failing_commits = n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_relay_store_ends_live_sessions_with_the_cause_and_recovers_by_itself() {
    let relay = FaultyRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let writer = Replica::open(dir.path().join("w.db")).unwrap();
    let connection = writer.connect(&relay.url, ConnectOptions::default());
    tokio::time::timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    let before = writer.create("todos", json!({"n": 0})).unwrap();
    tokio::time::timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();

    relay.fail_commits(u32::MAX);
    let mut written = vec![before];
    for n in 1..=20 {
        written.push(writer.create("todos", json!({ "n": n })).unwrap());
    }
    let status = await_status(&connection, |s| matches!(s, Status::Offline { .. })).await;
    match &status {
        Status::Offline {
            error: OfflineError::RelayStorage(cause),
        } => assert!(cause.contains("full"), "{cause}"),
        other => panic!("{other:?}"),
    }
    let body = await_health(&relay.url, 503);
    assert!(body.contains("injected fault"), "{body}");
    // Nothing of the refused writes is on the relay, and it never said otherwise.
    assert_eq!(relay.replica.list("todos").unwrap().len(), 1);

    // The disk has room again: the relay notices by itself (probe), the client's backoff
    // brings it back, and everything arrives.
    relay.fail_commits(0);
    await_health(&relay.url, 200);
    tokio::time::timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    for id in &written {
        relay.replica.get(id).unwrap();
    }
    relay.replica.integrity_check().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_client_store_goes_offline_with_the_cause_then_converges() {
    let relay = FaultyRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
    let (store, faults) = FaultyStore::new(store);
    let client = Replica::with_store(Box::new(store), path, ReplicaOptions::default()).unwrap();
    let options = ConnectOptions {
        initial_backoff: Duration::from_millis(50),
        ..ConnectOptions::default()
    };
    let connection = client.connect(&relay.url, options);
    tokio::time::timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();

    // Another replica writes through the relay while this client cannot store anything.
    let other = Replica::open(dir.path().join("other.db")).unwrap();
    let other_connection = other.connect(&relay.url, ConnectOptions::default());
    faults.lock().unwrap().failing_commits = u32::MAX;
    let ids: Vec<_> = (0..20)
        .map(|n| other.create("todos", json!({ "n": n })).unwrap())
        .collect();
    tokio::time::timeout(LIMIT, other_connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    let status = await_status(&connection, |s| matches!(s, Status::Offline { .. })).await;
    match &status {
        Status::Offline {
            error: OfflineError::LocalStorage(cause),
        } => assert!(cause.is_full(), "{cause:?}"),
        other => panic!("{other:?}"),
    }
    assert_ne!(connection.status(), Status::Synced);

    faults.lock().unwrap().failing_commits = 0;
    tokio::time::timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    for id in &ids {
        client.get(id).unwrap();
    }
    client.integrity_check().unwrap();
}

/// `weft sync --watch` on a file forwards what a second process writes to that file, within
/// the poll interval (50 ms) plus a round trip — measured, and bounded generously.
#[test]
fn sync_watch_sends_what_another_process_writes_to_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]);
    let laptop = dir.path().join("laptop.db");
    let phone = dir.path().join("phone.db");
    weft(
        &laptop,
        &["doc", "create", "-c", "todos", "--json", "{\"first\":true}"],
    )
    .ok();
    let watcher = KillOnDrop(
        weft_command()
            .arg("--db")
            .arg(&laptop)
            .args(["sync", "--watch", "--server", &relay.url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The phone follows the relay live; each change it receives is a line on its stdout.
    let mut follower = KillOnDrop(
        weft_command()
            .arg("--db")
            .arg(&phone)
            .args(["sync", "--watch", "--server", &relay.url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines, _reader) = support::line_reader(follower.stderr.take().unwrap());
    let await_line = |what: &str, pattern: &str| -> Duration {
        let start = Instant::now();
        loop {
            match lines.recv_timeout(LIMIT) {
                Ok(LineEvent::Line(line)) if line.contains(pattern) => return start.elapsed(),
                Ok(LineEvent::Line(_)) => continue,
                other => panic!("{what}: {other:?}"),
            }
        }
    };
    await_line("the first document", "Created");
    for round in 0..3 {
        let created = weft(
            &laptop,
            &[
                "doc",
                "create",
                "-c",
                "todos",
                "--json",
                &format!("{{\"round\":{round}}}"),
            ],
        )
        .ok();
        let id = created.stdout.trim().to_owned();
        let latency = await_line("the second process's document", &id);
        eprintln!(
            "round {round}: the other process's write reached another replica in {latency:?}"
        );
    }
    drop((watcher, follower));
    assert_eq!(live_count(&phone), 4);
}

/// The change-feed mirror (`examples/mirror --follow`) picks up a commit another process
/// makes to the file it follows.
#[test]
fn the_mirror_follows_commits_of_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.db");
    weft(
        &app,
        &["doc", "create", "-c", "todos", "--json", "{\"a\":1}"],
    )
    .ok();
    let mirror = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/mirror");
    assert!(
        mirror.exists(),
        "{} (built by cargo test)",
        mirror.display()
    );
    let mut child = KillOnDrop(
        std::process::Command::new(mirror)
            .arg(&app)
            .arg(dir.path().join("mirror.sqlite"))
            .arg("--follow")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines, _reader) = support::line_reader(child.stdout.take().unwrap());
    let next = || match lines.recv_timeout(LIMIT) {
        Ok(LineEvent::Line(line)) => line,
        other => panic!("{other:?}"),
    };
    assert!(next().contains("Created"));
    let id = weft(
        &app,
        &["doc", "create", "-c", "todos", "--json", "{\"b\":2}"],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    let line = next();
    assert!(line.contains(&id) && line.contains("Created"), "{line}");
}
