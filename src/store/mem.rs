//! A replica's storage in memory, with a journal of committed writes for a persistence layer
//! (IndexedDB in the browser) to make durable.
//!
//! The same logical model as SQLite (see the module docs of [`crate::store`]): a catalog of
//! documents in creation order, their Automerge chunks, the change feed, per-peer sync states.
//! A step's writes are staged by [`Store::write`] and applied by [`Store::commit`], which also
//! appends them to the journal as key-value records ([`Record`]); the driver drains the journal
//! ([`MemStore::journal`]) into one durable transaction and acknowledges the step's
//! writes once that transaction committed. [`MemStore::restore`] rebuilds the store from the
//! records read back, so a reload finds every document and the change-feed position.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;

use super::{DocRecord, Store, StoreError, USER_META, decode_heads, encode_heads};
use crate::bundle::{BundleEntry, BundleScope};
use crate::engine::ChunkKind;
use crate::engine::{ChangeEvent, ChangeKind, StorageOp, StoredChunk, StoredDoc};
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::{CatalogEntry, CatalogSummary, bucket_of, doc_digest};
use crate::query::Query;

/// One durable key-value record, as the persistence layer stores it. Keys are strings so that
/// any key-value store (IndexedDB object stores, a test's map) can hold them; values are
/// self-describing bytes (postcard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Insert or replace `key` in `table`.
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    /// Remove every key of `table` starting with `prefix`.
    DeletePrefix { table: Table, prefix: String },
}

/// The tables ("object stores") of a persisted [`MemStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `meta`: the replica id.
    Meta,
    /// Catalog rows by document id.
    Documents,
    /// Automerge chunks by `document id / chunk number`.
    Chunks,
    /// The change feed by zero-padded sequence number.
    Changes,
    /// Sync states by `peer id / document id`.
    SyncStates,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Meta,
        Table::Documents,
        Table::Chunks,
        Table::Changes,
        Table::SyncStates,
    ];

    /// The table's name (an IndexedDB object store name).
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Documents => "documents",
            Table::Chunks => "chunks",
            Table::Changes => "changes",
            Table::SyncStates => "sync_states",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The records a [`MemStore`] committed and the persistence layer has not taken yet. A handle:
/// clones share the records.
#[derive(Clone, Debug, Default)]
pub struct Journal(Arc<Mutex<Vec<Record>>>);

impl Journal {
    fn push(&self, record: Record) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    /// The records committed since the last call, in order: what to make durable in one
    /// transaction.
    pub fn drain(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether records are waiting.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// A catalog row as persisted.
#[derive(serde::Serialize, serde::Deserialize)]
struct DocRow {
    /// Creation order.
    key: u64,
    collection: String,
    deleted: bool,
    heads: Vec<u8>,
    body: Option<String>,
    updated_seq: u64,
}

/// A change-feed entry as persisted.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChangeRow {
    id: [u8; 16],
    kind: u8,
    heads: Vec<u8>,
    origin: String,
    at: i64,
}

struct Doc {
    id: DocumentId,
    collection: String,
    deleted: bool,
    heads: Vec<ChangeHash>,
    body: Option<String>,
    updated_seq: u64,
    /// Chunk number -> bytes; the lowest is the snapshot when `snapshot` is set.
    chunks: BTreeMap<u32, Vec<u8>>,
    snapshot: bool,
}

/// Storage in memory; see the module docs.
pub struct MemStore {
    replica_id: ReplicaId,
    next_key: u64,
    ids: HashMap<DocumentId, u64>,
    docs: BTreeMap<u64, Doc>,
    changes: BTreeMap<u64, ChangeEvent>,
    sync_states: HashMap<(ReplicaId, DocumentId), Vec<u8>>,
    /// Metadata written with `StorageOp::PutMeta`.
    meta: BTreeMap<String, Vec<u8>>,
    staged: Vec<StorageOp>,
    journal: Journal,
    /// The reconciliation summaries of every document and of each collection, kept up to date
    /// with each catalog row (a session asks for one after every burst of changes: summing
    /// 50,000 digests each time cost ~25 ms in wasm, most of a browser tab's CPU).
    summaries: Summaries,
}

#[derive(Default)]
struct Summaries {
    all: Option<CatalogSummary>,
    by_collection: HashMap<String, CatalogSummary>,
    /// Reconciliation bucket -> the keys of its documents (documents are never removed), so
    /// that the entries of a few buckets are found without a scan of every document.
    by_bucket: HashMap<u8, Vec<u64>>,
}

impl Summaries {
    /// A document new to the store, under its key.
    fn insert(&mut self, key: u64, id: &DocumentId) {
        self.by_bucket.entry(bucket_of(id)).or_default().push(key);
    }

