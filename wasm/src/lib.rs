//! weft for JavaScript: the native [`weft::Replica`] driver over an in-memory store
//! ([`MemStore`]), exported to JavaScript with wasm-bindgen as the class `Core`.
//!
//! The JS package (`wasm/js/`) wraps `Core`: it persists the store's journal to IndexedDB
//! after every call (a write is acknowledged once IndexedDB committed it), feeds it the
//! WebSocket frames of a relay session and sends the frames it produces. Everything here is
//! synchronous; the only IO is the JS side's. This module is the one place that converts
//! between Rust and JS values.

mod cbor;
mod convert;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use wasm_bindgen::prelude::*;
use weft::engine::{PeerEvent, PeerId};
use weft::protocol::{self, Message, WireScope};
use weft::store::mem::{Journal, MemStore};
use weft::{
    ChangeEvent, ChangeHash, Clock, HookGuard, Path as DocPath, Replica, ReplicaId, ReplicaOptions,
    Scope,
};

use convert::{JsResult, error, error_of, ids_to_js, to_js};

/// The JS value of CBOR bytes, as ephemeral data is decoded (tests; throws code "BadCbor").
#[wasm_bindgen(js_name = decodeCbor)]
pub fn decode_cbor(bytes: &[u8]) -> JsResult<JsValue> {
    cbor::decode(bytes)
}

/// The CBOR bytes of a JS value, as `broadcast` encodes ephemeral data (tests).
#[wasm_bindgen(js_name = encodeCbor)]
pub fn encode_cbor(value: JsValue) -> JsResult<Vec<u8>> {
    cbor::encode(&value)
}

/// The weft version this package was built from.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

type Shared<T> = Arc<Mutex<Vec<T>>>;

fn take<T>(shared: &Shared<T>) -> Vec<T> {
    std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()))
}

