//! The library API end to end over real SQLite files: CRUD, paths, text, history, queries, the
//! change feed, hooks and subscriptions.

use crate::common;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use weft::automerge::transaction::{Transactable, Transaction};
use weft::automerge::{ROOT, ScalarValue};
use weft::{
    BundleScope, ChangeEvent, ChangeHash, ChangeKind, DocumentId, Error, Filter, JsonError, Origin,
    Path, Query, Replica, Scope,
};

use common::{TempDb, db_state, merge_patch, sorted};

fn ptr(p: &str) -> Path {
    Path::from_pointer(p).unwrap()
}

/// Runs `f` on another thread and fails (instead of hanging) if it does not finish in time.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => {
            handle.join().unwrap();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: surface its panic.
            std::panic::resume_unwind(handle.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish in 60 s (deadlock?)")
        }
    }
}

fn feed(replica: &Replica) -> Vec<ChangeEvent> {
    replica.changes_since(0, usize::MAX, None).unwrap()
}

// ----- CRUD round trips ---------------------------------------------------------------------

#[test]
fn bodies_round_trip_exactly() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let bodies = [
        json!({}),
        json!({"empty_obj": {}, "empty_arr": [], "nested": {"e": {}, "a": [[], {}]}}),
        json!({
            "one": 1, "one_f": 1.0, "neg": -42, "neg_f": -0.5, "zero_f": 0.0, "neg_zero": -0.0,
            "max_u": u64::MAX, "max_i": i64::MAX, "min_i": i64::MIN, "big_f": 1.5e300,
            "tiny_f": 5e-324, "t": true, "f": false, "n": null
        }),
        json!({
            "emoji": "👩‍👩‍👧 🌍🎉", "cjk": "漢字かなカナ한국어", "combining": "e\u{301}a\u{308}\u{20dd}",
            "rtl": "שלום مرحبا", "escapes": "quote \" backslash \\ nl \n tab \t nul \u{0} del \u{7f}",
            "键": {"ключ": ["значение", "🔑"]}, "": "empty key"
        }),
        json!({
            "deep": {"a": {"b": {"c": {"d": {"e": [1, [2, [3, [4, {"f": "g"}]]]]}}}}},
            "list": [1, "two", 3.0, null, true, {"k": [{}]}, [[]]]
        }),
    ];
    let mut ids = Vec::new();
    for body in &bodies {
        let id = r.create("things", body.clone()).unwrap();
        let doc = r.get(&id).unwrap();
        assert_eq!(&doc.body, body);
        // Same text, so ints stay ints and floats stay floats (1 vs 1.0).
        assert_eq!(
            serde_json::to_string(&doc.body).unwrap(),
            serde_json::to_string(body).unwrap()
        );
        assert_eq!(doc.id, id);
        assert_eq!(doc.collection, "things");
        assert!(!doc.heads.is_empty(), "every document has heads, even {{}}");
        ids.push(id);
    }
    let text = serde_json::to_string(&r.get(&ids[2]).unwrap().body).unwrap();
    for needle in [
        "\"one\":1,",
        "\"one_f\":1.0",
        "\"max_u\":18446744073709551615",
        "\"min_i\":-9223372036854775808",
        "\"neg\":-42",
        "\"neg_zero\":-0.0",
    ] {
        assert!(text.contains(needle), "{needle} missing in {text}");
    }
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "ids are unique"
    );

    // The same after reopening the file.
    let before: Vec<_> = ids.iter().map(|id| r.get(id).unwrap()).collect();
    drop(r);
    let r = db.open("a.db");
    for (id, old) in ids.iter().zip(&before) {
        let doc = r.get(id).unwrap();
        assert_eq!(&doc, old);
        assert_eq!(
            serde_json::to_string(&doc.body).unwrap(),
            serde_json::to_string(&old.body).unwrap()
        );
    }
}

#[test]
fn large_document_round_trips() {
    let db = TempDb::new();
    let r = db.open("big.db");
    let blob: String = "weft 漢字 🎉 ".repeat(40_000); // ~600 KB of UTF-8
    let rows: Vec<Value> = (0..2_000)
        .map(|i| json!({"i": i, "f": i as f64 + 0.5, "s": format!("row {i} {}", "x".repeat(150))}))
        .collect();
    let body = json!({"blob": blob, "rows": rows, "meta": {"n": 2000}});
    let size = body.to_string().len();
    assert!(size > 900_000, "body is {size} bytes");
    let id = r.create("big", body.clone()).unwrap();
    assert_eq!(r.get(&id).unwrap().body, body);

    let patch = json!({"meta": {"n": 2001, "done": true}, "blob": "short now"});
    let mut expected = body.clone();
    merge_patch(&mut expected, &patch);
    let heads = r.update(&id, patch).unwrap();
    let doc = r.get(&id).unwrap();
    assert_eq!(doc.body, expected);
    assert_eq!(doc.heads, heads);
    assert_eq!(
        r.get_at(&id, &r.changes_since(0, 1, None).unwrap()[0].heads)
            .unwrap()
            .body,
        body
    );

    drop(r);
    let r = db.open("big.db");
    let doc = r.get(&id).unwrap();
    assert_eq!(doc.body, expected);
    assert_eq!(sorted(&doc.heads), sorted(&heads));
    // The stored Automerge data loads too (not just the materialized JSON).
    r.set(&id, &ptr("/rows/1999/i"), json!(-1)).unwrap();
    assert_eq!(r.get(&id).unwrap().body["rows"][1999]["i"], json!(-1));
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let start = json!({
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
        "n": 1, "f": 1.5, "s": "scalar"
    });
    let id = r.create("docs", start.clone()).unwrap();
    let patches = [
        // The example of RFC 7386 section 3.
        json!({
            "title": "Hello!", "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null}, "tags": ["example"]
        }),
        json!({"n": 1.0, "f": 2}),
        json!({"s": {"now": "an object", "gone": null, "inner": {"x": null, "y": [1]}}}),
        json!({"missing": null, "author": {"givenName": null}}),
        json!({"author": null, "tags": {"a": 1}, "content": [1, {"b": null}]}),
        json!({}),
        json!({"emoji": "🎉", "nested": {"a": {"b": {"c": {}}}}}),
        json!({"nested": {"a": {"b": {"c": {"d": 1}}}}}),
    ];
    let mut expected = start;
    for patch in patches {
        merge_patch(&mut expected, &patch);
        let heads = r.update(&id, patch.clone()).unwrap();
        let doc = r.get(&id).unwrap();
        assert_eq!(doc.body, expected, "after {patch}");
        assert_eq!(
            serde_json::to_string(&doc.body).unwrap(),
            serde_json::to_string(&expected).unwrap(),
            "number kinds after {patch}"
        );
        assert_eq!(doc.heads, heads);
    }
    assert_eq!(
        r.get(&id).unwrap().body["author"],
        Value::Null,
        "null in a patch deletes"
    );
    assert!(r.get(&id).unwrap().body.get("author").is_none());
    // A patch must be an object.
    assert!(matches!(
        r.update(&id, json!([1])),
        Err(Error::Json(JsonError::NotAnObject(_)))
    ));
}

