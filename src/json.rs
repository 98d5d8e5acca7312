//! JSON <-> Automerge.
//!
//! * [`parse_object`] reads a document body (must be a JSON object).
//! * [`create_root`] writes a body into an empty document in one batch operation.
//! * [`materialize`] turns a document (optionally as of some heads) back into JSON.
//! * [`merge_patch`] applies an RFC 7386 merge patch with the fewest Automerge operations:
//!   unchanged values produce no operation at all, so a repeated patch is not a new change.
//! * [`Path`], [`set_at`], [`delete_at`], [`set_text`], [`splice_text`] edit at a path.
//!
//! **Strings are scalars by default.** A JSON string becomes an Automerge scalar string
//! (last writer wins), not a collaborative Text object. Text is opt-in per field with
//! [`set_text`]; once a field is Text, later assignments through merge patches or [`set_at`]
//! update it with a character diff so concurrent edits merge. ARCHITECTURE.md explains why.
//!
//! Numbers keep their JSON kind: integers become `Int` (or `Uint` above `i64::MAX`), numbers
//! written with a fraction or exponent become `F64`, and they come back the same way.

use std::collections::HashMap;
use std::fmt;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    Automerge, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, TextEncoding, hydrate,
};
use serde_json::{Map, Number, Value};

use crate::limits::{LimitError, Limits};

/// Errors about JSON input or paths into a document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The text is not valid JSON.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// A document body (or a merge patch for a whole document) must be a JSON object.
    #[error("a document body must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// A path that cannot be parsed.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// A path that leads nowhere in this document.
    #[error("no value at path {0}")]
    PathNotFound(Path),
    /// A text operation on something that is not collaborative text.
    #[error("the value at {path} is {found}, not text; create collaborative text with set_text")]
    NotText { path: Path, found: &'static str },
    /// A list index past the end.
    #[error("index {index} is out of range at {path} (length {len})")]
    OutOfRange {
        path: Path,
        index: usize,
        len: usize,
    },
}

/// The text encoding used for text indexes: Unicode code points, on every platform.
pub const TEXT_ENCODING: TextEncoding = TextEncoding::UnicodeCodePoint;

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a document body: valid JSON whose root is an object.
pub fn parse_object(text: &str) -> Result<Map<String, Value>, JsonError> {
    let value: Value = serde_json::from_str(text).map_err(|e| JsonError::Syntax(e.to_string()))?;
    into_object(value)
}

