//! Rows as documents: the document id a row key stands for, which document is a key's current
//! one, and values between SQLite and JSON.
//!
//! A row's document id is derived from `(collection, key, generation)`, so two replicas that
//! insert the same key meet in one document (its fields merge like any concurrent edit). A
//! delete is a tombstone, and tombstones win; a key inserted again after a delete gets the
//! next generation: a new document. The current document of a key is its live one of the
//! highest generation.

use rusqlite::types::Value as SqlValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::Replica;
use crate::error::Result;
use crate::id::DocumentId;

/// How many generations in a row may be unknown here before the search for a key's
/// documents stops (a later generation can arrive before an earlier one's tombstone).
const UNKNOWN_RUN: u32 = 3;

/// The document id of generation `generation` of `key` (canonical JSON text) in `collection`.
pub(crate) fn row_id(collection: &str, key: &str, generation: u32) -> DocumentId {
    let mut h = Sha256::new();
    h.update(b"weft.track.v1\0");
    h.update(collection.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(generation.to_string().as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    DocumentId::from_bytes(bytes)
}

/// Which generation of `key`, if any, `id` is (searching the first `up_to`).
pub(crate) fn generation_of(
    collection: &str,
    key: &str,
    id: &DocumentId,
    up_to: u32,
) -> Option<u32> {
    (0..up_to).find(|g| row_id(collection, key, *g) == *id)
}

/// A key's documents as this replica knows them.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyDocs {
    /// The current document and its body.
    pub live: Option<(DocumentId, Map<String, Value>)>,
    /// The generation a new document for the key would take.
    pub next_generation: u32,
}

/// Looks up the documents of `key` in `collection`.
pub(crate) fn key_docs(replica: &Replica, collection: &str, key: &str) -> Result<KeyDocs> {
    let mut found = KeyDocs::default();
    let mut unknown = 0;
    let mut generation = 0u32;
    while unknown < UNKNOWN_RUN {
        let id = row_id(collection, key, generation);
        match replica.record(&id)? {
            None => unknown += 1,
            Some(record) => {
                unknown = 0;
                found.next_generation = generation + 1;
                if !record.deleted
                    && record.collection == collection
                    && let Some(Value::Object(body)) = record
                        .body
                        .as_deref()
                        .and_then(|b| serde_json::from_str(b).ok())
                {
                    found.live = Some((id, body));
                }
            }
        }
        generation += 1;
    }
    Ok(found)
}

/// The canonical text of a key (a JSON array of the key columns' values).
pub(crate) fn key_text(values: &[Value]) -> String {
    Value::Array(values.to_vec()).to_string()
}

/// The key of a document body: the key columns' values, when all are present and scalar.
pub(crate) fn key_of(body: &Map<String, Value>, key_columns: &[String]) -> Option<Vec<Value>> {
    key_columns
        .iter()
        .map(|k| match body.get(k) {
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => Some(v.clone()),
            _ => None,
        })
        .collect()
}

/// A JSON value as SQLite stores it: numbers as INTEGER or REAL, booleans as 0/1, arrays and
/// objects (written by code through the document API) as JSON text.
pub(crate) fn to_sql(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

/// Whether a stored SQLite value already holds `value` (so writing it would change nothing).
pub(crate) fn same(stored: &SqlValue, value: &Value) -> bool {
    match (stored, to_sql(value)) {
        (SqlValue::Integer(a), SqlValue::Integer(b)) => *a == b,
        (SqlValue::Real(a), SqlValue::Real(b)) => *a == b,
        (SqlValue::Integer(a), SqlValue::Real(b)) => (*a as f64) == b,
        (SqlValue::Real(a), SqlValue::Integer(b)) => *a == (b as f64),
        (SqlValue::Text(a), SqlValue::Text(b)) => *a == b,
        (SqlValue::Null, SqlValue::Null) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn row_ids_are_stable_and_distinct() {
        let a = row_id("todos", r#"["a"]"#, 0);
        assert_eq!(a, row_id("todos", r#"["a"]"#, 0));
        assert_ne!(a, row_id("todos", r#"["a"]"#, 1));
        assert_ne!(a, row_id("todo", r#"s["a"]"#, 0));
        assert_ne!(a, row_id("notes", r#"["a"]"#, 0));
        assert_eq!(
            generation_of("todos", r#"["a"]"#, &row_id("todos", r#"["a"]"#, 5), 8),
            Some(5)
        );
        // A pinned value: ids must never change between versions, or replicas stop meeting.
        assert_eq!(a.to_string(), "4JiTTkrEHjVTyqKfqWdxtfcjd4gQ");
    }

    #[test]
    fn keys_and_values() {
        let body = json!({"id": "a", "n": 2, "x": null})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(
            key_of(&body, &["id".into(), "n".into()]),
            Some(vec![json!("a"), json!(2)])
        );
        assert_eq!(key_of(&body, &["x".into()]), None);
        assert_eq!(key_text(&[json!("a"), json!(2)]), r#"["a",2]"#);
        assert!(same(&SqlValue::Integer(2), &json!(2)));
        assert!(same(&SqlValue::Real(2.0), &json!(2)));
        assert!(same(&SqlValue::Real(1.5), &json!(1.5)));
        assert!(!same(&SqlValue::Text("2".into()), &json!(2)));
        assert!(same(&SqlValue::Null, &json!(null)));
        assert_eq!(to_sql(&json!(true)), SqlValue::Integer(1));
        assert_eq!(
            to_sql(&json!({"a": 1})),
            SqlValue::Text(r#"{"a":1}"#.into())
        );
    }
}
