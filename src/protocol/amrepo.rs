//! automerge-repo's WebSocket protocol, version "1": one CBOR map per binary frame.
//!
//! Decoding is lenient the way automerge-repo's own (cbor-x) decoder is: fields may come in any
//! order, unknown fields and `undefined` values are ignored, numbers may be integers or floats,
//! strings and byte strings may be indefinite-length, a tag is looked through, the peer's
//! metadata may be called `peerMetadata` or `metadata`, and a `documentId` may carry the
//! `automerge:` URL prefix. Every byte string either decodes to an [`Incoming`] or gives a
//! [`WireError`]: never a panic, nothing preallocated from a length the peer claims, at most
//! [`MAX_ITEMS`] values (so memory stays a small multiple of the frame), never unbounded
//! recursion ([`MAX_DEPTH`]).
//!
//! Message types that weft does not act on (`remote-subscription-change`,
//! `remote-heads-changed`, and types of later versions) decode to [`Incoming::Ignored`].

use std::borrow::Cow;
use std::str::FromStr;

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

use crate::id::DocumentId;

/// The one protocol version there is.
pub const PROTOCOL_VERSION: &str = "1";

/// Nesting deeper than this is refused (automerge-repo's messages nest three levels at most:
/// `remote-heads-changed`'s `newHeads`).
pub const MAX_DEPTH: usize = 16;

/// A frame holding more CBOR values than this is refused (automerge-repo's messages hold a few
/// dozen; `remote-heads-changed` a few per storage id it reports).
pub const MAX_ITEMS: usize = 10_000;

/// A frame from an automerge-repo peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The handshake: the client's peer id, the protocol versions it speaks, and its storage id
    /// if it has storage it will come back with (`isEphemeral` false).
    Join {
        sender_id: String,
        versions: Vec<String>,
        storage_id: Option<String>,
        ephemeral: bool,
    },
    /// "Sync this document with me, and tell me if you do not have it."
    Request { doc: DocumentId, data: Vec<u8> },
    /// An Automerge sync message about one document.
    Sync { doc: DocumentId, data: Vec<u8> },
    /// The peer does not have a document we asked about (we never ask; ignored).
    DocUnavailable { doc: DocumentId },
    /// Ephemeral data about one document; `data` is opaque (CBOR in practice). `sender_id`:
    /// who sent it first (automerge-repo clients pass on what they receive, keeping it).
    Ephemeral {
        doc: DocumentId,
        data: Vec<u8>,
        sender_id: Option<String>,
    },
    /// The peer is leaving.
    Leave,
    /// The peer reports an error (and will close).
    Error { message: String },
    /// A message weft does not act on.
    Ignored { kind: String },
}

impl Incoming {
    /// The message's `type`, for logs.
    pub fn kind(&self) -> &str {
        match self {
            Incoming::Join { .. } => "join",
            Incoming::Request { .. } => "request",
            Incoming::Sync { .. } => "sync",
            Incoming::DocUnavailable { .. } => "doc-unavailable",
            Incoming::Ephemeral { .. } => "ephemeral",
            Incoming::Leave => "leave",
            Incoming::Error { .. } => "error",
            Incoming::Ignored { kind } => kind,
        }
    }
}

/// Why a frame does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not CBOR: {0}")]
    NotCbor(String),
    #[error("a message must be a CBOR map with a \"type\"")]
    NotAMessage,
    #[error("CBOR nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {MAX_ITEMS} CBOR values")]
    TooMany,
    #[error("bytes after the message")]
    Trailing,
    #[error("{kind} message without {field:?}")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} message: {field:?} has the wrong type")]
    WrongType {
        kind: &'static str,
        field: &'static str,
    },
    #[error("invalid documentId {0:?}")]
    BadDocumentId(String),
}

