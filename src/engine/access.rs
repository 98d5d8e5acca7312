//! The one gate for every write a peer causes.
//!
//! **Rule: a peer changes a document only with a [`Permit`], and only [`Engine::admit`] makes
//! one.** The engine's writing functions (`insert_new`, `record_change`, `write_tombstone`)
//! take the writer as a [`By`]; for a peer that is `By::Peer(permit)`, so a path that forgets
//! to ask the gate does not compile. `admit` checks the session's write scope against the
//! document's *stored* collection (the collection an item claims decides nothing: a document
//! that exists stays in its collection, and an item naming another one is refused), takes a
//! create from the session's budget when the document is new here, and is asked *before* any
//! expensive or mutating work on the peer's bytes.
//!
//! Reads have their rule here too: a peer learns of a document (its content, its tombstone)
//! only if it may read the document's stored collection ([`Engine::readable`]).

use automerge::sync;

use super::doc::DocState;
use super::{Engine, Origin, validate_collection};
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::ErrorCode;
use crate::scope::CreateLimit;

use super::session::{Peer, PeerId};

/// Proof that the gate allowed one write by one peer to one document. Not `Clone`: one
/// permit, one write.
#[derive(Debug)]
pub(crate) struct Permit {
    id: DocumentId,
    collection: String,
    remote: ReplicaId,
}

impl Permit {
    /// The document this permit is for.
    pub(crate) fn doc(&self) -> DocumentId {
        self.id
    }

    /// Whether this permit covers a write to `id` in `collection`.
    fn covers(&self, id: DocumentId, collection: &str) -> bool {
        self.id == id && self.collection == collection
    }
}

/// Who makes a write: the change feed's [`Origin`], and for a peer the gate's permit.
#[derive(Debug)]
pub(crate) enum By {
    /// This replica's API.
    Local,
    /// An imported bundle file.
    Bundle,
    /// A connected peer, allowed by [`Engine::admit`].
    Peer(Permit),
}

impl By {
    pub(crate) fn origin(&self) -> Origin {
        match self {
            By::Local => Origin::Local,
            By::Bundle => Origin::Bundle,
            By::Peer(permit) => Origin::Peer(permit.remote),
        }
    }

    /// Whether this writer may write `id` in `collection`. Always true for local and bundle
    /// writes; for a peer, the permit must be for this very document and collection. A
    /// mismatch is a bug in the engine, never something a peer can cause: the write is
    /// dropped and logged.
    pub(crate) fn may_write(&self, id: DocumentId, collection: &str) -> bool {
        match self {
            By::Local | By::Bundle => true,
            By::Peer(permit) if permit.covers(id, collection) => true,
            By::Peer(permit) => {
                tracing::error!(doc = %id, %collection, ?permit, "a peer write without a matching permit; dropped");
                debug_assert!(false, "peer write without a matching permit");
                false
            }
        }
    }
}

/// Why the gate refused a write (sent to the peer as `Error { code, message, doc }`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The session may not write this collection.
    Forbidden(String),
    /// The item names another collection than the stored document's.
    WrongCollection,
    /// Not a valid collection name.
    InvalidCollection(String),
    /// The session's create budget is spent.
    RateLimited(CreateLimit),
    /// The document cannot be read here (storage failed or it is corrupt).
    Unreadable(String),
}

impl Refusal {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Refusal::Forbidden(_) => ErrorCode::Forbidden,
            Refusal::WrongCollection | Refusal::InvalidCollection(_) => ErrorCode::BadDocument,
            Refusal::RateLimited(_) => ErrorCode::RateLimited,
            Refusal::Unreadable(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            Refusal::Forbidden(collection) => {
                format!("this session may not write collection {collection:?}")
            }
            Refusal::WrongCollection => WRONG_COLLECTION.into(),
            Refusal::InvalidCollection(name) => format!("invalid collection name {name:?}"),
            Refusal::RateLimited(limit) => format!(
                "this session may create {} documents at once, then {} per minute; offer the rest later",
                limit.at_once(),
                limit.per_minute
            ),
            Refusal::Unreadable(reason) => format!("document is unreadable here: {reason}"),
        }
    }
}

pub(crate) const WRONG_COLLECTION: &str = "document belongs to another collection";
pub(crate) const OUTSIDE_SCOPE: &str = "document is outside this session's scope";

