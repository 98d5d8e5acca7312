//! The native replica: the engine driven over a SQLite file.
//!
//! [`Replica`] is cheap to clone and safe to share between threads. Every write goes through the
//! engine and returns only after its SQLite transaction committed; reads of current state go
//! straight to the materialized JSON in SQLite.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::ChangeHash;
use automerge::transaction::Transaction;
use serde_json::{Map, Value};

use crate::bundle::{Bundle, BundleScope};
use crate::engine::{
    ChangeEvent, Command, CommandId, DocumentSnapshot, Engine, EngineConfig, ImportReport, Input,
    Output, PeerEvent, PeerId,
};
use crate::error::{Error, Result};
use crate::hooks::{HookGuard, Hooks, Subscription};
use crate::id::DocumentId;
use crate::json::{self, Path as DocPath};
use crate::protocol::Message;
use crate::query::Query;
use crate::scope::Scope;
use crate::store::Store;
#[cfg(feature = "sqlite")]
use crate::store::sqlite::{SqliteStore, StoreOptions};
use crate::store::{DocRecord, StoreError};

pub use crate::store::Durability;

mod sessions;
mod step;

use sessions::StorageHealth;
pub use sessions::{SessionFailure, SessionInput};

/// Options for [`Replica::open_with`].
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// How hard each commit works to be durable (default: survives process crashes).
    pub durability: Durability,
    /// Documents kept in memory when idle.
    pub max_loaded_docs: usize,
    /// Documents unused for this long are unloaded (on the next step or [`Replica::tick`]),
    /// so memory follows the active set.
    pub idle_unload: std::time::Duration,
    /// How long to wait before offering a relay again the documents it refused to create
    /// because of its create limit (default: a minute).
    pub rate_limited_retry: std::time::Duration,
    /// Seed for the engine's random choices; `None` takes one from the OS. Fix it only to replay.
    pub seed: Option<u64>,
    /// A quota for the SQLite file: it may not grow beyond this many bytes; a write that
    /// needs more fails as on a full disk (reads go on). `None` (the default): no limit.
    pub max_size: Option<u64>,
    /// Where time comes from (milliseconds since the Unix epoch); the system clock by default.
    /// Simulations pass a clock they advance themselves.
    pub clock: Clock,
    /// When a document's incremental chunks are folded into one snapshot. A relay node that
    /// shares its store with other nodes reloads a document after each of their edits, and a
    /// reload reads every chunk: such a node compacts sooner
    /// ([`CompactionPolicy::shared_store`](crate::engine::CompactionPolicy::shared_store)).
    pub compaction: crate::engine::CompactionPolicy,
    /// How deep, how many operations and how large a document may be: documents received
    /// from peers or bundles beyond them are refused, and so are local writes that would
    /// exceed them (`Error::Limit`).
    pub limits: crate::Limits,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            max_loaded_docs: 1000,
            idle_unload: std::time::Duration::from_secs(60),
            rate_limited_retry: std::time::Duration::from_secs(60),
            seed: None,
            max_size: None,
            clock: Clock::system(),
            compaction: crate::engine::CompactionPolicy::default(),
            limits: crate::Limits::default(),
        }
    }
}

/// A source of time in milliseconds since the Unix epoch.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(now_ms))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    fn now(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

/// What [`Replica::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Documents whose incremental chunks were folded into a snapshot.
    pub documents: usize,
    /// Superseded change-feed entries removed.
    pub feed_entries_removed: usize,
}

/// A document as read from a replica.
pub type Document = DocumentSnapshot;

struct Inner {
    engine: Engine,
    store: Box<dyn Store>,
    next_command: u64,
}

/// Receives a step's frames and session events; returns the peers whose outgoing queue just
/// went over its high-water mark (see [`Replica::peer_flow`]).
type Transport =
    Arc<dyn Fn(Vec<(PeerId, Message)>, Vec<(PeerId, PeerEvent)>) -> Vec<PeerId> + Send + Sync>;

