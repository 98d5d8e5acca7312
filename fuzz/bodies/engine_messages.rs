//! `engine_messages`: a replication session fed arbitrary messages.
//!
//! The world replica (a `Replica` over `MemStore`, documents in `todos`, `notes` and `private`)
//! opens a session `PeerId(1)` with the access and role the input chooses, then takes the
//! input's operations: protocol messages (`peer_message`), clock ticks, flow control and
//! reconnects. Whatever the engine sends back is captured by the transport.
//!
//! Input: 2 header bytes, then postcard-encoded [`Op`]s one after another (up to [`MAX_OPS`];
//! decoding stops at the first that does not decode).
//! - byte 0: bit 0 the world replica initiates; bits 1-2 the read scope and bits 3-4 the write
//!   scope (indexes into [`SCOPES`]); bit 5 a create limit, of byte 1 documents per minute.
//!
//! To let the fuzzer name the world's documents and collections without guessing 16 random
//! bytes, ids and collection names are remapped before a message is delivered (see [`remap`]).
//!
//! Invariants:
//! - nothing panics, and every frame the engine sends survives the frame codec unchanged;
//! - a replica restored from the journal shows what the live one shows;
//! - with the access checks on ([`Mode`]): documents in collections the session may not write keep their
//!   catalog entry (heads digest, tombstone flag), and none appears there; nothing the engine
//!   sends carries a document or catalog entry of a collection the session may not read.
//!   Off by default until the engine enforces write access on every path (see BENCHMARKS.md,
//!   "Fuzzing"); `WEFT_FUZZ_ACCESS=1` turns them on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use weft::automerge::sync;
use weft::engine::PeerId;
use weft::protocol::{self, CatalogEntry, DEFAULT_MAX_FRAME, Message, Payload};
use weft::{Access, BundleScope, DocumentId, Replica, ReplicaId, Scope};

use super::world::{self, COLLECTIONS, Open};

/// Whether the access invariants are checked when `WEFT_FUZZ_ACCESS` is not set: on, since
/// the engine's write gate refuses every write outside the session's write scope.
pub const ACCESS_CHECKS_DEFAULT: bool = true;

/// Whether known, reported bugs are kept out of the inputs when `WEFT_FUZZ_SKIP_KNOWN` is not
/// set ([`Mode::skip_known`]). Off: both reported bugs (the Entries tombstone hole, the Bloom
/// filters Automerge trusts) are fixed, and their fixtures replay with everything else.
pub const SKIP_KNOWN_DEFAULT: bool = false;

/// How an input is run: which invariants, and whether known, reported bugs are kept out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// Check the access invariants (`WEFT_FUZZ_ACCESS=1`).
    pub access: bool,
    /// Keep the known, reported bugs out of the input so a campaign can look for others
    /// (`WEFT_FUZZ_SKIP_KNOWN`, default [`SKIP_KNOWN_DEFAULT`]): sync items whose Automerge sync
    /// message `protocol::check_sync_message` refuses are dropped (they crash the engine:
    /// tests/fixtures/fuzz/engine_messages/pending/README.md), and with `access`, catalog
    /// entries marked deleted in collections the session may not write (the engine turns them
    /// into tombstones: tests/fixtures/fuzz/engine_messages/README.md). Remove each with its fix.
    pub skip_known: bool,
}

/// The mode the environment asks for (`WEFT_FUZZ_ACCESS`, `WEFT_FUZZ_SKIP_KNOWN`: `1` / `0`).
pub fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let flag = |name: &str, default: bool| match std::env::var(name).as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => default,
        };
        Mode {
            access: flag("WEFT_FUZZ_ACCESS", ACCESS_CHECKS_DEFAULT),
            skip_known: flag("WEFT_FUZZ_SKIP_KNOWN", SKIP_KNOWN_DEFAULT),
        }
    })
}

/// At most this many operations per input.
pub const MAX_OPS: usize = 64;

/// The read and write scopes an input can choose.
pub fn scopes() -> [Scope; 4] {
    [
        Scope::All,
        Scope::collection("todos"),
        Scope::Collections(vec!["todos".into(), "notes".into()]),
        Scope::Collections(vec!["notes".into(), "private".into()]),
    ]
}

/// One step of a session, as the input encodes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    /// A frame from the peer.
    Message(Message),
    /// The clock moves on this many milliseconds and the replica ticks.
    Tick(u16),
    /// The transport's queue for the peer went over (true) or back under (false) its mark.
    Flow(bool),
    /// The connection drops and the peer connects again (same access and role).
    Reconnect,
}

/// The session an input sets up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The world replica is the initiator.
    pub initiator: bool,
    /// Index into [`scopes`].
    pub read: u8,
    /// Index into [`scopes`].
    pub write: u8,
    pub creates_per_minute: Option<u8>,
}

