//! Applying a peer's sync items: tombstones, whole documents, Automerge sync messages, and
//! answering `Want`.
//!
//! Every write here is made with a [`Permit`](super::access::Permit) from the gate
//! ([`Engine::admit`]), asked before any work on the peer's bytes. What is not a write is a
//! read: a sync message without changes (heads, Bloom filter, needs) is served for any
//! document the peer may read; one with changes the peer may not push is refused for those
//! changes and still served as a read.

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ReadDoc};

use super::access::{By, OUTSIDE_SCOPE, Permit, Refusal, state_of};
use super::doc::DocState;
use super::fanout::is_echo;
use super::session::PeerId;
use super::{Effects, Engine, Touched, Work};
use crate::id::DocumentId;
use crate::protocol::{ErrorCode, Payload, SyncItem};

/// Work for a peer that needs a document in memory.
#[derive(Debug)]
pub(crate) enum PeerWork {
    Receive(SyncItem),
    SendWhole(DocumentId),
    SendSync(DocumentId),
    /// Ephemeral data from the peer, to pass on once the document's collection is known
    /// (`sender`: as the peer named it; only a relay's naming is kept).
    Ephemeral {
        doc: DocumentId,
        data: Vec<u8>,
        sender: String,
    },
}

impl PeerWork {
    pub(crate) fn doc(&self) -> DocumentId {
        match self {
            PeerWork::Receive(item) => item.id,
            PeerWork::SendWhole(id) | PeerWork::SendSync(id) => *id,
            PeerWork::Ephemeral { doc, .. } => *doc,
        }
    }

    /// Whether this work uses the session's Automerge sync state for its document.
    pub(crate) fn needs_state(&self) -> bool {
        match self {
            PeerWork::SendSync(_) => true,
            PeerWork::Receive(item) => matches!(item.payload, Payload::Sync(_)),
            PeerWork::SendWhole(_) | PeerWork::Ephemeral { .. } => false,
        }
    }
}

impl Engine {
    /// A `Sync` frame's items: each one outside the session's read scope is refused; a `Want`
    /// for a document not in memory is answered from storage; the rest waits for its
    /// document to be in memory ([`run_peer`](Self::run_peer)).
    pub(crate) fn on_sync(
        &mut self,
        now: i64,
        peer: PeerId,
        batch: Vec<SyncItem>,
        fx: &mut Effects,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.busy = true;
        p.last_activity = now;
        for item in batch {
            if !self.may_read(peer, &item.collection) {
                self.peer_error(
                    peer,
                    ErrorCode::Forbidden,
                    format!(
                        "collection {:?} is outside this session's scope",
                        item.collection
                    ),
                    Some(item.id),
                );
                continue;
            }
            if let Some(p) = self.peers.get_mut(&peer).filter(|p| p.on_demand()) {
                p.followed.insert(item.id);
            }
            if matches!(item.payload, Payload::Want) && !self.docs.contains_key(&item.id) {
                fx.whole_reads.push((peer, item.id));
            } else {
                self.queue
                    .push_back(Work::Peer(peer, PeerWork::Receive(item)));
            }
        }
    }

