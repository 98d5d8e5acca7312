//! Bad input of every kind: a clear error, and nothing in the database changes.

use crate::common;

use serde_json::json;
use weft::automerge::transaction::{Transactable, Transaction};
use weft::automerge::{AutoCommit, ROOT};
use weft::bundle::BUNDLE_VERSION;
use weft::{
    Bundle, BundleEntry, BundleError, BundleScope, ChangeHash, DocumentId, Error, Filter,
    JsonError, Path, Query, Replica, ReplicaId, StoreError,
};

use common::{TempDb, db_state};

fn ptr(p: &str) -> Path {
    Path::from_pointer(p).unwrap()
}

/// Runs `f`, which must fail, and checks that the replica's observable state did not change.
#[track_caller]
fn fails_cleanly<T: std::fmt::Debug>(
    r: &Replica,
    what: &str,
    f: impl FnOnce() -> weft::Result<T>,
) -> Error {
    let before = db_state(r);
    let err = match f() {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => e,
    };
    assert!(!err.to_string().is_empty());
    assert_eq!(db_state(r), before, "{what}: the database changed ({err})");
    err
}

/// A replica with live documents, a text field, history and a tombstone.
fn populated(db: &TempDb, name: &str) -> (Replica, Vec<DocumentId>) {
    let r = db.open(name);
    let a = r.create("todos", json!({"title": "a", "n": 1})).unwrap();
    let b = r.create("notes", json!({"t": ""})).unwrap();
    let c = r.create("todos", json!({})).unwrap();
    r.update(&a, json!({"n": 2})).unwrap();
    r.set_text(&b, &ptr("/t"), "text").unwrap();
    r.delete(&c).unwrap();
    (r, vec![a, b, c])
}

#[test]
fn invalid_json_and_non_object_bodies() {
    for (text, kind) in [
        ("[1]", "an array"),
        ("3", "a number"),
        ("\"s\"", "a string"),
        ("null", "null"),
        ("true", "a boolean"),
    ] {
        let err = weft::json::parse_object(text).unwrap_err();
        assert!(
            matches!(err, JsonError::NotAnObject(k) if k == kind),
            "{text}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("a document body must be a JSON object, got {kind}")
        );
    }
    for bad in [
        "",
        "{",
        "{\"a\":}",
        "{\"a\" 1}",
        "{'a': 1}",
        "{\"a\":1}}",
        "nul",
        "{\"a\":1,}",
    ] {
        let err = weft::json::parse_object(bad).unwrap_err();
        assert!(matches!(err, JsonError::Syntax(_)), "{bad:?}: {err:?}");
        assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
    }
    assert_eq!(
        weft::json::parse_object(" {\"a\": [1, {\"b\": null}]} ").unwrap(),
        json!({"a": [1, {"b": null}]}).as_object().unwrap().clone()
    );

    let db = TempDb::new();
    let (r, ids) = populated(&db, "a.db");
    for body in [
        json!([1]),
        json!(null),
        json!("text"),
        json!(3.5),
        json!(false),
    ] {
        let err = fails_cleanly(&r, "create non-object", || r.create("todos", body.clone()));
        assert!(
            matches!(err, Error::Json(JsonError::NotAnObject(_))),
            "{err:?}"
        );
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
        let err = fails_cleanly(&r, "update non-object", || r.update(&ids[0], body.clone()));
        assert!(
            matches!(err, Error::Json(JsonError::NotAnObject(_))),
            "{err:?}"
        );
    }
    // One bad body in a batch: nothing of the batch is created.
    let err = fails_cleanly(&r, "create_many", || {
        r.create_many("todos", [json!({"ok": 1}), json!({"ok": 2}), json!([3])])
    });
    assert!(
        matches!(err, Error::Json(JsonError::NotAnObject("an array"))),
        "{err:?}"
    );
}

