//! Replication sessions on a replica, driven by a network layer (`net/`) or a simulation:
//! session inputs in batches, the transport that takes each step's frames, what a failure
//! ends, storage health, ticks, and other processes' commits.

use std::sync::{Arc, MutexGuard};

use super::step::Storage;
use super::{Replica, StoreError};
use crate::engine::{Input, PeerEvent, PeerId};
use crate::error::{Error, Result};
use crate::id::ReplicaId;
use crate::protocol::Message;
use crate::scope::Access;

/// One input of a replication session, for [`Replica::peer_batch`]; the same as calling
/// `peer_connected`, `peer_message`, `peer_disconnected` or `peer_flow`.
#[derive(Clone, Debug)]
pub enum SessionInput {
    Connected {
        peer: PeerId,
        remote: ReplicaId,
        access: Access,
        initiator: bool,
    },
    Message {
        peer: PeerId,
        message: Message,
    },
    Disconnected {
        peer: PeerId,
    },
    Flow {
        peer: PeerId,
        paused: bool,
    },
}

impl SessionInput {
    /// The session this input is for.
    pub fn peer(&self) -> PeerId {
        match self {
            SessionInput::Connected { peer, .. }
            | SessionInput::Message { peer, .. }
            | SessionInput::Disconnected { peer }
            | SessionInput::Flow { peer, .. } => *peer,
        }
    }
}

impl From<SessionInput> for Input {
    fn from(input: SessionInput) -> Input {
        match input {
            SessionInput::Connected {
                peer,
                remote,
                access,
                initiator,
            } => Input::PeerConnected {
                peer,
                remote,
                access,
                initiator,
            },
            SessionInput::Message { peer, message } => Input::PeerMessage { peer, message },
            SessionInput::Disconnected { peer } => Input::PeerDisconnected { peer },
            SessionInput::Flow { peer, paused } => Input::PeerFlow { peer, paused },
        }
    }
}

/// How long after its last failure a successful write must come for storage to count as
/// working again (milliseconds).
pub(crate) const HEALTH_SETTLE_MS: i64 = 2_000;

/// The last storage failure and when (clock milliseconds), until storage works again.
#[derive(Default)]
pub(super) struct StorageHealth {
    failing: Option<(String, i64)>,
}

/// Why [`Replica::peer_batch`] ended a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionFailure {
    /// Applying one of its inputs panicked (a bug); the step was rolled back.
    Panicked,
    /// Storage failed (a full disk, a read-only file): its input was not applied.
    Storage(StoreError),
}

impl std::fmt::Display for SessionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionFailure::Panicked => f.write_str("internal error while applying its frames"),
            SessionFailure::Storage(e) => write!(f, "storage failed: {e}"),
        }
    }
}

