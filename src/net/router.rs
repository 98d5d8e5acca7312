//! Routes a replica's session frames to the connection tasks that own the sessions, and
//! measures each connection's outgoing queue for flow control.
//!
//! The replica hands every step's frames to one transport callback, after the commit and under
//! its lock, so frames for one peer arrive here in commit order. The router encodes them and
//! passes them to the connection's channel; the connection task writes them to its socket.
//!
//! **Flow control.** Each session counts the bytes queued for its socket. When a step leaves
//! more than [`HIGH_WATER`] queued, the router reports the peer to the replica as paused (its
//! live changes then coalesce per document in the engine instead of piling up here); when the
//! connection task has written the queue down to [`LOW_WATER`], it resumes the peer. So a slow
//! reader costs memory in proportion to the documents that changed, not to the changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Bytes;

use super::client::{SharedReport, Status};
use crate::Replica;
use crate::engine::{PeerEvent, PeerId};
use crate::protocol::{self, Message};

/// Queued bytes above which a peer is paused.
pub(crate) const HIGH_WATER: usize = 4 << 20;
/// Queued bytes at or below which a paused peer resumes.
pub(crate) const LOW_WATER: usize = 1 << 20;

/// What a connection task receives from its replica.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Frame),
    Event(PeerEvent),
}

/// An encoded protocol frame.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) bytes: Bytes,
    /// It carries sync items (documents or changes).
    pub(crate) sync: bool,
}

/// A session's outgoing queue, shared by the router (which fills it) and the connection task
/// (which drains it). One lock keeps the byte count and the paused flag consistent, so a pause
/// is always followed by exactly one resume once the queue drains.
#[derive(Debug, Default)]
pub(crate) struct Flow(Mutex<FlowState>);

#[derive(Debug, Default)]
struct FlowState {
    queued: usize,
    /// When the current pause began; `None` while not paused.
    paused_at: Option<std::time::Instant>,
}

impl Flow {
    fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `len` bytes as written to the socket. True when this write drained a paused
    /// session's queue to the low-water mark: the caller resumes the peer
    /// ([`Replica::peer_flow`]).
    pub(crate) fn written(&self, len: usize) -> bool {
        let mut s = self.state();
        s.queued = s.queued.saturating_sub(len);
        let resume = s.paused_at.is_some() && s.queued <= LOW_WATER;
        if resume {
            s.paused_at = None;
        }
        resume
    }

    /// How long the session has been paused (its peer reading slower than we write), if it is.
    pub(crate) fn paused_for(&self) -> Option<std::time::Duration> {
        self.state().paused_at.map(|t| t.elapsed())
    }

    /// Counts `len` bytes queued (before the frame is handed to the channel, so `written`
    /// never runs first). True when the queue just went over the high-water mark.
    fn queue(&self, len: usize) -> bool {
        let mut s = self.state();
        s.queued += len;
        let pause = s.paused_at.is_none() && s.queued > HIGH_WATER;
        if pause {
            s.paused_at = Some(std::time::Instant::now());
        }
        pause
    }
}

/// A registered session: its id, its frames, its queue.
pub(crate) struct Session {
    pub(crate) peer: PeerId,
    pub(crate) rx: mpsc::UnboundedReceiver<Outbound>,
    pub(crate) flow: Arc<Flow>,
}

struct Slot {
    tx: mpsc::UnboundedSender<Outbound>,
    flow: Arc<Flow>,
    /// How the session's frames are encoded.
    codec: Codec,
    /// A client session's status and report, kept here so that they follow commits in order.
    client: Option<ClientState>,
}

/// The wire a session speaks.
pub(crate) enum Codec {
    /// weft's protocol: one frame per message.
    Weft,
    /// automerge-repo's (`/automerge`): a frame per document.
    AutomergeRepo(super::amrepo::Codec),
}

impl Codec {
    fn frames(&self, message: Message) -> Vec<Frame> {
        match self {
            Codec::Weft => vec![Frame {
                sync: matches!(message, Message::Sync { .. }),
                bytes: Bytes::from(protocol::encode(&message)),
            }],
            Codec::AutomergeRepo(codec) => codec.frames(message),
        }
    }
}

