//! Manual sync by bundle files between replicas in separate SQLite files.

use crate::common;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use weft::{BundleScope, ChangeKind, DocumentId, Error, ImportReport, Origin, Path, Replica};

use common::{TempDb, bundle_ids, db_state, sorted, tombstones};

fn ptr(p: &str) -> Path {
    Path::from_pointer(p).unwrap()
}

fn export(r: &Replica, scope: BundleScope) -> Vec<u8> {
    r.export_bundle(&scope).unwrap()
}

/// Full exchange both ways.
fn sync(a: &Replica, b: &Replica) {
    let from_a = export(a, BundleScope::All);
    let from_b = export(b, BundleScope::All);
    b.import_bundle(&from_a).unwrap();
    a.import_bundle(&from_b).unwrap();
}

fn assert_same_doc(a: &Replica, b: &Replica, id: &DocumentId) -> Value {
    let (da, db) = (a.get(id).unwrap(), b.get(id).unwrap());
    assert_eq!(da.body, db.body, "bodies of {id}");
    assert_eq!(sorted(&da.heads), sorted(&db.heads), "heads of {id}");
    assert_eq!(da.collection, db.collection);
    da.body
}

#[test]
fn import_is_idempotent() {
    let db = TempDb::new();
    let (a, b) = (db.open("a.db"), db.open("b.db"));
    let x = a.create("todos", json!({"title": "x", "n": 1})).unwrap();
    let y = a.create("notes", json!({"t": "note"})).unwrap();
    let z = a.create("todos", json!({})).unwrap();
    a.set_text(&y, &ptr("/t"), "note text").unwrap();
    for i in 0..5 {
        a.update(&x, json!({"n": i})).unwrap();
    }
    a.delete(&z).unwrap();

    let bundle = export(&a, BundleScope::All);
    let report = b.import_bundle(&bundle).unwrap();
    assert_eq!(
        report,
        ImportReport {
            created: 2,
            updated: 0,
            deleted: 1,
            unchanged: 0
        }
    );
    assert_same_doc(&a, &b, &x);
    assert_same_doc(&a, &b, &y);
    assert!(matches!(b.get(&z), Err(Error::Deleted(id)) if id == z));
    let feed = b.changes_since(0, usize::MAX, None).unwrap();
    assert_eq!(feed.len(), 3);
    assert!(feed.iter().all(|e| e.origin == Origin::Bundle));
    // Collaborative text arrived as text: it can be spliced on the other side.
    b.splice(&y, &ptr("/t"), 0, 0, "b: ").unwrap();
    assert_eq!(b.get(&y).unwrap().body["t"], json!("b: note text"));

    let before = db_state(&b);
    let again = b.import_bundle(&bundle).unwrap();
    assert_eq!(
        again,
        ImportReport {
            created: 0,
            updated: 0,
            deleted: 0,
            unchanged: 3
        }
    );
    assert_eq!(db_state(&b), before, "a second import changes nothing");
    // Also after reopening (documents loaded from storage rather than memory).
    drop(b);
    let b = db.open("b.db");
    let again = b.import_bundle(&bundle).unwrap();
    assert_eq!(
        again,
        ImportReport {
            created: 0,
            updated: 0,
            deleted: 0,
            unchanged: 3
        }
    );
    assert_eq!(db_state(&b), before);
    // Importing one's own export is a no-op too.
    let own = export(&a, BundleScope::All);
    let state = db_state(&a);
    assert_eq!(a.import_bundle(&own).unwrap().unchanged, 3);
    assert_eq!(db_state(&a), state);
}

