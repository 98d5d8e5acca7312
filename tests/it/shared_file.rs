//! Two replicas (two SQLite connections, as two processes would have) writing to one file:
//! each sees the other's commits and neither loses or corrupts a write.

use serde_json::json;
use weft::Replica;

#[test]
fn two_connections_on_one_file_interleave_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Replica::open(&path).unwrap();
    let b = Replica::open(&path).unwrap();

    let id = a.create("notes", json!({"a": 0})).unwrap();
    // a has the document in memory; b changes it behind a's back.
    b.update(&id, json!({"b": 1})).unwrap();
    // a must see b's change before it edits, or it would write heads that omit b's change.
    a.update(&id, json!({"a": 2})).unwrap();
    b.update(&id, json!({"b": 3})).unwrap();
    let created_by_b = b.create("notes", json!({"from": "b"})).unwrap();
    a.update(&created_by_b, json!({"seen_by": "a"})).unwrap();

    for r in [&a, &b] {
        assert_eq!(r.get(&id).unwrap().body, json!({"a": 2, "b": 3}));
        assert_eq!(
            r.get(&created_by_b).unwrap().body,
            json!({"from": "b", "seen_by": "a"})
        );
    }
    // Both engines' histories are consistent with storage: a history read works on both.
    let heads = a.get(&id).unwrap().heads;
    assert_eq!(b.get_at(&id, &heads).unwrap().body, json!({"a": 2, "b": 3}));
    assert_eq!(a.get_at(&id, &heads).unwrap().body, json!({"a": 2, "b": 3}));

    // The change feed is one sequence across both writers: strictly increasing, no repeats.
    let feed = a.changes_since(0, 100, None).unwrap();
    let seqs: Vec<u64> = feed.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{seqs:?}"
    );
    assert_eq!(seqs.len(), 6);

    drop((a, b));
    let reopened = Replica::open(&path).unwrap();
    reopened.integrity_check().unwrap();
    assert_eq!(reopened.get(&id).unwrap().heads, heads);
    reopened.update(&id, json!({"c": 4})).unwrap();
    assert_eq!(
        reopened.get(&id).unwrap().body,
        json!({"a": 2, "b": 3, "c": 4})
    );
}

#[test]
fn delete_by_another_connection_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Replica::open(&path).unwrap();
    let b = Replica::open(&path).unwrap();
    let id = a.create("notes", json!({"x": 1})).unwrap();
    a.update(&id, json!({"x": 2})).unwrap();
    b.delete(&id).unwrap();
    assert!(matches!(
        a.update(&id, json!({"x": 3})),
        Err(weft::Error::Deleted(_))
    ));
    assert!(matches!(a.get(&id), Err(weft::Error::Deleted(_))));
    // a's own subscription-free feed view agrees.
    let kinds: Vec<_> = a
        .changes_since(0, 10, None)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            weft::ChangeKind::Created,
            weft::ChangeKind::Updated,
            weft::ChangeKind::Deleted
        ]
    );
}

/// Another process holding the file's write lock for longer than the busy timeout: the write
/// fails with SQLite's own code (`DatabaseBusy`), not a generic "commit failed", and changes
/// nothing; once the lock is released the same write works.
#[test]
fn a_write_blocked_by_another_writer_reports_sqlite_busy() {
    use weft::store::sqlite::{SqliteStore, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let options = StoreOptions {
        busy_timeout: std::time::Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let store = SqliteStore::open(&path, options).unwrap();
    let replica =
        weft::Replica::with_store(Box::new(store), path.clone(), Default::default()).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = replica.create("todos", json!({"a": 1})).unwrap_err();
    match &err {
        weft::Error::Store(e) => assert_eq!(
            e.sqlite_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy),
            "{e:?}"
        ),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert!(replica.list("todos").unwrap().is_empty());
    other.execute_batch("ROLLBACK").unwrap();
    replica.create("todos", json!({"a": 1})).unwrap();
    assert_eq!(replica.list("todos").unwrap().len(), 1);
}

/// Processes that create the same new replica file at the same moment all open it: one
/// creates the schema, the others see it done (they used to read the file's id before
/// waiting for the creator's transaction and call the file "not a weft database").
#[test]
fn processes_creating_one_file_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..8 {
        let db = dir.path().join(format!("new-{round}.db"));
        let children: Vec<_> = (0..4)
            .map(|i| {
                crate::support::weft_command()
                    .arg("--db")
                    .arg(&db)
                    .args(["doc", "create", "--json", &format!("{{\"i\":{i}}}")])
                    .output_async()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            weft::Replica::open(&db)
                .unwrap()
                .list("default")
                .unwrap()
                .len(),
            4
        );
    }
}

trait OutputAsync {
    fn output_async(&mut self) -> std::process::Child;
}

impl OutputAsync for std::process::Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}