impl Replica {
    /// Where session frames and events go. The network layer (or a test's simulated network)
    /// attaches one; it is called after each commit, under the replica's lock, in order. It
    /// returns the peers whose outgoing queue it finds too long after taking these frames:
    /// those sessions are paused (their live changes coalesce per document) until the driver
    /// calls [`Replica::peer_flow`]`(peer, false)`.
    pub fn set_transport(
        &self,
        transport: impl Fn(Vec<(PeerId, Message)>, Vec<(PeerId, PeerEvent)>) -> Vec<PeerId>
        + Send
        + Sync
        + 'static,
    ) {
        *self
            .shared
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(transport));
    }

    /// The one value of type `T` a layer above keeps with this replica, created on first use
    /// (the network layer's router: one per replica, shared by its connections). The replica
    /// stores it without knowing its type, so it never depends on that layer.
    #[cfg_attr(not(feature = "net"), allow(dead_code))]
    pub(crate) fn attachment<T: std::any::Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> Arc<T>,
    ) -> Option<Arc<T>> {
        self.shared
            .attachment
            .get_or_init(|| init() as Arc<dyn std::any::Any + Send + Sync>)
            .clone()
            .downcast::<T>()
            .ok()
    }

    /// Applies session inputs of any number of sessions in one step: one storage transaction,
    /// one commit (group commit for a relay with many busy sessions). Each session's inputs
    /// keep their order.
    ///
    /// Returns the sessions this ended, and why; the driver closes their connections. A
    /// failure is one session's problem: when the step panics (a bug some input triggers) or
    /// its storage fails (a full disk), it is rolled back, and if the batch held several
    /// sessions' inputs they are applied again one by one. A session whose input fails on its
    /// own is ended (the engine forgets it; its later inputs in the batch are skipped), so it
    /// never believes that something was applied, acknowledged or answered when it was not;
    /// everyone else's inputs are applied.
    pub fn peer_batch(&self, inputs: Vec<SessionInput>) -> Vec<(PeerId, SessionFailure)> {
        let together = inputs.iter().cloned().map(Input::from).collect();
        let failure = match self.peer_step(together) {
            Ok(()) => return Vec::new(),
            Err(failure) => failure,
        };
        let sessions: std::collections::BTreeSet<PeerId> =
            inputs.iter().map(SessionInput::peer).collect();
        let mut failed: Vec<(PeerId, SessionFailure)> = Vec::new();
        if let [peer] = sessions.iter().copied().collect::<Vec<_>>()[..] {
            tracing::info!(?peer, %failure, "ending the session");
            self.end_session(peer);
            failed.push((peer, failure));
            return failed;
        }
        tracing::warn!(
            inputs = inputs.len(),
            %failure,
            "applying session inputs failed; applying them one by one"
        );
        for input in inputs {
            let peer = input.peer();
            if failed.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            if let Err(failure) = self.peer_step(vec![Input::from(input)]) {
                tracing::info!(?peer, %failure, "ending the session");
                self.end_session(peer);
                failed.push((peer, failure));
            }
        }
        failed
    }

    /// One step of session inputs; `Err` if it panicked or its storage failed (either way it
    /// was rolled back).
    fn peer_step(&self, inputs: Vec<Input>) -> std::result::Result<(), SessionFailure> {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let inner = self.lock();
            self.step(inner, inputs, 0, 0).storage
        }));
        match outcome {
            Err(_) => Err(SessionFailure::Panicked),
            Ok(Storage::Failed(e)) => Err(SessionFailure::Storage(e)),
            Ok(Storage::Committed | Storage::Untouched) => Ok(()),
        }
    }

    /// Makes the engine forget a session that failed.
    fn end_session(&self, peer: PeerId) {
        if let Err(failure) = self.peer_step(vec![Input::PeerDisconnected { peer }]) {
            // The engine forgets the session before it writes anything; only its sync
            // states (an optimization) may not have been saved.
            tracing::warn!(?peer, %failure, "ending the session did not save its sync states");
        }
    }

    /// Whether storage works: `Err` with the cause from the moment a write fails (a full
    /// disk, a read-only file) until a write commits again at least
    /// [`HEALTH_SETTLE_MS`] later (a disk with a little room lets small writes through between
    /// failing big ones: that is still failing). Relays report it on `/healthz`.
    pub fn storage_health(&self) -> std::result::Result<(), String> {
        match &self.health().failing {
            Some((error, _)) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// While storage fails, checks whether a write commits again (see [`Store::probe`]) and
    /// updates [`storage_health`](Self::storage_health). Cheap when storage is healthy.
    pub fn probe_storage(&self) -> std::result::Result<(), String> {
        if self.storage_health().is_ok() {
            return Ok(());
        }
        let probed = self.lock().store.probe();
        self.note_storage(&match probed {
            Ok(()) => Storage::Committed,
            Err(e) => Storage::Failed(e),
        });
        self.storage_health()
    }

    fn health(&self) -> MutexGuard<'_, StorageHealth> {
        self.shared.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn note_storage(&self, storage: &Storage) {
        let now = self.shared.clock.now();
        let mut health = self.health();
        match storage {
            Storage::Committed => {
                if let Some((was, at)) = &health.failing
                    && now - at >= HEALTH_SETTLE_MS
                {
                    tracing::info!(%was, "storage works again");
                    health.failing = None;
                }
            }
            Storage::Untouched => {}
            Storage::Failed(e) => health.failing = Some((e.to_string(), now)),
        }
    }

    /// A session with `remote` is established (after the handshake).
    /// `access` says what the peer may read and write (a [`Scope`] converts into full access
    /// to it).
    pub fn peer_connected(
        &self,
        peer: PeerId,
        remote: ReplicaId,
        access: impl Into<Access>,
        initiator: bool,
    ) {
        self.peer_input(Input::PeerConnected {
            peer,
            remote,
            access: access.into(),
            initiator,
        });
    }

    /// A session message arrived.
    pub fn peer_message(&self, peer: PeerId, message: Message) {
        self.peer_input(Input::PeerMessage { peer, message });
    }

    /// The session ended.
    pub fn peer_disconnected(&self, peer: PeerId) {
        self.peer_input(Input::PeerDisconnected { peer });
    }

    /// Flow control for a session: `paused` while the peer reads slower than we write (its
    /// live changes are then remembered per document instead of queued per change), `false`
    /// once its queue drained — everything held back is sent in its latest version.
    pub fn peer_flow(&self, peer: PeerId, paused: bool) {
        self.peer_input(Input::PeerFlow { peer, paused });
    }

    /// How many documents are in memory (loaded or kept as their saved bytes).
    /// The store's own counters (see [`Store::counters`](crate::store::Store::counters)).
    pub fn store_counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.lock().store.counters()
    }

    pub fn loaded_documents(&self) -> usize {
        self.lock().engine.loaded_docs()
    }

    /// Notices commits that other processes made to this replica's file (a CLI next to a
    /// running app): they go to this replica's sessions, hooks and subscriptions like its own
    /// changes. Returns whether there were any. Cheap when there were none (one SQLite pragma);
    /// connections and subscriptions call it every 50 ms, the relay every second.
    pub fn poll_external(&self) -> Result<bool> {
        let inner = self.lock();
        let changed = inner.store.changed_elsewhere();
        drop(inner);
        let changed = match changed {
            Ok(changed) => changed,
            Err(e) => {
                // A store that cannot even be asked (a database server gone) is failing:
                // `/healthz` says so until a probe or a step commits again.
                self.note_storage(&Storage::Failed(e.clone()));
                return Err(e.into());
            }
        };
        if !changed {
            return Ok(false);
        }
        let inner = self.lock();
        match self.step(inner, Vec::new(), 0, 0).storage {
            Storage::Failed(e) => Err(Error::Store(e)),
            Storage::Committed | Storage::Untouched => Ok(true),
        }
    }

    /// Lets sessions notice that time passed (call every few milliseconds while connected)
    /// and unloads idle documents. Cheap when there is nothing to do.
    ///
    /// `Err` if the step's storage failed: its frames (a session's new announcement, say) were
    /// not sent, so a client ends the session and reconnects with backoff rather than tick
    /// into the same failure.
    pub fn tick(&self) -> Result<()> {
        let inner = self.lock();
        if !inner.engine.wants_tick(self.shared.clock.now()) {
            return Ok(());
        }
        match self.step(inner, vec![Input::Tick], 0, 0).storage {
            Storage::Failed(e) => Err(Error::Store(e)),
            Storage::Committed | Storage::Untouched => Ok(()),
        }
    }

    /// Whether [`tick`](Self::tick) has something to do now. Never waits: false while another
    /// thread is using the replica (it will be asked again).
    pub fn tick_wanted(&self) -> bool {
        let inner = match self.shared.inner.try_lock() {
            Ok(inner) => inner,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        inner.engine.wants_tick(self.shared.clock.now())
    }

    fn peer_input(&self, input: Input) {
        let inner = self.lock();
        let _ = self.step(inner, vec![input], 0, 0);
    }
}
