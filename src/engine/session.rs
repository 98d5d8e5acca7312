//! Replication sessions: one [`Peer`] per connection, identified by a driver-chosen [`PeerId`].
//!
//! The handshake (Hello/Welcome, auth) is the driver's; the engine's session starts at
//! `Input::PeerConnected`. This module holds a session's state and lifecycle, flow control,
//! and the **role table**: which messages each side may send. The rest of replication lives
//! beside it, by job: `reconcile.rs` (finding the documents that differ), `receive.rs` (applying
//! a peer's sync items), `fanout.rs` (what we send: live changes, whole documents, frames),
//! `access.rs` (the one gate every peer-caused write passes).
//!
//! **Roles.** The *initiator* is the side that connected (a client); the *responder* accepts
//! (the relay). A message out of its sender's role — `Entries` that answer no `Summary` of
//! ours, a `Summary` or `Persisted` from the wrong side, a handshake message inside a session —
//! is refused with `Error { Unexpected }` and ends the session ([`PeerEvent::Closed`]): a
//! correct peer never sends one, so the engine acts on none of it.
//!
//! | message | initiator sends | responder sends |
//! |---|---|---|
//! | `Summary` | yes | no |
//! | `Entries` | no | yes, once per `Summary` it received |
//! | `Sync` | yes | yes |
//! | `Persisted` | no | yes |
//! | `Error` | yes | yes |
//! | `Hello`, `Welcome`, `Reject` | handshake only (the driver's) | handshake only |
//! | `Ping`, `Pong` | the driver's | the driver's |

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::ChangeHash;
use automerge::sync;

use super::receive::PeerWork;
use super::{Effects, Engine, Work};
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::{CatalogEntry, ErrorCode, Message, SyncItem};
use crate::scope::{Access, CreateLimit, Interest, Scope};
use crate::store::StoreError;

/// How long an initiator waits after the last sync traffic before checking again that both
/// sides are in sync.
pub const RESYNC_QUIET_MS: i64 = 20;

/// A connection, as the driver numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// What the engine reports about a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// Reconciliation found no difference: both sides hold the same versions of every
    /// document in scope (as of this moment).
    InSync,
    /// The peer says these heads of these documents are durable on its side.
    Persisted(Vec<(DocumentId, Vec<ChangeHash>)>),
    /// The peer reported an error.
    Error {
        code: ErrorCode,
        message: String,
        doc: Option<DocumentId>,
    },
    /// Ephemeral data about a document (presence, cursors) from the peer, already passed on
    /// to the other sessions that may read the document.
    Ephemeral {
        doc: DocumentId,
        data: Vec<u8>,
        sender: String,
    },
    /// A session that follows documents on demand ([`Interest::OnDemand`]) asked about a
    /// document that is not here for it: unknown (and the peer has none of it either),
    /// deleted, in another collection, or one it may not read — all alike, so the peer
    /// learns nothing more. (automerge-repo's `doc-unavailable`.)
    Unavailable { doc: DocumentId },
    /// The engine ended the session: the peer sent a message out of its role. The engine has
    /// forgotten the session (its later messages are ignored) and queued an `Error` frame
    /// saying why; the driver sends that frame, then closes the connection.
    Closed { reason: String },
}