/// A decoded CBOR value (only what messages hold).
#[derive(Clone, Debug, PartialEq)]
enum Value<'b> {
    Text(Cow<'b, str>),
    Bytes(Cow<'b, [u8]>),
    Int(i128),
    Float(f64),
    Bool(bool),
    /// `null` and `undefined` alike.
    Null,
    Array(Vec<Value<'b>>),
    Map(Vec<(Value<'b>, Value<'b>)>),
}

impl<'b> Value<'b> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

fn cbor_err(e: minicbor::decode::Error) -> WireError {
    WireError::NotCbor(e.to_string())
}

/// Decodes one value, at most `depth` levels deep, counting it against `budget` values.
fn value<'b>(
    d: &mut Decoder<'b>,
    depth: usize,
    budget: &mut usize,
) -> Result<Value<'b>, WireError> {
    if depth == 0 {
        return Err(WireError::TooDeep);
    }
    *budget = budget.checked_sub(1).ok_or(WireError::TooMany)?;
    let v = match d.datatype().map_err(cbor_err)? {
        Type::Bool => Value::Bool(d.bool().map_err(cbor_err)?),
        Type::Null => {
            d.null().map_err(cbor_err)?;
            Value::Null
        }
        Type::Undefined => {
            d.undefined().map_err(cbor_err)?;
            Value::Null
        }
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
            Value::Int(d.u64().map_err(cbor_err)?.into())
        }
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            Value::Int(d.int().map_err(cbor_err)?.into())
        }
        Type::F16 => Value::Float(f16(d)?),
        Type::F32 => Value::Float(d.f32().map_err(cbor_err)?.into()),
        Type::F64 => Value::Float(d.f64().map_err(cbor_err)?),
        Type::Simple => {
            d.simple().map_err(cbor_err)?;
            Value::Null
        }
        Type::Bytes => Value::Bytes(Cow::Borrowed(d.bytes().map_err(cbor_err)?)),
        Type::BytesIndef => {
            let mut out = Vec::new();
            for chunk in d.bytes_iter().map_err(cbor_err)? {
                out.extend_from_slice(chunk.map_err(cbor_err)?);
            }
            Value::Bytes(Cow::Owned(out))
        }
        Type::String => Value::Text(Cow::Borrowed(d.str().map_err(cbor_err)?)),
        Type::StringIndef => {
            let mut out = String::new();
            for chunk in d.str_iter().map_err(cbor_err)? {
                out.push_str(chunk.map_err(cbor_err)?);
            }
            Value::Text(Cow::Owned(out))
        }
        Type::Array | Type::ArrayIndef => {
            let len = d.array().map_err(cbor_err)?;
            let mut items = Vec::new();
            each(d, len, |d| {
                items.push(value(d, depth - 1, budget)?);
                Ok(())
            })?;
            Value::Array(items)
        }
        Type::Map | Type::MapIndef => {
            let len = d.map().map_err(cbor_err)?;
            let mut entries = Vec::new();
            each(d, len, |d| {
                let k = value(d, depth - 1, budget)?;
                let v = value(d, depth - 1, budget)?;
                entries.push((k, v));
                Ok(())
            })?;
            Value::Map(entries)
        }
        Type::Tag => {
            // Tags (cbor-x's typed arrays, dates) are looked through.
            d.tag().map_err(cbor_err)?;
            value(d, depth - 1, budget)?
        }
        Type::Break | Type::Unknown(_) => {
            return Err(WireError::NotCbor(format!(
                "unexpected byte at {}",
                d.position()
            )));
        }
    };
    Ok(v)
}

/// Calls `f` once per item of an array or map of `len` items (`None`: indefinite, up to the
/// break). A definite length is only a loop bound: each item consumes input, so a claimed
/// length beyond the frame ends in an error, not an allocation.
fn each<'b>(
    d: &mut Decoder<'b>,
    len: Option<u64>,
    mut f: impl FnMut(&mut Decoder<'b>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    match len {
        Some(n) => {
            for _ in 0..n {
                f(d)?;
            }
        }
        None => loop {
            if d.datatype().map_err(cbor_err)? == Type::Break {
                d.skip().map_err(cbor_err)?;
                break;
            }
            f(d)?;
        },
    }
    Ok(())
}

/// A half-precision float (minicbor reads them only with its `half` feature).
fn f16(d: &mut Decoder<'_>) -> Result<f64, WireError> {
    let at = d.position();
    let bytes = d
        .input()
        .get(at + 1..at + 3)
        .ok_or_else(|| WireError::NotCbor("truncated half float".into()))?;
    d.set_position(at + 3);
    let bits = u16::from_be_bytes([bytes[0], bytes[1]]);
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let fraction = f64::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => fraction * 2f64.powi(-24),
        31 if fraction == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + fraction / 1024.0) * 2f64.powi(e - 15),
    };
    Ok(sign * magnitude)
}

