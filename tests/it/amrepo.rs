//! automerge-repo's protocol on `/automerge`, spoken by a raw client built from the protocol's
//! description (the real npm client is tested in `wasm/test/node/automerge-repo.test.mjs`):
//! the handshake, documents shared with weft replicas both ways, `doc-unavailable`, tokens on
//! the URL, ephemeral messages across the two protocols, and bad frames. Real relays on
//! 127.0.0.1; every wait is bounded.
#![cfg(feature = "net")]

use std::time::Duration;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT, ReadDoc};
use futures_util::StreamExt;
use minicbor::Encoder;
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use weft::protocol::amrepo::{self as wire, Outgoing};
use weft::{DocumentId, Replica};

use crate::support::relay::{LIMIT, Raw, Relay, connect, expect_close, send_raw};

/// A frame from the relay, read by the test's own small decoder (not weft's).
#[derive(Debug)]
enum FromRelay {
    Peer {
        target: String,
        version: String,
    },
    Sync {
        doc: DocumentId,
        data: Vec<u8>,
    },
    Unavailable {
        doc: DocumentId,
    },
    Ephemeral {
        doc: DocumentId,
        data: Vec<u8>,
        count: u64,
        sender: String,
    },
    Error {
        message: String,
    },
}

/// Reads the relay's frame with a generic CBOR walk (independent of weft's decoder).
fn from_relay(bytes: &[u8]) -> FromRelay {
    let mut d = minicbor::Decoder::new(bytes);
    let n = d.map().unwrap().expect("a definite map");
    let mut fields = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = d.str().unwrap().to_owned();
        let value = match d.datatype().unwrap() {
            minicbor::data::Type::String => d.str().unwrap().as_bytes().to_vec(),
            minicbor::data::Type::Bytes => d.bytes().unwrap().to_vec(),
            minicbor::data::Type::U8 | minicbor::data::Type::U16 | minicbor::data::Type::U32 => {
                d.u64().unwrap().to_string().into_bytes()
            }
            _ => {
                d.skip().unwrap();
                Vec::new()
            }
        };
        fields.insert(key, value);
    }
    let text = |k: &str| String::from_utf8(fields[k].clone()).unwrap();
    let doc = || text("documentId").parse::<DocumentId>().unwrap();
    match text("type").as_str() {
        "peer" => FromRelay::Peer {
            target: text("targetId"),
            version: text("selectedProtocolVersion"),
        },
        "sync" => FromRelay::Sync {
            doc: doc(),
            data: fields["data"].clone(),
        },
        "doc-unavailable" => FromRelay::Unavailable { doc: doc() },
        "ephemeral" => FromRelay::Ephemeral {
            doc: doc(),
            data: fields["data"].clone(),
            count: text("count").parse().unwrap(),
            sender: text("senderId"),
        },
        "error" => FromRelay::Error {
            message: text("message"),
        },
        other => panic!("unexpected message type {other}"),
    }
}

/// A raw automerge-repo client: its socket and peer id.
struct Client {
    ws: Raw,
    id: String,
}

impl Client {
    /// Connects to `/automerge` (with `?token=` if given) without joining.
    async fn connect(relay: &Relay, token: Option<&str>) -> Raw {
        let url = match token {
            Some(t) => format!("{}/automerge?token={t}", relay.url()),
            None => format!("{}/automerge", relay.url()),
        };
        connect(&url).await
    }

    /// Connects and joins; the relay must answer `peer`.
    async fn join(relay: &Relay, token: Option<&str>, storage: Option<&str>) -> Client {
        let mut ws = Client::connect(relay, token).await;
        let id = format!("client-{}", DocumentId::random().unwrap());
        send_raw(&mut ws, WsMessage::Binary(join(&id, "1", storage).into())).await;
        let mut client = Client { ws, id };
        match client.recv().await {
            FromRelay::Peer { target, version } => {
                assert_eq!(target, client.id);
                assert_eq!(version, "1");
            }
            other => panic!("expected peer, got {other:?}"),
        }
        client
    }

