//! One driver step: the engine's inputs in, its reads answered, its writes committed in one
//! transaction, and only then its events, results and frames out (see the engine's module
//! docs for the protocol this follows).

use std::sync::MutexGuard;

use super::{Inner, Replica, scope_names};
use crate::engine::{
    CatalogAnswer, ChangeEvent, CommandId, Effects, Input, Output, PeerEvent, PeerId,
};
use crate::error::{Error, Result};
use crate::id::DocumentId;
use crate::protocol::Message;
use crate::store::StoreError;

/// What one driver step did with storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Storage {
    /// Its writes committed.
    Committed,
    /// It had nothing to write.
    Untouched,
    /// Its transaction did not start or did not commit: nothing of it was applied, and the
    /// engine forgot what it had ahead of storage.
    Failed(StoreError),
}

/// The outcome of one driver step.
pub(super) struct StepOutcome {
    /// The commands' results, in order.
    pub(super) results: Vec<Result<Output>>,
    pub(super) storage: Storage,
}

/// A committed step's frames and session events, for the transport.
type Outgoing = (Vec<(PeerId, Message)>, Vec<(PeerId, PeerEvent)>);

impl Replica {
    /// One driver step: feed `inputs` to the engine, answer its loads and catalog reads, commit
    /// its writes in one transaction, then (only after the commit) publish events, hand frames
    /// to the transport and return the results of the commands numbered `first..first+count`.
    ///
    /// A panic inside the step (a bug) leaves nothing half-done: the transaction is rolled
    /// back and the engine forgets everything that is not in storage
    /// ([`Engine::recover`](crate::engine::Engine::recover)) before the panic goes on to the
    /// caller.
    pub(super) fn step(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        inputs: Vec<Input>,
        first: u64,
        count: usize,
    ) -> StepOutcome {
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.step_locked(&mut inner, inputs, first, count)
        }));
        match stepped {
            Ok(outcome) => {
                drop(inner);
                self.note_storage(&outcome.storage);
                self.shared.hooks.dispatch();
                outcome
            }
            Err(panic) => {
                tracing::error!("a replica step panicked; rolled back, engine memory reset");
                inner.store.rollback();
                inner.engine.recover();
                drop(inner);
                std::panic::resume_unwind(panic)
            }
        }
    }

    fn step_locked(
        &self,
        inner: &mut Inner,
        inputs: Vec<Input>,
        first: u64,
        count: usize,
    ) -> StepOutcome {
        let now = self.shared.clock.now();
        // The whole step runs inside one write transaction, so loads and writes see the same
        // state even if other processes use the file.
        let external = match begin(inner, now) {
            Ok(external) => external,
            Err(e) => {
                // Nothing was handed to the engine: its state is as before the step, and the
                // inputs are not applied (sessions whose input this was are told, see
                // `peer_batch`).
                tracing::debug!(error = %e, "could not start a transaction");
                return StepOutcome {
                    results: (0..count).map(|_| Err(Error::Store(e.clone()))).collect(),
                    storage: Storage::Failed(e),
                };
            }
        };
        let mut fx = Effects::default();
        if !external.is_empty() {
            let events = external.clone();
            fx.extend(inner.engine.handle(now, Input::External { events }));
            // Committed already, whatever happens to this step.
            self.shared.hooks.enqueue(external);
        }
        for input in inputs {
            fx.extend(inner.engine.handle(now, input));
        }
        answer_reads(inner, now, &mut fx);
        fx.extend(inner.engine.handle(now, Input::Flush));
        let (outcome, outgoing) = self.commit(inner, now, fx, first, count);
        // Hand frames over while still holding the lock, so that a peer sees them in commit
        // order.
        if let Some(outgoing) = outgoing {
            self.hand_off(inner, now, outgoing);
        }
        outcome
    }

    /// Commits the step's writes; on success queues its events for the hooks, on failure
    /// rolls back and tells the engine. Returns the commands' results and, after a commit,
    /// the frames and session events to send.
    fn commit(
        &self,
        inner: &mut Inner,
        now: i64,
        fx: Effects,
        first: u64,
        count: usize,
    ) -> (StepOutcome, Option<Outgoing>) {
        let Effects {
            loads: _,
            catalog_reads: _,
            whole_reads: _,
            sync_state_reads: _,
            writes,
            events,
            completed,
            send,
            peer_events,
        } = fx;
        let committed = inner
            .store
            .write(&writes)
            .and_then(|()| inner.store.commit())
            .map_err(StoreError::commit_failed);
        let storage = match &committed {
            Ok(()) if writes.is_empty() => Storage::Untouched,
            Ok(()) => Storage::Committed,
            Err(e) => Storage::Failed(e.clone()),
        };
        let mut results: Vec<Option<Result<Output>>> = (0..count).map(|_| None).collect();
        let mut deliver = |cid: u64, result: Result<Output>| {
            if let Some(slot) = cid
                .checked_sub(first)
                .and_then(|i| results.get_mut(i as usize))
            {
                *slot = Some(result);
            }
        };
        let mut outgoing = None;
        match committed {
            Ok(()) => {
                let after = inner.engine.handle(now, Input::Committed);
                debug_assert!(after.is_empty());
                self.shared.hooks.enqueue(events);
                for (CommandId(cid), result) in completed {
                    deliver(cid, result);
                }
                if !send.is_empty() || !peer_events.is_empty() {
                    outgoing = Some((send, peer_events));
                }
            }
            Err(e) => {
                inner.store.rollback();
                // The caller hears of it (a command's error, a session ended with the cause).
                tracing::debug!(error = %e, writes = writes.len(), "commit failed; nothing was applied");
                let mut docs: Vec<DocumentId> = writes.iter().filter_map(|w| w.doc()).collect();
                docs.sort_unstable();
                docs.dedup();
                let _ = inner.engine.handle(now, Input::StorageFailed { docs });
                for (CommandId(cid), result) in completed {
                    deliver(cid, result.and_then(|_| Err(Error::Store(e.clone()))));
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Internal("command did not complete".into()))))
            .collect();
        (StepOutcome { results, storage }, outgoing)
    }

    /// Gives a committed step's frames and session events to the transport; the peers it
    /// reports as over their high-water mark are paused.
    fn hand_off(&self, inner: &mut Inner, now: i64, (send, peer_events): Outgoing) {
        let transport = self
            .shared
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match transport {
            Some(t) => {
                for peer in t(send, peer_events) {
                    // Pausing only changes session state: no effects, nothing to commit.
                    let fx = inner
                        .engine
                        .handle(now, Input::PeerFlow { peer, paused: true });
                    debug_assert!(fx.is_empty());
                }
            }
            None => {
                tracing::debug!(frames = send.len(), "no transport attached; frames dropped")
            }
        }
    }
}

