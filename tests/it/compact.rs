//! `Replica::compact` / `weft compact`: smaller file, same content, same history, and a change
//! feed that still tells a resuming consumer about every document changed since its position.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::json;
use weft::{ChangeKind, Replica};

fn file_size(path: &std::path::Path) -> u64 {
    let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
    [path.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn compact_keeps_content_history_and_resumability() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let r = Replica::open(&path).unwrap();
    let hot = r.create("notes", json!({"n": 0})).unwrap();
    let cold = r.create("notes", json!({"title": "cold"})).unwrap();
    let gone = r.create("todos", json!({"x": 1})).unwrap();
    let mut old_heads = Vec::new();
    for i in 1..=2000 {
        let heads = r.update(&hot, json!({"n": i})).unwrap();
        if i == 1000 {
            old_heads = heads;
        }
    }
    let mid_seq = r.last_seq();
    r.update(&cold, json!({"title": "warm"})).unwrap();
    r.delete(&gone).unwrap();
    let before_bodies: Vec<_> = [hot, cold].iter().map(|id| r.get(id).unwrap()).collect();
    let last_seq = r.last_seq();
    r.checkpoint().unwrap();
    let size_before = file_size(&path);

    let report = r.compact().unwrap();
    assert_eq!(report.documents, 2, "hot and cold had incremental chunks");
    assert_eq!(
        report.feed_entries_removed as u64,
        last_seq - 3,
        "one entry left per document"
    );

    // Same content and heads; history is still there.
    for doc in &before_bodies {
        assert_eq!(&r.get(&doc.id).unwrap(), doc);
    }
    assert_eq!(r.get_at(&hot, &old_heads).unwrap().body, json!({"n": 1000}));
    assert!(matches!(r.get(&gone), Err(weft::Error::Deleted(_))));

    // The feed keeps the newest entry per document, in order; seq numbering continues.
    let feed = r.changes_since(0, 100, None).unwrap();
    let ids: Vec<_> = feed.iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![hot, cold, gone]);
    assert_eq!(feed.last().unwrap().kind, ChangeKind::Deleted);
    assert_eq!(feed.last().unwrap().seq, last_seq);
    // A consumer that stopped at mid_seq still learns of every document changed since.
    let since: BTreeSet<_> = r
        .changes_since(mid_seq, 100, None)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(since, BTreeSet::from([cold, gone]));
    assert_eq!(
        r.update(&hot, json!({"n": -1})).unwrap(),
        r.get(&hot).unwrap().heads
    );
    assert_eq!(r.last_seq(), last_seq + 1);

    let size_after = file_size(&path);
    // About 14 of the pages left are the schema's fixed cost (a page or two per table and
    // index), so the ratio is bounded by that, not by the data.
    assert!(
        size_after * 3 < size_before,
        "compaction should shrink the file a lot: {size_before} -> {size_after}"
    );
    r.integrity_check().unwrap();
    drop(r);

    // Still loads and edits after reopening.
    let r = Replica::open(&path).unwrap();
    r.update(&hot, json!({"n": 7})).unwrap();
    assert_eq!(r.get(&hot).unwrap().body, json!({"n": 7}));
    assert_eq!(r.get_at(&hot, &old_heads).unwrap().body, json!({"n": 1000}));
}

#[test]
fn cli_compact_reports_and_keeps_documents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let r = Replica::open(&path).unwrap();
    let id = r.create("notes", json!({"n": 0})).unwrap();
    // 299 real changes: the first patch sets n to the value it already has (no change).
    for i in 0..300 {
        r.update(&id, json!({"n": i})).unwrap();
    }
    drop(r);
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("--db")
        .arg(&path)
        .arg("compact")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("compacted 1 documents, removed 299 superseded"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("--db")
        .arg(&path)
        .args(["doc", "get", &id.to_string()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"n":299}"#);
}
