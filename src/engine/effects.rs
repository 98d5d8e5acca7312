//! What the engine asks its driver to do: the plain-data output of [`Engine::handle`].
//!
//! [`Engine::handle`]: super::Engine::handle

use automerge::ChangeHash;

use super::command::{CommandId, Output};
use super::reconcile::CatalogRead;
use super::session::{PeerEvent, PeerId};
use crate::error::Error;
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::Message;

/// The effects of one or more engine steps.
///
/// A driver must destructure this struct (not read fields by name) so that a new kind of effect
/// breaks its build instead of being ignored. The order of execution is fixed:
///
/// 1. answer every `load` with [`Input::Loaded`](super::Input::Loaded) (which may produce more
///    effects, to be merged into this value);
/// 2. apply all `writes` in **one storage transaction**, in order;
/// 3. only after that transaction committed: publish `events` and deliver `completed`.
///
/// If the transaction fails, the driver publishes nothing, turns every completion into the
/// storage error, and reports [`Input::StorageFailed`](super::Input::StorageFailed) so the
/// engine forgets the in-memory state that did not reach storage.
#[derive(Debug, Default)]
#[must_use = "effects must be executed by the driver"]
pub struct Effects {
    /// Documents the engine needs loaded from storage before it can go on.
    pub loads: Vec<DocumentId>,
    /// Storage writes, to commit atomically and in order.
    pub writes: Vec<StorageOp>,
    /// Committed changes, to publish to hooks and subscribers after the commit.
    pub events: Vec<ChangeEvent>,
    /// Finished commands and their results, to deliver after the commit.
    pub completed: Vec<(CommandId, Result<Output, Error>)>,
    /// Catalog reads for replication sessions, to answer with `Input::Catalog`.
    pub catalog_reads: Vec<CatalogRead>,
    /// Documents to send whole to a peer straight from storage (no Automerge work), to answer
    /// with `Input::Whole`. Only asked for documents not in memory, so storage is current.
    pub whole_reads: Vec<(PeerId, DocumentId)>,
    /// Persisted sync states to read (the session's peer, its replica, the document), to
    /// answer with `Input::SyncState`.
    pub sync_state_reads: Vec<(PeerId, ReplicaId, DocumentId)>,
    /// Messages to send to peers, after the commit, in order per peer.
    pub send: Vec<(PeerId, Message)>,
    /// Session events (in sync, persisted acknowledgements, peer errors), after the commit.
    pub peer_events: Vec<(PeerId, PeerEvent)>,
}

impl Effects {
    /// Appends `other` to `self`, keeping order.
    pub fn extend(&mut self, other: Effects) {
        let Effects {
            loads,
            writes,
            events,
            completed,
            catalog_reads,
            whole_reads,
            sync_state_reads,
            send,
            peer_events,
        } = other;
        self.loads.extend(loads);
        self.writes.extend(writes);
        self.events.extend(events);
        self.completed.extend(completed);
        self.catalog_reads.extend(catalog_reads);
        self.whole_reads.extend(whole_reads);
        self.sync_state_reads.extend(sync_state_reads);
        self.send.extend(send);
        self.peer_events.extend(peer_events);
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        let Effects {
            loads,
            writes,
            events,
            completed,
            catalog_reads,
            whole_reads,
            sync_state_reads,
            send,
            peer_events,
        } = self;
        loads.is_empty()
            && sync_state_reads.is_empty()
            && writes.is_empty()
            && events.is_empty()
            && completed.is_empty()
            && catalog_reads.is_empty()
            && whole_reads.is_empty()
            && send.is_empty()
            && peer_events.is_empty()
    }

    /// The documents touched by `writes`.
    pub fn written_docs(&self) -> Vec<DocumentId> {
        let mut ids: Vec<DocumentId> = self.writes.iter().filter_map(StorageOp::doc).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// How a chunk of Automerge bytes was produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkKind {
    /// A full `save()` of the document: the compacted form.
    Snapshot = 0,
    /// Changes appended since the last chunk (`save_after`).
    Incremental = 1,
}

impl ChunkKind {
    /// Reads the stored tag.
    pub fn from_u8(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Self::Snapshot),
            1 => Some(Self::Incremental),
            _ => None,
        }
    }
}

/// One stored chunk of a document.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    pub kind: ChunkKind,
    pub bytes: Vec<u8>,
}