#[test]
fn concurrent_edits_converge() {
    let db = TempDb::new();
    let (a, b) = (db.open("a.db"), db.open("b.db"));
    let doc = a
        .create(
            "docs",
            json!({"title": "", "count": 0, "tags": ["x"], "meta": {"owner": "ann"}}),
        )
        .unwrap();
    let other = a.create("docs", json!({"v": 0})).unwrap();
    a.set_text(&doc, &ptr("/title"), "hello world").unwrap();
    b.import_bundle(&export(&a, BundleScope::All)).unwrap();
    assert_same_doc(&a, &b, &doc);

    // Concurrent edits: disjoint keys, the same key, text splices, list inserts, new docs.
    a.update(&doc, json!({"meta": {"a_was_here": true}, "count": 1}))
        .unwrap();
    b.update(&doc, json!({"meta": {"b_was_here": true}, "count": 2}))
        .unwrap();
    a.splice(&doc, &ptr("/title"), 0, 1, "H").unwrap();
    b.splice(&doc, &ptr("/title"), 11, 0, "!").unwrap();
    a.set(&doc, &ptr("/tags/-"), json!("from a")).unwrap();
    b.set(&doc, &ptr("/tags/0"), json!("X")).unwrap();
    a.update(&other, json!({"v": "a"})).unwrap();
    b.update(&other, json!({"v": "b"})).unwrap();
    let only_a = a.create("docs", json!({"from": "a"})).unwrap();
    let only_b = b.create("docs", json!({"from": "b"})).unwrap();
    let (ha, hb) = (a.get(&doc).unwrap().heads, b.get(&doc).unwrap().heads);
    assert_ne!(ha, hb);

    // One bundle each way (each exported before importing the other's).
    let (from_a, from_b) = (export(&a, BundleScope::All), export(&b, BundleScope::All));
    let ra = a.import_bundle(&from_b).unwrap();
    let rb = b.import_bundle(&from_a).unwrap();
    assert_eq!(
        ra,
        ImportReport {
            created: 1,
            updated: 2,
            deleted: 0,
            unchanged: 0
        }
    );
    assert_eq!(
        rb,
        ImportReport {
            created: 1,
            updated: 2,
            deleted: 0,
            unchanged: 0
        }
    );

    let body = assert_same_doc(&a, &b, &doc);
    assert_eq!(body["title"], json!("Hello world!"), "both splices survive");
    assert_eq!(
        body["meta"],
        json!({"owner": "ann", "a_was_here": true, "b_was_here": true})
    );
    assert!(body["count"] == json!(1) || body["count"] == json!(2));
    assert_eq!(body["tags"], json!(["X", "from a"]));
    let merged = a.get(&doc).unwrap().heads;
    assert_eq!(
        sorted(&merged),
        sorted(&[ha, hb].concat()),
        "heads are both sides' heads"
    );
    let v = assert_same_doc(&a, &b, &other)["v"].clone();
    assert!(v == json!("a") || v == json!("b"));
    assert_same_doc(&a, &b, &only_a);
    assert_same_doc(&a, &b, &only_b);
    assert_eq!(db_state(&a).docs, db_state(&b).docs);

    // Exchanging again changes nothing on either side.
    let (sa, sb) = (db_state(&a), db_state(&b));
    sync(&a, &b);
    assert_eq!(db_state(&a), sa);
    assert_eq!(db_state(&b), sb);

    // Both keep editing the merged document after reopening.
    drop(a);
    let a = db.open("a.db");
    a.splice(&doc, &ptr("/title"), 0, 0, "¡").unwrap();
    b.update(&doc, json!({"count": null})).unwrap();
    sync(&a, &b);
    let body = assert_same_doc(&a, &b, &doc);
    assert_eq!(body["title"], json!("¡Hello world!"));
    assert!(body.get("count").is_none());
}

