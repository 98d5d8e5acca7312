//! The sans-IO core.
//!
//! [`Engine`] owns the documents and turns [`Input`]s into [`Effects`]. It never touches a file,
//! a socket, a clock or the OS random source: the driver passes the time into every call and a
//! seed at construction, performs the storage reads and writes the engine asks for, and reports
//! back. The same engine runs natively over SQLite ([`crate::Replica`]), in the browser over
//! IndexedDB, and in tests under a simulated clock.
//!
//! A driver's step, in full (`Replica::step_locked` is the native one):
//!
//! ```text
//! storage.begin()                                    // one transaction per step; if another
//!     → changed? engine.handle(StorageChanged), handle(External(their feed entries))
//! let mut fx = engine.handle(now, input) for each input (commands, session messages, ticks)
//! loop {                                             // 1. answer every read the engine asks for
//!     fx.loads          → handle(Loaded { id, result })        documents into memory
//!     fx.whole_reads    → handle(Whole { peer, id, result })   documents sent from storage
//!     fx.sync_state_reads → handle(SyncState { .. })           persisted sync states
//!     fx.catalog_reads  → handle(Catalog { .. })               reconciliation summaries/entries
//! }                                                  //    until none is left
//! fx.extend(engine.handle(now, Flush))              // 2. pack session items into frames
//! storage.write(fx.writes); storage.commit()         // 3. one commit
//!   ok   → handle(Committed); publish fx.events, deliver fx.completed, send fx.send and
//!          fx.peer_events — only now, and in this order
//!   fail → rollback; handle(StorageFailed { docs }); every completion becomes the error;
//!          nothing is published or sent; sessions whose input this was are ended
//! ```
//!
//! A panic inside the step is rolled back the same way, plus [`Engine::recover`].

mod access;
mod command;
mod doc;
mod effects;
mod fanout;
mod receive;
mod reconcile;
mod session;

use std::collections::{HashMap, HashSet, VecDeque};

use automerge::ReadDoc;
use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, ChangeHash};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{Map, Value};

pub use command::{ChangeFn, Command, CommandId, DocumentSnapshot, ImportReport, Output};
pub use doc::CompactionPolicy;
pub use effects::{
    ChangeEvent, ChangeKind, ChunkKind, Effects, NewChunks, Origin, StorageOp, StoredChunk,
    StoredDoc,
};
pub use reconcile::{CatalogAnswer, CatalogRead, ReadPurpose};
pub use session::{PeerEvent, PeerId, RESYNC_QUIET_MS};

use self::access::By;
use self::doc::{DocState, LiveDoc, check_heads};
use crate::bundle::{Bundle, BundleEntry};
use crate::error::Error;
use crate::id::{DocumentId, ReplicaId};
use crate::json;
use crate::limits::{LimitError, Limits};
use crate::protocol::Message;
use crate::scope::Access;
use crate::store::StoreError;

/// How an engine starts.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This replica's identity (persisted by the driver).
    pub replica_id: ReplicaId,
    /// Seeds every random choice the engine makes (document ids, the session's actor id).
    /// Native drivers pass OS randomness; tests pass a fixed seed to replay a run.
    pub seed: u64,
    /// The next change-feed sequence number (one past the highest stored).
    pub next_seq: u64,
    /// How many documents to keep in memory when idle; more are evicted, least recently used
    /// first. Evicting is always safe: everything is in storage.
    pub max_loaded_docs: usize,
    /// Documents unused for this long (milliseconds) are unloaded, so memory follows the
    /// active set (drivers send `Tick`s; see [`Engine::wants_tick`]).
    pub idle_unload_ms: i64,
    /// How long an initiator waits before offering again a document its peer refused to
    /// create because of its create limit (milliseconds).
    pub rate_limited_retry_ms: i64,
    /// When to compact a document's storage.
    pub compaction: CompactionPolicy,
    /// How deep, how many operations and how large a document may be.
    pub limits: Limits,
}

impl EngineConfig {
    /// Defaults for a replica.
    pub fn new(replica_id: ReplicaId, seed: u64, next_seq: u64) -> Self {
        Self {
            replica_id,
            seed,
            next_seq,
            max_loaded_docs: 1000,
            idle_unload_ms: 60_000,
            rate_limited_retry_ms: 60_000,
            compaction: CompactionPolicy::default(),
            limits: Limits::default(),
        }
    }
}

