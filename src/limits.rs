//! Bounds on document structure: how deep, how many operations, how large.
//!
//! Documents come from outside — peers over the relay, bundle files, callers of the local API —
//! and the work done on them grows with their structure: Automerge loads and merges per
//! operation, materializing walks every value, serde_json serializes and drops values
//! recursively. Unbounded, a document nested 100,000 maps deep overflowed the stack (aborting
//! the relay, every session with it), and a list of 10 million nulls — 186 bytes of Automerge
//! data — cost 8 s and 0.9 GB to load and 30 s and 6.5 GB to materialize (ARCHITECTURE.md has
//! the measurements). [`Limits`] bounds all of it. Every check runs before the work it protects,
//! stops at the first excess, and uses no recursion, so it is safe on any input:
//!
//! * [`Limits::check_automerge`] / [`Limits::check_sync_message`]: before Automerge sees the
//!   bytes, count operations and changes from the chunks' column headers and run-length
//!   encoding (no operation is decoded), and cap what compressed columns inflate to;
//! * [`Limits::check_history`]: after applying, the document's operation count (O(1));
//! * [`crate::json::body`]: depth and JSON size, while writing the body;
//! * [`Limits::check_value`]: a JSON value from the local API, before it is converted.

use std::fmt;
use std::io::Read;

use automerge::ReadDoc;
use serde_json::Value;

/// How large and how deep a document may be. Refusals are [`LimitError`]s naming the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Nesting depth of objects and arrays, the root object counting as 1. Stored bodies are
    /// read back with serde_json, whose recursion limit is 128.
    pub max_depth: usize,
    /// Operations in a document's history, each change counting as one more; likewise the
    /// references between them (deletions and overwrites, dependencies). Checked on received
    /// bytes before loading them, and on the document after a change.
    pub max_ops: u64,
    /// Size of the materialized JSON body, in bytes.
    pub max_json_bytes: usize,
    /// What the compressed (DEFLATE) parts of one payload of Automerge data — a document or a
    /// sync message — may inflate to, in bytes.
    pub max_inflated_bytes: u64,
}

impl Limits {
    /// The defaults (see ARCHITECTURE.md for why these numbers).
    pub const DEFAULT: Limits = Limits {
        max_depth: 100,
        max_ops: 4_000_000,
        max_json_bytes: 64 << 20,
        max_inflated_bytes: 256 << 20,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A document outside the [`Limits`], or Automerge data that cannot be counted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitError {
    /// Objects and arrays nested deeper than this.
    Depth(usize),
    /// More operations (or references between them) than this.
    Ops(u64),
    /// A JSON body larger than this many bytes.
    JsonBytes(usize),
    /// Compressed Automerge data that inflates to more than this many bytes.
    Inflated(u64),
    /// Bytes that are not Automerge chunks the counter can read (Automerge would refuse them
    /// too, or they are a chunk kind weft never sends).
    Malformed(&'static str),
}

impl LimitError {
    /// The message without its subject, e.g. "is nested deeper than 100 levels (limit:
    /// max_depth)": `Display` says "document ...", [`crate::Error::Limit`] "document ID ...".
    pub fn phrase(&self) -> String {
        match self {
            LimitError::Depth(n) => format!("is nested deeper than {n} levels (limit: max_depth)"),
            LimitError::Ops(n) => format!("has more than {n} operations (limit: max_ops)"),
            LimitError::JsonBytes(n) => {
                format!("is larger than {n} bytes as JSON (limit: max_json_bytes)")
            }
            LimitError::Inflated(n) => format!(
                "decompresses to more than {n} bytes of Automerge data (limit: max_inflated_bytes)"
            ),
            LimitError::Malformed(what) => format!("is not valid Automerge data: {what}"),
        }
    }
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.phrase())
    }
}

impl std::error::Error for LimitError {}

/// What Automerge data holds, counted from its chunks without decoding operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Operations (rows of the operation columns).
    pub ops: u64,
    /// Changes.
    pub changes: u64,
    /// References: successors of operations (deletions, overwrites) in documents, predecessors
    /// in changes, dependencies between changes.
    pub refs: u64,
    /// Bytes inflated from compressed columns and chunks.
    pub inflated_bytes: u64,
}

