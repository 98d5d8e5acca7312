//! What we send to peers: live fan-out of committed changes, whole documents, tombstones, and
//! packing a step's items into frames.
//!
//! **Live.** Every committed change is pushed to every peer whose scope covers its collection:
//! a created document whole, an edit as an Automerge sync message (per-peer sync state), a
//! delete as a tombstone. Items for one peer produced in one step go out in as few frames as
//! [`TARGET_FRAME_BYTES`] allows. Nothing leaves for a peer that may not read the document's
//! stored collection.

use automerge::sync::{self, SyncDoc};

use super::access::{OUTSIDE_SCOPE, state_of};
use super::doc::DocState;
use super::receive::PeerWork;
use super::session::{Held, Peer, PeerId};
use super::{ChangeEvent, ChangeKind, Effects, Engine, Origin, Touched, Work};
use crate::id::DocumentId;
use crate::protocol::{
    ErrorCode, MAX_EPHEMERAL_BYTES, Message, Payload, SyncItem, TARGET_FRAME_BYTES,
};
use crate::store::StoreError;

/// More changes by another process than this in one step are left to reconciliation.
const EXTERNAL_BURST: usize = 1000;

impl Engine {
    /// Changes another process committed to our storage: each goes to the sessions like one
    /// of ours. A burst (a bulk import next to us) is left to reconciliation instead: our
    /// initiator sessions announce again, which costs a summary, not a frame per document.
    pub(crate) fn external(&mut self, events: Vec<ChangeEvent>, fx: &mut Effects) {
        if events.is_empty() || self.peers.is_empty() {
            return;
        }
        tracing::debug!(
            changes = events.len(),
            "changes committed by another process"
        );
        let burst = events.len() > EXTERNAL_BURST;
        if burst {
            for p in self.peers.values_mut().filter(|p| p.initiator) {
                p.busy = true;
            }
        }
        for event in events {
            let (id, collection, kind, origin) =
                (event.id, event.collection, event.kind, event.origin);
            self.fan_out_where(id, &collection, kind, origin, fx, |p| {
                !(burst && p.initiator)
            });
        }
    }

    /// Live fan-out of a committed change to every session in scope (the origin peer excepted:
    /// it has the change, and was answered where it was received).
    pub(crate) fn fan_out(
        &mut self,
        id: DocumentId,
        collection: &str,
        kind: ChangeKind,
        origin: Origin,
        fx: &mut Effects,
    ) {
        self.fan_out_where(id, collection, kind, origin, fx, |_| true);
    }