impl Setup {
    fn decode(header: [u8; 2]) -> Setup {
        Setup {
            initiator: header[0] & 1 == 1,
            read: (header[0] >> 1) & 3,
            write: (header[0] >> 3) & 3,
            creates_per_minute: (header[0] & 0x20 != 0).then_some(header[1]),
        }
    }

    fn encode(&self) -> [u8; 2] {
        [
            u8::from(self.initiator)
                | (self.read & 3) << 1
                | (self.write & 3) << 3
                | if self.creates_per_minute.is_some() {
                    0x20
                } else {
                    0
                },
            self.creates_per_minute.unwrap_or(0),
        ]
    }

    pub fn access(&self) -> Access {
        let scopes = scopes();
        Access {
            read: scopes[usize::from(self.read & 3)].clone(),
            write: scopes[usize::from(self.write & 3)].clone(),
            creates: self.creates_per_minute.map(|per_minute| weft::CreateLimit {
                per_minute: u32::from(per_minute),
                burst: 0,
            }),
            interest: weft::Interest::Catalog,
            label: None,
        }
    }
}

/// The bytes of an input.
pub fn encode_input(setup: &Setup, ops: &[Op]) -> Vec<u8> {
    let mut out = setup.encode().to_vec();
    for op in ops {
        out.extend(postcard::to_allocvec(op).expect("an op encodes"));
    }
    out
}

/// The setup and operations of an input.
pub fn decode_input(data: &[u8]) -> Option<(Setup, Vec<Op>)> {
    let (header, mut rest) = data.split_first_chunk::<2>()?;
    let setup = Setup::decode(*header);
    let mut ops = Vec::new();
    while !rest.is_empty() && ops.len() < MAX_OPS {
        match postcard::take_from_bytes::<Op>(rest) {
            Ok((op, tail)) => {
                ops.push(op);
                rest = tail;
            }
            Err(_) => break,
        }
    }
    Some((setup, ops))
}

/// The peer's replica id (the seed sessions' peer has it too).
pub fn remote() -> ReplicaId {
    ReplicaId::from_seed(2)
}

/// An id `[k, 0, 0, ..., 0]` names the world's document `k` (modulo their number); a
/// collection named by one digit `d` is `COLLECTIONS[d % 3]`.
pub fn remap(message: &mut Message) {
    let docs = &world::world().docs;
    let id = |id: &mut DocumentId| {
        let bytes = id.as_bytes();
        if bytes[1..].iter().all(|b| *b == 0) {
            *id = docs[usize::from(bytes[0]) % docs.len()].0;
        }
    };
    let collection = |c: &mut String| {
        if let [d @ b'0'..=b'9'] = c.as_bytes() {
            *c = COLLECTIONS[usize::from(d - b'0') % COLLECTIONS.len()].to_owned();
        }
    };
    match message {
        Message::Entries { entries, .. } => {
            for e in entries {
                id(&mut e.id);
                collection(&mut e.collection);
            }
        }
        Message::Sync { batch } => {
            for item in batch {
                id(&mut item.id);
                collection(&mut item.collection);
            }
        }
        Message::Persisted { docs } => {
            for (d, _) in docs {
                id(d);
            }
        }
        Message::Error { doc: Some(d), .. } => id(d),
        _ => {}
    }
}

type Sent = Arc<Mutex<Vec<(PeerId, Message)>>>;

fn capture(replica: &Replica) -> Sent {
    let sent: Sent = Arc::default();
    let sink = sent.clone();
    replica.set_transport(move |frames, _events| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(frames);
        Vec::new()
    });
    sent
}

fn catalog(replica: &Replica) -> BTreeMap<DocumentId, CatalogEntry> {
    let all: Vec<u8> = (0..=255).collect();
    replica
        .catalog_entries(&Scope::All, &all)
        .expect("catalog")
        .into_iter()
        .map(|e| (e.id, e))
        .collect()
}

pub fn check(data: &[u8]) {
    run(data, mode());
}