impl Limits {
    /// Checks a JSON value from the local API (a body, a patch, a value to set) before any work
    /// is done on it: nesting depth, and its number of values against `max_ops` (each value
    /// becomes at least one operation). Iterative: safe on a value of any depth.
    pub fn check_value<'v>(&self, value: &'v Value) -> Result<(), LimitError> {
        let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
        let mut values: u64 = 0;
        while let Some((value, depth)) = stack.pop() {
            values += 1;
            let mut visit = |child: &'v Value| {
                if child.is_array() || child.is_object() {
                    stack.push((child, depth + 1));
                } else {
                    values += 1;
                }
            };
            match value {
                Value::Array(items) if depth <= self.max_depth => items.iter().for_each(&mut visit),
                Value::Object(map) if depth <= self.max_depth => map.values().for_each(&mut visit),
                Value::Array(_) | Value::Object(_) => {
                    return Err(LimitError::Depth(self.max_depth));
                }
                _ => {}
            }
            if values > self.max_ops {
                return Err(LimitError::Ops(self.max_ops));
            }
        }
        Ok(())
    }

    /// Checks a loaded document's history against `max_ops`: operations plus changes, O(1).
    pub fn check_history<D: ReadDoc>(&self, doc: &D) -> Result<(), LimitError> {
        let stats = doc.stats();
        if stats.num_ops.saturating_add(stats.num_changes) > self.max_ops {
            return Err(LimitError::Ops(self.max_ops));
        }
        Ok(())
    }

    /// Counts the operations and changes in Automerge bytes (any sequence of document, change
    /// and compressed change chunks, as `Automerge::load` and `load_incremental` take) before
    /// Automerge loads them, and refuses them beyond `max_ops` or `max_inflated_bytes`.
    ///
    /// Reads only chunk headers and column metadata, plus the run-length encoding of the
    /// column that holds one row per operation (a run of a million identical operations is a
    /// few bytes, and is counted in one step); compressed columns are inflated as a stream,
    /// without being kept. Cost: linear in the bytes, at most `max_inflated_bytes` more.
    pub fn check_automerge(&self, bytes: &[u8]) -> Result<Usage, LimitError> {
        let mut usage = Usage::default();
        self.count_chunks(bytes, &mut usage)?;
        Ok(usage)
    }

    /// [`check_automerge`](Self::check_automerge) for the changes a sync message carries, all
    /// its chunks together.
    pub fn check_sync_message(
        &self,
        message: &automerge::sync::Message,
    ) -> Result<Usage, LimitError> {
        let mut usage = Usage::default();
        for chunk in message.changes.iter() {
            self.count_chunks(chunk, &mut usage)?;
        }
        Ok(usage)
    }

    fn count_chunks(&self, bytes: &[u8], usage: &mut Usage) -> Result<(), LimitError> {
        let mut input = Slice::new(bytes);
        while !input.at_end() {
            if input.take(4)? != MAGIC {
                return Err(LimitError::Malformed("bad magic bytes"));
            }
            input.take(4)?; // checksum
            let kind = input.byte()?;
            let len = uleb(&mut input)?;
            let body = input.take(len)?;
            match kind {
                CHUNK_DOCUMENT => self.document(body, usage)?,
                CHUNK_CHANGE => self.change(&mut Slice::new(body), usage)?,
                CHUNK_COMPRESSED_CHANGE => {
                    let budget = self.inflate_budget(usage);
                    let mut inflater = Inflater::new(body, budget, self.max_inflated_bytes);
                    let counted = self.change(&mut inflater, usage);
                    usage.inflated_bytes += inflater.total;
                    counted?;
                }
                CHUNK_BUNDLE => {
                    return Err(LimitError::Malformed(
                        "Automerge bundle chunks are not accepted",
                    ));
                }
                _ => return Err(LimitError::Malformed("unknown chunk type")),
            }
        }
        Ok(())
    }

    fn inflate_budget(&self, usage: &Usage) -> u64 {
        self.max_inflated_bytes.saturating_sub(usage.inflated_bytes)
    }

    fn ops_budget(&self, usage: &Usage) -> u64 {
        self.max_ops
            .saturating_sub(usage.ops.saturating_add(usage.changes))
    }

    fn check_usage(&self, usage: &Usage) -> Result<(), LimitError> {
        if usage.ops.saturating_add(usage.changes) > self.max_ops || usage.refs > self.max_ops {
            return Err(LimitError::Ops(self.max_ops));
        }
        Ok(())
    }

    /// A document chunk: actors, heads, the change and operation column metadata, then the
    /// columns, each of which may be compressed.
    fn document(&self, body: &[u8], usage: &mut Usage) -> Result<(), LimitError> {
        let mut input = Slice::new(body);
        let actors = uleb(&mut input)?;
        for _ in 0..actors {
            let len = uleb(&mut input)?;
            input.take(len)?;
        }
        let heads = uleb(&mut input)?;
        input.take(heads.checked_mul(32).ok_or(TRUNCATED)?)?;
        let change_columns = columns(&mut input)?;
        let op_columns = columns(&mut input)?;
        for (columns, rows_spec, refs_spec, is_ops) in [
            (&change_columns, DOC_CHANGE_ACTOR, DOC_DEPS_GROUP, false),
            (&op_columns, DOC_OP_ID_ACTOR, DOC_SUCC_GROUP, true),
        ] {
            for &(spec, len) in columns {
                let data = input.take(len)?;
                let spec_plain = spec & !DEFLATE;
                if spec & DEFLATE != 0 {
                    let budget = self.inflate_budget(usage);
                    let mut inflater = Inflater::new(data, budget, self.max_inflated_bytes);
                    let counted = self.column(
                        &mut inflater,
                        spec_plain,
                        rows_spec,
                        refs_spec,
                        is_ops,
                        usage,
                    );
                    usage.inflated_bytes += inflater.total;
                    counted?;
                } else {
                    let mut plain = Slice::new(data);
                    self.column(&mut plain, spec_plain, rows_spec, refs_spec, is_ops, usage)?;
                }
            }
        }
        // What follows (the heads' indexes) is not counted.
        Ok(())
    }

    /// A change chunk's body, read as a stream (it may come out of an inflater).
    fn change(&self, input: &mut dyn Source, usage: &mut Usage) -> Result<(), LimitError> {
        let deps = uleb(input)?;
        skip(input, deps.checked_mul(32).ok_or(TRUNCATED)?)?;
        let actor = uleb(input)?;
        skip(input, actor)?;
        uleb(input)?; // seq
        uleb(input)?; // start op
        sleb(input)?.ok_or(TRUNCATED)?; // time
        let message = uleb(input)?;
        skip(input, message)?;
        let others = uleb(input)?;
        for _ in 0..others {
            let len = uleb(input)?;
            skip(input, len)?;
        }
        let columns = columns(input)?;
        usage.changes += 1;
        self.check_usage(usage)?;
        for (spec, len) in columns {
            if spec & DEFLATE != 0 {
                // Automerge refuses these too ("change contained compressed columns").
                return Err(LimitError::Malformed("compressed column in a change chunk"));
            }
            let mut column = Take {
                inner: &mut *input,
                left: len,
            };
            self.column(
                &mut column,
                spec,
                CHANGE_ACTION,
                CHANGE_PRED_GROUP,
                true,
                usage,
            )?;
        }
        // Extra bytes after the columns: read (they count towards what inflated), not counted.
        drain(input)
    }

    /// One column: rows of `rows_spec` count as operations (or changes), the values of the
    /// group column `refs_spec` as references; any other column is only read to its end.
    #[allow(clippy::too_many_arguments)]
    fn column(
        &self,
        source: &mut dyn Source,
        spec: u32,
        rows_spec: u32,
        refs_spec: u32,
        is_ops: bool,
        usage: &mut Usage,
    ) -> Result<(), LimitError> {
        if spec == rows_spec {
            let (rows, _) = count_runs(source, self.ops_budget(usage), u64::MAX)?;
            if is_ops {
                usage.ops = usage.ops.saturating_add(rows);
            } else {
                usage.changes = usage.changes.saturating_add(rows);
            }
        } else if spec == refs_spec {
            let budget = self.max_ops.saturating_sub(usage.refs);
            let (_, sum) = count_runs(source, u64::MAX, budget)?;
            usage.refs = usage.refs.saturating_add(sum);
        }
        self.check_usage(usage)?;
        drain(source)
    }
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;
/// Column specifications: `id << 4 | deflate << 3 | type`; types: 0 group, 1 actor, 2 integer.
const DEFLATE: u32 = 0b1000;
const DOC_CHANGE_ACTOR: u32 = 0x01;
const DOC_DEPS_GROUP: u32 = 0x40;
const DOC_OP_ID_ACTOR: u32 = 0x21;
const DOC_SUCC_GROUP: u32 = 0x80;
const CHANGE_ACTION: u32 = 0x42;
const CHANGE_PRED_GROUP: u32 = 0x70;
/// More columns than any Automerge version writes (16 operation columns, 9 change columns);
/// bounds the metadata kept while counting.
const MAX_COLUMNS: u64 = 256;
const TRUNCATED: LimitError = LimitError::Malformed("truncated");

