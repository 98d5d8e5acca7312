//! Relay security below the library: a hand-written client speaking raw frames over a raw
//! WebSocket cannot read or write past its token; a token that expires ends its live session;
//! a client that floods or holds too many connections is cut off while a well-behaved client
//! on the same relay keeps syncing. Real relay on 127.0.0.1:0; every wait is bounded.
#![cfg(feature = "net")]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use weft::net::auth::TokenKey;
use weft::net::{ConnectOptions, Status};
use weft::protocol::{
    self, CatalogEntry, ErrorCode, Message, Payload, RejectCode, SyncItem, WireScope,
};
use weft::{Bundle, BundleEntry, BundleScope, DocumentId, Replica, ReplicaId, Scope};

use crate::support::relay::{LIMIT, Raw, Relay, expect_close, recv, send};

const A: &str = "alpha";
const B: &str = "beta";

/// Reads until an `Error` about `doc`; every frame before it must not carry `forbidden`.
async fn expect_error(ws: &mut Raw, doc: DocumentId, forbidden: &[DocumentId]) -> ErrorCode {
    loop {
        match recv(ws).await {
            Message::Error {
                code, doc: Some(d), ..
            } if d == doc => return code,
            Message::Sync { batch } => {
                for item in batch {
                    assert!(!forbidden.contains(&item.id), "leaked {item:?}");
                }
            }
            _ => {}
        }
    }
}

fn sync_item(id: DocumentId, collection: &str, payload: Payload) -> Message {
    Message::Sync {
        batch: vec![SyncItem {
            id,
            collection: collection.into(),
            payload,
        }],
    }
}

/// A sync message carrying a change to `doc` that the relay does not have: what a client
/// sends after editing it.
fn sync_with_a_change(doc: &Automerge) -> Vec<u8> {
    let mut ours = doc.fork();
    let mut tx = ours.transaction();
    tx.put(ROOT, "forged", true).unwrap();
    tx.commit();
    // Run the protocol against a copy of the relay's version until our side sends changes.
    let mut theirs = doc.clone();
    let (mut our_state, mut their_state) = (sync::State::new(), sync::State::new());
    for _ in 0..4 {
        let message = ours.generate_sync_message(&mut our_state).unwrap();
        if !message.changes.is_empty() {
            return message.encode();
        }
        theirs
            .receive_sync_message(&mut their_state, message)
            .unwrap();
        if let Some(reply) = theirs.generate_sync_message(&mut their_state) {
            ours.receive_sync_message(&mut our_state, reply).unwrap();
        }
    }
    panic!("the sync protocol never sent the change");
}

/// Creates one document per collection through a fully privileged library client and
/// returns (id, Automerge content) for each.
async fn seed(relay: &Relay) -> [(DocumentId, Automerge); 2] {
    let dir = tempfile::tempdir().unwrap();
    let admin = Replica::open(dir.path().join("admin.db")).unwrap();
    let a = admin.create(A, json!({"secret": "a"})).unwrap();
    let b = admin.create(B, json!({"secret": "b"})).unwrap();
    let connection = relay.synced(&admin, relay.token("*", "*")).await;
    connection.close().await;
    let bundle = Bundle::decode(&admin.export_bundle(&BundleScope::All).unwrap()).unwrap();
    let doc = |id: DocumentId| {
        bundle
            .entries
            .iter()
            .find_map(|e| match e {
                BundleEntry::Document { id: i, bytes, .. } if *i == id => {
                    Some(Automerge::load(bytes).unwrap())
                }
                _ => None,
            })
            .unwrap()
    };
    [(a, doc(a)), (b, doc(b))]
}

fn new_doc_bytes() -> Vec<u8> {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, "new", 1).unwrap();
    tx.commit();
    doc.save()
}

