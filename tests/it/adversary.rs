//! Adversarial, model-based test of the relay's permissions (issue 10, item 2).
//!
//! A real relay (`weft::net::run`, tokens required) on 127.0.0.1:0 holds documents in `alpha`
//! and `beta`, created by a well-behaved client. Raw WebSocket sessions holding each kind of
//! token (none, read `alpha`, read/write `alpha`, read everything but write `alpha` only,
//! read/write everything) send generated frame sequences: valid `Message`s whose fields come
//! from a small universe (those documents, fresh ids, both collection names, deleted flags,
//! real and random digests, Automerge sync messages with and without changes, whole documents,
//! tombstones, every other message kind) mixed with mutated bytes. After every frame (a `Ping`
//! whose `Pong` says the relay applied it) and after every sequence:
//!
//! - every document the session may not write (by its *stored* collection) has exactly its
//!   former heads and tombstone flag on the relay, and an id the relay did not have appears
//!   only in a collection the session may write;
//! - nothing the relay sent the session names a document whose stored collection it may not
//!   read (an `Error` echoing an id the session sent is fine);
//! - the relay answers within 10 s, and still serves a well-behaved client (a raw session after
//!   every sequence; two library clients syncing a document every 50 sequences and at the end).
//!
//! Violations do not stop the run: it goes on, groups them by kind and fails at the end,
//! printing each kind once with the sequence that showed it first. Seeded and replayable:
//! `WEFT_SEED=N` (printed at the start) replays the run; `WEFT_ADVERSARY_SEQUENCES` sets the
//! number of sequences (500: about 3 s in the debug test profile), `WEFT_ADVERSARY_PROGRESS`
//! how often progress is printed (1,000), `WEFT_ADVERSARY_RELAY_EVERY` after how many
//! sequences a fresh relay takes over (5,000: keeps the catalog, and so the cost of each
//! sequence, bounded). A new generation of documents is made every 50 sequences.
//! `scripts/soak-adversary.sh` runs 100,000 in release (about 6 minutes on 2 busy cores).
//!
//! Sessions connect without Nagle's algorithm: each frame is followed by a small Ping, which
//! would otherwise wait for a delayed ACK (40 ms), ten times the cost of the rest.
//!
//! `entries_tombstone_attack` sends exactly the frame from the issue.
#![cfg(feature = "net")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ROOT};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use weft::net::ConnectOptions;
use weft::net::auth::TokenKey;
use weft::protocol::{
    self, CatalogEntry, ErrorCode, Message, Payload, RejectCode, SyncItem, WireScope, bucket_of,
    doc_digest,
};
use weft::{
    Bundle, BundleEntry, BundleScope, DocumentId, Replica, ReplicaId, ReplicaOptions, Scope,
};

use crate::support::SplitMix64;
use crate::support::relay::{self, LIMIT, Raw, connect, recv, send};

const A: &str = "alpha";
const B: &str = "beta";
/// The collection the well-behaved library clients use to show the relay still serves.
const PROBE: &str = "probe";
/// A new generation of documents every this many sequences (attacks that work leave the
/// current one deleted, and writers may change it).
const RESEED_EVERY: usize = 50;
/// The library clients check the relay every this many sequences.
const CLIENTS_EVERY: usize = 50;
/// Nonces of our own Pings (the generated ones stay below 2^62).
const MARK: u64 = 1 << 63;

// ---------------------------------------------------------------------------------------------
// The relay.

/// What the relay stores about one document.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    collection: String,
    deleted: bool,
    /// Sorted.
    heads: Vec<[u8; 32]>,
}

impl std::fmt::Display for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let heads: Vec<String> = self.heads.iter().map(|h| hex(&h[..3])).collect();
        write!(
            f,
            "{}{} heads [{}]",
            self.collection,
            if self.deleted { " deleted" } else { "" },
            heads.join(",")
        )
    }
}

