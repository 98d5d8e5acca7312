//! Seeded property test: replicas edit independently and exchange bundles in random directions
//! and scopes; after a final full exchange they hold identical documents, heads and tombstones.
//! Every local edit is also checked against a JSON model of what it should do.
//!
//! Replay a failure with `WEFT_SEED=<seed> cargo test --test it convergence::`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Map, Value, json};
use weft::{BundleScope, DocumentId, Error, Path, Query, Replica};

use common::{TempDb, db_state, merge_patch};

const REPLICAS: usize = 3;
const STEPS: usize = 150;
const SEEDS: usize = 20;
const COLLECTIONS: &[&str] = &["todos", "notes"];
/// Top-level keys patches and sets use. "txt" is reserved for collaborative text (only
/// `set_text` writes it), so a present "txt" is always text and can be spliced.
const KEYS: &[&str] = &["a", "b", "n", "o", "arr"];
const INNER_KEYS: &[&str] = &["x", "y", "z", "ü", "k k"];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn scalar(rng: &mut StdRng) -> Value {
    match rng.random_range(0..8) {
        0 => json!(rng.random_range(-5i64..5)),
        1 => json!(rng.random_range(-20i64..20) as f64 / 4.0),
        2 => json!(*pick(rng, &["", "s", "str", "é🎉", "漢字"])),
        3 => json!(rng.random_range(0..2) == 1),
        4 => Value::Null,
        5 => json!(u64::MAX - rng.random_range(0..2u64)),
        6 => json!(1.0),
        _ => json!(rng.random_range(0..1000i64)),
    }
}

fn value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..6) {
        0 if depth > 0 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| value(rng, depth - 1))
                .collect(),
        ),
        1 if depth > 0 => inner_object(rng, depth - 1),
        _ => scalar(rng),
    }
}

fn inner_object(rng: &mut StdRng, depth: u32) -> Value {
    let mut map = Map::new();
    for _ in 0..rng.random_range(0..3) {
        map.insert(pick(rng, INNER_KEYS).to_string(), value(rng, depth));
    }
    Value::Object(map)
}

fn body(rng: &mut StdRng) -> Value {
    let mut map = Map::new();
    for _ in 0..rng.random_range(0..4) {
        map.insert(pick(rng, KEYS).to_string(), value(rng, 2));
    }
    Value::Object(map)
}

/// A merge patch over the top-level keys: values, nested patches, and nulls (deletes).
fn patch(rng: &mut StdRng) -> Value {
    let mut map = Map::new();
    for _ in 0..rng.random_range(1..4) {
        let key = pick(rng, KEYS).to_string();
        let v = match rng.random_range(0..5) {
            0 => Value::Null,
            1 => {
                let mut sub = Map::new();
                for _ in 0..rng.random_range(0..3) {
                    let v = if rng.random_range(0..3) == 0 {
                        Value::Null
                    } else {
                        value(rng, 1)
                    };
                    sub.insert(pick(rng, INNER_KEYS).to_string(), v);
                }
                Value::Object(sub)
            }
            _ => value(rng, 2),
        };
        map.insert(key, v);
    }
    Value::Object(map)
}

fn random_text(rng: &mut StdRng) -> String {
    let alphabet: Vec<char> = "ab c✓é🎉漢".chars().collect();
    (0..rng.random_range(0..6))
        .map(|_| *pick(rng, &alphabet))
        .collect()
}