/// The fields of a message map, by name.
struct Fields<'b> {
    kind: &'static str,
    entries: Vec<(Value<'b>, Value<'b>)>,
}

impl<'b> Fields<'b> {
    fn get(&self, name: &str) -> Option<&Value<'b>> {
        self.entries
            .iter()
            .find(|(k, v)| k.as_str() == Some(name) && *v != Value::Null)
            .map(|(_, v)| v)
    }

    fn text(&self, field: &'static str) -> Result<String, WireError> {
        match self.get(field) {
            Some(Value::Text(s)) => Ok(s.to_string()),
            Some(_) => Err(self.wrong(field)),
            None => Err(WireError::Missing {
                kind: self.kind,
                field,
            }),
        }
    }

    fn bytes(&self, field: &'static str) -> Result<Vec<u8>, WireError> {
        match self.get(field) {
            Some(Value::Bytes(b)) => Ok(b.to_vec()),
            // An array of byte values (a Uint8Array through a JSON-ish encoder).
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => u8::try_from(*i).map_err(|_| self.wrong(field)),
                    _ => Err(self.wrong(field)),
                })
                .collect(),
            Some(_) => Err(self.wrong(field)),
            None => Err(WireError::Missing {
                kind: self.kind,
                field,
            }),
        }
    }

    fn doc(&self) -> Result<DocumentId, WireError> {
        let text = self.text("documentId")?;
        let bare = text.strip_prefix("automerge:").unwrap_or(&text);
        DocumentId::from_str(bare).map_err(|_| WireError::BadDocumentId(text.clone()))
    }

    fn wrong(&self, field: &'static str) -> WireError {
        WireError::WrongType {
            kind: self.kind,
            field,
        }
    }
}

/// Decodes one frame.
pub fn decode(frame: &[u8]) -> Result<Incoming, WireError> {
    let mut d = Decoder::new(frame);
    let mut budget = MAX_ITEMS;
    let top = value(&mut d, MAX_DEPTH, &mut budget)?;
    if d.position() != frame.len() {
        return Err(WireError::Trailing);
    }
    let Value::Map(entries) = top else {
        return Err(WireError::NotAMessage);
    };
    let kind = entries
        .iter()
        .find(|(k, _)| k.as_str() == Some("type"))
        .and_then(|(_, v)| v.as_str())
        .ok_or(WireError::NotAMessage)?
        .to_owned();
    // The names weft acts on, as 'static strs for the error messages.
    let known: &'static str = match kind.as_str() {
        "join" => "join",
        "request" => "request",
        "sync" => "sync",
        "doc-unavailable" => "doc-unavailable",
        "ephemeral" => "ephemeral",
        "leave" => "leave",
        "error" => "error",
        _ => return Ok(Incoming::Ignored { kind }),
    };
    let f = Fields {
        kind: known,
        entries,
    };
    Ok(match known {
        "join" => {
            let versions = match f.get("supportedProtocolVersions") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                Some(Value::Text(v)) => vec![v.to_string()],
                Some(_) => return Err(f.wrong("supportedProtocolVersions")),
                None => Vec::new(),
            };
            let metadata = f.get("peerMetadata").or_else(|| f.get("metadata"));
            let (storage_id, ephemeral) = match metadata {
                Some(Value::Map(m)) => {
                    let field = |name: &str| {
                        m.iter()
                            .find(|(k, v)| k.as_str() == Some(name) && *v != Value::Null)
                            .map(|(_, v)| v)
                    };
                    let storage = field("storageId")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    // Without the flag, a peer with a storage id keeps it (automerge-repo's
                    // default); without a storage id there is nothing to keep.
                    let ephemeral = match field("isEphemeral") {
                        Some(Value::Bool(b)) => *b,
                        _ => storage.is_none(),
                    };
                    (storage, ephemeral)
                }
                _ => (None, true),
            };
            Incoming::Join {
                sender_id: f.text("senderId")?,
                versions,
                storage_id,
                ephemeral,
            }
        }
        "request" => Incoming::Request {
            doc: f.doc()?,
            data: f.bytes("data")?,
        },
        "sync" => Incoming::Sync {
            doc: f.doc()?,
            data: f.bytes("data")?,
        },
        "doc-unavailable" => Incoming::DocUnavailable { doc: f.doc()? },
        "ephemeral" => Incoming::Ephemeral {
            doc: f.doc()?,
            data: f.bytes("data")?,
            sender_id: f.text("senderId").ok(),
        },
        "leave" => Incoming::Leave,
        _ => Incoming::Error {
            message: f.text("message").unwrap_or_default(),
        },
    })
}