/// Where a document is stored, as far as the gate is concerned.
enum Stored {
    /// In this collection (live, saved or a tombstone).
    In(String),
    /// Storage has no such document: a write creates it.
    Absent,
    /// It could not be read.
    Unreadable(String),
}

impl Engine {
    /// **The gate.** Whether `peer` may write document `id`, which its item claims is in
    /// `claimed`; on success the permit for that one write. A new document also takes one
    /// create from the session's per-minute budget.
    ///
    /// The document must be in memory (peer work waits for its load), so its stored
    /// collection is known; a document that is not is refused, never guessed.
    pub(crate) fn admit(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        claimed: &str,
    ) -> Result<Permit, Refusal> {
        let creates = self.check_write(peer, id, claimed)?;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Err(Refusal::Forbidden(claimed.to_owned()));
        };
        if creates
            && let Some(budget) = p.creates.as_mut()
            && !budget.take(now)
        {
            return Err(Refusal::RateLimited(budget.limit));
        }
        Ok(Permit {
            id,
            collection: claimed.to_owned(),
            remote: p.remote,
        })
    }

    /// The gate's question without its side effect (no create is taken from the budget):
    /// `Ok(true)` if a write would create the document, `Ok(false)` if it would change an
    /// existing one. Used to decide whether a session's sync state is read-only.
    pub(crate) fn check_write(
        &self,
        peer: PeerId,
        id: DocumentId,
        claimed: &str,
    ) -> Result<bool, Refusal> {
        if validate_collection(claimed).is_err() {
            return Err(Refusal::InvalidCollection(
                claimed.chars().take(80).collect(),
            ));
        }
        let (collection, creates) = match self.stored(id) {
            Stored::In(stored) if stored != claimed => return Err(Refusal::WrongCollection),
            Stored::In(stored) => (stored, false),
            Stored::Absent => (claimed.to_owned(), true),
            Stored::Unreadable(reason) => return Err(Refusal::Unreadable(reason)),
        };
        match self.peers.get(&peer) {
            Some(p) if p.may_write(&collection) => Ok(creates),
            _ => Err(Refusal::Forbidden(collection)),
        }
    }

    /// The stored collection of `id` if `peer` may read it; `None` if the document is absent,
    /// unreadable, or in a collection the peer may not read.
    pub(crate) fn readable(&self, peer: PeerId, id: DocumentId) -> Option<String> {
        match self.stored(id) {
            Stored::In(collection) if self.may_read(peer, &collection) => Some(collection),
            _ => None,
        }
    }

    pub(crate) fn may_read(&self, peer: PeerId, collection: &str) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.scope.contains(collection))
    }

    fn stored(&self, id: DocumentId) -> Stored {
        match self.docs.get(&id).map(|e| &e.state) {
            Some(DocState::Absent) => Stored::Absent,
            Some(DocState::Broken(reason)) => Stored::Unreadable(reason.clone()),
            None => Stored::Unreadable("not loaded".into()),
            Some(_) => match self.stored_in(id) {
                Some(collection) => Stored::In(collection.to_owned()),
                None => Stored::Unreadable("no collection".into()),
            },
        }
    }

    /// The stored collection of a document in memory (live, saved or deleted).
    pub(crate) fn stored_in(&self, id: DocumentId) -> Option<&str> {
        match self.docs.get(&id).map(|e| &e.state) {
            Some(DocState::Live(live)) => Some(&live.collection),
            Some(DocState::Saved { collection, .. } | DocState::Deleted { collection }) => {
                Some(collection)
            }
            _ => None,
        }
    }

    /// Reports a refusal to the peer.
    pub(crate) fn refuse(&mut self, peer: PeerId, id: DocumentId, refusal: &Refusal) {
        self.peer_error(peer, refusal.code(), refusal.message(), Some(id));
    }
}

impl Peer {
    /// Whether the session may write `collection` (only readable collections count).
    pub(crate) fn may_write(&self, collection: &str) -> bool {
        self.scope.contains(collection) && self.write.contains(collection)
    }
}

/// The session's sync state for a document. Where the peer may not write, the state is
/// read-only: Automerge then never applies the peer's changes nor asks for them, and tells
/// the peer (which stops offering them), so a peer holding changes it may not push does not
/// keep the two sides exchanging heads forever.
pub(crate) fn state_of(p: &mut Peer, id: DocumentId, writable: bool) -> &mut sync::State {
    let state = p.states.entry(id).or_default();
    if !writable {
        state.set_read_only(true);
    }
    state
}
