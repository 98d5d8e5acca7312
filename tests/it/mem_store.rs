//! `MemStore` (the browser build's store) against SQLite: the same seeded operations on a
//! replica over each give the same documents, queries, change feed and bundle; and a MemStore
//! rebuilt from the records its journal produced is the same replica and goes on from there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use weft::store::mem::{Journal, MemStore, Record, Table};
use weft::{BundleScope, Clock, Filter, Query, Replica, ReplicaId, ReplicaOptions};

type Kv = BTreeMap<(Table, String), Vec<u8>>;

fn persist(kv: &mut Kv, journal: &Journal) {
    for record in journal.drain() {
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

pub(crate) fn options(clock: &Arc<AtomicI64>, seed: u64) -> ReplicaOptions {
    let c = clock.clone();
    ReplicaOptions {
        seed: Some(seed),
        clock: Clock::from_fn(move || c.load(Ordering::SeqCst)),
        ..ReplicaOptions::default()
    }
}

fn memory(kv: &Kv, clock: &Arc<AtomicI64>, seed: u64) -> (Replica, Journal) {
    let records = kv.iter().map(|((t, k), v)| (*t, k.clone(), v.clone()));
    let store = MemStore::restore(records)
        .unwrap()
        .unwrap_or_else(|| MemStore::new(ReplicaId::from_seed(1)));
    let journal = store.journal();
    let replica = Replica::with_store(Box::new(store), "mem".into(), options(clock, seed)).unwrap();
    (replica, journal)
}

/// Everything a reader can see of a replica, as comparable values.
pub(crate) fn view(r: &Replica) -> serde_json::Value {
    let docs = |q: Query| {
        r.query(&q)
            .unwrap()
            .into_iter()
            .map(|d| {
                json!([
                    d.id.to_string(),
                    d.collection,
                    d.body,
                    format!("{:?}", d.heads)
                ])
            })
            .collect::<Vec<_>>()
    };
    let feed: Vec<_> = r
        .changes_since(0, usize::MAX, None)
        .unwrap()
        .into_iter()
        .map(|e| {
            json!([
                e.seq,
                e.id.to_string(),
                e.kind,
                format!("{:?}", e.heads),
                e.origin.to_string()
            ])
        })
        .collect();
    let bundle = weft::Bundle::decode(&r.export_bundle(&BundleScope::All).unwrap()).unwrap();
    json!({
        "all": docs(Query::default()),
        "todos": docs(Query::collection("todos")),
        "open": docs(Query::collection("todos").filter(Filter::parse("done = false").unwrap())),
        "big": docs(Query::default().filter(Filter::parse("n >= 50").unwrap())),
        "first3": docs(Query { limit: Some(3), ..Query::default() }),
        "feed": feed,
        "last_seq": r.last_seq(),
        "counts": r.counts().unwrap(),
        "bundle": bundle.entries.iter().map(|e| e.id().to_string()).collect::<Vec<_>>(),
    })
}

pub(crate) fn edit(r: &Replica, rng: &mut StdRng, ids: &mut Vec<weft::DocumentId>) {
    let roll = rng.random_range(0..10);
    if roll < 4 || ids.is_empty() {
        let collection = if rng.random_range(0..2) == 0 {
            "todos"
        } else {
            "notes"
        };
        let body = json!({"n": rng.random_range(0..100), "done": rng.random_range(0..2) == 1});
        ids.push(r.create(collection, body).unwrap());
    } else if roll < 9 {
        let id = ids[rng.random_range(0..ids.len())];
        let _ = r.update(&id, json!({"n": rng.random_range(0..100)}));
    } else {
        let id = ids[rng.random_range(0..ids.len())];
        let _ = r.delete(&id);
    }
}

#[test]
fn memstore_matches_sqlite_and_survives_a_rebuild_from_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let sqlite = Replica::open_with(dir.path().join("a.db"), options(&clock, 7)).unwrap();
    let mut kv = Kv::new();
    let (mem, journal) = memory(&kv, &clock, 7);
    let (mut rng_a, mut rng_b) = (StdRng::seed_from_u64(3), StdRng::seed_from_u64(3));
    let (mut ids_a, mut ids_b) = (Vec::new(), Vec::new());
    for i in 0..200 {
        clock.fetch_add(7, Ordering::SeqCst);
        edit(&sqlite, &mut rng_a, &mut ids_a);
        edit(&mem, &mut rng_b, &mut ids_b);
        if i == 150 {
            let compacted = (sqlite.compact().unwrap(), mem.compact().unwrap());
            assert_eq!(compacted.0, compacted.1);
        }
    }
    let expected = view(&sqlite);
    assert_eq!(view(&mem), expected);
    assert!(expected["open"].as_array().unwrap().len() > 1);

    // Rebuilt from what the journal persisted: the same replica, which goes on numbering.
    // (Both reopen with a new seed: a replayed seed would draw the same document ids again.)
    persist(&mut kv, &journal);
    drop((mem, sqlite));
    let sqlite = Replica::open_with(dir.path().join("a.db"), options(&clock, 8)).unwrap();
    let (rebuilt, journal) = memory(&kv, &clock, 8);
    assert_eq!(view(&rebuilt), expected);
    for _ in 0..20 {
        clock.fetch_add(7, Ordering::SeqCst);
        edit(&sqlite, &mut rng_a, &mut ids_a);
        edit(&rebuilt, &mut rng_b, &mut ids_b);
    }
    assert_eq!(view(&rebuilt), view(&sqlite));
    persist(&mut kv, &journal);
    let (again, _) = memory(&kv, &clock, 9);
    assert_eq!(view(&again), view(&sqlite));
}