/// Starts the step's transaction. If another process committed since our last step, the
/// engine drops what it cached, and the other process's feed entries (those past our next
/// seq) are returned: they go to our sessions and hooks like our own changes.
fn begin(inner: &mut Inner, now: i64) -> std::result::Result<Vec<ChangeEvent>, StoreError> {
    if !inner.store.begin()? {
        return Ok(Vec::new());
    }
    let ours = inner.engine.next_seq();
    let (external, changed) =
        match inner
            .store
            .changes_since(ours.saturating_sub(1), usize::MAX, None)
        {
            Ok(events) => {
                let mut changed: Vec<DocumentId> = events.iter().map(|e| e.id).collect();
                // Loaded documents the store can bring up to date with only what the other
                // writers appended stay in memory; the rest are dropped and loaded again.
                let mut current = std::collections::HashSet::new();
                for (id, cursor) in inner.engine.refreshable(&changed) {
                    let new = inner.store.chunks_after(&id, cursor);
                    if inner.engine.refresh(id, new) {
                        current.insert(id);
                    }
                }
                changed.retain(|id| !current.contains(id));
                (events, Some(changed))
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the other process's changes failed");
                (Vec::new(), None)
            }
        };
    let next_seq = inner.store.max_seq().map(|s| s + 1).unwrap_or(0);
    let _ = inner
        .engine
        .handle(now, Input::StorageChanged { next_seq, changed });
    Ok(external)
}

/// Answers every read the engine asks for — documents, documents to send whole, sync
/// states, catalog summaries and entries — until it asks for none (each answer may lead to
/// more).
fn answer_reads(inner: &mut Inner, now: i64, fx: &mut Effects) {
    loop {
        if !fx.loads.is_empty() {
            let ids = std::mem::take(&mut fx.loads);
            let results = inner.store.load_many(&ids);
            for (id, result) in ids.into_iter().zip(results) {
                fx.extend(inner.engine.handle(now, Input::Loaded { id, result }));
            }
        } else if !fx.whole_reads.is_empty() {
            // A document several sessions need whole (created by another process, say) is
            // read once for all of them.
            let reads = std::mem::take(&mut fx.whole_reads);
            let mut ids: Vec<DocumentId> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (_, id) in &reads {
                if seen.insert(*id) {
                    ids.push(*id);
                }
            }
            let results = inner.store.load_many(&ids);
            let by_id: std::collections::HashMap<DocumentId, _> =
                ids.into_iter().zip(results).collect();
            for (peer, id) in reads {
                let result = by_id
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| Err(StoreError::Corrupt("a read went unanswered".into())));
                fx.extend(inner.engine.handle(now, Input::Whole { peer, id, result }));
            }
        } else if !fx.sync_state_reads.is_empty() {
            for (peer, remote, id) in std::mem::take(&mut fx.sync_state_reads) {
                let result = inner.store.load_sync_state(&remote, &id);
                fx.extend(
                    inner
                        .engine
                        .handle(now, Input::SyncState { peer, id, result }),
                );
            }
        } else if !fx.catalog_reads.is_empty() {
            for read in std::mem::take(&mut fx.catalog_reads) {
                let names = scope_names(&read.scope);
                let answer = match &read.buckets {
                    None => inner
                        .store
                        .catalog_summary(names)
                        .map(CatalogAnswer::Summary),
                    Some(buckets) => inner
                        .store
                        .catalog_entries(names, buckets)
                        .map(CatalogAnswer::Entries),
                };
                let input = Input::Catalog {
                    peer: read.peer,
                    purpose: read.purpose,
                    answer,
                };
                fx.extend(inner.engine.handle(now, input));
            }
        } else {
            return;
        }
    }
}