struct Shared {
    /// See [`Replica::attachment`] (unused in a build without a layer above, e.g. wasm).
    #[cfg_attr(not(feature = "net"), allow(dead_code))]
    attachment: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
    inner: Mutex<Inner>,
    transport: Mutex<Option<Transport>>,
    /// Whether storage fails (see [`Replica::storage_health`]).
    health: Mutex<StorageHealth>,
    clock: Clock,
    hooks: Hooks,
    path: PathBuf,
    limits: crate::Limits,
}

/// A replica: the engine over a [`Store`] (a SQLite file natively, memory plus IndexedDB in the
/// browser). See the crate docs for a tour.
#[derive(Clone)]
pub struct Replica {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn os_seed() -> Result<u64> {
    crate::id::os_random().map(u64::from_le_bytes)
}

impl Replica {
    /// Opens or creates the replica stored at `path`.
    #[cfg(feature = "sqlite")]
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, ReplicaOptions::default())
    }

    /// Opens or creates the replica stored at `path`, with options.
    #[cfg(feature = "sqlite")]
    pub fn open_with(path: impl AsRef<Path>, options: ReplicaOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let store = SqliteStore::open(
            &path,
            StoreOptions {
                durability: options.durability,
                max_size: options.max_size,
                ..StoreOptions::default()
            },
        )?;
        Self::with_store(Box::new(store), path, options)
    }

    /// Opens the existing replica at `path` for reading only, e.g. a file (or a directory) that
    /// is not writable: reads work ([`get`](Self::get), [`query`](Self::query),
    /// [`get_at`](Self::get_at), [`changes_since`](Self::changes_since),
    /// [`export_bundle`](Self::export_bundle)); writes fail with [`StoreError::ReadOnly`].
    /// Nothing is created or migrated: a missing file is [`StoreError::Missing`], one that
    /// needs a schema upgrade [`StoreError::SchemaTooOld`]. [`mode`](Self::mode) says whether
    /// other processes' later commits are seen
    /// ([`SqliteStore::open_read_only`](crate::store::sqlite::SqliteStore::open_read_only)).
    #[cfg(feature = "sqlite")]
    pub fn open_read_only(path: impl AsRef<Path>, options: ReplicaOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let store = SqliteStore::open_read_only(&path)?;
        Self::with_store(Box::new(store), path, options)
    }

    /// Whether this replica writes, and whether it sees other processes' commits.
    pub fn mode(&self) -> crate::StoreMode {
        self.lock().store.mode()
    }

    /// A replica over any [`Store`]: [`crate::store::mem::MemStore`] keeps everything in
    /// memory (the browser build persists its journal to IndexedDB). `path` only names it.
    pub fn with_store(
        store: Box<dyn Store>,
        path: PathBuf,
        options: ReplicaOptions,
    ) -> Result<Self> {
        let seed = match options.seed {
            Some(seed) => seed,
            None => os_seed()?,
        };
        let mut config = EngineConfig::new(store.replica_id(), seed, store.max_seq()? + 1);
        config.max_loaded_docs = options.max_loaded_docs;
        config.idle_unload_ms = i64::try_from(options.idle_unload.as_millis()).unwrap_or(i64::MAX);
        config.rate_limited_retry_ms =
            i64::try_from(options.rate_limited_retry.as_millis()).unwrap_or(i64::MAX);
        config.limits = options.limits;
        config.compaction = options.compaction;
        let engine = Engine::new(config);
        tracing::debug!(path = %path.display(), replica = %engine.replica_id(), "replica opened");
        Ok(Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    engine,
                    store,
                    next_command: 0,
                }),
                hooks: Hooks::default(),
                transport: Mutex::new(None),
                health: Mutex::default(),
                attachment: std::sync::OnceLock::new(),
                clock: options.clock.clone(),
                path,
                limits: options.limits,
            }),
        })
    }

    /// The file this replica lives in.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// This replica's id.
    pub fn replica_id(&self) -> crate::ReplicaId {
        self.lock().engine.replica_id()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave storage half-written (SQLite transactions
        // roll back), and engine state is only ahead of storage for uncommitted docs, which the
        // failed commit path forgets. So continuing after a poisoned lock is safe.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs commands through the engine, commits their writes in one transaction, then publishes
    /// the change events. Results come back in command order.
    fn execute(&self, commands: Vec<Command>) -> Vec<Result<Output>> {
        let mut inner = self.lock();
        let first = inner.next_command;
        let count = commands.len();
        inner.next_command += count as u64;
        let inputs = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Input::Command(CommandId(first + i as u64), c))
            .collect();
        self.step(inner, inputs, first, count).results
    }

    /// Runs commands in one step (one transaction), for drivers inside the crate.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn execute_commands(&self, commands: Vec<Command>) -> Vec<Result<Output>> {
        self.execute(commands)
    }

    /// A key of this replica's own metadata (`Command::PutMeta`).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().store.meta(key)?)
    }

    /// The catalog row of a document, live or tombstone; `None` when unknown here.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn record(&self, id: &DocumentId) -> Result<Option<DocRecord>> {
        Ok(self.lock().store.get(id)?)
    }

    fn execute_one(&self, command: Command) -> Result<Output> {
        self.execute(vec![command])
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("no result".into())))
    }

    fn changed(&self, command: Command) -> Result<Vec<ChangeHash>> {
        match self.execute_one(command)? {
            Output::Changed { heads, .. } => Ok(heads),
            other => Err(unexpected(other)),
        }
    }

    // ----- writes ---------------------------------------------------------------------------

    /// Creates a document; returns its new id once it is durable.
    pub fn create(&self, collection: &str, body: Value) -> Result<DocumentId> {
        let body = json::into_object(body)?;
        match self.execute_one(Command::Create {
            collection: collection.to_owned(),
            body,
        })? {
            Output::Created { id, .. } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Creates many documents in one transaction (bulk import). All bodies are checked first:
    /// if one is not an object, or beyond the limits, nothing is created.
    pub fn create_many(
        &self,
        collection: &str,
        bodies: impl IntoIterator<Item = Value>,
    ) -> Result<Vec<DocumentId>> {
        crate::engine::validate_collection(collection)?;
        let bodies: Vec<Value> = bodies.into_iter().collect();
        let refused = bodies.iter().find_map(|body| match body {
            Value::Object(_) => self.shared.limits.check_value(body).err().map(Error::from),
            other => Some(json::JsonError::NotAnObject(json::kind_of(other)).into()),
        });
        if let Some(e) = refused {
            bodies.into_iter().for_each(crate::limits::drop_value);
            return Err(e);
        }
        let bodies: Vec<Map<String, Value>> = bodies
            .into_iter()
            .map(json::into_object)
            .collect::<Result<_, _>>()?;
        let commands = bodies
            .into_iter()
            .map(|body| Command::Create {
                collection: collection.to_owned(),
                body,
            })
            .collect();
        self.execute(commands)
            .into_iter()
            .map(|r| match r? {
                Output::Created { id, .. } => Ok(id),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    /// Applies an RFC 7386 merge patch. Returns the new heads (unchanged if the patch changed
    /// nothing).
    pub fn update(&self, id: &DocumentId, patch: Value) -> Result<Vec<ChangeHash>> {
        let patch = json::into_object(patch)?;
        self.changed(Command::Update { id: *id, patch })
    }

    /// Sets the value at `path` (the last key is created; index = length appends).
    pub fn set(&self, id: &DocumentId, path: &DocPath, value: Value) -> Result<Vec<ChangeHash>> {
        self.changed(Command::Set {
            id: *id,
            path: path.clone(),
            value,
        })
    }

    /// Deletes the value at `path`.
    pub fn delete_path(&self, id: &DocumentId, path: &DocPath) -> Result<Vec<ChangeHash>> {
        self.changed(Command::DeletePath {
            id: *id,
            path: path.clone(),
        })
    }

    /// Makes the value at `path` collaborative text with this content.
    pub fn set_text(&self, id: &DocumentId, path: &DocPath, text: &str) -> Result<Vec<ChangeHash>> {
        self.changed(Command::SetText {
            id: *id,
            path: path.clone(),
            text: text.to_owned(),
        })
    }

    /// Splices collaborative text: at `index` (Unicode code points) delete `delete`, insert `insert`.
    pub fn splice(
        &self,
        id: &DocumentId,
        path: &DocPath,
        index: usize,
        delete: usize,
        insert: &str,
    ) -> Result<Vec<ChangeHash>> {
        self.changed(Command::Splice {
            id: *id,
            path: path.clone(),
            index,
            delete,
            insert: insert.to_owned(),
        })
    }

    /// Runs `f` over an Automerge transaction on the document (for anything the JSON API does not
    /// cover: counters, marks, cursors...). If `f` returns an error, nothing is committed.
    pub fn change<F, E>(&self, id: &DocumentId, f: F) -> Result<Vec<ChangeHash>>
    where
        F: for<'a> FnOnce(&mut Transaction<'a>) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        self.changed(Command::Change {
            id: *id,
            f: Box::new(move |tx| f(tx).map_err(|e| e.to_string())),
        })
    }

    /// Sends ephemeral data about a document (presence, cursors: anything not worth storing)
    /// to every session of this replica that may read it — for a client, the relay, which
    /// passes it on to every other session that may read the document. Nothing is stored.
    /// `data` is opaque (at most 64 KiB); weft's JS package and automerge-repo encode it as
    /// CBOR. Returns how many sessions it went to.
    pub fn broadcast(&self, id: &DocumentId, data: Vec<u8>) -> Result<usize> {
        match self.execute_one(Command::Broadcast { id: *id, data })? {
            Output::Broadcast { sessions } => Ok(sessions),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes the document: a tombstone that wins over concurrent edits and replicates.
    /// Deleting an already deleted document succeeds and changes nothing.
    pub fn delete(&self, id: &DocumentId) -> Result<()> {
        match self.execute_one(Command::Delete { id: *id })? {
            Output::Deleted { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    // ----- reads ----------------------------------------------------------------------------

    /// The current state of a document.
    pub fn get(&self, id: &DocumentId) -> Result<Document> {
        let record = self.lock().store.get(id)?.ok_or(Error::NotFound(*id))?;
        document_from(record)
    }

    /// The document as it was at `heads` (any heads it has had).
    pub fn get_at(&self, id: &DocumentId, heads: &[ChangeHash]) -> Result<Document> {
        match self.execute_one(Command::GetAt {
            id: *id,
            heads: heads.to_vec(),
        })? {
            Output::Document(doc) => Ok(doc),
            other => Err(unexpected(other)),
        }
    }

    /// Every live document of a collection, in creation order.
    pub fn list(&self, collection: &str) -> Result<Vec<Document>> {
        self.query(&Query::collection(collection))
    }

    /// Live documents matching a query (filters run in SQLite over the materialized JSON).
    pub fn query(&self, query: &Query) -> Result<Vec<Document>> {
        if let Some(filter) = &query.filter {
            filter.validate()?;
        }
        let records = self.lock().store.query(query)?;
        records.into_iter().map(document_from).collect()
    }

    /// Change-feed entries after `since` (oldest first, at most `limit`), optionally of one
    /// collection.
    pub fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>> {
        Ok(self.lock().store.changes_since(since, limit, collection)?)
    }

    /// The highest committed change-feed sequence number.
    pub fn last_seq(&self) -> u64 {
        self.lock().engine.next_seq() - 1
    }

    // ----- reconciliation -------------------------------------------------------------------

    /// The reconciliation summary (count and 256 bucket digests) of the documents in `scope`,
    /// deleted ones included. Two replicas whose summaries are equal hold the same versions.
    pub fn catalog_summary(&self, scope: &Scope) -> Result<crate::protocol::CatalogSummary> {
        Ok(self.lock().store.catalog_summary(scope_names(scope))?)
    }

    /// The catalog entries of some reconciliation buckets, for finding the documents that differ.
    pub fn catalog_entries(
        &self,
        scope: &Scope,
        buckets: &[u8],
    ) -> Result<Vec<crate::protocol::CatalogEntry>> {
        Ok(self
            .lock()
            .store
            .catalog_entries(scope_names(scope), buckets)?)
    }

    // ----- hooks ----------------------------------------------------------------------------

    /// Calls `f` after every committed change in `scope`, in feed order, on the thread that
    /// committed it (or another writer's thread). `f` may call back into the replica. The hook
    /// stays installed while the returned guard lives.
    pub fn on_change(
        &self,
        scope: Scope,
        f: impl Fn(&ChangeEvent) + Send + Sync + 'static,
    ) -> HookGuard {
        self.shared.hooks.add_hook(scope, Arc::new(f))
    }

    /// A stream of committed changes in `scope` after `since` (use [`Replica::last_seq`] for
    /// "from now on"). It never skips an entry: when the in-memory buffer overflows, it catches
    /// up from the durable change feed.
    pub fn subscribe(&self, scope: Scope, since: u64) -> Subscription {
        let (rx, lagged) = self.shared.hooks.add_channel(scope.clone());
        Subscription::new(self.clone(), scope, since, rx, lagged)
    }

    // ----- bundles --------------------------------------------------------------------------

    /// Exports documents and tombstones in `scope` as bundle bytes.
    pub fn export_bundle(&self, scope: &BundleScope) -> Result<Vec<u8>> {
        let inner = self.lock();
        let entries = inner.store.export(scope)?;
        Ok(Bundle {
            source: inner.engine.replica_id(),
            entries,
        }
        .encode())
    }

    /// Merges a bundle. Idempotent; a damaged bundle changes nothing.
    pub fn import_bundle(&self, bytes: &[u8]) -> Result<ImportReport> {
        let bundle = Bundle::decode(bytes)?;
        match self.execute_one(Command::ImportBundle { bundle })? {
            Output::Imported(report) => Ok(report),
            other => Err(unexpected(other)),
        }
    }

    // ----- maintenance ----------------------------------------------------------------------

    /// Compacts the file: folds every document's incremental chunks into one snapshot,
    /// log-compacts the change feed to the newest entry per document (a consumer resuming from
    /// any sequence number still sees every document changed since, at its latest version), and
    /// rebuilds the file without free pages. Safe to run at any time; it takes the write lock.
    pub fn compact(&self) -> Result<CompactReport> {
        let ids = self.lock().store.uncompacted()?;
        for batch in ids.chunks(256) {
            for result in self.execute(
                batch
                    .iter()
                    .map(|id| Command::Compact { id: *id })
                    .collect(),
            ) {
                match result {
                    Ok(_) | Err(Error::Deleted(_)) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut inner = self.lock();
        let removed = inner.store.compact_feed()?;
        inner.store.vacuum()?;
        inner.store.checkpoint()?;
        Ok(CompactReport {
            documents: ids.len(),
            feed_entries_removed: removed,
        })
    }

    /// `PRAGMA integrity_check`.
    pub fn integrity_check(&self) -> Result<()> {
        Ok(self.lock().store.integrity_check()?)
    }

    /// Folds the WAL into the main file.
    pub fn checkpoint(&self) -> Result<()> {
        Ok(self.lock().store.checkpoint()?)
    }

    /// Live documents, tombstones and change-feed entries.
    pub fn counts(&self) -> Result<(u64, u64, u64)> {
        Ok(self.lock().store.counts()?)
    }
}

fn scope_names(scope: &Scope) -> Option<&[String]> {
    match scope {
        Scope::All => None,
        Scope::Collections(names) => Some(names),
    }
}

fn document_from(record: DocRecord) -> Result<Document> {
    let DocRecord {
        id,
        collection,
        deleted,
        heads,
        body,
        ..
    } = record;
    if deleted {
        return Err(Error::Deleted(id));
    }
    let body = body.ok_or_else(|| StoreError::Corrupt(format!("document {id} has no body")))?;
    let body = serde_json::from_str(&body)
        .map_err(|e| StoreError::Corrupt(format!("body of {id}: {e}")))?;
    Ok(Document {
        id,
        collection,
        heads,
        body,
    })
}

fn unexpected(output: Output) -> Error {
    Error::Internal(format!("unexpected engine output {output:?}"))
}
