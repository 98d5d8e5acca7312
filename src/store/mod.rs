//! Storage: what a replica keeps on disk, and the errors of doing so.
//!
//! The logical model (the same in SQLite and in `MemStore`, whose records the browser keeps in
//! IndexedDB):
//! * `documents` — the catalog: id, collection, tombstone flag, heads, materialized JSON body and
//!   the change-feed sequence number of the last write;
//! * `chunks` — Automerge bytes per document: one snapshot plus incremental chunks;
//! * `changes` — the durable change feed (CDC);
//! * `meta` — schema version and the replica id.
//!
//! Only `sqlite.rs` knows SQL.

pub mod mem;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use automerge::ChangeHash;

use crate::bundle::{BundleEntry, BundleScope};
use crate::engine::{ChangeEvent, StorageOp, StoredDoc};
use crate::id::{DocumentId, ReplicaId};
#[cfg(feature = "sqlite")]
use crate::protocol::Digest;
use crate::protocol::{CatalogEntry, CatalogSummary};
use crate::query::Query;

/// How hard a commit works to be durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a committed write survives the process crashing or being
    /// killed at any instant; an operating-system crash or power cut may lose the last commits
    /// (never corrupts). The usual choice for applications.
    #[default]
    Process,
    /// WAL with `synchronous=FULL`: every commit is fsynced before it is acknowledged, so it also
    /// survives power loss. Slower: one fsync per commit.
    PowerLoss,
}

/// Whether a store writes, and whether it sees other processes' commits (see [`Store::mode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoreMode {
    /// Reads and writes.
    #[default]
    ReadWrite,
    /// Reads only: writes fail with [`StoreError::ReadOnly`]. Other processes' commits are
    /// seen as they happen.
    ReadOnly,
    /// Reads only, of the file as it was when opened: SQLite could not share the file with
    /// writers (it cannot create the `-shm` index in a directory that is not writable, and no
    /// writer has the file open), so later commits by others are not seen. Reopen to see them.
    Snapshot,
}

/// What a replica needs from its storage: [`sqlite::SqliteStore`] natively, [`mem::MemStore`]
/// (whose journal IndexedDB makes durable) in the browser. One driver step runs in one
/// transaction: `begin`, reads, `write`, then `commit` (or `rollback`).
/// The prefix of metadata keys written with `StorageOp::PutMeta`, apart from the store's own.
pub(crate) const USER_META: &str = "user:";