    async fn recv(&mut self) -> FromRelay {
        loop {
            match timeout(LIMIT, self.ws.next())
                .await
                .expect("recv timed out")
            {
                Some(Ok(WsMessage::Binary(bytes))) => return from_relay(&bytes),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    async fn send(&mut self, message: &Outgoing<'_>) {
        let frame = wire::encode(message, &self.id, "relay");
        send_raw(&mut self.ws, WsMessage::Binary(frame.into())).await;
    }

    /// `request` (`sync` if `request` is false) with the next sync message of `doc`.
    async fn offer(
        &mut self,
        id: &DocumentId,
        doc: &mut Automerge,
        state: &mut sync::State,
        request: bool,
    ) {
        let Some(message) = doc.generate_sync_message(state) else {
            return;
        };
        let data = message.encode();
        let frame = if request {
            request_frame(&self.id, id, &data)
        } else {
            wire::encode(
                &Outgoing::Sync {
                    doc: id,
                    data: &data,
                },
                &self.id,
                "relay",
            )
        };
        send_raw(&mut self.ws, WsMessage::Binary(frame.into())).await;
    }

    /// Syncs `doc` with the relay until `done(doc)`: applies each sync message, answers it.
    async fn sync_until(
        &mut self,
        id: &DocumentId,
        doc: &mut Automerge,
        state: &mut sync::State,
        done: impl Fn(&Automerge) -> bool,
    ) {
        while !done(doc) {
            match self.recv().await {
                FromRelay::Sync { doc: d, data } if d == *id => {
                    let message = sync::Message::decode(&data).unwrap();
                    doc.receive_sync_message(state, message).unwrap();
                    self.offer(id, doc, state, false).await;
                }
                FromRelay::Ephemeral { .. } => {}
                other => panic!("while syncing: {other:?}"),
            }
        }
    }
}

/// automerge-repo's `join`, as its client writes it.
fn join(sender: &str, version: &str, storage: Option<&str>) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    e.map(4).unwrap();
    e.str("type").unwrap().str("join").unwrap();
    e.str("senderId").unwrap().str(sender).unwrap();
    e.str("supportedProtocolVersions")
        .unwrap()
        .array(1)
        .unwrap();
    e.str(version).unwrap();
    e.str("peerMetadata").unwrap();
    match storage {
        Some(s) => {
            e.map(2).unwrap();
            e.str("storageId").unwrap().str(s).unwrap();
            e.str("isEphemeral").unwrap().bool(false).unwrap();
        }
        None => {
            e.map(1).unwrap();
            e.str("isEphemeral").unwrap().bool(true).unwrap();
        }
    }
    e.into_writer()
}

/// A `request` (the relay never sends one, so `Outgoing` has none).
fn request_frame(sender: &str, id: &DocumentId, data: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    e.map(5).unwrap();
    e.str("type").unwrap().str("request").unwrap();
    e.str("senderId").unwrap().str(sender).unwrap();
    e.str("targetId").unwrap().str("relay").unwrap();
    e.str("documentId").unwrap().str(&id.to_string()).unwrap();
    e.str("data").unwrap().bytes(data).unwrap();
    e.into_writer()
}

fn title(doc: &Automerge) -> Option<String> {
    match doc.get(ROOT, "title").ok()?? {
        (automerge::Value::Scalar(s), _) => match s.as_ref() {
            automerge::ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// Waits (bounded) until the replica's document satisfies `f`.
async fn until_body(replica: &Replica, id: &DocumentId, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut feed = replica.subscribe(weft::Scope::All, 0);
    loop {
        if replica.get(id).is_ok_and(|d| f(&d.body)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "document never matched: {:?}",
            replica.get(id).map(|d| d.body)
        );
        let mut wait = || feed.next_timeout(Duration::from_millis(100));
        let _ = tokio::task::block_in_place(&mut wait);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weft_replica_and_an_automerge_repo_client_edit_one_document() {
    let relay = Relay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let weft = Replica::open(dir.path().join("a.db")).unwrap();
    let id = weft
        .create("automerge", json!({"title": "from weft", "n": 1}))
        .unwrap();
    let connection = relay.synced(&weft, None).await;

    // The client has nothing: `request`, then sync rounds until it holds weft's version.
    let mut client = Client::join(&relay, None, Some("storage-a")).await;
    let mut doc = Automerge::new();
    let mut state = sync::State::new();
    client.offer(&id, &mut doc, &mut state, true).await;
    client
        .sync_until(&id, &mut doc, &mut state, |d| {
            title(d).as_deref() == Some("from weft")
        })
        .await;

    // Its edit reaches the weft replica live...
    let mut tx = doc.transaction();
    tx.put(ROOT, "title", "from automerge-repo").unwrap();
    tx.commit();
    client.offer(&id, &mut doc, &mut state, false).await;
    until_body(&weft, &id, |b| b["title"] == "from automerge-repo").await;

    // ...and weft's edit reaches the client live, with no request of its own.
    weft.update(&id, json!({"n": 2})).unwrap();
    let heads = weft.get(&id).unwrap().heads;
    client
        .sync_until(&id, &mut doc, &mut state, |d| d.get_heads() == heads)
        .await;
    drop(connection);

    // A document the client creates is a weft document of the automerge collection.
    let created = DocumentId::random().unwrap();
    let mut mine = Automerge::new();
    let mut tx = mine.transaction();
    tx.put(ROOT, "title", "made by automerge-repo").unwrap();
    tx.commit();
    let mut mine_state = sync::State::new();
    client
        .offer(&created, &mut mine, &mut mine_state, false)
        .await;
    // The relay asks for the changes; the client answers until the relay has its heads.
    let heads = mine.get_heads();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !relay.state(&created).contains(&heads[0].to_string()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stored: {}",
            relay.state(&created)
        );
        if let Ok(FromRelay::Sync { doc: d, data }) =
            timeout(Duration::from_millis(200), client.recv()).await
        {
            assert_eq!(d, created);
            mine.receive_sync_message(&mut mine_state, sync::Message::decode(&data).unwrap())
                .unwrap();
            client
                .offer(&created, &mut mine, &mut mine_state, false)
                .await;
        }
    }
    let other = Replica::open(dir.path().join("b.db")).unwrap();
    let _c = relay.synced(&other, None).await;
    let stored = other.get(&created).unwrap();
    assert_eq!(stored.collection, "automerge");
    assert_eq!(stored.body["title"], "made by automerge-repo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_not_here_are_unavailable_at_once() {
    let relay = Relay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let weft = Replica::open(dir.path().join("a.db")).unwrap();
    let todo = weft
        .create("todos", json!({"title": "not for automerge-repo"}))
        .unwrap();
    let gone = weft
        .create("automerge", json!({"title": "deleted"}))
        .unwrap();
    let _c = relay.synced(&weft, None).await;
    weft.delete(&gone).unwrap();
    let _c2 = relay.synced(&weft, None).await;

    let mut client = Client::join(&relay, None, None).await;
    let unknown = DocumentId::random().unwrap();
    for id in [unknown, todo, gone] {
        let mut doc = Automerge::new();
        let mut state = sync::State::new();
        let started = std::time::Instant::now();
        client.offer(&id, &mut doc, &mut state, true).await;
        match client.recv().await {
            FromRelay::Unavailable { doc } => assert_eq!(doc, id),
            other => panic!("{id}: expected doc-unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // Nothing was created for the unknown id, and the todo stayed where it was.
    assert!(
        relay.state(&unknown).starts_with("error"),
        "{}",
        relay.state(&unknown)
    );
    assert_eq!(weft.get(&todo).unwrap().collection, "todos");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_on_the_url_decide_what_a_client_may_do() {
    let relay = Relay::with_tokens(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let weft = Replica::open(dir.path().join("a.db")).unwrap();
    let id = weft
        .create("automerge", json!({"title": "guarded"}))
        .unwrap();
    let _c = relay.synced(&weft, relay.token("*", "*")).await;
    let before = relay.state(&id);

    // No token, a forged one, one without the automerge collection: an error, then closed.
    let wrong_scope = relay.token("todos", "todos");
    for token in [None, Some("not-a-token"), Some(wrong_scope.as_str())] {
        let mut ws = Client::connect(&relay, token).await;
        send_raw(&mut ws, WsMessage::Binary(join("x", "1", None).into())).await;
        let mut client = Client { ws, id: "x".into() };
        match client.recv().await {
            FromRelay::Error { message } => assert!(!message.is_empty()),
            other => panic!("{token:?}: expected an error, got {other:?}"),
        }
        let (code, _) = expect_close(&mut client.ws).await;
        assert_eq!(code, CloseCode::Policy, "{token:?}");
    }

    // A read-only token reads the document...
    let reader = relay.token("automerge", "");
    let mut client = Client::join(&relay, Some(&reader), None).await;
    let mut doc = Automerge::new();
    let mut state = sync::State::new();
    client.offer(&id, &mut doc, &mut state, true).await;
    client
        .sync_until(&id, &mut doc, &mut state, |d| {
            title(d).as_deref() == Some("guarded")
        })
        .await;
    // ...but its changes are refused with an error and stored nowhere.
    let mut tx = doc.transaction();
    tx.put(ROOT, "title", "defaced").unwrap();
    tx.commit();
    client.offer(&id, &mut doc, &mut state, false).await;
    loop {
        match client.recv().await {
            FromRelay::Error { message } => {
                assert!(message.contains("Forbidden"), "{message}");
                break;
            }
            FromRelay::Sync { .. } => continue,
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // And it creates nothing either.
    let created = DocumentId::random().unwrap();
    let mut mine = Automerge::new();
    let mut tx = mine.transaction();
    tx.put(ROOT, "title", "new").unwrap();
    tx.commit();
    let mut mine_state = sync::State::new();
    client
        .offer(&created, &mut mine, &mut mine_state, false)
        .await;
    match client.recv().await {
        FromRelay::Error { message } => assert!(message.contains("Forbidden"), "{message}"),
        FromRelay::Unavailable { doc } => assert_eq!(doc, created),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(relay.state(&id), before);
    assert!(relay.state(&created).starts_with("error"));
    assert_eq!(weft.get(&id).unwrap().body["title"], "guarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_cross_between_the_protocols() {
    let relay = Relay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let weft = Replica::open(dir.path().join("a.db")).unwrap();
    let id = weft
        .create("automerge", json!({"title": "presence"}))
        .unwrap();
    let connection = relay.synced(&weft, None).await;
    let mut heard = connection.ephemeral();

    let mut client = Client::join(&relay, None, None).await;
    let mut doc = Automerge::new();
    let mut state = sync::State::new();
    client.offer(&id, &mut doc, &mut state, true).await;
    client
        .sync_until(&id, &mut doc, &mut state, |d| title(d).is_some())
        .await;

    // An echo (a message the client received, passed back on with its first sender, as
    // automerge-repo clients do) is dropped; the client's own goes through, named by the
    // client's peer id: the bytes as they were (CBOR {"name": "bob"}).
    let echo = wire::encode(
        &Outgoing::Ephemeral {
            doc: &id,
            data: b"echo",
            session_id: "other",
            count: 9,
        },
        "another-peer",
        "relay",
    );
    send_raw(&mut client.ws, WsMessage::Binary(echo.into())).await;
    let presence = b"\xa1dnamecbob".to_vec();
    client
        .send(&Outgoing::Ephemeral {
            doc: &id,
            data: &presence,
            session_id: "s",
            count: 1,
        })
        .await;
    let got = timeout(LIMIT, heard.recv()).await.unwrap().unwrap();
    assert_eq!((got.doc, got.data), (id, presence));
    assert_eq!(got.sender, client.id);

    // weft -> automerge-repo: counted from 1 in the session's stream.
    let mut counts = Vec::new();
    for data in [b"\x01".to_vec(), b"\x02".to_vec()] {
        connection.broadcast(&id, data.clone()).unwrap();
        loop {
            match client.recv().await {
                FromRelay::Ephemeral {
                    doc,
                    data: got,
                    count,
                    sender,
                } => {
                    assert_eq!((doc, got), (id, data));
                    // Named as the relay names the weft replica's session: its replica id.
                    assert_eq!(sender, weft.replica_id().to_string());
                    counts.push(count);
                    break;
                }
                FromRelay::Sync { .. } => continue,
                other => panic!("expected ephemeral, got {other:?}"),
            }
        }
    }
    assert_eq!(counts, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_that_client() {
    let relay = Relay::start(|_| {}).await;
    // Garbage before join, a message before join, an unsupported version, garbage after join.
    let cases: Vec<(Vec<u8>, bool, CloseCode)> = vec![
        (b"\xff\x00garbage".to_vec(), false, CloseCode::Invalid),
        (
            wire::encode(
                &Outgoing::Sync {
                    doc: &DocumentId::from_bytes([1; 16]),
                    data: b"",
                },
                "x",
                "y",
            ),
            false,
            CloseCode::Protocol,
        ),
        (join("x", "2", None), false, CloseCode::Protocol),
        (vec![0x81; 100_000], true, CloseCode::Invalid),
    ];
    for (frame, joined_first, expected) in cases {
        let mut client = if joined_first {
            Client::join(&relay, None, None).await
        } else {
            Client {
                ws: Client::connect(&relay, None).await,
                id: "x".into(),
            }
        };
        send_raw(&mut client.ws, WsMessage::Binary(frame.into())).await;
        match client.recv().await {
            FromRelay::Error { message } => assert!(!message.is_empty()),
            other => panic!("expected an error, got {other:?}"),
        }
        let (code, reason) = expect_close(&mut client.ws).await;
        assert_eq!(code, expected, "{reason}");
    }
    // A sync message that is not Automerge: an error about the document; the session goes on.
    let mut client = Client::join(&relay, None, None).await;
    let id = DocumentId::random().unwrap();
    client
        .send(&Outgoing::Sync {
            doc: &id,
            data: b"\x42garbage",
        })
        .await;
    match client.recv().await {
        FromRelay::Error { message } => assert!(message.contains("BadDocument"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // The relay still serves: a new client joins and gets unavailable for that id.
    let mut fresh = Client::join(&relay, None, None).await;
    let mut doc = Automerge::new();
    let mut state = sync::State::new();
    fresh.offer(&id, &mut doc, &mut state, true).await;
    assert!(matches!(fresh.recv().await, FromRelay::Unavailable { doc } if doc == id));
    let (status, _) = crate::support::relay::http_get(relay.addr, "/healthz").await;
    assert!(status.contains("200"), "{status}");
}

/// The rows of the relay's `sync_states` table, per peer.
fn sync_state_peers(relay: &Relay) -> Vec<Vec<u8>> {
    let db = rusqlite::Connection::open(relay.data().join("relay.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = db
        .prepare("SELECT peer FROM sync_states ORDER BY peer")
        .unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A client with durable storage gets its sync states kept (under an id derived from its
/// storage id); an ephemeral client's are not written at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_states_are_kept_for_storage_ids_only() {
    use sha2::Digest as _;
    let relay = Relay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let weft = Replica::open(dir.path().join("a.db")).unwrap();
    let id = weft.create("automerge", json!({"title": "kept"})).unwrap();
    drop(relay.synced(&weft, None).await);
    let before = sync_state_peers(&relay);

    for storage in [None, Some("browser-storage-1")] {
        let mut client = Client::join(&relay, None, storage).await;
        let mut doc = Automerge::new();
        let mut state = sync::State::new();
        client.offer(&id, &mut doc, &mut state, true).await;
        client
            .sync_until(&id, &mut doc, &mut state, |d| title(d).is_some())
            .await;
        let leave = {
            let mut e = Encoder::new(Vec::new());
            e.map(2).unwrap();
            e.str("type").unwrap().str("leave").unwrap();
            e.str("senderId").unwrap().str(&client.id).unwrap();
            e.into_writer()
        };
        send_raw(&mut client.ws, WsMessage::Binary(leave.into())).await;
        let (code, _) = expect_close(&mut client.ws).await;
        assert_eq!(code, CloseCode::Normal);
    }
    // The session's end is applied after the close: wait for the durable client's row.
    let expected: Vec<u8> = sha2::Sha256::new()
        .chain_update(b"weft automerge-repo storage\0")
        .chain_update(b"browser-storage-1")
        .finalize()[..16]
        .to_vec();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let now = sync_state_peers(&relay);
        if now.contains(&expected) {
            let mut without = now.clone();
            without.retain(|p| *p != expected);
            assert_eq!(without, before, "an ephemeral client's state was stored");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no state for the storage id: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every frame captured from automerge-repo 2.5.6 clients and its reference server
/// (`tests/fixtures/amrepo/`, README there) decodes, to the message its file is named after.
#[test]
fn frames_of_the_real_client_and_server_decode() {
    use weft::protocol::amrepo::Incoming;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/amrepo");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cbor") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        // NN-FROM-TO-TYPE
        let kind = name.splitn(4, '-').nth(3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let message = wire::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(message.kind(), kind, "{name}: {message:?}");
        match (name.as_str(), &message) {
            // A with storage, B without (its storageId is CBOR undefined), x without metadata.
            (
                "01-a-s-join",
                Incoming::Join {
                    storage_id,
                    ephemeral,
                    versions,
                    ..
                },
            ) => {
                assert!(storage_id.is_some() && !ephemeral, "{message:?}");
                assert_eq!(versions, &["1"]);
            }
            (
                "09-b-s-join",
                Incoming::Join {
                    storage_id,
                    ephemeral,
                    ..
                },
            ) => {
                assert!(storage_id.is_none() && *ephemeral, "{message:?}");
            }
            ("43-y-s-join", Incoming::Join { versions, .. }) => assert_eq!(versions, &["2"]),
            // B's echo of A's message keeps A as the sender (the relay drops it).
            ("20-b-s-ephemeral", Incoming::Ephemeral { sender_id, .. }) => {
                assert_eq!(sender_id.as_deref(), Some("client-a"));
            }
            ("11-b-s-request", Incoming::Request { data, .. }) => {
                weft::automerge::sync::Message::decode(data).expect("an Automerge sync message");
            }
            _ => {}
        }
        seen += 1;
    }
    assert_eq!(seen, 44, "the fixtures are all there");
}

/// A relay configured with an automerge collection that cannot exist does not start.
#[tokio::test]
async fn an_invalid_automerge_collection_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = weft::net::RelayConfig::new(dir.path().join("data"));
    config.automerge_collection = String::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = timeout(
        LIMIT,
        weft::net::run(listener, config, std::future::pending()),
    )
    .await
    .expect("run returns at once");
    let err = result.expect_err("an empty collection name is refused");
    assert!(
        matches!(err, weft::net::NetError::Config(ref m) if m.contains("automerge_collection")),
        "{err}"
    );
}