#[test]
fn set_and_delete_at_paths() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let id = r
        .create(
            "docs",
            json!({"list": [1, 2], "m": {"inner": {"x": 1}}, "s": "str"}),
        )
        .unwrap();
    r.set(&id, &ptr("/list/-"), json!(3)).unwrap();
    r.set(&id, &ptr("/list/3"), json!({"appended": [true]}))
        .unwrap(); // index == len appends
    r.set(&id, &ptr("/list/0"), json!("one")).unwrap();
    r.set(&id, &ptr("/m/k~1x"), json!({"deep": true})).unwrap();
    r.set(&id, &ptr("/m/t~0ilde"), json!(1.0)).unwrap();
    r.set(&id, &ptr("/m/inner/x"), json!([1, 2, 3])).unwrap();
    r.set(&id, &ptr("/new"), json!({})).unwrap();
    r.set(&id, &ptr("/new/k"), json!("v")).unwrap();
    assert_eq!(
        r.get(&id).unwrap().body,
        json!({
            "list": ["one", 2, 3, {"appended": [true]}],
            "m": {"inner": {"x": [1, 2, 3]}, "k/x": {"deep": true}, "t~ilde": 1.0},
            "s": "str", "new": {"k": "v"}
        })
    );
    r.delete_path(&id, &ptr("/list/1")).unwrap();
    r.delete_path(&id, &ptr("/m/k~1x")).unwrap();
    r.delete_path(&id, &ptr("/m/inner/x/2")).unwrap();
    r.delete_path(&id, &ptr("/s")).unwrap();
    let body = json!({
        "list": ["one", 3, {"appended": [true]}],
        "m": {"inner": {"x": [1, 2]}, "t~ilde": 1.0}, "new": {"k": "v"}
    });
    assert_eq!(r.get(&id).unwrap().body, body);

    // Paths that do not fit fail without changing anything.
    let heads = r.get(&id).unwrap().heads;
    let seq = r.last_seq();
    assert!(matches!(
        r.set(&id, &ptr("/missing/x"), json!(1)),
        Err(Error::Json(JsonError::PathNotFound(_)))
    ));
    assert!(matches!(
        r.set(&id, &ptr("/list/9"), json!(1)),
        Err(Error::Json(JsonError::OutOfRange {
            index: 9,
            len: 3,
            ..
        }))
    ));
    assert!(matches!(
        r.set(&id, &ptr("/list/x"), json!(1)),
        Err(Error::Json(JsonError::InvalidPath { .. }))
    ));
    assert!(matches!(
        r.set(&id, &ptr(""), json!(1)),
        Err(Error::Json(JsonError::InvalidPath { .. }))
    ));
    assert!(matches!(
        r.delete_path(&id, &ptr("/nope")),
        Err(Error::Json(JsonError::PathNotFound(_)))
    ));
    assert!(matches!(
        r.delete_path(&id, &ptr("/list/-")),
        Err(Error::Json(JsonError::PathNotFound(_)))
    ));
    assert!(matches!(
        r.delete_path(&id, &ptr("/new/k/deeper")),
        Err(Error::Json(JsonError::PathNotFound(_)))
    ));
    let doc = r.get(&id).unwrap();
    assert_eq!(doc.body, body);
    assert_eq!(doc.heads, heads);
    assert_eq!(r.last_seq(), seq);
}

#[test]
fn text_set_and_splice() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let id = r
        .create("notes", json!({"title": "plain", "n": 5, "o": {}}))
        .unwrap();
    let title = ptr("/title");

    // Splicing a plain string is refused and changes nothing.
    let heads = r.get(&id).unwrap().heads;
    match r.splice(&id, &title, 0, 0, "x") {
        Err(Error::Json(JsonError::NotText { path, found })) => {
            assert_eq!(path, title);
            assert_eq!(found, "a plain string");
        }
        other => panic!("expected NotText, got {other:?}"),
    }
    assert!(matches!(
        r.splice(&id, &ptr("/n"), 0, 0, "x"),
        Err(Error::Json(JsonError::NotText { .. }))
    ));
    assert!(matches!(
        r.splice(&id, &ptr("/o"), 0, 0, "x"),
        Err(Error::Json(JsonError::NotText { .. }))
    ));
    assert!(matches!(
        r.splice(&id, &ptr("/nothing"), 0, 0, "x"),
        Err(Error::Json(JsonError::PathNotFound(_)))
    ));
    assert_eq!(r.get(&id).unwrap().heads, heads);

    r.set_text(&id, &title, "héllo 🌍 world").unwrap();
    assert_eq!(r.get(&id).unwrap().body["title"], json!("héllo 🌍 world"));
    // Indexes are Unicode code points: "🌍" is one.
    r.splice(&id, &title, 6, 1, "🎉🎉").unwrap();
    assert_eq!(r.get(&id).unwrap().body["title"], json!("héllo 🎉🎉 world"));
    r.splice(&id, &title, 0, 1, "H").unwrap();
    let len = "Héllo 🎉🎉 world".chars().count();
    r.splice(&id, &title, len, 0, "!").unwrap();
    assert_eq!(
        r.get(&id).unwrap().body["title"],
        json!("Héllo 🎉🎉 world!")
    );
    // Out of range: error, nothing changes.
    let heads = r.get(&id).unwrap().heads;
    assert!(matches!(
        r.splice(&id, &title, len + 2, 0, "x"),
        Err(Error::Json(JsonError::OutOfRange { .. }))
    ));
    assert!(matches!(
        r.splice(&id, &title, 2, len, "x"),
        Err(Error::Json(JsonError::OutOfRange { .. }))
    ));
    assert_eq!(r.get(&id).unwrap().heads, heads);

    // A merge patch on a text field keeps it text (splice still works), and is diffed.
    r.update(&id, json!({"title": "Héllo world!"})).unwrap();
    r.splice(&id, &title, 0, 0, ">").unwrap();
    assert_eq!(r.get(&id).unwrap().body["title"], json!(">Héllo world!"));
    // set_text on existing text with the same content changes nothing.
    let heads = r.get(&id).unwrap().heads;
    assert_eq!(r.set_text(&id, &title, ">Héllo world!").unwrap(), heads);

    // Text inside arrays and nested objects, and text survives a reopen.
    r.set(&id, &ptr("/o/list"), json!(["a"])).unwrap();
    r.set_text(&id, &ptr("/o/list/1"), "appended text").unwrap();
    r.splice(&id, &ptr("/o/list/1"), 0, 9, "").unwrap();
    drop(r);
    let r = db.open("a.db");
    r.splice(&id, &ptr("/o/list/1"), 4, 0, "!").unwrap();
    r.splice(&id, &title, 1, 0, "¡").unwrap();
    let body = r.get(&id).unwrap().body;
    assert_eq!(body["o"]["list"], json!(["a", "text!"]));
    assert_eq!(body["title"], json!(">¡Héllo world!"));
}

