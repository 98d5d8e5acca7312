//! The `weft` command line, run as a real process against real SQLite files.
//!
//! The contract under test is the doc comments of `src/bin/weft/main.rs`: results on stdout (ids,
//! JSON bodies, NDJSON), messages on stderr, exit status 0 ok / 1 runtime error / 2 usage error.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use serde_json::{Value, json};
use support::{LineEvent, Output, weft, weft_command, weft_stdin};
use weft::DocumentId;

fn db_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// `doc create --json BODY` in `collection`; returns the id after checking stdout is only it.
fn create(db: &Path, collection: &str, body: &Value) -> String {
    let out = weft(
        db,
        &[
            "doc",
            "create",
            "-c",
            collection,
            "--json",
            &body.to_string(),
        ],
    )
    .ok();
    id_from(&out)
}

/// Checks that stdout is exactly one document id and a newline, and returns it.
#[track_caller]
fn id_from(out: &Output) -> String {
    let id = out
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout must end with a newline: {out:#?}"));
    assert!(
        !id.contains('\n') && !id.contains(' ') && !id.is_empty(),
        "stdout must be only the id: {out:#?}"
    );
    id.parse::<DocumentId>()
        .unwrap_or_else(|e| panic!("stdout {id:?} is not a document id: {e}"));
    id.to_owned()
}

/// `doc get ID` stdout, checked to be exactly one line.
#[track_caller]
fn get_raw(db: &Path, id: &str) -> String {
    let out = weft(db, &["doc", "get", id]).ok();
    let body = out
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout must end with a newline: {out:#?}"));
    assert!(!body.contains('\n'), "body must be one line: {out:#?}");
    body.to_owned()
}

#[track_caller]
fn get(db: &Path, id: &str) -> Value {
    serde_json::from_str(&get_raw(db, id)).expect("doc get prints JSON")
}

/// Parses NDJSON stdout into values.
#[track_caller]
fn ndjson(out: &Output) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect()
}

/// `doc list --json` lines, checked to have exactly the keys id, collection, body.
#[track_caller]
fn list(db: &Path, extra: &[&str]) -> Vec<(String, String, Value)> {
    let mut args = vec!["doc", "list", "--json"];
    args.extend_from_slice(extra);
    let out = weft(db, &args).ok();
    ndjson(&out)
        .into_iter()
        .map(|line| {
            let obj = line.as_object().expect("list line is an object");
            let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                BTreeSet::from(["id", "collection", "body"]),
                "list line {line}"
            );
            let id = obj["id"].as_str().expect("id is a string").to_owned();
            id.parse::<DocumentId>().expect("list id parses");
            let collection = obj["collection"].as_str().expect("collection").to_owned();
            (id, collection, obj["body"].clone())
        })
        .collect()
}

/// `changes ARGS` lines, checked for the fields every entry has and strictly increasing seq.
#[track_caller]
fn changes(db: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["changes"];
    args.extend_from_slice(extra);
    let out = weft(db, &args).ok();
    let lines = ndjson(&out);
    let mut last = None;
    for line in &lines {
        check_change_line(line);
        let seq = line["seq"].as_u64().unwrap();
        if let Some(prev) = last {
            assert!(seq > prev, "seq must strictly increase: {prev} then {seq}");
        }
        last = Some(seq);
    }
    lines
}