#[test]
fn deletion_wins_over_concurrent_edit() {
    // Both import orders: the tombstone arrives first, or the edit arrives first.
    for tombstone_first in [true, false] {
        let db = TempDb::new();
        let (a, b) = (db.open("a.db"), db.open("b.db"));
        let id = a.create("c", json!({"n": 0})).unwrap();
        let keep = a.create("c", json!({"n": 0})).unwrap();
        b.import_bundle(&export(&a, BundleScope::All)).unwrap();

        a.delete(&id).unwrap();
        b.update(&id, json!({"n": 1, "edited": "concurrently"}))
            .unwrap();
        b.set_text(&id, &ptr("/t"), "more").unwrap();
        b.update(&keep, json!({"n": 1})).unwrap();
        let (from_a, from_b) = (export(&a, BundleScope::All), export(&b, BundleScope::All));
        let (ra, rb) = if tombstone_first {
            let rb = b.import_bundle(&from_a).unwrap();
            (a.import_bundle(&from_b).unwrap(), rb)
        } else {
            let ra = a.import_bundle(&from_b).unwrap();
            (ra, b.import_bundle(&from_a).unwrap())
        };
        assert_eq!(rb.deleted, 1, "the tombstone deletes the edited doc on b");
        assert_eq!(ra.deleted, 0);
        assert_eq!(ra.updated, 1, "only `keep` changes on a");
        assert_eq!(ra.unchanged, 1, "the edit to a deleted doc is ignored");
        for r in [&a, &b] {
            assert!(matches!(r.get(&id), Err(Error::Deleted(x)) if x == id));
            assert!(matches!(
                r.update(&id, json!({"n": 2})),
                Err(Error::Deleted(_))
            ));
            assert_eq!(r.list("c").unwrap().len(), 1);
        }
        let last_b = b.changes_since(0, usize::MAX, None).unwrap();
        let del = last_b
            .iter()
            .find(|e| e.kind == ChangeKind::Deleted)
            .unwrap();
        assert_eq!((del.id, del.origin), (id, Origin::Bundle));
        assert_same_doc(&a, &b, &keep);
        assert_eq!(tombstones(&a), tombstones(&b));
        assert_eq!(db_state(&a).docs, db_state(&b).docs);

        // The tombstone also reaches a third replica that never saw the doc, and the doc's
        // content arriving later does not resurrect it.
        let c = db.open("c.db");
        c.import_bundle(&export(&a, BundleScope::All)).unwrap();
        assert!(matches!(c.get(&id), Err(Error::Deleted(_))));
        let report = c.import_bundle(&from_b).unwrap();
        assert_eq!(report.created + report.deleted, 0);
        assert!(matches!(c.get(&id), Err(Error::Deleted(_))));
        assert_eq!(tombstones(&c), tombstones(&a));
        assert_same_doc(&a, &c, &keep);
    }
}

#[test]
fn scoped_exports_contain_exactly_their_documents() {
    let db = TempDb::new();
    let (a, b) = (db.open("a.db"), db.open("b.db"));
    let t1 = a.create("todos", json!({"i": 1})).unwrap();
    let t2 = a.create("todos", json!({"i": 2})).unwrap();
    let t3 = a.create("todos", json!({"i": 3})).unwrap();
    let n1 = a.create("notes", json!({"i": 1})).unwrap();
    let n2 = a.create("notes", json!({"i": 2})).unwrap();
    a.delete(&t3).unwrap();
    let set = |ids: &[DocumentId]| ids.iter().copied().collect::<BTreeSet<_>>();

    assert_eq!(
        bundle_ids(&export(&a, BundleScope::All)),
        (set(&[t1, t2, n1, n2]), set(&[t3]))
    );
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Collection("todos".into()))),
        (set(&[t1, t2]), set(&[t3]))
    );
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Collection("notes".into()))),
        (set(&[n1, n2]), set(&[]))
    );
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Collection("none".into()))),
        (set(&[]), set(&[]))
    );

    // Share the notes only.
    let report = b
        .import_bundle(&export(&a, BundleScope::Collection("notes".into())))
        .unwrap();
    assert_eq!(report.created, 2);
    assert!(matches!(b.get(&t1), Err(Error::NotFound(_))));
    assert_same_doc(&a, &b, &n1);

    // Since(seq): exactly what changed after seq (updates, creations, deletions).
    let mark = a.last_seq();
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Since(mark))),
        (set(&[]), set(&[]))
    );
    a.update(&t1, json!({"i": 10})).unwrap();
    a.update(&n2, json!({"i": 20})).unwrap();
    a.delete(&n1).unwrap();
    let t4 = a.create("todos", json!({"i": 4})).unwrap();
    let since = export(&a, BundleScope::Since(mark));
    assert_eq!(bundle_ids(&since), (set(&[t1, n2, t4]), set(&[n1])));
    let mid = a.last_seq() - 1; // before t4 was created
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Since(mid))),
        (set(&[t4]), set(&[]))
    );
    assert_eq!(
        bundle_ids(&export(&a, BundleScope::Since(0))),
        bundle_ids(&export(&a, BundleScope::All))
    );
    for beyond in [u64::MAX / 2, u64::MAX / 2 + 1, u64::MAX] {
        assert_eq!(
            bundle_ids(&export(&a, BundleScope::Since(beyond))),
            (set(&[]), set(&[])),
            "{beyond}"
        );
    }

    // The incremental bundle brings b up to date for everything it had, and adds the rest.
    let report = b.import_bundle(&since).unwrap();
    assert_eq!(
        report,
        ImportReport {
            created: 2,
            updated: 1,
            deleted: 1,
            unchanged: 0
        }
    );
    assert_same_doc(&a, &b, &n2);
    assert_same_doc(&a, &b, &t1);
    assert_same_doc(&a, &b, &t4);
    assert!(matches!(b.get(&n1), Err(Error::Deleted(_))));
    // t2 never changed after mark and was not in the notes bundle: b does not have it.
    assert!(matches!(b.get(&t2), Err(Error::NotFound(_))));
    // The document entries of a Since bundle hold whole documents: t1 on b has all of a's history.
    assert_eq!(
        b.get_at(&t1, &a.changes_since(0, 1, None).unwrap()[0].heads)
            .unwrap()
            .body,
        json!({"i": 1})
    );
}

