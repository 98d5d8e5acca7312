//! Shared helpers for the integration tests: seeds, temporary replicas, database snapshots and a
//! reference RFC 7386 merge patch.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use weft::{Bundle, BundleEntry, BundleScope, ChangeEvent, ChangeHash, DocumentId, Query, Replica};

/// The seeds a property test runs: only `WEFT_SEED` when it is set (to replay a failure),
/// otherwise `n` fresh seeds derived from the clock.
pub fn seeds(n: usize) -> Vec<u64> {
    if let Ok(text) = std::env::var("WEFT_SEED") {
        let seed = text
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("WEFT_SEED={text:?} is not a u64: {e}"));
        return vec![seed];
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut state = nanos ^ (u64::from(std::process::id()) << 32);
    (0..n).map(|_| splitmix64(&mut state)).collect()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `f` once per seed (see [`seeds`]), printing each seed first; a failure is re-raised with
/// the seed and the command that replays it.
pub fn for_each_seed(test: &str, n: usize, mut f: impl FnMut(u64)) {
    for seed in seeds(n) {
        eprintln!("{test}: seed = {seed}");
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(seed))) {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            panic!(
                "{test} failed with seed = {seed}; replay with \
                 `WEFT_SEED={seed} cargo test --test it {test}`\n{message}"
            );
        }
    }
}

/// A temporary directory and the path of a database file in it.
pub struct TempDb {
    pub dir: tempfile::TempDir,
}

impl TempDb {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn open(&self, name: &str) -> Replica {
        open(&self.path(name))
    }
}

pub fn open(path: &Path) -> Replica {
    Replica::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Heads in a canonical order (heads are a set).
pub fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut heads = heads.to_vec();
    heads.sort();
    heads
}

/// Everything observable about a replica's database through the public API.
#[derive(Debug, PartialEq)]
pub struct DbState {
    pub counts: (u64, u64, u64),
    pub last_seq: u64,
    pub feed: Vec<ChangeEvent>,
    /// Live documents: collection, body and sorted heads.
    pub docs: BTreeMap<DocumentId, (String, Value, Vec<ChangeHash>)>,
    /// Tombstones: collection.
    pub tombstones: BTreeMap<DocumentId, String>,
}

pub fn db_state(replica: &Replica) -> DbState {
    let docs = replica
        .query(&Query::default())
        .expect("query all")
        .into_iter()
        .map(|d| (d.id, (d.collection, d.body, sorted(&d.heads))))
        .collect();
    DbState {
        counts: replica.counts().expect("counts"),
        last_seq: replica.last_seq(),
        feed: replica.changes_since(0, usize::MAX, None).expect("feed"),
        docs,
        tombstones: tombstones(replica),
    }
}

/// The tombstones a replica holds, read from a full export.
pub fn tombstones(replica: &Replica) -> BTreeMap<DocumentId, String> {
    let bytes = replica.export_bundle(&BundleScope::All).expect("export");
    Bundle::decode(&bytes)
        .expect("decode own export")
        .entries
        .into_iter()
        .filter_map(|e| match e {
            BundleEntry::Tombstone { id, collection } => Some((id, collection)),
            BundleEntry::Document { .. } => None,
        })
        .collect()
}

/// The ids in a bundle, split into documents and tombstones.
pub fn bundle_ids(bytes: &[u8]) -> (BTreeSet<DocumentId>, BTreeSet<DocumentId>) {
    let bundle = Bundle::decode(bytes).expect("decode bundle");
    let mut docs = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for entry in bundle.entries {
        match entry {
            BundleEntry::Document { id, .. } => assert!(docs.insert(id), "{id} twice in bundle"),
            BundleEntry::Tombstone { id, .. } => assert!(dead.insert(id), "{id} twice in bundle"),
        }
    }
    (docs, dead)
}

/// Reference RFC 7386 merge patch (the algorithm of section 2, verbatim).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(map) = target else {
        unreachable!()
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}