#[test]
fn change_closure_commits_or_does_nothing() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let id = r.create("c", json!({"x": 1})).unwrap();
    let heads = r
        .change(&id, |tx: &mut Transaction<'_>| {
            tx.put(ROOT, "counter", ScalarValue::counter(1))?;
            tx.increment(ROOT, "counter", 41)?;
            tx.put(ROOT, "x", 2)?;
            Ok::<(), weft::automerge::AutomergeError>(())
        })
        .unwrap();
    let doc = r.get(&id).unwrap();
    assert_eq!(doc.body, json!({"x": 2, "counter": 42}));
    assert_eq!(doc.heads, heads);

    let seq = r.last_seq();
    let err = r
        .change(&id, |tx: &mut Transaction<'_>| {
            tx.put(ROOT, "x", 99).map_err(|e| e.to_string())?;
            tx.delete(ROOT, "counter").map_err(|e| e.to_string())?;
            Err::<(), String>("nope, rolled back".into())
        })
        .unwrap_err();
    match &err {
        Error::ChangeFn(message) => assert!(message.contains("nope, rolled back"), "{message}"),
        other => panic!("expected ChangeFn, got {other:?}"),
    }
    let doc = r.get(&id).unwrap();
    assert_eq!(doc.heads, heads, "a failed change commits nothing");
    assert_eq!(doc.body, json!({"x": 2, "counter": 42}));
    assert_eq!(r.last_seq(), seq);
    // The in-memory document was rolled back too: the next edit builds on the old state.
    r.update(&id, json!({"y": 1})).unwrap();
    assert_eq!(
        r.get(&id).unwrap().body,
        json!({"x": 2, "counter": 42, "y": 1})
    );
    drop(r);
    let r = db.open("a.db");
    assert_eq!(
        r.get(&id).unwrap().body,
        json!({"x": 2, "counter": 42, "y": 1})
    );
    // A closure that makes no operation is not a change.
    let heads = r.get(&id).unwrap().heads;
    assert_eq!(
        r.change(&id, |_tx: &mut Transaction<'_>| Ok::<(), String>(()))
            .unwrap(),
        heads
    );
    assert_eq!(r.last_seq(), seq + 1);
}

#[test]
fn delete_is_final_and_idempotent() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let keep = r.create("c", json!({"k": 1})).unwrap();
    let id = r.create("c", json!({"k": 2})).unwrap();
    r.update(&id, json!({"k": 3})).unwrap();
    assert_eq!(r.counts().unwrap(), (2, 0, 3));
    r.delete(&id).unwrap();
    assert_eq!(r.counts().unwrap(), (1, 1, 4));
    let last = feed(&r).pop().unwrap();
    assert_eq!((last.id, last.kind), (id, ChangeKind::Deleted));

    assert!(matches!(r.get(&id), Err(Error::Deleted(x)) if x == id));
    assert!(matches!(r.update(&id, json!({"k": 4})), Err(Error::Deleted(x)) if x == id));
    assert!(matches!(
        r.set(&id, &ptr("/k"), json!(4)),
        Err(Error::Deleted(_))
    ));
    assert!(matches!(
        r.delete_path(&id, &ptr("/k")),
        Err(Error::Deleted(_))
    ));
    assert!(matches!(
        r.set_text(&id, &ptr("/t"), "x"),
        Err(Error::Deleted(_))
    ));
    assert!(matches!(r.get_at(&id, &[]), Err(Error::Deleted(_))));
    let listed: Vec<DocumentId> = r.list("c").unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(listed, vec![keep]);
    assert_eq!(r.query(&Query::default()).unwrap().len(), 1);

    // Deleting again succeeds and changes nothing.
    let seq = r.last_seq();
    r.delete(&id).unwrap();
    assert_eq!(r.last_seq(), seq);
    assert_eq!(r.counts().unwrap(), (1, 1, 4));

    // Still deleted after reopening, and deleting there is still a no-op.
    drop(r);
    let r = db.open("a.db");
    assert!(matches!(r.get(&id), Err(Error::Deleted(_))));
    r.delete(&id).unwrap();
    assert_eq!(r.last_seq(), seq);
    assert_eq!(r.get(&keep).unwrap().body, json!({"k": 1}));
}

#[test]
fn list_is_in_creation_order() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..30 {
        let (collection, ids) = if i % 3 == 0 {
            ("b", &mut b)
        } else {
            ("a", &mut a)
        };
        ids.push(r.create(collection, json!({"i": i})).unwrap());
    }
    // Updates (the catalog row is rewritten) do not reorder.
    for id in a.iter().rev().step_by(2) {
        r.update(id, json!({"touched": true})).unwrap();
    }
    let many = r
        .create_many("a", (30..40).map(|i| json!({"i": i})))
        .unwrap();
    a.extend(&many);
    r.delete(&a[3]).unwrap();
    a.remove(3);
    let ids = |c: &str, r: &Replica| -> Vec<DocumentId> {
        r.list(c).unwrap().into_iter().map(|d| d.id).collect()
    };
    assert_eq!(ids("a", &r), a);
    assert_eq!(ids("b", &r), b);
    assert!(ids("nothing", &r).is_empty());
    let limited: Vec<DocumentId> = r
        .query(&Query::collection("a").limit(5))
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(limited, a[..5]);
    drop(r);
    let r = db.open("a.db");
    assert_eq!(ids("a", &r), a);
    assert_eq!(ids("b", &r), b);
}

#[test]
fn query_filters() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let mut ids = Vec::new();
    for n in 1..=5 {
        let body = json!({
            "n": n, "half": n as f64 / 2.0, "name": format!("item{n}"), "even": n % 2 == 0,
            "tags": if n % 2 == 0 { json!(["even", n]) } else { json!([]) },
            "o": if n > 3 { json!({"k": null}) } else { json!({}) }
        });
        ids.push(r.create("items", body).unwrap());
    }
    r.create("other", json!({"n": 100})).unwrap();
    let run =
        |q: Query| -> Vec<DocumentId> { r.query(&q).unwrap().into_iter().map(|d| d.id).collect() };
    let items = |f: &str| run(Query::collection("items").filter(Filter::parse(f).unwrap()));
    assert_eq!(items("n >= 3"), ids[2..]);
    assert_eq!(items("n > 3"), ids[3..]);
    assert_eq!(items("n < 3"), ids[..2]);
    assert_eq!(items("n <= 3"), ids[..3]);
    assert_eq!(items("n = 3.0"), [ids[2]]);
    assert_eq!(items("half = 1"), [ids[1]]);
    assert_eq!(items("half < 1.5"), ids[..2]);
    assert_eq!(items("n != 3"), [ids[0], ids[1], ids[3], ids[4]]);
    assert_eq!(items("name = \"item2\""), [ids[1]]);
    assert_eq!(items("name > \"item3\""), ids[3..]);
    assert_eq!(items("even = true"), [ids[1], ids[3]]);
    assert_eq!(items("tags[0] = \"even\""), [ids[1], ids[3]]);
    assert_eq!(items("tags[1] >= 4"), [ids[3]]);
    assert_eq!(items("tags = []"), [ids[0], ids[2], ids[4]]);
    assert_eq!(items("tags = [\"even\", 2]"), [ids[1]]);
    assert_eq!(items("o.k exists"), ids[3..]);
    assert_eq!(items("o.k = null"), ids[3..]);
    assert_eq!(items("o = {}"), ids[..3]);
    assert!(items("missing = 1").is_empty());
    assert!(items("missing != 1").is_empty());
    assert!(items("n = \"3\"").is_empty());
    // Across collections, combined conditions, limits.
    assert_eq!(
        run(Query::default().filter(Filter::parse("n >= 5").unwrap())).len(),
        2
    );
    let both = Query::collection("items")
        .filter(Filter::parse("n >= 2").unwrap())
        .filter(Filter::parse("even = false").unwrap());
    assert_eq!(run(both.clone()), [ids[2], ids[4]]);
    assert_eq!(run(both.limit(1)), [ids[2]]);
    let or = Filter::Or(vec![
        Filter::parse("n = 1").unwrap(),
        Filter::parse("n = 5").unwrap(),
    ]);
    assert_eq!(
        run(Query::collection("items").filter(or.clone())),
        [ids[0], ids[4]]
    );
    let not = Filter::Not(Box::new(or));
    assert_eq!(run(Query::collection("items").filter(not)), ids[1..4]);
    // Invalid filters are refused.
    assert!(matches!(
        r.query(&Query::default().filter(Filter::Cmp(
            weft::FieldPath::parse("n").unwrap(),
            weft::CmpOp::Lt,
            json!(true)
        ))),
        Err(Error::Filter(_))
    ));
}

