//! The wire protocol between replicas and the relay: the messages of a replication session
//! (the engine's `session.rs` has the table of which side sends which).
//!
//! A connection carries frames; one frame is one WebSocket binary message:
//!
//! ```text
//! magic   2 bytes  "wf"
//! version 1 byte   PROTOCOL_VERSION
//! body    postcard-encoded `Message`
//! ```
//!
//! Every byte string either decodes to a [`Message`] or gives a [`ProtocolError`]: never a panic,
//! and never an allocation larger than the frame itself (the frame size is checked against the
//! limit before anything is decoded). postcard, not bincode: see ARCHITECTURE.md.
//!
//! Catalog reconciliation (how two sides find the documents that differ without listing them
//! all): each document has a 64-bit [`doc_digest`] of its id, heads and tombstone flag; documents
//! fall into 256 buckets by the first byte of their id; a bucket's digest is the XOR of its
//! documents' digests (order-free, updatable in O(1)). A side opens with a [`Message::Summary`]
//! (count + 256 bucket digests, about 2 KiB whatever the catalog size); when nothing differs the
//! exchange ends there. Otherwise only the differing buckets' entries are exchanged.

pub mod amrepo;
mod frame;
mod sync_guard;

use serde::{Deserialize, Serialize};

pub use frame::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION, ProtocolError, decode, encode};
pub use sync_guard::{MAX_BLOOM_PROBES, check_sync_message};

/// Sync items are packed into frames of about this many payload bytes.
pub const TARGET_FRAME_BYTES: usize = 1 << 20;

use crate::id::{DocumentId, ReplicaId};

/// A 64-bit digest (of a document's version, or of a bucket of documents).
pub type Digest = u64;

/// Which collections a session covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireScope {
    All,
    Collections(Vec<String>),
}

/// Why a `Hello` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// Missing, malformed, forged or expired token.
    Unauthorized,
    /// Asked for collections the token does not grant.
    Forbidden,
    /// The relay is at its connection limit.
    Busy,
}

/// A typed error about one request or document; the session may go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame that does not decode.
    Malformed,
    /// A frame over the size limit.
    TooLarge,
    /// Automerge bytes that do not load or apply.
    BadDocument,
    /// A write to a collection the session may not write.
    Forbidden,
    /// Too many messages or bytes per second.
    RateLimited,
    /// The peer failed on its side.
    Internal,
    /// A message the sender may not send in its role or at this point of the session
    /// (`Entries` that answer no `Summary`, `Persisted` from a client, a second `Hello`...).
    /// The session ends.
    Unexpected,
    /// The sender's storage failed (a full disk): what it was sent was not stored, and the
    /// session ends; try again later.
    Storage,
}

impl ErrorCode {
    /// The stable name of the code, as JavaScript and the command line show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "Malformed",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::BadDocument => "BadDocument",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::RateLimited => "RateLimited",
            ErrorCode::Internal => "Internal",
            ErrorCode::Unexpected => "Unexpected",
            ErrorCode::Storage => "Storage",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RejectCode {
    /// The stable name of the code, as JavaScript and the command line show it.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::ProtocolVersion => "ProtocolVersion",
            RejectCode::Unauthorized => "Unauthorized",
            RejectCode::Forbidden => "Forbidden",
            RejectCode::Busy => "Busy",
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sync item carries for one document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// An Automerge sync-protocol message.
    Sync(#[serde(with = "serde_bytes_compat")] Vec<u8>),
    /// The whole document (`save()`), for a peer that has none of it: one message instead of
    /// several sync rounds.
    Whole(#[serde(with = "serde_bytes_compat")] Vec<u8>),
    /// "I have none of this document; send it whole."
    Want,
    /// The document is deleted.
    Tombstone,
}

/// One document's share of a [`Message::Sync`] batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncItem {
    pub id: DocumentId,
    pub collection: String,
    pub payload: Payload,
}

/// One catalog entry in reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: DocumentId,
    pub collection: String,
    /// [`doc_digest`] of the sender's version.
    pub digest: Digest,
    /// The sender holds a tombstone for this document.
    pub deleted: bool,
}

/// The reconciliation summary of a catalog: document count and the 256 bucket digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogSummary {
    pub count: u64,
    pub buckets: Vec<Digest>,
}

impl CatalogSummary {
    /// An empty catalog.
    pub fn empty() -> Self {
        Self {
            count: 0,
            buckets: vec![0; 256],
        }
    }