#[tokio::test]
async fn raw_frames_cannot_read_or_write_past_the_token() {
    let relay = Relay::with_tokens(|_| {}).await;
    let [(a, a_doc), (b, b_doc)] = seed(&relay).await;
    let before = (relay.state(&a), relay.state(&b));

    // Read-only on alpha. The scope asked for (everything) is narrowed to alpha.
    let (mut ws, welcome) = relay.raw(&relay.token(A, "")).await;
    match welcome {
        Message::Welcome { scope, .. } => {
            assert_eq!(scope, WireScope::Collections(vec![A.into()]))
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    // Reconciliation from an empty catalog lists alpha's documents only.
    send(
        &mut ws,
        &Message::Summary {
            count: 0,
            buckets: vec![0; 256],
        },
    )
    .await;
    match recv(&mut ws).await {
        Message::Entries { entries, .. } => {
            let ids: Vec<DocumentId> = entries.iter().map(|e| e.id).collect();
            assert_eq!(ids, vec![a], "{entries:?}");
        }
        other => panic!("expected Entries, got {other:?}"),
    }
    // Asking for beta's document, honestly or claiming it is in alpha.
    send(&mut ws, &sync_item(b, B, Payload::Want)).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);
    send(&mut ws, &sync_item(b, A, Payload::Want)).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);
    // Heads-only sync messages are reads: allowed, and answered.
    let mut probe_state = sync::State::new();
    let heads_only = a_doc.generate_sync_message(&mut probe_state).unwrap();
    assert!(heads_only.changes.is_empty());
    send(
        &mut ws,
        &sync_item(a, A, Payload::Sync(heads_only.encode())),
    )
    .await;
    match recv(&mut ws).await {
        Message::Sync { batch } => assert_eq!(batch[0].id, a),
        other => panic!("expected a sync reply, got {other:?}"),
    }
    // Writes to alpha: a create, a change, a delete.
    let created = DocumentId::from_bytes([5; 16]);
    send(
        &mut ws,
        &sync_item(created, A, Payload::Whole(new_doc_bytes())),
    )
    .await;
    assert_eq!(
        expect_error(&mut ws, created, &[b]).await,
        ErrorCode::Forbidden
    );
    let change = sync_with_a_change(&a_doc);
    send(&mut ws, &sync_item(a, A, Payload::Sync(change.clone()))).await;
    assert_eq!(expect_error(&mut ws, a, &[b]).await, ErrorCode::Forbidden);
    send(&mut ws, &sync_item(a, A, Payload::Tombstone)).await;
    assert_eq!(expect_error(&mut ws, a, &[b]).await, ErrorCode::Forbidden);
    drop(ws);

    // Read-write on alpha, trying to reach beta's document by claiming it is in alpha: refused
    // as outside the session's scope, the same answer as for any document it may not read.
    let (mut ws, welcome) = relay.raw(&relay.token(A, A)).await;
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    let forged = sync_with_a_change(&b_doc);
    send(&mut ws, &sync_item(b, A, Payload::Sync(forged))).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);
    send(&mut ws, &sync_item(b, A, Payload::Tombstone)).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);
    send(&mut ws, &sync_item(b, A, Payload::Whole(b_doc.save()))).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);
    send(&mut ws, &sync_item(b, B, Payload::Tombstone)).await;
    assert_eq!(expect_error(&mut ws, b, &[b]).await, ErrorCode::Forbidden);

    assert_eq!((relay.state(&a), relay.state(&b)), before);
    assert!(
        relay.state(&created).contains("not found"),
        "{}",
        relay.state(&created)
    );
    // The same change from a session that may write alpha is taken: the refusals above were
    // about permission, not about the frames.
    send(&mut ws, &sync_item(a, A, Payload::Sync(change))).await;
    loop {
        if let Message::Persisted { docs } = recv(&mut ws).await {
            assert_eq!(docs[0].0, a);
            break;
        }
    }
    assert_ne!(relay.state(&a), before.0);
    // Even a session that may write cannot store a document without any change (every
    // document has heads).
    let empty = DocumentId::from_bytes([6; 16]);
    send(
        &mut ws,
        &sync_item(empty, A, Payload::Whole(Automerge::new().save())),
    )
    .await;
    assert_eq!(
        expect_error(&mut ws, empty, &[b]).await,
        ErrorCode::BadDocument
    );
    assert!(relay.state(&empty).contains("not found"));
}

/// Reads until the relay's `Error { Unexpected }`, then its close: the code must be 1002
/// (protocol error) and nothing about another document may arrive before it.
async fn expect_ended_for_protocol(ws: &mut Raw) -> String {
    let message = loop {
        match recv(ws).await {
            Message::Error {
                code: ErrorCode::Unexpected,
                message,
                ..
            } => break message,
            Message::Error { .. } => {}
            other => panic!("expected Error Unexpected, got {other:?}"),
        }
    };
    let (code, _) = expect_close(ws).await;
    assert_eq!(code, CloseCode::Protocol, "{message}");
    message
}