/// A frame to an automerge-repo peer. `sender`: our peer id; `target`: theirs.
#[derive(Clone, Copy, Debug)]
pub enum Outgoing<'a> {
    /// The answer to `join`, with our storage id (the client may keep its sync states with us).
    Peer {
        storage_id: &'a str,
    },
    Sync {
        doc: &'a DocumentId,
        data: &'a [u8],
    },
    DocUnavailable {
        doc: &'a DocumentId,
    },
    Ephemeral {
        doc: &'a DocumentId,
        data: &'a [u8],
        session_id: &'a str,
        count: u64,
    },
    Error {
        message: &'a str,
    },
}

/// Encodes a frame from `sender` to `target`.
pub fn encode(message: &Outgoing<'_>, sender: &str, target: &str) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = write(&mut e, message, sender, target);
    e.into_writer()
}

type EncodeResult = Result<(), minicbor::encode::Error<core::convert::Infallible>>;

fn write(
    e: &mut Encoder<Vec<u8>>,
    message: &Outgoing<'_>,
    sender: &str,
    target: &str,
) -> EncodeResult {
    match message {
        Outgoing::Peer { storage_id } => {
            e.map(5)?;
            e.str("type")?.str("peer")?;
            e.str("senderId")?.str(sender)?;
            e.str("targetId")?.str(target)?;
            e.str("selectedProtocolVersion")?.str(PROTOCOL_VERSION)?;
            e.str("peerMetadata")?.map(2)?;
            e.str("storageId")?.str(storage_id)?;
            e.str("isEphemeral")?.bool(false)?;
        }
        Outgoing::Sync { doc, data } => {
            e.map(5)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.str(sender)?;
            e.str("targetId")?.str(target)?;
            e.str("documentId")?.str(&doc.to_string())?;
            e.str("data")?.bytes(data)?;
        }
        Outgoing::DocUnavailable { doc } => {
            e.map(4)?;
            e.str("type")?.str("doc-unavailable")?;
            e.str("senderId")?.str(sender)?;
            e.str("targetId")?.str(target)?;
            e.str("documentId")?.str(&doc.to_string())?;
        }
        Outgoing::Ephemeral {
            doc,
            data,
            session_id,
            count,
        } => {
            e.map(7)?;
            e.str("type")?.str("ephemeral")?;
            e.str("senderId")?.str(sender)?;
            e.str("targetId")?.str(target)?;
            e.str("count")?.u64(*count)?;
            e.str("sessionId")?.str(session_id)?;
            e.str("documentId")?.str(&doc.to_string())?;
            e.str("data")?.bytes(data)?;
        }
        Outgoing::Error { message } => {
            e.map(4)?;
            e.str("type")?.str("error")?;
            e.str("senderId")?.str(sender)?;
            e.str("targetId")?.str(target)?;
            e.str("message")?.str(message)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> DocumentId {
        DocumentId::from_bytes([7; 16])
    }

    #[test]
    fn what_we_encode_decodes_as_sent() {
        let id = doc();
        let sync = encode(
            &Outgoing::Sync {
                doc: &id,
                data: b"\x42\x01",
            },
            "s",
            "c",
        );
        assert_eq!(
            decode(&sync),
            Ok(Incoming::Sync {
                doc: id,
                data: vec![0x42, 1]
            })
        );
        let eph = Outgoing::Ephemeral {
            doc: &id,
            data: b"\xa0",
            session_id: "x",
            count: 3,
        };
        assert_eq!(
            decode(&encode(&eph, "s", "c")),
            Ok(Incoming::Ephemeral {
                doc: id,
                data: vec![0xa0],
                sender_id: Some("s".into()),
            })
        );
        assert_eq!(
            decode(&encode(&Outgoing::DocUnavailable { doc: &id }, "s", "c")),
            Ok(Incoming::DocUnavailable { doc: id })
        );
        assert_eq!(
            decode(&encode(&Outgoing::Error { message: "no" }, "s", "c")),
            Ok(Incoming::Error {
                message: "no".into()
            })
        );
    }

    /// A join as the JS encoder writes it by hand: metadata under either name, versions as an
    /// array, `undefined` values, a float where an int could be, indefinite-length strings.
    #[test]
    fn join_is_read_leniently() {
        let mut e = Encoder::new(Vec::new());
        e.begin_map().unwrap();
        e.str("type").unwrap().str("join").unwrap();
        e.str("senderId").unwrap();
        e.begin_str()
            .unwrap()
            .str("peer-")
            .unwrap()
            .str("a")
            .unwrap()
            .end()
            .unwrap();
        e.str("supportedProtocolVersions")
            .unwrap()
            .array(1)
            .unwrap()
            .str("1")
            .unwrap();
        e.str("peerMetadata").unwrap().map(2).unwrap();
        e.str("storageId").unwrap().str("store-1").unwrap();
        e.str("isEphemeral").unwrap().bool(false).unwrap();
        e.str("extra").unwrap().undefined().unwrap();
        e.str("n").unwrap().f64(1.0).unwrap();
        e.end().unwrap();
        let bytes = e.into_writer();
        assert_eq!(
            decode(&bytes),
            Ok(Incoming::Join {
                sender_id: "peer-a".into(),
                versions: vec!["1".into()],
                storage_id: Some("store-1".into()),
                ephemeral: false,
            })
        );
    }

    #[test]
    fn unknown_types_are_ignored_and_bad_frames_are_errors() {
        let mut e = Encoder::new(Vec::new());
        e.map(2).unwrap();
        e.str("type").unwrap().str("remote-heads-changed").unwrap();
        e.str("newHeads").unwrap().map(0).unwrap();
        assert_eq!(
            decode(&e.into_writer()),
            Ok(Incoming::Ignored {
                kind: "remote-heads-changed".into()
            })
        );
        assert!(matches!(decode(b""), Err(WireError::NotCbor(_))));
        assert!(matches!(decode(&[0x01]), Err(WireError::NotAMessage)));
        assert!(matches!(decode(&[0xa0, 0x00]), Err(WireError::Trailing)));
        // A map that claims 2^32 entries in a 6-byte frame: an error, no allocation.
        assert!(matches!(
            decode(&[0xba, 0xff, 0xff, 0xff, 0xff, 0x00]),
            Err(WireError::NotCbor(_))
        ));
        // 10,000 nested arrays: refused at MAX_DEPTH, no deep recursion.
        assert!(matches!(decode(&[0x81; 10_000]), Err(WireError::TooDeep)));
        // A million empty arrays in one: refused at MAX_ITEMS, not a million values in memory.
        let mut wide = vec![0x9f];
        wide.extend(std::iter::repeat_n(0x80, 1_000_000));
        wide.push(0xff);
        assert!(matches!(decode(&wide), Err(WireError::TooMany)));
        // A sync without its document id, and with a bad one.
        let mut e = Encoder::new(Vec::new());
        e.map(2).unwrap();
        e.str("type").unwrap().str("sync").unwrap();
        e.str("data").unwrap().bytes(b"").unwrap();
        assert!(matches!(
            decode(&e.into_writer()),
            Err(WireError::Missing {
                field: "documentId",
                ..
            })
        ));
        let mut e = Encoder::new(Vec::new());
        e.map(3).unwrap();
        e.str("type").unwrap().str("sync").unwrap();
        e.str("documentId").unwrap().str("not-an-id").unwrap();
        e.str("data").unwrap().bytes(b"").unwrap();
        assert!(matches!(
            decode(&e.into_writer()),
            Err(WireError::BadDocumentId(_))
        ));
    }

    #[test]
    fn mutated_frames_never_panic() {
        let id = doc();
        let frames = [
            encode(
                &Outgoing::Sync {
                    doc: &id,
                    data: &[1, 2, 3, 4],
                },
                "server",
                "client",
            ),
            encode(&Outgoing::Peer { storage_id: "s" }, "server", "client"),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for frame in frames {
            for _ in 0..5_000 {
                let mut f = frame.clone();
                for _ in 0..3 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x as usize) % f.len();
                    f[at] = (x >> 32) as u8;
                }
                let cut = (x >> 40) as usize % (f.len() + 1);
                let _ = decode(&f[..cut]);
                let _ = decode(&f);
            }
        }
    }
}
