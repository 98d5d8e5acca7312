//! Queries over the materialized JSON of documents.
//!
//! A [`Filter`] is data. `store/sqlite.rs` compiles it to SQL over SQLite's JSON1 functions with
//! every path and value bound as a parameter; [`Filter::matches`] evaluates the same semantics in
//! memory (for stores without SQL, and to cross-check the SQL in tests).
//!
//! Semantics: a comparison needs the path to exist; `Eq`/`Ne` compare JSON values (numbers
//! numerically, so `1 == 1.0`); `Lt`/`Le`/`Gt`/`Ge` compare two numbers, or two strings by
//! their UTF-8 bytes, and are false for any other pair of kinds.

use std::cmp::Ordering;

use serde_json::Value;

use crate::error::Error;

/// One step into a JSON value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSeg {
    Key(String),
    Index(usize),
}

/// A path into a document body, written `a.b[2].c` (keys with other characters: `"a b".c`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath(pub Vec<FieldSeg>);

impl FieldPath {
    /// Parses `a.b[2]."odd key"`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Filter(format!("bad field path {text:?}: {why}"));
        let mut segs = Vec::new();
        let mut chars = text.chars().peekable();
        let mut expect_key = true;
        while let Some(&c) = chars.peek() {
            match c {
                '[' => {
                    chars.next();
                    let digits: String =
                        std::iter::from_fn(|| chars.next_if(|c| c.is_ascii_digit())).collect();
                    if chars.next() != Some(']') || digits.is_empty() {
                        return Err(bad("expected [number]"));
                    }
                    segs.push(FieldSeg::Index(
                        digits.parse().map_err(|_| bad("index too large"))?,
                    ));
                    expect_key = false;
                }
                '.' if !expect_key => {
                    chars.next();
                    expect_key = true;
                }
                '"' if expect_key => {
                    chars.next();
                    let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '"')).collect();
                    if chars.next() != Some('"') {
                        return Err(bad("unterminated quoted key"));
                    }
                    segs.push(FieldSeg::Key(key));
                    expect_key = false;
                }
                _ if expect_key => {
                    let key: String = std::iter::from_fn(|| {
                        chars
                            .next_if(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == '$')
                    })
                    .collect();
                    if key.is_empty() {
                        return Err(bad(&format!("unexpected {c:?}")));
                    }
                    segs.push(FieldSeg::Key(key));
                    expect_key = false;
                }
                _ => return Err(bad(&format!("unexpected {c:?}"))),
            }
        }
        if segs.is_empty() || expect_key {
            return Err(bad("empty or ends with '.'"));
        }
        Ok(Self(segs))
    }

    /// Follows the path in a JSON value.
    pub fn lookup<'v>(&self, mut value: &'v Value) -> Option<&'v Value> {
        for seg in &self.0 {
            value = match (seg, value) {
                (FieldSeg::Key(k), Value::Object(map)) => map.get(k)?,
                (FieldSeg::Index(i), Value::Array(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(value)
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator's text form.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A condition on a document body.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// Compare the value at a path with a JSON value.
    Cmp(FieldPath, CmpOp, Value),
    /// The path exists (its value may be null).
    Exists(FieldPath),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// `path = value`.
    pub fn eq(path: &str, value: impl Into<Value>) -> Result<Self, Error> {
        Ok(Filter::Cmp(
            FieldPath::parse(path)?,
            CmpOp::Eq,
            value.into(),
        ))
    }

    /// Parses one condition: `PATH OP JSON` (e.g. `done = false`, `size >= 3`,
    /// `owner.name = "ann"`) or `PATH exists`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if let Some(path) = text.strip_suffix(" exists") {
            return Ok(Filter::Exists(FieldPath::parse(path.trim())?));
        }
        let ops = [
            ("!=", CmpOp::Ne),
            ("<=", CmpOp::Le),
            (">=", CmpOp::Ge),
            ("=", CmpOp::Eq),
            ("<", CmpOp::Lt),
            (">", CmpOp::Gt),
        ];
        let (at, len, op) = ops
            .iter()
            .filter_map(|(s, op)| text.find(s).map(|at| (at, s.len(), *op)))
            .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)))
            .ok_or_else(|| {
                Error::Filter(format!(
                    "{text:?}: expected PATH OP VALUE with OP one of = != < <= > >=, or PATH exists"
                ))
            })?;
        // `==`, `=>`, `<>`, `!==`...: a run of operator characters that is not one operator.
        let run: String = text[at..]
            .chars()
            .take_while(|c| matches!(c, '=' | '!' | '<' | '>'))
            .collect();
        if run.len() != len {
            return Err(Error::Filter(format!(
                "{text:?}: {run} is not an operator; use one of = != < <= > >= \
                 (e.g. `done = false`), or PATH exists"
            )));
        }
        let path = FieldPath::parse(text[..at].trim())?;
        let raw = text[at + len..].trim();
        let value: Value = serde_json::from_str(raw).map_err(|e| {
            Error::Filter(format!(
                "{raw:?} is not a JSON value ({e}); quote strings: \"text\""
            ))
        })?;
        let filter = Filter::Cmp(path, op, value);
        filter.validate()?;
        Ok(filter)
    }

    /// Rejects comparisons that can never be true (ordering of booleans, null, objects, arrays).
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Filter::Cmp(_, op, value)
                if !matches!(op, CmpOp::Eq | CmpOp::Ne)
                    && !matches!(value, Value::Number(_) | Value::String(_)) =>
            {
                Err(Error::Filter(format!(
                    "{} compares only numbers or strings",
                    op.as_str()
                )))
            }
            Filter::And(fs) | Filter::Or(fs) => fs.iter().try_for_each(Filter::validate),
            Filter::Not(f) => f.validate(),
            _ => Ok(()),
        }
    }

    /// Evaluates the filter on a body.
    pub fn matches(&self, body: &Value) -> bool {
        match self {
            Filter::Exists(path) => path.lookup(body).is_some(),
            Filter::Cmp(path, op, want) => match path.lookup(body) {
                None => false,
                Some(have) => match op {
                    CmpOp::Eq => json_eq(have, want),
                    CmpOp::Ne => !json_eq(have, want),
                    CmpOp::Lt => order(have, want) == Some(Ordering::Less),
                    CmpOp::Le => {
                        matches!(order(have, want), Some(Ordering::Less | Ordering::Equal))
                    }
                    CmpOp::Gt => order(have, want) == Some(Ordering::Greater),
                    CmpOp::Ge => {
                        matches!(order(have, want), Some(Ordering::Greater | Ordering::Equal))
                    }
                },
            },
            Filter::And(fs) => fs.iter().all(|f| f.matches(body)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(body)),
            Filter::Not(f) => !f.matches(body),
        }
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => order(a, b) == Some(Ordering::Equal),
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            // An i64 against a float is compared exactly, as SQLite does (no rounding of the
            // integer to f64, which would make 2^63 - 1 equal 2^63).
            (Some(x), None) => cmp_i64_f64(x, y.as_f64()?),
            (None, Some(y)) => cmp_i64_f64(y, x.as_f64()?).map(Ordering::reverse),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

/// Exact comparison of an integer with a float.
fn cmp_i64_f64(i: i64, f: f64) -> Option<Ordering> {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return None;
    }
    if f >= TWO_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_63 {
        return Some(Ordering::Greater);
    }
    // -2^63 <= f < 2^63: its integer part fits an i64 exactly.
    let whole = f.trunc();
    Some(i.cmp(&(whole as i64)).then(0.0.partial_cmp(&(f - whole))?))
}