/// One session.
pub(crate) struct Peer {
    pub(crate) remote: ReplicaId,
    /// The collections the peer reads.
    pub(crate) scope: Scope,
    /// The collections the peer may write (checked only where it is also readable).
    pub(crate) write: Scope,
    /// Which documents of its scope the peer follows.
    pub(crate) interest: Interest,
    /// How other sessions see the peer as the sender of ephemeral messages.
    pub(crate) label: String,
    /// On demand: the documents the peer asked about in this session.
    pub(crate) followed: HashSet<DocumentId>,
    /// Documents the peer may still create in the current minute (see [`CreateBudget`]).
    pub(crate) creates: Option<CreateBudget>,
    /// Initiator: documents the peer refused (a write it forbids, a create over its limit), and
    /// until when to leave them out of reconciliation (`i64::MAX`: this session).
    pub(crate) rejected: HashMap<DocumentId, i64>,
    /// Initiator: when the first rate-limited document may be offered again.
    pub(crate) retry_at: Option<i64>,
    pub(crate) initiator: bool,
    /// Automerge sync state per document, loaded from storage on first use in the session.
    pub(crate) states: HashMap<DocumentId, sync::State>,
    /// Sync states being read from storage.
    pub(crate) loading_states: HashSet<DocumentId>,
    /// The shared heads each state had when read from storage: on disconnect, only states
    /// that moved on are written back.
    pub(crate) stored_heads: HashMap<DocumentId, Vec<ChangeHash>>,
    /// Responder: the initiator's summary, until ours is read to compare.
    pub(crate) their_summary: Option<Vec<u64>>,
    /// Initiator: the responder's entries, until ours are read to diff.
    pub(crate) their_entries: Option<Vec<CatalogEntry>>,
    /// Responder: the differing buckets whose entries are being read.
    pub(crate) reply_buckets: Vec<u8>,
    pub(crate) outbox: Vec<SyncItem>,
    pub(crate) persisted: Vec<(DocumentId, Vec<[u8; 32]>)>,
    pub(crate) errors: Vec<Message>,
    /// On demand: documents to report as [`PeerEvent::Unavailable`].
    pub(crate) unavailable: Vec<DocumentId>,
    /// Sync traffic since the last announcement (initiator).
    pub(crate) busy: bool,
    /// A Summary is out and its answer not yet in (initiator).
    pub(crate) announced: bool,
    pub(crate) last_activity: i64,
    /// The driver's outgoing queue for this peer is over its high-water mark.
    pub(crate) paused: bool,
    /// While paused: the documents whose live changes the peer has not been sent yet, and
    /// what to send (one entry per document however many changes it had: coalescing).
    pub(crate) held: BTreeMap<DocumentId, (Held, String)>,
}

/// The documents a peer may still create: a token bucket of `limit.burst` creates refilled
/// at `limit.per_minute` (see [`CreateLimit`]).
pub(crate) struct CreateBudget {
    pub(crate) limit: CreateLimit,
    /// Creates available, in thousandths (integer arithmetic, no drift).
    milli_tokens: u64,
    refilled_at: i64,
}

impl CreateBudget {
    fn new(limit: CreateLimit, now: i64) -> Self {
        let budget = CreateBudget {
            limit,
            milli_tokens: 0,
            refilled_at: now,
        };
        CreateBudget {
            milli_tokens: budget.capacity(),
            ..budget
        }
    }

    fn capacity(&self) -> u64 {
        u64::from(self.limit.at_once()) * 1000
    }

    /// Takes one create from the budget; false when it is spent.
    pub(crate) fn take(&mut self, now: i64) -> bool {
        let elapsed = u64::try_from(now - self.refilled_at).unwrap_or(0);
        // per_minute creates per 60,000 ms = per_minute / 60 milli-creates per ms.
        let refill = elapsed.saturating_mul(u64::from(self.limit.per_minute)) / 60;
        if refill > 0 {
            self.milli_tokens = (self.milli_tokens.saturating_add(refill)).min(self.capacity());
            self.refilled_at = now;
        }
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// What a paused peer is owed for one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Held {
    /// Changes: an Automerge sync message from the session's sync state.
    Changes,
    /// The document is new to the peer: whole.
    Whole,
    /// It was deleted.
    Tombstone,
}

impl Peer {
    /// Whether the peer follows document `id` of `collection` (its stored collection): it is
    /// in the read scope and, for an on-demand session, the peer asked about it.
    pub(crate) fn follows(&self, id: &DocumentId, collection: &str) -> bool {
        self.scope.contains(collection)
            && (self.interest == Interest::Catalog || self.followed.contains(id))
    }

    /// Whether the peer's sync states are stored beyond the session (and so read from storage
    /// on first use).
    pub(crate) fn keeps_states(&self) -> bool {
        !matches!(self.interest, Interest::OnDemand { durable: false })
    }

    /// An on-demand session (see [`Interest::OnDemand`]).
    pub(crate) fn on_demand(&self) -> bool {
        matches!(self.interest, Interest::OnDemand { .. })
    }

    /// Forgets what [`Engine::recover`] cannot trust after a panic: sync states (a fresh one
    /// costs bytes, not correctness), reads in flight and items not yet sent.
    pub(crate) fn forget_volatile(&mut self) {
        self.states.clear();
        self.loading_states.clear();
        self.stored_heads.clear();
        self.their_summary = None;
        self.their_entries = None;
        self.reply_buckets.clear();
        self.outbox.clear();
        self.persisted.clear();
        self.errors.clear();
        self.unavailable.clear();
    }