#[test]
fn get_at_reads_history() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let v0 = json!({"v": 0, "list": [1]});
    let id = r.create("h", v0.clone()).unwrap();
    let other = r.create("h", json!({"other": true})).unwrap();
    let h0 = r.get(&id).unwrap().heads;
    let h1 = r.update(&id, json!({"v": 1, "added": "yes"})).unwrap();
    let v1 = json!({"v": 1, "list": [1], "added": "yes"});
    r.set_text(&id, &ptr("/t"), "text").unwrap();
    let h2 = r.delete_path(&id, &ptr("/list")).unwrap();
    let v2 = json!({"v": 1, "added": "yes", "t": "text"});
    assert_ne!(h0, h1);
    assert_ne!(h1, h2);
    let check = |r: &Replica| {
        for (heads, body) in [(&h0, &v0), (&h1, &v1), (&h2, &v2)] {
            let doc = r.get_at(&id, heads).unwrap();
            assert_eq!(&doc.body, body);
            assert_eq!(&doc.heads, heads);
            assert_eq!(doc.id, id);
        }
        assert_eq!(r.get(&id).unwrap().body, v2);
        // Heads of another document, or made up: an error naming the hash.
        let foreign = r.get(&other).unwrap().heads;
        assert!(matches!(
            r.get_at(&id, &foreign),
            Err(Error::UnknownHeads { id: x, .. }) if x == id
        ));
        let made_up = ChangeHash([7; 32]);
        match r.get_at(&id, &[h1[0], made_up]) {
            Err(Error::UnknownHeads { hash, .. }) => assert_eq!(hash, made_up.to_string()),
            other => panic!("expected UnknownHeads, got {other:?}"),
        }
        assert!(matches!(
            r.get_at(&DocumentId::from_bytes([1; 16]), &h0),
            Err(Error::NotFound(_))
        ));
    };
    check(&r);
    drop(r);
    let r = db.open("a.db");
    check(&r);
}

#[test]
fn reopening_gives_the_same_state() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let replica_id = r.replica_id();
    let a = r
        .create("a", json!({"x": 1, "nested": {"y": [1, 2.0]}}))
        .unwrap();
    let b = r.create("b", json!({"t": ""})).unwrap();
    let c = r.create("a", json!({})).unwrap();
    r.set_text(&b, &ptr("/t"), "text").unwrap();
    r.splice(&b, &ptr("/t"), 4, 0, "!").unwrap();
    for i in 0..20 {
        r.update(&a, json!({"i": i})).unwrap();
    }
    r.delete(&c).unwrap();
    let before = db_state(&r);
    assert_eq!(before.docs.len(), 2);
    assert_eq!(before.tombstones.len(), 1);
    drop(r);

    let r = db.open("a.db");
    assert_eq!(r.replica_id(), replica_id);
    assert_eq!(db_state(&r), before);
    r.integrity_check().unwrap();
    // Documents load from storage and keep working.
    r.update(&a, json!({"i": "after"})).unwrap();
    r.splice(&b, &ptr("/t"), 0, 0, ">").unwrap();
    assert_eq!(r.get(&b).unwrap().body, json!({"t": ">text!"}));
    assert_eq!(r.get(&a).unwrap().body["i"], json!("after"));
    // Two handles to the same file in a row see the same thing.
    r.checkpoint().unwrap();
    let after = db_state(&r);
    drop(r);
    assert_eq!(db_state(&db.open("a.db")), after);
}

fn chunk_count(path: &std::path::Path, id: &DocumentId) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(
        "SELECT count(*) FROM chunks c JOIN documents d ON d.doc_key = c.doc_key WHERE d.doc_id = ?1",
        [id.as_bytes().as_slice()],
        |r| r.get(0),
    )
    .unwrap()
}

/// Pseudo-random text that compression cannot shrink much.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'!' + ((x >> 33) % 90) as u8)
        })
        .collect()
}

#[test]
fn compaction_keeps_content_and_history() {
    let db = TempDb::new();
    let r = db.open("a.db");
    // By size: incremental chunks outgrow 64 KiB and the snapshot.
    let big = r.create("c", json!({"v": 0})).unwrap();
    let first = r.get(&big).unwrap().heads;
    let mut versions = vec![(first.clone(), json!({"v": 0}))];
    for i in 1..=20u64 {
        let heads = r
            .update(&big, json!({"v": i, "blob": noise(i, 8_000)}))
            .unwrap();
        versions.push((heads, json!({"v": i, "blob": noise(i, 8_000)})));
    }
    // By count: many tiny changes.
    let many = r.create("c", json!({"n": 0})).unwrap();
    for n in 1..=1100 {
        r.set(&many, &ptr("/n"), json!(n)).unwrap();
    }
    let big_chunks = chunk_count(&db.path("a.db"), &big);
    let many_chunks = chunk_count(&db.path("a.db"), &many);
    assert!(
        big_chunks < 21,
        "{big_chunks} chunks: size-based compaction did not run"
    );
    assert!(
        many_chunks < 1101,
        "{many_chunks} chunks: count-based compaction did not run"
    );

    let check = |r: &Replica| {
        assert_eq!(r.get(&big).unwrap().body, versions.last().unwrap().1);
        assert_eq!(r.get(&many).unwrap().body, json!({"n": 1100}));
        for (heads, body) in &versions {
            assert_eq!(&r.get_at(&big, heads).unwrap().body, body);
        }
    };
    check(&r);
    drop(r);
    let r = db.open("a.db");
    check(&r);
    r.update(&big, json!({"after": "reopen"})).unwrap();
    r.set(&many, &ptr("/n"), json!(-1)).unwrap();
    // A compacted document travels whole.
    let other = db.open("b.db");
    other
        .import_bundle(&r.export_bundle(&BundleScope::All).unwrap())
        .unwrap();
    for id in [big, many] {
        let (x, y) = (r.get(&id).unwrap(), other.get(&id).unwrap());
        assert_eq!(x.body, y.body);
        assert_eq!(sorted(&x.heads), sorted(&y.heads));
    }
    assert_eq!(other.get_at(&big, &first).unwrap().body, json!({"v": 0}));
}

