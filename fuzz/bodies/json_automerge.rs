//! `json_automerge`: JSON <-> Automerge conversion.
//!
//! Input: a mode byte, then the payload.
//! - Even mode: JSON text. An object is written as a document (`json::create_root`, and
//!   through a `Replica` over `MemStore`) and must come back exactly: same keys, same values,
//!   numbers of the same kind (ARCHITECTURE.md, "Numbers keep their kind": integers stay
//!   integers, `1.0` stays a float, bit for bit). A pair `[a, b]` of objects creates `a` and
//!   applies `b` as an RFC 7386 merge patch: the result must equal a reference merge on
//!   `serde_json` values, and applying `b` again must not make a change. Anything else is not a
//!   document body and must be refused.
//! - Odd mode: Automerge bytes. Loading them (as the engine does) and materializing the JSON
//!   never panics; a document that loads saves and loads again to the same JSON.

use serde_json::{Map, Value};
use weft::automerge::{Automerge, LoadOptions, OnPartialLoad};
use weft::{Error, JsonError, json};

use super::world;

/// A fuzz input for JSON text.
pub fn json_input(text: &str) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(text.as_bytes());
    out
}

/// A fuzz input for Automerge bytes.
pub fn automerge_input(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(bytes);
    out
}

pub fn check(data: &[u8]) {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        json_text(payload);
    } else {
        automerge_bytes(payload);
    }
}

fn json_text(payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    match value {
        Value::Object(map) => round_trip(&map),
        Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_object) => {
            if let [Value::Object(a), Value::Object(b)] = &pair[..] {
                patch(a, b);
            }
        }
        other => {
            assert!(
                matches!(
                    json::into_object(other.clone()),
                    Err(JsonError::NotAnObject(_))
                ),
                "{other} was accepted as a document body"
            );
            let w = world::empty();
            assert!(
                matches!(
                    w.replica.create("todos", other.clone()),
                    Err(Error::Json(JsonError::NotAnObject(_)))
                ),
                "a replica created a document from {other}"
            );
        }
    }
}

fn new_doc(map: &Map<String, Value>) -> Automerge {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    json::create_root(&mut tx, map).expect("create_root");
    tx.commit();
    doc
}

fn round_trip(map: &Map<String, Value>) {
    let expected = Value::Object(map.clone());
    let doc = new_doc(map);
    assert_same(&json::materialize(&doc, None), &expected, "materialize");
    let loaded = Automerge::load(&doc.save()).expect("a saved document loads");
    assert_same(
        &json::materialize(&loaded, None),
        &expected,
        "materialize after load",
    );

    // Through a replica: the stored body (what `get` reads) and the Automerge document (what
    // `get_at` materializes) must both be the input.
    let w = world::empty();
    let id = w.replica.create("todos", expected.clone()).expect("create");
    let stored = w.replica.get(&id).expect("get");
    assert_same(&stored.body, &expected, "the stored body");
    let at = w.replica.get_at(&id, &stored.heads).expect("get_at");
    assert_same(&at.body, &expected, "the document at its heads");
}

fn patch(a: &Map<String, Value>, b: &Map<String, Value>) {
    let mut doc = new_doc(a);
    let mut tx = doc.transaction();
    json::merge_patch(&mut tx, b).expect("merge_patch");
    tx.commit();
    let expected = merge(Value::Object(a.clone()), &Value::Object(b.clone()));
    assert_same(&json::materialize(&doc, None), &expected, "merge patch");

    let heads = doc.get_heads();
    let mut tx = doc.transaction();
    json::merge_patch(&mut tx, b).expect("merge_patch");
    tx.commit();
    assert_eq!(
        doc.get_heads(),
        heads,
        "a repeated merge patch made a change"
    );

    // Through a replica: `update` must give the same body, stored and materialized.
    let w = world::empty();
    let id = w
        .replica
        .create("todos", Value::Object(a.clone()))
        .expect("create");
    w.replica
        .update(&id, Value::Object(b.clone()))
        .expect("update");
    let stored = w.replica.get(&id).expect("get");
    assert_same(&stored.body, &expected, "the stored body after a patch");
    let at = w.replica.get_at(&id, &stored.heads).expect("get_at");
    assert_same(
        &at.body,
        &expected,
        "the document at its heads after a patch",
    );
}

/// RFC 7386, on values.
pub fn merge(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut target = match target {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            let old = target.remove(key).unwrap_or(Value::Null);
            target.insert(key.clone(), merge(old, value));
        }
    }
    Value::Object(target)
}

/// Equality that also tells number kinds apart and compares floats bit for bit
/// (`serde_json`'s `==` has `0.0 == -0.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), x.is_f64(), y.is_f64()) {
            (Some(fx), true, true) => y.as_f64().is_some_and(|fy| fx.to_bits() == fy.to_bits()),
            (_, false, false) => x == y,
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn assert_same(found: &Value, expected: &Value, what: &str) {
    assert!(
        same(found, expected),
        "{what} differs from the input\n found:    {found}\n expected: {expected}"
    );
}

fn automerge_bytes(payload: &[u8]) {
    // As the engine loads a peer's whole document or a bundle entry.
    let options = LoadOptions::new().on_partial_load(OnPartialLoad::Error);
    let Ok(doc) = Automerge::load_with_options(payload, options) else {
        return;
    };
    let value = json::materialize(&doc, None);
    let heads = doc.get_heads();
    let at_heads = json::materialize(&doc, Some(&heads));
    assert_same(&at_heads, &value, "the document at its own heads");
    let again = Automerge::load(&doc.save()).expect("a saved document loads");
    assert_eq!(again.get_heads(), heads, "save + load changed the heads");
    assert_same(
        &json::materialize(&again, None),
        &value,
        "materialize after save + load",
    );
}
