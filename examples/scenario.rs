//! The seeded convergence scenario shared with the JavaScript tests
//! (`wasm/test/scenario.test.mjs` runs the same steps against the wasm build): a hub and three
//! replicas in memory, random edits, random frame deliveries over FIFO links, a manual clock.
//! Prints every replica's documents and heads as JSON; for the same seed the wasm build must
//! print the same — proof that it is the same engine.
//!
//! `cargo run --example scenario -- SEED [STEPS]`
//!
//! Keep the steps in lockstep with the JS version: the same random number generator
//! (mulberry32), drawn in the same order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use weft::engine::PeerId;
use weft::protocol::Message;
use weft::store::mem::MemStore;
use weft::{Clock, DocumentId, Replica, ReplicaId, ReplicaOptions, Scope};

const CLIENTS: usize = 3;
const START_MS: i64 = 1_700_000_000_000;

/// mulberry32: a 32-bit generator small enough to write identically in JS.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x6D2B_79F5);
        let mut t = self.0;
        t = (t ^ (t >> 15)).wrapping_mul(1 | t);
        t = t.wrapping_add((t ^ (t >> 7)).wrapping_mul(61 | t)) ^ t;
        t ^ (t >> 14)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u32) as usize
    }
}

struct Node {
    replica: Replica,
    outbox: Arc<Mutex<Vec<(PeerId, Message)>>>,
    /// Peer number -> node index.
    peers: BTreeMap<u64, usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seed: u32 = args.next().unwrap_or_else(|| "1".into()).parse()?;
    let steps: usize = args.next().unwrap_or_else(|| "300".into()).parse()?;
    let clock = Arc::new(AtomicI64::new(START_MS));
    let mut nodes = Vec::new();
    for i in 0..=CLIENTS {
        let node_seed = u64::from(seed) * 100 + i as u64;
        let c = clock.clone();
        let store = MemStore::new(ReplicaId::from_seed(node_seed));
        let replica = Replica::with_store(
            Box::new(store),
            format!("node{i}").into(),
            ReplicaOptions {
                seed: Some(node_seed),
                clock: Clock::from_fn(move || c.load(Ordering::SeqCst)),
                ..ReplicaOptions::default()
            },
        )?;
        let outbox: Arc<Mutex<Vec<(PeerId, Message)>>> = Arc::default();
        let o = outbox.clone();
        replica.set_transport(move |send, _| {
            o.lock().unwrap_or_else(|p| p.into_inner()).extend(send);
            Vec::new()
        });
        nodes.push(Node {
            replica,
            outbox,
            peers: BTreeMap::new(),
        });
    }
    // Node 0 is the hub (responder); each client connects to it. Peer numbers start at 1 on
    // every node, in connection order, as the wasm Core numbers them.
    for client in 1..=CLIENTS {
        let hub_peer = nodes[0].peers.len() as u64 + 1;
        nodes[0].peers.insert(hub_peer, client);
        let client_id = nodes[client].replica.replica_id();
        nodes[0]
            .replica
            .peer_connected(PeerId(hub_peer), client_id, Scope::All, false);
        let hub_id = nodes[0].replica.replica_id();
        nodes[client].peers.insert(1, 0);
        nodes[client]
            .replica
            .peer_connected(PeerId(1), hub_id, Scope::All, true);
    }
    let mut links: BTreeMap<(usize, usize), std::collections::VecDeque<Message>> = BTreeMap::new();
    let drain =
        |nodes: &[Node],
         links: &mut BTreeMap<(usize, usize), std::collections::VecDeque<Message>>| {
            for (from, node) in nodes.iter().enumerate() {
                let out =
                    std::mem::take(&mut *node.outbox.lock().unwrap_or_else(|p| p.into_inner()));
                for (peer, message) in out {
                    if let Some(to) = node.peers.get(&peer.0) {
                        links.entry((from, *to)).or_default().push_back(message);
                    }
                }
            }
        };
    let deliver = |nodes: &[Node], from: usize, to: usize, message: Message| {
        let peer = nodes[to]
            .peers
            .iter()
            .find(|(_, n)| **n == from)
            .map(|(p, _)| PeerId(*p));
        if let Some(peer) = peer {
            nodes[to].replica.peer_message(peer, message);
        }
    };
    drain(&nodes, &mut links);

    let mut rng = Rng(seed);
    let mut known: Vec<DocumentId> = Vec::new();
    for _ in 0..steps {
        let roll = rng.below(100);
        if roll < 40 {
            let node = rng.below(CLIENTS + 1);
            let r = &nodes[node].replica;
            let op = rng.below(10);
            if op < 3 || known.is_empty() {
                let collection = ["todos", "notes"][rng.below(2)];
                let n = rng.below(1000);
                known.push(r.create(collection, json!({ "n": n, "by": node }))?);
            } else if op < 9 {
                let id = known[rng.below(known.len())];
                let key = format!("k{}", rng.below(4));
                let value = rng.below(1000);
                let _ = r.update(&id, json!({ key: value }));
            } else {
                let id = known[rng.below(known.len())];
                let _ = r.delete(&id);
            }
        } else if roll < 80 {
            let busy: Vec<(usize, usize)> = links
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            if !busy.is_empty() {
                let (from, to) = busy[rng.below(busy.len())];
                if let Some(message) = links.get_mut(&(from, to)).and_then(|q| q.pop_front()) {
                    deliver(&nodes, from, to, message);
                }
            }
        } else {
            let ms = rng.below(50) as i64 + 1;
            clock.fetch_add(ms, Ordering::SeqCst);
            for node in &nodes {
                node.replica.tick()?;
            }
        }
        drain(&nodes, &mut links);
    }
    // Settle: deliver everything, round-robin over the links in order; tick; until quiet.
    for _ in 0..1000 {
        while links.values().any(|q| !q.is_empty()) {
            let keys: Vec<(usize, usize)> = links.keys().copied().collect();
            for (from, to) in keys {
                if let Some(message) = links.get_mut(&(from, to)).and_then(|q| q.pop_front()) {
                    deliver(&nodes, from, to, message);
                    drain(&nodes, &mut links);
                }
            }
        }
        clock.fetch_add(25, Ordering::SeqCst);
        for node in &nodes {
            node.replica.tick()?;
        }
        drain(&nodes, &mut links);
        if links.values().all(|q| q.is_empty()) {
            break;
        }
    }
    let mut out = Vec::new();
    for node in &nodes {
        let mut docs = Vec::new();
        for doc in node.replica.query(&weft::Query::default())? {
            let mut heads: Vec<String> = doc.heads.iter().map(|h| h.to_string()).collect();
            heads.sort();
            docs.push((doc.id.to_string(), heads));
        }
        docs.sort();
        out.push(docs);
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