#[test]
fn bundles_chain_through_a_third_replica() {
    let db = TempDb::new();
    let (a, b, c) = (db.open("a.db"), db.open("b.db"), db.open("c.db"));
    let id = a.create("c", json!({"list": []})).unwrap();
    b.import_bundle(&export(&a, BundleScope::All)).unwrap();
    c.import_bundle(&export(&b, BundleScope::All)).unwrap();
    for (i, r) in [&a, &b, &c].into_iter().enumerate() {
        r.set(&id, &ptr("/list/-"), json!(i)).unwrap();
        r.update(&id, json!({ format!("by{i}"): true })).unwrap();
    }
    // a -> b -> c -> a -> b: every replica ends up with every change.
    b.import_bundle(&export(&a, BundleScope::All)).unwrap();
    c.import_bundle(&export(&b, BundleScope::All)).unwrap();
    a.import_bundle(&export(&c, BundleScope::All)).unwrap();
    b.import_bundle(&export(&a, BundleScope::All)).unwrap();
    let body = assert_same_doc(&a, &b, &id);
    assert_same_doc(&a, &c, &id);
    let mut list: Vec<i64> = body["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    list.sort();
    assert_eq!(list, [0, 1, 2]);
    for i in 0..3 {
        assert_eq!(body[format!("by{i}")], json!(true));
    }
}

#[test]
fn an_entry_naming_another_collection_is_skipped() {
    let db = TempDb::new();
    let (a, b) = (db.open("a.db"), db.open("b.db"));
    let id = a.create("todos", json!({"n": 1})).unwrap();
    b.import_bundle(&export(&a, BundleScope::All)).unwrap();
    a.update(&id, json!({"n": 2})).unwrap();
    // The same document claimed for another collection: not merged, nothing changes on b.
    let mut bundle = weft::Bundle::decode(&export(&a, BundleScope::All)).unwrap();
    for entry in &mut bundle.entries {
        if let weft::BundleEntry::Document { collection, .. } = entry {
            *collection = "notes".into();
        }
    }
    let state = db_state(&b);
    let report = b.import_bundle(&bundle.encode()).unwrap();
    assert_eq!(
        report,
        ImportReport {
            created: 0,
            updated: 0,
            deleted: 0,
            unchanged: 1
        }
    );
    assert_eq!(db_state(&b), state);
    assert_eq!(b.get(&id).unwrap().collection, "todos");
    // The genuine entry still merges.
    assert_eq!(
        b.import_bundle(&export(&a, BundleScope::All))
            .unwrap()
            .updated,
        1
    );
    assert_eq!(b.get(&id).unwrap().body, json!({"n": 2}));
}