fn ptr(p: &str) -> Path {
    Path::from_pointer(p).unwrap()
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

struct World {
    db: TempDb,
    replicas: Vec<Replica>,
    /// For each (from, to): `from`'s last seq when `to` last imported a bundle from it.
    imported_up_to: [[u64; REPLICAS]; REPLICAS],
    created: BTreeSet<DocumentId>,
    log: Vec<String>,
}

impl World {
    fn name(i: usize) -> String {
        format!("r{i}.db")
    }

    fn exchange(&mut self, from: usize, to: usize, since: Option<u64>) {
        let mark = self.replicas[from].last_seq();
        let scope = since.map_or(BundleScope::All, BundleScope::Since);
        let bytes = self.replicas[from].export_bundle(&scope).unwrap();
        let report = self.replicas[to].import_bundle(&bytes).unwrap();
        self.log
            .push(format!("bundle {from} -> {to} {scope:?}: {report:?}"));
        self.imported_up_to[from][to] = mark;
        // Whatever the scope, `to` now has everything `from` has: each of its live documents
        // with all their changes (or a tombstone for it), and each of its tombstones.
        let (src, dst) = (&self.replicas[from], &self.replicas[to]);
        for doc in src.query(&Query::default()).unwrap() {
            match dst.get(&doc.id) {
                Ok(have) => {
                    let then = dst.get_at(&doc.id, &doc.heads).unwrap_or_else(|e| {
                        panic!(
                            "r{to} lacks changes of {} from r{from} after {scope:?}: {e}",
                            doc.id
                        )
                    });
                    assert_eq!(then.body, doc.body, "{} as of r{from}'s heads", doc.id);
                    if common::sorted(&have.heads) == common::sorted(&doc.heads) {
                        assert_eq!(have.body, doc.body);
                    }
                }
                Err(Error::Deleted(_)) => {}
                Err(e) => panic!("r{to} lacks {} from r{from} after {scope:?}: {e}", doc.id),
            }
        }
        let dead_dst = common::tombstones(dst);
        for (id, collection) in common::tombstones(src) {
            assert_eq!(
                dead_dst.get(&id),
                Some(&collection),
                "tombstone {id} r{from} -> r{to}"
            );
        }
    }

    fn full_exchange(&mut self) {
        for from in 0..REPLICAS {
            for to in 0..REPLICAS {
                if from != to {
                    self.exchange(from, to, None);
                }
            }
        }
    }

    /// One random local edit on replica `i`, checked against the JSON model.
    fn edit(&mut self, rng: &mut StdRng, i: usize) {
        let r = &self.replicas[i];
        let docs = r.query(&Query::default()).unwrap();
        if docs.is_empty() || rng.random_range(0..8) == 0 {
            let collection = *pick(rng, COLLECTIONS);
            let b = body(rng);
            let id = r.create(collection, b.clone()).unwrap();
            self.log.push(format!("r{i} create {id} {b}"));
            assert_eq!(r.get(&id).unwrap().body, b);
            assert!(self.created.insert(id));
            return;
        }
        let doc = pick(rng, &docs).clone();
        let id = doc.id;
        let mut expected = doc.body.clone();
        let what = match rng.random_range(0..24) {
            0..=6 => {
                let p = patch(rng);
                merge_patch(&mut expected, &p);
                r.update(&id, p.clone()).unwrap();
                format!("update {p}")
            }
            7..=9 => {
                // Set a top-level key, a key inside "o", or an element (or the end) of "arr".
                let v = value(rng, 1);
                let path = match (&expected["o"], &expected["arr"], rng.random_range(0..3)) {
                    (Value::Object(_), _, 0) => {
                        let k = pick(rng, INNER_KEYS).to_string();
                        expected["o"][k.as_str()] = v.clone();
                        format!("/o/{}", escape(&k))
                    }
                    (_, Value::Array(items), 1) => {
                        let at = rng.random_range(0..=items.len());
                        let arr = expected["arr"].as_array_mut().unwrap();
                        if at == arr.len() {
                            arr.push(v.clone());
                        } else {
                            arr[at] = v.clone();
                        }
                        format!("/arr/{at}")
                    }
                    _ => {
                        let k = pick(rng, KEYS).to_string();
                        expected[k.as_str()] = v.clone();
                        format!("/{k}")
                    }
                };
                r.set(&id, &ptr(&path), v.clone()).unwrap();
                format!("set {path} {v}")
            }
            10 | 11 => {
                // Delete something that exists (a top-level key, a key in "o", an element).
                let mut candidates: Vec<String> = expected
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| format!("/{}", escape(k)))
                    .collect();
                if let Value::Object(o) = &expected["o"] {
                    candidates.extend(o.keys().map(|k| format!("/o/{}", escape(k))));
                }
                if let Value::Array(items) = &expected["arr"] {
                    candidates.extend((0..items.len()).map(|i| format!("/arr/{i}")));
                }
                if candidates.is_empty() {
                    return;
                }
                let path = pick(rng, &candidates).clone();
                let parts: Vec<&str> = path[1..].split('/').collect();
                let unescape = |s: &str| s.replace("~1", "/").replace("~0", "~");
                match parts.as_slice() {
                    [k] => {
                        expected.as_object_mut().unwrap().remove(&unescape(k));
                    }
                    ["o", k] => {
                        expected["o"].as_object_mut().unwrap().remove(&unescape(k));
                    }
                    ["arr", n] => {
                        expected["arr"]
                            .as_array_mut()
                            .unwrap()
                            .remove(n.parse::<usize>().unwrap());
                    }
                    _ => unreachable!(),
                }
                r.delete_path(&id, &ptr(&path)).unwrap();
                format!("delete_path {path}")
            }
            12 | 13 => {
                let text = random_text(rng);
                expected["txt"] = json!(text);
                r.set_text(&id, &ptr("/txt"), &text).unwrap();
                format!("set_text {text:?}")
            }
            14..=22 => {
                let Some(current) = expected.get("txt").and_then(Value::as_str) else {
                    return;
                };
                let chars: Vec<char> = current.chars().collect();
                let at = rng.random_range(0..=chars.len());
                let del = rng.random_range(0..=(chars.len() - at).min(3));
                let insert = random_text(rng);
                let mut new: String = chars[..at].iter().collect();
                new.push_str(&insert);
                new.extend(&chars[at + del..]);
                expected["txt"] = json!(new);
                r.splice(&id, &ptr("/txt"), at, del, &insert).unwrap();
                format!("splice {at} {del} {insert:?}")
            }
            _ => {
                r.delete(&id).unwrap();
                self.log.push(format!("r{i} delete {id}"));
                assert!(matches!(r.get(&id), Err(Error::Deleted(_))));
                return;
            }
        };
        self.log.push(format!("r{i} {id} {what}"));
        let after = r.get(&id).unwrap();
        assert_eq!(
            after.body, expected,
            "r{i} {id} after {what}\nbefore: {}",
            doc.body
        );
    }

    fn step(&mut self, rng: &mut StdRng) {
        let i = rng.random_range(0..REPLICAS);
        match rng.random_range(0..100) {
            0..=71 => self.edit(rng, i),
            72..=95 => {
                let to = (i + rng.random_range(1..REPLICAS)) % REPLICAS;
                let since = (rng.random_range(0..2) == 0).then(|| self.imported_up_to[i][to]);
                self.exchange(i, to, since);
            }
            96 | 97 => {
                // Re-importing what was already imported changes nothing.
                let to = (i + 1) % REPLICAS;
                let bytes = self.replicas[i]
                    .export_bundle(&BundleScope::Since(self.imported_up_to[i][to]))
                    .unwrap();
                self.replicas[to].import_bundle(&bytes).unwrap();
                let state = db_state(&self.replicas[to]);
                let report = self.replicas[to].import_bundle(&bytes).unwrap();
                assert_eq!(
                    report.created + report.updated + report.deleted,
                    0,
                    "{report:?}"
                );
                assert_eq!(
                    db_state(&self.replicas[to]),
                    state,
                    "re-import changed r{to}"
                );
                self.imported_up_to[i][to] = self.replicas[i].last_seq();
            }
            _ => {
                // Close and reopen: everything continues from storage.
                let state = db_state(&self.replicas[i]);
                self.replicas[i] = self.db.open(&Self::name(i));
                assert_eq!(db_state(&self.replicas[i]), state, "reopen changed r{i}");
                self.log.push(format!("reopen r{i}"));
            }
        }
    }
}

