//! Relay nodes over one PostgreSQL database: the store against SQLite, live convergence across
//! two and three nodes, the race of two nodes writing one document, `kill -9` of a node and a
//! PostgreSQL restart under load. The server is the one the test command started
//! (`WEFT_TEST_PG`); the restart test runs a private cluster.

use crate::mem_store::{edit, options, view};
use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use support::pg::{self, blocking};
use support::relay::{Relay, RelayProcess, http_get, synced};
use weft::net::{ConnectOptions, Status};
use weft::{Replica, ReplicaOptions, Scope};

const LIMIT: Duration = Duration::from_secs(30);

/// An in-process relay node over the database at `url`, listening for the other nodes.
async fn node(url: &str, dir: &std::path::Path, name: &str) -> (Relay, Replica) {
    let replica = pg::replica(url, ReplicaOptions::default());
    let listen: tokio_postgres::Config = url.parse().unwrap();
    let relay = Relay::with_replica(replica.clone(), &dir.join(name), |c| {
        c.listen_postgres = Some(listen);
    })
    .await;
    (relay, replica)
}

/// Polls `f` (on a blocking thread) until it holds; fails at the deadline.
async fn eventually(what: &str, f: impl Fn() -> bool + Send + Sync + Clone + 'static) {
    let start = Instant::now();
    loop {
        let g = f.clone();
        if tokio::task::spawn_blocking(g).await.unwrap() {
            return;
        }
        assert!(start.elapsed() < LIMIT, "{what}: not after {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_postgres_store_matches_sqlite() {
    let url = pg::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let sqlite = Replica::open_with(dir.path().join("a.db"), options(&clock, 7)).unwrap();
    let postgres = pg::replica(&url, options(&clock, 7));
    let (mut rng_a, mut rng_b) = (StdRng::seed_from_u64(5), StdRng::seed_from_u64(5));
    let (mut ids_a, mut ids_b) = (Vec::new(), Vec::new());
    let expected = blocking(move || {
        for i in 0..150 {
            clock.fetch_add(7, Ordering::SeqCst);
            edit(&sqlite, &mut rng_a, &mut ids_a);
            edit(&postgres, &mut rng_b, &mut ids_b);
            if i == 100 {
                assert_eq!(sqlite.compact().unwrap(), postgres.compact().unwrap());
            }
        }
        let expected = view(&sqlite);
        assert_eq!(view(&postgres), expected);
        postgres.integrity_check().unwrap();
        // Reopened: the same replica id and data, numbering goes on.
        let id = postgres.replica_id();
        drop(postgres);
        let again = pg::replica(&url, ReplicaOptions::default());
        assert_eq!(again.replica_id(), id);
        assert_eq!(view(&again), expected);
        expected
    });
    assert!(expected["open"].as_array().unwrap().len() > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_live_and_a_race_on_one_document_merges() {
    let url = pg::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let (n1, r1) = node(&url, dir.path(), "n1").await;
    let (n2, _r2) = node(&url, dir.path(), "n2").await;
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();
    let ca = a.connect(&n1.url(), ConnectOptions::default());
    let cb = b.connect(&n2.url(), ConnectOptions::default());
    synced(&ca).await;
    synced(&cb).await;

    // Written through node 1, pushed live to node 2's client (no polling by the client).
    let mut feed = b.subscribe(Scope::All, b.last_seq());
    let id = a.create("todos", json!({"title": "via node 1"})).unwrap();
    let (event, feed) = tokio::task::spawn_blocking(move || {
        let e = feed.next_timeout(LIMIT).unwrap().expect("reached b");
        (e, feed)
    })
    .await
    .unwrap();
    assert_eq!(event.id, id);
    b.update(&id, json!({"done": false})).unwrap();
    let a2 = a.clone();
    eventually("a sees b's edit", move || {
        a2.get(&id).unwrap().body.get("done") == Some(&json!(false))
    })
    .await;

    // The race: both clients edit the same document at once, through different nodes, the
    // same field and their own fields, 40 times each.
    let writer = |r: Replica, who: &'static str| {
        std::thread::spawn(move || {
            for i in 0..40 {
                r.update(&id, json!({ who: i, "last": format!("{who} {i}") }))
                    .unwrap();
            }
        })
    };
    let (wa, wb) = (writer(a.clone(), "a"), writer(b.clone(), "b"));
    wa.join().unwrap();
    wb.join().unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    eventually("both clients hold the same merged document", move || {
        let (x, y) = (a2.get(&id).unwrap(), b2.get(&id).unwrap());
        let mut hx = x.heads.clone();
        let mut hy = y.heads.clone();
        hx.sort();
        hy.sort();
        hx == hy && x.body["a"] == 39 && x.body["b"] == 39
    })
    .await;
    let merged = a.get(&id).unwrap();
    assert_eq!(merged.body, b.get(&id).unwrap().body);
    assert!(
        ["a 39", "b 39"].contains(&merged.body["last"].as_str().unwrap()),
        "{}",
        merged.body
    );
    // Both nodes' writes are merged Automerge changes in PostgreSQL, not one snapshot over
    // the other.
    let stored = blocking(move || r1.get(&id).unwrap());
    assert_eq!(stored.body, merged.body);
    drop(feed);

    ca.close().await;
    cb.close().await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_seeded_random_clients_converge() {
    let seed = support::seed("postgres three nodes");
    let mut rng = StdRng::seed_from_u64(seed);
    let url = pg::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let (relay, _) = node(&url, dir.path(), &format!("n{i}")).await;
        let client = Replica::open(dir.path().join(format!("c{i}.db"))).unwrap();
        let connection = client.connect(&relay.url(), ConnectOptions::default());
        nodes.push(relay);
        clients.push((client, connection));
    }
    for (_, c) in &clients {
        synced(c).await;
    }
    let mut ids = Vec::new();
    for _ in 0..120 {
        let (client, _) = &clients[rng.random_range(0..3)];
        let roll = rng.random_range(0..10);
        if roll < 4 || ids.is_empty() {
            ids.push(
                client
                    .create("items", json!({"n": rng.random_range(0..100)}))
                    .unwrap(),
            );
        } else {
            let id = ids[rng.random_range(0..ids.len())];
            // The document may not have reached this client yet, or be deleted: fine.
            let _ = if roll < 9 {
                client
                    .update(&id, json!({"n": rng.random_range(0..100)}))
                    .map(drop)
            } else {
                client.delete(&id)
            };
        }
        if rng.random_range(0..4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
        }
    }
    let replicas: Vec<Replica> = clients.iter().map(|(r, _)| r.clone()).collect();
    eventually("three clients on three nodes converge", move || {
        let summaries: Vec<_> = replicas
            .iter()
            .map(|r| r.catalog_summary(&Scope::All).unwrap())
            .collect();
        summaries.windows(2).all(|w| w[0] == w[1]) && summaries[0].count as usize >= 1
    })
    .await;
    let store = pg::replica(&url, ReplicaOptions::default());
    let (c0, _) = &clients[0];
    let want = c0.catalog_summary(&Scope::All).unwrap();
    assert_eq!(
        blocking(move || store.catalog_summary(&Scope::All).unwrap()),
        want
    );
    for (_, c) in clients {
        c.close().await;
    }
    for n in nodes {
        n.stop().await;
    }
}

/// `weft serve --store postgres://...` processes: what a node acknowledged survives its
/// `kill -9`, and a client cut off mid-sync converges through the other node.
#[test]
fn kill_9_of_a_node_loses_nothing_acknowledged() {
    let url = pg::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let n1 = RelayProcess::start_with(&dir.path().join("n1"), &["--store", &url]);
    let n2 = RelayProcess::start_with(&dir.path().join("n2"), &["--store", &url]);
    let a = dir.path().join("a.db");
    let ndjson: String = (0..2000)
        .map(|i| format!("{{\"i\":{i},\"text\":\"document {i}\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("docs.ndjson"), ndjson).unwrap();
    support::weft(
        &a,
        &[
            "import",
            dir.path().join("docs.ndjson").to_str().unwrap(),
            "--collection",
            "docs",
        ],
    )
    .ok();
    // Acknowledged: `sync --once` exits 0 only once node 1 confirmed every document. Then
    // node 1 dies at once.
    support::weft(&a, &["sync", "--once", "--server", &n1.url]).ok();
    let mut n1 = n1;
    n1.child.kill().unwrap(); // SIGKILL
    n1.child.wait().unwrap();
    let b = dir.path().join("b.db");
    support::weft(&b, &["sync", "--once", "--server", &n2.url]).ok();
    let listed = support::weft(&b, &["doc", "list", "--collection", "docs"]).ok();
    assert_eq!(listed.stdout.lines().count(), 2000);

    // Mid-sync: a's next 2,000 documents go to a node killed while it receives them; a then
    // syncs through node 2, and b gets everything from there.
    let n3 = RelayProcess::start_with(&dir.path().join("n3"), &["--store", &url]);
    let more: String = (2000..4000)
        .map(|i| format!("{{\"i\":{i},\"text\":\"document {i}\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("more.ndjson"), more).unwrap();
    support::weft(
        &a,
        &[
            "import",
            dir.path().join("more.ndjson").to_str().unwrap(),
            "--collection",
            "docs",
        ],
    )
    .ok();
    let mut pushing = support::weft_command()
        .arg("--db")
        .arg(&a)
        .args(["sync", "--once", "--server", &n3.url])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150)); // mid-push: the kill's moment, not a wait
    let mut n3 = n3;
    n3.child.kill().unwrap();
    n3.child.wait().unwrap();
    let _ = pushing.wait();
    support::weft(&a, &["sync", "--once", "--server", &n2.url]).ok();
    support::weft(&b, &["sync", "--once", "--server", &n2.url]).ok();
    let listed = support::weft(&b, &["doc", "list", "--collection", "docs"]).ok();
    assert_eq!(listed.stdout.lines().count(), 4000);
    let store = pg::replica(&url, ReplicaOptions::default());
    let counts = blocking(move || {
        store.integrity_check().unwrap();
        store.counts().unwrap()
    });
    assert_eq!(counts.0, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_is_reported_refused_and_recovered_from() {
    let cluster = blocking(pg::Cluster::start);
    let url = pg::fresh_database_on(&cluster.url);
    let dir = tempfile::tempdir().unwrap();
    let (n1, _) = node(&url, dir.path(), "n1").await;
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let ca = a.connect(&n1.url(), ConnectOptions::default());
    synced(&ca).await;
    for i in 0..50 {
        a.create("docs", json!({"i": i})).unwrap();
    }
    synced(&ca).await;
    assert_eq!(http_get(n1.addr, "/healthz").await.0, "HTTP/1.1 200 OK");

    let cluster = Arc::new(cluster);
    let c = cluster.clone();
    blocking(move || c.stop());
    // Writes go on at the client; the node cannot store them and says so.
    for i in 50..100 {
        a.create("docs", json!({"i": i})).unwrap();
    }
    let status = support::relay::await_status(&ca, |s| matches!(s, Status::Offline { .. })).await;
    assert!(status.to_string().contains("relay storage"), "{status}");
    let start = Instant::now();
    loop {
        let (line, body) = http_get(n1.addr, "/healthz").await;
        if line == "HTTP/1.1 503 Service Unavailable" {
            assert!(body.contains("postgres"), "{body}");
            break;
        }
        assert!(start.elapsed() < LIMIT, "healthz never failed: {line}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let c = cluster.clone();
    blocking(move || c.restart());
    // The node recovers by itself, the client reconnects, nothing is lost.
    let start = Instant::now();
    while http_get(n1.addr, "/healthz").await.0 != "HTTP/1.1 200 OK" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "healthz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = support::relay::await_status(&ca, |s| *s == Status::Synced).await;
    let store = pg::replica(&url, ReplicaOptions::default());
    let counts = blocking(move || store.counts().unwrap());
    assert_eq!(counts.0, 100);
    ca.close().await;
    n1.stop().await;
}

/// The README's example: two `weft serve --store postgres://...` processes, a `weft sync
/// --watch` client on each, a document written through one shows up through the other.
#[test]
fn the_readme_example_two_node_processes_converge_live() {
    let url = pg::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let n1 = RelayProcess::start_with(&dir.path().join("n1"), &["--store", &url]);
    let n2 = RelayProcess::start_with(&dir.path().join("n2"), &["--store", &url]);
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let watch = |db: &std::path::Path, server: &str| {
        Watch(
            support::weft_command()
                .arg("--db")
                .arg(db)
                .args(["sync", "--watch", "--server", server])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _watching = [watch(&a, &n1.url), watch(&b, &n2.url)];
    let id = support::weft(
        &a,
        &[
            "doc",
            "create",
            "--collection",
            "todos",
            "--json",
            r#"{"title":"one truth"}"#,
        ],
    )
    .ok();
    let id = id.stdout.trim().to_owned();
    let start = Instant::now();
    loop {
        let got = support::weft(&b, &["doc", "get", &id]);
        if got.code == Some(0) {
            assert_eq!(got.stdout.trim(), r#"{"title":"one truth"}"#);
            break;
        }
        assert!(start.elapsed() < LIMIT, "b never got the document: {got:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // And back, through the other node.
    support::weft(&b, &["doc", "update", &id, "--merge", r#"{"done":true}"#]).ok();
    let start = Instant::now();
    while support::weft(&a, &["doc", "get", &id]).stdout.trim()
        != r#"{"done":true,"title":"one truth"}"#
    {
        assert!(start.elapsed() < LIMIT, "a never got b's edit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when the test ends, also when it fails.
struct Watch(std::process::Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