/// Column metadata: a count, then (specification, length) pairs.
fn columns(input: &mut dyn Source) -> Result<Vec<(u32, u64)>, LimitError> {
    let count = uleb(input)?;
    if count > MAX_COLUMNS {
        return Err(LimitError::Malformed("too many columns"));
    }
    let mut columns = Vec::new();
    for _ in 0..count {
        let spec = u32::try_from(uleb(input)?)
            .map_err(|_| LimitError::Malformed("bad column specification"))?;
        let len = uleb(input)?;
        columns.push((spec, len));
    }
    Ok(columns)
}

/// Counts the rows of a run-length encoded column of unsigned integers, and the sum of its
/// values. Runs are a signed count: `n > 0` repeats the one value that follows `n` times,
/// `n < 0` is followed by `-n` literal values, `0` by the length of a run of nulls. Stops early
/// (returning the count so far, past the budget) once the rows pass `max_rows` or the sum
/// passes `max_sum`.
fn count_runs(
    source: &mut dyn Source,
    max_rows: u64,
    max_sum: u64,
) -> Result<(u64, u64), LimitError> {
    let (mut rows, mut sum) = (0u64, 0u64);
    while let Some(count) = sleb(source)? {
        if count > 0 {
            let count = count.unsigned_abs();
            let value = uleb(source)?;
            rows = rows.saturating_add(count);
            sum = sum.saturating_add(count.saturating_mul(value));
        } else if count < 0 {
            let count = count.unsigned_abs();
            rows = rows.saturating_add(count);
            if rows > max_rows {
                break;
            }
            for _ in 0..count {
                sum = sum.saturating_add(uleb(source)?);
                if sum > max_sum {
                    break;
                }
            }
        } else {
            rows = rows.saturating_add(uleb(source)?);
        }
        if rows > max_rows || sum > max_sum {
            break;
        }
    }
    Ok((rows, sum))
}