/// Runs an input in `mode`.
pub fn run(data: &[u8], mode: Mode) {
    let Some((setup, ops)) = decode_input(data) else {
        return;
    };
    let access_rights = setup.access();
    let mut w = world::open();
    let before = catalog(&w.replica);
    let sent = capture(&w.replica);
    let mut peer = PeerId(1);
    w.replica
        .peer_connected(peer, remote(), access_rights.clone(), setup.initiator);
    for op in ops {
        match op {
            Op::Message(mut message) => {
                remap(&mut message);
                if mode.skip_known {
                    skip_known(&mut message, &access_rights, mode.access);
                }
                w.replica.peer_message(peer, message);
            }
            Op::Tick(ms) => w.advance(i64::from(ms)),
            Op::Flow(paused) => w.replica.peer_flow(peer, paused),
            Op::Reconnect => {
                w.replica.peer_disconnected(peer);
                peer = PeerId(peer.0 + 1);
                w.replica
                    .peer_connected(peer, remote(), access_rights.clone(), setup.initiator);
            }
        }
    }
    w.replica.peer_disconnected(peer);

    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|p| p.into_inner()));
    for (_, message) in &sent {
        let frame = protocol::encode(message);
        let back = protocol::decode(&frame, DEFAULT_MAX_FRAME).unwrap_or_else(|e| {
            panic!("a {} the engine sent does not decode: {e}", message.kind())
        });
        assert_eq!(
            &back, message,
            "a frame the engine sent changed in the codec"
        );
    }
    let after = catalog(&w.replica);
    if mode.access {
        check_writes(&access_rights, &before, &after);
        check_reads(&access_rights, &after, &sent);
    }
    w.check_restores();
}

/// See [`Mode::skip_known`].
fn skip_known(message: &mut Message, access: &Access, access_checked: bool) {
    match message {
        Message::Sync { batch } => batch.retain(|item| match &item.payload {
            Payload::Sync(bytes) => sync::Message::decode(bytes)
                .map_or(true, |m| protocol::check_sync_message(&m).is_ok()),
            _ => true,
        }),
        Message::Entries { entries, .. } if access_checked => entries.retain(|e| {
            !e.deleted
                || (access.read.contains(&e.collection) && access.write.contains(&e.collection))
        }),
        _ => {}
    }
}

/// Documents in collections the session may not write keep their catalog entries; none is
/// created there.
fn check_writes(
    access: &Access,
    before: &BTreeMap<DocumentId, CatalogEntry>,
    after: &BTreeMap<DocumentId, CatalogEntry>,
) {
    let writable = |c: &str| access.read.contains(c) && access.write.contains(c);
    for (id, entry) in after.iter().filter(|(_, e)| !writable(&e.collection)) {
        match before.get(id) {
            None => panic!(
                "a session that may not write {:?} created {id} there",
                entry.collection
            ),
            Some(old) => assert_eq!(
                old, entry,
                "a session that may not write {:?} changed {id}",
                entry.collection
            ),
        }
    }
    for (id, entry) in before.iter().filter(|(_, e)| !writable(&e.collection)) {
        assert!(
            after.contains_key(id),
            "{id} ({:?}) disappeared",
            entry.collection
        );
    }
}