/// An input to [`Engine::handle`].
#[derive(Debug)]
pub enum Input {
    /// Run a command; its result arrives in [`Effects::completed`] with the same id.
    Command(CommandId, Command),
    /// The answer to a requested load: the stored document, `None` if storage has none, or an
    /// error message if reading failed.
    Loaded {
        id: DocumentId,
        result: Result<Option<StoredDoc>, StoreError>,
    },
    /// Every write emitted so far is durable.
    Committed,
    /// The step's transaction did not commit: its writes to these documents did not reach
    /// storage, and its frames were not sent. The engine forgets the documents' in-memory
    /// state and every session's Automerge sync states (which believe those frames went
    /// out), and initiators reconcile again.
    StorageFailed { docs: Vec<DocumentId> },
    /// Someone else (another process on the same file, another relay node on the same
    /// database) wrote to storage: drop the loaded documents they changed and continue the
    /// change feed at `next_seq`. Send only between transactions, when nothing is
    /// uncommitted.
    StorageChanged {
        next_seq: u64,
        /// The documents the other writers changed, from their feed entries: only these are
        /// dropped from memory. `None` when they could not be read: everything is dropped.
        changed: Option<Vec<DocumentId>>,
    },
    /// Changes another process committed to our storage (its change-feed entries since our
    /// last step, after `StorageChanged`): sent to the sessions like our own, so a connected
    /// replica forwards what a CLI next to it wrote.
    External { events: Vec<ChangeEvent> },
    /// A replication session is established (handshake done by the driver). The initiator is
    /// the side that connected; it drives reconciliation.
    PeerConnected {
        peer: PeerId,
        remote: ReplicaId,
        access: Access,
        initiator: bool,
    },
    /// A decoded message from a peer (session messages: Summary, Entries, Sync, Persisted, Error).
    PeerMessage { peer: PeerId, message: Message },
    /// The connection is gone.
    PeerDisconnected { peer: PeerId },
    /// The answer to a `sync_state_reads` request: the stored state, if any.
    SyncState {
        peer: PeerId,
        id: DocumentId,
        result: Result<Option<Vec<u8>>, StoreError>,
    },
    /// Flow control from the driver: `paused` when the connection's outgoing queue passed its
    /// high-water mark (the peer reads slower than we write), `!paused` once it drained. While
    /// paused, live changes for the peer are coalesced — remembered per document, not queued
    /// per change — and sent when it resumes.
    PeerFlow { peer: PeerId, paused: bool },
    /// The answer to a [`CatalogRead`].
    Catalog {
        peer: PeerId,
        purpose: ReadPurpose,
        answer: Result<CatalogAnswer, StoreError>,
    },
    /// Time passed (drives re-checks of quiet sessions); send every few milliseconds while
    /// sessions are open.
    Tick,
    /// The end of a driver step: pack the session items gathered during the step into as few
    /// frames as possible (`Effects::send`). Send it once per step, after loads and catalog
    /// reads are answered and before committing.
    Flush,
    /// The answer to a `whole_reads` request: the stored document (or none, or an error).
    Whole {
        peer: PeerId,
        id: DocumentId,
        result: Result<Option<StoredDoc>, StoreError>,
    },
}

/// Queued work: a caller's command, or a peer's request that needs a document in memory.
enum Work {
    Command(CommandId, Command),
    Peer(PeerId, receive::PeerWork),
}

impl Work {
    fn needs(&self) -> Vec<DocumentId> {
        match self {
            Work::Command(_, c) => c.needs(),
            Work::Peer(_, w) => vec![w.doc()],
        }
    }
}

struct Entry {
    state: DocState,
    /// `Engine::tick` at the last use (LRU order).
    last_used: u64,
    /// `now` at the last use (idle unloading).
    used_at: i64,
}

/// How far ahead of a blocked work item loads are requested (batched into one step).
const LOOKAHEAD: usize = 256;

/// The state machine. See the module docs for how to drive it.
pub struct Engine {
    config: EngineConfig,
    rng: StdRng,
    /// The Automerge actor for every change this engine instance makes. Fresh per instance, so
    /// an actor never reuses a sequence number even if a crash lost a change that was in memory.
    actor: ActorId,
    next_seq: u64,
    /// An empty document with our actor: cloned for every new document (cheaper than
    /// `Automerge::new()`, which also draws a throwaway actor id from the OS).
    empty: Automerge,
    docs: HashMap<DocumentId, Entry>,
    queue: VecDeque<Work>,
    peers: std::collections::BTreeMap<PeerId, session::Peer>,
    loading: HashSet<DocumentId>,
    /// Documents with writes emitted since the last [`Input::Committed`]; never evicted.
    dirty: HashSet<DocumentId>,
    /// Some entry in `docs` may be [`DocState::Broken`] (set when a load fails), so the next
    /// drained [`pump`](Self::pump) must sweep them. Saves a scan of every loaded document
    /// per input (O(cache size) per command, O(batch x cache) per bulk create).
    broken: bool,
    tick: u64,
    /// The `now` of the input being handled.
    now: i64,
    /// When idle documents were last unloaded.
    last_sweep: i64,
}

impl Engine {
    /// A new engine. Nothing is loaded until a command needs it.
    pub fn new(config: EngineConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut actor = [0u8; 16];
        rng.fill_bytes(&mut actor);
        Self {
            next_seq: config.next_seq,
            config,
            rng,
            empty: Automerge::new().with_actor(ActorId::from(actor.as_slice())),
            actor: ActorId::from(actor.as_slice()),
            docs: HashMap::new(),
            queue: VecDeque::new(),
            peers: std::collections::BTreeMap::new(),
            loading: HashSet::new(),
            dirty: HashSet::new(),
            broken: false,
            tick: 0,
            now: 0,
            last_sweep: 0,
        }
    }

    /// This replica's id.
    pub fn replica_id(&self) -> ReplicaId {
        self.config.replica_id
    }

    /// The sequence number the next change will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// How many documents are in memory.
    pub fn loaded_docs(&self) -> usize {
        self.docs.len()
    }

    /// The Automerge actor this engine writes with.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// After a panic inside [`handle`](Self::handle) (a bug), memory may be half-updated: this
    /// forgets everything that is not in storage — loaded documents, queued work, the
    /// sessions' Automerge sync states and pending items — and keeps the sessions themselves
    /// (their access, budgets, refusals, flow control). The driver rolls back the step's
    /// transaction; what was lost costs a reload and some sync bytes, never correctness.
    pub fn recover(&mut self) {
        self.docs.clear();
        self.loading.clear();
        self.dirty.clear();
        self.queue.clear();
        self.broken = false;
        for peer in self.peers.values_mut() {
            peer.forget_volatile();
        }
    }