    /// An initiator whose session has been quiet long enough to check again.
    fn due(&self, now: i64) -> bool {
        self.initiator
            && !self.announced
            && (self.busy && now - self.last_activity >= RESYNC_QUIET_MS
                || self.retry_at.is_some_and(|t| t <= now))
    }

    /// Whether reconciliation leaves `id` out: the peer refused it, and not long ago.
    pub(crate) fn refused(&self, id: &DocumentId, now: i64) -> bool {
        self.rejected.get(id).is_some_and(|until| *until > now)
    }

    /// Why `message` is out of the sender's role at this point of the session, if it is.
    /// `self.initiator` is *our* role; the sender has the other one.
    fn out_of_role(&self, message: &Message) -> Option<String> {
        let sender = if self.initiator {
            "the responder"
        } else {
            "the initiator"
        };
        let allowed = match message {
            Message::Summary { .. } => !self.initiator,
            Message::Entries { .. } => self.initiator && self.announced,
            Message::Sync { .. } | Message::Error { .. } | Message::Ephemeral { .. } => true,
            Message::Persisted { .. } => self.initiator,
            Message::Hello { .. } | Message::Welcome { .. } | Message::Reject { .. } => false,
            // Keepalive belongs to the driver; one that reaches the engine is harmless.
            Message::Ping { .. } | Message::Pong { .. } => true,
        };
        if allowed {
            return None;
        }
        Some(match message {
            Message::Entries { .. } if self.initiator => {
                "Entries that answer no Summary of ours".to_owned()
            }
            Message::Hello { .. } | Message::Welcome { .. } | Message::Reject { .. } => {
                format!(
                    "{} inside a session (the handshake is over)",
                    message.kind()
                )
            }
            other => format!("{sender} does not send {}", other.kind()),
        })
    }
}

impl Engine {
    pub(crate) fn peer_connected(
        &mut self,
        now: i64,
        peer: PeerId,
        remote: ReplicaId,
        access: Access,
        initiator: bool,
        fx: &mut Effects,
    ) {
        self.peers.insert(
            peer,
            Peer {
                remote,
                scope: access.read,
                write: access.write,
                interest: access.interest,
                label: access.label.unwrap_or_else(|| remote.to_string()),
                followed: HashSet::new(),
                creates: access.creates.map(|limit| CreateBudget::new(limit, now)),
                rejected: HashMap::new(),
                retry_at: None,
                initiator,
                states: HashMap::new(),
                loading_states: HashSet::new(),
                stored_heads: HashMap::new(),
                their_summary: None,
                their_entries: None,
                reply_buckets: Vec::new(),
                outbox: Vec::new(),
                persisted: Vec::new(),
                errors: Vec::new(),
                unavailable: Vec::new(),
                busy: false,
                announced: false,
                last_activity: now,
                paused: false,
                held: BTreeMap::new(),
            },
        );
        if initiator {
            self.announce(peer, fx);
        }
    }

    /// The session ended: its sync states that advanced are persisted, its queued work dropped.
    pub(crate) fn peer_disconnected(&mut self, peer: PeerId, fx: &mut Effects) {
        self.queue
            .retain(|w| !matches!(w, Work::Peer(p, _) if *p == peer));
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        if !p.keeps_states() {
            return;
        }
        for (id, state) in p.states {
            if !state.shared_heads.is_empty()
                && p.stored_heads.get(&id) != Some(&state.shared_heads)
            {
                fx.writes.push(super::StorageOp::PutSyncState {
                    peer: p.remote,
                    id,
                    state: state.encode(),
                });
            }
        }
    }

    /// Ends a session whose peer broke the protocol: the `Error` frame saying why goes out
    /// (after this step's commit, like every frame), the session is forgotten, and the driver
    /// is told to close the connection.
    fn peer_violation(&mut self, peer: PeerId, reason: String, fx: &mut Effects) {
        tracing::warn!(?peer, %reason, "peer broke the protocol; ending its session");
        fx.send.push((
            peer,
            Message::Error {
                code: ErrorCode::Unexpected,
                message: reason.clone(),
                doc: None,
            },
        ));
        self.peer_disconnected(peer, fx);
        fx.peer_events.push((peer, PeerEvent::Closed { reason }));
    }

    /// Whether `work` waits for a sync state that is not in memory yet.
    pub(crate) fn state_missing(&self, peer: PeerId, work: &PeerWork) -> bool {
        work.needs_state()
            && self
                .peers
                .get(&peer)
                .is_some_and(|p| p.keeps_states() && !p.states.contains_key(&work.doc()))
    }