thread_local! {
    /// Clock functions passed from JS (`Core.open({ now })`), one per Core that has one: the
    /// replica's clock must be `Send`, a JS function is not, so it holds the index.
    static JS_CLOCKS: std::cell::RefCell<Vec<js_sys::Function>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A replica in wasm memory. See the module docs.
#[wasm_bindgen]
pub struct Core {
    replica: Replica,
    journal: Journal,
    frames: Shared<(PeerId, Message)>,
    session_events: Shared<(PeerId, PeerEvent)>,
    events: Shared<ChangeEvent>,
    /// A manual clock (`Core.open({ now: <number> })`), moved by `setNow`.
    manual_now: Option<Arc<AtomicI64>>,
    next_peer: u64,
    /// The engine's limits, which JS values are checked against before conversion.
    limits: weft::Limits,
    _hook: HookGuard,
}

#[wasm_bindgen]
impl Core {
    /// Opens a replica: `{ seed?, now?, records? }`. `records` (`[table, key, bytes]` triples
    /// read back from storage) restore a replica; without them it is new. `now` is a function
    /// returning milliseconds since the epoch, or a number for a manual clock (`setNow`);
    /// `Date.now` by default. `seed` fixes the engine's random choices (ids, actors) and a new
    /// replica's id — for replays and tests.
    pub fn open(options: JsValue) -> JsResult<Core> {
        let get = |name: &str| js_sys::Reflect::get(&options, &JsValue::from_str(name)).ok();
        let seed = get("seed").and_then(|v| v.as_f64()).map(|s| s as u64);
        let mut manual_now = None;
        let clock = match get("now") {
            Some(v) if v.is_function() => {
                let index = JS_CLOCKS.with(|c| {
                    let mut clocks = c.borrow_mut();
                    clocks.push(js_sys::Function::from(v));
                    clocks.len() - 1
                });
                Clock::from_fn(move || {
                    JS_CLOCKS.with(|c| {
                        c.borrow()
                            .get(index)
                            .and_then(|f| f.call0(&JsValue::NULL).ok())
                            .and_then(|v| v.as_f64())
                            .map_or_else(|| js_sys::Date::now() as i64, |ms| ms as i64)
                    })
                })
            }
            Some(v) if v.as_f64().is_some() => {
                let now = Arc::new(AtomicI64::new(v.as_f64().unwrap_or(0.0) as i64));
                manual_now = Some(now.clone());
                Clock::from_fn(move || now.load(Ordering::SeqCst))
            }
            _ => Clock::from_fn(|| js_sys::Date::now() as i64),
        };
        let records = match get("records") {
            Some(v) if !v.is_undefined() && !v.is_null() => convert::records_from_js(&v)?,
            _ => Vec::new(),
        };
        let store = match MemStore::restore(records).map_err(|e| error("Storage", &e))? {
            Some(store) => store,
            None => MemStore::new(new_replica_id(seed)?),
        };
        let journal = store.journal();
        let replica = Replica::with_store(
            Box::new(store),
            PathBuf::from(":memory:"),
            ReplicaOptions {
                seed,
                clock,
                ..ReplicaOptions::default()
            },
        )
        .map_err(|e| error_of(&e))?;
        let frames: Shared<(PeerId, Message)> = Shared::default();
        let session_events: Shared<(PeerId, PeerEvent)> = Shared::default();
        let (f, s) = (frames.clone(), session_events.clone());
        replica.set_transport(move |send, events| {
            f.lock().unwrap_or_else(|p| p.into_inner()).extend(send);
            s.lock().unwrap_or_else(|p| p.into_inner()).extend(events);
            Vec::new()
        });
        let events: Shared<ChangeEvent> = Shared::default();
        let e = events.clone();
        let hook = replica.on_change(Scope::All, move |event| {
            e.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(event.clone())
        });
        Ok(Core {
            replica,
            journal,
            frames,
            session_events,
            events,
            manual_now,
            next_peer: 1,
            limits: weft::Limits::default(),
            _hook: hook,
        })
    }

    /// Moves a manual clock (see `open`).
    #[wasm_bindgen(js_name = setNow)]
    pub fn set_now(&self, ms: f64) {
        if let Some(now) = &self.manual_now {
            now.store(ms as i64, Ordering::SeqCst);
        }
    }

    #[wasm_bindgen(js_name = replicaId)]
    pub fn replica_id(&self) -> String {
        self.replica.replica_id().to_string()
    }

    // ----- documents ----------------------------------------------------------------------

    pub fn create(&self, collection: &str, body: JsValue) -> JsResult<String> {
        let body = convert::json_from_js(body, "body", &self.limits)?;
        let id = self
            .replica
            .create(collection, body)
            .map_err(|e| error_of(&e))?;
        Ok(id.to_string())
    }

    pub fn get(&self, id: &str) -> JsResult<JsValue> {
        let doc = self.replica.get(&parse_id(id)?).map_err(|e| error_of(&e))?;
        convert::document(&doc)
    }

    pub fn update(&self, id: &str, patch: JsValue) -> JsResult<JsValue> {
        let patch = convert::json_from_js(patch, "patch", &self.limits)?;
        let heads = self
            .replica
            .update(&parse_id(id)?, patch)
            .map_err(|e| error_of(&e))?;
        Ok(ids_to_js(&heads))
    }

    pub fn set(&self, id: &str, pointer: &str, value: JsValue) -> JsResult<JsValue> {
        let value = convert::json_from_js(value, "value", &self.limits)?;
        let path = DocPath::from_pointer(pointer).map_err(|e| error("BadPath", &e))?;
        let heads = self
            .replica
            .set(&parse_id(id)?, &path, value)
            .map_err(|e| error_of(&e))?;
        Ok(ids_to_js(&heads))
    }

    /// Makes the value at `pointer` collaborative text holding `text` (or updates it with a
    /// character diff if it is text already); `splice` then edits it.
    #[wasm_bindgen(js_name = setText)]
    pub fn set_text(&self, id: &str, pointer: &str, text: &str) -> JsResult<JsValue> {
        let path = DocPath::from_pointer(pointer).map_err(|e| error("BadPath", &e))?;
        let heads = self
            .replica
            .set_text(&parse_id(id)?, &path, text)
            .map_err(|e| error_of(&e))?;
        Ok(ids_to_js(&heads))
    }

    pub fn splice(
        &self,
        id: &str,
        pointer: &str,
        index: u32,
        delete: u32,
        text: &str,
    ) -> JsResult<JsValue> {
        let path = DocPath::from_pointer(pointer).map_err(|e| error("BadPath", &e))?;
        let heads = self
            .replica
            .splice(&parse_id(id)?, &path, index as usize, delete as usize, text)
            .map_err(|e| error_of(&e))?;
        Ok(ids_to_js(&heads))
    }

    pub fn delete(&self, id: &str) -> JsResult<()> {
        self.replica
            .delete(&parse_id(id)?)
            .map_err(|e| error_of(&e))
    }

    /// Live documents, in creation order: of one collection (or all), matching a filter
    /// (`"done = false"`, the CLI's `--where` syntax), at most `limit`.
    pub fn list(
        &self,
        collection: Option<String>,
        filter: Option<String>,
        limit: Option<u32>,
    ) -> JsResult<JsValue> {
        let filter = filter
            .map(|f| weft::Filter::parse(&f))
            .transpose()
            .map_err(|e| error_of(&e))?;
        let query = weft::Query {
            collection,
            filter,
            limit: limit.map(|l| l as usize),
        };
        let docs = self.replica.query(&query).map_err(|e| error_of(&e))?;
        let out = js_sys::Array::new();
        for doc in &docs {
            out.push(&convert::document(doc)?);
        }
        Ok(out.into())
    }

    /// Whether this replica holds a write another tab made: document `id` with every one of
    /// `heads`, or (`deleted`) its tombstone. A document deleted here holds any edit of it
    /// (the delete wins, so the edit's outcome is settled). Unknown hashes, an unknown
    /// document or malformed input answer false or throw; nothing changes either way.
    pub fn holds(&self, id: &str, heads: Vec<String>, deleted: bool) -> JsResult<bool> {
        let id = parse_id(id)?;
        let mut hashes = Vec::with_capacity(heads.len());
        for head in &heads {
            hashes.push(
                head.parse::<ChangeHash>()
                    .map_err(|e| error("InvalidArgument", &format!("head {head:?}: {e}")))?,
            );
        }
        match self.replica.get_at(&id, &hashes) {
            Ok(_) => Ok(!deleted),
            Err(weft::Error::Deleted(_)) => Ok(true),
            Err(weft::Error::NotFound(_) | weft::Error::UnknownHeads { .. }) => Ok(false),
            Err(e) => Err(error_of(&e)),
        }
    }

    /// Change-feed entries after `since`, oldest first.
    pub fn changes(&self, since: f64, limit: Option<u32>) -> JsResult<JsValue> {
        let limit = limit.map_or(usize::MAX, |l| l as usize);
        let events = self
            .replica
            .changes_since(since as u64, limit, None)
            .map_err(|e| error_of(&e))?;
        convert::events(&events)
    }

    #[wasm_bindgen(js_name = lastSeq)]
    pub fn last_seq(&self) -> f64 {
        self.replica.last_seq() as f64
    }

    /// Every document and tombstone as a bundle; with `since`, only those changed after that
    /// change-feed sequence number.
    #[wasm_bindgen(js_name = exportBundle)]
    pub fn export_bundle(&self, since: Option<f64>) -> JsResult<Vec<u8>> {
        let scope = match since {
            Some(seq) => weft::BundleScope::Since(seq as u64),
            None => weft::BundleScope::All,
        };
        self.replica.export_bundle(&scope).map_err(|e| error_of(&e))
    }

    #[wasm_bindgen(js_name = importBundle)]
    pub fn import_bundle(&self, bytes: &[u8]) -> JsResult<JsValue> {
        let report = self
            .replica
            .import_bundle(bytes)
            .map_err(|e| error_of(&e))?;
        to_js(&serde_json::json!({
            "created": report.created,
            "updated": report.updated,
            "deleted": report.deleted,
            "unchanged": report.unchanged,
        }))
    }

    // ----- what the JS side must act on ---------------------------------------------------

    /// Storage records committed since the last call, to apply in order in one transaction.
    #[wasm_bindgen(js_name = takeJournal)]
    pub fn take_journal(&self) -> JsValue {
        convert::journal(self.journal.drain())
    }

    /// Committed changes (local and remote) since the last call.
    #[wasm_bindgen(js_name = takeEvents)]
    pub fn take_events(&self) -> JsResult<JsValue> {
        convert::events(&take(&self.events))
    }

    // ----- relay sessions -----------------------------------------------------------------

    /// The first frame of a session: `Hello` with a token and the collections to sync (all
    /// when null).
    #[wasm_bindgen(js_name = helloFrame)]
    pub fn hello_frame(&self, token: Option<String>, collections: Option<Vec<String>>) -> Vec<u8> {
        protocol::encode(&Message::Hello {
            protocol: u16::from(protocol::PROTOCOL_VERSION),
            replica: self.replica.replica_id(),
            token,
            scope: match collections {
                None => WireScope::All,
                Some(c) => WireScope::Collections(c),
            },
        })
    }

    /// A protocol `Ping` for a session's keepalive (the relay answers `Pong`).
    #[wasm_bindgen(js_name = pingFrame)]
    pub fn ping_frame(&self, nonce: f64) -> Vec<u8> {
        protocol::encode(&Message::Ping {
            nonce: nonce as u64,
        })
    }

    /// Decodes the relay's answer to `Hello`: `{kind: "welcome", relay, collections}` or
    /// `{kind: "reject", code, reason}`.
    pub fn handshake(&self, frame: &[u8]) -> JsResult<JsValue> {
        match protocol::decode(frame, protocol::DEFAULT_MAX_FRAME) {
            Ok(Message::Welcome { replica, scope, .. }) => to_js(&serde_json::json!({
                "kind": "welcome",
                "relay": replica.to_string(),
                "collections": match scope {
                    WireScope::All => None,
                    WireScope::Collections(c) => Some(c),
                },
            })),
            Ok(Message::Reject { code, reason }) => to_js(&serde_json::json!({
                "kind": "reject",
                "code": code.as_str(),
                "reason": reason,
            })),
            Ok(other) => Err(error(
                "Protocol",
                &format!("expected Welcome or Reject, got {}", other.kind()),
            )),
            Err(e) => Err(error("Protocol", &e)),
        }
    }

    /// Starts the replication session after `Welcome`; returns its peer number.
    #[wasm_bindgen(js_name = openSession)]
    pub fn open_session(&mut self, relay: &str, collections: Option<Vec<String>>) -> JsResult<f64> {
        let remote: ReplicaId = relay
            .parse()
            .map_err(|e| error("Protocol", &format!("relay id: {e}")))?;
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        let scope = match collections {
            None => Scope::All,
            Some(c) => Scope::Collections(c),
        };
        self.replica.peer_connected(peer, remote, scope, true);
        Ok(peer.0 as f64)
    }

    /// Accepts a session from another replica as the responder (what the relay does): for
    /// replica-to-replica links in tests and simulations. Returns its peer number.
    #[wasm_bindgen(js_name = acceptSession)]
    pub fn accept_session(&mut self, remote: &str) -> JsResult<f64> {
        let remote: ReplicaId = remote
            .parse()
            .map_err(|e| error("Protocol", &format!("replica id: {e}")))?;
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        self.replica.peer_connected(peer, remote, Scope::All, false);
        Ok(peer.0 as f64)
    }

    /// A frame from the relay on session `peer`. A protocol `Ping` is answered (the `Pong`
    /// comes out of `takeFrames`); a frame that does not decode throws (close the socket).
    pub fn receive(&self, peer: f64, frame: &[u8]) -> JsResult<()> {
        let peer = PeerId(peer as u64);
        match protocol::decode(frame, protocol::DEFAULT_MAX_FRAME) {
            Ok(Message::Ping { nonce }) => {
                self.frames
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((peer, Message::Pong { nonce }));
                Ok(())
            }
            Ok(Message::Pong { .. }) => Ok(()),
            Ok(
                message
                @ (Message::Hello { .. } | Message::Welcome { .. } | Message::Reject { .. }),
            ) => Err(error(
                "Protocol",
                &format!("unexpected {} during a session", message.kind()),
            )),
            Ok(message) => {
                self.replica.peer_message(peer, message);
                Ok(())
            }
            Err(e) => Err(error("Protocol", &e)),
        }
    }

    /// Frames to send: `[peer, bytes]` pairs, in order.
    #[wasm_bindgen(js_name = takeFrames)]
    pub fn take_frames(&self) -> JsValue {
        let out = js_sys::Array::new();
        for (peer, message) in take(&self.frames) {
            let pair = js_sys::Array::new();
            pair.push(&JsValue::from_f64(peer.0 as f64));
            pair.push(&js_sys::Uint8Array::from(
                protocol::encode(&message).as_slice(),
            ));
            out.push(&pair);
        }
        out.into()
    }

    /// Session events since the last call: `{peer, kind: "insync" | "persisted" | "error" |
    /// "ephemeral" | "closed", code?, message?, doc?}`; "ephemeral" has `bytes` (the CBOR as
    /// sent) and `data` (decoded), or `error` (why the bytes did not decode) instead of `data`.
    #[wasm_bindgen(js_name = takeSessionEvents)]
    pub fn take_session_events(&self) -> JsResult<JsValue> {
        convert::session_events(take(&self.session_events))
    }

    /// Sends ephemeral data (presence, cursors) about document `id` to every session that may
    /// read it: `data` (JSON-compatible, or a `Uint8Array`) CBOR-encoded as automerge-repo's
    /// `handle.broadcast` does with cbor-x (see `cbor.rs`), at most 64 KiB encoded
    /// ("TooLarge"). Nothing is stored.
    /// Returns how many sessions it went to.
    pub fn broadcast(&self, id: &str, data: JsValue) -> JsResult<f64> {
        let id = parse_id(id)?;
        let bytes = cbor::encode(&data)?;
        if bytes.len() > protocol::MAX_EPHEMERAL_BYTES {
            return Err(error(
                "TooLarge",
                &format!(
                    "ephemeral data is {} bytes as CBOR; the limit is {}",
                    bytes.len(),
                    protocol::MAX_EPHEMERAL_BYTES
                ),
            ));
        }
        let sessions = self
            .replica
            .broadcast(&id, bytes)
            .map_err(|e| error_of(&e))?;
        Ok(sessions as f64)
    }

    /// The session's socket closed.
    #[wasm_bindgen(js_name = closeSession)]
    pub fn close_session(&self, peer: f64) {
        self.replica.peer_disconnected(PeerId(peer as u64));
    }

    /// Whether the engine wants a `tick` (a quiet session to re-check, idle documents to
    /// unload).
    #[wasm_bindgen(js_name = tickWanted)]
    pub fn tick_wanted(&self) -> bool {
        self.replica.tick_wanted()
    }

    pub fn tick(&self) -> JsResult<()> {
        self.replica.tick().map_err(|e| error_of(&e))
    }

    /// The documents in `scope` as a sorted list of `[id, heads]` (convergence checks).
    #[wasm_bindgen(js_name = allHeads)]
    pub fn all_heads(&self) -> JsResult<JsValue> {
        let mut out = Vec::new();
        for doc in self
            .replica
            .query(&weft::Query::default())
            .map_err(|e| error_of(&e))?
        {
            let mut heads: Vec<String> = doc.heads.iter().map(|h| h.to_string()).collect();
            heads.sort();
            out.push((doc.id.to_string(), heads));
        }
        out.sort();
        to_js(&out)
    }
}

fn parse_id(id: &str) -> JsResult<weft::DocumentId> {
    id.parse().map_err(|e| error_of(&e))
}

/// A new replica's id: from the seed when there is one (replays give the same ids), else
/// random.
fn new_replica_id(seed: Option<u64>) -> JsResult<ReplicaId> {
    match seed {
        Some(seed) => Ok(ReplicaId::from_seed(seed)),
        None => ReplicaId::random().map_err(|e| error("Random", &e)),
    }
}