    /// Adds one document's digest.
    pub fn add(&mut self, id: &DocumentId, digest: Digest) {
        self.count += 1;
        self.buckets[usize::from(bucket_of(id))] ^= digest;
    }

    /// Takes one document's digest out again (the inverse of [`add`](Self::add)).
    pub fn remove(&mut self, id: &DocumentId, digest: Digest) {
        self.count = self.count.saturating_sub(1);
        self.buckets[usize::from(bucket_of(id))] ^= digest;
    }

    /// The buckets whose digests differ from `other`'s (all 256 if `other` is malformed).
    pub fn differing(&self, other: &[Digest]) -> Vec<u8> {
        if other.len() != 256 {
            return (0..=255).collect();
        }
        (0..=255u8)
            .filter(|b| self.buckets[usize::from(*b)] != other[usize::from(*b)])
            .collect()
    }
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Client -> relay, first frame.
    Hello {
        protocol: u16,
        replica: ReplicaId,
        token: Option<String>,
        scope: WireScope,
    },
    /// Relay -> client: accepted, with the scope granted and the relay's frame limit.
    Welcome {
        replica: ReplicaId,
        scope: WireScope,
        max_frame: u32,
    },
    /// Relay -> client: refused; the connection closes.
    Reject {
        code: RejectCode,
        reason: String,
    },
    /// Reconciliation: the number of documents in scope and the 256 bucket digests.
    Summary {
        count: u64,
        buckets: Vec<Digest>,
    },
    /// Reconciliation: the entries of the buckets that differ (`buckets` lists them).
    Entries {
        buckets: Vec<u8>,
        entries: Vec<CatalogEntry>,
    },
    /// Sync messages, whole documents and tombstones for many documents at once.
    Sync {
        batch: Vec<SyncItem>,
    },
    /// Relay -> client: these heads of these documents are durable on the relay.
    Persisted {
        docs: Vec<(DocumentId, Vec<[u8; 32]>)>,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// A typed error, optionally about one document.
    Error {
        code: ErrorCode,
        message: String,
        doc: Option<DocumentId>,
    },
    /// Ephemeral data about one document (presence, cursors): passed on to every other session
    /// that may read the document, never stored. `data` is opaque to weft; weft's JS package
    /// and automerge-repo encode it as CBOR.
    Ephemeral {
        doc: DocumentId,
        #[serde(with = "serde_bytes_compat")]
        data: Vec<u8>,
        /// Who sent it first, as the relay names its sessions: a weft replica's id, an
        /// automerge-repo client's peer id. The relay fills it in; what a client sends here is
        /// ignored (nobody can speak for another session).
        sender: String,
    },
}

/// The largest ephemeral message accepted (its data), in bytes.
pub const MAX_EPHEMERAL_BYTES: usize = 64 * 1024;

impl Message {
    /// The variant's name, for logs and error messages (never the possibly large contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Reject { .. } => "Reject",
            Message::Summary { .. } => "Summary",
            Message::Entries { .. } => "Entries",
            Message::Sync { .. } => "Sync",
            Message::Persisted { .. } => "Persisted",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Error { .. } => "Error",
            Message::Ephemeral { .. } => "Ephemeral",
        }
    }
}

/// The 64-bit digest of a document's version: equal on two replicas exactly when they hold the
/// same heads (up to a 2^-64 chance), or both hold its tombstone.
pub fn doc_digest(id: &DocumentId, heads: &[automerge::ChangeHash], deleted: bool) -> Digest {
    let mut acc = mix(
        u64::from_le_bytes(id.as_bytes()[..8].try_into().unwrap_or_default())
            ^ 0x9e37_79b9_7f4a_7c15,
    );
    acc ^= mix(u64::from_le_bytes(
        id.as_bytes()[8..].try_into().unwrap_or_default(),
    ));
    if deleted {
        // A tombstone is final whatever the heads were when each replica learned of it.
        return mix(acc ^ 0xdead_beef_dead_beef);
    }
    for head in heads {
        // Heads are SHA-256 hashes: 8 of their bytes are already uniformly distributed. XOR makes
        // the digest independent of the order heads are listed in.
        acc ^= mix(u64::from_le_bytes(
            head.0[..8].try_into().unwrap_or_default(),
        ));
    }
    acc
}

/// The bucket of a document in reconciliation.
pub fn bucket_of(id: &DocumentId) -> u8 {
    id.as_bytes()[0]
}

/// splitmix64's finalizer: a bijective 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Byte vectors as one length-prefixed run (postcard encodes `serde_bytes`-style data as
/// `len + bytes`, far smaller and faster than a sequence of u8).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}