/// Nothing sent carries a document or catalog entry the session may not read (judged by the
/// document's stored collection, not the one an item names). A `Want` carries nothing of the
/// document: the engine asks for an id the peer named in a readable collection that it holds
/// in another one (the peer's `Whole` then gets `BadDocument`), which is allowed.
fn check_reads(
    access: &Access,
    after: &BTreeMap<DocumentId, CatalogEntry>,
    sent: &[(PeerId, Message)],
) {
    let readable = |id: &DocumentId, named: &str| {
        access.read.contains(named)
            && after
                .get(id)
                .is_none_or(|e| access.read.contains(&e.collection))
    };
    for (_, message) in sent {
        match message {
            Message::Sync { batch } => {
                for item in batch {
                    let what = match item.payload {
                        Payload::Want => continue,
                        Payload::Sync(_) => "a sync message",
                        Payload::Whole(_) => "the whole document",
                        Payload::Tombstone => "the tombstone",
                    };
                    assert!(
                        readable(&item.id, &item.collection),
                        "sent {what} of {} ({:?}), which the session may not read",
                        item.id,
                        item.collection
                    );
                }
            }
            Message::Entries { entries, .. } => {
                for e in entries {
                    assert!(
                        readable(&e.id, &e.collection),
                        "sent the catalog entry of {} ({:?}), which the session may not read",
                        e.id,
                        e.collection
                    );
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds: real sessions between the world replica and a peer, recorded as inputs.

/// A peer replica (id [`remote`]) holding the world's documents (through a bundle).
fn peer_replica() -> Open {
    let peer = world::open_records(&world::Kv::new(), 2);
    let bundle = world::open()
        .replica
        .export_bundle(&BundleScope::All)
        .expect("export");
    peer.replica.import_bundle(&bundle).expect("import");
    peer
}

/// Runs a session between the world replica (with `setup`) and `peer` (full access on its
/// side), calling `live` on the peer once the session first went quiet; returns the input
/// that replays what the world replica received, and every frame sent either way.
pub fn record(setup: &Setup, peer: Open, live: impl Fn(&Replica)) -> (Vec<u8>, Vec<Message>) {
    let w = world::open();
    let to_peer = capture(&w.replica);
    let to_world = capture(&peer.replica);
    let world_id = w.replica.replica_id();
    w.replica
        .peer_connected(PeerId(1), remote(), setup.access(), setup.initiator);
    peer.replica.peer_connected(
        PeerId(1),
        world_id,
        Access::full(Scope::All),
        !setup.initiator,
    );
    let mut ops = Vec::new();
    let mut frames = Vec::new();
    let mut quiet = 0;
    let mut lived = false;
    for _ in 0..200 {
        let for_peer = std::mem::take(&mut *to_peer.lock().expect("lock"));
        for (_, m) in for_peer.iter().cloned() {
            peer.replica.peer_message(PeerId(1), m);
        }
        let for_world = std::mem::take(&mut *to_world.lock().expect("lock"));
        for (_, m) in for_world.iter().cloned() {
            ops.push(Op::Message(m.clone()));
            w.replica.peer_message(PeerId(1), m);
        }
        let idle = for_peer.is_empty() && for_world.is_empty();
        frames.extend(for_peer.into_iter().chain(for_world).map(|(_, m)| m));
        if !idle {
            quiet = 0;
            continue;
        }
        quiet += 1;
        if quiet > 2 {
            if lived || ops.len() >= MAX_OPS {
                break;
            }
            lived = true;
            quiet = 0;
            live(&peer.replica);
        }
        ops.push(Op::Tick(25));
        w.advance(25);
        peer.advance(25);
    }
    ops.truncate(MAX_OPS);
    (encode_input(setup, &ops), frames)
}

/// Seed inputs from real sessions, named; and every frame those sessions sent.
pub fn seeds() -> (Vec<(String, Vec<u8>)>, Vec<Message>) {
    use serde_json::json;
    let docs = &world::world().docs;
    let (milk, eggs, note, secret) = (docs[0].0, docs[1].0, docs[3].0, docs[5].0);
    let edit = move |r: &Replica| {
        r.update(&milk, json!({"title": "oat milk", "n": 3}))
            .expect("update");
        r.create("todos", json!({"title": "new"})).expect("create");
        r.delete(&eggs).expect("delete");
        r.update(&note, json!({"extra": [1, 2.0]})).expect("update");
        r.update(&secret, json!({"pin": 0})).expect("update");
        r.create("private", json!({"p": true})).expect("create");
        r.create("notes", json!({"n": "x"})).expect("create");
    };
    let live = move |r: &Replica| {
        r.update(&milk, json!({"done": false})).expect("update");
        r.create("notes", json!({"late": 1})).expect("create");
        r.create("todos", json!({"late": 2})).expect("create");
        r.update(&secret, json!({"pin": 7})).expect("update");
    };
    let full = |initiator| Setup {
        initiator,
        read: 0,
        write: 0,
        creates_per_minute: None,
    };
    let mut out = Vec::new();
    let mut frames = Vec::new();
    let mut add = |name: &str, setup: Setup, peer: Open, edits: bool| {
        if edits {
            edit(&peer.replica);
        }
        let (input, sent) = record(&setup, peer, live);
        out.push((name.to_owned(), input));
        frames.extend(sent);
    };
    add("responder-full", full(false), peer_replica(), true);
    add("initiator-full", full(true), peer_replica(), true);
    add("responder-in-sync", full(false), peer_replica(), false);
    add(
        "initiator-empty-peer",
        full(true),
        world::open_records(&world::Kv::new(), 2),
        false,
    );
    add(
        "responder-empty-peer",
        full(false),
        world::open_records(&world::Kv::new(), 2),
        false,
    );
    let read_all_write_todos = |initiator| Setup {
        initiator,
        read: 0,
        write: 1,
        creates_per_minute: None,
    };
    add(
        "responder-write-todos",
        read_all_write_todos(false),
        peer_replica(),
        true,
    );
    add(
        "initiator-write-todos",
        read_all_write_todos(true),
        peer_replica(),
        true,
    );
    let todos_limited = |initiator| Setup {
        initiator,
        read: 1,
        write: 1,
        creates_per_minute: Some(1),
    };
    add(
        "responder-todos-limit-1",
        todos_limited(false),
        peer_replica(),
        true,
    );
    add(
        "initiator-todos-limit-1",
        todos_limited(true),
        peer_replica(),
        true,
    );
    let notes_private = |initiator| Setup {
        initiator,
        read: 3,
        write: 2,
        creates_per_minute: None,
    };
    add(
        "responder-notes-private",
        notes_private(false),
        peer_replica(),
        true,
    );
    add(
        "initiator-notes-private",
        notes_private(true),
        peer_replica(),
        true,
    );
    (out, frames)
}