/// What the router keeps for a client session.
pub(crate) type ClientState = (Arc<watch::Sender<Status>>, SharedReport);

/// One per replica; see the module docs.
#[derive(Default)]
pub(crate) struct Router {
    next: AtomicU64,
    peers: Mutex<HashMap<PeerId, Slot>>,
}

impl Router {
    /// The replica's router, installing it as the replica's transport on first use.
    pub(crate) fn of(replica: &Replica) -> Arc<Router> {
        let install = || {
            let router = Arc::new(Router::default());
            let weak = Arc::downgrade(&router);
            replica.set_transport(move |frames, events| match weak.upgrade() {
                Some(router) => router.route(frames, events),
                None => Vec::new(),
            });
            router
        };
        replica.attachment(install).unwrap_or_else(|| {
            // Only the network layer attaches anything to a replica; cannot happen.
            tracing::error!("the replica holds another attachment than the router");
            Arc::new(Router::default())
        })
    }

    /// A new session; a client passes its status, which the router then keeps: `Connected`
    /// as soon as a step sends changes, `Synced` when the relay confirmed (and that step sent
    /// none).
    pub(crate) fn register(&self, client: Option<ClientState>) -> Session {
        self.register_with(client, Codec::Weft)
    }

    /// A new session whose frames `codec` encodes.
    pub(crate) fn register_with(&self, client: Option<ClientState>, codec: Codec) -> Session {
        let peer = PeerId(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        self.lock().insert(
            peer,
            Slot {
                tx,
                flow: flow.clone(),
                codec,
                client,
            },
        );
        Session { peer, rx, flow }
    }

    /// The session ended.
    pub(crate) fn unregister(&self, peer: PeerId) {
        self.lock().remove(&peer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Slot>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues frames and events; returns the peers that this pushed over the high-water mark.
    fn route(
        &self,
        frames: Vec<(PeerId, Message)>,
        events: Vec<(PeerId, PeerEvent)>,
    ) -> Vec<PeerId> {
        let peers = self.lock();
        let mut paused = Vec::new();
        let mut sending = Vec::new();
        for (peer, message) in frames {
            if let Some(slot) = peers.get(&peer) {
                for frame in slot.codec.frames(message) {
                    if frame.sync {
                        // Changes on their way out: not in sync until the relay confirms again.
                        sending.push(peer);
                        set_status(slot, Status::Connected);
                    }
                    if slot.flow.queue(frame.bytes.len()) {
                        tracing::debug!(?peer, "outgoing queue over the high-water mark");
                        paused.push(peer);
                    }
                    // A closed channel means the session is ending; its pause dies with it.
                    let _ = slot.tx.send(Outbound::Frame(frame));
                }
            }
        }
        for (peer, event) in events {
            if let Some(slot) = peers.get(&peer) {
                if let Some((_, report)) = &slot.client {
                    report.note(&event);
                }
                if event == PeerEvent::InSync && !sending.contains(&peer) {
                    set_status(slot, Status::Synced);
                }
                let _ = slot.tx.send(Outbound::Event(event));
            }
        }
        paused.dedup();
        paused
    }
}

/// Moves a client session between `Connected` and `Synced` (never out of another state).
fn set_status(slot: &Slot, to: Status) {
    if let Some((status, _)) = &slot.client {
        status.send_if_modified(|s| {
            let change = matches!(s, Status::Connected | Status::Synced) && *s != to;
            if change {
                *s = to;
            }
            change
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_over_high_water_and_resumes_at_low_water_once_each() {
        let flow = Flow::default();
        assert!(!flow.queue(HIGH_WATER), "at the mark is not over it");
        assert!(flow.queue(10), "over the mark: pause");
        assert!(!flow.queue(10), "already paused: reported once");
        assert!(
            !flow.written(HIGH_WATER - LOW_WATER),
            "still above low water"
        );
        assert!(flow.written(20), "drained to low water: resume");
        assert!(!flow.written(0), "resumed once");
        assert!(flow.queue(HIGH_WATER), "over again: pause again");
    }
}