type Snapshot = (
    BTreeMap<DocumentId, (String, Value, Vec<weft::ChangeHash>)>,
    BTreeMap<DocumentId, String>,
);

fn snapshot(r: &Replica) -> Snapshot {
    let s = db_state(r);
    (s.docs, s.tombstones)
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TempDb::new();
    let replicas = (0..REPLICAS).map(|i| db.open(&World::name(i))).collect();
    let mut world = World {
        db,
        replicas,
        imported_up_to: [[0; REPLICAS]; REPLICAS],
        created: BTreeSet::new(),
        log: Vec::new(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..STEPS {
            world.step(&mut rng);
        }
        world.full_exchange();

        let first = snapshot(&world.replicas[0]);
        for (i, r) in world.replicas.iter().enumerate().skip(1) {
            let other = snapshot(r);
            assert_eq!(
                other.0.keys().collect::<Vec<_>>(),
                first.0.keys().collect::<Vec<_>>(),
                "live ids of r{i} vs r0"
            );
            for (id, doc) in &first.0 {
                assert_eq!(&other.0[id], doc, "document {id} on r{i} vs r0");
            }
            assert_eq!(other.1, first.1, "tombstones of r{i} vs r0");
        }
        // Nothing lost: every document ever created is live or a tombstone everywhere.
        let known: BTreeSet<DocumentId> = first.0.keys().chain(first.1.keys()).copied().collect();
        assert_eq!(known, world.created);
        assert!(first.0.keys().all(|id| !first.1.contains_key(id)));

        // A converged system is a fixpoint: another full exchange changes nothing at all.
        let states: Vec<_> = world.replicas.iter().map(db_state).collect();
        world.full_exchange();
        for (i, r) in world.replicas.iter().enumerate() {
            assert_eq!(db_state(r), states[i], "r{i} changed after converging");
        }
    }));
    if let Err(panic) = result {
        let tail = world.log.len().saturating_sub(40);
        eprintln!(
            "last operations (seed {seed}):\n{}",
            world.log[tail..].join("\n")
        );
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn replicas_converge() {
    common::for_each_seed("replicas_converge", SEEDS, run);
}