    /// [`fan_out`](Self::fan_out) to the sessions that `include` accepts.
    fn fan_out_where(
        &mut self,
        id: DocumentId,
        collection: &str,
        kind: ChangeKind,
        origin: Origin,
        fx: &mut Effects,
        include: impl Fn(&Peer) -> bool,
    ) {
        if self.peers.is_empty() {
            return;
        }
        let targets: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| include(p))
            .filter(|(_, p)| p.follows(&id, collection))
            // An on-demand session's sync state knows what its peer sent (two of them may
            // share a replica id: browser tabs of one storage).
            .filter(|(_, p)| p.on_demand() || !matches!(origin, Origin::Peer(r) if p.remote == r))
            .map(|(id, _)| *id)
            .collect();
        for peer in targets {
            let on_demand = self.peers.get(&peer).is_some_and(Peer::on_demand);
            // An on-demand peer gets documents as sync messages, never whole.
            let kind = match kind {
                ChangeKind::Created if on_demand => ChangeKind::Updated,
                kind => kind,
            };
            if let Some(p) = self.peers.get_mut(&peer).filter(|p| p.paused) {
                let what = match kind {
                    ChangeKind::Deleted => Held::Tombstone,
                    ChangeKind::Created => Held::Whole,
                    ChangeKind::Updated => Held::Changes,
                };
                // The stronger need wins: a tombstone over anything, whole over changes.
                let slot = p
                    .held
                    .entry(id)
                    .or_insert_with(|| (what, collection.to_owned()));
                slot.0 = slot.0.max(what);
                continue;
            }
            match kind {
                ChangeKind::Deleted => self.push_tombstone(peer, id, collection.to_owned()),
                ChangeKind::Created if !self.docs.contains_key(&id) => {
                    // Committed by another process: sent from storage.
                    fx.whole_reads.push((peer, id));
                }
                ChangeKind::Created => {
                    if let Some((collection, bytes)) = self.whole(id) {
                        self.push(
                            peer,
                            SyncItem {
                                id,
                                collection,
                                payload: Payload::Whole(bytes),
                            },
                        );
                    }
                }
                ChangeKind::Updated => {
                    let Some(p) = self.peers.get_mut(&peer) else {
                        continue;
                    };
                    let in_memory = matches!(
                        self.docs.get(&id).map(|e| &e.state),
                        Some(DocState::Live(_))
                    );
                    if on_demand || !p.states.contains_key(&id) || !in_memory {
                        // First change of this document in the session: its stored sync state
                        // must be read first. (An on-demand peer's document may not even be
                        // in memory: the work loads it; nor one another process changed, whose
                        // stale copy was dropped.)
                        p.busy = true;
                        self.queue
                            .push_back(Work::Peer(peer, PeerWork::SendSync(id)));
                        continue;
                    }
                    self.send_sync(peer, id);
                }
            }
        }
    }

    /// Ephemeral data from this replica's API: sent at once to every session that may read the
    /// document's stored collection, never stored. Returns how many sessions it went to.
    pub(crate) fn broadcast(
        &mut self,
        id: DocumentId,
        data: Vec<u8>,
        fx: &mut Effects,
    ) -> Result<super::Output, crate::Error> {
        let sessions = self.send_ephemeral(id, data, None, fx)?;
        Ok(super::Output::Broadcast { sessions })
    }

    /// Passes ephemeral data on to every session (but `from`, the peer it came from, with the
    /// sender it named) that may read the document's stored collection; the sender, if a
    /// peer, must be able to read it too, and hears of it as a
    /// [`PeerEvent::Ephemeral`](super::PeerEvent::Ephemeral). The relay names the sender (its
    /// session's label: nobody speaks for another session); a client keeps its relay's name
    /// for it; our own are named by our replica id.
    pub(crate) fn send_ephemeral(
        &mut self,
        id: DocumentId,
        data: Vec<u8>,
        from: Option<(PeerId, String)>,
        fx: &mut Effects,
    ) -> Result<usize, crate::Error> {
        let (from, named) = match from {
            Some((peer, named)) => (Some(peer), Some(named)),
            None => (None, None),
        };
        if data.len() > MAX_EPHEMERAL_BYTES {
            return Err(crate::Error::TooLarge {
                what: "ephemeral data",
                size: data.len(),
                limit: MAX_EPHEMERAL_BYTES,
            });
        }
        let collection = match self.touch(&id) {
            Touched::Live(live) => live.collection.clone(),
            Touched::Deleted => return Err(crate::Error::Deleted(id)),
            Touched::Absent => return Err(crate::Error::NotFound(id)),
            Touched::Broken(reason) => return Err(crate::Error::Corrupt { id, reason }),
        };
        if from.is_some_and(|peer| !self.may_read(peer, &collection)) {
            return Err(crate::Error::NotFound(id));
        }
        let sender = match (from.and_then(|peer| self.peers.get(&peer)), named) {
            (Some(p), Some(named)) if p.initiator => named,
            (Some(p), _) => p.label.clone(),
            (None, _) => self.replica_id().to_string(),
        };
        let targets: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(peer, p)| Some(**peer) != from && p.follows(&id, &collection))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &targets {
            fx.send.push((
                *peer,
                Message::Ephemeral {
                    doc: id,
                    data: data.clone(),
                    sender: sender.clone(),
                },
            ));
        }
        if let Some(peer) = from {
            fx.peer_events.push((
                peer,
                super::PeerEvent::Ephemeral {
                    doc: id,
                    data,
                    sender,
                },
            ));
        }
        Ok(targets.len())
    }

    /// Queues the session's next Automerge sync message for a loaded document, if there is
    /// anything to say.
    pub(crate) fn send_sync(&mut self, peer: PeerId, id: DocumentId) {
        let writable = self
            .peers
            .get(&peer)
            .is_some_and(|p| self.stored_in(id).is_some_and(|c| p.may_write(c)));
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
            return;
        }
        let state = state_of(p, id, writable);
        if let Some(msg) = live.doc.generate_sync_message(state) {
            p.busy = true;
            p.outbox.push(SyncItem {
                id,
                collection: live.collection.clone(),
                payload: Payload::Sync(msg.encode()),
            });
        }
    }

    /// Sends a document whole (or its tombstone) from its stored bytes (see
    /// `Effects::whole_reads`), if the peer may read its stored collection.
    pub(crate) fn whole_from_storage(
        &mut self,
        peer: PeerId,
        id: DocumentId,
        result: Result<Option<super::StoredDoc>, StoreError>,
    ) {
        match result {
            Ok(Some(stored)) if !self.may_read(peer, &stored.collection) => {
                self.peer_error(peer, ErrorCode::Forbidden, OUTSIDE_SCOPE.into(), Some(id))
            }
            Ok(Some(stored)) if stored.deleted => self.push_tombstone(peer, id, stored.collection),
            Ok(Some(stored)) => {
                let bytes = stored.chunks.into_iter().flat_map(|c| c.bytes).collect();
                self.push(
                    peer,
                    SyncItem {
                        id,
                        collection: stored.collection,
                        payload: Payload::Whole(bytes),
                    },
                );
            }
            Ok(None) => {}
            Err(e) => self.peer_error(
                peer,
                ErrorCode::Internal,
                format!("reading the document failed: {e}"),
                Some(id),
            ),
        }
    }

    /// Sends a document in memory whole, or its tombstone, if the peer may read it (a `Want`,
    /// or reconciliation found the peer lacks it).
    pub(crate) fn send_whole(&mut self, peer: PeerId, id: DocumentId) {
        let Some(collection) = self.readable(peer, id) else {
            let exists = self.stored_in(id).is_some();
            return self.not_here(peer, id, exists);
        };
        if matches!(
            self.docs.get(&id).map(|e| &e.state),
            Some(DocState::Deleted { .. })
        ) {
            return self.push_tombstone(peer, id, collection);
        }
        if self.peers.get(&peer).is_some_and(Peer::on_demand) {
            // Never whole to an on-demand peer: a sync message from its state.
            self.queue
                .push_back(Work::Peer(peer, PeerWork::SendSync(id)));
            return;
        }
        if let Some((collection, bytes)) = self.whole(id) {
            self.push(
                peer,
                SyncItem {
                    id,
                    collection,
                    payload: Payload::Whole(bytes),
                },
            );
        }
    }

    /// The whole document as bytes, if we have it live.
    pub(crate) fn whole(&mut self, id: DocumentId) -> Option<(String, Vec<u8>)> {
        if let Some(super::Entry {
            state:
                DocState::Saved {
                    collection,
                    snapshot,
                },
            ..
        }) = self.docs.get(&id)
        {
            return Some((collection.clone(), snapshot.clone()));
        }
        match self.touch(&id) {
            Touched::Live(live) => Some((live.collection.clone(), live.doc.save())),
            _ => None,
        }
    }

    pub(crate) fn push_tombstone(&mut self, peer: PeerId, id: DocumentId, collection: String) {
        self.push(
            peer,
            SyncItem {
                id,
                collection,
                payload: Payload::Tombstone,
            },
        );
    }

    /// Queues an item for the peer, if it may read the item's collection (the last check
    /// before anything leaves: every item we send names the document's stored collection).
    pub(crate) fn push(&mut self, peer: PeerId, item: SyncItem) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if !p.scope.contains(&item.collection) {
                tracing::error!(?peer, doc = %item.id, "an item outside the peer's scope; not sent");
                debug_assert!(false, "an item outside the peer's scope");
                return;
            }
            p.busy = true;
            p.outbox.push(item);
        }
    }

    /// Moves every peer's pending items into frames.
    pub(crate) fn flush_peers(&mut self, now: i64, fx: &mut Effects) {
        for (peer, p) in self.peers.iter_mut() {
            for error in p.errors.drain(..) {
                fx.send.push((*peer, error));
            }
            for doc in p.unavailable.drain(..) {
                fx.peer_events
                    .push((*peer, super::PeerEvent::Unavailable { doc }));
            }
            if !p.persisted.is_empty() {
                fx.send.push((
                    *peer,
                    Message::Persisted {
                        docs: std::mem::take(&mut p.persisted),
                    },
                ));
            }
            if p.outbox.is_empty() {
                continue;
            }
            p.last_activity = now;
            let mut batch = Vec::new();
            let mut size = 0;
            for item in p.outbox.drain(..) {
                let item_size = 40
                    + item.collection.len()
                    + match &item.payload {
                        Payload::Sync(b) | Payload::Whole(b) => b.len(),
                        Payload::Want | Payload::Tombstone => 0,
                    };
                if size + item_size > TARGET_FRAME_BYTES && !batch.is_empty() {
                    fx.send.push((
                        *peer,
                        Message::Sync {
                            batch: std::mem::take(&mut batch),
                        },
                    ));
                    size = 0;
                }
                size += item_size;
                batch.push(item);
            }
            fx.send.push((*peer, Message::Sync { batch }));
        }
    }
}

/// Whether a reply would only echo: it carries no changes and asks for none, and our heads are
/// changes already sent to the peer in this session. That happens on every live push that
/// crosses the peer's answer to the previous one; the peer's answer to the changes in flight
/// will tell us its new heads, so the reply would only start another round of heads and Bloom
/// filters (measured: 40% more frames to each receiver under a steady stream of changes).
/// Reconciliation would repair a session this ever stalled.
pub(crate) fn is_echo(reply: &sync::Message, state: &sync::State) -> bool {
    reply.changes.is_empty()
        && reply.need.is_empty()
        && !reply.heads.is_empty()
        && reply.heads.iter().all(|h| state.sent_hashes.contains(h))
}