    /// Whether the sync state `work` waits for is being read.
    pub(crate) fn state_requested(&self, peer: PeerId, work: &PeerWork) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.loading_states.contains(&work.doc()))
    }

    /// Asks for the sync states that queued work needs (looking ahead, to batch the reads).
    pub(crate) fn request_states(&mut self, lookahead: usize, fx: &mut Effects) {
        for work in self.queue.iter().take(lookahead) {
            let Work::Peer(peer, w) = work else {
                continue;
            };
            if !w.needs_state() {
                continue;
            }
            let Some(p) = self.peers.get_mut(peer).filter(|p| p.keeps_states()) else {
                continue;
            };
            let id = w.doc();
            if !p.states.contains_key(&id) && p.loading_states.insert(id) {
                fx.sync_state_reads.push((*peer, p.remote, id));
            }
        }
    }

    /// The answer to a sync state read. An unreadable state is replaced by a fresh one: the
    /// sync protocol then starts from nothing, which costs bytes, not correctness.
    pub(crate) fn state_loaded(
        &mut self,
        peer: PeerId,
        id: DocumentId,
        result: Result<Option<Vec<u8>>, StoreError>,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.loading_states.remove(&id);
        let state = match result {
            Ok(Some(bytes)) => sync::State::decode(&bytes).unwrap_or_else(|e| {
                tracing::warn!(doc = %id, error = %e, "stored sync state does not decode; starting over");
                sync::State::new()
            }),
            Ok(None) => sync::State::new(),
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "reading the sync state failed; starting over");
                sync::State::new()
            }
        };
        if !state.shared_heads.is_empty() {
            p.stored_heads.insert(id, state.shared_heads.clone());
        }
        p.states.entry(id).or_insert(state);
    }

    /// Flow control (see [`super::Input::PeerFlow`]). On resume, every held document is sent
    /// in its current version.
    pub(crate) fn peer_flow(&mut self, peer: PeerId, paused: bool, fx: &mut Effects) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.paused = paused;
        if paused {
            tracing::debug!(?peer, "peer paused: coalescing its live changes");
            return;
        }
        let held = std::mem::take(&mut p.held);
        tracing::debug!(?peer, documents = held.len(), "peer resumed");
        for (id, (what, collection)) in held {
            match what {
                Held::Tombstone => self.push_tombstone(peer, id, collection),
                Held::Whole if !self.docs.contains_key(&id) => fx.whole_reads.push((peer, id)),
                Held::Whole => self
                    .queue
                    .push_back(Work::Peer(peer, PeerWork::SendWhole(id))),
                Held::Changes => self
                    .queue
                    .push_back(Work::Peer(peer, PeerWork::SendSync(id))),
            }
        }
    }

    /// Whether a `Tick` now would do anything (lets drivers skip a storage transaction).
    pub fn wants_tick(&self, now: i64) -> bool {
        self.peers.values().any(|p| p.due(now)) || self.sweep_due(now)
    }

    /// Whether idle documents are loaded and due to be unloaded.
    pub(crate) fn sweep_due(&self, now: i64) -> bool {
        !self.docs.is_empty()
            && now - self.last_sweep >= (self.config.idle_unload_ms / 4).max(1)
            && self
                .docs
                .values()
                .any(|e| now - e.used_at >= self.config.idle_unload_ms)
    }

    /// Initiators whose session went quiet check again that they are in sync.
    pub(crate) fn peer_tick(&mut self, now: i64, fx: &mut Effects) {
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.due(now))
            .map(|(id, _)| *id)
            .collect();
        for peer in due {
            self.announce(peer, fx);
        }
    }

    /// A message from a peer: checked against the role table, then handed to the part of the
    /// engine whose job it is.
    pub(crate) fn peer_message(
        &mut self,
        now: i64,
        peer: PeerId,
        message: Message,
        fx: &mut Effects,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            tracing::debug!(?peer, "message for an unknown peer");
            return;
        };
        if let Some(reason) = p.out_of_role(&message) {
            return self.peer_violation(peer, reason, fx);
        }
        match message {
            Message::Summary { count: _, buckets } => self.on_summary(peer, buckets, fx),
            Message::Entries { buckets, entries } => self.on_entries(peer, buckets, entries, fx),
            Message::Sync { batch } => self.on_sync(now, peer, batch, fx),
            Message::Persisted { docs } => {
                let docs = docs
                    .into_iter()
                    .map(|(id, heads)| (id, heads.into_iter().map(ChangeHash).collect()))
                    .collect();
                fx.peer_events.push((peer, PeerEvent::Persisted(docs)));
            }
            Message::Error { code, message, doc } => {
                // The peer refused a document: leave it out of reconciliation, or every round
                // would offer it again.
                if let Some(id) = doc.filter(|_| p.initiator) {
                    match code {
                        // Refused for good in this session: a write the token forbids, or a
                        // document the peer will not take (beyond its limits, unloadable).
                        ErrorCode::Forbidden | ErrorCode::BadDocument => {
                            p.rejected.insert(id, i64::MAX);
                        }
                        ErrorCode::RateLimited => {
                            let until = now + self.config.rate_limited_retry_ms;
                            p.rejected.insert(id, until);
                            p.retry_at = Some(p.retry_at.map_or(until, |t| t.min(until)));
                        }
                        _ => {}
                    }
                }
                fx.peer_events
                    .push((peer, PeerEvent::Error { code, message, doc }))
            }
            Message::Ephemeral { doc, data, sender } => {
                self.on_ephemeral(peer, doc, data, sender, fx)
            }
            Message::Ping { .. } | Message::Pong { .. } => {
                tracing::debug!(?peer, "keepalive reached the engine; the driver answers it")
            }
            // Refused by the role table above.
            Message::Hello { .. } | Message::Welcome { .. } | Message::Reject { .. } => {}
        }
    }

    /// Acknowledges stored changes to the peer. Only the responder (the relay) acknowledges:
    /// its `Persisted` tells a client that its writes are durable on the relay. The relay
    /// keeps no per-client durability record, so acks from the initiator would be a frame
    /// and a relay step per received change for nothing.
    pub(crate) fn ack(&mut self, peer: PeerId, id: DocumentId, heads: &[ChangeHash]) {
        // An on-demand peer (automerge-repo) has no such message.
        if let Some(p) = self
            .peers
            .get_mut(&peer)
            .filter(|p| !p.initiator && !p.on_demand())
        {
            p.persisted.push((id, heads.iter().map(|h| h.0).collect()));
        }
    }

    /// A document the peer asked about is not here for it (it exists only if `exists`, and
    /// then the peer may not read it or asked under another collection). An on-demand peer
    /// hears [`PeerEvent::Unavailable`] whatever the reason; a catalog peer hears of a
    /// document that exists as "outside this session's scope".
    pub(crate) fn not_here(&mut self, peer: PeerId, id: DocumentId, exists: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.on_demand() {
            p.unavailable.push(id);
        } else if exists {
            let outside = super::access::OUTSIDE_SCOPE.to_owned();
            self.peer_error(peer, ErrorCode::Forbidden, outside, Some(id));
        }
    }

    /// Reports an error about one item (or the session) to the peer; the session goes on.
    pub(crate) fn peer_error(
        &mut self,
        peer: PeerId,
        code: ErrorCode,
        message: String,
        doc: Option<DocumentId>,
    ) {
        tracing::warn!(?peer, ?code, %message, ?doc, "rejected a sync item");
        if let Some(p) = self.peers.get_mut(&peer) {
            p.errors.push(Message::Error { code, message, doc });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_budget_allows_the_burst_then_the_rate() {
        let limit = CreateLimit {
            per_minute: 600,
            burst: 1000,
        };
        let mut budget = CreateBudget::new(limit, 0);
        assert_eq!((0..1500).filter(|_| budget.take(0)).count(), 1000);
        // 600 a minute: 10 a second.
        assert_eq!((0..50).filter(|_| budget.take(1000)).count(), 10);
        assert!(
            !budget.take(1050),
            "5 ms after: less than one create refilled"
        );
        assert!(budget.take(1100));
        // A long pause refills up to the burst, not beyond.
        assert_eq!((0..5000).filter(|_| budget.take(10_000_000)).count(), 1000);
        // Without a burst, a minute's worth at once.
        let mut small = CreateBudget::new(
            CreateLimit {
                per_minute: 3,
                burst: 0,
            },
            0,
        );
        assert_eq!((0..5).filter(|_| small.take(0)).count(), 3);
        assert!(small.take(20_000), "one create refills in 20 s");
        assert!(!small.take(20_000));
    }
}
