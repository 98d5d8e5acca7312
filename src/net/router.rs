//! Routes a replica's session frames to the connection tasks that own the sessions.
//!
//! The replica hands every step's frames to one transport callback, after the commit and under
//! its lock, so frames for one peer arrive here in commit order. The router passes them to the
//! connection's channel; the connection task writes them to its socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::Replica;
use crate::engine::{PeerEvent, PeerId};
use crate::protocol::Message;

/// What a connection task receives from its replica.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Message),
    Event(PeerEvent),
}

/// One per replica; see the module docs.
#[derive(Default)]
pub(crate) struct Router {
    next: AtomicU64,
    peers: Mutex<HashMap<PeerId, mpsc::UnboundedSender<Outbound>>>,
}

impl Router {
    /// The replica's router, installing it as the replica's transport on first use.
    pub(crate) fn of(replica: &Replica) -> Arc<Router> {
        replica.net_router(|| {
            let router = Arc::new(Router::default());
            let weak = Arc::downgrade(&router);
            replica.set_transport(move |frames, events| {
                if let Some(router) = weak.upgrade() {
                    router.route(frames, events);
                }
            });
            router
        })
    }

    /// A new session: its id and the channel its frames arrive on.
    pub(crate) fn register(&self) -> (PeerId, mpsc::UnboundedReceiver<Outbound>) {
        let peer = PeerId(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(peer, tx);
        (peer, rx)
    }

    /// The session ended.
    pub(crate) fn unregister(&self, peer: PeerId) {
        self.lock().remove(&peer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, mpsc::UnboundedSender<Outbound>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn route(&self, frames: Vec<(PeerId, Message)>, events: Vec<(PeerId, PeerEvent)>) {
        let peers = self.lock();
        for (peer, message) in frames {
            if let Some(tx) = peers.get(&peer) {
                let _ = tx.send(Outbound::Frame(message));
            }
        }
        for (peer, event) in events {
            if let Some(tx) = peers.get(&peer) {
                let _ = tx.send(Outbound::Event(event));
            }
        }
    }
}
