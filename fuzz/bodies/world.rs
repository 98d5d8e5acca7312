//! The replica the stateful targets run against: a `Replica` over `MemStore` holding a few
//! documents in three collections (edited, with text, deleted), built once and restored from
//! its journal records for every input, so each input starts from exactly the same state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::json;
use weft::store::mem::{Journal, MemStore, Record, Table};
use weft::{
    BundleScope, Clock, DocumentId, Path, Query, Replica, ReplicaId, ReplicaOptions, Scope,
};

/// Milliseconds since the epoch at which every input starts.
pub const T0: i64 = 1_700_000_000_000;
/// The collections of the world's documents.
pub const COLLECTIONS: [&str; 3] = ["todos", "notes", "private"];

/// Committed key-value records, as the browser build persists them.
pub type Kv = BTreeMap<(Table, String), Vec<u8>>;

pub struct World {
    records: Kv,
    /// Every document, deleted ones included, with its collection.
    pub docs: Vec<(DocumentId, String)>,
}

/// A replica restored from the world's records.
pub struct Open {
    pub replica: Replica,
    pub journal: Journal,
    /// The records committed so far (the world's plus whatever [`Open::persist`] took).
    pub kv: Kv,
    pub clock: Arc<AtomicI64>,
}

impl Open {
    /// Moves the journal's committed records into `kv`; returns how many there were.
    pub fn persist(&mut self) -> usize {
        let records = self.journal.drain();
        let n = records.len();
        apply(&mut self.kv, records);
        n
    }

    /// Moves the clock on and lets the replica's sessions notice.
    pub fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
        // The in-memory store fails a commit only for writes the engine should never make.
        if let Err(e) = self.replica.tick() {
            panic!("a tick's step failed: {e}");
        }
    }

    /// A second replica rebuilt from the persisted records must show exactly what this one
    /// shows: what the engine committed is what the journal recorded.
    pub fn check_restores(&mut self) {
        self.persist();
        let again = open_records(&self.kv, 99);
        assert_eq!(
            view(&again.replica),
            view(&self.replica),
            "a replica restored from the journal differs from the live one"
        );
    }
}

fn apply(kv: &mut Kv, records: Vec<Record>) {
    for record in records {
        match record {
            Record::Put { table, key, value } => {
                kv.insert((table, key), value);
            }
            Record::DeletePrefix { table, prefix } => {
                kv.retain(|(t, k), _| !(*t == table && k.starts_with(&prefix)));
            }
        }
    }
}

fn options(clock: &Arc<AtomicI64>, seed: u64) -> ReplicaOptions {
    let c = clock.clone();
    ReplicaOptions {
        seed: Some(seed),
        clock: Clock::from_fn(move || c.load(Ordering::SeqCst)),
        ..ReplicaOptions::default()
    }
}

/// A replica over a MemStore restored from `kv` (a new one, with replica id `seed`, when
/// `kv` is empty), its engine seeded with `seed`.
pub fn open_records(kv: &Kv, seed: u64) -> Open {
    let clock = Arc::new(AtomicI64::new(T0));
    let records = kv.iter().map(|((t, k), v)| (*t, k.clone(), v.clone()));
    let store = MemStore::restore(records)
        .expect("the records restore")
        .unwrap_or_else(|| MemStore::new(ReplicaId::from_seed(seed)));
    let journal = store.journal();
    let replica = Replica::with_store(
        Box::new(store),
        PathBuf::from("fuzz"),
        options(&clock, seed),
    )
    .expect("a MemStore replica opens");
    Open {
        replica,
        journal,
        kv: kv.clone(),
        clock,
    }
}

/// The world, restored into a fresh replica (engine seed 11).
pub fn open() -> Open {
    open_records(&world().records, 11)
}

/// A new, empty replica.
pub fn empty() -> Open {
    open_records(&Kv::new(), 5)
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(build)
}

fn build() -> World {
    let mut w = open_records(&Kv::new(), 1);
    let r = &w.replica;
    let mut docs = Vec::new();
    let mut create = |collection: &str, body: serde_json::Value| {
        let id = r.create(collection, body).expect("create");
        docs.push((id, collection.to_owned()));
        id
    };
    let milk = create("todos", json!({"title": "milk", "done": false, "n": 1}));
    let eggs = create(
        "todos",
        json!({"title": "eggs", "tags": ["a", "b"], "n": 2.5, "big": 18446744073709551615u64}),
    );
    let gone = create("todos", json!({"title": "gone"}));
    let note = create(
        "notes",
        json!({"text": "hello", "nested": {"a": {"b": [1, {"c": null}]}}}),
    );
    let note_gone = create("notes", json!({}));
    let secret = create(
        "private",
        json!({"pin": 1234, "list": [-1, 0.5, true, "x"]}),
    );
    r.update(&milk, json!({"done": true, "n": 2}))
        .expect("update");
    r.update(&eggs, json!({"tags": ["a", "c", "d"], "n": null}))
        .expect("update");
    r.set_text(
        &note,
        &Path::from_pointer("/text").expect("path"),
        "hello world",
    )
    .expect("set_text");
    r.splice(
        &note,
        &Path::from_pointer("/text").expect("path"),
        0,
        5,
        "HELLO",
    )
    .expect("splice");
    r.update(&secret, json!({"pin": 4321})).expect("update");
    r.change(&milk, |tx| {
        use weft::automerge::transaction::Transactable;
        use weft::automerge::{ROOT, ScalarValue};
        tx.put(ROOT, "count", ScalarValue::counter(1))?;
        tx.increment(ROOT, "count", 2)
    })
    .expect("change");
    r.delete(&gone).expect("delete");
    r.delete(&note_gone).expect("delete");
    w.persist();
    World {
        records: w.kv,
        docs,
    }
}

/// Everything a reader can see of a replica, as one comparable value: the full catalog
/// (tombstones and digests included), every live document, the change feed, the bundle export.
pub fn view(r: &Replica) -> String {
    let all: Vec<u8> = (0..=255).collect();
    let catalog = r.catalog_entries(&Scope::All, &all).expect("catalog");
    let docs = r.query(&Query::default()).expect("query");
    let feed = r.changes_since(0, usize::MAX, None).expect("feed");
    let bundle = weft::Bundle::decode(&r.export_bundle(&BundleScope::All).expect("export"))
        .expect("an exported bundle decodes");
    format!(
        "catalog {catalog:?}\ndocs {docs:?}\nfeed {feed:?}\nlast_seq {}\ncounts {:?}\nbundle {:?}",
        r.last_seq(),
        r.counts().expect("counts"),
        bundle.entries
    )
}