/// Which documents to list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Query {
    /// Only this collection (all collections when `None`).
    pub collection: Option<String>,
    /// Only bodies matching this filter.
    pub filter: Option<Filter>,
    /// At most this many, in creation order.
    pub limit: Option<usize>,
}

impl Query {
    /// Every live document of a collection.
    pub fn collection(name: impl Into<String>) -> Self {
        Self {
            collection: Some(name.into()),
            ..Self::default()
        }
    }

    /// Adds a condition (ANDed with any existing one).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(match self.filter.take() {
            None => filter,
            Some(Filter::And(mut fs)) => {
                fs.push(filter);
                Filter::And(fs)
            }
            Some(f) => Filter::And(vec![f, filter]),
        });
        self
    }

    /// Limits the number of results.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_paths() {
        let p = FieldPath::parse(r#"a.b[2]."odd key".c"#).unwrap();
        assert_eq!(p.0.len(), 5);
        for bad in ["", "a.", ".a", "a[x]", "a..b", "a[1", "\"open"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_evaluates_conditions() {
        let body = json!({"done": false, "n": 3, "f": 2.5, "name": "ann", "tags": ["x"], "o": {"k": null}});
        let yes = [
            "done = false",
            "n >= 3",
            "n = 3.0",
            "f < 3",
            "name > \"al\"",
            "tags[0] = \"x\"",
            "o.k exists",
            "o.k = null",
            "n != 4",
            "tags = [\"x\"]",
        ];
        let no = [
            "done = true",
            "n > 3",
            "name < \"a\"",
            "missing = 1",
            "missing != 1",
            "tags[1] exists",
            "n = \"3\"",
        ];
        for f in yes {
            assert!(Filter::parse(f).unwrap().matches(&body), "{f}");
        }
        for f in no {
            assert!(!Filter::parse(f).unwrap().matches(&body), "{f}");
        }
        assert!(Filter::parse("done < true").is_err());
        assert!(Filter::parse("n = abc").is_err());
        assert!(Filter::parse("no operator").is_err());
    }
}
