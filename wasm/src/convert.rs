//! Rust <-> JS values: JSON bodies through serde-wasm-bindgen (JSON-compatible: objects as
//! plain objects, integers as numbers), byte strings as `Uint8Array`, errors as `Error`s with
//! a `code`.

use serde::Serialize;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use weft::engine::{PeerEvent, PeerId};
use weft::store::mem::{Record, Table};
use weft::{ChangeEvent, ChangeHash, Document};

pub type JsResult<T> = Result<T, JsValue>;

/// A JS `Error` with `message` and a `code` property.
pub fn error(code: &str, message: &dyn std::fmt::Display) -> JsValue {
    let error = js_sys::Error::new(&message.to_string());
    let _ = js_sys::Reflect::set(&error, &"code".into(), &code.into());
    error.into()
}

/// The JS error for a weft error: its message, and a `code` naming its kind.
pub fn error_of(e: &weft::Error) -> JsValue {
    let code = match e {
        weft::Error::NotFound(_) => "NotFound",
        weft::Error::Deleted(_) => "Deleted",
        weft::Error::InvalidId { .. } => "InvalidId",
        weft::Error::InvalidCollection(_) => "InvalidCollection",
        weft::Error::Json(weft::JsonError::NotText { .. }) => "NotText",
        weft::Error::Json(
            weft::JsonError::InvalidPath { .. }
            | weft::JsonError::PathNotFound(_)
            | weft::JsonError::OutOfRange { .. },
        ) => "BadPath",
        weft::Error::Json(_) => "InvalidJson",
        weft::Error::Bundle(_) => "BadBundle",
        weft::Error::Store(_) => "Storage",
        weft::Error::Corrupt { .. } => "Corrupt",
        weft::Error::UnknownHeads { .. } => "UnknownHeads",
        weft::Error::Filter(_) => "BadFilter",
        weft::Error::Automerge(_) => "Automerge",
        weft::Error::ChangeFn(_) => "ChangeFn",
        weft::Error::Limit { .. } => "Limit",
        weft::Error::TooLarge { .. } => "TooLarge",
        _ => "Internal",
    };
    error(code, e)
}

pub fn to_js<T: Serialize + ?Sized>(value: &T) -> JsResult<JsValue> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| error("Internal", &e))
}

pub fn from_js<T: serde::de::DeserializeOwned>(value: JsValue, what: &str) -> JsResult<T> {
    serde_wasm_bindgen::from_value(value)
        .map_err(|e| error("InvalidJson", &format!("{what} is not JSON: {e}")))
}

/// A JSON value from JS (a body, a patch, a value to set), refused with code "Limit" if it is
/// nested deeper than `limits.max_depth` or has more than `limits.max_ops` values. Checked
/// before serde-wasm-bindgen converts it: the conversion recurses once per level, and a
/// 100,000-deep (or cyclic) object would overflow the 1 MiB wasm stack, a trap that leaves the
/// module unusable. The walk itself keeps its own stack and stops at the first excess, so a
/// cycle or a shared subtree (which conversion would copy per path) ends it too.
pub fn json_from_js(
    value: JsValue,
    what: &str,
    limits: &weft::Limits,
) -> JsResult<serde_json::Value> {
    check_js(&value, limits).map_err(|e| error("Limit", &format!("{what}: {e}")))?;
    from_js(value, what)
}

fn check_js(value: &JsValue, limits: &weft::Limits) -> Result<(), weft::LimitError> {
    let mut stack: Vec<(JsValue, usize)> = vec![(value.clone(), 1)];
    let mut values: u64 = 0;
    while let Some((value, depth)) = stack.pop() {
        values += 1;
        // What serde-wasm-bindgen descends into: arrays, Maps, and any other object's own
        // enumerable properties (functions and primitives have none it reads).
        let children: js_sys::Array = if js_sys::Array::is_array(&value) {
            value.unchecked_into()
        } else if let Some(map) = value.dyn_ref::<js_sys::Map>() {
            js_sys::Array::from(&map.values())
        } else if value.is_object() {
            js_sys::Object::values(value.unchecked_ref())
        } else {
            continue;
        };
        if depth > limits.max_depth {
            return Err(weft::LimitError::Depth(limits.max_depth));
        }
        for child in children.iter() {
            if child.is_object() {
                stack.push((child, depth + 1)); // counted when it is taken
            } else {
                values += 1;
            }
        }
        if values > limits.max_ops {
            return Err(weft::LimitError::Ops(limits.max_ops));
        }
    }
    Ok(())
}