    /// Advances the state machine by one input. `now` is milliseconds since the Unix epoch.
    pub fn handle(&mut self, now: i64, input: Input) -> Effects {
        self.now = now;
        let mut fx = Effects::default();
        match input {
            Input::Command(id, command) => self.queue.push_back(Work::Command(id, command)),
            Input::PeerConnected {
                peer,
                remote,
                access,
                initiator,
            } => self.peer_connected(now, peer, remote, access, initiator, &mut fx),
            Input::PeerMessage { peer, message } => self.peer_message(now, peer, message, &mut fx),
            Input::PeerDisconnected { peer } => self.peer_disconnected(peer, &mut fx),
            Input::SyncState { peer, id, result } => self.state_loaded(peer, id, result),
            Input::PeerFlow { peer, paused } => self.peer_flow(peer, paused, &mut fx),
            Input::Catalog {
                peer,
                purpose,
                answer,
            } => self.catalog_answer(peer, purpose, answer, &mut fx),
            Input::Tick => self.peer_tick(now, &mut fx),
            Input::Flush => self.flush_peers(now, &mut fx),
            Input::Whole { peer, id, result } => self.whole_from_storage(peer, id, result),
            Input::Loaded { id, result } => {
                self.loading.remove(&id);
                if self.docs.contains_key(&id) {
                    // Already in memory (possibly with newer, uncommitted state): keep that.
                    self.pump(now, &mut fx);
                    return fx;
                }
                let state = match result {
                    Ok(Some(stored)) => {
                        LiveDoc::load(id, stored, &self.actor).unwrap_or_else(|e| {
                            tracing::error!(doc = %id, error = %e, "document failed to load");
                            // The reason only: `live()` wraps it in `Error::Corrupt` for this id
                            // again, which would repeat "document X is corrupt: ".
                            DocState::Broken(match e {
                                Error::Corrupt { reason, .. } => reason,
                                other => other.to_string(),
                            })
                        })
                    }
                    Ok(None) => DocState::Absent,
                    Err(message) => DocState::Broken(format!("storage read failed: {message}")),
                };
                self.broken |= matches!(state, DocState::Broken(_));
                self.tick += 1;
                self.docs.insert(
                    id,
                    Entry {
                        state,
                        last_used: self.tick,
                        used_at: now,
                    },
                );
            }
            Input::Committed => {
                self.dirty.clear();
                self.evict_idle();
            }
            Input::StorageChanged { next_seq, changed } => {
                match changed {
                    Some(changed) => {
                        for id in changed {
                            if !self.dirty.contains(&id) {
                                self.docs.remove(&id);
                            }
                        }
                    }
                    None => self.docs.retain(|id, _| self.dirty.contains(id)),
                }
                self.next_seq = self.next_seq.max(next_seq);
            }
            Input::External { events } => self.external(events, &mut fx),
            Input::StorageFailed { docs } => {
                for id in docs {
                    self.dirty.remove(&id);
                    self.docs.remove(&id);
                }
                // The step's frames were dropped with its writes: the sessions' sync states
                // believe they sent them, and answers the peers wait for never left. Start
                // the sync states over, and let initiators reconcile again (the driver ends
                // the sessions whose input this step was).
                for peer in self.peers.values_mut() {
                    peer.forget_volatile();
                    if peer.initiator {
                        peer.announced = false;
                        peer.busy = true;
                        peer.last_activity = now;
                    }
                }
            }
        }
        self.pump(now, &mut fx);
        fx
    }

    /// Runs queued commands in order while their documents are in memory; requests loads for
    /// the first one that is blocked (and looks ahead to batch the loads of those behind it).
    fn pump(&mut self, now: i64, fx: &mut Effects) {
        while let Some(work) = self.queue.front() {
            let needs = work.needs();
            let docs_missing = needs.iter().any(|id| !self.docs.contains_key(id));
            let state_missing = matches!(work, Work::Peer(peer, w) if self.state_missing(*peer, w));
            if docs_missing || state_missing {
                // Look ahead only when the blocked item's reads are not requested yet: every
                // answer runs the pump again, and rescanning then would make a batch quadratic.
                let requested = needs
                    .iter()
                    .all(|id| self.docs.contains_key(id) || self.loading.contains(id))
                    && (!state_missing
                        || matches!(work, Work::Peer(peer, w) if self.state_requested(*peer, w)));
                if !requested {
                    self.request_loads(fx);
                    self.request_states(LOOKAHEAD, fx);
                }
                return;
            }
            match self.queue.pop_front() {
                Some(Work::Command(cid, command)) => {
                    let result = self.run(now, command, fx);
                    fx.completed.push((cid, result));
                }
                Some(Work::Peer(peer, work)) => self.run_peer(now, peer, work, fx),
                None => break,
            }
        }
        // Broken entries are answered; forget them so the next command retries the load.
        if self.broken {
            self.docs
                .retain(|_, e| !matches!(e.state, DocState::Broken(_)));
            self.broken = false;
        }
    }

    fn request_loads(&mut self, fx: &mut Effects) {
        for work in self.queue.iter().take(LOOKAHEAD) {
            for id in work.needs() {
                if !self.docs.contains_key(&id) && self.loading.insert(id) {
                    fx.loads.push(id);
                }
            }
        }
    }

    /// Unloads documents: those unused for `idle_unload_ms` (checked every quarter of that),
    /// then the least recently used beyond `max_loaded_docs`. Never one with uncommitted
    /// writes, never while work is queued.
    fn evict_idle(&mut self) {
        if !self.queue.is_empty() {
            return;
        }
        if self.sweep_due(self.now) {
            self.last_sweep = self.now;
            let cutoff = self.now - self.config.idle_unload_ms;
            let before = self.docs.len();
            self.docs
                .retain(|id, e| e.used_at > cutoff || self.dirty.contains(id));
            if self.docs.len() < before {
                tracing::debug!(
                    unloaded = before - self.docs.len(),
                    "unloaded idle documents"
                );
            }
        }
        let cap = self.config.max_loaded_docs;
        if self.docs.len() <= cap + cap / 4 || !self.queue.is_empty() {
            return;
        }
        let mut ages: Vec<(u64, DocumentId)> = self
            .docs
            .iter()
            .filter(|(id, _)| !self.dirty.contains(id))
            .map(|(id, e)| (e.last_used, *id))
            .collect();
        ages.sort_unstable();
        let excess = self.docs.len().saturating_sub(cap);
        for (_, id) in ages.into_iter().take(excess) {
            self.docs.remove(&id);
        }
    }