/// A document as storage holds it: the answer to a load.
#[derive(Clone, Debug)]
pub struct StoredDoc {
    pub collection: String,
    pub deleted: bool,
    pub heads: Vec<ChangeHash>,
    /// In the order they were written; empty for a deleted document.
    pub chunks: Vec<StoredChunk>,
    /// Where these chunks end, for a store that can later return only the chunks appended
    /// after it ([`Store::chunks_after`](crate::store::Store::chunks_after)); `None` otherwise.
    pub cursor: Option<i64>,
}

/// The chunks appended to a stored document after a cursor, with its stored heads: what
/// another writer added since this process loaded it.
#[derive(Clone, Debug)]
pub struct NewChunks {
    pub chunks: Vec<Vec<u8>>,
    /// The cursor after these chunks.
    pub cursor: i64,
    pub heads: Vec<ChangeHash>,
    pub deleted: bool,
}

/// One storage write. All writes of one [`Effects`] commit together.
#[derive(Clone, Debug)]
pub enum StorageOp {
    /// A live document new to storage, whole: catalog row, materialized body and snapshot.
    InsertDocument {
        id: DocumentId,
        collection: String,
        heads: Vec<ChangeHash>,
        body: String,
        snapshot: Vec<u8>,
        seq: u64,
    },
    /// Insert or replace the catalog row and the materialized JSON body of a document.
    PutDocument {
        id: DocumentId,
        collection: String,
        deleted: bool,
        heads: Vec<ChangeHash>,
        /// Materialized JSON; `None` for a deleted document.
        body: Option<String>,
        /// The change-feed sequence number of this write.
        seq: u64,
    },
    /// Append an incremental chunk of Automerge bytes (`save_after` the previous heads).
    AppendChunk { id: DocumentId, bytes: Vec<u8> },
    /// Compaction: replace every stored chunk of the document with one snapshot.
    ReplaceChunks { id: DocumentId, snapshot: Vec<u8> },
    /// Remove the document's content (after a delete; the catalog row stays as the tombstone).
    PurgeChunks { id: DocumentId },
    /// Append an entry to the durable change feed.
    AppendChange(ChangeEvent),
    /// Insert or replace a key of the replica's own metadata (see `Command::PutMeta`).
    PutMeta { key: String, value: Vec<u8> },
    /// Remember the Automerge sync state (`automerge::sync::State::encode`: the shared heads)
    /// of a stored document with a peer replica. Ignored for a document not stored.
    PutSyncState {
        peer: ReplicaId,
        id: DocumentId,
        state: Vec<u8>,
    },
}

impl StorageOp {
    /// The document this write is about (`None` for metadata).
    pub fn doc(&self) -> Option<DocumentId> {
        Some(match self {
            StorageOp::InsertDocument { id, .. }
            | StorageOp::PutDocument { id, .. }
            | StorageOp::AppendChunk { id, .. }
            | StorageOp::ReplaceChunks { id, .. }
            | StorageOp::PurgeChunks { id }
            | StorageOp::PutSyncState { id, .. } => *id,
            StorageOp::AppendChange(event) => event.id,
            StorageOp::PutMeta { .. } => return None,
        })
    }
}

/// What happened to a document in a committed change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

impl ChangeKind {
    /// Stable storage tag.
    pub fn as_u8(self) -> u8 {
        match self {
            ChangeKind::Created => 0,
            ChangeKind::Updated => 1,
            ChangeKind::Deleted => 2,
        }
    }

    /// Reads a storage tag.
    pub fn from_u8(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(ChangeKind::Created),
            1 => Some(ChangeKind::Updated),
            2 => Some(ChangeKind::Deleted),
            _ => None,
        }
    }
}

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Made through this replica's API.
    Local,
    /// Merged from an imported bundle file.
    Bundle,
    /// Received from a connected peer.
    Peer(ReplicaId),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Local => f.write_str("local"),
            Origin::Bundle => f.write_str("bundle"),
            Origin::Peer(id) => write!(f, "peer:{id}"),
        }
    }
}

impl std::str::FromStr for Origin {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "local" => Ok(Origin::Local),
            "bundle" => Ok(Origin::Bundle),
            other => match other.strip_prefix("peer:") {
                Some(id) => Ok(Origin::Peer(id.parse()?)),
                None => Err(Error::InvalidId {
                    what: "origin",
                    input: other.to_owned(),
                    reason: "expected local, bundle or peer:ID",
                }),
            },
        }
    }
}

/// One committed change: an entry of the durable change feed and the payload of change hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Position in the change feed; strictly increasing per replica, never reused.
    pub seq: u64,
    pub id: DocumentId,
    pub collection: String,
    pub kind: ChangeKind,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    pub origin: Origin,
    /// Milliseconds since the Unix epoch, as given to the engine by its driver.
    pub at: i64,
}
