//! A document held in engine memory, and the rules for compacting its storage.

use automerge::{ActorId, Automerge, ChangeHash};

use super::effects::{ChunkKind, StoredDoc};
use crate::error::Error;
use crate::id::DocumentId;

/// When to fold a document's incremental chunks into one snapshot.
#[derive(Clone, Copy, Debug)]
pub struct CompactionPolicy {
    /// Compact once the incremental chunks add up to more than this many bytes **and** more than
    /// the snapshot itself. Keeps the work of compaction amortized O(1) per written byte.
    pub min_incremental_bytes: usize,
    /// Compact at this many incremental chunks regardless of size, to bound load time.
    pub max_incremental_chunks: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            min_incremental_bytes: 64 * 1024,
            max_incremental_chunks: 1024,
        }
    }
}

impl CompactionPolicy {
    /// For a store other processes write too (relay nodes over one PostgreSQL database):
    /// another node's edit makes this one reload the document, snapshot and every
    /// incremental chunk, so chunks are folded after 32 of them rather than 1,024.
    pub fn shared_store() -> Self {
        Self {
            max_incremental_chunks: 32,
            ..Self::default()
        }
    }
}

/// The state of a document the engine knows about.
pub(crate) enum DocState {
    /// Loaded and editable.
    Live(Box<LiveDoc>),
    /// Created or received whole here and not edited since: kept as its saved bytes (a few
    /// hundred bytes instead of the ~18 KiB of a loaded document), loaded again on first use.
    /// This is what keeps bulk imports from filling memory with documents nobody edits.
    Saved {
        collection: String,
        snapshot: Vec<u8>,
    },
    /// A tombstone: deleted here or by a peer. Final. The collection it was in still decides
    /// who may learn of it.
    Deleted { collection: String },
    /// Storage has no such document.
    Absent,
    /// Storage holds it but it could not be loaded. Forgotten after the commands waiting for it
    /// ran, so a later command tries again.
    Broken(String),
}

/// A loaded document and what its storage looks like.
pub(crate) struct LiveDoc {
    pub doc: Automerge,
    pub collection: String,
    pub snapshot_bytes: usize,
    pub incremental_bytes: usize,
    pub incremental_chunks: usize,
    /// The store's cursor after the chunks this document was loaded from (see
    /// `StoredDoc::cursor`).
    pub cursor: Option<i64>,
}

impl LiveDoc {
    /// A document that was just created or received whole, stored as one snapshot.
    pub fn new(doc: Automerge, collection: String, snapshot_bytes: usize) -> Self {
        Self {
            doc,
            collection,
            snapshot_bytes,
            incremental_bytes: 0,
            incremental_chunks: 0,
            cursor: None,
        }
    }

    /// Rebuilds a document from its stored chunks, checking it against the recorded heads.
    pub fn load(id: DocumentId, stored: StoredDoc, actor: &ActorId) -> Result<DocState, Error> {
        if stored.deleted {
            return Ok(DocState::Deleted {
                collection: stored.collection,
            });
        }
        let mut snapshot_bytes = 0;
        let mut incremental_bytes = 0;
        let mut incremental_chunks = 0;
        let mut all = Vec::with_capacity(stored.chunks.iter().map(|c| c.bytes.len()).sum());
        for chunk in &stored.chunks {
            match chunk.kind {
                ChunkKind::Snapshot => snapshot_bytes += chunk.bytes.len(),
                ChunkKind::Incremental => {
                    incremental_bytes += chunk.bytes.len();
                    incremental_chunks += 1;
                }
            }
            all.extend_from_slice(&chunk.bytes);
        }
        let corrupt = |reason: String| Error::Corrupt { id, reason };
        let options =
            automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error);
        let mut doc =
            Automerge::load_with_options(&all, options).map_err(|e| corrupt(e.to_string()))?;
        check_heads(id, &doc.get_heads(), &stored.heads)?;
        doc.set_actor(actor.clone());
        Ok(DocState::Live(Box::new(LiveDoc {
            doc,
            collection: stored.collection,
            snapshot_bytes,
            incremental_bytes,
            incremental_chunks,
            cursor: stored.cursor,
        })))
    }

    /// Loads a document this engine saved itself (see [`DocState::Saved`]).
    pub fn from_saved(
        id: DocumentId,
        collection: String,
        snapshot: &[u8],
        actor: &ActorId,
    ) -> Result<Self, Error> {
        let mut doc = Automerge::load(snapshot).map_err(|e| Error::Corrupt {
            id,
            reason: e.to_string(),
        })?;
        doc.set_actor(actor.clone());
        Ok(Self::new(doc, collection, snapshot.len()))
    }

    /// Records an appended incremental chunk; returns true when it is time to compact.
    pub fn appended(&mut self, bytes: usize, policy: &CompactionPolicy) -> bool {
        self.incremental_bytes += bytes;
        self.incremental_chunks += 1;
        self.incremental_chunks >= policy.max_incremental_chunks
            || (self.incremental_bytes >= policy.min_incremental_bytes
                && self.incremental_bytes >= self.snapshot_bytes)
    }

    /// Records a compaction into a snapshot of `bytes`.
    pub fn compacted(&mut self, bytes: usize) {
        self.snapshot_bytes = bytes;
        self.incremental_bytes = 0;
        self.incremental_chunks = 0;
    }
}

/// Heads are compared as sets.
pub(crate) fn check_heads(
    id: DocumentId,
    actual: &[ChangeHash],
    expected: &[ChangeHash],
) -> Result<(), Error> {
    let mut a = actual.to_vec();
    let mut e = expected.to_vec();
    a.sort_unstable();
    e.sort_unstable();
    if a == e {
        Ok(())
    } else {
        Err(Error::Corrupt {
            id,
            reason: format!(
                "loaded heads {} do not match the recorded heads {}",
                fmt_heads(&a),
                fmt_heads(&e)
            ),
        })
    }
}

fn fmt_heads(heads: &[ChangeHash]) -> String {
    let short: Vec<String> = heads
        .iter()
        .map(|h| h.to_string()[..12].to_owned())
        .collect();
    format!("[{}]", short.join(", "))
}