/// Checks that a value is an object and unwraps it.
pub fn into_object(value: Value) -> Result<Map<String, Value>, JsonError> {
    match value {
        Value::Object(map) => Ok(map),
        other => {
            let kind = kind_of(&other);
            // A refused value may be nested arbitrarily deep: drop it without recursion.
            crate::limits::drop_value(other);
            Err(JsonError::NotAnObject(kind))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON -> Automerge

fn scalar_of(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Number(n) => number_scalar(n),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn number_scalar(n: &Number) -> ScalarValue {
    if let Some(i) = n.as_i64() {
        ScalarValue::Int(i)
    } else if let Some(u) = n.as_u64() {
        ScalarValue::Uint(u)
    } else {
        // serde_json (without arbitrary_precision) always has an f64 here.
        ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn to_hydrate(value: &Value) -> hydrate::Value {
    match value {
        Value::Array(items) => {
            hydrate::Value::List(items.iter().map(to_hydrate).collect::<Vec<_>>().into())
        }
        Value::Object(map) => hydrate::Value::Map(hydrate_map(map)),
        scalar => hydrate::Value::Scalar(scalar_of(scalar).unwrap_or(ScalarValue::Null)),
    }
}

fn hydrate_map(map: &Map<String, Value>) -> hydrate::Map {
    map.iter()
        .map(|(k, v)| (k.clone(), to_hydrate(v)))
        .collect::<HashMap<String, hydrate::Value>>()
        .into()
}

/// Writes `body` as the root of an empty document (one batch operation, deterministic order).
pub fn create_root<T: Transactable>(
    tx: &mut T,
    body: &Map<String, Value>,
) -> Result<(), automerge::AutomergeError> {
    tx.init_root_from_hydrate(&hydrate_map(body))
}

/// Operations per change when [`create_document`] writes a large body.
///
/// Writing a body in one change holds the whole body three times over: the JSON value, its
/// `hydrate` tree (~290 bytes per value) and Automerge's pending transaction (~300 bytes per
/// operation until the commit). For 11 MB of record-shaped JSON (950,000 operations) that was
/// 90 + 270 + 320 MB; the committed document is 33 MB. Changes of at most this many operations
/// keep the last two to ~30 MB whatever the body's size.
pub const CREATE_CHANGE_OPS: usize = 50_000;

/// Writes `body` into the empty document `doc` and commits it (each commit with `options()`),
/// consuming the body as it goes.
///
/// A body of at most [`CREATE_CHANGE_OPS`] operations (or one without a list of more) is one
/// change made by one batch operation, as [`create_root`] makes it; an empty body is one empty
/// change, so that the document has heads. A larger body is written in several changes:
/// every list of more than `CREATE_CHANGE_OPS` operations is first written empty, then filled
/// with `splice`s (Automerge's batch insertion) of at most about that many operations, one
/// change each. Maps are written whole with their parent (Automerge has no batch insertion
/// into an existing map), so a map of very many keys is still one change. The document has
/// one head either way (the changes follow each other) and the same content.
///
/// Recursive, like [`create_root`]: only for values within [`Limits`] (depth).
pub fn create_document(
    doc: &mut Automerge,
    body: Map<String, Value>,
    options: impl Fn() -> CommitOptions,
) -> Result<(), automerge::AutomergeError> {
    create_in_changes(doc, body, options, CREATE_CHANGE_OPS)
}

/// [`create_document`] with changes of about `budget` operations.
fn create_in_changes(
    doc: &mut Automerge,
    body: Map<String, Value>,
    options: impl Fn() -> CommitOptions,
    budget: usize,
) -> Result<(), automerge::AutomergeError> {
    let mut deferred = Vec::new();
    let root = split_map(body, budget, &mut Vec::new(), &mut deferred);
    let mut tx = doc.transaction();
    tx.init_root_from_hydrate(&root)?;
    drop(root);
    if tx.pending_ops() == 0 {
        tx.rollback();
        doc.empty_commit(options());
    } else {
        tx.commit_with(options());
    }
    // Lists still to fill: their object, the next index, the items not written yet.
    let mut stack: Vec<(ObjId, usize, std::vec::IntoIter<Value>)> = Vec::new();
    push_deferred(doc, &ROOT, deferred, &mut stack)?;
    while let Some((list, start, mut items)) = stack.pop() {
        let mut group = Vec::new();
        let mut group_ops = 0;
        let mut deferred = Vec::new();
        while let Some(item) = items.as_slice().first() {
            let ops = ops_of(item, budget);
            if !group.is_empty() && group_ops + ops > budget {
                break;
            }
            group_ops += ops;
            let Some(item) = items.next() else { break };
            let mut path = vec![Prop::Seq(start + group.len())];
            group.push(split_value(item, budget, &mut path, &mut deferred));
        }
        if group.is_empty() {
            continue;
        }
        let next = start + group.len();
        let mut tx = doc.transaction();
        tx.splice(&list, start, 0, group)?;
        tx.commit_with(options());
        // The rest of this list after the lists this change created empty.
        stack.push((list.clone(), next, items));
        push_deferred(doc, &list, deferred, &mut stack)?;
    }
    Ok(())
}

/// A list of more operations than a change may hold, written empty: where it is below the
/// object the change wrote into, and its items.
struct Deferred {
    path: Vec<Prop>,
    items: Vec<Value>,
}

/// Puts the lists set aside by a change on the stack, the first on top.
fn push_deferred(
    doc: &Automerge,
    under: &ObjId,
    deferred: Vec<Deferred>,
    stack: &mut Vec<(ObjId, usize, std::vec::IntoIter<Value>)>,
) -> Result<(), automerge::AutomergeError> {
    for Deferred { path, items } in deferred.into_iter().rev() {
        let mut obj = under.clone();
        for prop in path {
            obj = match doc.get(&obj, prop)? {
                Some((automerge::Value::Object(_), id)) => id,
                _ => return Err(automerge::AutomergeError::NotAnObject),
            };
        }
        stack.push((obj, 0, items.into_iter()));
    }
    Ok(())
}

/// The operations a value becomes (one per scalar and per object), counted up to just past
/// `cap`.
fn ops_of(value: &Value, cap: usize) -> usize {
    let mut stack = vec![value];
    let mut ops = 0;
    while let Some(value) = stack.pop() {
        ops += 1;
        if ops > cap {
            break;
        }
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    ops
}

/// [`to_hydrate`], consuming the value: a list of more than `budget` operations becomes an
/// empty list and is set aside in `deferred`, with its path (`path`, then its own place).
fn split_value(
    value: Value,
    budget: usize,
    path: &mut Vec<Prop>,
    deferred: &mut Vec<Deferred>,
) -> hydrate::Value {
    if ops_of(&value, budget) <= budget {
        // Within the limits: serde_json's recursive drop is fine here.
        return to_hydrate(&value);
    }
    match value {
        Value::Array(items) => {
            deferred.push(Deferred {
                path: path.clone(),
                items,
            });
            hydrate::Value::List(Vec::<hydrate::Value>::new().into())
        }
        Value::Object(map) => hydrate::Value::Map(split_map(map, budget, path, deferred)),
        scalar => to_hydrate(&scalar),
    }
}

fn split_map(
    map: Map<String, Value>,
    budget: usize,
    path: &mut Vec<Prop>,
    deferred: &mut Vec<Deferred>,
) -> hydrate::Map {
    map.into_iter()
        .map(|(k, v)| {
            path.push(Prop::Map(k.clone()));
            let value = split_value(v, budget, path, deferred);
            path.pop();
            (k, value)
        })
        .collect::<HashMap<String, hydrate::Value>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// Automerge -> JSON

/// The document's JSON body, now or as of `heads` (which the caller has checked exist).
///
/// Recursive (Automerge's `hydrate`, then serde_json's serialization and drop of the result):
/// only for documents known to be within [`Limits`] — a document nested thousands of levels
/// deep overflows the stack here. Use [`body`] or [`materialize_checked`] on anything else.
pub fn materialize<D: ReadDoc>(doc: &D, heads: Option<&[ChangeHash]>) -> Value {
    match doc.hydrate(&ROOT, heads) {
        Ok(root) => from_hydrate(&root),
        // Only fails for an unknown object; the root always exists.
        Err(_) => Value::Object(Map::new()),
    }
}

/// [`materialize`] for any document: the body within `limits` (depth, JSON size), or which
/// limit it exceeds. Built from [`body`], so safe at any depth.
pub fn materialize_checked<D: ReadDoc>(
    doc: &D,
    heads: Option<&[ChangeHash]>,
    limits: &Limits,
) -> Result<Value, LimitError> {
    let text = body(doc, heads, limits)?;
    // The text is JSON written by serde_json, nested at most `max_depth` levels: it parses
    // (unless `max_depth` is set above serde_json's recursion limit of 128).
    serde_json::from_str(&text).map_err(|_| LimitError::Depth(limits.max_depth.min(127)))
}

/// The document's JSON body as text, now or as of `heads`: the same text as
/// `materialize(doc, heads).to_string()`, written straight from the document with an explicit
/// stack (no recursion, no intermediate `Value`), stopping with an error as soon as it is
/// nested deeper than `limits.max_depth` or longer than `limits.max_json_bytes`. Its length is
/// bounded by the limit, its time by the document's size.
pub fn body<D: ReadDoc>(
    doc: &D,
    heads: Option<&[ChangeHash]>,
    limits: &Limits,
) -> Result<String, LimitError> {
    enum Frame<'a> {
        Map(automerge::iter::MapRange<'a>),
        List(automerge::iter::ListRange<'a>),
    }
    let map_range = |obj: &ObjId| match heads {
        Some(heads) => doc.map_range_at(obj.clone(), .., heads),
        None => doc.map_range(obj.clone(), ..),
    };
    let list_range = |obj: &ObjId| match heads {
        Some(heads) => doc.list_range_at(obj.clone(), .., heads),
        None => doc.list_range(obj.clone(), ..),
    };
    if limits.max_depth == 0 {
        return Err(LimitError::Depth(0));
    }
    let mut out: Vec<u8> = Vec::new();
    out.push(b'{');
    let mut stack = vec![Frame::Map(map_range(&ROOT))];
    // Whether the innermost open object or array has no member written yet.
    let mut first = true;
    while let Some(frame) = stack.last_mut() {
        let (value, id) = match frame {
            Frame::Map(range) => match range.next() {
                Some(item) => {
                    if !first {
                        out.push(b',');
                    }
                    write_json(&mut out, &*item.key);
                    out.push(b':');
                    let id =
                        matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                    (item.value, id)
                }
                None => {
                    out.push(b'}');
                    stack.pop();
                    first = false;
                    continue;
                }
            },
            Frame::List(range) => match range.next() {
                Some(item) => {
                    if !first {
                        out.push(b',');
                    }
                    let id =
                        matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                    (item.value, id)
                }
                None => {
                    out.push(b']');
                    stack.pop();
                    first = false;
                    continue;
                }
            },
        };
        first = false;
        match (value, id) {
            (automerge::ValueRef::Object(ObjType::Text), Some(id)) => {
                let text = match heads {
                    Some(heads) => doc.text_at(&id, heads),
                    None => doc.text(&id),
                };
                write_json(&mut out, text.unwrap_or_default().as_str());
            }
            (automerge::ValueRef::Object(t), Some(id)) => {
                if stack.len() >= limits.max_depth {
                    return Err(LimitError::Depth(limits.max_depth));
                }
                if t == ObjType::List {
                    out.push(b'[');
                    stack.push(Frame::List(list_range(&id)));
                } else {
                    out.push(b'{');
                    stack.push(Frame::Map(map_range(&id)));
                }
                first = true;
            }
            (automerge::ValueRef::Object(_), None) => out.extend_from_slice(b"null"),
            (automerge::ValueRef::Scalar(s), _) => write_scalar(&mut out, &s),
        }
        if out.len() > limits.max_json_bytes {
            return Err(LimitError::JsonBytes(limits.max_json_bytes));
        }
    }
    if out.len() > limits.max_json_bytes {
        return Err(LimitError::JsonBytes(limits.max_json_bytes));
    }
    // serde_json writes valid UTF-8, and so does everything else here.
    String::from_utf8(out).map_err(|_| LimitError::Malformed("invalid UTF-8 in a string"))
}

/// A string, number or boolean in serde_json's text form.
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing these into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// The JSON text of a scalar, as [`scalar_to_json`] then serde_json would write it.
fn write_scalar(out: &mut Vec<u8>, s: &automerge::ScalarValueRef<'_>) {
    use automerge::ScalarValueRef as S;
    match s {
        S::Str(s) => write_json(out, &**s),
        S::Int(i) | S::Counter(i) | S::Timestamp(i) => write_json(out, i),
        S::Uint(u) => write_json(out, u),
        S::F64(f) => match Number::from_f64(*f) {
            Some(n) => write_json(out, &n),
            None => out.extend_from_slice(b"null"),
        },
        S::Boolean(b) => write_json(out, b),
        S::Bytes(bytes) => write_json(out, &**bytes),
        S::Null | S::Unknown { .. } => out.extend_from_slice(b"null"),
    }
}

fn from_hydrate(value: &hydrate::Value) -> Value {
    match value {
        hydrate::Value::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), from_hydrate(&v.value)))
                .collect(),
        ),
        hydrate::Value::List(list) => {
            Value::Array(list.iter().map(|item| from_hydrate(&item.value)).collect())
        }
        hydrate::Value::Text(text) => Value::String(text.to_string()),
        hydrate::Value::Scalar(s) => scalar_to_json(s),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) => Value::from(*i),
        ScalarValue::Uint(u) => Value::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        ScalarValue::Counter(c) => Value::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Value::from(*t),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Bytes(bytes) => Value::Array(bytes.iter().map(|b| Value::from(*b)).collect()),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
    }
}

// ---------------------------------------------------------------------------------------------
// Paths

/// One step of a [`Path`]: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathSeg {
    /// A map key (also accepted as a list index when it is a decimal number or `-`).
    Key(String),
    /// A list index.
    Index(usize),
}

/// A location inside a document, from the root.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Path(pub Vec<PathSeg>);

impl Path {
    /// The root of the document.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Parses a JSON Pointer (RFC 6901), e.g. `/todos/0/title`. The empty string is the root.
    pub fn from_pointer(pointer: &str) -> Result<Self, JsonError> {
        if pointer.is_empty() {
            return Ok(Self::root());
        }
        let Some(rest) = pointer.strip_prefix('/') else {
            return Err(JsonError::InvalidPath {
                path: pointer.to_owned(),
                reason: "a JSON Pointer starts with '/'".into(),
            });
        };
        Ok(Self(
            rest.split('/')
                .map(|token| PathSeg::Key(token.replace("~1", "/").replace("~0", "~")))
                .collect(),
        ))
    }

    /// Reads a path given as a JSON array of keys (strings) and indexes (numbers).
    pub fn from_json(value: &Value) -> Result<Self, JsonError> {
        let invalid = |reason: &str| JsonError::InvalidPath {
            path: value.to_string(),
            reason: reason.to_owned(),
        };
        let Value::Array(items) = value else {
            return Err(invalid("expected an array of keys and indexes"));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(PathSeg::Key(s.clone())),
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .map(PathSeg::Index)
                    .ok_or_else(|| invalid("indexes must be non-negative integers")),
                _ => Err(invalid("path elements must be strings or numbers")),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn prefix(&self, len: usize) -> Path {
        Path(self.0[..len].to_vec())
    }
}

impl fmt::Display for Path {
    /// JSON Pointer form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the root");
        }
        for seg in &self.0 {
            match seg {
                PathSeg::Key(k) => write!(f, "/{}", k.replace('~', "~0").replace('/', "~1"))?,
                PathSeg::Index(i) => write!(f, "/{i}")?,
            }
        }
        Ok(())
    }
}

impl<S: Into<String>> FromIterator<S> for Path {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Self(iter.into_iter().map(|s| PathSeg::Key(s.into())).collect())
    }
}

/// Where a path ends: the containing object and the property inside it.
struct Slot {
    obj: ObjId,
    obj_type: ObjType,
    prop: Prop,
    /// For lists: whether the index is one past the end (an append).
    append: bool,
}

fn type_name(t: ObjType) -> &'static str {
    match t {
        ObjType::Map | ObjType::Table => "an object",
        ObjType::List => "an array",
        ObjType::Text => "text",
    }
}

fn prop_for<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    obj_type: ObjType,
    seg: &PathSeg,
    path: &Path,
    depth: usize,
) -> Result<(Prop, bool), JsonError> {
    match obj_type {
        ObjType::Map | ObjType::Table => match seg {
            PathSeg::Key(k) => Ok((Prop::Map(k.clone()), false)),
            PathSeg::Index(i) => Ok((Prop::Map(i.to_string()), false)),
        },
        ObjType::List | ObjType::Text => {
            let len = doc.length(obj);
            let index = match seg {
                PathSeg::Index(i) => *i,
                PathSeg::Key(k) if k == "-" => len,
                PathSeg::Key(k) => k.parse::<usize>().map_err(|_| JsonError::InvalidPath {
                    path: path.to_string(),
                    reason: format!(
                        "{:?} is not an index into the array at {}",
                        k,
                        path.prefix(depth)
                    ),
                })?,
            };
            if index > len {
                return Err(JsonError::OutOfRange {
                    path: path.prefix(depth + 1),
                    index,
                    len,
                });
            }
            Ok((Prop::Seq(index), index == len))
        }
    }
}

