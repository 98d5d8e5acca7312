//! A [`Store`] wrapper that injects faults into any store: a panic when one document is
//! loaded (a bug some input triggers), failing commits (a full disk). Shared by the tests that
//! check what the replica does when storage, or the code around it, fails.

use std::sync::{Arc, Mutex};

use weft::engine::{ChangeEvent, StorageOp, StoredDoc};
use weft::protocol::{CatalogEntry, CatalogSummary};
use weft::store::{DocRecord, Store, StoreError};
use weft::{BundleEntry, BundleScope, DocumentId, Query, ReplicaId};

/// What the store should do wrong; change it while the replica runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Loading this document panics.
    pub panic_on_load: Option<DocumentId>,
    /// This many of the next commits with writes fail (as on a full disk).
    pub failing_commits: u32,
}

/// What SQLite reports on a full disk (the injected fault).
pub fn disk_full() -> StoreError {
    StoreError::Sqlite {
        code: Some(rusqlite::ErrorCode::DiskFull),
        extended: Some(13),
        message: "injected fault: database or disk is full".into(),
    }
}

/// The handle a test keeps to steer the faults.
pub type FaultHandle = Arc<Mutex<Faults>>;

pub struct FaultyStore<S> {
    inner: S,
    faults: FaultHandle,
    /// The open transaction has writes (a commit without any cannot fill a disk).
    wrote: bool,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S) -> (Self, FaultHandle) {
        let faults = FaultHandle::default();
        (
            FaultyStore {
                inner,
                faults: faults.clone(),
                wrote: false,
            },
            faults,
        )
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn replica_id(&self) -> ReplicaId {
        self.inner.replica_id()
    }
    fn max_seq(&self) -> Result<u64, StoreError> {
        self.inner.max_seq()
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn begin(&mut self) -> Result<bool, StoreError> {
        self.inner.begin()
    }
    fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        self.inner.changed_elsewhere()
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        let fail = std::mem::take(&mut self.wrote) && {
            let mut faults = self.faults();
            let fail = faults.failing_commits > 0;
            faults.failing_commits = faults.failing_commits.saturating_sub(1);
            fail
        };
        if fail {
            self.inner.rollback();
            return Err(disk_full());
        }
        self.inner.commit()
    }
    fn rollback(&mut self) {
        self.wrote = false;
        self.inner.rollback()
    }
    fn write(&mut self, ops: &[StorageOp]) -> Result<(), StoreError> {
        self.wrote |= !ops.is_empty();
        self.inner.write(ops)
    }
    fn load(&self, id: &DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        if self.faults().panic_on_load == Some(*id) {
            panic!("injected fault: loading {id} panics");
        }
        self.inner.load(id)
    }
    fn load_sync_state(
        &self,
        peer: &ReplicaId,
        id: &DocumentId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load_sync_state(peer, id)
    }
    fn get(&self, id: &DocumentId) -> Result<Option<DocRecord>, StoreError> {
        self.inner.get(id)
    }
    fn query(&self, query: &Query) -> Result<Vec<DocRecord>, StoreError> {
        self.inner.query(query)
    }
    fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        self.inner.changes_since(since, limit, collection)
    }
    fn export(&self, scope: &BundleScope) -> Result<Vec<BundleEntry>, StoreError> {
        self.inner.export(scope)
    }
    fn catalog_summary(
        &self,
        collections: Option<&[String]>,
    ) -> Result<CatalogSummary, StoreError> {
        self.inner.catalog_summary(collections)
    }
    fn catalog_entries(
        &self,
        collections: Option<&[String]>,
        buckets: &[u8],
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        self.inner.catalog_entries(collections, buckets)
    }
    fn uncompacted(&self) -> Result<Vec<DocumentId>, StoreError> {
        self.inner.uncompacted()
    }
    fn compact_feed(&mut self) -> Result<usize, StoreError> {
        self.inner.compact_feed()
    }
    fn vacuum(&mut self) -> Result<(), StoreError> {
        self.inner.vacuum()
    }
    fn integrity_check(&self) -> Result<(), StoreError> {
        self.inner.integrity_check()
    }
    fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        self.inner.counts()
    }
    fn checkpoint(&self) -> Result<(), StoreError> {
        self.inner.checkpoint()
    }
    fn probe(&mut self) -> Result<(), StoreError> {
        if self.faults().failing_commits > 0 {
            return Err(disk_full());
        }
        self.inner.probe()
    }
}