/// A stream of bytes: a slice, part of one, or what a compressed slice inflates to.
trait Source {
    /// The next byte, or `None` at the end.
    fn next_byte(&mut self) -> Result<Option<u8>, LimitError>;

    /// Skips up to `n` bytes; returns how many there were.
    fn skip(&mut self, n: u64) -> Result<u64, LimitError> {
        let mut skipped = 0;
        while skipped < n && self.next_byte()?.is_some() {
            skipped += 1;
        }
        Ok(skipped)
    }
}

fn skip(source: &mut dyn Source, n: u64) -> Result<(), LimitError> {
    if source.skip(n)? == n {
        Ok(())
    } else {
        Err(TRUNCATED)
    }
}

fn drain(source: &mut dyn Source) -> Result<(), LimitError> {
    while source.skip(u64::MAX)? == u64::MAX {}
    Ok(())
}

/// An unsigned LEB128 number.
fn uleb(source: &mut dyn Source) -> Result<u64, LimitError> {
    let mut value: u64 = 0;
    let mut shift = 0;
    loop {
        let byte = source.next_byte()?.ok_or(TRUNCATED)?;
        if shift == 63 && byte > 1 || shift > 63 {
            return Err(LimitError::Malformed("number too large"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// A signed LEB128 number, or `None` at the end of the stream.
fn sleb(source: &mut dyn Source) -> Result<Option<i64>, LimitError> {
    let Some(mut byte) = source.next_byte()? else {
        return Ok(None);
    };
    let mut value: i64 = 0;
    let mut shift = 0;
    loop {
        if shift > 63 {
            return Err(LimitError::Malformed("number too large"));
        }
        value |= i64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            if shift < 64 && byte & 0x40 != 0 {
                value |= -1i64 << shift;
            }
            return Ok(Some(value));
        }
        byte = source.next_byte()?.ok_or(TRUNCATED)?;
    }
}

struct Slice<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Slice<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn byte(&mut self) -> Result<u8, LimitError> {
        self.next_byte()?.ok_or(TRUNCATED)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], LimitError> {
        let left = self.data.len() - self.pos;
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= left)
            .ok_or(TRUNCATED)?;
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
}

impl Source for Slice<'_> {
    fn next_byte(&mut self) -> Result<Option<u8>, LimitError> {
        let byte = self.data.get(self.pos).copied();
        self.pos += usize::from(byte.is_some());
        Ok(byte)
    }

    fn skip(&mut self, n: u64) -> Result<u64, LimitError> {
        let left = self.data.len() - self.pos;
        let n = usize::try_from(n).map_or(left, |n| n.min(left));
        self.pos += n;
        Ok(n as u64)
    }
}

/// At most `left` bytes of another source (one column of a change read as a stream).
struct Take<'s> {
    inner: &'s mut dyn Source,
    left: u64,
}

impl Source for Take<'_> {
    fn next_byte(&mut self) -> Result<Option<u8>, LimitError> {
        if self.left == 0 {
            return Ok(None);
        }
        let byte = self.inner.next_byte()?.ok_or(TRUNCATED)?;
        self.left -= 1;
        Ok(Some(byte))
    }

    fn skip(&mut self, n: u64) -> Result<u64, LimitError> {
        let n = n.min(self.left);
        let skipped = self.inner.skip(n)?;
        if skipped < n {
            return Err(TRUNCATED);
        }
        self.left -= n;
        Ok(n)
    }
}