#[track_caller]
fn check_change_line(line: &Value) {
    assert!(line["seq"].as_u64().is_some_and(|s| s > 0), "seq: {line}");
    let id = line["id"].as_str().unwrap_or_else(|| panic!("id: {line}"));
    id.parse::<DocumentId>().expect("change id parses");
    assert!(line["collection"].is_string(), "collection: {line}");
    assert!(
        matches!(
            line["kind"].as_str(),
            Some("created" | "updated" | "deleted")
        ),
        "kind: {line}"
    );
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

fn missing_id() -> String {
    DocumentId::from_bytes([0x5a; 16]).to_string()
}

// ---------------------------------------------------------------------------------------------
// doc create / get

#[test]
fn create_prints_only_the_id_and_get_prints_only_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let body = json!({"title": "buy milk", "done": false, "n": 2});

    // Body on stdin (no --json).
    let from_stdin = weft_stdin(
        &db,
        &["doc", "create", "-c", "todos"],
        body.to_string().as_bytes(),
    )
    .ok();
    let id1 = id_from(&from_stdin);
    // Body on stdin with `--json -`, and with surrounding whitespace / newlines.
    let dash = weft_stdin(
        &db,
        &["doc", "create", "--collection", "todos", "--json", "-"],
        format!("\n  {body}\n\n").as_bytes(),
    )
    .ok();
    let id2 = id_from(&dash);
    // Body as an argument.
    let id3 = create(&db, "notes", &json!({"text": "hi"}));
    assert!(id1 != id2 && id2 != id3 && id1 != id3, "ids must be fresh");

    // `doc get` prints exactly the body and a newline: serde_json's compact form.
    assert_eq!(get_raw(&db, &id1), body.to_string());
    assert_eq!(get(&db, &id2), body);
    assert_eq!(get(&db, &id3), json!({"text": "hi"}));
    // Ids are accepted with surrounding whitespace (copy-paste).
    assert_eq!(get(&db, &format!(" {id3}\n")), json!({"text": "hi"}));

    // --meta: a wrapper with exactly id, collection, heads, body.
    let meta = weft(&db, &["doc", "get", "--meta", &id1]).ok();
    assert_eq!(meta.lines().len(), 1, "{meta:#?}");
    let meta: Value = serde_json::from_str(&meta.stdout).unwrap();
    let keys: BTreeSet<&str> = meta
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["id", "collection", "heads", "body"]));
    assert_eq!(meta["id"], json!(id1));
    assert_eq!(meta["collection"], json!("todos"));
    assert_eq!(meta["body"], body);
    let heads = meta["heads"].as_array().expect("heads is an array");
    assert!(!heads.is_empty(), "a document always has heads");
    for h in heads {
        let h = h.as_str().expect("a head is a string");
        assert!(
            h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
            "head {h:?} is 64 hex characters"
        );
    }

    // Those heads read the document as it was, after it changed.
    let old_heads: Vec<String> = heads
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    weft(&db, &["doc", "update", &id1, "--merge", r#"{"done":true}"#]).ok();
    let at = weft(&db, &["doc", "get", &id1, "--at", &old_heads.join(",")]).ok();
    assert_eq!(at.stdout, format!("{body}\n"));
    let meta2: Value =
        serde_json::from_str(&weft(&db, &["doc", "get", "--meta", &id1]).ok().stdout).unwrap();
    assert_ne!(meta2["heads"], meta["heads"], "an update moves the heads");
    assert_eq!(meta2["body"]["done"], json!(true));
    // Unknown heads are a runtime error.
    let bogus = "00".repeat(32);
    let err = weft(&db, &["doc", "get", &id1, "--at", &bogus]).runtime_error();
    assert!(err.stderr.contains(&bogus), "{err:#?}");
    weft(&db, &["doc", "get", &id1, "--at", "xyz"]).runtime_error();
}

#[test]
fn values_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");

    // Floats stay floats and ints stay ints, byte for byte.
    let out = weft_stdin(&db, &["doc", "create"], br#"{"f":1.0,"i":1}"#).ok();
    let id = id_from(&out);
    assert_eq!(get_raw(&db, &id), r#"{"f":1.0,"i":1}"#);

    // Empty objects, alone and nested.
    let id = id_from(&weft_stdin(&db, &["doc", "create"], b"{}").ok());
    assert_eq!(get_raw(&db, &id), "{}");
    let id = id_from(
        &weft_stdin(
            &db,
            &["doc", "create"],
            br#"{"a":{},"b":[],"c":[{}],"d":{"e":{}}}"#,
        )
        .ok(),
    );
    assert_eq!(
        get_raw(&db, &id),
        r#"{"a":{},"b":[],"c":[{}],"d":{"e":{}}}"#
    );

    // Every JSON kind, deep nesting, number edge cases, unicode in keys and values, escapes.
    let text = r#"{
        "nested": {"a": {"b": {"c": [1, [2, [3, {"d": null}]], {"e": true}]}}},
        "ints": [0, -1, 9007199254740993, -9223372036854775808, 18446744073709551615],
        "floats": [0.5, -0.0, 1e3, 2.5e-8, 1.7976931348623157e308, 0.1, 100.0],
        "mixed": [1, 1.0, "1", true, null, {}, []],
        "unicode": "héllo wörld — 中文 日本語 한국어 עברית العربية 🌍🏳️‍🌈 e\u0301",
        "ключ 🔑": "value with \"quotes\", back\\slash, tab\t, newline\n, nul \u0000, bell \u0007",
        "": "empty key",
        "a/b~c": "pointer-special key"
    }"#;
    let expected: Value = serde_json::from_str(text).unwrap();
    let id = id_from(&weft_stdin(&db, &["doc", "create", "-c", "kinds"], text.as_bytes()).ok());
    // The printed body is the canonical compact form of the input: same number kinds, same text.
    assert_eq!(get_raw(&db, &id), expected.to_string());
    assert_eq!(get(&db, &id), expected);
    // The same through `doc list --json` and `--meta`.
    let listed = list(&db, &["-c", "kinds"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].2, expected);
    let meta: Value =
        serde_json::from_str(&weft(&db, &["doc", "get", "--meta", &id]).ok().stdout).unwrap();
    assert_eq!(meta["body"], expected);
    // And the float/int distinction survives an update through a merge patch.
    weft(
        &db,
        &["doc", "update", &id, "--merge", r#"{"k":2.0,"j":2}"#],
    )
    .ok();
    let raw = get_raw(&db, &id);
    assert!(
        raw.contains(r#""k":2.0"#) && raw.contains(r#""j":2"#),
        "{raw}"
    );
    weft(&db, &["doc", "update", &id, "--merge", r#"{"j":2.0}"#]).ok();
    let mut want = expected.clone();
    want["k"] = json!(2.0);
    want["j"] = json!(2.0);
    // The whole body, rebuilt from stored Automerge data, is still exactly the input.
    assert_eq!(
        get_raw(&db, &id),
        want.to_string(),
        "int -> float is a change"
    );
}

#[test]
fn a_one_megabyte_body_round_trips_via_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "big.db");
    let mut body = serde_json::Map::new();
    body.insert("text".into(), json!("αβγ weft ".repeat(60_000)));
    body.insert("numbers".into(), json!((0..40_000).collect::<Vec<i64>>()));
    body.insert(
        "records".into(),
        Value::Array(
            (0..2_000)
                .map(|i| json!({"i": i, "f": i as f64 + 0.25, "s": format!("record {i}")}))
                .collect(),
        ),
    );
    let body = Value::Object(body);
    let text = body.to_string();
    assert!(text.len() > 1_000_000, "body is {} bytes", text.len());

    let id = id_from(&weft_stdin(&db, &["doc", "create", "-c", "big"], text.as_bytes()).ok());
    assert_eq!(
        get_raw(&db, &id),
        text,
        "1 MB body must come back byte-identical"
    );
    let listed = list(&db, &["-c", "big"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].2, body);
}

// ---------------------------------------------------------------------------------------------
// doc update / delete

#[test]
fn update_merge_set_unset_text_and_splice() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let id = create(
        &db,
        "default",
        &json!({"title": "draft", "tags": ["a"], "owner": {"name": "ann", "age": 30}, "gone": 1}),
    );

    // RFC 7386 merge: replace, add, delete with null, merge nested objects.
    weft(
        &db,
        &[
            "doc",
            "update",
            &id,
            "--merge",
            r#"{"title":"final","gone":null,"owner":{"age":31,"city":"Oslo"},"new":{"x":1}}"#,
        ],
    )
    .ok();
    assert_eq!(
        get(&db, &id),
        json!({"title": "final", "tags": ["a"], "owner": {"name": "ann", "age": 31, "city": "Oslo"}, "new": {"x": 1}})
    );

    // --set at a pointer: nested key, array element, array append with `-`, key with `/`.
    weft(
        &db,
        &["doc", "update", &id, "--set", "/owner/name", r#""bob""#],
    )
    .ok();
    weft(&db, &["doc", "update", &id, "--set", "/tags/0", r#""A""#]).ok();
    weft(
        &db,
        &[
            "doc",
            "update",
            &id,
            "--set",
            "/tags/-",
            r#"{"deep":[1.5]}"#,
        ],
    )
    .ok();
    weft(&db, &["doc", "update", &id, "--set", "/a~1b", "null"]).ok();
    assert_eq!(
        get(&db, &id),
        json!({"title": "final", "tags": ["A", {"deep": [1.5]}], "owner": {"name": "bob", "age": 31, "city": "Oslo"}, "new": {"x": 1}, "a/b": null})
    );

    // --unset removes a key and an array element.
    weft(&db, &["doc", "update", &id, "--unset", "/owner/city"]).ok();
    weft(&db, &["doc", "update", &id, "--unset", "/tags/0"]).ok();
    weft(&db, &["doc", "update", &id, "--unset", "/a~1b"]).ok();
    assert_eq!(
        get(&db, &id),
        json!({"title": "final", "tags": [{"deep": [1.5]}], "owner": {"name": "bob", "age": 31}, "new": {"x": 1}})
    );

    // --set-text then --splice with code-point indexes (multi-byte characters before the splice).
    weft(
        &db,
        &["doc", "update", &id, "--set-text", "/notes", "héllo 🌍!"],
    )
    .ok();
    assert_eq!(get(&db, &id)["notes"], json!("héllo 🌍!"));
    weft(
        &db,
        &[
            "doc", "update", &id, "--splice", "/notes", "6", "1", "wörld",
        ],
    )
    .ok();
    assert_eq!(get(&db, &id)["notes"], json!("héllo wörld!"));
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/notes", "0", "0", ">> "],
    )
    .ok();
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/notes", "14", "1", ""],
    )
    .ok();
    assert_eq!(get(&db, &id)["notes"], json!(">> héllo wörld"));
    // A merge patch onto collaborative text keeps it text (splice still works afterwards).
    weft(
        &db,
        &[
            "doc",
            "update",
            &id,
            "--merge",
            r#"{"notes":">> hello world"}"#,
        ],
    )
    .ok();
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/notes", "0", "3", ""],
    )
    .ok();
    assert_eq!(get(&db, &id)["notes"], json!("hello world"));

    // A patch that changes nothing makes no change-feed entry; a real change makes exactly one.
    let before = changes(&db, &[]).len();
    weft(
        &db,
        &[
            "doc",
            "update",
            &id,
            "--merge",
            r#"{"title":"final","owner":{"age":31}}"#,
        ],
    )
    .ok();
    assert_eq!(
        changes(&db, &[]).len(),
        before,
        "a no-op patch is not a change"
    );
    weft(
        &db,
        &["doc", "update", &id, "--merge", r#"{"title":"again"}"#],
    )
    .ok();
    let after = changes(&db, &[]);
    assert_eq!(after.len(), before + 1);
    assert_eq!(after.last().unwrap()["kind"], json!("updated"));
    assert_eq!(after.last().unwrap()["id"], json!(id));

    // Failing updates are runtime errors that change nothing.
    let snapshot = get_raw(&db, &id);
    let e = weft(
        &db,
        &["doc", "update", &id, "--splice", "/title", "0", "0", "x"],
    )
    .runtime_error();
    assert!(e.stderr.contains("text"), "{e:#?}");
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/notes", "99", "0", "x"],
    )
    .runtime_error();
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/notes", "x", "0", "x"],
    )
    .runtime_error();
    weft(&db, &["doc", "update", &id, "--unset", "/no/such"]).runtime_error();
    weft(&db, &["doc", "update", &id, "--unset", "/nope"]).runtime_error();
    weft(
        &db,
        &["doc", "update", &id, "--set", "/missing/parent", "1"],
    )
    .runtime_error();
    weft(&db, &["doc", "update", &id, "--set", "/tags/7", "1"]).runtime_error();
    weft(&db, &["doc", "update", &id, "--set", "no-slash", "1"]).runtime_error();
    let e = weft(&db, &["doc", "update", &id, "--set", "/x", "not json"]).runtime_error();
    assert!(e.stderr.contains("not json"), "names the bad value: {e:#?}");
    weft(&db, &["doc", "update", &id, "--merge", "[1]"]).runtime_error();
    weft(&db, &["doc", "update", &id, "--merge", "{"]).runtime_error();
    assert_eq!(
        get_raw(&db, &id),
        snapshot,
        "failed updates changed the document"
    );
    assert_eq!(
        changes(&db, &[]).len(),
        before + 1,
        "failed updates wrote feed entries"
    );
}

#[test]
fn delete_is_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let keep = create(&db, "c", &json!({"keep": true}));
    let id = create(&db, "c", &json!({"doomed": true}));

    let out = weft(&db, &["doc", "delete", &id]).ok();
    assert_eq!(out.stdout, "", "delete prints nothing on stdout");

    let e = weft(&db, &["doc", "get", &id]).runtime_error();
    assert!(
        e.stderr.contains("deleted") && e.stderr.contains(&id),
        "{e:#?}"
    );
    weft(&db, &["doc", "get", "--meta", &id]).runtime_error();
    weft(&db, &["doc", "update", &id, "--merge", r#"{"a":1}"#]).runtime_error();
    weft(&db, &["doc", "update", &id, "--set", "/a", "1"]).runtime_error();

    // Deleting again succeeds and changes nothing.
    let feed = changes(&db, &[]);
    weft(&db, &["doc", "delete", &id]).ok();
    assert_eq!(changes(&db, &[]), feed);
    assert_eq!(feed.last().unwrap()["kind"], json!("deleted"));
    assert_eq!(feed.last().unwrap()["id"], json!(id));

    // Only the live document is listed.
    let listed = list(&db, &[]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, keep);

    // Deleting a document that never existed is an error.
    let e = weft(&db, &["doc", "delete", &missing_id()]).runtime_error();
    assert!(e.stderr.contains("not found"), "{e:#?}");
}

// ---------------------------------------------------------------------------------------------
// doc list

#[test]
fn list_prints_ndjson_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let bodies = [
        json!({"n": 1, "owner": {"name": "ann"}}),
        json!({"n": 2, "owner": {"name": "bob"}}),
        json!({"n": 3, "owner": {"name": "ann"}, "tags": ["x"]}),
        json!({"n": "2"}),
        json!({"m": 5}),
        json!({"n": 2.5, "done": false}),
    ];
    let ids: Vec<String> = bodies.iter().map(|b| create(&db, "items", b)).collect();
    let other = create(&db, "other", &json!({"n": 10}));

    // Every live document, creation order, exact bodies and collections.
    let all = list(&db, &[]);
    let mut expected: Vec<(String, String, Value)> = ids
        .iter()
        .zip(&bodies)
        .map(|(id, b)| (id.clone(), "items".to_owned(), b.clone()))
        .collect();
    expected.push((other.clone(), "other".into(), json!({"n": 10})));
    assert_eq!(all, expected);

    let by_filter = |conds: &[&str]| -> Vec<String> {
        let mut args = vec!["-c", "items"];
        for c in conds {
            args.extend(["--where", c]);
        }
        list(&db, &args).into_iter().map(|(id, _, _)| id).collect()
    };
    // Numbers compare numerically; strings and missing fields never match a number comparison.
    assert_eq!(
        by_filter(&["n >= 2"]),
        vec![ids[1].clone(), ids[2].clone(), ids[5].clone()]
    );
    assert_eq!(
        by_filter(&["n >= 2", "n < 3"]),
        vec![ids[1].clone(), ids[5].clone()]
    );
    assert_eq!(by_filter(&["n = 2"]), vec![ids[1].clone()]);
    assert_eq!(by_filter(&[r#"n = "2""#]), vec![ids[3].clone()]);
    assert_eq!(
        by_filter(&[r#"owner.name = "ann""#]),
        vec![ids[0].clone(), ids[2].clone()]
    );
    assert_eq!(by_filter(&["tags[0] exists"]), vec![ids[2].clone()]);
    assert_eq!(by_filter(&["done = false"]), vec![ids[5].clone()]);
    assert_eq!(by_filter(&["n > 100"]), Vec::<String>::new());
    // Without a collection, the other collection's document matches too.
    let everywhere: Vec<String> = list(&db, &["--where", "n >= 2"])
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(
        everywhere,
        vec![
            ids[1].clone(),
            ids[2].clone(),
            ids[5].clone(),
            other.clone()
        ]
    );
    // --limit.
    let limited: Vec<String> = list(&db, &["--limit", "2"])
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(limited, ids[..2].to_vec());
    // An empty collection lists nothing.
    assert!(list(&db, &["-c", "nothing-here"]).is_empty());

    // The human table has one line per document, starting with its id.
    let table = weft(&db, &["doc", "list", "-c", "items"]).ok();
    let lines = table.lines();
    assert_eq!(lines.len(), ids.len(), "{table:#?}");
    for (line, id) in lines.iter().zip(&ids) {
        assert!(line.starts_with(id.as_str()), "{line:?} starts with {id}");
    }

    // A condition that does not parse is an error, not an empty result.
    weft(&db, &["doc", "list", "--where", "n >>> 2"]).runtime_error();
    weft(&db, &["doc", "list", "--where", "n >= true"]).runtime_error();
    weft(&db, &["doc", "list", "--where", "n = unquoted"]).runtime_error();
}

// ---------------------------------------------------------------------------------------------
// --db and WEFT_DB

#[test]
fn database_from_flag_env_or_default() {
    let dir = tempfile::tempdir().unwrap();
    let env_db = db_in(&dir, "env.db");
    let flag_db = db_in(&dir, "flag.db");

    // WEFT_DB alone.
    let mut cmd = weft_command();
    cmd.env("WEFT_DB", &env_db)
        .args(["doc", "create", "--json", r#"{"where":"env"}"#]);
    let env_id = id_from(&support::run(cmd, None).ok());
    assert!(env_db.exists(), "WEFT_DB names the file");
    assert_eq!(get(&env_db, &env_id), json!({"where": "env"}));

    // --db wins over WEFT_DB.
    let mut cmd = weft_command();
    cmd.env("WEFT_DB", &env_db)
        .args(["--db"])
        .arg(&flag_db)
        .args(["doc", "create", "--json", r#"{"where":"flag"}"#]);
    let flag_id = id_from(&support::run(cmd, None).ok());
    assert_eq!(get(&flag_db, &flag_id), json!({"where": "flag"}));
    weft(&env_db, &["doc", "get", &flag_id]).runtime_error();
    assert_eq!(list(&env_db, &[]).len(), 1);

    // --db works after the subcommand too (it is global).
    let out = support::run(
        {
            let mut cmd = weft_command();
            cmd.args(["doc", "get", &flag_id, "--db"]).arg(&flag_db);
            cmd
        },
        None,
    )
    .ok();
    assert_eq!(out.stdout, "{\"where\":\"flag\"}\n");

    // Reading through WEFT_DB.
    let mut cmd = weft_command();
    cmd.env("WEFT_DB", &env_db).args(["doc", "get", &env_id]);
    assert_eq!(support::run(cmd, None).ok().stdout, "{\"where\":\"env\"}\n");

    // Neither: ./weft.db in the working directory.
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = weft_command();
    cmd.current_dir(cwd.path())
        .args(["doc", "create", "--json", "{}"]);
    id_from(&support::run(cmd, None).ok());
    assert!(
        cwd.path().join("weft.db").exists(),
        "default database is ./weft.db"
    );
}

// ---------------------------------------------------------------------------------------------
// Exit codes

#[test]
fn runtime_errors_exit_1_with_a_message_and_no_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let id = create(&db, "c", &json!({"a": 1}));

    // Missing document.
    let missing = missing_id();
    let e = weft(&db, &["doc", "get", &missing]).runtime_error();
    assert!(
        e.stderr.contains("not found") && e.stderr.contains(&missing),
        "{e:#?}"
    );
    weft(&db, &["doc", "update", &missing, "--merge", "{}"]).runtime_error();

    // Invalid ids: garbage, not base58, a one-character typo (checksum), too long.
    for bad in ["nope", "0OIl0OIl", "", &"x".repeat(100)] {
        let e = weft(&db, &["doc", "get", bad]).runtime_error();
        assert!(e.stderr.contains("invalid document id"), "{bad:?}: {e:#?}");
    }
    let mut typo: Vec<char> = id.chars().collect();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == 'a' { 'b' } else { 'a' };
    let typo: String = typo.into_iter().collect();
    let e = weft(&db, &["doc", "get", &typo]).runtime_error();
    assert!(e.stderr.contains("invalid document id"), "{e:#?}");
    weft(&db, &["doc", "delete", "nope"]).runtime_error();

    // Invalid JSON and non-object roots, on stdin and as --json.
    for bad in ["{", "{\"a\":}", "nul", "", "   ", "{} {}"] {
        let e = weft_stdin(&db, &["doc", "create"], bad.as_bytes()).runtime_error();
        assert!(e.stderr.contains("invalid JSON"), "{bad:?}: {e:#?}");
        let e = weft(&db, &["doc", "create", "--json", bad]).runtime_error();
        assert!(e.stderr.contains("invalid JSON"), "{bad:?}: {e:#?}");
    }
    for (bad, kind) in [
        ("[1]", "array"),
        ("3", "number"),
        ("\"s\"", "string"),
        ("null", "null"),
        ("true", "boolean"),
    ] {
        let e = weft_stdin(&db, &["doc", "create"], bad.as_bytes()).runtime_error();
        assert!(
            e.stderr.contains("object") && e.stderr.contains(kind),
            "{bad:?}: {e:#?}"
        );
        weft(&db, &["doc", "create", "--json", bad]).runtime_error();
    }
    // No stdin at all (closed): nothing to create.
    weft(&db, &["doc", "create"]).runtime_error();
    // A bad collection name.
    let e = weft(&db, &["doc", "create", "-c", "no spaces", "--json", "{}"]).runtime_error();
    assert!(e.stderr.contains("collection"), "{e:#?}");

    // Deleted document.
    weft(&db, &["doc", "delete", &id]).ok();
    let e = weft(&db, &["doc", "get", &id]).runtime_error();
    assert!(e.stderr.contains("deleted"), "{e:#?}");

    // Nothing above created a document.
    assert!(list(&db, &[]).is_empty(), "failed commands must not write");

    // The database itself: a directory, a file that is not SQLite, a SQLite file that is not weft.
    let e = weft(dir.path(), &["doc", "list"]).runtime_error();
    assert!(!e.stderr.is_empty());
    let junk = db_in(&dir, "junk.db");
    std::fs::write(&junk, vec![b'z'; 8192]).unwrap();
    weft(&junk, &["doc", "list"]).runtime_error();
    assert_eq!(
        std::fs::read(&junk).unwrap(),
        vec![b'z'; 8192],
        "a non-weft file is left alone"
    );
    let missing_dir = dir.path().join("no/such/dir/x.db");
    weft(&missing_dir, &["doc", "create", "--json", "{}"]).runtime_error();
    // Missing input files.
    weft(&db, &["import", "/no/such/file.ndjson"]).runtime_error();
    weft(&db, &["import-bundle", "/no/such/file.bundle"]).runtime_error();
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let id = create(&db, "c", &json!({"a": 1}));
    let cases: &[&[&str]] = &[
        &["frobnicate"],
        &[],
        &["doc"],
        &["doc", "frob"],
        &["doc", "get"],
        &["doc", "update", &id],
        &["doc", "update"],
        &["doc", "update", &id, "--merge", "{}", "--unset", "/a"],
        &["doc", "update", &id, "--set", "/a"],
        &["doc", "update", &id, "--splice", "/a", "0", "0"],
        &["doc", "update", &id, "--splice", "/a", "0", "-1", "x"],
        &["doc", "delete"],
        &["doc", "get", &id, "--no-such-flag"],
        &["doc", "list", "--limit", "many"],
        &["import"],
        &["import", "x.ndjson", "--batch", "0"],
        &["export-bundle"],
        &[
            "export-bundle",
            "x.bundle",
            "--collection",
            "c",
            "--since",
            "1",
        ],
        &["export-bundle", "x.bundle", "--since", "-1"],
        &["import-bundle"],
        &["changes", "--since", "soon"],
    ];
    for args in cases {
        let out = weft(&db, args);
        assert_eq!(out.code, Some(2), "weft {args:?}: {out:#?}");
        assert_eq!(
            out.stdout, "",
            "weft {args:?}: usage errors print nothing on stdout"
        );
        // clap's message (`error: ...`), or the help text when a subcommand is missing.
        assert!(
            out.stderr.starts_with("error:") || out.stderr.contains("Usage:"),
            "weft {args:?}: {out:#?}"
        );
    }
    // Usage errors never touch the document.
    assert_eq!(get(&db, &id), json!({"a": 1}));
    // A usage error for a fresh path does not even create the database.
    let fresh = db_in(&dir, "fresh.db");
    weft(&fresh, &["doc", "get"]).usage_error();
    assert!(!fresh.exists(), "a usage error created {fresh:?}");
}

// ---------------------------------------------------------------------------------------------
// import

#[test]
fn import_creates_one_document_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let bodies: Vec<Value> = (0..25)
        .map(|i| json!({"n": i, "name": format!("item {i} ✓"), "f": i as f64 / 2.0, "nested": {"k": [i]}}))
        .collect();
    let mut file = String::new();
    for (i, b) in bodies.iter().enumerate() {
        file.push_str(&b.to_string());
        file.push('\n');
        if i % 7 == 3 {
            file.push_str("   \n\n"); // blank lines are skipped
        }
    }
    let path = dir.path().join("in.ndjson");
    std::fs::write(&path, &file).unwrap();

    // Small batches, so the import spans several transactions.
    let out = weft(
        &db,
        &[
            "import",
            path.to_str().unwrap(),
            "--collection",
            "items",
            "--batch",
            "4",
        ],
    )
    .ok();
    assert_eq!(out.stdout, "", "import reports on stderr only");
    assert!(
        out.stderr.contains("25"),
        "summary mentions the count: {out:#?}"
    );
    let listed = list(&db, &["-c", "items"]);
    let got: Vec<Value> = listed.iter().map(|d| d.2.clone()).collect();
    assert_eq!(
        got, bodies,
        "one document per line, in file order, exact bodies"
    );
    let ids: BTreeSet<&String> = listed.iter().map(|d| &d.0).collect();
    assert_eq!(ids.len(), 25, "distinct ids");
    assert_eq!(changes(&db, &["--collection", "items"]).len(), 25);
    // Each imported document is a normal document.
    assert_eq!(get(&db, &listed[3].0), bodies[3]);

    // `import -` reads stdin; the last line may lack its newline; default collection "default".
    let stdin = "{\"s\":1}\n{\"s\":2}\n{\"s\":3}";
    let out = weft_stdin(&db, &["import", "-"], stdin.as_bytes()).ok();
    assert_eq!(out.stdout, "");
    let listed = list(&db, &["-c", "default"]);
    assert_eq!(
        listed.iter().map(|d| d.2.clone()).collect::<Vec<_>>(),
        vec![json!({"s": 1}), json!({"s": 2}), json!({"s": 3})]
    );
    // An empty file imports nothing and succeeds.
    let empty = dir.path().join("empty.ndjson");
    std::fs::write(&empty, "").unwrap();
    weft(&db, &["import", empty.to_str().unwrap(), "-c", "empty"]).ok();
    assert!(list(&db, &["-c", "empty"]).is_empty());
}

#[test]
fn import_with_a_bad_line_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = |i: usize| json!({"n": i}).to_string();
    // (line number of the bad line, its text) — first, middle (after a blank line), last.
    let cases: &[(usize, &str)] = &[
        (1, "{\"n\":"),
        (6, "[1,2]"),
        (12, "not json at all"),
        (12, "7"),
    ];
    for (k, &(bad_line, bad)) in cases.iter().enumerate() {
        let db = db_in(&dir, &format!("bad{k}.db"));
        let mut lines: Vec<String> = (1..=12).map(good).collect();
        lines[4] = String::new(); // a blank line still counts in the numbering
        lines[bad_line - 1] = bad.to_owned();
        let path = dir.path().join(format!("bad{k}.ndjson"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        // --batch 1: had any line before the bad one been written, it would be committed.
        let e = weft(
            &db,
            &[
                "import",
                path.to_str().unwrap(),
                "-c",
                "imp",
                "--batch",
                "1",
            ],
        )
        .runtime_error();
        assert!(
            e.stderr.contains(&format!("line {bad_line}")),
            "error names line {bad_line}: {e:#?}"
        );
        assert!(
            e.stderr.contains(&format!("bad{k}.ndjson")),
            "error names the file: {e:#?}"
        );
        assert!(
            nothing_imported(&db),
            "case {k}: a bad line must import nothing"
        );

        // Same through stdin.
        let e = weft_stdin(
            &db,
            &["import", "-", "-c", "imp", "--batch", "1"],
            (lines.join("\n") + "\n").as_bytes(),
        )
        .runtime_error();
        assert!(e.stderr.contains(&format!("line {bad_line}")), "{e:#?}");
        assert!(
            nothing_imported(&db),
            "case {k}: stdin import must import nothing"
        );
    }
    // Bytes that are not UTF-8 on line 3: also named by line, also nothing imported.
    let db = db_in(&dir, "utf8.db");
    let path = dir.path().join("utf8.ndjson");
    std::fs::write(
        &path,
        b"{\"a\":1}\n{\"a\":2}\n{\"a\":\"\xff\"}\n{\"a\":4}\n",
    )
    .unwrap();
    let e = weft(&db, &["import", path.to_str().unwrap(), "--batch", "1"]).runtime_error();
    assert!(e.stderr.contains("line 3"), "error names line 3: {e:#?}");
    assert!(nothing_imported(&db));
    let e = weft_stdin(&db, &["import", "-", "--batch", "1"], b"{}\n\xc3\x28\n").runtime_error();
    assert!(e.stderr.contains("line 2"), "error names line 2: {e:#?}");
    assert!(nothing_imported(&db));

    // An invalid collection name is refused before anything is written.
    let db = db_in(&dir, "badcoll.db");
    let e = weft_stdin(&db, &["import", "-", "-c", "bad name"], b"{\"a\":1}\n").runtime_error();
    assert!(e.stderr.contains("collection"), "{e:#?}");
    assert!(nothing_imported(&db));
}

/// No document and no change-feed entry in `db`, or no `db` at all (the input is checked
/// before the database is opened).
#[track_caller]
fn nothing_imported(db: &Path) -> bool {
    !db.exists() || (list(db, &[]).is_empty() && changes(db, &[]).is_empty())
}

// ---------------------------------------------------------------------------------------------
// bundles

#[test]
fn bundles_sync_two_databases() {
    let dir = tempfile::tempdir().unwrap();
    let a = db_in(&dir, "a.db");
    let b = db_in(&dir, "b.db");
    let bundle = |name: &str| dir.path().join(name);
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();

    let t1 = create(&a, "todos", &json!({"title": "one", "n": 1}));
    let t2 = create(&a, "todos", &json!({"title": "two", "n": 2}));
    let n1 = create(&a, "notes", &json!({"text": "note ✎"}));
    weft(&a, &["doc", "update", &t1, "--set-text", "/title", "one!"]).ok();

    // Everything, A -> B.
    let all = bundle("all.bundle");
    let out = weft(&a, &["export-bundle", &path(&all)]).ok();
    assert_eq!(out.stdout, "", "export reports on stderr only");
    assert!(all.exists());
    let out = weft(&b, &["import-bundle", &path(&all)]).ok();
    assert_eq!(out.stdout, "");
    let sorted = |mut v: Vec<(String, String, Value)>| {
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(
        sorted(list(&b, &[])),
        sorted(list(&a, &[])),
        "B has A's documents"
    );
    assert_eq!(get(&b, &t1), json!({"title": "one!", "n": 1}));
    // Collaborative text arrived as text: it can be spliced on B.
    weft(
        &b,
        &["doc", "update", &t1, "--splice", "/title", "3", "1", "?"],
    )
    .ok();
    assert_eq!(get(&b, &t1)["title"], json!("one?"));

    // Importing the same bundle again changes nothing: no documents, no feed entries.
    let docs_before = list(&b, &[]);
    let feed_before = changes(&b, &[]);
    weft(&b, &["import-bundle", &path(&all)]).ok();
    weft(&b, &["import-bundle", &path(&all)]).ok();
    assert_eq!(
        list(&b, &[]),
        docs_before,
        "re-import is idempotent (documents)"
    );
    assert_eq!(
        changes(&b, &[]),
        feed_before,
        "re-import is idempotent (feed)"
    );
    assert!(
        feed_before.iter().any(|c| c["origin"] == json!("bundle")),
        "imports are marked"
    );

    // Concurrent edits on both sides converge after exchanging bundles both ways.
    weft(&a, &["doc", "update", &t2, "--merge", r#"{"from_a":true}"#]).ok();
    weft(&b, &["doc", "update", &t2, "--merge", r#"{"from_b":true}"#]).ok();
    let a2b = bundle("a2b.bundle");
    let b2a = bundle("b2a.bundle");
    weft(&a, &["export-bundle", &path(&a2b)]).ok();
    weft(&b, &["export-bundle", &path(&b2a)]).ok();
    weft(&b, &["import-bundle", &path(&a2b)]).ok();
    weft(&a, &["import-bundle", &path(&b2a)]).ok();
    let merged = json!({"title": "two", "n": 2, "from_a": true, "from_b": true});
    assert_eq!(get(&a, &t2), merged);
    assert_eq!(get(&b, &t2), merged);
    assert_eq!(get(&a, &t1)["title"], json!("one?"), "B's splice reached A");

    // A deletion travels.
    weft(&a, &["doc", "delete", &n1]).ok();
    let del = bundle("del.bundle");
    weft(&a, &["export-bundle", &path(&del)]).ok();
    weft(&b, &["import-bundle", &path(&del)]).ok();
    let e = weft(&b, &["doc", "get", &n1]).runtime_error();
    assert!(e.stderr.contains("deleted"), "{e:#?}");
    assert!(list(&b, &["-c", "notes"]).is_empty());
    let last = changes(&b, &[]).pop().unwrap();
    assert_eq!(
        (last["id"].clone(), last["kind"].clone()),
        (json!(n1), json!("deleted"))
    );
    // ... and edits to the deleted document on B do not resurrect it.
    weft(&b, &["import-bundle", &path(&all)]).ok();
    weft(&b, &["doc", "get", &n1]).runtime_error();

    // --collection: only that collection's documents.
    let todos = bundle("todos.bundle");
    weft(
        &a,
        &["export-bundle", &path(&todos), "--collection", "todos"],
    )
    .ok();
    let c = db_in(&dir, "c.db");
    weft(&c, &["import-bundle", &path(&todos)]).ok();
    let in_c: BTreeSet<String> = list(&c, &[]).into_iter().map(|d| d.0).collect();
    assert_eq!(in_c, BTreeSet::from([t1.clone(), t2.clone()]));
    assert_eq!(get(&c, &t2), merged);

    // --since N: only documents changed after feed entry N.
    let since = seqs(&changes(&a, &[])).into_iter().max().unwrap();
    let t3 = create(&a, "todos", &json!({"title": "three"}));
    weft(&a, &["doc", "update", &t1, "--merge", r#"{"late":1}"#]).ok();
    let recent = bundle("recent.bundle");
    weft(
        &a,
        &[
            "export-bundle",
            &path(&recent),
            "--since",
            &since.to_string(),
        ],
    )
    .ok();
    let d = db_in(&dir, "d.db");
    weft(&d, &["import-bundle", &path(&recent)]).ok();
    let in_d: BTreeSet<String> = list(&d, &[]).into_iter().map(|d| d.0).collect();
    assert_eq!(
        in_d,
        BTreeSet::from([t1.clone(), t3.clone()]),
        "--since {since}"
    );
    assert_eq!(get(&d, &t1), get(&a, &t1));
    // The incremental bundle brings B up to date too.
    weft(&b, &["import-bundle", &path(&recent)]).ok();
    assert_eq!(get(&b, &t1), get(&a, &t1));
    assert_eq!(get(&b, &t3), json!({"title": "three"}));

    // A damaged bundle is refused and changes nothing.
    let mut bytes = std::fs::read(&recent).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let damaged = bundle("damaged.bundle");
    std::fs::write(&damaged, &bytes).unwrap();
    let e_db = db_in(&dir, "e.db");
    weft(&e_db, &["import-bundle", &path(&damaged)]).runtime_error();
    let truncated = bundle("truncated.bundle");
    std::fs::write(&truncated, &bytes[..mid]).unwrap();
    weft(&e_db, &["import-bundle", &path(&truncated)]).runtime_error();
    std::fs::write(&truncated, b"").unwrap();
    weft(&e_db, &["import-bundle", &path(&truncated)]).runtime_error();
    assert!(list(&e_db, &[]).is_empty());
    assert!(changes(&e_db, &[]).is_empty());
}

// ---------------------------------------------------------------------------------------------
// changes

#[test]
fn changes_feed_is_ordered_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    // A read creates no database (tests/cli_readonly.rs); a write command does.
    weft(&db, &["compact"]).ok();
    assert!(
        changes(&db, &[]).is_empty(),
        "a new database has an empty feed"
    );

    // Each write is its own process: every one reopens the database.
    let a = create(&db, "x", &json!({"v": 1}));
    let b = create(&db, "y", &json!({"v": 2}));
    weft(&db, &["doc", "update", &a, "--merge", r#"{"v":3}"#]).ok();
    weft(&db, &["doc", "delete", &b]).ok();
    let c = create(&db, "x", &json!({"v": 4}));

    let feed = changes(&db, &[]);
    let summary: Vec<(String, String, String)> = feed
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["collection"].as_str().unwrap().to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |id: &str, c: &str, k: &str| (id.to_owned(), c.to_owned(), k.to_owned());
    assert_eq!(
        summary,
        vec![
            s(&a, "x", "created"),
            s(&b, "y", "created"),
            s(&a, "x", "updated"),
            s(&b, "y", "deleted"),
            s(&c, "x", "created"),
        ]
    );
    for l in &feed {
        assert_eq!(l["origin"], json!("local"));
        assert!(l["heads"].is_array());
    }

    // --since N prints exactly the entries with seq > N, for every N.
    let all = seqs(&feed);
    for &n in std::iter::once(&0).chain(all.iter()) {
        let tail = changes(&db, &["--since", &n.to_string()]);
        let want: Vec<&Value> = feed
            .iter()
            .filter(|l| l["seq"].as_u64().unwrap() > n)
            .collect();
        assert_eq!(tail.iter().collect::<Vec<_>>(), want, "--since {n}");
    }
    let max = *all.last().unwrap();
    assert!(changes(&db, &["--since", &(max + 100).to_string()]).is_empty());

    // --collection narrows.
    let xs = changes(&db, &["--collection", "x"]);
    assert_eq!(xs.len(), 3);
    assert!(xs.iter().all(|l| l["collection"] == json!("x")));
    let xs_since = changes(&db, &["--collection", "x", "--since", &all[1].to_string()]);
    assert_eq!(xs_since, xs[1..].to_vec());

    // After reopening (a new process), the feed is unchanged and new entries continue above it.
    assert_eq!(changes(&db, &[]), feed);
    let d = create(&db, "x", &json!({"v": 5}));
    let after = changes(&db, &["--since", &max.to_string()]);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["id"], json!(d));
    assert!(after[0]["seq"].as_u64().unwrap() > max);
    let full = changes(&db, &[]);
    assert_eq!(full[..feed.len()], feed[..]);

    // More entries than one page (1,000) of the feed: all of them, each once, in order.
    let ndjson: String = (0..2_345).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    weft_stdin(
        &db,
        &["import", "-", "-c", "bulk", "--batch", "500"],
        ndjson.as_bytes(),
    )
    .ok();
    let everything = changes(&db, &[]);
    assert_eq!(everything.len(), full.len() + 2_345);
    assert_eq!(everything[..full.len()], full[..]);
    let bulk = changes(&db, &["--collection", "bulk"]);
    assert_eq!(bulk[..], everything[full.len()..]);
    let ids: BTreeSet<&str> = bulk.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2_345, "one entry per imported document");
    let cut = bulk[1_100]["seq"].as_u64().unwrap();
    assert_eq!(
        changes(&db, &["--since", &cut.to_string()])[..],
        everything[full.len() + 1_101..]
    );
}

#[test]
fn closing_stdout_early_is_not_an_error() {
    // `weft doc list | head -1`: the reader goes away; weft stops quietly with status 0.
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let ndjson: String = (0..3_000)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(200)))
        .collect();
    weft_stdin(&db, &["import", "-"], ndjson.as_bytes()).ok();
    for args in [
        &["doc", "list", "--json"][..],
        &["doc", "list"],
        &["changes"],
    ] {
        let mut child = weft_command()
            .arg("--db")
            .arg(&db)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = support::stderr_collector(&mut child);
        let (lines, reader) = support::line_reader(child.stdout.take().unwrap());
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(LineEvent::Line(l)) => assert!(!l.is_empty()),
            other => panic!("weft {args:?}: expected a first line, got {other:?}"),
        }
        // Close the read end (the reader thread owns it): drop the receiver so the thread stops
        // at its next send, which drops the pipe.
        drop(lines);
        reader.join().unwrap();
        let status = child.wait().unwrap();
        let err = stderr.join().unwrap();
        assert_eq!(status.code(), Some(0), "weft {args:?}: {status:?} {err}");
        assert!(!err.contains("error"), "weft {args:?}: {err}");
    }
}

#[test]
fn changes_follow_prints_commits_of_other_processes() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "a.db");
    let first = create(&db, "watched", &json!({"n": 0}));

    let mut cmd = weft_command();
    cmd.arg("--db")
        .arg(&db)
        .args(["changes", "--follow", "--collection", "watched"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn weft changes --follow");
    let stderr = support::stderr_collector(&mut child);
    let (lines, reader) = support::line_reader(child.stdout.take().unwrap());
    // A failure bound for each awaited line, not a synchronization delay.
    let bound = Duration::from_secs(10);
    let next_line = |what: &str| -> Value {
        match lines.recv_timeout(bound) {
            Ok(LineEvent::Line(l)) => {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("{what}: bad line {l:?}: {e}"));
                check_change_line(&v);
                v
            }
            Ok(LineEvent::Eof(rest)) => {
                panic!("{what}: `changes --follow` ended early (partial line {rest:?})")
            }
            Err(RecvTimeoutError::Timeout) => panic!("{what}: no line within {bound:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("{what}: reader thread gone"),
        }
    };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The existing entry first: once it is printed, the follower is running.
        let l0 = next_line("existing entry");
        assert_eq!(l0["id"], json!(first));
        assert_eq!(l0["kind"], json!("created"));
        let mut last_seq = l0["seq"].as_u64().unwrap();

        for round in 1..=3 {
            // A change in another collection first: the follower must skip it.
            create(&db, "ignored", &json!({"round": round}));
            // Then a commit by another process in the watched collection.
            let id = create(&db, "watched", &json!({"n": round}));
            let l = next_line("new document");
            assert_eq!(l["id"], json!(id), "round {round}");
            assert_eq!(l["kind"], json!("created"));
            assert_eq!(l["collection"], json!("watched"));
            let seq = l["seq"].as_u64().unwrap();
            assert!(seq > last_seq, "seq increases: {last_seq} then {seq}");
            last_seq = seq;

            weft(
                &db,
                &["doc", "update", &id, "--merge", r#"{"touched":true}"#],
            )
            .ok();
            let l = next_line("update");
            assert_eq!(
                (l["id"].clone(), l["kind"].clone()),
                (json!(id), json!("updated"))
            );
            assert!(l["seq"].as_u64().unwrap() > last_seq);
            last_seq = l["seq"].as_u64().unwrap();
        }
        weft(&db, &["doc", "delete", &first]).ok();
        let l = next_line("delete");
        assert_eq!(
            (l["id"].clone(), l["kind"].clone()),
            (json!(first), json!("deleted"))
        );
        assert!(l["seq"].as_u64().unwrap() > last_seq);
    }));

    let early_exit = child.try_wait().expect("try_wait");
    child.kill().expect("kill follower");
    child.wait().expect("reap follower");
    let err_text = stderr.join().unwrap();
    reader.join().unwrap();
    if let Err(panic) = result {
        eprintln!("follower stderr: {err_text}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        early_exit.is_none(),
        "the follower exited on its own: {early_exit:?}, stderr {err_text}"
    );
    assert!(!err_text.contains("error"), "follower stderr: {err_text}");
    // Nothing else was printed (in particular nothing for the ignored collection).
    match lines.recv_timeout(bound) {
        Ok(LineEvent::Eof(None)) => {}
        other => panic!("unexpected output after the last awaited line: {other:?}"),
    }
}