// ----- change feed ----------------------------------------------------------------------------

#[test]
fn feed_records_every_change_in_order() {
    let db = TempDb::new();
    let r = db.open("a.db");
    assert_eq!(r.last_seq(), 0);
    let a = r.create("a", json!({"n": 1})).unwrap();
    let b = r.create("b", json!({"n": 1})).unwrap();
    let ha = r.update(&a, json!({"n": 2})).unwrap();
    r.set(&b, &ptr("/m"), json!(1)).unwrap();
    r.delete(&a).unwrap();
    let ids = r.create_many("b", [json!({}), json!({"z": 1})]).unwrap();
    let f = feed(&r);
    let got: Vec<(DocumentId, ChangeKind, &str)> = f
        .iter()
        .map(|e| (e.id, e.kind, e.collection.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (a, ChangeKind::Created, "a"),
            (b, ChangeKind::Created, "b"),
            (a, ChangeKind::Updated, "a"),
            (b, ChangeKind::Updated, "b"),
            (a, ChangeKind::Deleted, "a"),
            (ids[0], ChangeKind::Created, "b"),
            (ids[1], ChangeKind::Created, "b"),
        ]
    );
    assert!(f.windows(2).all(|w| w[0].seq < w[1].seq), "{f:?}");
    assert!(f.iter().all(|e| e.origin == Origin::Local));
    assert_eq!(f[2].heads, ha);
    assert_eq!(f.last().unwrap().seq, r.last_seq());
    assert_eq!(r.counts().unwrap().2, f.len() as u64);

    // changes_since(n) is exactly the entries after n, for every n; limit takes the oldest.
    for n in 0..=r.last_seq() + 2 {
        let want: Vec<&ChangeEvent> = f.iter().filter(|e| e.seq > n).collect();
        let got = r.changes_since(n, usize::MAX, None).unwrap();
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "since {n}");
        let limited = r.changes_since(n, 2, None).unwrap();
        assert_eq!(
            limited.iter().collect::<Vec<_>>(),
            want[..want.len().min(2)]
        );
        let only_b = r.changes_since(n, usize::MAX, Some("b")).unwrap();
        let want_b: Vec<&ChangeEvent> = want
            .iter()
            .copied()
            .filter(|e| e.collection == "b")
            .collect();
        assert_eq!(only_b.iter().collect::<Vec<_>>(), want_b);
    }
    assert!(r.changes_since(0, 0, None).unwrap().is_empty());
    // Past the end means nothing, even beyond i64::MAX (no wrap-around to "everything").
    for n in [i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        assert!(
            r.changes_since(n, 10, None).unwrap().is_empty(),
            "since {n}"
        );
    }
    assert!(r.changes_since(0, 10, Some("none")).unwrap().is_empty());
}

#[test]
fn feed_continues_after_reopen() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let id = r.create("a", json!({"n": 0})).unwrap();
    for n in 1..5 {
        r.update(&id, json!({"n": n})).unwrap();
    }
    let old = feed(&r);
    let max = r.last_seq();
    assert_eq!(old.last().unwrap().seq, max);
    drop(r);
    let r = db.open("a.db");
    assert_eq!(r.last_seq(), max);
    assert_eq!(feed(&r), old);
    r.update(&id, json!({"n": "new"})).unwrap();
    let other = r.create("a", json!({})).unwrap();
    let new = r.changes_since(max, usize::MAX, None).unwrap();
    assert_eq!(new.len(), 2);
    assert_eq!((new[0].seq, new[0].id), (max + 1, id));
    assert_eq!((new[1].seq, new[1].id), (max + 2, other));
    assert_eq!(feed(&r)[..old.len()], old[..]);
}

#[test]
fn unchanged_writes_add_no_feed_entry() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let id = r
        .create(
            "a",
            json!({"a": 1, "f": 1.5, "l": [1, {"x": "y"}], "o": {"p": {}}, "s": "s"}),
        )
        .unwrap();
    let patch =
        json!({"a": 2, "l": [1, {"x": "z"}], "o": {"p": {"q": null}, "r": [3]}, "gone": null});
    let h1 = r.update(&id, patch.clone()).unwrap();
    let seq = r.last_seq();
    let heads_again = r.update(&id, patch).unwrap();
    assert_eq!(heads_again, h1, "the same patch twice is one change");
    assert_eq!(r.last_seq(), seq);
    let noops = [
        json!({}),
        json!({"a": 2, "f": 1.5}),
        json!({"missing": null, "o": {"nope": null}}),
        json!({"l": [1, {"x": "z"}], "o": {"p": {}, "r": [3]}}),
    ];
    for patch in noops {
        assert_eq!(r.update(&id, patch.clone()).unwrap(), h1, "{patch}");
    }
    assert_eq!(r.set(&id, &ptr("/a"), json!(2)).unwrap(), h1);
    assert_eq!(r.set(&id, &ptr("/o/r"), json!([3])).unwrap(), h1);
    r.set_text(&id, &ptr("/s"), "text").unwrap();
    let h2 = r.get(&id).unwrap().heads;
    let seq = r.last_seq();
    assert_eq!(r.set_text(&id, &ptr("/s"), "text").unwrap(), h2);
    assert_eq!(r.update(&id, json!({"s": "text"})).unwrap(), h2);
    assert_eq!(r.splice(&id, &ptr("/s"), 1, 0, "").unwrap(), h2);
    assert_eq!(r.last_seq(), seq);
    assert_eq!(r.get(&id).unwrap().heads, h2);
    // But 1 -> 1.0 is a change (the number kind is part of the value).
    assert_ne!(r.update(&id, json!({"a": 2.0})).unwrap(), h2);
    assert_eq!(r.last_seq(), seq + 1);
}

// ----- hooks ----------------------------------------------------------------------------------

type Log = Arc<Mutex<Vec<ChangeEvent>>>;

fn recorder(r: &Replica, scope: Scope) -> (Log, weft::HookGuard) {
    let log: Log = Arc::default();
    let sink = log.clone();
    let guard = r.on_change(scope, move |e| sink.lock().unwrap().push(e.clone()));
    (log, guard)
}

