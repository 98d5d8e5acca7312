//! Commands the engine accepts and what it answers.

use std::fmt;

use automerge::ChangeHash;
use automerge::transaction::Transaction;
use serde_json::{Map, Value};

use crate::bundle::Bundle;
use crate::id::DocumentId;
use crate::json::Path;

/// Correlates a command with its completion. Chosen by the driver (per driver instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub u64);

/// A power-user edit: a closure over an Automerge transaction on the document.
pub type ChangeFn = Box<dyn for<'a> FnOnce(&mut Transaction<'a>) -> Result<(), String> + Send>;

/// A request to the engine.
pub enum Command {
    /// Create a document in `collection` with `body` as its content.
    Create {
        collection: String,
        body: Map<String, Value>,
    },
    /// Create the document `id` in `collection` with `fields` as its body, or, when it
    /// exists, set each of these top-level fields (a `null` is stored as null). For documents
    /// whose id is derived from their content (tracked tables: one document per row key), so
    /// that two replicas creating "the same" document meet in one. Fails with `Deleted` on a
    /// tombstone and with `WrongCollection` when the document lives in another collection.
    Upsert {
        id: DocumentId,
        collection: String,
        fields: Map<String, Value>,
    },
    /// Remember `value` under `key` in the replica's own metadata (never replicated), in the
    /// same transaction as the other commands of the step: how a driver records how far it
    /// got together with the writes that got it there.
    PutMeta { key: String, value: Vec<u8> },
    /// Apply an RFC 7386 merge patch.
    Update {
        id: DocumentId,
        patch: Map<String, Value>,
    },
    /// Set the value at a path.
    Set {
        id: DocumentId,
        path: Path,
        value: Value,
    },
    /// Delete the value at a path.
    DeletePath { id: DocumentId, path: Path },
    /// Make the value at a path collaborative text with this content.
    SetText {
        id: DocumentId,
        path: Path,
        text: String,
    },
    /// Splice collaborative text at a path.
    Splice {
        id: DocumentId,
        path: Path,
        index: usize,
        delete: usize,
        insert: String,
    },
    /// Run a closure over an Automerge transaction.
    Change { id: DocumentId, f: ChangeFn },
    /// Delete the document (a replicated tombstone).
    Delete { id: DocumentId },
    /// Read the document as of the given heads.
    GetAt {
        id: DocumentId,
        heads: Vec<ChangeHash>,
    },
    /// Merge a bundle into this replica.
    ImportBundle { bundle: Bundle },
    /// Fold the document's incremental chunks into one snapshot.
    Compact { id: DocumentId },
    /// Send ephemeral data about a document (presence, cursors) to every session that may read
    /// it; nothing is stored.
    Broadcast { id: DocumentId, data: Vec<u8> },
}

impl Command {
    /// Documents that must be in memory before the command can run.
    pub(crate) fn needs(&self) -> Vec<DocumentId> {
        match self {
            Command::Create { .. } | Command::PutMeta { .. } => Vec::new(),
            Command::Upsert { id, .. }
            | Command::Update { id, .. }
            | Command::Set { id, .. }
            | Command::DeletePath { id, .. }
            | Command::SetText { id, .. }
            | Command::Splice { id, .. }
            | Command::Change { id, .. }
            | Command::Delete { id }
            | Command::GetAt { id, .. }
            | Command::Compact { id }
            | Command::Broadcast { id, .. } => vec![*id],
            Command::ImportBundle { bundle } => bundle.entries.iter().map(|e| e.id()).collect(),
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Create { collection, .. } => write!(f, "Create({collection})"),
            Command::Upsert { id, collection, .. } => write!(f, "Upsert({collection}, {id})"),
            Command::PutMeta { key, .. } => write!(f, "PutMeta({key})"),
            Command::Update { id, .. } => write!(f, "Update({id})"),
            Command::Set { id, path, .. } => write!(f, "Set({id}, {path})"),
            Command::DeletePath { id, path } => write!(f, "DeletePath({id}, {path})"),
            Command::SetText { id, path, .. } => write!(f, "SetText({id}, {path})"),
            Command::Splice { id, path, .. } => write!(f, "Splice({id}, {path})"),
            Command::Change { id, .. } => write!(f, "Change({id})"),
            Command::Delete { id } => write!(f, "Delete({id})"),
            Command::GetAt { id, .. } => write!(f, "GetAt({id})"),
            Command::Compact { id } => write!(f, "Compact({id})"),
            Command::Broadcast { id, data } => write!(f, "Broadcast({id}, {} bytes)", data.len()),
            Command::ImportBundle { bundle } => {
                write!(f, "ImportBundle({} entries)", bundle.entries.len())
            }
        }
    }
}

/// A document read: its identity, version and JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentSnapshot {
    pub id: DocumentId,
    pub collection: String,
    pub heads: Vec<ChangeHash>,
    pub body: Value,
}

/// What a bundle import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Documents that did not exist here before.
    pub created: usize,
    /// Documents that gained changes.
    pub updated: usize,
    /// Documents deleted by a tombstone in the bundle.
    pub deleted: usize,
    /// Entries that changed nothing (already known, or the document is deleted here).
    pub unchanged: usize,
}

/// The successful result of a command.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// A document was created.
    Created {
        id: DocumentId,
        heads: Vec<ChangeHash>,
    },
    /// An edit finished; `changed` is false when it did not alter the document.
    Changed {
        heads: Vec<ChangeHash>,
        changed: bool,
    },
    /// The document is deleted (`changed` is false when it already was).
    Deleted { changed: bool },
    /// A read.
    Document(DocumentSnapshot),
    /// A bundle import.
    Imported(ImportReport),
    /// A compaction; `bytes` is the size of the document's snapshot now.
    Compacted { bytes: usize },
    /// An ephemeral message went to this many sessions.
    Broadcast { sessions: usize },
    /// Metadata was staged for the step's transaction.
    MetaStaged,
}