    /// Runs one unit of peer work (the document is in memory or known absent).
    pub(crate) fn run_peer(&mut self, now: i64, peer: PeerId, work: PeerWork, fx: &mut Effects) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        match work {
            PeerWork::SendWhole(id) => self.send_whole(peer, id),
            PeerWork::SendSync(id) => {
                // touch() loads a saved document.
                if matches!(self.touch(&id), Touched::Live(_)) {
                    self.send_sync(peer, id);
                }
            }
            PeerWork::Receive(item) => self.receive(now, peer, item, fx),
            PeerWork::Ephemeral { doc, data, sender } => {
                if let Err(e) = self.send_ephemeral(doc, data, Some((peer, sender)), fx) {
                    // A document of another collection, unknown, deleted or unreadable: all
                    // "outside this session's scope", so the answer says no more than that.
                    let (code, message) = match e {
                        e @ crate::Error::TooLarge { .. } => (ErrorCode::TooLarge, e.to_string()),
                        _ => (ErrorCode::Forbidden, OUTSIDE_SCOPE.into()),
                    };
                    self.peer_error(peer, code, message, Some(doc));
                }
            }
        }
    }

    /// Ephemeral data from a peer: passed on once its document is in memory (its stored
    /// collection decides who may send and receive it).
    pub(crate) fn on_ephemeral(
        &mut self,
        peer: PeerId,
        doc: DocumentId,
        data: Vec<u8>,
        sender: String,
        _fx: &mut Effects,
    ) {
        self.queue
            .push_back(Work::Peer(peer, PeerWork::Ephemeral { doc, data, sender }));
    }

    fn receive(&mut self, now: i64, peer: PeerId, item: SyncItem, fx: &mut Effects) {
        let SyncItem {
            id,
            collection,
            payload,
        } = item;
        // The peer must be able to read the document's stored collection, and the item must
        // name it, or the item is refused whatever it carries (the collection it claims
        // decides nothing: a document never moves, and one collection's rights never reach
        // another's). A document the peer may not read is "outside its scope" whatever it
        // claimed, so a peer learns nothing more about it than that.
        if let Some(stored) = self.stored_in(id) {
            if !self.may_read(peer, stored) {
                return self.not_here(peer, id, true);
            }
            if stored != collection {
                if self.peers.get(&peer).is_some_and(|p| p.on_demand()) {
                    return self.not_here(peer, id, true);
                }
                return self.refuse(peer, id, &Refusal::WrongCollection);
            }
        }
        match payload {
            Payload::Want => self.send_whole(peer, id),
            Payload::Tombstone => self.receive_tombstone(now, peer, id, collection, fx),
            Payload::Whole(bytes) => self.receive_whole(now, peer, id, collection, bytes, fx),
            Payload::Sync(bytes) => self.receive_sync(now, peer, id, collection, &bytes, fx),
        }
    }

    /// A tombstone: the document is deleted here too (a write: the gate decides). For a
    /// document we never had, the tombstone is stored, so that content arriving later for
    /// that id stays deleted.
    fn receive_tombstone(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        collection: String,
        fx: &mut Effects,
    ) {
        if matches!(self.touch(&id), Touched::Deleted) {
            return;
        }
        let permit = match self.admit(now, peer, id, &collection) {
            Ok(permit) => permit,
            Err(refusal) => return self.refuse(peer, id, &refusal),
        };
        let heads = match self.touch(&id) {
            Touched::Live(live) => live.doc.get_heads(),
            _ => Vec::new(),
        };
        self.write_tombstone(now, id, collection, heads, By::Peer(permit), fx);
    }

    /// A whole document: created here, or merged into ours (a write: the gate decides, before
    /// the bytes are even loaded).
    fn receive_whole(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        collection: String,
        bytes: Vec<u8>,
        fx: &mut Effects,
    ) {
        // A tombstone is final: content for a deleted id is answered with it.
        if matches!(self.touch(&id), Touched::Deleted) {
            return self.send_whole(peer, id);
        }
        let permit = match self.admit(now, peer, id, &collection) {
            Ok(permit) => permit,
            Err(refusal) => return self.refuse(peer, id, &refusal),
        };
        // Counted from the bytes before Automerge loads them: a few hundred bytes can hold
        // millions of operations.
        if let Err(e) = self.config.limits.check_automerge(&bytes) {
            return self.peer_error(peer, ErrorCode::BadDocument, e.to_string(), Some(id));
        }
        let options =
            automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error);
        let mut doc = match Automerge::load_with_options(&bytes, options) {
            // Every document has heads (an empty body is one empty change).
            Ok(doc) if doc.get_heads().is_empty() => {
                return self.peer_error(
                    peer,
                    ErrorCode::BadDocument,
                    "a whole document without any change".into(),
                    Some(id),
                );
            }
            Ok(doc) => doc,
            Err(e) => {
                return self.peer_error(
                    peer,
                    ErrorCode::BadDocument,
                    format!("document does not load: {e}"),
                    Some(id),
                );
            }
        };
        match self.touch(&id) {
            Touched::Live(live) => {
                let before = live.doc.get_heads();
                if let Err(e) = live.doc.merge(&mut doc) {
                    tracing::warn!(doc = %id, error = %e, "whole document did not merge cleanly");
                }
                // We had changes the sender lacks: sync them back (live fan-out skips the peer
                // the changes came from).
                let sender_lacks = live.doc.get_heads() != doc.get_heads();
                if live.doc.get_heads() != before {
                    // Beyond the limits once merged: undone (the document is restored), refused.
                    match self.record_change_checked(now, id, &before, By::Peer(permit), fx) {
                        Ok(heads) => self.ack(peer, id, &heads),
                        Err(e) => {
                            return self.peer_error(
                                peer,
                                ErrorCode::BadDocument,
                                e.to_string(),
                                Some(id),
                            );
                        }
                    }
                }
                if sender_lacks {
                    self.queue
                        .push_back(Work::Peer(peer, PeerWork::SendSync(id)));
                }
            }
            Touched::Absent => match self.new_document_body(&doc) {
                Ok(body) => {
                    self.insert_received(now, peer, permit, collection, &doc, body, bytes, fx)
                }
                Err(e) => self.peer_error(peer, ErrorCode::BadDocument, e.to_string(), Some(id)),
            },
            Touched::Deleted | Touched::Broken(_) => {}
        }
    }

    /// An Automerge sync message. Changes (or heads we lack: the peer holds changes) are a
    /// write and need a permit; without one they are refused and the rest of the message
    /// (heads, Bloom filter, needs) is served as a read.
    fn receive_sync(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        collection: String,
        bytes: &[u8],
        fx: &mut Effects,
    ) {
        let mut message = match sync::Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                return self.peer_error(
                    peer,
                    ErrorCode::BadDocument,
                    format!("sync message does not decode: {e}"),
                    Some(id),
                );
            }
        };
        // Automerge trusts a peer's Bloom filters: one without bits panics it, one with
        // billions of probes allocates them all (found by fuzzing). Refused before it sees them.
        if let Err(reason) = crate::protocol::check_sync_message(&message) {
            return self.peer_error(
                peer,
                ErrorCode::BadDocument,
                format!("sync message refused: {reason}"),
                Some(id),
            );
        }
        // Changes are a write; so are heads we lack (the peer holds changes): a peer that may
        // not write is refused either, and a writer needs a permit only to apply changes.
        let lacks_heads = match self.touch(&id) {
            Touched::Live(live) => !live.doc.get_missing_deps(&message.heads).is_empty(),
            Touched::Absent => !message.heads.is_empty(),
            Touched::Deleted | Touched::Broken(_) => false,
        };
        let carries_changes = !message.changes.is_empty();
        let permit = match self.check_write(peer, id, &collection) {
            Err(refusal) => {
                if carries_changes || lacks_heads {
                    self.refuse(peer, id, &refusal);
                }
                None
            }
            Ok(_) if carries_changes => match self.admit(now, peer, id, &collection) {
                Ok(permit) => Some(permit),
                Err(refusal) => {
                    self.refuse(peer, id, &refusal);
                    None
                }
            },
            Ok(_) => None,
        };
        let writable = self.check_write(peer, id, &collection).is_ok();
        if permit.is_none() {
            message.changes = sync::ChunkList::empty();
        }
        // Counted from the bytes before Automerge applies them.
        if let Err(e) = self.config.limits.check_sync_message(&message) {
            return self.peer_error(peer, ErrorCode::BadDocument, e.to_string(), Some(id));
        }
        match self.touch(&id) {
            Touched::Live(_) => self.sync_live(now, peer, id, message, writable, permit, fx),
            Touched::Absent => {
                self.sync_absent(now, peer, id, collection, message, writable, permit, fx)
            }
            // A tombstone is final: content for a deleted id is answered with it (if the peer
            // may know of it).
            Touched::Deleted => self.send_whole(peer, id),
            Touched::Broken(reason) => self.peer_error(
                peer,
                ErrorCode::Internal,
                format!("document is unreadable here: {reason}"),
                Some(id),
            ),
        }
    }

    /// A sync message for a document we have. Its heads can move only if it carried changes,
    /// and it carries changes only with a permit.
    #[allow(clippy::too_many_arguments)]
    fn sync_live(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        message: sync::Message,
        writable: bool,
        permit: Option<Permit>,
        fx: &mut Effects,
    ) {
        let outcome = {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let Some(super::Entry {
                state: DocState::Live(live),
                ..
            }) = self.docs.get_mut(&id)
            else {
                return;
            };
            if !p.scope.contains(&live.collection) {
                Err(OUTSIDE_SCOPE.to_owned())
            } else {
                let state = state_of(p, id, writable);
                let before = live.doc.get_heads();
                match live.doc.receive_sync_message(state, message) {
                    Err(e) => Err(format!("sync message rejected: {e}")),
                    Ok(()) => Ok((live.doc.get_heads() != before).then_some(before)),
                }
            }
        };
        match (outcome, permit) {
            (Err(message), _) => {
                return self.peer_error(peer, ErrorCode::BadDocument, message, Some(id));
            }
            (Ok(Some(before)), Some(permit)) => {
                match self.record_change_checked(now, id, &before, By::Peer(permit), fx) {
                    Ok(heads) => self.ack(peer, id, &heads),
                    Err(e) => {
                        // Undone (the document is restored); the session's sync state counted
                        // the refused changes as received, so it starts over.
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.states.remove(&id);
                        }
                        return self.peer_error(
                            peer,
                            ErrorCode::BadDocument,
                            e.to_string(),
                            Some(id),
                        );
                    }
                }
            }
            (Ok(Some(_)), None) => {
                // Cannot happen: without a permit the message's changes were dropped. Should
                // it ever, memory must not run ahead of storage: forget the document.
                tracing::error!(doc = %id, "a sync message without a permit changed a document; reloading it");
                debug_assert!(false, "heads moved without a permit");
                self.docs.remove(&id);
                return;
            }
            (Ok(None), _) => {}
        }
        self.reply_sync(peer, id);
    }

    /// Answers a received sync message from the session's state, unless the answer would only
    /// echo what is already on its way.
    fn reply_sync(&mut self, peer: PeerId, id: DocumentId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(super::Entry {
            state: DocState::Live(live),
            ..
        }) = self.docs.get_mut(&id)
        else {
            return;
        };
        let Some(state) = p.states.get_mut(&id) else {
            return;
        };
        if let Some(reply) = live.doc.generate_sync_message(state)
            && !is_echo(&reply, state)
        {
            p.outbox.push(SyncItem {
                id,
                collection: live.collection.clone(),
                payload: Payload::Sync(reply.encode()),
            });
        }
    }

    /// A sync message for a document we do not have: it starts from an empty document, which
    /// becomes real once it has changes (only with a permit).
    #[allow(clippy::too_many_arguments)]
    fn sync_absent(
        &mut self,
        now: i64,
        peer: PeerId,
        id: DocumentId,
        collection: String,
        message: sync::Message,
        writable: bool,
        permit: Option<Permit>,
        fx: &mut Effects,
    ) {
        // A peer that may not write here learns nothing from us about an id we do not have
        // (an on-demand peer, that it is unavailable).
        if !writable {
            return self.not_here(peer, id, false);
        }
        // Neither side has any of it: for an on-demand peer (automerge-repo's `request` of a
        // document nobody has), unavailable rather than an empty sync round.
        let peer_has_none = message.heads.is_empty() && message.changes.is_empty();
        let mut doc = self.empty.clone();
        let received = {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let state = p.states.entry(id).or_default();
            doc.receive_sync_message(state, message)
        };
        if let Err(e) = received {
            return self.peer_error(
                peer,
                ErrorCode::BadDocument,
                format!("sync message rejected: {e}"),
                Some(id),
            );
        }
        if doc.get_heads().is_empty() {
            if peer_has_none && self.peers.get(&peer).is_some_and(|p| p.on_demand()) {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.states.remove(&id);
                }
                return self.not_here(peer, id, false);
            }
            // Nothing to store yet: ask for what the peer has.
            return self.reply_absent(peer, id, collection, &mut doc);
        }
        let stored = match (permit, self.new_document_body(&doc)) {
            (Some(permit), Ok(body)) => {
                let snapshot = doc.save();
                self.insert_received(
                    now,
                    peer,
                    permit,
                    collection.clone(),
                    &doc,
                    body,
                    snapshot,
                    fx,
                );
                self.reply_absent(peer, id, collection, &mut doc);
                Ok(())
            }
            (Some(_), Err(e)) => Err(Some(e)),
            (None, _) => Err(None),
        };
        if let Err(refused) = stored {
            // Nothing applied: forget what the message taught the session, so a later offer
            // starts over.
            if let Some(p) = self.peers.get_mut(&peer) {
                p.states.remove(&id);
            }
            if let Some(e) = refused {
                self.peer_error(peer, ErrorCode::BadDocument, e.to_string(), Some(id));
            }
        }
    }

    /// Answers a sync message about a document we do not have (yet) from the empty document
    /// it was received into.
    fn reply_absent(
        &mut self,
        peer: PeerId,
        id: DocumentId,
        collection: String,
        doc: &mut Automerge,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(state) = p.states.get_mut(&id) else {
            return;
        };
        if let Some(reply) = doc.generate_sync_message(state) {
            p.outbox.push(SyncItem {
                id,
                collection,
                payload: Payload::Sync(reply.encode()),
            });
        }
    }

    /// A document new here, received from `peer`: stored as `bytes` (its saved form) and
    /// acknowledged.
    #[allow(clippy::too_many_arguments)]
    fn insert_received(
        &mut self,
        now: i64,
        peer: PeerId,
        permit: Permit,
        collection: String,
        doc: &Automerge,
        body: String,
        bytes: Vec<u8>,
        fx: &mut Effects,
    ) {
        let id = permit.doc();
        let heads = doc.get_heads();
        self.insert_new(
            now,
            id,
            collection,
            heads.clone(),
            body,
            bytes,
            By::Peer(permit),
            fx,
        );
        self.ack(peer, id, &heads);
    }
}