/// Walks to the object that contains the last segment of `path`.
fn resolve<D: ReadDoc>(doc: &D, path: &Path) -> Result<Slot, JsonError> {
    let Some((last, parents)) = path.0.split_last() else {
        return Err(JsonError::InvalidPath {
            path: path.to_string(),
            reason: "the root itself cannot be replaced".into(),
        });
    };
    let mut obj = ROOT;
    let mut obj_type = ObjType::Map;
    for (depth, seg) in parents.iter().enumerate() {
        let (prop, append) = prop_for(doc, &obj, obj_type, seg, path, depth)?;
        if append {
            return Err(JsonError::PathNotFound(path.prefix(depth + 1)));
        }
        match doc.get(&obj, prop) {
            Ok(Some((automerge::Value::Object(t), id))) => {
                obj = id;
                obj_type = t;
            }
            Ok(Some((automerge::Value::Scalar(_), _))) | Ok(None) | Err(_) => {
                return Err(JsonError::PathNotFound(path.prefix(depth + 1)));
            }
        }
    }
    let (prop, append) = prop_for(doc, &obj, obj_type, last, path, parents.len())?;
    if obj_type == ObjType::Text {
        return Err(JsonError::NotText {
            path: path.prefix(parents.len()),
            found: "text (use splice)",
        });
    }
    Ok(Slot {
        obj,
        obj_type,
        prop,
        append,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Makes the value at `prop` of `obj` equal to `value` with as few operations as possible:
/// nothing when it is already equal, a character diff for text, element updates for arrays,
/// key updates for objects. Returns whether anything was written.
fn assign<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
    insert: bool,
) -> Result<(), automerge::AutomergeError> {
    if insert {
        return insert_value(tx, obj, prop, value);
    }
    let current = tx.get(obj, prop.clone())?;
    match (value, current) {
        (
            Value::Object(map),
            Some((automerge::Value::Object(ObjType::Map | ObjType::Table), child)),
        ) => {
            let stale: Vec<String> = tx.keys(&child).filter(|k| !map.contains_key(k)).collect();
            for key in stale {
                tx.delete(&child, key.as_str())?;
            }
            for (key, v) in map {
                assign(tx, &child, Prop::Map(key.clone()), v, false)?;
            }
            Ok(())
        }
        (Value::Array(items), Some((automerge::Value::Object(ObjType::List), child))) => {
            let len = tx.length(&child);
            for (i, item) in items.iter().enumerate() {
                assign(tx, &child, Prop::Seq(i), item, i >= len)?;
            }
            for i in (items.len()..len).rev() {
                tx.delete(&child, Prop::Seq(i))?;
            }
            Ok(())
        }
        (Value::String(s), Some((automerge::Value::Object(ObjType::Text), child))) => {
            tx.update_text(&child, s)
        }
        (Value::Array(_) | Value::Object(_), _) => {
            tx.batch_create_object(obj, prop, &to_hydrate(value), false)?;
            Ok(())
        }
        (scalar, current) => {
            let new = scalar_of(scalar).unwrap_or(ScalarValue::Null);
            if let Some((automerge::Value::Scalar(old), _)) = &current
                && scalar_eq(old, &new)
            {
                return Ok(());
            }
            tx.put(obj, prop, new)
        }
    }
}

fn scalar_eq(a: &ScalarValue, b: &ScalarValue) -> bool {
    match (a, b) {
        // Bitwise for floats, so that 0.0 and -0.0 stay distinct and NaN never "equals".
        (ScalarValue::F64(x), ScalarValue::F64(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fn insert_value<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), automerge::AutomergeError> {
    let Prop::Seq(index) = prop else {
        return assign(tx, obj, prop, value, false);
    };
    match scalar_of(value) {
        Some(s) => tx.insert(obj, index, s),
        None => tx
            .batch_create_object(obj, Prop::Seq(index), &to_hydrate(value), true)
            .map(|_| ()),
    }
}

/// Applies an RFC 7386 merge patch to the object `obj`.
fn merge_into<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    patch: &Map<String, Value>,
) -> Result<(), automerge::AutomergeError> {
    for (key, value) in patch {
        match value {
            Value::Null => {
                if tx.get(obj, key.as_str())?.is_some() {
                    tx.delete(obj, key.as_str())?;
                }
            }
            Value::Object(sub) => match tx.get(obj, key.as_str())? {
                Some((automerge::Value::Object(ObjType::Map | ObjType::Table), child)) => {
                    merge_into(tx, &child, sub)?
                }
                _ => assign(tx, obj, Prop::Map(key.clone()), &strip_nulls(sub), false)?,
            },
            other => assign(tx, obj, Prop::Map(key.clone()), other, false)?,
        }
    }
    Ok(())
}

/// RFC 7386: a patch object that replaces a non-object target is applied to `{}`, which drops
/// its null members (recursively).
fn strip_nulls(map: &Map<String, Value>) -> Value {
    Value::Object(
        map.iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::Object(sub) => (k.clone(), strip_nulls(sub)),
                other => (k.clone(), other.clone()),
            })
            .collect(),
    )
}

/// Sets each top-level field of the document to the given value, `null` included (stored as
/// null, not removed as a merge patch would).
pub fn set_fields<T: Transactable>(
    tx: &mut T,
    fields: &Map<String, Value>,
) -> Result<(), automerge::AutomergeError> {
    for (key, value) in fields {
        assign(tx, &ROOT, Prop::Map(key.clone()), value, false)?;
    }
    Ok(())
}

/// Applies an RFC 7386 merge patch to the document root.
pub fn merge_patch<T: Transactable>(
    tx: &mut T,
    patch: &Map<String, Value>,
) -> Result<(), automerge::AutomergeError> {
    merge_into(tx, &ROOT, patch)
}

/// Sets the value at `path` (creating the last key, or appending when the index is the length).
pub fn set_at<T: Transactable>(tx: &mut T, path: &Path, value: &Value) -> Result<(), crate::Error> {
    let slot = resolve(tx, path)?;
    assign(
        tx,
        &slot.obj,
        slot.prop,
        value,
        slot.append && slot.obj_type == ObjType::List,
    )?;
    Ok(())
}

/// Deletes the value at `path` (a key of an object or an element of an array).
pub fn delete_at<T: Transactable>(tx: &mut T, path: &Path) -> Result<(), crate::Error> {
    let slot = resolve(tx, path)?;
    if slot.append || tx.get(&slot.obj, slot.prop.clone())?.is_none() {
        return Err(JsonError::PathNotFound(path.clone()).into());
    }
    tx.delete(&slot.obj, slot.prop)?;
    Ok(())
}

/// Makes the value at `path` collaborative text with content `text`. If it already is text, the
/// content is updated with a character diff; otherwise a new text object replaces the value.
pub fn set_text<T: Transactable>(tx: &mut T, path: &Path, text: &str) -> Result<(), crate::Error> {
    let slot = resolve(tx, path)?;
    if !slot.append
        && let Some((automerge::Value::Object(ObjType::Text), existing)) =
            tx.get(&slot.obj, slot.prop.clone())?
    {
        tx.update_text(&existing, text)?;
        return Ok(());
    }
    let value = hydrate::Value::text(TEXT_ENCODING, text);
    let insert = slot.append && slot.obj_type == ObjType::List;
    tx.batch_create_object(&slot.obj, slot.prop, &value, insert)?;
    Ok(())
}

/// Splices collaborative text at `path`: deletes `delete` characters at `index` (Unicode code
/// points) and inserts `insert` there.
pub fn splice_text<T: Transactable>(
    tx: &mut T,
    path: &Path,
    index: usize,
    delete: usize,
    insert: &str,
) -> Result<(), crate::Error> {
    let slot = resolve(tx, path)?;
    let current = if slot.append {
        None
    } else {
        tx.get(&slot.obj, slot.prop)?
    };
    let text = match current {
        Some((automerge::Value::Object(ObjType::Text), text)) => text,
        Some((automerge::Value::Object(t), _)) => {
            return Err(JsonError::NotText {
                path: path.clone(),
                found: type_name(t),
            }
            .into());
        }
        Some((automerge::Value::Scalar(s), _)) => {
            let found = if matches!(s.as_ref(), ScalarValue::Str(_)) {
                "a plain string"
            } else {
                "a scalar"
            };
            return Err(JsonError::NotText {
                path: path.clone(),
                found,
            }
            .into());
        }
        None => return Err(JsonError::PathNotFound(path.clone()).into()),
    };
    let len = tx.length(&text);
    if index > len || delete > len - index {
        return Err(JsonError::OutOfRange {
            path: path.clone(),
            index: index.saturating_add(delete),
            len,
        }
        .into());
    }
    let delete = isize::try_from(delete).unwrap_or(isize::MAX);
    tx.splice_text(&text, index, delete, insert)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;
    use serde_json::json;

    #[test]
    fn a_float_reads_back_from_its_stored_text_bit_for_bit() {
        // A replica stores a document's body as JSON text and `get` parses it back; without
        // serde_json's `float_roundtrip` that parse can be an ulp off, and `get` disagreed with
        // the Automerge document (found by fuzzing:
        // tests/fixtures/fuzz/json_automerge/stored-body-float-drifts).
        for f in [
            9.224674407370955e19,
            5e-324,
            0.1,
            f64::MAX,
            f64::MIN_POSITIVE,
            -123_456_789.123_456_78,
        ] {
            let text = Value::from(f).to_string();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back.as_f64().map(f64::to_bits), Some(f.to_bits()), "{text}");
        }
    }

    fn doc_of(value: Value) -> AutoCommit {
        let mut doc = AutoCommit::new();
        create_root(&mut doc, &into_object(value).unwrap()).unwrap();
        doc
    }

    #[test]
    fn round_trips_every_json_kind() {
        let body = json!({
            "s": "héllo 🌍", "i": -3, "big": u64::MAX, "f": 1.5, "whole_float": 2.0, "t": true,
            "n": null, "empty": {}, "list": [1, "two", [3.0], {"four": 4}], "nested": {"a": {"b": []}}
        });
        let doc = doc_of(body.clone());
        let back = materialize(&doc, None);
        assert_eq!(back, body);
        // floats stay floats and ints stay ints in text form
        let text = serde_json::to_string(&back).unwrap();
        assert!(text.contains("\"whole_float\":2.0"), "{text}");
        assert!(text.contains("\"i\":-3"), "{text}");
    }

    /// A document made by `create_in_changes` with changes of about `budget` operations: its
    /// body, its number of changes and of heads.
    fn created_in_changes(body: &Value, budget: usize) -> (String, usize, usize) {
        let mut doc = Automerge::new();
        let map = into_object(body.clone()).unwrap();
        create_in_changes(&mut doc, map, CommitOptions::default, budget).unwrap();
        let text = super::body(&doc, None, &Limits::DEFAULT).unwrap();
        (text, doc.get_changes(&[]).len(), doc.get_heads().len())
    }

    #[test]
    fn a_large_body_is_written_in_several_changes_with_the_same_content() {
        let body = json!({
            "small": 1, "empty": [], "m": {},
            "big": (0..40).map(|i| json!({"i": i, "tags": ["a", "b"]})).collect::<Vec<_>>(),
            "nested": {"inner": {"list": (0..30).collect::<Vec<_>>(), "x": "y"}},
            "lists": [(0..25).collect::<Vec<_>>(), [], [[(0..12).collect::<Vec<_>>()], 2], {"l": (0..11).collect::<Vec<_>>()}],
            "text": "héllo", "f": 1.5, "n": null, "t": true
        });
        let expected = serde_json::to_string(&body).unwrap();
        // Within the budget: one change, as `create_root` makes it.
        let (text, changes, heads) = created_in_changes(&body, 10_000);
        assert_eq!((text.as_str(), changes, heads), (expected.as_str(), 1, 1));
        let mut single = Automerge::new();
        let mut tx = single.transaction();
        create_root(&mut tx, &into_object(body.clone()).unwrap()).unwrap();
        tx.commit();
        assert_eq!(single.stats().num_ops, {
            let mut doc = Automerge::new();
            create_document(
                &mut doc,
                into_object(body.clone()).unwrap(),
                CommitOptions::default,
            )
            .unwrap();
            doc.stats().num_ops
        });
        // Beyond it: every list longer than the budget in changes of its own, same content.
        for budget in [1, 2, 3, 5, 10, 20, 50] {
            let (text, changes, heads) = created_in_changes(&body, budget);
            assert_eq!(text, expected, "budget {budget}");
            assert!(changes > 1, "budget {budget}: {changes} changes");
            assert_eq!(heads, 1, "budget {budget}");
        }
        // An empty body is one empty change.
        assert_eq!(created_in_changes(&json!({}), 1), ("{}".to_owned(), 1, 1));
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = doc_of(json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": 1}));
        merge_patch(
            &mut doc,
            &into_object(json!({"a": "z", "c": {"f": null}, "new": {"x": null, "y": 1}})).unwrap(),
        )
        .unwrap();
        assert_eq!(
            materialize(&doc, None),
            json!({"a": "z", "c": {"d": "e"}, "keep": 1, "new": {"y": 1}})
        );
    }

    #[test]
    fn unchanged_patch_makes_no_change() {
        let mut doc = doc_of(json!({"a": 1, "b": [1, 2], "c": {"d": 1.5}}));
        let before = doc.get_heads();
        merge_patch(
            &mut doc,
            &into_object(json!({"a": 1, "b": [1, 2], "c": {"d": 1.5}})).unwrap(),
        )
        .unwrap();
        assert_eq!(doc.get_heads(), before);
        assert_eq!(doc.pending_ops(), 0);
    }

    #[test]
    fn int_to_float_is_a_change() {
        let mut doc = doc_of(json!({"a": 1}));
        merge_patch(&mut doc, &into_object(json!({"a": 1.0})).unwrap()).unwrap();
        assert_eq!(
            serde_json::to_string(&materialize(&doc, None)).unwrap(),
            r#"{"a":1.0}"#
        );
    }

    #[test]
    fn paths_set_delete_and_append() {
        let mut doc = doc_of(json!({"list": [1, 2], "m": {}}));
        set_at(&mut doc, &Path::from_pointer("/list/-").unwrap(), &json!(3)).unwrap();
        set_at(
            &mut doc,
            &Path::from_pointer("/list/0").unwrap(),
            &json!("one"),
        )
        .unwrap();
        set_at(
            &mut doc,
            &Path::from_pointer("/m/k~1x").unwrap(),
            &json!({"deep": true}),
        )
        .unwrap();
        delete_at(&mut doc, &Path::from_pointer("/list/1").unwrap()).unwrap();
        assert_eq!(
            materialize(&doc, None),
            json!({"list": ["one", 3], "m": {"k/x": {"deep": true}}})
        );
        assert!(matches!(
            set_at(
                &mut doc,
                &Path::from_pointer("/missing/x").unwrap(),
                &json!(1)
            ),
            Err(crate::Error::Json(JsonError::PathNotFound(_)))
        ));
        assert!(matches!(
            set_at(&mut doc, &Path::from_pointer("/list/9").unwrap(), &json!(1)),
            Err(crate::Error::Json(JsonError::OutOfRange { .. }))
        ));
        assert!(delete_at(&mut doc, &Path::from_pointer("/nope").unwrap()).is_err());
    }

    #[test]
    fn text_is_opt_in_and_survives_patches() {
        let mut doc = doc_of(json!({"title": "plain"}));
        let title = Path::from_pointer("/title").unwrap();
        let err = splice_text(&mut doc, &title, 0, 0, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain string"), "{err}");
        set_text(&mut doc, &title, "hello world").unwrap();
        splice_text(&mut doc, &title, 5, 6, ", weft").unwrap();
        assert_eq!(materialize(&doc, None), json!({"title": "hello, weft"}));
        merge_patch(
            &mut doc,
            &into_object(json!({"title": "hello, weft!"})).unwrap(),
        )
        .unwrap();
        let (value, _) = doc.get(ROOT, "title").unwrap().unwrap();
        assert!(matches!(value, automerge::Value::Object(ObjType::Text)));
        assert!(splice_text(&mut doc, &title, 99, 0, "x").is_err());
    }

    #[test]
    fn non_objects_are_rejected() {
        for bad in ["[1]", "3", "\"s\"", "null", "true"] {
            assert!(
                matches!(parse_object(bad), Err(JsonError::NotAnObject(_))),
                "{bad}"
            );
        }
        assert!(matches!(parse_object("{\"a\":"), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn pointer_parsing() {
        assert_eq!(Path::from_pointer("").unwrap(), Path::root());
        assert!(Path::from_pointer("a/b").is_err());
        let p = Path::from_pointer("/a~0b/c~1d").unwrap();
        assert_eq!(
            p.0,
            vec![PathSeg::Key("a~b".into()), PathSeg::Key("c/d".into())]
        );
        assert_eq!(p.to_string(), "/a~0b/c~1d");
        assert_eq!(
            Path::from_json(&json!(["a", 1])).unwrap().0,
            vec![PathSeg::Key("a".into()), PathSeg::Index(1)]
        );
        assert!(Path::from_json(&json!(["a", -1])).is_err());
    }
    fn body_of<D: ReadDoc>(doc: &D, heads: Option<&[ChangeHash]>) -> String {
        body(doc, heads, &Limits::DEFAULT).unwrap()
    }

    #[test]
    fn body_is_the_materialized_json_text() {
        let mut doc = doc_of(json!({
            "s": "héllo \"quoted\" \n 🌍", "i": -3, "big": u64::MAX, "f": 1.5, "whole_float": 2.0,
            "tiny": 1e-300, "huge": 1.5e300, "t": true, "n": null, "empty": {}, "empty_list": [],
            "list": [1, "two", [3.0, []], {"four": 4}], "nested": {"a": {"b": [null]}},
            "B": 1, "a": 2, "é": 3, "ab": 4, "a\u{0}": 5, "": 6, "😀": 7, "\u{ff}": 8
        }));
        set_text(
            &mut doc,
            &Path::from_pointer("/text").unwrap(),
            "colla\"borative",
        )
        .unwrap();
        let before = doc.get_heads();
        doc.put(ROOT, "counter", ScalarValue::counter(5)).unwrap();
        doc.increment(ROOT, "counter", 3).unwrap();
        doc.put(ROOT, "ts", ScalarValue::Timestamp(1_700_000_000_000))
            .unwrap();
        doc.put(ROOT, "bytes", ScalarValue::Bytes(vec![0, 7, 255]))
            .unwrap();
        doc.put(ROOT, "nan", ScalarValue::F64(f64::NAN)).unwrap();
        doc.put(ROOT, "neg_zero", ScalarValue::F64(-0.0)).unwrap();
        // A conflict: two actors set the same key concurrently; one value wins in both forms.
        let mut other = doc.fork();
        other.put(ROOT, "i", "theirs").unwrap();
        doc.put(ROOT, "i", "ours").unwrap();
        doc.merge(&mut other).unwrap();
        assert_eq!(body_of(&doc, None), materialize(&doc, None).to_string());
        assert_eq!(
            body_of(&doc, Some(&before)),
            materialize(&doc, Some(&before)).to_string()
        );
        assert_eq!(
            materialize_checked(&doc, None, &Limits::DEFAULT).unwrap(),
            materialize(&doc, None)
        );
        // Through a transaction too (the engine checks edits before committing them).
        let mut plain = automerge::Automerge::load(&doc.save()).unwrap();
        let mut tx = plain.transaction();
        tx.put(ROOT, "pending", 1).unwrap();
        let pending = body(&tx, None, &Limits::DEFAULT).unwrap();
        assert!(pending.contains("\"pending\":1"), "{pending}");
        tx.rollback();
    }

    /// A document whose root holds `depth - 1` nested maps (`depth` levels with the root).
    fn deep_doc(depth: usize) -> AutoCommit {
        let mut doc = AutoCommit::new();
        let mut obj = ROOT;
        for _ in 1..depth {
            obj = doc.put_object(&obj, "a", ObjType::Map).unwrap();
        }
        doc
    }

    #[test]
    fn body_depth_at_the_limit_passes_one_more_fails() {
        let limits = Limits::DEFAULT;
        let at = deep_doc(100);
        assert_eq!(
            body(&at, None, &limits).unwrap(),
            materialize(&at, None).to_string()
        );
        assert_eq!(
            body(&deep_doc(101), None, &limits),
            Err(LimitError::Depth(100))
        );
        // Lists count like maps; text is a string, not a level.
        let mut doc = AutoCommit::new();
        let mut obj = doc.put_object(ROOT, "l", ObjType::List).unwrap();
        for _ in 2..100 {
            obj = doc.insert_object(&obj, 0, ObjType::List).unwrap();
        }
        let text = doc.insert_object(&obj, 0, ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "leaf").unwrap();
        assert!(body(&doc, None, &limits).unwrap().contains("[[\"leaf\"]]"));
        doc.insert_object(&obj, 0, ObjType::Map).unwrap();
        assert_eq!(body(&doc, None, &limits), Err(LimitError::Depth(100)));
        assert!(matches!(
            materialize_checked(&doc, None, &limits),
            Err(LimitError::Depth(100))
        ));
    }

    #[test]
    fn body_of_a_100000_deep_document_fails_on_a_small_stack() {
        let doc = deep_doc(100_000).save();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let doc = automerge::Automerge::load(&doc).unwrap();
                assert_eq!(
                    body(&doc, None, &Limits::DEFAULT),
                    Err(LimitError::Depth(100))
                );
                let unlimited = Limits {
                    max_depth: usize::MAX,
                    ..Limits::DEFAULT
                };
                let text = body(&doc, None, &unlimited).unwrap();
                // `{"a":` and `}` for each of the 99,999 maps, `{}` innermost.
                assert_eq!(text.len(), 99_999 * 6 + 2);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn body_size_at_the_limit_passes_one_more_fails() {
        let doc = doc_of(json!({"s": "x".repeat(100), "l": [1, 2, 3]}));
        let text = materialize(&doc, None).to_string();
        let at = Limits {
            max_json_bytes: text.len(),
            ..Limits::DEFAULT
        };
        assert_eq!(body(&doc, None, &at).unwrap(), text);
        let under = Limits {
            max_json_bytes: text.len() - 1,
            ..Limits::DEFAULT
        };
        assert_eq!(
            body(&doc, None, &under),
            Err(LimitError::JsonBytes(text.len() - 1))
        );
    }
}