    /// Adds (or, with `add` false, takes out) one document's digest.
    fn account(&mut self, doc: &Doc, add: bool) {
        let digest = doc_digest(&doc.id, &doc.heads, doc.deleted);
        let all = self.all.get_or_insert_with(CatalogSummary::empty);
        let one = self
            .by_collection
            .entry(doc.collection.clone())
            .or_insert_with(CatalogSummary::empty);
        for summary in [all, one] {
            if add {
                summary.add(&doc.id, digest);
            } else {
                summary.remove(&doc.id, digest);
            }
        }
    }

    /// The summary of `collections` (all when `None`).
    fn of(&self, collections: Option<&[String]>) -> CatalogSummary {
        let Some(names) = collections else {
            return self.all.clone().unwrap_or_else(CatalogSummary::empty);
        };
        let mut out = CatalogSummary::empty();
        let mut seen = std::collections::HashSet::new();
        for name in names.iter().filter(|n| seen.insert(n.as_str())) {
            if let Some(one) = self.by_collection.get(name) {
                out.count += one.count;
                for (b, d) in out.buckets.iter_mut().zip(&one.buckets) {
                    *b ^= *d;
                }
            }
        }
        out
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn chunk_key(id: &DocumentId, n: u32) -> String {
    format!("{id}/{n:010}")
}

impl MemStore {
    /// An empty store for a new replica; its first journal records the replica id.
    pub fn new(replica_id: ReplicaId) -> Self {
        let store = MemStore {
            replica_id,
            next_key: 1,
            ids: HashMap::new(),
            docs: BTreeMap::new(),
            changes: BTreeMap::new(),
            sync_states: HashMap::new(),
            meta: BTreeMap::new(),
            staged: Vec::new(),
            journal: Journal::default(),
            summaries: Summaries::default(),
        };
        store.journal.push(Record::Put {
            table: Table::Meta,
            key: "replica".into(),
            value: replica_id.as_bytes().to_vec(),
        });
        store
    }

    /// Rebuilds a store from persisted records (`(table, key, value)` in any order). `None`
    /// when there is none: a new replica.
    pub fn restore(
        records: impl IntoIterator<Item = (Table, String, Vec<u8>)>,
    ) -> Result<Option<Self>, StoreError> {
        let mut replica = None;
        let mut rows = Vec::new();
        let mut chunks = Vec::new();
        let mut changes = Vec::new();
        let mut states = Vec::new();
        let mut metas = Vec::new();
        for (table, key, value) in records {
            match table {
                Table::Meta if key == "replica" => {
                    let bytes: [u8; 16] = value
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt("replica id is not 16 bytes"))?;
                    replica = Some(ReplicaId::from_bytes(bytes));
                }
                Table::Meta => {
                    if let Some(key) = key.strip_prefix(USER_META) {
                        metas.push((key.to_owned(), value));
                    }
                }
                Table::Documents => rows.push((key, value)),
                Table::Chunks => chunks.push((key, value)),
                Table::Changes => changes.push((key, value)),
                Table::SyncStates => states.push((key, value)),
            }
        }
        let Some(replica_id) = replica else {
            return if rows.is_empty() {
                Ok(None)
            } else {
                Err(corrupt("documents without a replica id"))
            };
        };
        let mut store = MemStore::new(replica_id);
        store.journal.drain();
        store.meta.extend(metas);
        for (key, value) in rows {
            let id: DocumentId = key
                .parse()
                .map_err(|_| corrupt(format!("document key {key:?}")))?;
            let row: DocRow =
                postcard::from_bytes(&value).map_err(|e| corrupt(format!("document {id}: {e}")))?;
            store.ids.insert(id, row.key);
            store.next_key = store.next_key.max(row.key + 1);
            store.docs.insert(
                row.key,
                Doc {
                    id,
                    collection: row.collection,
                    deleted: row.deleted,
                    heads: decode_heads(&row.heads)?,
                    body: row.body,
                    updated_seq: row.updated_seq,
                    chunks: BTreeMap::new(),
                    snapshot: false,
                },
            );
        }
        for (key, value) in chunks {
            let (id, n) = key
                .split_once('/')
                .and_then(|(id, n)| Some((id.parse::<DocumentId>().ok()?, n.parse::<u32>().ok()?)))
                .ok_or_else(|| corrupt(format!("chunk key {key:?}")))?;
            let doc = store
                .ids
                .get(&id)
                .and_then(|k| store.docs.get_mut(k))
                .ok_or_else(|| corrupt(format!("chunk of unknown document {id}")))?;
            if n == 0 {
                doc.snapshot = true;
            }
            doc.chunks.insert(n, value);
        }
        for (key, value) in changes {
            let seq: u64 = key
                .parse()
                .map_err(|_| corrupt(format!("change key {key:?}")))?;
            let row: ChangeRow =
                postcard::from_bytes(&value).map_err(|e| corrupt(format!("change {seq}: {e}")))?;
            let id = DocumentId::from_bytes(row.id);
            let collection = store
                .ids
                .get(&id)
                .and_then(|k| store.docs.get(k))
                .map(|d| d.collection.clone())
                .ok_or_else(|| corrupt(format!("change of unknown document {id}")))?;
            let event = ChangeEvent {
                seq,
                id,
                collection,
                kind: ChangeKind::from_u8(row.kind).ok_or_else(|| corrupt("change kind"))?,
                heads: decode_heads(&row.heads)?,
                origin: row.origin.parse().map_err(|_| corrupt("change origin"))?,
                at: row.at,
            };
            store.changes.insert(seq, event);
        }
        for (key, value) in states {
            let (peer, id) = key
                .split_once('/')
                .and_then(|(p, d)| {
                    Some((p.parse::<ReplicaId>().ok()?, d.parse::<DocumentId>().ok()?))
                })
                .ok_or_else(|| corrupt(format!("sync state key {key:?}")))?;
            store.sync_states.insert((peer, id), value);
        }
        for (key, doc) in &store.docs {
            store.summaries.insert(*key, &doc.id);
            store.summaries.account(doc, true);
        }
        Ok(Some(store))
    }

    /// The handle through which the persistence layer takes committed records.
    pub fn journal(&self) -> Journal {
        self.journal.clone()
    }

    fn doc(&self, id: &DocumentId) -> Option<&Doc> {
        self.ids.get(id).and_then(|k| self.docs.get(k))
    }

    fn record(doc: &Doc) -> DocRecord {
        DocRecord {
            id: doc.id,
            collection: doc.collection.clone(),
            deleted: doc.deleted,
            heads: doc.heads.clone(),
            body: doc.body.clone(),
            updated_seq: doc.updated_seq,
        }
    }

    fn put_row(&mut self, key: u64) {
        let Some(doc) = self.docs.get(&key) else {
            return;
        };
        let row = DocRow {
            key,
            collection: doc.collection.clone(),
            deleted: doc.deleted,
            heads: encode_heads(&doc.heads),
            body: doc.body.clone(),
            updated_seq: doc.updated_seq,
        };
        let value = postcard::to_allocvec(&row).unwrap_or_default();
        self.journal.push(Record::Put {
            table: Table::Documents,
            key: doc.id.to_string(),
            value,
        });
    }

    fn apply(&mut self, op: StorageOp) -> Result<(), StoreError> {
        match op {
            StorageOp::InsertDocument {
                id,
                collection,
                heads,
                body,
                snapshot,
                seq,
            } => self.insert_document(id, collection, heads, body, snapshot, seq),
            StorageOp::PutDocument {
                id,
                collection,
                deleted,
                heads,
                body,
                seq,
            } => self.put_document(id, collection, deleted, heads, body, seq),
            StorageOp::AppendChunk { id, bytes } => self.append_chunk(id, bytes)?,
            StorageOp::ReplaceChunks { id, snapshot } => self.replace_chunks(id, snapshot)?,
            StorageOp::PurgeChunks { id } => self.purge_chunks(id)?,
            StorageOp::PutSyncState { peer, id, state } => self.put_sync_state(peer, id, state),
            StorageOp::AppendChange(event) => self.append_change(event)?,
            StorageOp::PutMeta { key, value } => {
                self.journal.push(Record::Put {
                    table: Table::Meta,
                    key: format!("{USER_META}{key}"),
                    value: value.clone(),
                });
                self.meta.insert(key, value);
            }
        }
        Ok(())
    }

    /// A document new to storage (checked in `commit` before anything is applied).
    fn insert_document(
        &mut self,
        id: DocumentId,
        collection: String,
        heads: Vec<automerge::ChangeHash>,
        body: String,
        snapshot: Vec<u8>,
        seq: u64,
    ) {
        let key = self.next_key;
        self.next_key += 1;
        self.ids.insert(id, key);
        self.journal.push(Record::Put {
            table: Table::Chunks,
            key: chunk_key(&id, 0),
            value: snapshot.clone(),
        });
        self.docs.insert(
            key,
            Doc {
                id,
                collection,
                deleted: false,
                heads,
                body: Some(body),
                updated_seq: seq,
                chunks: BTreeMap::from([(0, snapshot)]),
                snapshot: true,
            },
        );
        self.summaries.insert(key, &id);
        if let Some(doc) = self.docs.get(&key) {
            self.summaries.account(doc, true);
        }
        self.put_row(key);
    }

    /// Inserts or replaces a catalog row and its body.
    fn put_document(
        &mut self,
        id: DocumentId,
        collection: String,
        deleted: bool,
        heads: Vec<automerge::ChangeHash>,
        body: Option<String>,
        seq: u64,
    ) {
        let key = match self.ids.get(&id) {
            Some(key) => {
                if let Some(doc) = self.docs.get(key) {
                    self.summaries.account(doc, false);
                }
                *key
            }
            None => {
                let key = self.next_key;
                self.next_key += 1;
                self.ids.insert(id, key);
                self.summaries.insert(key, &id);
                self.docs.insert(
                    key,
                    Doc {
                        id,
                        collection,
                        deleted,
                        heads: Vec::new(),
                        body: None,
                        updated_seq: seq,
                        chunks: BTreeMap::new(),
                        snapshot: false,
                    },
                );
                key
            }
        };
        if let Some(doc) = self.docs.get_mut(&key) {
            doc.deleted = deleted;
            doc.heads = heads;
            doc.body = body;
            doc.updated_seq = seq;
        }
        if let Some(doc) = self.docs.get(&key) {
            self.summaries.account(doc, true);
        }
        self.put_row(key);
    }

    fn append_chunk(&mut self, id: DocumentId, bytes: Vec<u8>) -> Result<(), StoreError> {
        let doc = self.doc_mut(&id)?;
        let n = doc.chunks.keys().next_back().map_or(1, |n| n + 1);
        doc.chunks.insert(n, bytes.clone());
        self.journal.push(Record::Put {
            table: Table::Chunks,
            key: chunk_key(&id, n),
            value: bytes,
        });
        Ok(())
    }

    /// Compaction: one snapshot replaces every chunk.
    fn replace_chunks(&mut self, id: DocumentId, snapshot: Vec<u8>) -> Result<(), StoreError> {
        let doc = self.doc_mut(&id)?;
        doc.chunks = BTreeMap::from([(0, snapshot.clone())]);
        doc.snapshot = true;
        self.journal.push(Record::DeletePrefix {
            table: Table::Chunks,
            prefix: format!("{id}/"),
        });
        self.journal.push(Record::Put {
            table: Table::Chunks,
            key: chunk_key(&id, 0),
            value: snapshot,
        });
        Ok(())
    }

    /// A deleted document's content and sync states go; its catalog row stays.
    fn purge_chunks(&mut self, id: DocumentId) -> Result<(), StoreError> {
        let doc = self.doc_mut(&id)?;
        doc.chunks.clear();
        doc.snapshot = false;
        self.journal.push(Record::DeletePrefix {
            table: Table::Chunks,
            prefix: format!("{id}/"),
        });
        let peers: Vec<ReplicaId> = self
            .sync_states
            .keys()
            .filter(|(_, d)| *d == id)
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            self.sync_states.remove(&(peer, id));
            self.journal.push(Record::DeletePrefix {
                table: Table::SyncStates,
                prefix: format!("{peer}/{id}"),
            });
        }
        Ok(())
    }