pub trait Store: Send {
    fn replica_id(&self) -> ReplicaId;
    /// The highest change-feed sequence number stored (0 when empty).
    fn max_seq(&self) -> Result<u64, StoreError>;
    /// Starts a step's transaction. True when another process committed since the last one
    /// (whatever the caller cached from storage is stale).
    fn begin(&mut self) -> Result<bool, StoreError>;
    /// Whether another process committed since our last transaction (cheap, no transaction:
    /// drivers poll it to notice other writers of the file promptly).
    fn changed_elsewhere(&self) -> Result<bool, StoreError>;
    fn commit(&mut self) -> Result<(), StoreError>;
    fn rollback(&mut self);
    /// Applies engine writes inside the step's transaction.
    fn write(&mut self, ops: &[StorageOp]) -> Result<(), StoreError>;
    /// A key of the replica's own metadata, as last committed (see `Command::PutMeta`).
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// What the engine needs to bring a document into memory.
    fn load(&self, id: &DocumentId) -> Result<Option<StoredDoc>, StoreError>;
    /// [`load`](Self::load) of several documents (answers in the order asked). A networked
    /// store answers them in one round trip; the default asks one by one.
    fn load_many(&self, ids: &[DocumentId]) -> Vec<Result<Option<StoredDoc>, StoreError>> {
        ids.iter().map(|id| self.load(id)).collect()
    }
    /// The chunks appended to a stored document after `cursor` (see `StoredDoc::cursor`), with
    /// its stored heads; `None` when the store cannot say (the document is then loaded
    /// again whole) or the document is gone.
    fn chunks_after(
        &self,
        id: &DocumentId,
        cursor: i64,
    ) -> Result<Option<crate::engine::NewChunks>, StoreError> {
        let _ = (id, cursor);
        Ok(None)
    }
    /// The persisted sync state of `id` with `peer`.
    fn load_sync_state(
        &self,
        peer: &ReplicaId,
        id: &DocumentId,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    /// One catalog row.
    fn get(&self, id: &DocumentId) -> Result<Option<DocRecord>, StoreError>;
    /// Live documents matching a query, in creation order.
    fn query(&self, query: &Query) -> Result<Vec<DocRecord>, StoreError>;
    /// Change-feed entries with `seq > since`, oldest first, at most `limit`.
    fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>, StoreError>;
    /// Bundle entries: documents as their stored chunks, deletions as tombstones.
    fn export(&self, scope: &BundleScope) -> Result<Vec<BundleEntry>, StoreError>;
    /// The reconciliation summary of the documents in `collections` (all when `None`).
    fn catalog_summary(&self, collections: Option<&[String]>)
    -> Result<CatalogSummary, StoreError>;
    /// The catalog entries of the given reconciliation buckets.
    fn catalog_entries(
        &self,
        collections: Option<&[String]>,
        buckets: &[u8],
    ) -> Result<Vec<CatalogEntry>, StoreError>;
    /// Documents with incremental chunks to fold into their snapshot.
    fn uncompacted(&self) -> Result<Vec<DocumentId>, StoreError>;
    /// Keeps only the newest change-feed entry per document; returns entries removed.
    fn compact_feed(&mut self) -> Result<usize, StoreError>;
    /// Reclaims free space (needs no open transaction).
    fn vacuum(&mut self) -> Result<(), StoreError>;
    fn integrity_check(&self) -> Result<(), StoreError>;
    /// Live documents, tombstones, change-feed entries.
    fn counts(&self) -> Result<(u64, u64, u64), StoreError>;
    /// Makes everything written so far durable in the main file (SQLite's WAL checkpoint).
    fn checkpoint(&self) -> Result<(), StoreError>;
    /// Checks that a write commits (a small write in its own transaction), to learn that
    /// storage works again after a failure (a disk that has room again).
    fn probe(&mut self) -> Result<(), StoreError>;
    /// The store's own counters for monitoring (name, help, value), e.g. the PostgreSQL
    /// store's connections and commits. None by default.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
    /// Whether this store writes; [`StoreMode::ReadWrite`] unless opened read-only.
    fn mode(&self) -> StoreMode {
        StoreMode::ReadWrite
    }
}

/// Catalog summaries per scope, cached by the SQL stores (see `SqliteStore`).
#[cfg(feature = "sqlite")]
#[derive(Default)]
pub(crate) struct SummaryCache {
    pub(crate) version: i64,
    pub(crate) by_scope: std::collections::HashMap<Option<Vec<String>>, CatalogSummary>,
    /// The summaries hold writes of the open transaction: if it does not commit, they are
    /// wrong and must go (a summary that counts a write the disk refused would make a
    /// session report "in sync" over data that was never stored).
    pub(crate) uncommitted: bool,
}

#[cfg(feature = "sqlite")]
impl SummaryCache {
    /// The open transaction will not commit: drop whatever it taught the cache.
    pub(crate) fn abandon(&mut self) {
        if self.uncommitted {
            self.by_scope.clear();
            self.uncommitted = false;
        }
    }

    /// Whether a cached summary covers documents of `collection`.
    pub(crate) fn covers(&self, collection: &str) -> bool {
        self.by_scope.keys().any(|scope| match scope {
            None => true,
            Some(names) => names.iter().any(|n| n == collection),
        })
    }

