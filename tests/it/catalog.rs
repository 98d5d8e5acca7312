//! Catalog reconciliation digests: equal exactly when two replicas hold the same versions, and a
//! difference shows up in the bucket of the document that differs.

use serde_json::json;
use weft::protocol::bucket_of;
use weft::{BundleScope, Replica, Scope};

fn pair() -> (tempfile::TempDir, Replica, Replica) {
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();
    (dir, a, b)
}

fn sync_a_to_b(a: &Replica, b: &Replica) {
    b.import_bundle(&a.export_bundle(&BundleScope::All).unwrap())
        .unwrap();
}

#[test]
fn summaries_match_after_sync_and_localize_a_change() {
    let (_dir, a, b) = pair();
    let ids: Vec<_> = (0..60)
        .map(|i| {
            a.create(if i % 2 == 0 { "even" } else { "odd" }, json!({ "i": i }))
                .unwrap()
        })
        .collect();
    assert_ne!(
        a.catalog_summary(&Scope::All).unwrap(),
        b.catalog_summary(&Scope::All).unwrap()
    );
    sync_a_to_b(&a, &b);
    let sa = a.catalog_summary(&Scope::All).unwrap();
    assert_eq!(sa, b.catalog_summary(&Scope::All).unwrap());
    assert_eq!(sa.count, 60);

    // One edit: exactly its bucket differs, and that bucket's entries name it.
    a.update(&ids[7], json!({"edited": true})).unwrap();
    let sa = a.catalog_summary(&Scope::All).unwrap();
    let sb = b.catalog_summary(&Scope::All).unwrap();
    let differing = sa.differing(&sb.buckets);
    assert_eq!(differing, vec![bucket_of(&ids[7])]);
    let ea = a.catalog_entries(&Scope::All, &differing).unwrap();
    let eb = b.catalog_entries(&Scope::All, &differing).unwrap();
    let changed: Vec<_> = ea
        .iter()
        .filter(|e| !eb.contains(e))
        .map(|e| e.id)
        .collect();
    assert_eq!(changed, vec![ids[7]]);

    // A delete changes the digest too, and converges by bundle.
    a.delete(&ids[8]).unwrap();
    sync_a_to_b(&a, &b);
    assert_eq!(
        a.catalog_summary(&Scope::All).unwrap(),
        b.catalog_summary(&Scope::All).unwrap()
    );
    let entry = b
        .catalog_entries(&Scope::All, &[bucket_of(&ids[8])])
        .unwrap()
        .into_iter()
        .find(|e| e.id == ids[8])
        .unwrap();
    assert!(entry.deleted);
}

#[test]
fn scope_limits_the_summary() {
    let (_dir, a, b) = pair();
    for i in 0..10 {
        a.create("even", json!({ "i": i })).unwrap();
        a.create("odd", json!({ "i": i })).unwrap();
    }
    b.import_bundle(
        &a.export_bundle(&BundleScope::Collection("even".into()))
            .unwrap(),
    )
    .unwrap();
    let even = Scope::collection("even");
    assert_eq!(
        a.catalog_summary(&even).unwrap(),
        b.catalog_summary(&even).unwrap()
    );
    assert_eq!(a.catalog_summary(&even).unwrap().count, 10);
    assert_ne!(
        a.catalog_summary(&Scope::All).unwrap(),
        b.catalog_summary(&Scope::All).unwrap()
    );
    assert!(
        b.catalog_entries(&Scope::collection("odd"), &(0..=255).collect::<Vec<u8>>())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn cached_summaries_follow_every_write_in_scope_and_other_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Replica::open(&path).unwrap();
    let other = Replica::open(&path).unwrap();
    let todo = a.create("todos", json!({"n": 0})).unwrap();
    let note = a.create("notes", json!({"n": 0})).unwrap();
    let todos = Scope::Collections(vec!["todos".into()]);
    let notes = Scope::Collections(vec!["notes".into()]);
    let (all0, todos0, notes0) = (
        a.catalog_summary(&Scope::All).unwrap(),
        a.catalog_summary(&todos).unwrap(),
        a.catalog_summary(&notes).unwrap(),
    );
    // Asked again with nothing written: the same answer.
    assert_eq!(a.catalog_summary(&Scope::All).unwrap(), all0);
    // A write in `todos` changes All and todos, not notes.
    a.update(&todo, json!({"n": 1})).unwrap();
    assert_ne!(a.catalog_summary(&Scope::All).unwrap(), all0);
    assert_ne!(a.catalog_summary(&todos).unwrap(), todos0);
    assert_eq!(a.catalog_summary(&notes).unwrap(), notes0);
    // Another connection to the same file writes a note: seen at once.
    other.update(&note, json!({"n": 1})).unwrap();
    assert_ne!(a.catalog_summary(&notes).unwrap(), notes0);
    assert_eq!(
        a.catalog_summary(&Scope::All).unwrap(),
        other.catalog_summary(&Scope::All).unwrap()
    );
    // Kept current write by write (never rescanned): always equal to a fresh scan, which the
    // other connection does after each of our commits.
    let mut ids = vec![todo, note];
    for i in 0..60u64 {
        let id = ids[(i * 7 % ids.len() as u64) as usize];
        match i % 4 {
            0 => ids.push(
                a.create(
                    if i % 8 == 0 { "todos" } else { "notes" },
                    json!({ "i": i }),
                )
                .unwrap(),
            ),
            1 | 2 => {
                let _ = a.update(&id, json!({ "i": i }));
            }
            _ => {
                let _ = a.delete(&id);
            }
        }
        for scope in [&Scope::All, &todos, &notes] {
            assert_eq!(
                a.catalog_summary(scope).unwrap(),
                other.catalog_summary(scope).unwrap(),
                "after step {i}"
            );
        }
    }
    // Deletes count too.
    let todo = a.create("todos", json!({"n": 2})).unwrap();
    let before = a.catalog_summary(&todos).unwrap();
    a.delete(&todo).unwrap();
    assert_ne!(a.catalog_summary(&todos).unwrap(), before);
    assert_eq!(
        a.catalog_summary(&todos).unwrap(),
        other.catalog_summary(&todos).unwrap()
    );
}