pub fn ids_to_js(heads: &[ChangeHash]) -> JsValue {
    heads
        .iter()
        .map(|h| JsValue::from_str(&h.to_string()))
        .collect::<js_sys::Array>()
        .into()
}

pub fn document(doc: &Document) -> JsResult<JsValue> {
    to_js(&serde_json::json!({
        "id": doc.id.to_string(),
        "collection": doc.collection,
        "heads": doc.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "body": doc.body,
    }))
}

pub fn events(events: &[ChangeEvent]) -> JsResult<JsValue> {
    let list: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            serde_json::json!({
                "seq": e.seq,
                "id": e.id.to_string(),
                "collection": e.collection,
                "kind": e.kind,
                "heads": e.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "origin": e.origin.to_string(),
                "at": e.at,
            })
        })
        .collect();
    to_js(&list)
}

pub fn session_events(events: Vec<(PeerId, PeerEvent)>) -> JsResult<JsValue> {
    let out = js_sys::Array::new();
    for (peer, event) in events {
        let value = match event {
            PeerEvent::InSync => serde_json::json!({"peer": peer.0, "kind": "insync"}),
            PeerEvent::Persisted(docs) => serde_json::json!({
                "peer": peer.0,
                "kind": "persisted",
                "docs": docs.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>(),
            }),
            PeerEvent::Error { code, message, doc } => serde_json::json!({
                "peer": peer.0,
                "kind": "error",
                "code": code.as_str(),
                "message": message,
                "doc": doc.map(|d| d.to_string()),
            }),
            PeerEvent::Ephemeral { doc, data, sender } => {
                // The bytes as sent, and what they decode to (or why they do not).
                let object = to_js(&serde_json::json!({
                    "peer": peer.0,
                    "kind": "ephemeral",
                    "doc": doc.to_string(),
                    "sender": sender,
                }))?;
                let set = |k: &str, v: &JsValue| {
                    let _ = js_sys::Reflect::set(&object, &k.into(), v);
                };
                set("bytes", &js_sys::Uint8Array::from(data.as_slice()).into());
                match crate::cbor::decode(&data) {
                    Ok(value) => set("data", &value),
                    Err(e) => set("error", &e),
                }
                out.push(&object);
                continue;
            }
            PeerEvent::Unavailable { doc } => serde_json::json!({
                "peer": peer.0,
                "kind": "unavailable",
                "doc": doc.to_string(),
            }),
            PeerEvent::Closed { reason } => serde_json::json!({
                "peer": peer.0,
                "kind": "closed",
                "reason": reason,
            }),
        };
        out.push(&to_js(&value)?);
    }
    Ok(out.into())
}

/// Journal records as `{op: "put", table, key, value}` / `{op: "deletePrefix", table, prefix}`.
pub fn journal(records: Vec<Record>) -> JsValue {
    let out = js_sys::Array::new();
    for record in records {
        let object = js_sys::Object::new();
        let set = |k: &str, v: &JsValue| {
            let _ = js_sys::Reflect::set(&object, &k.into(), v);
        };
        match record {
            Record::Put { table, key, value } => {
                set("op", &"put".into());
                set("table", &table.name().into());
                set("key", &key.into());
                set("value", &js_sys::Uint8Array::from(value.as_slice()).into());
            }
            Record::DeletePrefix { table, prefix } => {
                set("op", &"deletePrefix".into());
                set("table", &table.name().into());
                set("prefix", &prefix.into());
            }
        }
        out.push(&object);
    }
    out.into()
}

/// `[table, key, bytes]` triples read back from storage.
pub fn records_from_js(value: &JsValue) -> JsResult<Vec<(Table, String, Vec<u8>)>> {
    let array: &js_sys::Array = value
        .dyn_ref()
        .ok_or_else(|| error("Storage", &"records must be an array"))?;
    let mut out = Vec::with_capacity(array.length() as usize);
    for entry in array.iter() {
        let triple: &js_sys::Array = entry
            .dyn_ref()
            .ok_or_else(|| error("Storage", &"a record must be [table, key, bytes]"))?;
        let table = triple
            .get(0)
            .as_string()
            .and_then(|t| Table::from_name(&t))
            .ok_or_else(|| error("Storage", &"unknown table in a stored record"))?;
        let key = triple
            .get(1)
            .as_string()
            .ok_or_else(|| error("Storage", &"a record key must be a string"))?;
        let bytes = triple.get(2);
        let bytes: &js_sys::Uint8Array = bytes
            .dyn_ref()
            .ok_or_else(|| error("Storage", &"a record value must be a Uint8Array"))?;
        out.push((table, key, bytes.to_vec()));
    }
    Ok(out)
}