    /// As in SQLite: only for a stored, live document.
    fn put_sync_state(&mut self, peer: ReplicaId, id: DocumentId, state: Vec<u8>) {
        if self.doc(&id).is_some_and(|d| !d.deleted) {
            self.journal.push(Record::Put {
                table: Table::SyncStates,
                key: format!("{peer}/{id}"),
                value: state.clone(),
            });
            self.sync_states.insert((peer, id), state);
        }
    }

    fn append_change(&mut self, event: ChangeEvent) -> Result<(), StoreError> {
        if self.doc(&event.id).is_none() {
            return Err(corrupt(format!(
                "change for {}, which has no catalog row",
                event.id
            )));
        }
        let row = ChangeRow {
            id: *event.id.as_bytes(),
            kind: event.kind.as_u8(),
            heads: encode_heads(&event.heads),
            origin: event.origin.to_string(),
            at: event.at,
        };
        self.journal.push(Record::Put {
            table: Table::Changes,
            key: format!("{:020}", event.seq),
            value: postcard::to_allocvec(&row).unwrap_or_default(),
        });
        self.changes.insert(event.seq, event);
        Ok(())
    }

    /// Why the staged writes cannot all apply (a write for an unknown document, an insert of
    /// one that exists), if they cannot.
    fn first_problem(&self) -> Option<String> {
        let mut known: std::collections::HashSet<DocumentId> = std::collections::HashSet::new();
        for op in &self.staged {
            match op {
                StorageOp::InsertDocument { id, .. } => {
                    if self.ids.contains_key(id) || !known.insert(*id) {
                        return Some(format!("insert of {id}, which exists"));
                    }
                }
                StorageOp::PutDocument { id, .. } => {
                    known.insert(*id);
                }
                StorageOp::PutSyncState { .. } | StorageOp::PutMeta { .. } => {}
                other => {
                    let Some(id) = other.doc() else { continue };
                    if !known.contains(&id) && !self.ids.contains_key(&id) {
                        return Some(format!("write for {id}, which has no catalog row"));
                    }
                }
            }
        }
        None
    }