#[test]
fn unknown_ids_are_not_found() {
    let db = TempDb::new();
    let (r, _) = populated(&db, "a.db");
    let ghost = DocumentId::from_bytes([0xAB; 16]);
    let is_ghost = |e: &Error| matches!(e, Error::NotFound(id) if *id == ghost);
    let errors = [
        fails_cleanly(&r, "get", || r.get(&ghost)),
        fails_cleanly(&r, "update", || r.update(&ghost, json!({"a": 1}))),
        fails_cleanly(&r, "delete", || r.delete(&ghost)),
        fails_cleanly(&r, "set", || r.set(&ghost, &ptr("/a"), json!(1))),
        fails_cleanly(&r, "delete_path", || r.delete_path(&ghost, &ptr("/a"))),
        fails_cleanly(&r, "set_text", || r.set_text(&ghost, &ptr("/a"), "x")),
        fails_cleanly(&r, "splice", || r.splice(&ghost, &ptr("/a"), 0, 0, "x")),
        fails_cleanly(&r, "get_at", || r.get_at(&ghost, &[])),
        fails_cleanly(&r, "change", || {
            r.change(&ghost, |tx: &mut Transaction<'_>| tx.put(ROOT, "a", 1))
        }),
    ];
    for err in &errors {
        assert!(is_ghost(err), "{err:?}");
        assert_eq!(err.to_string(), format!("document {ghost} not found"));
    }
    // Ids in text form: typos and garbage are caught.
    let text = ghost.to_string();
    assert_eq!(text.parse::<DocumentId>().unwrap(), ghost);
    let mut typo: Vec<char> = text.chars().collect();
    typo[2] = if typo[2] == 'x' { 'y' } else { 'x' };
    let typo: String = typo.into_iter().collect();
    for bad in [typo.as_str(), "", "0OIl", "not an id", &"z".repeat(100)] {
        let err = bad.parse::<DocumentId>().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidId {
                    what: "document id",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn invalid_collection_names() {
    let db = TempDb::new();
    let (r, _) = populated(&db, "a.db");
    let long = "x".repeat(65);
    for bad in [
        "",
        "has space",
        "slash/name",
        "ümlaut",
        "semi;colon",
        "quote'",
        "new\nline",
        long.as_str(),
    ] {
        let err = fails_cleanly(&r, bad, || r.create(bad, json!({})));
        assert!(
            matches!(&err, Error::InvalidCollection(_)),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains("invalid collection name"), "{err}");
        let err = fails_cleanly(&r, bad, || r.create_many(bad, [json!({})]));
        assert!(
            matches!(&err, Error::InvalidCollection(_)),
            "{bad:?}: {err:?}"
        );
    }
    // The edges of what is allowed.
    let max = "y".repeat(64);
    for good in ["a", "A-b_c.d:e", "0", max.as_str()] {
        let id = r.create(good, json!({"ok": true})).unwrap();
        assert_eq!(r.get(&id).unwrap().collection, good);
    }
}

#[test]
fn damaged_bundles_change_nothing() {
    let db = TempDb::new();
    let (a, a_ids) = populated(&db, "a.db");
    let (b, _) = populated(&db, "b.db");
    let good = a.export_bundle(&BundleScope::All).unwrap();
    assert_eq!(Bundle::decode(&good).unwrap().entries.len(), 3);

    // Not a bundle at all.
    for junk in [&b""[..], b"hello world, not a bundle", b"SQLite format 3\0"] {
        let err = fails_cleanly(&b, "junk", || b.import_bundle(junk));
        assert!(
            matches!(err, Error::Bundle(BundleError::NotABundle)),
            "{err:?}"
        );
        assert!(err.to_string().contains("not a weft bundle"), "{err}");
    }
    // Every truncation.
    let before = db_state(&b);
    for len in 0..good.len() {
        match b.import_bundle(&good[..len]) {
            Err(Error::Bundle(BundleError::Truncated { .. } | BundleError::NotABundle)) => {}
            other => panic!("truncated to {len} of {}: {other:?}", good.len()),
        }
    }
    assert_eq!(db_state(&b), before);
    let err = fails_cleanly(&b, "truncated", || b.import_bundle(&good[..good.len() - 1]));
    assert_eq!(
        err.to_string(),
        format!(
            "bundle is truncated: expected {} bytes, found {}",
            good.len(),
            good.len() - 1
        )
    );
    // A newer format version.
    let mut newer = good.clone();
    newer[8..10].copy_from_slice(&99u16.to_le_bytes());
    let err = fails_cleanly(&b, "newer", || b.import_bundle(&newer));
    assert!(matches!(
        err,
        Error::Bundle(BundleError::UnsupportedVersion { found: 99, supported }) if supported == BUNDLE_VERSION
    ));
    assert!(
        err.to_string().contains("version 99") && err.to_string().contains("upgrade"),
        "{err}"
    );
    // Damaged bytes anywhere after the header, and trailing bytes: caught by checksum/length.
    for at in [24, good.len() / 2, good.len() - 1] {
        let mut damaged = good.clone();
        damaged[at] ^= 0x5A;
        let err = fails_cleanly(&b, "flipped", || b.import_bundle(&damaged));
        assert!(
            matches!(err, Error::Bundle(BundleError::Corrupted(_))),
            "byte {at}: {err:?}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    let mut longer = good.clone();
    longer.push(0);
    let err = fails_cleanly(&b, "trailing", || b.import_bundle(&longer));
    assert!(
        matches!(err, Error::Bundle(BundleError::Corrupted(_))),
        "{err:?}"
    );

    // Valid framing and checksum, but bad content. Each bundle starts with good entries, which
    // must not be applied either: an import is all or nothing.
    let good_entries = Bundle::decode(&good).unwrap().entries;
    let with = |bad: BundleEntry| {
        let mut entries = good_entries.clone();
        entries.push(bad);
        Bundle {
            source: ReplicaId::from_bytes([5; 16]),
            entries,
        }
        .encode()
    };
    let bad_id = DocumentId::from_bytes([0xEE; 16]);
    let mut real = AutoCommit::new();
    real.put(ROOT, "k", "v").unwrap();
    let real_heads = real.get_heads();
    let real_bytes = real.save();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage automerge bytes",
            with(BundleEntry::Document {
                id: bad_id,
                collection: "todos".into(),
                heads: vec![],
                bytes: b"definitely not automerge".to_vec(),
            }),
        ),
        (
            "truncated automerge bytes",
            with(BundleEntry::Document {
                id: bad_id,
                collection: "todos".into(),
                heads: real_heads.clone(),
                bytes: real_bytes[..real_bytes.len() - 3].to_vec(),
            }),
        ),
        (
            "automerge bytes with a flipped byte",
            with(BundleEntry::Document {
                id: bad_id,
                collection: "todos".into(),
                heads: real_heads.clone(),
                bytes: {
                    let mut b = real_bytes.clone();
                    let mid = b.len() / 2;
                    b[mid] ^= 0xFF;
                    b
                },
            }),
        ),
        (
            "heads that do not match",
            with(BundleEntry::Document {
                id: bad_id,
                collection: "todos".into(),
                heads: vec![ChangeHash([1; 32])],
                bytes: real_bytes.clone(),
            }),
        ),
        (
            "an existing doc with foreign heads",
            with(BundleEntry::Document {
                id: a_ids[0],
                collection: "todos".into(),
                heads: vec![ChangeHash([2; 32])],
                bytes: real_bytes.clone(),
            }),
        ),
    ];
    for (what, bytes) in &cases {
        let err = fails_cleanly(&b, what, || b.import_bundle(bytes));
        match &err {
            Error::Corrupt { id, reason } => {
                assert!(*id == bad_id || *id == a_ids[0], "{what}: {err}");
                assert!(!reason.is_empty());
                assert!(err.to_string().contains("is corrupt"), "{err}");
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
    }
    let bad_collection = [
        with(BundleEntry::Document {
            id: bad_id,
            collection: "bad name".into(),
            heads: real_heads.clone(),
            bytes: real_bytes.clone(),
        }),
        with(BundleEntry::Tombstone {
            id: bad_id,
            collection: "".into(),
        }),
        with(BundleEntry::Tombstone {
            id: bad_id,
            collection: "x".repeat(65),
        }),
    ];
    for bytes in &bad_collection {
        let err = fails_cleanly(&b, "bad collection", || b.import_bundle(bytes));
        assert!(matches!(err, Error::InvalidCollection(_)), "{err:?}");
    }

    // The same replica still imports the good bundle (nothing was left half-done in memory), and
    // a hand-built bundle with valid content is accepted.
    let report = b.import_bundle(&good).unwrap();
    assert_eq!((report.created, report.deleted), (2, 1));
    let valid = Bundle {
        source: ReplicaId::from_bytes([5; 16]),
        entries: vec![BundleEntry::Document {
            id: bad_id,
            collection: "todos".into(),
            heads: real_heads,
            bytes: real_bytes,
        }],
    }
    .encode();
    assert_eq!(b.import_bundle(&valid).unwrap().created, 1);
    assert_eq!(b.get(&bad_id).unwrap().body, json!({"k": "v"}));
}

#[test]
fn corrupted_chunk_in_the_file() {
    let db = TempDb::new();
    let path = db.path("a.db");
    let r = db.open("a.db");
    // One doc corrupted in its snapshot, one in its incremental chunk, one healthy.
    let snap = r
        .create(
            "c",
            json!({"name": "snapshot victim", "pad": "p".repeat(200)}),
        )
        .unwrap();
    r.update(&snap, json!({"n": 1})).unwrap();
    let incr = r
        .create("c", json!({"name": "incremental victim"}))
        .unwrap();
    r.update(&incr, json!({"n": 1, "pad": "q".repeat(200)}))
        .unwrap();
    let healthy = r.create("c", json!({"name": "healthy"})).unwrap();
    r.update(&healthy, json!({"n": 1})).unwrap();
    let bodies: Vec<_> = [snap, incr, healthy]
        .iter()
        .map(|id| r.get(id).unwrap())
        .collect();
    drop(r);

    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        // which = 0: the document's snapshot (in its catalog row); 1: its incremental chunk.
        let corrupt = |id: &DocumentId, which: usize| {
            let (key, snapshot): (i64, Vec<u8>) = conn
                .query_row(
                    "SELECT doc_key, snapshot FROM documents WHERE doc_id = ?1",
                    [id.as_bytes().as_slice()],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .unwrap();
            let incrementals: Vec<(i64, Vec<u8>)> = conn
                .prepare("SELECT chunk_id, bytes FROM chunks WHERE doc_key = ?1 ORDER BY chunk_id")
                .unwrap()
                .query_map([key], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(incrementals.len(), 1, "snapshot + one incremental");
            let flip = |mut bytes: Vec<u8>| {
                let mid = bytes.len() / 2;
                for b in &mut bytes[mid..mid + 8] {
                    *b ^= 0xFF;
                }
                bytes
            };
            let n = if which == 0 {
                conn.execute(
                    "UPDATE documents SET snapshot = ?1 WHERE doc_key = ?2",
                    rusqlite::params![flip(snapshot), key],
                )
            } else {
                let (chunk_id, bytes) = incrementals[0].clone();
                conn.execute(
                    "UPDATE chunks SET bytes = ?1 WHERE chunk_id = ?2",
                    rusqlite::params![flip(bytes), chunk_id],
                )
            }
            .unwrap();
            assert_eq!(n, 1);
        };
        corrupt(&snap, 0);
        corrupt(&incr, 1);
    }

    let r = db.open("a.db");
    r.integrity_check().unwrap();
    // Reads of current state come from the materialized JSON: unaffected.
    for doc in &bodies {
        assert_eq!(&r.get(&doc.id).unwrap(), doc);
    }
    assert_eq!(r.list("c").unwrap().len(), 3);
    for victim in [snap, incr] {
        let err = fails_cleanly(&r, "update corrupt", || r.update(&victim, json!({"n": 2})));
        match &err {
            Error::Corrupt { id, reason } => {
                assert_eq!(*id, victim);
                assert!(!reason.is_empty());
                let text = err.to_string();
                assert!(
                    text.contains(&victim.to_string()) && text.contains("corrupt"),
                    "{text}"
                );
                // Said once, not "document X is corrupt: document X is corrupt: ...".
                assert_eq!(text.matches(&victim.to_string()).count(), 1, "{text}");
                assert_eq!(text, format!("document {victim} is corrupt: {reason}"));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Every operation that needs the Automerge data says so; a retry does too.
        for err in [
            fails_cleanly(&r, "set", || r.set(&victim, &ptr("/n"), json!(3))),
            fails_cleanly(&r, "get_at", || r.get_at(&victim, &bodies[0].heads)),
            fails_cleanly(&r, "delete", || r.delete(&victim)),
            fails_cleanly(&r, "retry", || r.update(&victim, json!({"n": 2}))),
        ] {
            assert!(
                matches!(err, Error::Corrupt { id, .. } if id == victim),
                "{err:?}"
            );
        }
    }
    // Other documents are fine, in the same commands' company.
    r.update(&healthy, json!({"n": 2})).unwrap();
    assert!(matches!(
        r.splice(&healthy, &ptr("/name"), 0, 0, "x"),
        Err(Error::Json(JsonError::NotText { .. }))
    ));
    r.set_text(&healthy, &ptr("/name"), "still healthy")
        .unwrap();
    assert_eq!(
        r.get(&healthy).unwrap().body,
        json!({"name": "still healthy", "n": 2})
    );
    let fresh = r.create("c", json!({"new": true})).unwrap();
    r.update(&fresh, json!({"new": false})).unwrap();
    r.integrity_check().unwrap();
    // A replica importing the corrupted data refuses it as a whole.
    let other = db.open("other.db");
    let exported = r.export_bundle(&BundleScope::All).unwrap();
    let err = fails_cleanly(&other, "import corrupt", || other.import_bundle(&exported));
    assert!(
        matches!(err, Error::Corrupt { id, .. } if id == snap || id == incr),
        "{err:?}"
    );
}

#[test]
fn files_that_are_not_weft_databases() {
    let db = TempDb::new();
    // A text file: refused, and left as it was.
    let text = db.path("notes.txt");
    std::fs::write(&text, "just some text, not a database\n".repeat(200)).unwrap();
    let before = std::fs::read(&text).unwrap();
    match Replica::open(&text) {
        Err(Error::Store(StoreError::NotWeft { .. } | StoreError::Open { .. })) => {}
        Err(other) => panic!("expected NotWeft/Open, got {other:?}"),
        Ok(_) => panic!("opened a text file"),
    }
    assert_eq!(std::fs::read(&text).unwrap(), before);
    // Another application's SQLite database.
    let foreign = db.path("foreign.db");
    {
        let conn = rusqlite::Connection::open(&foreign).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let err = Replica::open(&foreign)
        .err()
        .expect("foreign database must be refused");
    assert!(
        matches!(err, Error::Store(StoreError::NotWeft { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a weft database"), "{err}");
    {
        let conn = rusqlite::Connection::open(&foreign).unwrap();
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 1, "the foreign database was not modified");
    }
    // A weft database from a newer schema version.
    let newer = db.path("newer.db");
    drop(Replica::open(&newer).unwrap());
    {
        let conn = rusqlite::Connection::open(&newer).unwrap();
        conn.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    let err = Replica::open(&newer)
        .err()
        .expect("newer schema must be refused");
    assert!(
        matches!(
            err,
            Error::Store(StoreError::SchemaTooNew { found: 99, .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn invalid_filters_and_paths() {
    for bad in [
        "no operator",
        "n = abc",
        "done < true",
        "n > null",
        "a. = 1",
        "[x] = 1",
        " = 1",
        "a = {",
        "tags < [1]",
    ] {
        let err = Filter::parse(bad).unwrap_err();
        assert!(matches!(err, Error::Filter(_)), "{bad:?}: {err:?}");
        assert!(err.to_string().starts_with("invalid filter: "), "{err}");
    }
    let db = TempDb::new();
    let (r, ids) = populated(&db, "a.db");
    let lt_bool = Filter::Cmp(
        weft::FieldPath::parse("n").unwrap(),
        weft::CmpOp::Lt,
        json!(true),
    );
    let nested = Filter::Not(Box::new(Filter::And(vec![Filter::Or(vec![
        lt_bool.clone(),
    ])])));
    for f in [lt_bool, nested] {
        let err = r.query(&Query::default().filter(f)).unwrap_err();
        assert!(matches!(err, Error::Filter(_)), "{err:?}");
    }
    for bad in ["a/b", "no-slash"] {
        assert!(
            matches!(Path::from_pointer(bad), Err(JsonError::InvalidPath { .. })),
            "{bad}"
        );
    }
    let err = fails_cleanly(&r, "path into a scalar", || {
        r.set(&ids[0], &ptr("/n/deeper"), json!(1))
    });
    assert!(
        matches!(err, Error::Json(JsonError::PathNotFound(_))),
        "{err:?}"
    );
    // Names the prefix that stops the walk (/n is a scalar, so nothing is inside it).
    assert!(err.to_string().contains("/n"), "{err}");
    let err = fails_cleanly(&r, "set root", || r.set(&ids[0], &ptr(""), json!({})));
    assert!(
        matches!(err, Error::Json(JsonError::InvalidPath { .. })),
        "{err:?}"
    );
    let err = fails_cleanly(&r, "change error", || {
        r.change(&ids[0], |tx: &mut Transaction<'_>| {
            // Wrong object type for the operation: automerge refuses it, nothing commits.
            tx.put(ROOT, "partial", 1)?;
            tx.splice_text(ROOT, 0, 0, "x")?;
            Ok::<(), weft::automerge::AutomergeError>(())
        })
    });
    assert!(matches!(err, Error::ChangeFn(_)), "{err:?}");
}

#[test]
fn a_panicking_change_closure_leaves_the_replica_usable() {
    let db = TempDb::new();
    let (r, ids) = populated(&db, "a.db");
    let before = db_state(&r);
    let result = r.change(&ids[0], |tx: &mut Transaction<'_>| {
        tx.put(ROOT, "half", "done").unwrap();
        panic!("closure bug (expected in this test)");
        #[allow(unreachable_code)]
        Ok::<(), String>(())
    });
    // The panic becomes the command's error; the engine and the lock stay healthy.
    match result {
        Err(Error::ChangeFn(message)) => assert!(message.contains("closure bug"), "{message}"),
        other => panic!("expected ChangeFn error, got {other:?}"),
    }
    assert_eq!(db_state(&r), before, "nothing was committed");
    // The document's in-memory state was rolled back: the next edit builds on the stored state.
    r.update(&ids[0], json!({"n": 3})).unwrap();
    assert_eq!(r.get(&ids[0]).unwrap().body, json!({"title": "a", "n": 3}));
    drop(r);
    let r = db.open("a.db");
    assert_eq!(r.get(&ids[0]).unwrap().body, json!({"title": "a", "n": 3}));
    r.update(&ids[0], json!({"n": 4})).unwrap();
}