    /// A document of `collection` went from digest `old` (`None`: new) to `new`: every
    /// cached summary covering it is updated in place (XOR), so no rescan is needed.
    pub(crate) fn update(
        &mut self,
        collection: &str,
        id: &DocumentId,
        old: Option<Digest>,
        new: Digest,
    ) {
        for (scope, summary) in self.by_scope.iter_mut() {
            let covered = match scope {
                None => true,
                Some(names) => names.iter().any(|n| n == collection),
            };
            if covered {
                if let Some(old) = old {
                    summary.remove(id, old);
                }
                summary.add(id, new);
                self.uncommitted = true;
            }
        }
    }
}

/// Errors of the storage layer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error. `code` is SQLite's own when the error came from it
    /// (`DatabaseBusy`, `DiskFull`, `ReadOnly`, ...; see [`StoreError::sqlite_code`]), and
    /// `extended` its extended result code.
    #[cfg(feature = "sqlite")]
    #[error("sqlite: {message}")]
    Sqlite {
        code: Option<rusqlite::ErrorCode>,
        extended: Option<i32>,
        message: String,
    },
    /// PostgreSQL reported an error, or the connection to it failed (`connection`: the
    /// server could not be reached or the connection was lost; the store connects again on
    /// its next use). `code` is the SQLSTATE when the server sent one.
    #[cfg(feature = "postgres")]
    #[error("postgres: {message}")]
    Postgres {
        code: Option<String>,
        connection: bool,
        message: String,
    },
    /// The file could not be opened.
    #[error("cannot open database {path}: {reason}")]
    Open { path: String, reason: String },
    /// Opening an existing replica (read-only): there is no file at `path`.
    #[error("no such replica file: {path}")]
    Missing { path: String },
    /// The file, or the directory it is in, cannot be written: only reading it works (see
    /// `Replica::open_read_only`). Writing to a store opened read-only fails with this too.
    #[error("{path} is read-only: {reason}")]
    ReadOnly { path: String, reason: String },
    /// Opening read-only a file whose schema is older than this weft's: upgrading it is a
    /// write.
    #[error(
        "{path} has schema version {found}, older than this weft's ({supported}); upgrading it needs write access: open it once where it is writable"
    )]
    SchemaTooOld {
        path: String,
        found: i64,
        supported: i64,
    },
    /// The file is a database, but not one of ours.
    #[error("{path} is not a weft database ({reason})")]
    NotWeft { path: String, reason: String },
    /// The file was written by a newer weft.
    #[error(
        "database schema version {found} is newer than this weft supports ({supported}); upgrade weft"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A transaction did not commit; none of its writes were applied. The cause keeps its
    /// type (a full disk is `Sqlite { code: Some(DiskFull), .. }`).
    #[error("commit failed, nothing was written: {0}")]
    CommitFailed(Box<StoreError>),
    /// A stored value is not what weft wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Reading a file read-only while another process writes it through a WAL this process
    /// may not share (its `-shm` is not writable to us): passing, try again once the writer
    /// is done (it removes the WAL when it closes the file).
    #[error("{0}")]
    InUse(String),
}

#[cfg(feature = "sqlite")]
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let (code, extended) = match &e {
            rusqlite::Error::SqliteFailure(f, _) => (Some(f.code), Some(f.extended_code)),
            _ => (None, None),
        };
        StoreError::Sqlite {
            code,
            extended,
            message: e.to_string(),
        }
    }
}

impl StoreError {
    /// SQLite's error code, if SQLite reported this (or the failed commit it caused).
    #[cfg(feature = "sqlite")]
    pub fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            StoreError::Sqlite { code, .. } => *code,
            StoreError::CommitFailed(cause) => cause.sqlite_code(),
            _ => None,
        }
    }

    /// The failed commit of `cause` (not wrapped twice).
    pub fn commit_failed(cause: StoreError) -> StoreError {
        match cause {
            already @ StoreError::CommitFailed(_) => already,
            other => StoreError::CommitFailed(Box::new(other)),
        }
    }

    /// The storage is full (a full disk, or the replica's quota).
    pub fn is_full(&self) -> bool {
        match self {
            #[cfg(feature = "sqlite")]
            StoreError::Sqlite { code, .. } => *code == Some(rusqlite::ErrorCode::DiskFull),
            StoreError::CommitFailed(cause) => cause.is_full(),
            _ => false,
        }
    }
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