/// What DEFLATE data inflates to, streamed through a small buffer; fails once more than
/// `budget` bytes came out. `total` is how many did.
struct Inflater<'a> {
    decoder: flate2::bufread::DeflateDecoder<&'a [u8]>,
    buffer: Vec<u8>,
    pos: usize,
    len: usize,
    total: u64,
    budget: u64,
    /// The configured limit, for the error message.
    limit: u64,
}

impl<'a> Inflater<'a> {
    fn new(data: &'a [u8], budget: u64, limit: u64) -> Self {
        Self {
            decoder: flate2::bufread::DeflateDecoder::new(data),
            buffer: vec![0; 32 * 1024],
            pos: 0,
            len: 0,
            total: 0,
            budget,
            limit,
        }
    }

    /// Refills the buffer; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, LimitError> {
        let n = self
            .decoder
            .read(&mut self.buffer)
            .map_err(|_| LimitError::Malformed("bad compressed data"))?;
        self.total += n as u64;
        if self.total > self.budget {
            return Err(LimitError::Inflated(self.limit));
        }
        self.pos = 0;
        self.len = n;
        Ok(n > 0)
    }
}

impl Source for Inflater<'_> {
    fn next_byte(&mut self) -> Result<Option<u8>, LimitError> {
        if self.pos == self.len && !self.fill()? {
            return Ok(None);
        }
        let byte = self.buffer[self.pos];
        self.pos += 1;
        Ok(Some(byte))
    }

    fn skip(&mut self, n: u64) -> Result<u64, LimitError> {
        let mut skipped = 0u64;
        while skipped < n {
            if self.pos == self.len && !self.fill()? {
                break;
            }
            let step = ((self.len - self.pos) as u64).min(n - skipped);
            self.pos += step as usize;
            skipped += step;
        }
        Ok(skipped)
    }
}

