//! The relay's single writer: every session's inputs go through one thread that applies
//! whatever has queued up in one replica step (group commit).
//!
//! With many busy sessions, a step per frame meant a storage transaction, a thread hand-off
//! and a fight for the replica's lock per frame. Here a session awaits its input being applied
//! (so it reads no faster than the relay applies — backpressure — and its frames stay in
//! order), while the inputs of all sessions that arrived meanwhile share one step.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::engine::PeerId;
use crate::{Replica, SessionFailure, SessionInput};

/// Inputs applied per step at most (bounds a step's duration)...
const MAX_BATCH: usize = 256;
/// ...and their frames' bytes: big frames (a client pushing its documents) go one per step,
/// which keeps the relay's memory flat.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// An input, the size of the frame it came in, and who waits for it.
type Job = (
    SessionInput,
    usize,
    oneshot::Sender<Result<(), SessionFailure>>,
);

/// Why an input was not applied.
#[derive(Debug)]
pub(crate) enum NotApplied {
    /// The relay is shutting down.
    Gone,
    /// The session failed (see [`Replica::peer_batch`]): close it.
    Failed(SessionFailure),
}

/// Handle to the applier thread; it stops once every handle is dropped.
pub(crate) struct Applier {
    tx: mpsc::UnboundedSender<Job>,
}

impl Applier {
    /// Starts the thread.
    pub(crate) fn start(replica: Replica) -> std::io::Result<(Applier, JoinHandle<()>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("weft-applier".into())
            .spawn(move || run(replica, rx))?;
        Ok((Applier { tx }, thread))
    }

    /// Applies `input` (with whatever else is queued) and returns once it is committed and its
    /// frames are queued. `bytes`: the size of the frame it came in (0 for session events).
    pub(crate) async fn apply(&self, input: SessionInput, bytes: usize) -> Result<(), NotApplied> {
        let (done, applied) = oneshot::channel();
        self.tx
            .send((input, bytes, done))
            .map_err(|_| NotApplied::Gone)?;
        match applied.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(NotApplied::Failed(failure)),
            Err(_) => Err(NotApplied::Gone),
        }
    }
}

fn run(replica: Replica, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some((input, mut bytes, done)) = rx.blocking_recv() {
        let mut inputs = vec![input];
        let mut waiting = vec![done];
        while inputs.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok((input, size, done)) => {
                    inputs.push(input);
                    bytes += size;
                    waiting.push(done);
                }
                Err(_) => break,
            }
        }
        tracing::trace!(inputs = inputs.len(), "applying");
        let peers: Vec<PeerId> = inputs.iter().map(SessionInput::peer).collect();
        // A failure is one session's problem: `peer_batch` names the sessions it ended (an
        // input that panicked, or whose storage failed); they are told why and close. The
        // others' inputs were applied.
        let failed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| replica.peer_batch(inputs)))
                .unwrap_or_else(|_| {
                    peers
                        .iter()
                        .map(|p| (*p, SessionFailure::Panicked))
                        .collect()
                });
        for (peer, done) in peers.into_iter().zip(waiting) {
            let result = match failed.iter().find(|(p, _)| *p == peer) {
                Some((_, failure)) => Err(failure.clone()),
                None => Ok(()),
            };
            let _ = done.send(result);
        }
    }
}