    fn doc_mut(&mut self, id: &DocumentId) -> Result<&mut Doc, StoreError> {
        self.ids
            .get(id)
            .and_then(|k| self.docs.get_mut(k))
            .ok_or_else(|| corrupt(format!("write for {id}, which has no catalog row")))
    }

    fn in_scope(doc: &Doc, collections: Option<&[String]>) -> bool {
        collections.is_none_or(|names| names.contains(&doc.collection))
    }
}

impl Store for MemStore {
    fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key).cloned())
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        Ok(self.changes.keys().next_back().copied().unwrap_or(0))
    }

    fn begin(&mut self) -> Result<bool, StoreError> {
        self.staged.clear();
        Ok(false)
    }

    fn write(&mut self, ops: &[StorageOp]) -> Result<(), StoreError> {
        self.staged.extend_from_slice(ops);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        // Check first, so that a failing step changes nothing.
        if let Some(problem) = self.first_problem() {
            self.staged.clear();
            return Err(corrupt(problem));
        }
        for op in std::mem::take(&mut self.staged) {
            self.apply(op)?;
        }
        Ok(())
    }

    fn rollback(&mut self) {
        self.staged.clear();
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn load(&self, id: &DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        Ok(self.doc(id).map(|doc| StoredDoc {
            cursor: None,
            collection: doc.collection.clone(),
            deleted: doc.deleted,
            heads: doc.heads.clone(),
            chunks: if doc.deleted {
                Vec::new()
            } else {
                doc.chunks
                    .iter()
                    .map(|(n, bytes)| StoredChunk {
                        kind: if *n == 0 && doc.snapshot {
                            ChunkKind::Snapshot
                        } else {
                            ChunkKind::Incremental
                        },
                        bytes: bytes.clone(),
                    })
                    .collect()
            },
        }))
    }

    fn load_sync_state(
        &self,
        peer: &ReplicaId,
        id: &DocumentId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.sync_states.get(&(*peer, *id)).cloned())
    }

    fn get(&self, id: &DocumentId) -> Result<Option<DocRecord>, StoreError> {
        Ok(self.doc(id).map(Self::record))
    }

    fn query(&self, query: &Query) -> Result<Vec<DocRecord>, StoreError> {
        let mut out = Vec::new();
        for doc in self.docs.values() {
            if doc.deleted
                || query
                    .collection
                    .as_ref()
                    .is_some_and(|c| *c != doc.collection)
            {
                continue;
            }
            if let Some(filter) = &query.filter {
                let body: serde_json::Value = match &doc.body {
                    Some(text) => serde_json::from_str(text)
                        .map_err(|e| corrupt(format!("body of {}: {e}", doc.id)))?,
                    None => continue,
                };
                if !filter.matches(&body) {
                    continue;
                }
            }
            if query.limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            out.push(Self::record(doc));
        }
        Ok(out)
    }

    fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        Ok(self
            .changes
            .range(since.saturating_add(1)..)
            .map(|(_, e)| e)
            .filter(|e| collection.is_none_or(|c| c == e.collection))
            .take(limit)
            .cloned()
            .collect())
    }

    fn export(&self, scope: &BundleScope) -> Result<Vec<BundleEntry>, StoreError> {
        Ok(self
            .docs
            .values()
            .filter(|d| match scope {
                BundleScope::All => true,
                BundleScope::Collection(c) => d.collection == *c,
                BundleScope::Since(seq) => d.updated_seq > *seq,
            })
            .map(|d| {
                if d.deleted {
                    BundleEntry::Tombstone {
                        id: d.id,
                        collection: d.collection.clone(),
                    }
                } else {
                    BundleEntry::Document {
                        id: d.id,
                        collection: d.collection.clone(),
                        heads: d.heads.clone(),
                        bytes: d.chunks.values().flatten().copied().collect(),
                    }
                }
            })
            .collect())
    }

    fn catalog_summary(
        &self,
        collections: Option<&[String]>,
    ) -> Result<CatalogSummary, StoreError> {
        Ok(self.summaries.of(collections))
    }

    fn catalog_entries(
        &self,
        collections: Option<&[String]>,
        buckets: &[u8],
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        let mut wanted = [false; 256];
        for b in buckets {
            wanted[usize::from(*b)] = true;
        }
        let mut keys: Vec<u64> = (0..=255u8)
            .filter(|b| wanted[usize::from(*b)])
            .filter_map(|b| self.summaries.by_bucket.get(&b))
            .flatten()
            .copied()
            .collect();
        keys.sort_unstable(); // creation order, as a scan gives them
        Ok(keys
            .iter()
            .filter_map(|k| self.docs.get(k))
            .filter(|d| Self::in_scope(d, collections))
            .map(|d| CatalogEntry {
                id: d.id,
                collection: d.collection.clone(),
                digest: doc_digest(&d.id, &d.heads, d.deleted),
                deleted: d.deleted,
            })
            .collect())
    }

    fn uncompacted(&self) -> Result<Vec<DocumentId>, StoreError> {
        Ok(self
            .docs
            .values()
            .filter(|d| !d.deleted && d.chunks.keys().any(|n| *n > 0))
            .map(|d| d.id)
            .collect())
    }

    fn compact_feed(&mut self) -> Result<usize, StoreError> {
        let mut newest: HashMap<DocumentId, u64> = HashMap::new();
        for (seq, e) in &self.changes {
            newest.insert(e.id, *seq);
        }
        let stale: Vec<u64> = self
            .changes
            .iter()
            .filter(|(seq, e)| newest.get(&e.id) != Some(seq))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &stale {
            self.changes.remove(seq);
            self.journal.push(Record::DeletePrefix {
                table: Table::Changes,
                prefix: format!("{seq:020}"),
            });
        }
        Ok(stale.len())
    }

    fn vacuum(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn integrity_check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let deleted = self.docs.values().filter(|d| d.deleted).count() as u64;
        Ok((
            self.docs.len() as u64 - deleted,
            deleted,
            self.changes.len() as u64,
        ))
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(id: DocumentId) -> StorageOp {
        StorageOp::InsertDocument {
            id,
            collection: "c".into(),
            heads: Vec::new(),
            body: "{}".into(),
            snapshot: vec![1, 2, 3],
            seq: 1,
        }
    }

    #[test]
    fn a_commit_that_cannot_fully_apply_changes_nothing() {
        let mut store = MemStore::new(ReplicaId::from_seed(1));
        let journal = store.journal();
        journal.drain();
        let (a, b) = (
            DocumentId::from_bytes([1; 16]),
            DocumentId::from_bytes([2; 16]),
        );
        for bad in [
            vec![
                insert(a),
                StorageOp::AppendChunk {
                    id: b,
                    bytes: vec![9],
                },
            ],
            vec![insert(a), insert(a)],
        ] {
            store.begin().unwrap();
            store.write(&bad).unwrap();
            assert!(store.commit().is_err());
            assert!(store.get(&a).unwrap().is_none());
            assert!(journal.drain().is_empty());
        }
        store.begin().unwrap();
        store.write(&[insert(a)]).unwrap();
        store.commit().unwrap();
        assert!(store.get(&a).unwrap().is_some());
        store.begin().unwrap();
        store.write(&[insert(a)]).unwrap();
        assert!(
            store.commit().is_err(),
            "a second insert of the same document"
        );
        assert_eq!(store.load(&a).unwrap().unwrap().chunks.len(), 1);
    }

    /// The summaries kept up to date row by row equal the sums of every row's digest, for
    /// every scope, after any sequence of inserts, updates, deletions and collection changes,
    /// and after a restore from the journal.
    #[test]
    fn kept_summaries_equal_recomputed_ones() {
        let seed = 0x5eed_u64;
        println!("seed {seed}");
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        let collections = ["a", "b", "c"];
        let recomputed = |store: &MemStore, scope: Option<&[String]>| {
            let mut summary = CatalogSummary::empty();
            for doc in store.docs.values().filter(|d| MemStore::in_scope(d, scope)) {
                summary.add(&doc.id, doc_digest(&doc.id, &doc.heads, doc.deleted));
            }
            summary
        };
        let scopes: Vec<Option<Vec<String>>> = vec![
            None,
            Some(vec!["a".into()]),
            Some(vec!["b".into(), "c".into()]),
            Some(vec!["a".into(), "a".into(), "zzz".into()]),
        ];
        let check = |store: &MemStore| {
            for scope in &scopes {
                let got = store.catalog_summary(scope.as_deref()).unwrap();
                let want = recomputed(store, scope.as_deref());
                assert_eq!(got.count, want.count, "{scope:?}");
                assert_eq!(got.buckets, want.buckets, "{scope:?}");
            }
        };
        let mut store = MemStore::new(ReplicaId::from_seed(1));
        let journal = store.journal();
        let mut records: BTreeMap<(Table, String), Vec<u8>> = BTreeMap::new();
        let mut ids = Vec::new();
        for step in 0..400u64 {
            let heads: Vec<ChangeHash> = (0..next(3))
                .map(|_| {
                    let mut h = [0u8; 32];
                    h[..8].copy_from_slice(&next(u64::MAX).to_le_bytes());
                    ChangeHash(h)
                })
                .collect();
            let collection = collections[next(3) as usize].to_owned();
            let op = if ids.is_empty() || next(3) == 0 {
                let id = DocumentId::from_bytes(
                    [[step.to_le_bytes(), next(u64::MAX).to_le_bytes()]
                        .concat()
                        .as_slice()]
                    .concat()
                    .try_into()
                    .unwrap(),
                );
                ids.push(id);
                if next(2) == 0 {
                    StorageOp::InsertDocument {
                        id,
                        collection,
                        heads,
                        body: "{}".into(),
                        snapshot: vec![1],
                        seq: step,
                    }
                } else {
                    StorageOp::PutDocument {
                        id,
                        collection,
                        deleted: next(4) == 0,
                        heads,
                        body: None,
                        seq: step,
                    }
                }
            } else {
                let deleted = next(4) == 0;
                StorageOp::PutDocument {
                    id: ids[next(ids.len() as u64) as usize],
                    collection,
                    deleted,
                    heads,
                    body: (!deleted).then(|| "{}".into()),
                    seq: step,
                }
            };
            store.begin().unwrap();
            store.write(&[op]).unwrap();
            store.commit().unwrap();
            check(&store);
            for record in journal.drain() {
                match record {
                    Record::Put { table, key, value } => {
                        records.insert((table, key), value);
                    }
                    Record::DeletePrefix { table, prefix } => {
                        records.retain(|(t, k), _| *t != table || !k.starts_with(&prefix));
                    }
                }
            }
        }
        let restored = MemStore::restore(records.into_iter().map(|((t, k), v)| (t, k, v)))
            .unwrap()
            .unwrap();
        check(&restored);
        // The entries of some buckets: exactly the documents in them, in creation order.
        for scope in &scopes {
            let buckets: Vec<u8> = (0..=255u8).step_by(3).collect();
            for s in [&store, &restored] {
                let got: Vec<DocumentId> = s
                    .catalog_entries(scope.as_deref(), &buckets)
                    .unwrap()
                    .iter()
                    .map(|e| e.id)
                    .collect();
                let want: Vec<DocumentId> = s
                    .docs
                    .values()
                    .filter(|d| {
                        MemStore::in_scope(d, scope.as_deref())
                            && buckets.contains(&bucket_of(&d.id))
                    })
                    .map(|d| d.id)
                    .collect();
                assert!(!want.is_empty());
                assert_eq!(got, want, "{scope:?}");
            }
        }
        for scope in &scopes {
            assert_eq!(
                restored.catalog_summary(scope.as_deref()).unwrap().buckets,
                store.catalog_summary(scope.as_deref()).unwrap().buckets
            );
        }
    }
}