#[test]
fn hooks_see_every_change_once_in_order() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let peer = db.open("peer.db");
    let shared = r.create("a", json!({"shared": 0})).unwrap();
    peer.import_bundle(&r.export_bundle(&BundleScope::All).unwrap())
        .unwrap();
    let start = r.last_seq();

    let (all, _g1) = recorder(&r, Scope::All);
    let (only_a, _g2) = recorder(&r, Scope::collection("a"));
    let (a_and_c, _g3) = recorder(&r, Scope::Collections(vec!["a".into(), "c".into()]));

    let x = r.create("a", json!({"n": 1})).unwrap();
    let y = r.create("b", json!({"n": 1})).unwrap();
    r.update(&x, json!({"n": 2})).unwrap();
    r.update(&x, json!({"n": 2})).unwrap(); // no change, no event
    r.set_text(&y, &ptr("/t"), "t").unwrap();
    r.delete(&y).unwrap();
    r.delete(&y).unwrap(); // no change, no event
    r.create_many("c", [json!({}), json!({})]).unwrap();
    let _ = r.update(&DocumentId::from_bytes([3; 16]), json!({})); // an error, no event
    // Changes merged from a bundle: a new doc, an update, a tombstone.
    peer.update(&shared, json!({"shared": 1})).unwrap();
    peer.create("b", json!({"from": "peer"})).unwrap();
    let gone = peer.create("c", json!({})).unwrap();
    peer.delete(&gone).unwrap();
    let report = r
        .import_bundle(&peer.export_bundle(&BundleScope::All).unwrap())
        .unwrap();
    assert_eq!((report.created, report.updated, report.deleted), (1, 1, 1));

    let expected = r.changes_since(start, usize::MAX, None).unwrap();
    assert_eq!(expected.len(), 10);
    assert_eq!(
        expected
            .iter()
            .filter(|e| e.origin == Origin::Bundle)
            .count(),
        3
    );
    assert_eq!(*all.lock().unwrap(), expected);
    let want_a: Vec<ChangeEvent> = expected
        .iter()
        .filter(|e| e.collection == "a")
        .cloned()
        .collect();
    assert_eq!(*only_a.lock().unwrap(), want_a);
    let want_ac: Vec<ChangeEvent> = expected
        .iter()
        .filter(|e| e.collection == "a" || e.collection == "c")
        .cloned()
        .collect();
    assert_eq!(*a_and_c.lock().unwrap(), want_ac);
}

#[test]
fn hooks_may_call_back_into_the_replica() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let (all, _all_guard) = recorder(&r, Scope::All);
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (r2, seen2) = (r.clone(), seen.clone());
    let guard = r.on_change(Scope::collection("a"), move |e| {
        // Reads see the committed change...
        let doc = r2.get(&e.id).expect("get inside a hook");
        assert_eq!(doc.heads, e.heads);
        seen2.lock().unwrap().push(doc.body.clone());
        // ...and writes are allowed (their events are delivered after this one).
        r2.create("log", json!({"of": e.id.to_string(), "seq": e.seq}))
            .expect("write in hook");
    });
    let r3 = r.clone();
    let ids = within("writes with a re-entrant hook", move || {
        let ids: Vec<DocumentId> = (0..5)
            .map(|i| r3.create("a", json!({"i": i})).unwrap())
            .collect();
        r3.update(&ids[0], json!({"i": "updated"})).unwrap();
        ids
    });
    drop(guard);
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(bodies.len(), 6);
    assert_eq!(
        bodies[..5],
        (0..5).map(|i| json!({"i": i})).collect::<Vec<_>>()[..]
    );
    assert_eq!(bodies[5], json!({"i": "updated"}));
    let logs = r.list("log").unwrap();
    assert_eq!(logs.len(), 6);
    for (log, id) in logs.iter().zip(ids.iter().chain([&ids[0]])) {
        assert_eq!(log.body["of"], json!(id.to_string()));
    }
    // The All hook saw both the outer writes and the hook's writes, in feed order, once.
    assert_eq!(*all.lock().unwrap(), feed(&r));
    assert_eq!(all.lock().unwrap().len(), 12);
}

#[test]
fn dropping_the_guard_stops_delivery() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let (log, guard) = recorder(&r, Scope::All);
    let (other, _keep) = recorder(&r, Scope::All);
    let id = r.create("a", json!({})).unwrap();
    assert_eq!(log.lock().unwrap().len(), 1);
    drop(guard);
    r.update(&id, json!({"x": 1})).unwrap();
    r.delete(&id).unwrap();
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "no delivery after the guard is dropped"
    );
    assert_eq!(other.lock().unwrap().len(), 3, "other hooks keep working");
    // A guard outliving its replica is harmless.
    let (_, late) = recorder(&r, Scope::All);
    drop(r);
    drop(late);
}

// ----- subscriptions --------------------------------------------------------------------------

fn drain(sub: &mut weft::Subscription) -> Vec<ChangeEvent> {
    let mut out = Vec::new();
    while let Some(e) = sub.try_next().unwrap() {
        out.push(e);
    }
    out
}

#[test]
fn subscription_backlog_then_live() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let a = r.create("a", json!({"n": 0})).unwrap();
    r.create("b", json!({})).unwrap();
    r.update(&a, json!({"n": 1})).unwrap();
    r.update(&a, json!({"n": 2})).unwrap();

    let mut sub = r.subscribe(Scope::All, 1);
    let mut sub_b = r.subscribe(Scope::collection("b"), 0);
    let mut now = r.subscribe(Scope::All, r.last_seq());
    assert_eq!(
        drain(&mut sub),
        r.changes_since(1, usize::MAX, None).unwrap()
    );
    assert_eq!(sub.last_seq(), 4);
    assert!(drain(&mut now).is_empty());

    let b2 = r.create("b", json!({"second": true})).unwrap();
    r.update(&a, json!({"n": 3})).unwrap();
    let live = drain(&mut sub);
    assert_eq!(live, r.changes_since(4, usize::MAX, None).unwrap());
    assert_eq!(drain(&mut now), live);
    let bs = drain(&mut sub_b);
    assert_eq!(bs, r.changes_since(0, usize::MAX, Some("b")).unwrap());
    assert_eq!(bs.last().unwrap().id, b2);
    assert!(sub.try_next().unwrap().is_none());
    // The blocking iterator yields the next event once it is committed.
    r.delete(&a).unwrap();
    let e = sub.next().unwrap().unwrap();
    assert_eq!((e.id, e.kind), (a, ChangeKind::Deleted));
    assert_eq!(
        sub.next_timeout(Duration::from_millis(1)).unwrap(),
        None,
        "nothing more"
    );
}