    fn run(&mut self, now: i64, command: Command, fx: &mut Effects) -> Result<Output, Error> {
        match command {
            Command::Create { collection, body } => {
                let body = self.within_limits(Value::Object(body))?;
                self.create(now, collection, json::into_object(body)?, fx)
            }
            Command::Upsert {
                id,
                collection,
                fields,
            } => {
                let fields = json::into_object(self.within_limits(Value::Object(fields))?)?;
                match self.touch(&id) {
                    Touched::Absent => self.create_as(now, id, collection, fields, fx),
                    Touched::Live(live) if live.collection != collection => {
                        Err(Error::WrongCollection {
                            id,
                            expected: collection,
                            found: live.collection.clone(),
                        })
                    }
                    Touched::Live(_) => {
                        self.edit(now, id, fx, |tx| Ok(json::set_fields(tx, &fields)?))
                    }
                    Touched::Deleted => Err(Error::Deleted(id)),
                    Touched::Broken(reason) => Err(Error::Corrupt { id, reason }),
                }
            }
            Command::PutMeta { key, value } => {
                fx.writes.push(StorageOp::PutMeta { key, value });
                Ok(Output::MetaStaged)
            }
            Command::Update { id, patch } => {
                let patch = json::into_object(self.within_limits(Value::Object(patch))?)?;
                self.edit(now, id, fx, |tx| Ok(json::merge_patch(tx, &patch)?))
            }
            Command::Set { id, path, value } => {
                let value = self.within_limits(value)?;
                self.edit(now, id, fx, |tx| json::set_at(tx, &path, &value))
            }
            Command::DeletePath { id, path } => {
                self.edit(now, id, fx, |tx| json::delete_at(tx, &path))
            }
            Command::SetText { id, path, text } => {
                self.edit(now, id, fx, |tx| json::set_text(tx, &path, &text))
            }
            Command::Splice {
                id,
                path,
                index,
                delete,
                insert,
            } => self.edit(now, id, fx, |tx| {
                json::splice_text(tx, &path, index, delete, &insert)
            }),
            Command::Change { id, f } => self.edit(now, id, fx, |tx| {
                // A panicking user closure must not take the engine down with it; the
                // transaction is rolled back like for any other error.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tx))) {
                    Ok(result) => result.map_err(Error::ChangeFn),
                    Err(panic) => {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(Error::ChangeFn(format!("panicked: {message}")))
                    }
                }
            }),
            Command::Delete { id } => self.delete(now, id, fx),
            Command::GetAt { id, heads } => self.get_at(id, &heads),
            Command::ImportBundle { bundle } => self.import(now, bundle, fx),
            Command::Compact { id } => self.compact(id, fx),
            Command::Broadcast { id, data } => self.broadcast(id, data, fx),
        }
    }

    /// A value from the local API, if it is within the limits (checked before any work on it:
    /// converting it recurses once per level). A refused value is dropped without recursion.
    fn within_limits(&self, value: Value) -> Result<Value, Error> {
        match self.config.limits.check_value(&value) {
            Ok(()) => Ok(value),
            Err(e) => {
                crate::limits::drop_value(value);
                Err(e.into())
            }
        }
    }

    /// The limits documents are held to.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The JSON body of a document new to this replica (received whole, created by a sync
    /// message, or imported), if the document is within the limits: its history (O(1)), then
    /// its depth and size while the body is written. Nothing is changed either way.
    pub(crate) fn new_document_body(&self, doc: &Automerge) -> Result<String, LimitError> {
        let limits = &self.config.limits;
        limits.check_history(doc)?;
        json::body(doc, None, limits)
    }

    /// Puts a loaded document back to `before` (its heads before a change that must not stay):
    /// Automerge cannot undo an applied change, so the document is rebuilt from its changes up
    /// to those heads. If that fails (it cannot: the heads are the document's own), the
    /// document is forgotten instead, unless it has uncommitted writes.
    fn restore(&mut self, id: DocumentId, before: &[ChangeHash]) {
        let actor = self.actor.clone();
        let Some(Entry {
            state: DocState::Live(live),
            ..
        }) = self.docs.get_mut(&id)
        else {
            return;
        };
        match live.doc.fork_at(before) {
            Ok(doc) => live.doc = doc.with_actor(actor),
            Err(e) => {
                tracing::error!(doc = %id, error = %e, "could not restore a refused change");
                if !self.dirty.contains(&id) {
                    self.docs.remove(&id);
                }
            }
        }
    }

    /// Marks a document used and returns its state, loading a [`DocState::Saved`] one.
    fn touch(&mut self, id: &DocumentId) -> Touched<'_> {
        self.tick += 1;
        let tick = self.tick;
        let Some(entry) = self.docs.get_mut(id) else {
            return Touched::Absent;
        };
        entry.last_used = tick;
        entry.used_at = self.now;
        if let DocState::Saved {
            collection,
            snapshot,
        } = &mut entry.state
        {
            entry.state =
                match LiveDoc::from_saved(*id, std::mem::take(collection), snapshot, &self.actor) {
                    Ok(live) => DocState::Live(Box::new(live)),
                    Err(e) => {
                        self.broken = true;
                        DocState::Broken(e.to_string())
                    }
                };
        }
        match &mut entry.state {
            DocState::Live(live) => Touched::Live(live),
            DocState::Deleted { .. } => Touched::Deleted,
            DocState::Absent | DocState::Saved { .. } => Touched::Absent,
            DocState::Broken(reason) => Touched::Broken(reason.clone()),
        }
    }

    /// The loaded documents among `ids` (not written in this step) whose store can return
    /// only the chunks appended since they were loaded, with their cursors.
    pub(crate) fn refreshable(&self, ids: &[DocumentId]) -> Vec<(DocumentId, i64)> {
        ids.iter()
            .filter(|id| !self.dirty.contains(id))
            .filter_map(|id| match self.docs.get(id).map(|e| &e.state) {
                Some(DocState::Live(live)) => live.cursor.map(|c| (*id, c)),
                _ => None,
            })
            .collect()
    }

    /// Applies to a loaded document what another writer appended to it in storage. True when
    /// it is now the stored version; otherwise it is dropped from memory (and loaded again
    /// when needed): a compaction by the other writer, a tombstone, a failed read.
    pub(crate) fn refresh(
        &mut self,
        id: DocumentId,
        new: Result<Option<effects::NewChunks>, StoreError>,
    ) -> bool {
        let current = match (new, self.docs.get_mut(&id).map(|e| &mut e.state)) {
            (Ok(Some(new)), Some(DocState::Live(live))) if !new.deleted => {
                let mut applied = true;
                for chunk in &new.chunks {
                    if live.doc.load_incremental(chunk).is_err() {
                        applied = false;
                        break;
                    }
                    live.incremental_bytes += chunk.len();
                    live.incremental_chunks += 1;
                }
                if applied && doc::check_heads(id, &live.doc.get_heads(), &new.heads).is_ok() {
                    live.cursor = Some(new.cursor);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !current {
            self.docs.remove(&id);
        }
        current
    }

    fn live(&mut self, id: DocumentId) -> Result<&mut LiveDoc, Error> {
        match self.touch(&id) {
            Touched::Live(doc) => Ok(doc),
            Touched::Deleted => Err(Error::Deleted(id)),
            Touched::Broken(reason) => Err(Error::Corrupt { id, reason }),
            Touched::Absent => Err(Error::NotFound(id)),
        }
    }

    fn compact(&mut self, id: DocumentId, fx: &mut Effects) -> Result<Output, Error> {
        let live = self.live(id)?;
        if live.incremental_chunks > 0 {
            let snapshot = live.doc.save();
            live.compacted(snapshot.len());
            fx.writes.push(StorageOp::ReplaceChunks { id, snapshot });
            self.dirty.insert(id);
        }
        let bytes = self.live(id)?.snapshot_bytes;
        Ok(Output::Compacted { bytes })
    }

    fn commit_options(now: i64) -> CommitOptions {
        CommitOptions::default().with_time(now.div_euclid(1000))
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn create(
        &mut self,
        now: i64,
        collection: String,
        body: Map<String, Value>,
        fx: &mut Effects,
    ) -> Result<Output, Error> {
        let id = DocumentId::from_bytes(self.rng.random());
        self.create_as(now, id, collection, body, fx)
    }

    /// Creates the document `id`, which must be absent.
    fn create_as(
        &mut self,
        now: i64,
        id: DocumentId,
        collection: String,
        body: Map<String, Value>,
        fx: &mut Effects,
    ) -> Result<Output, Error> {
        validate_collection(&collection)?;
        // The body we were given is exactly what materializing the new document yields
        // (same key order, same number kinds), so skip the round trip. Its depth and number of
        // values were checked already (`within_limits`).
        let body_text = serde_json::to_string(&body)
            .map_err(|e| Error::Internal(format!("a body did not serialize: {e}")))?;
        if body_text.len() > self.config.limits.max_json_bytes {
            return Err(LimitError::JsonBytes(self.config.limits.max_json_bytes).into());
        }
        let mut doc = self.empty.clone();
        // One change for most bodies (an empty one for an empty body, so that every document
        // has heads); a large body in several, and consumed as it is written.
        json::create_document(&mut doc, body, || Self::commit_options(now))?;
        let heads = doc.get_heads();
        let snapshot = doc.save();
        let body = body_text;
        debug_assert_eq!(
            Ok(&body),
            json::body(&doc, None, &self.config.limits).as_ref()
        );
        drop(doc);
        self.insert_new(
            now,
            id,
            collection,
            heads.clone(),
            body,
            snapshot,
            By::Local,
            fx,
        );
        Ok(Output::Created { id, heads })
    }

    /// Writes a document that is new to storage and keeps it as its saved bytes: the
    /// `Automerge` value is dropped now, while it is hot in cache — freeing thousands of them
    /// later, at eviction, costs more than loading again the few that get edited.
    #[allow(clippy::too_many_arguments)]
    fn insert_new(
        &mut self,
        now: i64,
        id: DocumentId,
        collection: String,
        heads: Vec<ChangeHash>,
        body: String,
        snapshot: Vec<u8>,
        by: By,
        fx: &mut Effects,
    ) {
        if !by.may_write(id, &collection) {
            return;
        }
        let origin = by.origin();
        let seq = self.take_seq();
        fx.writes.push(StorageOp::InsertDocument {
            id,
            collection: collection.clone(),
            heads: heads.clone(),
            body,
            snapshot: snapshot.clone(),
            seq,
        });
        self.emit(
            fx,
            ChangeEvent {
                seq,
                id,
                collection: collection.clone(),
                kind: ChangeKind::Created,
                heads,
                origin,
                at: now,
            },
        );
        self.tick += 1;
        self.docs.insert(
            id,
            Entry {
                state: DocState::Saved {
                    collection: collection.clone(),
                    snapshot,
                },
                last_used: self.tick,
                used_at: now,
            },
        );
        self.dirty.insert(id);
        self.fan_out(id, &collection, ChangeKind::Created, origin, fx);
    }

    /// Runs `f` in one Automerge transaction. On error nothing changes (the transaction is rolled
    /// back); when `f` made no operation, nothing is written.
    fn edit<F>(&mut self, now: i64, id: DocumentId, fx: &mut Effects, f: F) -> Result<Output, Error>
    where
        F: for<'a> FnOnce(&mut Transaction<'a>) -> Result<(), Error>,
    {
        let limits = self.config.limits;
        let live = self.live(id)?;
        let before = live.doc.get_heads();
        let history = live.doc.stats();
        let mut tx = live.doc.transaction();
        if let Err(e) = f(&mut tx) {
            tx.rollback();
            return Err(e);
        }
        if tx.pending_ops() == 0 {
            tx.rollback();
            return Ok(Output::Changed {
                heads: before,
                changed: false,
            });
        }
        // The document as it would be, within the limits? Checked before the commit, so a
        // refusal is a rollback; the body written here is the one stored.
        let ops =
            (history.num_ops + history.num_changes + 1).saturating_add(tx.pending_ops() as u64);
        let checked = if ops > limits.max_ops {
            Err(LimitError::Ops(limits.max_ops))
        } else {
            json::body(&tx, None, &limits)
        };
        let body = match checked {
            Ok(body) => body,
            Err(source) => {
                tx.rollback();
                return Err(Error::Limit {
                    id: Some(id),
                    source,
                });
            }
        };
        tx.commit_with(Self::commit_options(now));
        let heads = self.record_change_with(now, id, &before, By::Local, body, fx);
        Ok(Output::Changed {
            heads,
            changed: true,
        })
    }

    /// Records a change from outside (a peer's sync message, a merged whole document, a
    /// bundle), applied to the loaded document already: if the document is now beyond the
    /// limits, the change is undone (the document is restored to `before`), nothing is
    /// written, and the error names the limit. Otherwise the writes, event and fan-out of
    /// [`record_change_with`](Self::record_change_with).
    pub(crate) fn record_change_checked(
        &mut self,
        now: i64,
        id: DocumentId,
        before: &[ChangeHash],
        by: By,
        fx: &mut Effects,
    ) -> Result<Vec<ChangeHash>, LimitError> {
        let limits = self.config.limits;
        let checked = match self.docs.get(&id) {
            Some(Entry {
                state: DocState::Live(live),
                ..
            }) => limits
                .check_history(&live.doc)
                .and_then(|()| json::body(&live.doc, None, &limits)),
            _ => return Ok(Vec::new()),
        };
        match checked {
            Ok(body) => Ok(self.record_change_with(now, id, before, by, body, fx)),
            Err(e) => {
                self.restore(id, before);
                Err(e)
            }
        }
    }

    /// Emits the writes and the event for a live document whose heads moved from `before` and
    /// whose JSON body is now `body`. (A writer without the right to it — an engine bug — has
    /// its in-memory change dropped with the document, which is loaded again from storage on
    /// next use.)
    fn record_change_with(
        &mut self,
        now: i64,
        id: DocumentId,
        before: &[ChangeHash],
        by: By,
        body: String,
        fx: &mut Effects,
    ) -> Vec<ChangeHash> {
        let policy = self.config.compaction;
        let Some(Entry {
            state: DocState::Live(live),
            ..
        }) = self.docs.get_mut(&id)
        else {
            return Vec::new();
        };
        if !by.may_write(id, &live.collection) {
            self.docs.remove(&id);
            return Vec::new();
        }
        let origin = by.origin();
        let seq = self.next_seq;
        self.next_seq += 1;
        let heads = live.doc.get_heads();
        let incremental = live.doc.save_after(before);
        fx.writes.push(StorageOp::PutDocument {
            id,
            collection: live.collection.clone(),
            deleted: false,
            heads: heads.clone(),
            body: Some(body),
            seq,
        });
        if live.appended(incremental.len(), &policy) {
            let snapshot = live.doc.save();
            live.compacted(snapshot.len());
            fx.writes.push(StorageOp::ReplaceChunks { id, snapshot });
        } else {
            fx.writes.push(StorageOp::AppendChunk {
                id,
                bytes: incremental,
            });
        }
        let collection = live.collection.clone();
        let event = ChangeEvent {
            seq,
            id,
            collection: collection.clone(),
            kind: ChangeKind::Updated,
            heads: heads.clone(),
            origin,
            at: now,
        };
        self.emit(fx, event);
        self.dirty.insert(id);
        self.fan_out(id, &collection, ChangeKind::Updated, origin, fx);
        heads
    }

    fn emit(&mut self, fx: &mut Effects, event: ChangeEvent) {
        fx.writes.push(StorageOp::AppendChange(event.clone()));
        fx.events.push(event);
    }

    fn delete(&mut self, now: i64, id: DocumentId, fx: &mut Effects) -> Result<Output, Error> {
        let (collection, heads) = match self.touch(&id) {
            Touched::Live(live) => (live.collection.clone(), live.doc.get_heads()),
            Touched::Deleted => return Ok(Output::Deleted { changed: false }),
            Touched::Broken(reason) => {
                return Err(Error::Corrupt { id, reason });
            }
            Touched::Absent => return Err(Error::NotFound(id)),
        };
        self.write_tombstone(now, id, collection, heads, By::Local, fx);
        Ok(Output::Deleted { changed: true })
    }

    pub(crate) fn write_tombstone(
        &mut self,
        now: i64,
        id: DocumentId,
        collection: String,
        heads: Vec<ChangeHash>,
        by: By,
        fx: &mut Effects,
    ) {
        if !by.may_write(id, &collection) {
            return;
        }
        let origin = by.origin();
        let seq = self.take_seq();
        fx.writes.push(StorageOp::PutDocument {
            id,
            collection: collection.clone(),
            deleted: true,
            heads: heads.clone(),
            body: None,
            seq,
        });
        fx.writes.push(StorageOp::PurgeChunks { id });
        self.emit(
            fx,
            ChangeEvent {
                seq,
                id,
                collection: collection.clone(),
                kind: ChangeKind::Deleted,
                heads,
                origin,
                at: now,
            },
        );
        self.tick += 1;
        self.docs.insert(
            id,
            Entry {
                state: DocState::Deleted {
                    collection: collection.clone(),
                },
                last_used: self.tick,
                used_at: now,
            },
        );
        self.dirty.insert(id);
        self.fan_out(id, &collection, ChangeKind::Deleted, origin, fx);
    }

    fn get_at(&mut self, id: DocumentId, heads: &[ChangeHash]) -> Result<Output, Error> {
        let limits = self.config.limits;
        let live = self.live(id)?;
        if let Some(missing) = heads
            .iter()
            .find(|h| live.doc.get_change_by_hash(h).is_none())
        {
            return Err(Error::UnknownHeads {
                id,
                hash: missing.to_string(),
            });
        }
        Ok(Output::Document(DocumentSnapshot {
            id,
            collection: live.collection.clone(),
            heads: heads.to_vec(),
            body: json::materialize_checked(&live.doc, Some(heads), &limits).map_err(|source| {
                Error::Limit {
                    id: Some(id),
                    source,
                }
            })?,
        }))
    }

    /// Merges a bundle. Every document in it is counted (before Automerge loads it), loaded,
    /// checked against its heads, and the document it leads to — itself if new here, merged
    /// with ours otherwise — checked against the limits, before anything is applied: damaged
    /// or oversized content fails the whole import with nothing changed.
    fn import(&mut self, now: i64, bundle: Bundle, fx: &mut Effects) -> Result<Output, Error> {
        let limits = self.config.limits;
        let mut incoming = Vec::with_capacity(bundle.entries.len());
        for entry in bundle.entries {
            match entry {
                BundleEntry::Document {
                    id,
                    collection,
                    heads,
                    bytes,
                } => {
                    validate_collection(&collection)?;
                    let refused = |source: LimitError| match source {
                        LimitError::Malformed(_) => Error::Corrupt {
                            id,
                            reason: format!("in bundle: {}", source.phrase()),
                        },
                        source => Error::Limit {
                            id: Some(id),
                            source,
                        },
                    };
                    limits.check_automerge(&bytes).map_err(refused)?;
                    let options = automerge::LoadOptions::new()
                        .on_partial_load(automerge::OnPartialLoad::Error);
                    let mut doc = Automerge::load_with_options(&bytes, options).map_err(|e| {
                        Error::Corrupt {
                            id,
                            reason: format!("in bundle: {e}"),
                        }
                    })?;
                    check_heads(id, &doc.get_heads(), &heads)?;
                    // What applying the entry would make of the document, checked now.
                    let body = match self.touch(&id) {
                        Touched::Live(live) if live.collection == collection => {
                            // `doc` becomes ours merged with the entry: the same changes, so
                            // the same document, as merging the entry into ours later.
                            let ours = live.doc.get_heads();
                            if let Err(e) = doc.merge(&mut live.doc) {
                                tracing::warn!(doc = %id, error = %e, "bundle entry did not merge cleanly");
                            }
                            let mut merged = doc.get_heads();
                            let mut ours = ours;
                            merged.sort_unstable();
                            ours.sort_unstable();
                            if merged == ours {
                                None
                            } else {
                                limits.check_history(&doc).map_err(refused)?;
                                Some(json::body(&doc, None, &limits).map_err(refused)?)
                            }
                        }
                        Touched::Absent => Some(self.new_document_body(&doc).map_err(refused)?),
                        Touched::Live(_) | Touched::Deleted | Touched::Broken(_) => None,
                    };
                    incoming.push(Incoming::Doc {
                        id,
                        collection,
                        doc: Box::new(doc),
                        bytes,
                        body,
                    });
                }
                BundleEntry::Tombstone { id, collection } => {
                    validate_collection(&collection)?;
                    incoming.push(Incoming::Tombstone { id, collection });
                }
            }
        }
        let mut report = ImportReport::default();
        for item in incoming {
            match item {
                Incoming::Tombstone { id, collection } => match self.touch(&id) {
                    Touched::Live(live) => {
                        let (collection, heads) = (live.collection.clone(), live.doc.get_heads());
                        self.write_tombstone(now, id, collection, heads, By::Bundle, fx);
                        report.deleted += 1;
                    }
                    Touched::Deleted | Touched::Broken(_) => report.unchanged += 1,
                    Touched::Absent => {
                        self.write_tombstone(now, id, collection, Vec::new(), By::Bundle, fx);
                        report.deleted += 1;
                    }
                },
                Incoming::Doc {
                    id,
                    collection,
                    mut doc,
                    bytes,
                    body,
                } => match self.touch(&id) {
                    Touched::Live(live) => {
                        if live.collection != collection {
                            tracing::warn!(doc = %id, ours = %live.collection, theirs = %collection, "bundle entry names another collection; skipped");
                            report.unchanged += 1;
                            continue;
                        }
                        let before = live.doc.get_heads();
                        if let Err(e) = live.doc.merge(&mut doc) {
                            tracing::warn!(doc = %id, error = %e, "bundle entry did not merge cleanly");
                        }
                        if live.doc.get_heads() == before {
                            report.unchanged += 1;
                            continue;
                        }
                        // Checked above, unless an earlier entry of this bundle (the same id
                        // twice) changed the document since: then it is checked now, and
                        // skipped (undone) if it is beyond the limits.
                        let recorded = match body {
                            Some(body) if doc.get_heads() == live.doc.get_heads() => {
                                Ok(self.record_change_with(now, id, &before, By::Bundle, body, fx))
                            }
                            _ => self.record_change_checked(now, id, &before, By::Bundle, fx),
                        };
                        match recorded {
                            Ok(_) => report.updated += 1,
                            Err(e) => {
                                tracing::warn!(doc = %id, error = %e, "bundle entry skipped");
                                report.unchanged += 1;
                            }
                        }
                    }
                    Touched::Deleted | Touched::Broken(_) => report.unchanged += 1,
                    Touched::Absent => {
                        let body = match body {
                            Some(body) => body,
                            None => {
                                self.new_document_body(&doc)
                                    .map_err(|source| Error::Limit {
                                        id: Some(id),
                                        source,
                                    })?
                            }
                        };
                        doc.set_actor(self.actor.clone());
                        let heads = doc.get_heads();
                        self.insert_new(now, id, collection, heads, body, bytes, By::Bundle, fx);
                        report.created += 1;
                    }
                },
            }
        }
        Ok(Output::Imported(report))
    }
}

/// A document's state as a command sees it (a saved document is loaded first).
enum Touched<'a> {
    Live(&'a mut LiveDoc),
    Deleted,
    Absent,
    Broken(String),
}

enum Incoming {
    Doc {
        id: DocumentId,
        collection: String,
        doc: Box<Automerge>,
        bytes: Vec<u8>,
        /// The body the document will have, checked against the limits (`None`: the entry
        /// changes nothing, or checks when it is applied).
        body: Option<String>,
    },
    Tombstone {
        id: DocumentId,
        collection: String,
    },
}

/// Collection names: 1 to 64 characters from `A-Z a-z 0-9 _ - . :`.
pub fn validate_collection(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidCollection(name.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT};
    use serde_json::json;

    use super::*;

    fn engine() -> Engine {
        Engine::new(EngineConfig::new(ReplicaId::from_bytes([1; 16]), 7, 1))
    }

    /// A document created through the engine, committed and loaded: its id and its heads.
    fn created(engine: &mut Engine) -> (DocumentId, Vec<ChangeHash>) {
        let body = json::into_object(json!({"a": {}})).unwrap();
        let mut fx = engine.handle(
            0,
            Input::Command(
                CommandId(1),
                Command::Create {
                    collection: "c".into(),
                    body,
                },
            ),
        );
        let _ = engine.handle(0, Input::Committed);
        let Some((_, Ok(Output::Created { id, heads }))) = fx.completed.pop() else {
            panic!("not created");
        };
        (id, heads)
    }

    /// Applies a change made elsewhere (another actor) to the loaded document, as a peer's
    /// sync message or whole document would.
    fn apply_foreign(engine: &mut Engine, id: DocumentId, change: impl FnOnce(&mut Automerge)) {
        let Touched::Live(live) = engine.touch(&id) else {
            panic!("not loaded");
        };
        let mut theirs = live
            .doc
            .fork()
            .with_actor(ActorId::from(b"someone else".as_slice()));
        change(&mut theirs);
        live.doc.merge(&mut theirs).unwrap();
    }

    #[test]
    fn a_received_change_beyond_the_limits_is_undone_and_nothing_written() {
        let mut engine = engine();
        let (id, before) = created(&mut engine);
        apply_foreign(&mut engine, id, |doc| {
            doc.transact(|tx| {
                let (_, mut obj) = tx.get(ROOT, "a")?.unwrap();
                for _ in 0..150 {
                    obj = tx.put_object(&obj, "deeper", ObjType::Map)?;
                }
                Ok::<_, automerge::AutomergeError>(())
            })
            .unwrap();
        });
        let seq = engine.next_seq();
        let mut fx = Effects::default();
        let refused = engine.record_change_checked(5, id, &before, By::Bundle, &mut fx);
        assert_eq!(refused, Err(LimitError::Depth(100)));
        assert!(fx.writes.is_empty() && fx.events.is_empty());
        assert_eq!(engine.next_seq(), seq);
        let actor = engine.actor().clone();
        let Touched::Live(live) = engine.touch(&id) else {
            panic!("forgotten");
        };
        assert_eq!(live.doc.get_heads(), before, "restored to the heads before");
        assert_eq!(live.doc.get_actor(), &actor, "still writing as this engine");
        assert_eq!(
            json::body(&live.doc, None, &Limits::DEFAULT).unwrap(),
            r#"{"a":{}}"#
        );

        // A change within the limits is recorded as before.
        apply_foreign(&mut engine, id, |doc| {
            doc.transact(|tx| tx.put(ROOT, "b", 1)).unwrap();
        });
        let mut fx = Effects::default();
        let heads = engine
            .record_change_checked(6, id, &before, By::Bundle, &mut fx)
            .unwrap();
        assert_ne!(heads, before);
        assert_eq!(fx.events.len(), 1);
        assert!(fx.writes.iter().any(|w| matches!(
            w,
            StorageOp::PutDocument { body: Some(body), .. } if body == r#"{"a":{},"b":1}"#
        )));
    }

    #[test]
    fn a_new_document_body_is_checked() {
        let mut engine = Engine::new(EngineConfig {
            limits: Limits {
                max_ops: 10,
                ..Limits::DEFAULT
            },
            ..EngineConfig::new(ReplicaId::from_bytes([1; 16]), 7, 1)
        });
        let (id, _) = created(&mut engine);
        let Touched::Live(live) = engine.touch(&id) else {
            panic!("not loaded");
        };
        let mut doc = live.doc.clone();
        assert_eq!(engine.new_document_body(&doc).as_deref(), Ok(r#"{"a":{}}"#));
        doc.transact(|tx| {
            for i in 0..10 {
                tx.put(ROOT, format!("k{i}"), i)?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
        assert_eq!(engine.new_document_body(&doc), Err(LimitError::Ops(10)));
    }
}
