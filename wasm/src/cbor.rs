//! CBOR for ephemeral messages: JS values <-> CBOR bytes, the way automerge-repo's
//! `handle.broadcast(message)` does it (cbor-x's `Encoder` with `useRecords: false` and
//! `tagUint8Array: false`; cbor-x's `decode`), so presence from a weft JS replica and from an
//! automerge-repo client read the same on both sides.
//!
//! Encoding (a JSON-compatible value, or bytes):
//! - `null` and `undefined` → null; booleans → booleans; strings → text strings;
//! - numbers → integers when they fit 32 bits (like cbor-x: larger ones would decode as
//!   BigInts there), floats otherwise;
//! - a `Uint8Array` → a byte string; arrays → arrays;
//! - any other object → a map of its own enumerable string keys (properties that are
//!   `undefined` are left out, like `JSON.stringify`);
//! - functions, symbols, bigints, `Map`, `Set` and other typed arrays are refused
//!   ("InvalidArgument"), as is nesting deeper than `MAX_DEPTH`.
//!
//! Decoding: integers and floats → numbers, byte strings → `Uint8Array`, maps → plain objects
//! (non-text keys as their string form), tags → their content (a cbor-x `Date` is its
//! timestamp), `undefined` → null. Bytes that are not exactly one CBOR item (or nest deeper
//! than `MAX_DEPTH`) are an error.

use ciborium::value::{Integer, Value};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::convert::{JsResult, error};

/// How deep a value may nest (the same limit as document bodies).
pub const MAX_DEPTH: usize = 100;

/// The CBOR bytes of a JS value (see the module docs).
pub fn encode(value: &JsValue) -> JsResult<Vec<u8>> {
    let value = from_js(value, 0)?;
    let mut out = Vec::new();
    ciborium::ser::into_writer(&value, &mut out).map_err(|e| error("Internal", &e))?;
    Ok(out)
}

/// The JS value of CBOR bytes (see the module docs); errors with code "BadCbor".
pub fn decode(bytes: &[u8]) -> JsResult<JsValue> {
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_DEPTH)
        .map_err(|e| error("BadCbor", &format!("not CBOR: {e}")))?;
    if !rest.is_empty() {
        return Err(error(
            "BadCbor",
            &format!("{} bytes after the CBOR value", rest.len()),
        ));
    }
    Ok(to_js(&value))
}

fn invalid(what: &str) -> JsValue {
    error(
        "InvalidArgument",
        &format!("ephemeral data must be JSON-compatible or a Uint8Array, not {what}"),
    )
}

fn from_js(value: &JsValue, depth: usize) -> JsResult<Value> {
    if value.is_null() || value.is_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = value.as_f64() {
        // As cbor-x does: integers that fit 32 bits (unsigned, or signed when negative) as
        // CBOR integers, everything else as a float. (A larger integer as a 64-bit CBOR
        // integer would come out of cbor-x's `decode` as a BigInt.)
        let is_int32 = n.fract() == 0.0
            && (-2_147_483_648.0..=4_294_967_295.0).contains(&n)
            && !(n == 0.0 && n.is_sign_negative());
        if is_int32 {
            return Ok(Value::Integer(Integer::from(n as i64)));
        }
        return Ok(Value::Float(n));
    }
    if let Some(s) = value.as_string() {
        return Ok(Value::Text(s));
    }
    if value.is_function() {
        return Err(invalid("a function"));
    }
    if !value.is_object() {
        // symbol, bigint
        return Err(invalid(&format!(
            "a {}",
            value.js_typeof().as_string().unwrap_or_default()
        )));
    }
    if depth >= MAX_DEPTH {
        return Err(error(
            "Limit",
            &format!("ephemeral data nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    if let Some(bytes) = value.dyn_ref::<js_sys::Uint8Array>() {
        return Ok(Value::Bytes(bytes.to_vec()));
    }
    if js_sys::Array::is_array(value) {
        let array: &js_sys::Array = value.unchecked_ref();
        let mut items = Vec::with_capacity(array.length() as usize);
        for item in array.iter() {
            items.push(from_js(&item, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    if value.is_instance_of::<js_sys::Map>() {
        return Err(invalid("a Map"));
    }
    if value.is_instance_of::<js_sys::Set>() {
        return Err(invalid("a Set"));
    }
    if js_sys::ArrayBuffer::is_view(value) || value.is_instance_of::<js_sys::ArrayBuffer>() {
        return Err(invalid("a typed array other than Uint8Array"));
    }
    let entries = js_sys::Object::entries(value.unchecked_ref());
    let mut map = Vec::with_capacity(entries.length() as usize);
    for entry in entries.iter() {
        let entry: js_sys::Array = entry.unchecked_into();
        let item = entry.get(1);
        if item.is_undefined() {
            continue;
        }
        let key = entry.get(0).as_string().unwrap_or_default();
        map.push((Value::Text(key), from_js(&item, depth + 1)?));
    }
    Ok(Value::Map(map))
}

fn to_js(value: &Value) -> JsValue {
    match value {
        Value::Integer(i) => JsValue::from_f64(i128::from(*i) as f64),
        Value::Float(f) => JsValue::from_f64(*f),
        Value::Text(s) => JsValue::from_str(s),
        Value::Bytes(b) => js_sys::Uint8Array::from(b.as_slice()).into(),
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Null => JsValue::NULL,
        Value::Tag(_, inner) => to_js(inner),
        Value::Array(items) => items.iter().map(to_js).collect::<js_sys::Array>().into(),
        Value::Map(entries) => {
            let object = js_sys::Object::new();
            for (key, item) in entries {
                let key = match key {
                    Value::Text(s) => JsValue::from_str(s),
                    other => key_string(other),
                };
                // A data property even for "__proto__": never the object's prototype.
                let descriptor = js_sys::Object::new();
                let set = |k: &str, v: &JsValue| {
                    let _ = js_sys::Reflect::set(&descriptor, &k.into(), v);
                };
                set("value", &to_js(item));
                set("writable", &JsValue::TRUE);
                set("enumerable", &JsValue::TRUE);
                set("configurable", &JsValue::TRUE);
                js_sys::Object::define_property(&object, &key, &descriptor);
            }
            object.into()
        }
        // `Value` is non-exhaustive.
        _ => JsValue::NULL,
    }
}

/// A non-text map key as a property name, the way JS would stringify the decoded key.
fn key_string(key: &Value) -> JsValue {
    match key {
        Value::Tag(_, inner) => key_string(inner),
        Value::Text(s) => JsValue::from_str(s),
        Value::Null => JsValue::from_str("null"),
        other => JsValue::from(js_sys::JSON::stringify(&to_js(other)).unwrap_or_default()),
    }
}