#[test]
fn subscription_survives_buffer_overflow() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let start = r.last_seq();
    let mut all = r.subscribe(Scope::All, start);
    let mut only_b = r.subscribe(Scope::collection("b"), start);
    let mut a_and_c = r.subscribe(Scope::Collections(vec!["a".into(), "c".into()]), start);
    // Read a few first, so the overflow happens while live.
    let first = r.create("a", json!({})).unwrap();
    let e0 = all.try_next().unwrap().unwrap();
    assert_eq!(e0.id, first);

    // Far more than the 1024-event buffer, none of it read: one big transaction, then many small
    // ones, in three collections.
    let many = r
        .create_many("a", (0..1500).map(|i| json!({"i": i})))
        .unwrap();
    r.create_many("b", (0..700).map(|i| json!({"i": i})))
        .unwrap();
    for (i, id) in many.iter().take(300).enumerate() {
        r.update(id, json!({"u": i})).unwrap();
        if i % 3 == 0 {
            r.create("c", json!({"i": i})).unwrap();
        }
    }
    let mut got_all = vec![e0];
    got_all.extend(drain(&mut all));
    let expected = r.changes_since(start, usize::MAX, None).unwrap();
    assert!(expected.len() > 2_500);
    assert_eq!(got_all.len(), expected.len());
    assert!(
        got_all == expected,
        "every event, in order, without gaps or duplicates"
    );
    assert_eq!(all.last_seq(), r.last_seq());

    let got_b = drain(&mut only_b);
    assert_eq!(
        got_b,
        r.changes_since(start, usize::MAX, Some("b")).unwrap()
    );
    let got_ac = drain(&mut a_and_c);
    let want_ac: Vec<ChangeEvent> = expected
        .iter()
        .filter(|e| e.collection != "b")
        .cloned()
        .collect();
    assert_eq!(got_ac.len(), want_ac.len());
    assert!(got_ac == want_ac);

    // Overflow again after catching up: still exact.
    let from = r.last_seq();
    r.create_many("a", (0..1100).map(|i| json!({"again": i})))
        .unwrap();
    let got = drain(&mut all);
    assert!(got == r.changes_since(from, usize::MAX, None).unwrap());
    assert!(drain(&mut all).is_empty());
}

#[test]
fn subscription_read_from_another_thread() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let seed_doc = r.create("a", json!({"n": 0})).unwrap();
    let start = r.last_seq();
    let mut sub = r.subscribe(Scope::All, start);
    const WRITES: usize = 400;
    let received = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut got = Vec::new();
            while got.len() < WRITES {
                match sub.next_timeout(Duration::from_secs(30)).unwrap() {
                    Some(e) => got.push(e),
                    None => panic!("no event for 30 s after {} of {WRITES}", got.len()),
                }
            }
            // Nothing beyond what was written.
            assert_eq!(sub.try_next().unwrap(), None);
            got
        });
        let writer = s.spawn(|| {
            let mut ids = vec![seed_doc];
            for i in 0..WRITES {
                if i % 4 == 0 {
                    ids.push(r.create("b", json!({"i": i})).unwrap());
                } else {
                    r.update(&ids[i % ids.len()], json!({"i": i})).unwrap();
                }
            }
        });
        writer.join().unwrap();
        reader.join().unwrap()
    });
    let expected = r.changes_since(start, usize::MAX, None).unwrap();
    assert_eq!(expected.len(), WRITES);
    assert_eq!(received, expected);
}

#[test]
fn concurrent_writers_are_delivered_in_feed_order() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let (log, _guard) = recorder(&r, Scope::All);
    std::thread::scope(|s| {
        for t in 0..4 {
            let r = r.clone();
            s.spawn(move || {
                let id = r.create(&format!("t{t}"), json!({"n": 0})).unwrap();
                for n in 1..50 {
                    r.update(&id, json!({"n": n})).unwrap();
                }
            });
        }
    });
    let expected = feed(&r);
    assert_eq!(expected.len(), 200);
    assert_eq!(*log.lock().unwrap(), expected);
}

// ----- query: SQL compiler vs in-memory evaluator ----------------------------------------------

mod query_property {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use weft::query::FieldSeg;
    use weft::{CmpOp, FieldPath};

    // Keys that need quoting in a SQLite JSON path, non-ASCII, look like paths, or are empty.
    // (Keys containing '"' are excluded: SQLite JSON paths cannot express them; see json_path.)
    const KEYS: &[&str] = &[
        "a", "b", "n", "o", "x y", "k.z", "a[0]", "日本", "$", "-", "", "0",
    ];

    fn number(rng: &mut StdRng) -> Value {
        match rng.random_range(0..16) {
            0..=4 => json!(rng.random_range(-3i64..=3)),
            5..=8 => {
                let halves = [-1.5, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, -3.0];
                json!(halves[rng.random_range(0..halves.len())])
            }
            9 => json!(i64::MAX),
            10 => json!(i64::MIN),
            11 => json!(u64::MAX),
            12 => json!(1e300),
            13 => json!(-2.5e-7),
            14 => json!(rng.random_range(-1000i64..1000)),
            _ => json!(rng.random_range(-1000i64..1000) as f64 / 8.0),
        }
    }

    fn string(rng: &mut StdRng) -> Value {
        const S: &[&str] = &[
            "", "a", "b", "A", "ab", "é", "e\u{301}", "日本", "🎉", "3", "true", "null", "Z",
            "a b", "[1]", "{}", "\\", "tab\t", "\u{1}",
        ];
        json!(S[rng.random_range(0..S.len())])
    }

    fn scalar(rng: &mut StdRng) -> Value {
        match rng.random_range(0..10) {
            0..=3 => number(rng),
            4..=6 => string(rng),
            7 | 8 => json!(rng.random_range(0..2) == 0),
            _ => Value::Null,
        }
    }