fn show(state: &Option<Stored>) -> String {
    state
        .as_ref()
        .map_or_else(|| "absent".to_owned(), ToString::to_string)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `documents` row's collection, tombstone flag and heads, from column `at` on.
fn row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Stored> {
    let collection: String = r.get(at)?;
    let deleted: bool = r.get(at + 1)?;
    let heads: Vec<u8> = r.get(at + 2)?;
    let mut heads: Vec<[u8; 32]> = heads
        .chunks(32)
        .map(|c| c.try_into().expect("heads are 32-byte hashes"))
        .collect();
    heads.sort();
    Ok(Stored {
        collection,
        deleted,
        heads,
    })
}

/// The harness relay (tokens required) and a read-only connection to its file (WAL: it never
/// blocks the relay).
struct Relay {
    relay: relay::Relay,
    db: Option<rusqlite::Connection>,
}

impl std::ops::Deref for Relay {
    type Target = relay::Relay;
    fn deref(&self) -> &relay::Relay {
        &self.relay
    }
}

impl Relay {
    async fn start() -> Relay {
        Relay {
            relay: relay::Relay::with_tokens(|_| {}).await,
            db: None,
        }
    }

    /// Opens the read-only view of the relay's file (once the relay has written it).
    fn open_db(&mut self) {
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let db =
            rusqlite::Connection::open_with_flags(self.data().join("relay.db"), flags).unwrap();
        db.busy_timeout(LIMIT).unwrap();
        self.db = Some(db);
    }

    fn stored(&self, id: &DocumentId) -> Option<Stored> {
        use rusqlite::OptionalExtension;
        let db = self.db.as_ref().expect("open_db first");
        db.prepare_cached("SELECT collection, deleted, heads FROM documents WHERE doc_id = ?1")
            .unwrap()
            .query_row([id.as_bytes().as_slice()], |r| row(r, 0))
            .optional()
            .unwrap()
    }

    /// The highest change-feed number of any document (every write sets it).
    fn last_seq(&self) -> i64 {
        let db = self.db.as_ref().expect("open_db first");
        db.query_row(
            "SELECT coalesce(max(updated_seq), 0) FROM documents",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// Every document written after `seq`.
    fn written_since(&self, seq: i64) -> Vec<(DocumentId, Stored)> {
        let db = self.db.as_ref().expect("open_db first");
        let mut statement = db
            .prepare_cached(
                "SELECT collection, deleted, heads, doc_id FROM documents WHERE updated_seq > ?1",
            )
            .unwrap();
        statement
            .query_map([seq], |r| {
                let id: Vec<u8> = r.get(3)?;
                Ok((DocumentId::try_from_slice(&id).unwrap(), row(r, 0)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn snapshot(&self, ids: &BTreeSet<DocumentId>) -> BTreeMap<DocumentId, Option<Stored>> {
        ids.iter().map(|id| (*id, self.stored(id))).collect()
    }

    /// A well-behaved raw session still gets Welcome and a Pong. `Err`: what went wrong.
    async fn serves(&self, token: &str) -> Result<(), String> {
        let (mut ws, answer) = self.raw(token).await;
        if !matches!(answer, Message::Welcome { .. }) {
            return Err(format!("a valid Hello got {answer:?}"));
        }
        send(&mut ws, &Message::Ping { nonce: 7 }).await;
        loop {
            match recv(&mut ws).await {
                Message::Pong { nonce: 7 } => break,
                Message::Sync { .. } | Message::Persisted { .. } => {}
                other => return Err(format!("a Ping got {other:?}")),
            }
        }
        let _ = ws.close(None).await;
        Ok(())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// The universe: documents a well-behaved client creates, and what the generator knows of them.

/// A document of the universe.
struct Known {
    id: DocumentId,
    /// How reports name it: `g3.a1` (generation 3, alpha, number 1).
    label: String,
    collection: &'static str,
    /// Its Automerge content as created (`None`: a tombstone).
    doc: Option<Automerge>,
}

struct Universe {
    docs: Vec<Known>,
    /// Ids no one created (yet).
    fresh: Vec<(DocumentId, String)>,
}

impl Universe {
    fn ids(&self) -> BTreeSet<DocumentId> {
        self.docs
            .iter()
            .map(|d| d.id)
            .chain(self.fresh.iter().map(|f| f.0))
            .collect()
    }

    fn label(&self, id: &DocumentId) -> String {
        self.docs
            .iter()
            .find(|d| d.id == *id)
            .map(|d| d.label.clone())
            .or_else(|| self.fresh.iter().find(|f| f.0 == *id).map(|f| f.1.clone()))
            .unwrap_or_else(|| format!("x:{}", &id.to_string()[..6]))
    }
}

/// The well-behaved client that creates each generation of the universe (reads and writes
/// everything).
struct Admin {
    replica: Replica,
    token: String,
    _dir: tempfile::TempDir,
}

impl Admin {
    fn new(relay: &Relay, seed: u64) -> Admin {
        let dir = tempfile::tempdir().unwrap();
        let options = ReplicaOptions {
            seed: Some(seed),
            ..ReplicaOptions::default()
        };
        let replica = Replica::open_with(dir.path().join("admin.db"), options).unwrap();
        Admin {
            replica,
            token: relay.token("*", "*"),
            _dir: dir,
        }
    }

    async fn synced(&self, relay: &Relay) -> weft::net::Connection {
        let options = ConnectOptions {
            token: Some(self.token.clone()),
            scope: Scope::Collections(vec![A.into(), B.into()]),
            ..ConnectOptions::default()
        };
        let connection = self.replica.connect(&relay.url(), options);
        timeout(LIMIT, connection.wait_synced())
            .await
            .expect("the admin did not sync in time")
            .expect("the admin was refused");
        connection
    }

    /// Creates generation `generation` on the relay: per collection, `0` a plain document,
    /// `1` one with several changes, `2` created, synced and then deleted, `3` deleted before
    /// the relay saw it (a bare tombstone); plus four fresh ids.
    async fn generation(&self, relay: &Relay, rng: &mut SplitMix64, generation: usize) -> Universe {
        let r = &self.replica;
        let since = r.last_seq();
        let mut made = Vec::new();
        for (c, short) in [(A, 'a'), (B, 'b')] {
            let secret = |n: usize| format!("{c} {generation}.{n}");
            let d0 = r.create(c, json!({ "secret": secret(0) })).unwrap();
            let d1 = r
                .create(c, json!({ "secret": secret(1), "n": 0, "list": [1, 2] }))
                .unwrap();
            for n in 1..=3 {
                r.update(&d1, json!({ "n": n, "more": rng.text(4) }))
                    .unwrap();
            }
            let d2 = r.create(c, json!({ "secret": secret(2) })).unwrap();
            let d3 = r.create(c, json!({ "secret": secret(3) })).unwrap();
            r.delete(&d3).unwrap();
            made.push((c, short, [d0, d1, d2, d3]));
        }
        let connection = self.synced(relay).await;
        for (_, _, [_, d1, d2, _]) in &made {
            r.delete(d2).unwrap();
            r.update(d1, json!({ "n": 4 })).unwrap();
        }
        timeout(LIMIT, connection.wait_synced())
            .await
            .expect("the admin did not sync in time")
            .unwrap();
        connection.close().await;
        let bundle = Bundle::decode(&r.export_bundle(&BundleScope::Since(since)).unwrap()).unwrap();
        let content = |id: &DocumentId| {
            bundle.entries.iter().find_map(|e| match e {
                BundleEntry::Document { id: i, bytes, .. } if i == id => {
                    Some(Automerge::load(bytes).unwrap())
                }
                _ => None,
            })
        };
        let mut docs = Vec::new();
        for (c, short, ids) in made {
            for (n, id) in ids.into_iter().enumerate() {
                docs.push(Known {
                    id,
                    label: format!("g{generation}.{short}{n}"),
                    collection: c,
                    doc: content(&id),
                });
            }
        }
        let fresh = (0..4)
            .map(|n| {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
                bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
                (DocumentId::from_bytes(bytes), format!("g{generation}.f{n}"))
            })
            .collect();
        let universe = Universe { docs, fresh };
        // The relay holds what the admin made (a failure here is the harness's, not an attack).
        for d in &universe.docs {
            let stored = relay.stored(&d.id);
            let stored = stored.unwrap_or_else(|| panic!("{} is not on the relay", d.label));
            assert_eq!(stored.collection, d.collection);
            assert_eq!(stored.deleted, d.doc.is_none(), "{}", d.label);
            if let Some(doc) = &d.doc {
                let mut heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
                heads.sort();
                assert_eq!(stored.heads, heads, "{}", d.label);
            }
        }
        universe
    }
}

/// Two library clients that sync a document through the relay: it still serves.
struct Clients {
    writer: Replica,
    reader: Replica,
    token: String,
    round: u64,
    _dir: tempfile::TempDir,
}

impl Clients {
    fn new(relay: &Relay) -> Clients {
        let dir = tempfile::tempdir().unwrap();
        Clients {
            writer: Replica::open(dir.path().join("writer.db")).unwrap(),
            reader: Replica::open(dir.path().join("reader.db")).unwrap(),
            token: relay.token(PROBE, PROBE),
            round: 0,
            _dir: dir,
        }
    }

    /// The writer creates a document; the reader receives it. `Err`: what failed.
    async fn check(&mut self, relay: &Relay) -> Result<(), String> {
        self.round += 1;
        let options = ConnectOptions {
            token: Some(self.token.clone()),
            scope: Scope::collection(PROBE),
            ..ConnectOptions::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _hook = self.reader.on_change(Scope::collection(PROBE), move |e| {
            let _ = tx.send(e.id);
        });
        let reader = self.reader.connect(&relay.url(), options.clone());
        let writer = self.writer.connect(&relay.url(), options);
        for (who, c) in [("reader", &reader), ("writer", &writer)] {
            match timeout(LIMIT, c.wait_synced()).await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => return Err(format!("the {who} was refused: {status:?}")),
                Err(_) => return Err(format!("the {who} did not sync within {LIMIT:?}")),
            }
        }
        let id = self
            .writer
            .create(PROBE, json!({ "round": self.round }))
            .map_err(|e| e.to_string())?;
        let arrived = timeout(LIMIT, async {
            while let Some(got) = rx.recv().await {
                if got == id {
                    return true;
                }
            }
            false
        })
        .await;
        writer.close().await;
        reader.close().await;
        match arrived {
            Ok(true) => Ok(()),
            _ => Err(format!(
                "a document written by one client did not reach the other within {LIMIT:?}"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens and what a session may do.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// No valid token: missing, malformed, forged, expired, asking for more than it grants,
    /// or no Hello at all.
    None,
    ReadAlpha,
    ReadWriteAlpha,
    /// Reads both collections, writes `alpha` only.
    ReadAllWriteAlpha,
    ReadWriteAll,
}

const KINDS: [Kind; 5] = [
    Kind::None,
    Kind::ReadAlpha,
    Kind::ReadWriteAlpha,
    Kind::ReadAllWriteAlpha,
    Kind::ReadWriteAll,
];

/// What a session may read and write (`None`: every collection).
#[derive(Clone, Debug)]
struct Grant {
    read: Option<Vec<String>>,
    write: Option<Vec<String>>,
}

impl Grant {
    fn nothing() -> Grant {
        Grant {
            read: Some(Vec::new()),
            write: Some(Vec::new()),
        }
    }

    fn reads(&self, collection: &str) -> bool {
        self.read
            .as_ref()
            .is_none_or(|l| l.iter().any(|c| c == collection))
    }

    fn writes(&self, collection: &str) -> bool {
        self.reads(collection)
            && self
                .write
                .as_ref()
                .is_none_or(|l| l.iter().any(|c| c == collection))
    }
}

/// The tokens of every kind, issued once.
struct Tokens {
    read_alpha: String,
    read_write_alpha: String,
    read_all_write_alpha: String,
    read_write_all: String,
    forged: String,
    expired: String,
}

impl Tokens {
    fn new(relay: &Relay) -> Tokens {
        Tokens {
            read_alpha: relay.token(A, ""),
            read_write_alpha: relay.token(A, A),
            read_all_write_alpha: relay.token("*", A),
            read_write_all: relay.token("*", "*"),
            forged: TokenKey::from_secret(&[8; 32])
                .unwrap()
                .issue(
                    "forged",
                    &Scope::All,
                    &Scope::All,
                    Duration::from_secs(3600),
                )
                .unwrap(),
            expired: relay
                .key()
                .issue_until("expired", &Scope::All, &Scope::All, unix_now() - 5)
                .unwrap(),
        }
    }
}

/// How a session opens.
struct Opening {
    /// The Hello (`None`: the session sends its frames without one).
    hello: Option<Message>,
    label: String,
    /// What the relay must grant (nothing for the kind `None`).
    grant: Grant,
}

fn opening(kind: Kind, tokens: &Tokens, rng: &mut SplitMix64) -> Opening {
    let hello = |token: Option<&str>, scope: WireScope| Message::Hello {
        protocol: protocol::PROTOCOL_VERSION.into(),
        replica: ReplicaId::from_bytes([0xad; 16]),
        token: token.map(str::to_owned),
        scope,
    };
    let collections =
        |list: &[&str]| WireScope::Collections(list.iter().map(|c| (*c).into()).collect());
    let list = |l: &[&str]| Some(l.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>());
    let (token, scope, label, read, write) = match kind {
        Kind::None => {
            let (token, scope, label) = match rng.below(6) {
                0 => (None, WireScope::All, "no token"),
                1 => (Some("not a token"), WireScope::All, "malformed token"),
                2 => (Some(tokens.forged.as_str()), WireScope::All, "forged token"),
                3 => (
                    Some(tokens.expired.as_str()),
                    WireScope::All,
                    "expired token",
                ),
                4 => (
                    Some(tokens.read_alpha.as_str()),
                    collections(&[A, B]),
                    "read-alpha token asking for beta",
                ),
                _ => {
                    return Opening {
                        hello: None,
                        label: "no Hello".into(),
                        grant: Grant::nothing(),
                    };
                }
            };
            return Opening {
                hello: Some(hello(token, scope)),
                label: label.into(),
                grant: Grant::nothing(),
            };
        }
        Kind::ReadAlpha => {
            let scope = if rng.chance(1, 4) {
                collections(&[A])
            } else {
                WireScope::All
            };
            (
                &tokens.read_alpha,
                scope,
                "read alpha",
                list(&[A]),
                list(&[]),
            )
        }
        Kind::ReadWriteAlpha => {
            let scope = if rng.chance(1, 4) {
                collections(&[A])
            } else {
                WireScope::All
            };
            (
                &tokens.read_write_alpha,
                scope,
                "read/write alpha",
                list(&[A]),
                list(&[A]),
            )
        }
        Kind::ReadAllWriteAlpha => match rng.below(5) {
            0 => (
                &tokens.read_all_write_alpha,
                collections(&[B]),
                "read all, write alpha; asks beta",
                list(&[B]),
                list(&[A]),
            ),
            1 => (
                &tokens.read_all_write_alpha,
                collections(&[A, B]),
                "read all, write alpha; asks alpha,beta",
                list(&[A, B]),
                list(&[A]),
            ),
            _ => (
                &tokens.read_all_write_alpha,
                WireScope::All,
                "read all, write alpha",
                None,
                list(&[A]),
            ),
        },
        Kind::ReadWriteAll => match rng.below(5) {
            0 => (
                &tokens.read_write_all,
                collections(&[A]),
                "read/write all; asks alpha",
                list(&[A]),
                None,
            ),
            _ => (
                &tokens.read_write_all,
                WireScope::All,
                "read/write all",
                None,
                None,
            ),
        },
    };
    Opening {
        hello: Some(hello(Some(token.as_str()), scope)),
        label: label.into(),
        grant: Grant { read, write },
    }
}

// ---------------------------------------------------------------------------------------------
// The generator.

/// A frame to send and how reports name it.
#[derive(Clone)]
struct Planned {
    label: String,
    frame: Outgoing,
}

#[derive(Clone)]
enum Outgoing {
    Binary(Vec<u8>),
    Text(String),
}

struct Sequence {
    kind: Kind,
    opening: Opening,
    frames: Vec<Planned>,
    /// Every id the frames name (also in mutated frames that still decode).
    named: BTreeSet<DocumentId>,
}

impl Sequence {
    fn describe(&self) -> String {
        let mut out = format!("token {:?} ({})\n", self.kind, self.opening.label);
        for (i, f) in self.frames.iter().enumerate() {
            let _ = writeln!(out, "      #{i} {}", f.label);
        }
        out
    }
}

struct Gen<'a> {
    rng: &'a mut SplitMix64,
    u: &'a Universe,
    /// The relay's state before the sequence.
    before: &'a BTreeMap<DocumentId, Option<Stored>>,
}

/// A document the generator picked: its id, name, stored collection and content (when known).
struct Pick<'a> {
    id: DocumentId,
    label: String,
    home: Option<&'static str>,
    doc: Option<&'a Automerge>,
}

impl<'a> Gen<'a> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.next_u64() as u8).collect()
    }

    fn actor(&mut self) -> ActorId {
        ActorId::from(self.bytes(16))
    }

    fn hash(&mut self) -> ChangeHash {
        ChangeHash(self.bytes(32).try_into().unwrap())
    }

    fn pick(&mut self) -> Pick<'a> {
        let u = self.u;
        if self.rng.chance(3, 10) {
            let (id, label) = &u.fresh[self.rng.below(u.fresh.len() as u64) as usize];
            return Pick {
                id: *id,
                label: label.clone(),
                home: None,
                doc: None,
            };
        }
        let d = &u.docs[self.rng.below(u.docs.len() as u64) as usize];
        Pick {
            id: d.id,
            label: d.label.clone(),
            home: Some(d.collection),
            doc: d.doc.as_ref(),
        }
    }

    /// The collection an item claims.
    fn claim(&mut self, home: Option<&str>) -> String {
        match (self.rng.below(100), home) {
            (0..50, Some(home)) => home.to_owned(),
            (0..85, _) => if self.rng.chance(1, 2) { A } else { B }.to_owned(),
            (85..95, _) => "gamma".to_owned(),
            _ => ["", "al pha", "ALPHA", "alpha/../beta"][self.rng.below(4) as usize].to_owned(),
        }
    }

    /// A document to change: the picked one's content, or (fresh ids, tombstones) another
    /// document or an empty one.
    fn base(&mut self, doc: Option<&'a Automerge>) -> Automerge {
        match doc {
            Some(doc) if self.rng.chance(9, 10) => doc.clone(),
            _ => {
                let others: Vec<&Automerge> =
                    self.u.docs.iter().filter_map(|d| d.doc.as_ref()).collect();
                if self.rng.chance(1, 3) && !others.is_empty() {
                    others[self.rng.below(others.len() as u64) as usize].clone()
                } else {
                    Automerge::new()
                }
            }
        }
    }

    /// `base` with `changes` more changes by a new actor.
    fn edited(&mut self, base: &Automerge, changes: usize) -> Automerge {
        let mut doc = base.fork().with_actor(self.actor());
        for _ in 0..changes {
            let mut tx = doc.transaction();
            tx.put(ROOT, "forged", self.rng.next_u64() as i64).unwrap();
            tx.commit();
        }
        doc
    }

    fn mutate(&mut self, mut bytes: Vec<u8>, keep: usize) -> (Vec<u8>, &'static str) {
        if bytes.len() <= keep {
            let extra = self.bytes(4);
            bytes.extend(extra);
            return (bytes, "extended");
        }
        let len = bytes.len() as u64;
        match self.rng.below(4) {
            0 | 1 => {
                for _ in 0..self.rng.range(1, 3) {
                    let i = self.rng.range(keep as u64, len - 1) as usize;
                    bytes[i] ^= 1 << self.rng.below(8);
                }
                (bytes, "bits flipped")
            }
            2 => {
                bytes.truncate(self.rng.range(keep as u64, len - 1) as usize);
                (bytes, "truncated")
            }
            _ => {
                let at = self.rng.range(keep as u64, len) as usize;
                let n = self.rng.range(1, 8) as usize;
                let extra = self.bytes(n);
                bytes.splice(at..at, extra);
                (bytes, "bytes inserted")
            }
        }
    }

    /// An Automerge sync message about `doc`, with or without changes.
    fn sync_message(&mut self, doc: Option<&'a Automerge>) -> (Vec<u8>, String) {
        let base = self.base(doc);
        let message = |heads, need, changes: Vec<Vec<u8>>| sync::Message {
            heads,
            need,
            have: vec![sync::Have::default()],
            changes: changes.into(),
            flags: None,
            version: sync::MessageVersion::V1,
        };
        let raw = |changes: Vec<automerge::Change>| -> Vec<Vec<u8>> {
            changes.iter().map(|c| c.raw_bytes().to_vec()).collect()
        };
        match self.rng.below(100) {
            0..18 => {
                let m = base
                    .generate_sync_message(&mut sync::State::new())
                    .unwrap_or_else(|| message(base.get_heads(), vec![], vec![]));
                (m.encode(), "heads only".into())
            }
            18..34 => (
                protocol_change(self.edited(&base, 1), &base),
                "change (sync protocol)".into(),
            ),
            34..50 => {
                let n = self.rng.range(1, 3) as usize;
                let ours = self.edited(&base, n);
                let changes = raw(ours.get_changes(&base.get_heads()));
                (
                    message(ours.get_heads(), vec![], changes).encode(),
                    "change".into(),
                )
            }
            50..58 => {
                let ours = self.edited(&base, 1);
                (
                    message(ours.get_heads(), vec![], vec![]).encode(),
                    "heads the relay lacks".into(),
                )
            }
            58..64 => {
                let heads = vec![self.hash()];
                let need = if self.rng.chance(1, 2) {
                    vec![self.hash()]
                } else {
                    vec![]
                };
                (message(heads, need, vec![]).encode(), "random heads".into())
            }
            64..72 => {
                let ours = self.edited(&base, 2);
                let mut changes = raw(ours.get_changes(&base.get_heads()));
                changes.remove(0);
                (
                    message(ours.get_heads(), vec![], changes).encode(),
                    "change missing its dependency".into(),
                )
            }
            72..78 => (
                message(vec![], base.get_heads(), vec![]).encode(),
                "needs the relay's heads".into(),
            ),
            78..82 => {
                let m = Automerge::new()
                    .generate_sync_message(&mut sync::State::new())
                    .unwrap_or_else(|| message(vec![], vec![], vec![]));
                (m.encode(), "empty document".into())
            }
            82..95 => {
                let (inner, what) = self.sync_message(doc);
                let (bytes, how) = self.mutate(inner, 0);
                (bytes, format!("{what}, {how}"))
            }
            _ => {
                let n = self.rng.below(40) as usize;
                (self.bytes(n), "garbage".into())
            }
        }
    }

    /// A whole document for `doc`'s id.
    fn whole(&mut self, doc: Option<&'a Automerge>) -> (Vec<u8>, String) {
        match self.rng.below(100) {
            0..20 => {
                let base = self.base(doc);
                (base.save(), "as stored".into())
            }
            20..45 => {
                let base = self.base(doc);
                (self.edited(&base, 1).save(), "edited offline".into())
            }
            45..60 => {
                let others: Vec<&Automerge> =
                    self.u.docs.iter().filter_map(|d| d.doc.as_ref()).collect();
                let other = others[self.rng.below(others.len() as u64) as usize];
                (other.save(), "another document".into())
            }
            60..72 => (self.edited(&Automerge::new(), 1).save(), "new".into()),
            72..78 => (Automerge::new().save(), "no changes".into()),
            78..94 => {
                let (inner, what) = self.whole(doc);
                let (bytes, how) = self.mutate(inner, 0);
                (bytes, format!("{what}, {how}"))
            }
            _ => {
                let n = self.rng.below(40) as usize;
                (self.bytes(n), "garbage".into())
            }
        }
    }

    fn item(&mut self) -> (SyncItem, String) {
        let p = self.pick();
        let collection = self.claim(p.home);
        let (payload, what) = match self.rng.below(100) {
            0..15 => (Payload::Want, "Want".to_owned()),
            15..30 => (Payload::Tombstone, "Tombstone".to_owned()),
            30..55 => {
                let (bytes, what) = self.whole(p.doc);
                (Payload::Whole(bytes), format!("Whole({what})"))
            }
            _ => {
                let (bytes, what) = self.sync_message(p.doc);
                (Payload::Sync(bytes), format!("Sync({what})"))
            }
        };
        let label = format!("{}@{collection:?}:{what}", p.label);
        (
            SyncItem {
                id: p.id,
                collection,
                payload,
            },
            label,
        )
    }

    /// A digest for an entry about `id`.
    fn digest(
        &mut self,
        id: &DocumentId,
        doc: Option<&Automerge>,
        deleted: bool,
    ) -> (u64, &'static str) {
        if deleted && self.rng.chance(85, 100) {
            return (doc_digest(id, &[], true), "tombstone digest");
        }
        match self.rng.below(4) {
            0 => {
                let heads: Vec<ChangeHash> = self
                    .before
                    .get(id)
                    .and_then(|s| s.as_ref())
                    .map(|s| s.heads.iter().map(|h| ChangeHash(*h)).collect())
                    .unwrap_or_default();
                (doc_digest(id, &heads, false), "the relay's digest")
            }
            1 => (
                doc_digest(id, &doc.map(|d| d.get_heads()).unwrap_or_default(), false),
                "created digest",
            ),
            2 => {
                let heads = vec![self.hash()];
                (doc_digest(id, &heads, false), "unknown heads digest")
            }
            _ => (self.rng.next_u64(), "random digest"),
        }
    }

    fn entries(&mut self) -> (Message, String) {
        // The attack from the issue, as is, in a quarter of them.
        if self.rng.chance(1, 4) {
            let p = self.pick();
            let collection = if self.rng.chance(3, 4) { A } else { B };
            let message = Message::Entries {
                buckets: vec![bucket_of(&p.id)],
                entries: vec![CatalogEntry {
                    id: p.id,
                    collection: collection.into(),
                    digest: doc_digest(&p.id, &[], true),
                    deleted: true,
                }],
            };
            return (
                message,
                format!("Entries(the issue's tombstone: {}@{collection:?})", p.label),
            );
        }
        let mut entries = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..self.rng.range(1, 3) {
            let p = self.pick();
            let collection = self.claim(p.home);
            let deleted = self.rng.chance(1, 2);
            let (digest, what) = self.digest(&p.id, p.doc, deleted);
            labels.push(format!(
                "{}@{collection:?}{} {what}",
                p.label,
                if deleted { " deleted" } else { "" }
            ));
            entries.push(CatalogEntry {
                id: p.id,
                collection,
                digest,
                deleted,
            });
        }
        let (buckets, which) = match self.rng.below(10) {
            0 => (Vec::new(), "no buckets"),
            1 => ((0..=255).collect(), "all buckets"),
            2 => {
                let n = self.rng.range(1, 4);
                (
                    (0..n).map(|_| self.rng.next_u64() as u8).collect(),
                    "random buckets",
                )
            }
            _ => {
                let set: BTreeSet<u8> = entries.iter().map(|e| bucket_of(&e.id)).collect();
                (set.into_iter().collect(), "their buckets")
            }
        };
        (
            Message::Entries { buckets, entries },
            format!("Entries({which}: {})", labels.join(", ")),
        )
    }

    /// One frame.
    fn frame(&mut self, tokens: &Tokens) -> Planned {
        let (message, label) = match self.rng.below(100) {
            0..40 => {
                let n = if self.rng.chance(1, 5) {
                    self.rng.range(2, 4)
                } else {
                    1
                };
                let (batch, labels): (Vec<SyncItem>, Vec<String>) =
                    (0..n).map(|_| self.item()).unzip();
                (
                    Message::Sync { batch },
                    format!("Sync[{}]", labels.join(", ")),
                )
            }
            40..62 => self.entries(),
            62..70 => {
                let (buckets, what) = match self.rng.below(10) {
                    0..4 => (vec![0; 256], "empty catalog"),
                    4..8 => ((0..256).map(|_| self.rng.next_u64()).collect(), "random"),
                    _ => {
                        let n = [0u64, 1, 255, 257, 1000][self.rng.below(5) as usize];
                        (
                            (0..n).map(|_| self.rng.next_u64()).collect(),
                            "wrong length",
                        )
                    }
                };
                let count = self.rng.below(20);
                let label = format!("Summary({what}, {} buckets)", buckets.len());
                (Message::Summary { count, buckets }, label)
            }
            70..75 => {
                let p = self.pick();
                let heads = (0..self.rng.below(3)).map(|_| self.hash().0).collect();
                (
                    Message::Persisted {
                        docs: vec![(p.id, heads)],
                    },
                    format!("Persisted({})", p.label),
                )
            }
            75..80 => {
                let codes = [
                    ErrorCode::Malformed,
                    ErrorCode::TooLarge,
                    ErrorCode::BadDocument,
                    ErrorCode::Forbidden,
                    ErrorCode::RateLimited,
                    ErrorCode::Internal,
                ];
                let code = codes[self.rng.below(6) as usize];
                let (doc, about) = if self.rng.chance(3, 4) {
                    let p = self.pick();
                    (Some(p.id), p.label)
                } else {
                    (None, "-".into())
                };
                (
                    Message::Error {
                        code,
                        message: "adversary".into(),
                        doc,
                    },
                    format!("Error({code:?}, {about})"),
                )
            }
            80..83 => {
                let scope = if self.rng.chance(1, 2) {
                    WireScope::All
                } else {
                    WireScope::Collections(vec![B.into()])
                };
                (
                    Message::Welcome {
                        replica: ReplicaId::from_bytes([1; 16]),
                        scope,
                        max_frame: self.rng.next_u64() as u32,
                    },
                    "Welcome".into(),
                )
            }
            83..85 => (
                Message::Reject {
                    code: RejectCode::Busy,
                    reason: "adversary".into(),
                },
                "Reject".into(),
            ),
            85..88 => {
                let token = if self.rng.chance(1, 2) {
                    &tokens.read_write_all
                } else {
                    &tokens.read_alpha
                };
                let hello = Message::Hello {
                    protocol: protocol::PROTOCOL_VERSION.into(),
                    replica: ReplicaId::from_bytes([2; 16]),
                    token: Some(token.clone()),
                    scope: WireScope::All,
                };
                (hello, "second Hello".into())
            }
            88..93 => (
                Message::Ping {
                    nonce: self.rng.below(1 << 62),
                },
                "Ping".into(),
            ),
            93..95 => (
                Message::Pong {
                    nonce: self.rng.below(1 << 62),
                },
                "Pong".into(),
            ),
            95..99 => {
                // A valid frame with bytes changed, mostly after the header.
                let inner = self.frame(tokens);
                let Outgoing::Binary(bytes) = inner.frame else {
                    return inner;
                };
                let keep = if self.rng.chance(9, 10) { 3 } else { 0 };
                let (bytes, how) = self.mutate(bytes, keep);
                return Planned {
                    label: format!("mutated frame ({how}) of {}", inner.label),
                    frame: Outgoing::Binary(bytes),
                };
            }
            _ => {
                return Planned {
                    label: "text frame".into(),
                    frame: Outgoing::Text("{\"Entries\":{}}".into()),
                };
            }
        };
        Planned {
            label,
            frame: Outgoing::Binary(protocol::encode(&message)),
        }
    }

    fn sequence(&mut self, tokens: &Tokens) -> Sequence {
        let kind = KINDS[self.rng.below(KINDS.len() as u64) as usize];
        let opening = opening(kind, tokens, self.rng);
        let n = self.rng.range(1, 6);
        let mut frames: Vec<Planned> = (0..n).map(|_| self.frame(tokens)).collect();
        // Without a Hello the first frame must not be one (a valid token in it would open a
        // session this sequence's grant does not describe).
        while opening.hello.is_none() && opens_a_session(&frames[0]) {
            frames[0] = self.frame(tokens);
        }
        let mut named = BTreeSet::new();
        for f in &frames {
            if let Outgoing::Binary(bytes) = &f.frame
                && let Ok(message) = protocol::decode(bytes, protocol::DEFAULT_MAX_FRAME)
            {
                named.extend(ids_in(&message));
            }
        }
        Sequence {
            kind,
            opening,
            frames,
            named,
        }
    }
}

/// Runs the sync protocol between `ours` (edited) and a copy of `base` until our side sends
/// changes; that message, encoded (or the last one, if it never does).
fn protocol_change(ours: Automerge, base: &Automerge) -> Vec<u8> {
    let mut ours = ours;
    let mut theirs = base.clone();
    let (mut our_state, mut their_state) = (sync::State::new(), sync::State::new());
    let mut last = Vec::new();
    for _ in 0..4 {
        let Some(message) = ours.generate_sync_message(&mut our_state) else {
            break;
        };
        if !message.changes.is_empty() {
            return message.encode();
        }
        last = message.clone().encode();
        theirs
            .receive_sync_message(&mut their_state, message)
            .unwrap();
        if let Some(reply) = theirs.generate_sync_message(&mut their_state) {
            ours.receive_sync_message(&mut our_state, reply).unwrap();
        }
    }
    last
}

fn opens_a_session(planned: &Planned) -> bool {
    matches!(&planned.frame, Outgoing::Binary(bytes)
        if matches!(protocol::decode(bytes, protocol::DEFAULT_MAX_FRAME), Ok(Message::Hello { .. })))
}

/// The document ids a message names.
fn ids_in(message: &Message) -> Vec<DocumentId> {
    match message {
        Message::Sync { batch } => batch.iter().map(|i| i.id).collect(),
        Message::Entries { entries, .. } => entries.iter().map(|e| e.id).collect(),
        Message::Persisted { docs } => docs.iter().map(|d| d.0).collect(),
        Message::Error { doc, .. } => doc.iter().copied().collect(),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Playing a sequence and checking it.

#[derive(Default)]
struct Played {
    /// Every frame the relay sent, in order, with the number of frames sent before it
    /// arrived.
    received: Vec<(usize, Message)>,
    /// The relay's close reason, if it closed.
    closed: Option<String>,
    /// Frames the relay sent that do not decode.
    undecodable: usize,
    /// The frame after which the relay stopped answering.
    unresponsive: Option<usize>,
    /// The first frame after which each document was in a state it must not be in:
    /// (frame, id, before, after).
    writes: Vec<(usize, DocumentId, Option<Stored>, Option<Stored>)>,
    /// Frames actually sent.
    sent: usize,
}

enum Until {
    Pong,
    Closed,
    TimedOut,
}

/// Reads frames into `played` until the Pong `nonce` (or, with `None`, until the connection
/// ends).
async fn read_until(ws: &mut Raw, nonce: Option<u64>, played: &mut Played) -> Until {
    loop {
        let next = match timeout(LIMIT, ws.next()).await {
            Err(_) => return Until::TimedOut,
            Ok(next) => next,
        };
        match next {
            Some(Ok(WsMessage::Binary(bytes))) => {
                match protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME) {
                    Ok(Message::Pong { nonce: n }) if Some(n) == nonce => return Until::Pong,
                    Ok(message) => played.received.push((played.sent, message)),
                    Err(_) => played.undecodable += 1,
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                if played.closed.is_none() {
                    played.closed = Some(frame.map_or_else(
                        || "no close frame".to_owned(),
                        |f| format!("{} {}", u16::from(f.code), f.reason),
                    ));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                if played.closed.is_none() {
                    played.closed = Some("connection dropped".into());
                }
                return Until::Closed;
            }
        }
    }
}

/// Documents in states the grant forbids, comparing `after` with `before`. Whatever the
/// grant, a document never disappears, never changes collection, and a tombstone is final.
fn forbidden_changes<'s>(
    grant: &Grant,
    before: &'s BTreeMap<DocumentId, Option<Stored>>,
    after: &'s BTreeMap<DocumentId, Option<Stored>>,
) -> impl Iterator<Item = (DocumentId, &'s Option<Stored>, &'s Option<Stored>)> {
    after.iter().filter_map(move |(id, a)| {
        let b = before.get(id).unwrap_or(&None);
        let allowed = match (b, a) {
            _ if a == b => true,
            (_, None) => false,
            (None, Some(a)) => grant.writes(&a.collection),
            (Some(b), Some(a)) => {
                !b.deleted && a.collection == b.collection && grant.writes(&b.collection)
            }
        };
        (!allowed).then_some((*id, b, a))
    })
}

async fn play(
    relay: &Relay,
    seq: &Sequence,
    ids: &BTreeSet<DocumentId>,
    before: &BTreeMap<DocumentId, Option<Stored>>,
) -> Played {
    let mut played = Played::default();
    let mut ws = connect(&relay.url()).await;
    let grant = &seq.opening.grant;
    let mut seen = BTreeSet::new();
    // Without a valid token, everything goes out at once: frames right behind a refused Hello
    // must not be applied either.
    let pipelined = seq.kind == Kind::None;
    let mut open = true;
    if let Some(hello) = &seq.opening.hello {
        let _ = ws
            .send(WsMessage::Binary(protocol::encode(hello).into()))
            .await;
        if !pipelined {
            let _ = ws
                .send(WsMessage::Binary(
                    protocol::encode(&Message::Ping { nonce: MARK }).into(),
                ))
                .await;
            match read_until(&mut ws, Some(MARK), &mut played).await {
                Until::Pong => {}
                Until::Closed => open = false,
                Until::TimedOut => {
                    played.unresponsive = Some(0);
                    open = false;
                }
            }
        }
    }
    for (i, planned) in seq.frames.iter().enumerate() {
        if !open && !pipelined {
            break;
        }
        let ws_frame = match &planned.frame {
            Outgoing::Binary(b) => WsMessage::Binary(b.clone().into()),
            Outgoing::Text(t) => WsMessage::Text(t.clone().into()),
        };
        if ws.send(ws_frame).await.is_err() {
            break;
        }
        played.sent += 1;
        if pipelined {
            continue;
        }
        let nonce = MARK | (i as u64 + 1);
        let pinged = ws
            .send(WsMessage::Binary(
                protocol::encode(&Message::Ping { nonce }).into(),
            ))
            .await
            .is_ok();
        let until = if pinged {
            read_until(&mut ws, Some(nonce), &mut played).await
        } else {
            Until::Closed
        };
        match until {
            Until::Pong => {}
            Until::Closed => open = false,
            Until::TimedOut => {
                played.unresponsive = Some(i);
                open = false;
            }
        }
        let now = relay.snapshot(ids);
        for (id, b, a) in forbidden_changes(grant, before, &now) {
            if seen.insert(id) {
                played.writes.push((i, id, b.clone(), a.clone()));
            }
        }
    }
    if pipelined {
        let nonce = MARK | 1;
        let _ = ws
            .send(WsMessage::Binary(
                protocol::encode(&Message::Ping { nonce }).into(),
            ))
            .await;
        if let Until::TimedOut = read_until(&mut ws, Some(nonce), &mut played).await {
            played.unresponsive = Some(0);
        }
    }
    // Close and read whatever the relay still sends until the connection ends.
    let relay_closed = played.closed.is_some();
    let _ = timeout(LIMIT, ws.close(None)).await;
    if let Until::TimedOut = read_until(&mut ws, None, &mut played).await {
        played.unresponsive.get_or_insert(seq.frames.len());
    }
    if !relay_closed {
        // The close was ours.
        played.closed = None;
    }
    let last = seq.frames.len().saturating_sub(1);
    let now = relay.snapshot(ids);
    for (id, b, a) in forbidden_changes(grant, before, &now) {
        if seen.insert(id) {
            played.writes.push((last, id, b.clone(), a.clone()));
        }
    }
    played
}

/// What a received frame reveals about documents the session may not read: one line each.
fn leaks(
    relay: &Relay,
    collections: &mut BTreeMap<DocumentId, String>,
    seq: &Sequence,
    played: &Played,
    label: impl Fn(&DocumentId) -> String,
) -> Vec<(String, String)> {
    let grant = &seq.opening.grant;
    let mut out = Vec::new();
    let mut welcomed = Vec::new();
    // (id, what names it, whether an id the session sent may be echoed)
    let mut check = |id: &DocumentId, what: String, echo_ok: bool, after: usize| {
        if echo_ok && seq.named.contains(id) {
            return;
        }
        // A document's collection never changes: read it once.
        let collection = match collections.get(id) {
            Some(c) => Some(c.clone()),
            None => relay.stored(id).map(|s| {
                collections.insert(*id, s.collection.clone());
                s.collection
            }),
        };
        if let Some(collection) = collection
            && !grant.reads(&collection)
        {
            out.push((
                format!("{what} about a document of {}", group(&collection)),
                format!(
                    "{what} about {} ({id}, now {}), after {after} frames",
                    label(id),
                    show(&relay.stored(id))
                ),
            ));
        }
    };
    for (after, message) in &played.received {
        let after = *after;
        match message {
            Message::Sync { batch } => {
                for item in batch {
                    let what = match &item.payload {
                        Payload::Sync(_) => "Sync(sync message)",
                        Payload::Whole(_) => "Sync(Whole)",
                        Payload::Want => "Sync(Want)",
                        Payload::Tombstone => "Sync(Tombstone)",
                    };
                    let what = format!("{what} claiming {}", group(&item.collection));
                    check(&item.id, what, false, after);
                }
            }
            Message::Entries { entries, .. } => {
                for e in entries {
                    check(&e.id, "Entries entry".into(), false, after);
                }
            }
            Message::Persisted { docs } => {
                for (id, _) in docs {
                    check(id, "Persisted".into(), false, after);
                }
            }
            Message::Error { doc: Some(id), .. } => check(id, "Error".into(), true, after),
            Message::Welcome { .. } if seq.kind == Kind::None => {
                welcomed.push((
                    "Welcome without a valid token".into(),
                    format!("{message:?}"),
                ));
            }
            _ => {}
        }
    }
    out.extend(welcomed);
    out
}

/// Violations, grouped by kind; the first sequence of each kind is kept for the report.
#[derive(Default)]
struct Findings {
    kinds: BTreeMap<String, (usize, String)>,
}

impl Findings {
    fn add(&mut self, kind: String, example: impl FnOnce() -> String) {
        self.kinds
            .entry(kind)
            .and_modify(|(n, _)| *n += 1)
            .or_insert_with(|| (1, example()));
    }

    fn total(&self) -> usize {
        self.kinds.values().map(|(n, _)| n).sum()
    }
}

/// The kind of frame a label names ("Sync", "Entries(the issue's tombstone ...)", ...).
fn frame_kind(label: &str) -> String {
    if let Some(rest) = label.strip_prefix("mutated frame") {
        let inner = rest.split_once(" of ").map_or("", |(_, inner)| inner);
        return format!("mutated {}", frame_kind(inner));
    }
    if label.starts_with("Entries(the issue") {
        return "Entries (the issue's frame)".into();
    }
    label
        .split(['[', '(', '{'])
        .next()
        .unwrap_or(label)
        .to_owned()
}

/// A collection as violation kinds name it: the generated names vary (mutated frames), the
/// examples show them.
fn group(collection: &str) -> &str {
    match collection {
        A | B => collection,
        _ => "another collection",
    }
}

/// What a forbidden change did, in words.
fn effect(before: &Option<Stored>, after: &Option<Stored>) -> String {
    match (before, after) {
        (None, Some(a)) if a.deleted => {
            format!(
                "stored a tombstone for an unknown id in {}",
                group(&a.collection)
            )
        }
        (None, Some(a)) => format!("created a document in {}", group(&a.collection)),
        (Some(b), None) => format!("removed a document of {}", group(&b.collection)),
        (Some(b), Some(a)) if a.collection != b.collection => {
            format!(
                "moved a document from {} to {}",
                group(&b.collection),
                group(&a.collection)
            )
        }
        (Some(b), Some(a)) if a.deleted && !b.deleted => {
            format!("deleted a document of {}", group(&b.collection))
        }
        (Some(b), Some(a)) if !a.deleted && b.deleted => {
            format!("revived a deleted document of {}", group(&b.collection))
        }
        (Some(b), Some(_)) if b.deleted => {
            format!(
                "changed the heads of a deleted document of {}",
                group(&b.collection)
            )
        }
        (Some(b), Some(_)) => format!(
            "changed the heads of a document of {}",
            group(&b.collection)
        ),
        (None, None) => "nothing".into(),
    }
}

/// A close reason without its variable parts (numbers after the close code).
fn normalize(reason: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for (i, c) in reason.char_indices() {
        if c.is_ascii_digit() && i > 4 {
            if !digits {
                out.push('#');
            }
            digits = true;
        } else {
            digits = false;
            out.push(c);
        }
    }
    out
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().map_or(default, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// A relay with its well-behaved clients.
struct World {
    relay: Relay,
    admin: Admin,
    tokens: Tokens,
    clients: Clients,
    /// The stored collection of every document the leak check looked up.
    collections: BTreeMap<DocumentId, String>,
}

impl World {
    async fn start(rng: &mut SplitMix64) -> World {
        let mut relay = Relay::start().await;
        let admin = Admin::new(&relay, rng.next_u64());
        // The first sync creates the relay's file.
        admin.synced(&relay).await.close().await;
        relay.open_db();
        World {
            tokens: Tokens::new(&relay),
            clients: Clients::new(&relay),
            admin,
            relay,
            collections: BTreeMap::new(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_model() {
    let seed = crate::support::seed("adversary_model");
    let sequences = env_usize("WEFT_ADVERSARY_SEQUENCES", 500);
    let progress = env_usize("WEFT_ADVERSARY_PROGRESS", 1000).max(1);
    let relay_every = env_usize("WEFT_ADVERSARY_RELAY_EVERY", 5000).max(RESEED_EVERY);
    let mut rng = SplitMix64::new(seed);
    let mut world = World::start(&mut rng).await;
    let mut universe = world.admin.generation(&world.relay, &mut rng, 0).await;
    let mut findings = Findings::default();
    // Why the relay closed sessions: how often, and the first sequence.
    let mut closes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut frames_sent, mut frames_received) = (0, 0);
    let started = Instant::now();
    let replay = |i: usize| {
        format!(
            "replay: WEFT_SEED={seed} WEFT_ADVERSARY_SEQUENCES={} cargo test --test it adversary::adversary_model",
            i + 1
        )
    };
    for i in 0..sequences {
        let new_world = i > 0 && i % relay_every == 0;
        if new_world {
            // A new relay now and then keeps the catalog (and so each sequence's cost) bounded.
            world = World::start(&mut rng).await;
        }
        if new_world || i > 0 && i % RESEED_EVERY == 0 {
            universe = world
                .admin
                .generation(&world.relay, &mut rng, i / RESEED_EVERY)
                .await;
        }
        let World {
            relay,
            tokens,
            clients,
            collections,
            ..
        } = &mut world;
        let relay = &*relay;
        let mut ids = universe.ids();
        let before = relay.snapshot(&ids);
        let seq = Gen {
            rng: &mut rng,
            u: &universe,
            before: &before,
        }
        .sequence(tokens);
        ids.extend(seq.named.iter().copied());
        let before: BTreeMap<_, _> = ids
            .iter()
            .map(|id| {
                (
                    *id,
                    before.get(id).cloned().unwrap_or_else(|| relay.stored(id)),
                )
            })
            .collect();
        let mark = relay.last_seq();
        let played = play(relay, &seq, &ids, &before).await;
        frames_sent += played.sent;
        frames_received += played.received.len();
        if let Some(reason) = &played.closed {
            closes.entry(normalize(reason)).or_insert((0, i)).0 += 1;
        }
        let example = |what: String| {
            format!(
                "sequence {i}: {what}\n    {}    {}",
                seq.describe(),
                replay(i)
            )
        };
        for (frame, id, b, a) in &played.writes {
            let kind = format!(
                "write: {:?} {} via {}",
                seq.kind,
                effect(b, a),
                frame_kind(&seq.frames[*frame].label)
            );
            findings.add(kind, || {
                example(format!(
                    "after frame #{frame}, {} ({id}) went from {} to {}",
                    universe.label(id),
                    show(b),
                    show(a)
                ))
            });
        }
        // Writes to documents the sequence never named (none expected at all).
        for (id, stored) in relay.written_since(mark) {
            if !ids.contains(&id) && !seq.opening.grant.writes(&stored.collection) {
                findings.add(
                    format!("write: {:?} changed a document it did not name", seq.kind),
                    || example(format!("{} ({id}) is now {stored}", universe.label(&id))),
                );
            }
        }
        for (kind, detail) in leaks(relay, collections, &seq, &played, |id| universe.label(id)) {
            findings.add(format!("leak: {:?} received {kind}", seq.kind), || {
                example(detail)
            });
        }
        if let Some(frame) = played.unresponsive {
            let label = seq.frames.get(frame).map_or("-", |f| f.label.as_str());
            findings.add(
                format!(
                    "unresponsive: no Pong or close within {LIMIT:?} after {}",
                    frame_kind(label)
                ),
                || example(format!("after frame #{frame}")),
            );
        }
        if played.undecodable > 0 {
            findings.add("the relay sent frames that do not decode".into(), || {
                example(format!("{} frames", played.undecodable))
            });
        }
        if let Err(e) = relay.serves(&tokens.read_write_all).await {
            panic!(
                "the relay no longer serves a well-behaved session: {e}\n{}",
                example(String::new())
            );
        }
        if ((i + 1) % CLIENTS_EVERY == 0 || i + 1 == sequences)
            && let Err(e) = clients.check(relay).await
        {
            panic!(
                "the relay no longer serves library clients: {e}\n{}",
                example(String::new())
            );
        }
        if (i + 1) % progress == 0 {
            eprintln!(
                "adversary_model: {} sequences in {:.1} s, {} violations",
                i + 1,
                started.elapsed().as_secs_f64(),
                findings.total()
            );
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "adversary_model: WEFT_SEED={seed}: {sequences} sequences, {frames_sent} frames sent, \
         {frames_received} received, in {:.1} s",
        elapsed.as_secs_f64()
    );
    eprintln!("the relay closed sessions (reason: count, first sequence):");
    for (reason, (n, first)) in &closes {
        eprintln!("  {reason}: {n}, first in sequence {first}");
    }
    if findings.kinds.is_empty() {
        return;
    }
    let mut report = format!(
        "{} violations of {} kinds (WEFT_SEED={seed}):\n",
        findings.total(),
        findings.kinds.len()
    );
    for (kind, (n, example)) in &findings.kinds {
        let _ = writeln!(report, "\n* {kind} ({n}x); first: {example}");
    }
    panic!("{report}");
}

/// A relay with one generation of the universe, for the focused tests.
async fn small_world() -> (Relay, Universe) {
    let mut relay = Relay::start().await;
    let admin = Admin::new(&relay, 1);
    admin.synced(&relay).await.close().await;
    relay.open_db();
    let universe = admin.generation(&relay, &mut SplitMix64::new(1), 0).await;
    (relay, universe)
}

/// A session with `token` sends `frame` and closes: what the relay sent back. The relay
/// applies a session's frames in order, so once the Pong (or the close) is here, `frame` has
/// been applied.
async fn exchange(relay: &Relay, token: &str, frame: &Message) -> Played {
    let (mut ws, welcome) = relay.raw(token).await;
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    send(&mut ws, frame).await;
    let mut played = Played::default();
    if ws
        .send(WsMessage::Binary(
            protocol::encode(&Message::Ping { nonce: MARK }).into(),
        ))
        .await
        .is_ok()
        && let Until::TimedOut = read_until(&mut ws, Some(MARK), &mut played).await
    {
        panic!("no Pong or close within {LIMIT:?}");
    }
    let closed = played.closed.clone();
    let _ = timeout(LIMIT, ws.close(None)).await;
    read_until(&mut ws, None, &mut played).await;
    // The relay's close, not ours.
    played.closed = closed;
    played
}

fn kinds(played: &Played) -> Vec<&'static str> {
    played.received.iter().map(|m| m.1.kind()).collect()
}

/// The frame from the issue: a session that may only read `alpha` sends one reconciliation
/// frame claiming a tombstone, without ever sending a Summary. The relay must store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_tombstone_attack() {
    let (relay, universe) = small_world().await;
    // An alpha document with history, and an id the relay has never seen.
    let existing = universe
        .docs
        .iter()
        .find(|d| d.label == "g0.a1")
        .unwrap()
        .id;
    let fresh = universe.fresh[0].0;
    let token = relay.token(A, "");
    let mut failures = Vec::new();
    for (what, id) in [
        ("an existing alpha document", existing),
        ("a fresh id", fresh),
    ] {
        let before = relay.stored(&id);
        // No Summary first: this Entries answers nothing the relay asked.
        let attack = Message::Entries {
            buckets: vec![bucket_of(&id)],
            entries: vec![CatalogEntry {
                id,
                collection: A.into(),
                digest: doc_digest(&id, &[], true),
                deleted: true,
            }],
        };
        let played = exchange(&relay, &token, &attack).await;
        let after = relay.stored(&id);
        if after != before {
            failures.push(format!(
                "{what}: a read-only alpha session's Entries frame changed it from {} to {} \
                 (the relay answered {:?}, closed: {:?})",
                show(&before),
                show(&after),
                kinds(&played),
                played.closed
            ));
        }
    }
    relay
        .serves(&relay.token("*", "*"))
        .await
        .expect("the relay still serves");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Found by `adversary_model`: a sync item naming a *deleted* document of a collection the
/// session may not read, while claiming one it may, is answered with a `Tombstone` for it
/// (Want, a sync message, a whole document): the relay tells who asks that the document
/// exists and is deleted. Nothing may name that document to this session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_documents_of_other_collections_stay_unseen() {
    let (relay, universe) = small_world().await;
    // g0.b2: synced, then deleted; g0.b3: deleted before the relay saw it.
    let deleted: Vec<(&str, DocumentId)> = ["g0.b2", "g0.b3"]
        .iter()
        .map(|l| (*l, universe.docs.iter().find(|d| d.label == *l).unwrap().id))
        .collect();
    let mut new_doc = Automerge::new();
    new_doc.transaction().put(ROOT, "new", 1).unwrap();
    let heads_only = new_doc
        .generate_sync_message(&mut sync::State::new())
        .unwrap()
        .encode();
    let read_alpha = relay.token(A, "");
    let write_alpha = relay.token(A, A);
    let mut failures = Vec::new();
    for (label, id) in &deleted {
        let before = relay.stored(id);
        assert!(
            before.as_ref().is_some_and(|s| s.deleted),
            "{label}: {before:?}"
        );
        for (what, token, payload) in [
            ("Want", &read_alpha, Payload::Want),
            (
                "a sync message",
                &read_alpha,
                Payload::Sync(heads_only.clone()),
            ),
            (
                "a whole document",
                &write_alpha,
                Payload::Whole(new_doc.save()),
            ),
        ] {
            let frame = Message::Sync {
                batch: vec![SyncItem {
                    id: *id,
                    collection: A.into(),
                    payload,
                }],
            };
            let played = exchange(&relay, token, &frame).await;
            let named: Vec<String> = played
                .received
                .iter()
                .filter_map(|(_, m)| match m {
                    Message::Sync { batch } => Some(batch),
                    _ => None,
                })
                .flatten()
                .filter(|item| item.id == *id)
                .map(|item| format!("{:?} claiming {:?}", item.payload, item.collection))
                .collect();
            if !named.is_empty() {
                failures.push(format!(
                    "{what} for {label} (deleted, in beta) claiming alpha was answered with {named:?}"
                ));
            }
            assert_eq!(relay.stored(id), before, "{label} changed");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