/// Drops a JSON value without recursion: serde_json's `Drop` recurses once per level, so a
/// deeply nested value refused by [`Limits::check_value`] would overflow the stack when the
/// refusal drops it.
pub fn drop_value(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ObjType, ROOT, ScalarValue};
    use serde_json::json;

    /// `{"a": {"a": ... {}}}` with `depth` objects, built without recursion.
    fn nested(depth: usize) -> Value {
        let mut value = json!({});
        for _ in 1..depth {
            let mut map = serde_json::Map::new();
            map.insert("a".into(), value);
            value = Value::Object(map);
        }
        value
    }

    fn small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    fn with_ops(max_ops: u64) -> Limits {
        Limits {
            max_ops,
            ..Limits::DEFAULT
        }
    }

    #[test]
    fn value_depth_at_the_limit_passes_one_more_fails() {
        let limits = Limits::DEFAULT;
        assert_eq!(limits.check_value(&nested(100)), Ok(()));
        assert_eq!(
            limits.check_value(&nested(101)),
            Err(LimitError::Depth(100))
        );
        let mut list = json!([]);
        for _ in 1..100 {
            list = json!([1, list, {"k": null}]);
        }
        assert_eq!(limits.check_value(&list), Ok(()));
        assert_eq!(
            limits.check_value(&json!({ "wrap": list })),
            Err(LimitError::Depth(100))
        );
        // Scalars do not add a level.
        assert_eq!(limits.check_value(&json!({"a": {"b": 1}})), Ok(()));
        let two = Limits {
            max_depth: 2,
            ..Limits::DEFAULT
        };
        assert_eq!(two.check_value(&json!({"a": {"b": 1}})), Ok(()));
        assert_eq!(
            two.check_value(&json!({"a": {"b": []}})),
            Err(LimitError::Depth(2))
        );
    }

    #[test]
    fn value_count_at_the_limit_passes_one_more_fails() {
        // The object, its list, and 8 numbers: 10 values.
        let value = json!({"list": [1, 2, 3, 4, 5, 6, 7, 8]});
        assert_eq!(with_ops(10).check_value(&value), Ok(()));
        assert_eq!(with_ops(9).check_value(&value), Err(LimitError::Ops(9)));
    }

    #[test]
    fn a_100000_deep_value_is_refused_and_dropped_on_a_small_stack() {
        small_stack(|| {
            let value = nested(100_000);
            assert_eq!(
                Limits::DEFAULT.check_value(&value),
                Err(LimitError::Depth(100))
            );
            drop_value(value);
            drop_value(Value::Array(vec![nested(100_000), nested(100_000)]));
        });
    }

    #[test]
    fn messages_name_the_limit() {
        assert_eq!(
            LimitError::Depth(100).to_string(),
            "document is nested deeper than 100 levels (limit: max_depth)"
        );
        assert_eq!(
            LimitError::Ops(4_000_000).to_string(),
            "document has more than 4000000 operations (limit: max_ops)"
        );
        assert!(
            LimitError::JsonBytes(1)
                .to_string()
                .contains("max_json_bytes")
        );
        assert!(
            LimitError::Inflated(1)
                .to_string()
                .contains("max_inflated_bytes")
        );
    }

    /// A document with a bit of everything: maps, a list with deletions, overwrites, text,
    /// several changes.
    fn sample() -> Automerge {
        let mut doc = Automerge::new();
        doc.transact(|tx| {
            let list = tx.put_object(ROOT, "list", ObjType::List)?;
            for i in 0..50 {
                tx.insert(&list, i, i as i64)?;
            }
            let text = tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.splice_text(&text, 0, 0, "hello world")?;
            tx.put(ROOT, "x", 1)
        })
        .unwrap();
        for i in 0..10 {
            doc.transact(|tx| {
                tx.put(ROOT, "x", i)?;
                let (_, list) = tx.get(ROOT, "list")?.unwrap();
                tx.delete(&list, 0)
            })
            .unwrap();
        }
        doc
    }

    fn stats_usage(doc: &Automerge) -> (u64, u64) {
        let stats = doc.stats();
        (stats.num_ops, stats.num_changes)
    }

    #[test]
    fn counts_match_what_automerge_loads() {
        let doc = sample();
        let (ops, changes) = stats_usage(&doc);
        // A document chunk.
        let usage = Limits::DEFAULT.check_automerge(&doc.save()).unwrap();
        assert_eq!((usage.ops, usage.changes), (ops, changes));
        assert!(usage.refs > 0, "deletions and overwrites are references");
        // The same as change chunks (what `save_after` and storage's incremental chunks are).
        let usage = Limits::DEFAULT
            .check_automerge(&doc.save_after(&[]))
            .unwrap();
        assert_eq!(usage.changes, changes);
        let change_ops: u64 = doc.get_changes(&[]).iter().map(|c| c.len() as u64).sum();
        assert_eq!(usage.ops, change_ops);
        // A document followed by changes, as a stored document with incremental chunks.
        let first = doc.get_changes(&[])[0].hash();
        let mut stored = doc.fork_at(&[first]).unwrap().save();
        stored.extend(doc.save_after(&[first]));
        let loaded = Automerge::load(&stored).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
        let usage = Limits::DEFAULT.check_automerge(&stored).unwrap();
        assert_eq!(usage.changes, changes);
    }

    #[test]
    fn compressed_columns_and_chunks_are_counted_and_capped() {
        // Long enough for `save` to deflate columns, and for a change to compress.
        let mut doc = Automerge::new();
        doc.transact(|tx| {
            let list = tx.put_object(ROOT, "l", ObjType::List)?;
            for i in 0..2000 {
                tx.insert(&list, i, ScalarValue::Str(format!("item {i}").into()))?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
        let (ops, changes) = stats_usage(&doc);
        let saved = doc.save();
        let usage = Limits::DEFAULT.check_automerge(&saved).unwrap();
        assert_eq!((usage.ops, usage.changes), (ops, changes));
        assert!(usage.inflated_bytes > 0, "some column was compressed");
        let exact = Limits {
            max_inflated_bytes: usage.inflated_bytes,
            ..Limits::DEFAULT
        };
        assert_eq!(exact.check_automerge(&saved), Ok(usage));
        let under = Limits {
            max_inflated_bytes: usage.inflated_bytes - 1,
            ..Limits::DEFAULT
        };
        assert_eq!(
            under.check_automerge(&saved),
            Err(LimitError::Inflated(usage.inflated_bytes - 1))
        );

        let mut change = doc.get_changes(&[]).remove(0);
        let compressed = change.bytes().into_owned();
        assert_eq!(compressed[8], CHUNK_COMPRESSED_CHANGE);
        let loaded = Automerge::load(&compressed).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
        let usage = Limits::DEFAULT.check_automerge(&compressed).unwrap();
        assert_eq!((usage.ops, usage.changes), (ops, 1));
        assert!(usage.inflated_bytes > compressed.len() as u64);
        let under = Limits {
            max_inflated_bytes: usage.inflated_bytes - 1,
            ..Limits::DEFAULT
        };
        assert!(matches!(
            under.check_automerge(&compressed),
            Err(LimitError::Inflated(_))
        ));
    }

    #[test]
    fn operations_at_the_limit_pass_one_more_fails() {
        let doc = sample();
        let (ops, changes) = stats_usage(&doc);
        for bytes in [doc.save(), doc.save_after(&[])] {
            let total = {
                let u = Limits::DEFAULT.check_automerge(&bytes).unwrap();
                u.ops + u.changes
            };
            assert!(with_ops(total).check_automerge(&bytes).is_ok());
            assert_eq!(
                with_ops(total - 1).check_automerge(&bytes),
                Err(LimitError::Ops(total - 1))
            );
        }
        assert_eq!(with_ops(ops + changes).check_history(&doc), Ok(()));
        assert_eq!(
            with_ops(ops + changes - 1).check_history(&doc),
            Err(LimitError::Ops(ops + changes - 1))
        );
    }

    #[test]
    fn sync_messages_are_counted_over_all_their_chunks() {
        let doc = sample();
        let (ops, changes) = stats_usage(&doc);
        // To a peer that has nothing: the whole document in one message.
        let mut ours = automerge::sync::State::new();
        let mut theirs = automerge::sync::State::new();
        let mut peer = Automerge::new();
        let hello = peer.generate_sync_message(&mut theirs).unwrap();
        let mut sender = doc.clone();
        sender.receive_sync_message(&mut ours, hello).unwrap();
        let message = sender.generate_sync_message(&mut ours).unwrap();
        let usage = Limits::DEFAULT.check_sync_message(&message).unwrap();
        assert_eq!((usage.ops, usage.changes), (ops, changes));
        assert!(
            with_ops(ops + changes - 1)
                .check_sync_message(&message)
                .is_err()
        );
        peer.receive_sync_message(&mut theirs, message).unwrap();
        assert_eq!(peer.get_heads(), doc.get_heads());
        // As separate change chunks.
        let message = automerge::sync::Message {
            heads: doc.get_heads(),
            need: Vec::new(),
            have: Vec::new(),
            changes: doc
                .get_changes(&[])
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect::<Vec<_>>()
                .into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        let usage = Limits::DEFAULT.check_sync_message(&message).unwrap();
        assert_eq!(usage.changes, changes);
        assert!(
            with_ops(usage.ops + changes - 1)
                .check_sync_message(&message)
                .is_err()
        );
    }

    #[test]
    fn malformed_bytes_are_refused_never_a_panic() {
        let bytes = sample().save();
        for len in 1..bytes.len() {
            // A prefix is truncated; whatever the counter says, it must not panic or loop.
            let _ = Limits::DEFAULT.check_automerge(&bytes[..len]);
        }
        assert!(matches!(
            Limits::DEFAULT.check_automerge(&bytes[..bytes.len() - 1]),
            Err(LimitError::Malformed(_))
        ));
        assert!(matches!(
            Limits::DEFAULT.check_automerge(b"not automerge"),
            Err(LimitError::Malformed(_))
        ));
        let mut bundle = bytes.clone();
        bundle[8] = CHUNK_BUNDLE;
        assert_eq!(
            Limits::DEFAULT.check_automerge(&bundle),
            Err(LimitError::Malformed(
                "Automerge bundle chunks are not accepted"
            ))
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut damaged = bytes.clone();
            let at = (state as usize) % damaged.len();
            damaged[at] = (state >> 32) as u8;
            let _ = Limits::DEFAULT.check_automerge(&damaged);
            let noise: Vec<u8> = (0..(state % 64))
                .map(|i| (state >> (i % 57)) as u8)
                .collect();
            let mut chunk = MAGIC.to_vec();
            chunk.extend_from_slice(&noise);
            let _ = Limits::DEFAULT.check_automerge(&chunk);
        }
    }
}