    fn value(rng: &mut StdRng, depth: u32) -> Value {
        match rng.random_range(0..10) {
            0 | 1 if depth > 0 => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| value(rng, depth - 1))
                    .collect(),
            ),
            2 | 3 if depth > 0 => object(rng, depth - 1),
            _ => scalar(rng),
        }
    }

    fn object(rng: &mut StdRng, depth: u32) -> Value {
        let mut map = serde_json::Map::new();
        for _ in 0..rng.random_range(0..5) {
            let key = KEYS[rng.random_range(0..KEYS.len())];
            map.insert(key.to_owned(), value(rng, depth));
        }
        Value::Object(map)
    }

    fn path(rng: &mut StdRng) -> FieldPath {
        FieldPath(
            (0..rng.random_range(1..4))
                .map(|_| {
                    if rng.random_range(0..4) == 0 {
                        FieldSeg::Index(rng.random_range(0..3))
                    } else {
                        FieldSeg::Key(KEYS[rng.random_range(0..KEYS.len())].to_owned())
                    }
                })
                .collect(),
        )
    }

    /// A path and the value at it in one of the bodies (so that comparisons often hit).
    fn existing(rng: &mut StdRng, bodies: &[Value]) -> Option<(FieldPath, Value)> {
        let mut at = &bodies[rng.random_range(0..bodies.len())];
        let mut segs = Vec::new();
        loop {
            let next = match at {
                Value::Object(map) if !map.is_empty() => {
                    let (k, v) = map.iter().nth(rng.random_range(0..map.len())).unwrap();
                    segs.push(FieldSeg::Key(k.clone()));
                    v
                }
                Value::Array(items) if !items.is_empty() => {
                    let i = rng.random_range(0..items.len());
                    segs.push(FieldSeg::Index(i));
                    &items[i]
                }
                _ => break,
            };
            at = next;
            if rng.random_range(0..3) == 0 {
                break;
            }
        }
        (!segs.is_empty()).then(|| (FieldPath(segs), at.clone()))
    }

    fn filter(rng: &mut StdRng, bodies: &[Value], depth: u32) -> Filter {
        let choice = rng.random_range(0..if depth == 0 { 6 } else { 9 });
        match choice {
            0 => Filter::Exists(existing(rng, bodies).map_or_else(|| path(rng), |(p, _)| p)),
            1 => Filter::Exists(path(rng)),
            2..=5 => {
                let ops = [
                    CmpOp::Eq,
                    CmpOp::Ne,
                    CmpOp::Lt,
                    CmpOp::Le,
                    CmpOp::Gt,
                    CmpOp::Ge,
                ];
                let op = ops[rng.random_range(0..ops.len())];
                let (p, mut v) = match existing(rng, bodies) {
                    Some(found) if choice < 4 => found,
                    _ => (path(rng), value(rng, 1)),
                };
                let ordering = !matches!(op, CmpOp::Eq | CmpOp::Ne);
                if ordering && !(v.is_number() || v.is_string()) {
                    v = if rng.random_range(0..2) == 0 {
                        number(rng)
                    } else {
                        string(rng)
                    };
                }
                // Sometimes compare with a neighbouring number.
                if v.is_number() && rng.random_range(0..3) == 0 {
                    v = number(rng);
                }
                Filter::Cmp(p, op, v)
            }
            6 => Filter::And(
                (0..rng.random_range(0..4))
                    .map(|_| filter(rng, bodies, depth - 1))
                    .collect(),
            ),
            7 => Filter::Or(
                (0..rng.random_range(0..4))
                    .map(|_| filter(rng, bodies, depth - 1))
                    .collect(),
            ),
            _ => Filter::Not(Box::new(filter(rng, bodies, depth - 1))),
        }
    }

    #[test]
    fn sql_query_agrees_with_filter_matches() {
        common::for_each_seed("sql_query_agrees_with_filter_matches", 8, |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let db = TempDb::new();
            let r = db.open("q.db");
            let mut bodies: Vec<Value> = (0..60).map(|_| object(&mut rng, 3)).collect();
            // A few bodies with the edge numbers side by side.
            bodies.push(json!({"n": 9007199254740993i64, "a": 9007199254740992.0}));
            bodies.push(json!({"n": i64::MAX, "a": 9223372036854775808u64}));
            bodies.push(json!({"n": 1, "a": 1.0, "b": [1], "o": {"a": 1.0}}));
            bodies.push(json!({"n": u64::MAX, "a": 1.8446744073709552e19, "b": [-0.0]}));
            bodies.push(json!({"n": -0.0, "a": 0, "b": [0.0, 1e300, 2.5e-7], "o": {"a": [1.0]}}));
            let ids = r.create_many("q", bodies.clone()).unwrap();
            // Stored bodies are what queries run over; they must equal what we wrote.
            for (id, body) in ids.iter().zip(&bodies) {
                assert_eq!(&r.get(id).unwrap().body, body);
            }
            let mut matched = 0;
            for _ in 0..300 {
                let f = filter(&mut rng, &bodies, 3);
                let want: Vec<DocumentId> = ids
                    .iter()
                    .zip(&bodies)
                    .filter(|(_, b)| f.matches(b))
                    .map(|(id, _)| *id)
                    .collect();
                let got: Vec<DocumentId> = r
                    .query(&Query::collection("q").filter(f.clone()))
                    .unwrap_or_else(|e| panic!("query {f:?}: {e}"))
                    .into_iter()
                    .map(|d| d.id)
                    .collect();
                if got != want {
                    let diff: Vec<String> = ids
                        .iter()
                        .zip(&bodies)
                        .filter(|(id, _)| got.contains(id) != want.contains(id))
                        .map(|(id, b)| {
                            format!("  sql={} mem={} {b}", got.contains(id), want.contains(id))
                        })
                        .collect();
                    panic!(
                        "SQL and Filter::matches disagree on {f:?}:\n{}",
                        diff.join("\n")
                    );
                }
                matched += want.len();
            }
            // The generator is useful only if filters match something.
            assert!(matched > 0);
        });
    }
}

#[test]
fn a_panicking_hook_costs_no_one_else_an_event() {
    let db = TempDb::new();
    let r = db.open("a.db");
    let mut sub = r.subscribe(Scope::All, 0);
    let (before, _g1) = recorder(&r, Scope::All);
    r.create("a", json!({})).unwrap();
    assert_eq!(sub.try_next().unwrap().unwrap().seq, 1); // the subscription is live now
    let _bad = r.on_change(Scope::All, |e| {
        if e.seq == 2 {
            panic!("hook bug (expected in this test)");
        }
    });
    let (after, _g2) = recorder(&r, Scope::All);
    // The panic is on the first event of a batch; the write itself committed and succeeds.
    let ids = r.create_many("a", (0..4).map(|i| json!({"i": i}))).unwrap();
    assert_eq!(ids.len(), 4);
    r.create("a", json!({})).unwrap();
    let expected = feed(&r);
    assert_eq!(expected.len(), 6);
    assert_eq!(*before.lock().unwrap(), expected);
    assert_eq!(*after.lock().unwrap(), expected[1..]);
    let rest = drain(&mut sub);
    assert_eq!(rest, expected[1..], "no gap in the subscription");
}

#[test]
fn idle_documents_are_unloaded_so_memory_follows_the_active_set() {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(std::sync::atomic::AtomicI64::new(1_700_000_000_000));
    let clock = now.clone();
    let options = weft::ReplicaOptions {
        idle_unload: std::time::Duration::from_secs(10),
        clock: weft::Clock::from_fn(move || clock.load(std::sync::atomic::Ordering::SeqCst)),
        ..Default::default()
    };
    let r = Replica::open_with(dir.path().join("r.db"), options).unwrap();
    let ids: Vec<_> = (0..20)
        .map(|i| r.create("todos", json!({ "i": i })).unwrap())
        .collect();
    assert_eq!(r.loaded_documents(), 20);
    let advance = |ms| now.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    advance(6_000);
    r.update(&ids[0], json!({"touched": true})).unwrap();
    advance(6_000);
    r.tick().unwrap();
    // Only the document used within the last 10 s stays.
    assert_eq!(r.loaded_documents(), 1);
    advance(11_000);
    r.tick().unwrap();
    assert_eq!(r.loaded_documents(), 0);
    // Unloading loses nothing: every document loads again on use.
    assert_eq!(
        r.get(&ids[0]).unwrap().body,
        json!({"i": 0, "touched": true})
    );
    assert_eq!(r.get(&ids[19]).unwrap().body, json!({"i": 19}));
}

#[test]
fn a_schema_1_file_from_the_previous_release_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let id = {
        let r = Replica::open(&path).unwrap();
        r.create("todos", json!({"title": "kept"})).unwrap()
    };
    // Make it look like a file written before migration 2 (sync states) existed.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE sync_states; PRAGMA user_version = 1;")
            .unwrap();
    }
    let r = Replica::open(&path).unwrap();
    assert_eq!(r.get(&id).unwrap().body, json!({"title": "kept"}));
    r.integrity_check().unwrap();
    drop(r);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, weft::store::sqlite::SCHEMA_VERSION);
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sync_states'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1);
}