/// The attack from the hostile-peers issue: a session sends `Entries` it was never asked for,
/// claiming a document (or an id the relay never saw) is deleted. The relay stored the
/// tombstones. Now a message out of its sender's role is refused and ends the session, with
/// every token, and the relay's documents are as they were.
#[tokio::test]
async fn frames_out_of_role_end_the_session_and_change_nothing() {
    let relay = Relay::with_tokens(|_| {}).await;
    let [(a, _), (b, b_doc)] = seed(&relay).await;
    let fresh = DocumentId::from_bytes([9; 16]);
    let before = (relay.state(&a), relay.state(&b));
    let tombstone_entries = |ids: &[DocumentId]| Message::Entries {
        buckets: ids.iter().map(protocol::bucket_of).collect(),
        entries: ids
            .iter()
            .map(|id| CatalogEntry {
                id: *id,
                collection: A.into(),
                digest: protocol::doc_digest(id, &[], true),
                deleted: true,
            })
            .collect(),
    };
    for (read, write) in [(A, ""), (A, A), ("*", "*")] {
        for ids in [vec![a], vec![fresh], vec![a, fresh]] {
            let (mut ws, welcome) = relay.raw(&relay.token(read, write)).await;
            assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
            send(&mut ws, &tombstone_entries(&ids)).await;
            let why = expect_ended_for_protocol(&mut ws).await;
            assert!(why.contains("Entries"), "{why}");
        }
    }
    let welcome = Message::Welcome {
        replica: ReplicaId::from_bytes([1; 16]),
        scope: WireScope::All,
        max_frame: 1 << 20,
    };
    let reject = Message::Reject {
        code: RejectCode::Busy,
        reason: "no".into(),
    };
    let persisted = Message::Persisted {
        docs: vec![(b, vec![[0; 32]])],
    };
    let hello = Message::Hello {
        protocol: protocol::PROTOCOL_VERSION.into(),
        replica: ReplicaId::from_bytes([42; 16]),
        token: Some(relay.token("*", "*")),
        scope: WireScope::All,
    };
    for (message, says) in [
        (welcome, "Welcome"),
        (reject, "Reject"),
        (persisted, "Persisted"),
        (hello, "Hello"),
    ] {
        let (mut ws, _) = relay.raw(&relay.token("*", "*")).await;
        send(&mut ws, &message).await;
        let why = expect_ended_for_protocol(&mut ws).await;
        assert!(why.contains(says), "{why}");
    }
    assert_eq!((relay.state(&a), relay.state(&b)), before);
    assert!(
        relay.state(&fresh).contains("not found"),
        "{}",
        relay.state(&fresh)
    );
    // The relay still serves: a well-behaved client reads both documents as they were.
    let dir = tempfile::tempdir().unwrap();
    let client = Replica::open(dir.path().join("c.db")).unwrap();
    let connection = relay.synced(&client, relay.token("*", "*")).await;
    assert_eq!(client.get(&b).unwrap().heads, b_doc.get_heads());
    assert!(client.get(&a).is_ok());
    connection.close().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_at_hello_with_the_reason() {
    let relay = Relay::with_tokens(|_| {}).await;
    let forged = TokenKey::from_secret(&[8; 32])
        .unwrap()
        .issue("x", &Scope::All, &Scope::All, Duration::from_secs(60))
        .unwrap();
    let expired = relay
        .key()
        .issue_until("x", &Scope::All, &Scope::All, unix_now() - 5)
        .unwrap();
    for (token, why) in [
        (forged, "signature"),
        (expired, "expired"),
        ("not a token".to_owned(), "malformed"),
    ] {
        let (mut ws, answer) = relay.raw(&token).await;
        match answer {
            Message::Reject { code, reason } => {
                assert_eq!(code, RejectCode::Unauthorized);
                assert!(reason.contains(why), "{reason}");
            }
            other => panic!("expected Reject, got {other:?}"),
        }
        assert_eq!(expect_close(&mut ws).await.0, CloseCode::Policy);
    }
    // Asking for a collection the token does not grant.
    let (mut ws, _) = timeout(LIMIT, tokio_tungstenite::connect_async(relay.url()))
        .await
        .unwrap()
        .unwrap();
    let hello = Message::Hello {
        protocol: protocol::PROTOCOL_VERSION.into(),
        replica: ReplicaId::from_bytes([1; 16]),
        token: Some(relay.token(A, A)),
        scope: WireScope::Collections(vec![A.into(), B.into()]),
    };
    send(&mut ws, &hello).await;
    match recv(&mut ws).await {
        Message::Reject { code, reason } => {
            assert_eq!(code, RejectCode::Forbidden);
            assert!(reason.contains("does not allow reading beta"), "{reason}");
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    assert_eq!(relay.metric("weft_sessions_refused_total").await, 4);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_token_that_expires_ends_the_live_session() {
    let relay = Relay::with_tokens(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(dir.path().join("c.db")).unwrap();
    // Valid for 2 more seconds (JWT expiry has whole-second resolution).
    let token = relay
        .key()
        .issue_until("short", &Scope::All, &Scope::All, unix_now() + 2)
        .unwrap();
    let options = ConnectOptions {
        token: Some(token),
        initial_backoff: Duration::from_millis(50),
        ..ConnectOptions::default()
    };
    let connection = replica.connect(&relay.url(), options);
    timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    // The relay closes the session at expiry; the reconnect is refused: expired.
    let mut status = connection.watch();
    let status = timeout(
        LIMIT,
        status.wait_for(|s| matches!(s, Status::Rejected { .. })),
    )
    .await
    .expect("the session outlived its token")
    .unwrap()
    .clone();
    assert!(
        matches!(&status, Status::Rejected { code: RejectCode::Unauthorized, reason } if reason.contains("expired")),
        "{status:?}"
    );
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn creates_over_the_per_minute_limit_are_refused_per_document() {
    let relay = Relay::with_tokens(|c| {
        c.creates = Some(weft::CreateLimit {
            per_minute: 3,
            burst: 0,
        })
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(dir.path().join("c.db")).unwrap();
    let ids: Vec<DocumentId> = (0..5)
        .map(|i| replica.create(A, json!({ "i": i })).unwrap())
        .collect();
    let connection = relay.synced(&replica, relay.token("*", "*")).await;
    let refused = connection.refused();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|r| r.code == ErrorCode::RateLimited));
    let stored = ids
        .iter()
        .filter(|id| relay.state(id).starts_with("heads"))
        .count();
    assert_eq!(stored, 3);
    // Edits to documents the relay has keep syncing.
    let kept = ids
        .iter()
        .find(|id| !refused.iter().any(|r| r.doc == **id))
        .unwrap();
    replica.update(kept, json!({"more": true})).unwrap();
    timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        relay.state(kept),
        format!("heads {:?}", replica.get(kept).unwrap().heads)
    );
}

/// A first sync of more documents than the relay takes at once finishes: the relay takes its
/// burst, the client offers the rest again as the rate allows, and `wait_all_synced` (what
/// `sync --once` uses) returns once everything is in — no refusal left, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_over_the_limit_go_through_later_at_the_limits_pace() {
    let relay = Relay::with_tokens(|c| {
        c.creates = Some(weft::CreateLimit {
            per_minute: 240,
            burst: 3,
        })
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let options = weft::ReplicaOptions {
        rate_limited_retry: Duration::from_millis(300),
        ..weft::ReplicaOptions::default()
    };
    let replica = Replica::open_with(dir.path().join("c.db"), options).unwrap();
    let ids: Vec<DocumentId> = (0..12)
        .map(|i| replica.create(A, json!({ "i": i })).unwrap())
        .collect();
    let connection = replica.connect(
        &relay.url(),
        ConnectOptions {
            token: Some(relay.token("*", "*")),
            ..ConnectOptions::default()
        },
    );
    let mut rounds = Vec::new();
    timeout(LIMIT, connection.wait_all_synced(|held| rounds.push(held)))
        .await
        .unwrap()
        .unwrap();
    assert!(!rounds.is_empty(), "the limit never held anything back");
    assert_eq!(
        rounds[0], 9,
        "the burst of 3 went through at once: {rounds:?}"
    );
    assert!(
        connection.refused().is_empty(),
        "{:?}",
        connection.refused()
    );
    for id in &ids {
        assert!(relay.state(id).starts_with("heads"), "{id} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_clients_are_cut_off_while_a_good_client_keeps_syncing() {
    let relay = Relay::with_tokens(|c| {
        c.max_connections = 6;
        c.rate_limit.per_second = 100.0;
        c.rate_limit.burst = 200.0;
        c.byte_limit.per_second = 1024.0 * 1024.0;
        c.byte_limit.burst = 2.0 * 1024.0 * 1024.0;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = relay.token("*", "*");
    let options = ConnectOptions {
        token: Some(token.clone()),
        ..ConnectOptions::default()
    };
    let writer = Replica::open(dir.path().join("w.db")).unwrap();
    let reader = Replica::open(dir.path().join("r.db")).unwrap();
    let w = writer.connect(&relay.url(), options.clone());
    let r = reader.connect(&relay.url(), options);
    timeout(LIMIT, w.wait_synced()).await.unwrap().unwrap();
    timeout(LIMIT, r.wait_synced()).await.unwrap().unwrap();

    // Two flooders: one with frames, one with bytes; two more just hold connections.
    let (mut frames, _) = relay.raw(&token).await;
    let (mut bytes, _) = relay.raw(&token).await;
    let (_idle1, _) = relay.raw(&token).await;
    let (_idle2, _) = relay.raw(&token).await;
    // The cap (6) is reached: one more is refused before the WebSocket handshake.
    match timeout(LIMIT, tokio_tungstenite::connect_async(relay.url()))
        .await
        .unwrap()
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    let frame_flood = tokio::spawn(async move {
        for nonce in 0..2_000u64 {
            let ping = protocol::encode(&Message::Ping { nonce });
            if frames.send(WsMessage::Binary(ping.into())).await.is_err() {
                break;
            }
        }
        expect_rate_limited(&mut frames).await
    });
    let byte_flood = tokio::spawn(async move {
        // Valid frames the relay reads and only logs (a client's error reports), 512 KiB
        // each: cheap to handle, just too many bytes.
        let padding = Message::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(512 * 1024),
            doc: None,
        };
        let frame = protocol::encode(&padding);
        for _ in 0..10 {
            if bytes
                .send(WsMessage::Binary(frame.clone().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        expect_rate_limited(&mut bytes).await
    });

    // Meanwhile the good clients sync as usual.
    let mut latencies = Vec::new();
    for i in 0..20 {
        let sent = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let hook = reader.on_change(Scope::All, move |e| {
            let _ = tx.send(e.id);
        });
        let id = writer.create(A, json!({ "i": i })).unwrap();
        while timeout(LIMIT, rx.recv()).await.unwrap().unwrap() != id {}
        latencies.push(sent.elapsed());
        drop(hook);
    }
    let frame_reason = timeout(LIMIT, frame_flood).await.unwrap().unwrap();
    let byte_reason = timeout(LIMIT, byte_flood).await.unwrap().unwrap();
    assert!(frame_reason.contains("frame rate"), "{frame_reason}");
    assert!(byte_reason.contains("byte rate"), "{byte_reason}");
    latencies.sort();
    let worst = latencies[latencies.len() - 1];
    eprintln!(
        "good client latency during the floods: median {:?}, worst {worst:?}",
        latencies[10]
    );
    assert!(worst < Duration::from_secs(2), "{latencies:?}");
    assert!(matches!(w.status(), Status::Synced | Status::Connected));
    assert_eq!(relay.metric("weft_rate_limited_total").await, 2);
}

/// Reads until the relay says `RateLimited` and closes with 1008; returns the close reason.
async fn expect_rate_limited(ws: &mut Raw) -> String {
    let mut typed = false;
    loop {
        match timeout(LIMIT, ws.next()).await.expect("not cut off") {
            Some(Ok(WsMessage::Binary(bytes))) => {
                if let Ok(Message::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }) = protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME)
                {
                    typed = true;
                }
            }
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Policy);
                assert!(typed, "closed without a RateLimited error first");
                return frame.reason.to_string();
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_relay_without_auth_grants_what_is_asked() {
    // The default for a loopback relay (the CLI refuses a non-loopback one without a secret).
    let relay = Relay::start(|_| {}).await;
    let (_ws, welcome) = relay.raw("ignored").await;
    assert!(
        matches!(
            welcome,
            Message::Welcome {
                scope: WireScope::All,
                ..
            }
        ),
        "{welcome:?}"
    );
}

#[tokio::test]
async fn a_refused_document_does_not_hold_up_the_others() {
    let relay = Relay::with_tokens(|_| {}).await;
    let [(a, _), (b, _)] = seed(&relay).await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(dir.path().join("c.db")).unwrap();
    // Reads both collections, writes alpha only.
    let connection = relay
        .synced(&replica, relay.token(&format!("{A},{B}"), A))
        .await;
    assert!(connection.refused().is_empty());
    let b_before = relay.state(&b);
    // One session, one allowed and one forbidden edit, and a new alpha document.
    replica.update(&b, json!({"secret": "changed"})).unwrap();
    replica.update(&a, json!({"secret": "changed"})).unwrap();
    let created = replica.create(A, json!({"new": true})).unwrap();
    timeout(LIMIT, connection.wait_synced())
        .await
        .unwrap()
        .unwrap();
    let refused = connection.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!((refused[0].doc, refused[0].code), (b, ErrorCode::Forbidden));
    assert!(
        refused[0]
            .message
            .contains("may not write collection \"beta\"")
    );
    for id in [a, created] {
        assert_eq!(
            relay.state(&id),
            format!("heads {:?}", replica.get(&id).unwrap().heads)
        );
    }
    assert_eq!(relay.state(&b), b_before);
    // Reads of the refused document go on: a change made by someone who may write it arrives.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _hook = replica.on_change(Scope::collection(B), move |e| {
        let _ = tx.send(e.id);
    });
    let admin_dir = tempfile::tempdir().unwrap();
    let admin = Replica::open(admin_dir.path().join("admin.db")).unwrap();
    let _admin_connection = relay.synced(&admin, relay.token("*", "*")).await;
    admin.update(&b, json!({"by": "admin"})).unwrap();
    assert_eq!(timeout(LIMIT, rx.recv()).await.unwrap(), Some(b));
    let body = replica.get(&b).unwrap().body;
    assert_eq!(body["by"], "admin", "{body}");
    assert_eq!(
        body["secret"], "changed",
        "the local edit stays local: {body}"
    );
}

/// Documents built to hurt — nested 100,000 maps deep (the relay used to abort with a stack
/// overflow, cutting off every user), a list of 10 million elements in a frame of a few hundred
/// bytes (seconds of CPU and gigabytes to load) — sent whole and as sync messages by a session
/// that may write: each is refused with `BadDocument` naming the limit, nothing is stored, and a
/// well-behaved writer and reader on the same relay keep syncing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_are_refused_and_other_sessions_keep_syncing() {
    use crate::support::hostile;
    let relay = Relay::with_tokens(|_| {}).await;
    let [(a, _), _] = seed(&relay).await;
    let before = relay.state(&a);
    let dir = tempfile::tempdir().unwrap();
    let writer = Replica::open(dir.path().join("w.db")).unwrap();
    let reader = Replica::open(dir.path().join("r.db")).unwrap();
    let _w = relay.synced(&writer, relay.token("*", "*")).await;
    let _r = relay.synced(&reader, relay.token("*", "*")).await;

    let (deep, deep_head) = hostile::deep_maps(100_000);
    let (long, long_head) = hostile::long_list(10_000_000);
    let attacks = [
        ("max_depth", Payload::Whole(deep.clone())),
        ("max_ops", Payload::Whole(long.clone())),
        (
            "max_depth",
            Payload::Sync(hostile::sync_message(deep, vec![deep_head])),
        ),
        (
            "max_ops",
            Payload::Sync(hostile::sync_message(long, vec![long_head])),
        ),
    ];
    let (mut ws, welcome) = relay.raw(&relay.token("*", "*")).await;
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    let mut latencies = Vec::new();
    for (i, (limit, payload)) in attacks.into_iter().enumerate() {
        let fresh = DocumentId::from_bytes([20 + i as u8; 16]);
        for target in [fresh, a] {
            send(&mut ws, &sync_item(target, A, payload.clone())).await;
            let message = loop {
                match recv(&mut ws).await {
                    Message::Error {
                        code,
                        message,
                        doc: Some(d),
                    } if d == target => {
                        assert_eq!(code, ErrorCode::BadDocument, "{message}");
                        break message;
                    }
                    _ => continue,
                }
            };
            assert!(message.contains(limit), "{limit}: {message}");
            // Meanwhile the relay serves everyone else: a change reaches the reader.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let hook = reader.on_change(Scope::All, move |e| {
                let _ = tx.send(e.id);
            });
            let sent = Instant::now();
            let id = writer.create(B, json!({ "during": i })).unwrap();
            while timeout(LIMIT, rx.recv()).await.unwrap().unwrap() != id {}
            latencies.push(sent.elapsed());
            drop(hook);
        }
        assert!(
            relay.state(&fresh).contains("not found"),
            "{}",
            relay.state(&fresh)
        );
    }
    assert_eq!(relay.state(&a), before, "the attacked document changed");
    let worst = latencies.iter().max().unwrap();
    eprintln!(
        "a well-behaved client's change reached another during the attack in at most {worst:?}"
    );
    assert!(*worst < Duration::from_secs(2), "{latencies:?}");
}
