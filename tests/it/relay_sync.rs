//! Replication through a real relay on 127.0.0.1: real processes (`weft serve`, `weft sync
//! --once`), and in-process clients (`Replica::connect`) for live propagation. Every wait is
//! bounded; live delivery is awaited on a change subscription, never polled.
#![cfg(feature = "net")]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use weft::net::{ConnectOptions, Status};
use weft::{Replica, Scope};

use crate::support::relay::{Relay, RelayProcess, synced};
use crate::support::{SplitMix64, ok, weft, weft_command};

const LIMIT: Duration = Duration::from_secs(30);

fn sorted_list(db: &Path) -> Vec<Value> {
    let mut docs: Vec<Value> = ok(db, &["doc", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    docs.sort_by_key(|d| d["id"].as_str().unwrap().to_owned());
    docs
}

#[test]
fn three_cli_replicas_converge_through_a_relay_process() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]);
    let dbs: Vec<_> = ["a.db", "b.db", "c.db"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();

    // Offline edits on a and b (c starts empty).
    let shared = ok(
        &dbs[0],
        &[
            "doc",
            "create",
            "-c",
            "todos",
            "--json",
            r#"{"title":"shared","n":0}"#,
        ],
    )
    .trim()
    .to_owned();
    for i in 0..20 {
        ok(
            &dbs[0],
            &[
                "doc",
                "create",
                "-c",
                "todos",
                "--json",
                &format!(r#"{{"a":{i}}}"#),
            ],
        );
        ok(
            &dbs[1],
            &[
                "doc",
                "create",
                "-c",
                "notes",
                "--json",
                &format!(r#"{{"b":{i}}}"#),
            ],
        );
    }
    ok(&dbs[0], &["sync", "--server", &relay.url, "--once"]);
    ok(&dbs[1], &["sync", "--server", &relay.url, "--once"]);
    // Concurrent offline edits to the same document on a and b, and a delete on b.
    ok(
        &dbs[0],
        &["doc", "update", &shared, "--merge", r#"{"from_a":true}"#],
    );
    ok(
        &dbs[1],
        &["doc", "update", &shared, "--merge", r#"{"from_b":true}"#],
    );
    let victim = sorted_list(&dbs[1])
        .iter()
        .find(|d| d["collection"] == "notes")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(&dbs[1], &["doc", "delete", &victim]);

    for _ in 0..2 {
        for db in &dbs {
            let out = weft(db, &["sync", "--server", &relay.url, "--once"]).ok();
            assert!(out.stderr.contains("in sync with"), "{out:?}");
        }
    }
    let a = sorted_list(&dbs[0]);
    assert_eq!(a.len(), 40, "21 todos + 20 notes - 1 deleted");
    assert_eq!(a, sorted_list(&dbs[1]));
    assert_eq!(a, sorted_list(&dbs[2]));
    let merged: Value = serde_json::from_str(&ok(&dbs[2], &["doc", "get", &shared])).unwrap();
    assert_eq!(
        merged,
        json!({"title": "shared", "n": 0, "from_a": true, "from_b": true})
    );
    let gone = weft(&dbs[2], &["doc", "get", &victim]).runtime_error();
    assert!(gone.stderr.contains("deleted"), "{gone:?}");
    // Same heads everywhere, not just bodies.
    let heads = |db: &Path| -> Value {
        serde_json::from_str::<Value>(&ok(db, &["doc", "get", "--meta", &shared])).unwrap()["heads"]
            .clone()
    };
    assert_eq!(heads(&dbs[0]), heads(&dbs[2]));
    assert_eq!(heads(&dbs[1]), heads(&dbs[2]));
}

#[test]
fn sync_once_reports_an_unreachable_relay() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = weft(
        &dir.path().join("x.db"),
        &[
            "sync",
            "--server",
            &format!("ws://127.0.0.1:{port}"),
            "--once",
        ],
    )
    .runtime_error();
    assert!(
        out.stderr.contains("cannot reach") && out.stderr.contains("refused"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_reach_connected_replicas_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |_| {}).await;
    let url = relay.url();
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();
    let ca = a.connect(&url, ConnectOptions::default());
    let cb = b.connect(&url, ConnectOptions::default());
    synced(&ca).await;
    synced(&cb).await;

    // b waits on its change feed for a's writes: delivered by push, no polling anywhere.
    let mut feed = b.subscribe(Scope::All, b.last_seq());
    let id = a.create("todos", json!({"title": "live"})).unwrap();
    let created = tokio::task::spawn_blocking(move || {
        let e = feed
            .next_timeout(LIMIT)
            .unwrap()
            .expect("the creation reached b");
        (e, feed)
    })
    .await
    .unwrap();
    let (event, mut feed) = created;
    assert_eq!(event.id, id);
    let heads = a.update(&id, json!({"done": true})).unwrap();
    let event = tokio::task::spawn_blocking(move || {
        feed.next_timeout(LIMIT)
            .unwrap()
            .expect("the edit reached b")
    })
    .await
    .unwrap();
    assert_eq!(event.id, id);
    let mut got = b.get(&id).unwrap();
    got.heads.sort();
    let mut want = heads;
    want.sort();
    assert_eq!(got.heads, want);
    assert_eq!(got.body, json!({"title": "live", "done": true}));
    // After live traffic, the writer checks again and finds itself in sync.
    tokio::time::timeout(LIMIT, ca.wait_synced())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ca.status(), Status::Synced);
    assert_eq!(
        a.catalog_summary(&Scope::All).unwrap(),
        b.catalog_summary(&Scope::All).unwrap()
    );

    ca.close().await;
    cb.close().await;
    relay.stop().await;
}

/// The relay is killed (SIGKILL) in the middle of a large sync, restarted on the same data, and
/// everything still converges; a client killed mid-sync recovers the same way.
#[test]
fn kill_9_of_relay_or_client_mid_sync_then_converge() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    // ~1.5 KB per document: the push spans several frames, so the relay commits it in steps
    // and the kill lands between them.
    // (Incompressible padding: Automerge deflates its columns.)
    let mut rng = SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let mut noise = |len: usize| -> String {
        (0..len)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect()
    };
    let lines: String = (0..3000)
        .map(|i| {
            format!(
                "{{\"title\":\"todo {i}\",\"n\":{i},\"pad\":\"{}\"}}\n",
                noise(1500)
            )
        })
        .collect();
    let ndjson = dir.path().join("docs.ndjson");
    std::fs::write(&ndjson, lines).unwrap();
    ok(&a, &["import", ndjson.to_str().unwrap(), "-c", "todos"]);

    // Kill the relay while a pushes its documents.
    let mut relay = RelayProcess::start(&data, &[]);
    let mut push = weft_command()
        .arg("--db")
        .arg(&a)
        .args(["sync", "--server", &relay.url, "--once"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the relay has stored part of the push (fault injection, not synchronization).
    let relay_db = data.join("relay.db");
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let stored = live_documents(&relay_db);
        if stored > 0 {
            eprintln!("killing the relay with {stored} of 3000 documents stored");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay stored nothing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    let _ = push.wait();

    // The relay's file is intact; restart on the same data and finish.
    weft::Replica::open(&relay_db)
        .unwrap()
        .integrity_check()
        .unwrap();
    let relay = RelayProcess::start(&data, &[]);
    ok(&a, &["sync", "--server", &relay.url, "--once"]);

    // Kill a fresh client while it pulls; its file stays intact and the next sync completes.
    let mut pull = weft_command()
        .arg("--db")
        .arg(&b)
        .args(["sync", "--server", &relay.url, "--once"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let got = live_documents(&b);
        if got > 0 || pull.try_wait().unwrap().is_some() {
            eprintln!("killing the client with {got} of 3000 documents received");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client received nothing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = pull.kill();
    let _ = pull.wait();
    weft::Replica::open(&b).unwrap().integrity_check().unwrap();
    ok(&b, &["sync", "--server", &relay.url, "--once"]);

    let listed = sorted_list(&a);
    assert_eq!(listed.len(), 3000);
    assert_eq!(listed, sorted_list(&b));
    let relay_view = weft::Replica::open(&relay_db).unwrap();
    assert_eq!(
        relay_view.catalog_summary(&Scope::All).unwrap(),
        weft::Replica::open(&a)
            .unwrap()
            .catalog_summary(&Scope::All)
            .unwrap()
    );
}

/// Documents stored in a weft file, read with a plain read-only SQLite connection (a WAL reader
/// never blocks the writing process).
fn live_documents(db: &Path) -> i64 {
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    rusqlite::Connection::open_with_flags(db, flags)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM documents WHERE deleted = 0",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

/// A panic while applying one session's input (a bug some input triggers; here a store that
/// panics loading one document) ends that session only: the batch is rolled back and applied
/// again input by input, the other sessions' documents are stored and acknowledged, the
/// panicking session's later inputs are skipped, and the replica goes on working.
#[test]
fn a_panic_ends_only_the_session_whose_input_caused_it() {
    use std::sync::{Arc, Mutex};
    use weft::automerge::transaction::Transactable;
    use weft::engine::PeerId;
    use weft::protocol::{Message, Payload, SyncItem};
    use weft::store::mem::MemStore;
    use weft::{DocumentId, ReplicaId, ReplicaOptions, SessionInput};

    let (store, faults) =
        crate::support::faulty_store::FaultyStore::new(MemStore::new(ReplicaId::from_seed(7)));
    let options = ReplicaOptions {
        seed: Some(1),
        ..ReplicaOptions::default()
    };
    let relay = Replica::with_store(Box::new(store), "relay".into(), options).unwrap();
    let sent: Arc<Mutex<Vec<(PeerId, Message)>>> = Arc::default();
    let frames = sent.clone();
    relay.set_transport(move |out, _events| {
        frames.lock().unwrap().extend(out);
        Vec::new()
    });
    let whole = |id: DocumentId, n: i64| {
        let mut doc = weft::automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(weft::automerge::ROOT, "n", n).unwrap();
        tx.commit();
        Message::Sync {
            batch: vec![SyncItem {
                id,
                collection: "c".into(),
                payload: Payload::Whole(doc.save()),
            }],
        }
    };
    let ids: Vec<DocumentId> = (1..=4u8).map(|b| DocumentId::from_bytes([b; 16])).collect();
    for p in 1..=3 {
        relay.peer_connected(PeerId(p), ReplicaId::from_seed(100 + p), Scope::All, false);
    }
    faults.lock().unwrap().panic_on_load = Some(ids[1]);
    let message = |peer: u64, message| SessionInput::Message {
        peer: PeerId(peer),
        message,
    };
    let failed = relay.peer_batch(vec![
        message(1, whole(ids[0], 1)),
        message(2, whole(ids[1], 2)),
        message(3, whole(ids[2], 3)),
        // Peer 2's session ends with its panicking input: this one must not be applied.
        message(2, whole(ids[3], 4)),
    ]);
    assert_eq!(failed, vec![(PeerId(2), weft::SessionFailure::Panicked)]);
    assert_eq!(relay.get(&ids[0]).unwrap().body, json!({"n": 1}));
    assert_eq!(relay.get(&ids[2]).unwrap().body, json!({"n": 3}));
    for id in [ids[1], ids[3]] {
        assert!(
            matches!(relay.get(&id), Err(weft::Error::NotFound(_))),
            "{id} was stored"
        );
    }
    let acked = |peer: u64| {
        sent.lock()
            .unwrap()
            .iter()
            .filter(|(p, m)| *p == PeerId(peer) && matches!(m, Message::Persisted { .. }))
            .count()
    };
    assert_eq!((acked(1), acked(2), acked(3)), (1, 0, 1));
    // The engine forgot session 2: what it sends now is ignored, even with the fault gone.
    faults.lock().unwrap().panic_on_load = None;
    relay.peer_message(PeerId(2), whole(ids[3], 4));
    assert!(matches!(relay.get(&ids[3]), Err(weft::Error::NotFound(_))));
    // The replica goes on: sessions 1 and 3 still sync, local writes work.
    relay.peer_message(PeerId(3), whole(ids[3], 5));
    assert_eq!(relay.get(&ids[3]).unwrap().body, json!({"n": 5}));
    let local = relay.create("c", json!({"local": true})).unwrap();
    assert_eq!(relay.get(&local).unwrap().body, json!({"local": true}));
    relay.integrity_check().unwrap();
}
