//! Storage: what a replica keeps on disk, and the errors of doing so.
//!
//! The logical model (the same in SQLite and, later, IndexedDB):
//! * `documents` — the catalog: id, collection, tombstone flag, heads, materialized JSON body and
//!   the change-feed sequence number of the last write;
//! * `chunks` — Automerge bytes per document: one snapshot plus incremental chunks;
//! * `changes` — the durable change feed (CDC);
//! * `meta` — schema version and the replica id.
//!
//! Only `sqlite.rs` knows SQL.

#[cfg(feature = "sqlite")]
pub mod sqlite;

use automerge::ChangeHash;

use crate::id::DocumentId;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[cfg(feature = "sqlite")]
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file could not be opened.
    #[error("cannot open database {path}: {reason}")]
    Open { path: String, reason: String },
    /// The file is a database, but not one of ours.
    #[error("{path} is not a weft database ({reason})")]
    NotWeft { path: String, reason: String },
    /// The file was written by a newer weft.
    #[error(
        "database schema version {found} is newer than this weft supports ({supported}); upgrade weft"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A transaction did not commit; none of its writes were applied.
    #[error("commit failed, nothing was written: {0}")]
    CommitFailed(String),
    /// A stored value is not what weft wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A catalog row: what a read of one document returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocRecord {
    pub id: DocumentId,
    pub collection: String,
    pub deleted: bool,
    pub heads: Vec<ChangeHash>,
    /// Materialized JSON text; `None` for a deleted document.
    pub body: Option<String>,
    /// Change-feed sequence number of the last write to this document.
    pub updated_seq: u64,
}

/// Heads are stored as the concatenation of their 32-byte hashes.
pub fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

/// Reads heads written by [`encode_heads`].
pub fn decode_heads(bytes: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(StoreError::Corrupt(format!(
            "heads field of {} bytes is not a multiple of 32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            ChangeHash(h)
        })
        .collect())
}
