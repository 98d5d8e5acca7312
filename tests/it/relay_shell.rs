//! The relay's network shell (`weft::net::run`, `weft serve`): HTTP endpoints, the Hello
//! handshake, close codes for bad input (only the offending connection), the connection cap and
//! graceful shutdown. Real servers on 127.0.0.1:0, real WebSocket clients; every wait is bounded.
#![cfg(feature = "net")]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message as WsMessage};
use weft::ReplicaId;
use weft::net::RelayConfig;
use weft::protocol::{self, Message, RejectCode, WireScope};

use crate::support::SplitMix64;
use crate::support::relay::{
    self, LIMIT, Raw, Relay, RelayProcess, expect_close, http_get, recv, send,
};

/// A client on `/sync` (the relay also upgrades `/`), no handshake sent yet.
async fn connect(relay: &Relay) -> Raw {
    relay::connect(&format!("ws://{}/sync", relay.addr)).await
}

/// A client past the handshake.
async fn session(relay: &Relay) -> Raw {
    let mut ws = connect(relay).await;
    send(&mut ws, &hello(protocol::PROTOCOL_VERSION.into())).await;
    assert!(matches!(recv(&mut ws).await, Message::Welcome { .. }));
    ws
}

fn hello(protocol: u16) -> Message {
    Message::Hello {
        protocol,
        replica: ReplicaId::from_bytes([9; 16]),
        token: None,
        scope: WireScope::Collections(vec!["todos".into()]),
    }
}

/// A well-behaved session still works: the bad one hurt only itself.
async fn assert_healthy(ws: &mut Raw, nonce: u64) {
    send(ws, &Message::Ping { nonce }).await;
    assert_eq!(recv(ws).await, Message::Pong { nonce });
}

#[tokio::test]
async fn healthz_and_metrics_over_plain_http() {
    let relay = Relay::start(|_| {}).await;
    let (status, body) = http_get(relay.addr, "/healthz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "ok\n");
    let (status, body) = http_get(relay.addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    for name in [
        "weft_connections",
        "weft_frames_in_total",
        "weft_frames_out_total",
        "weft_bytes_in_total",
        "weft_bytes_out_total",
        "weft_protocol_errors_total",
        "weft_documents_stored",
        "weft_documents_loaded",
        "weft_sync_latency_seconds",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} in\n{body}"
        );
    }
    assert_eq!(relay.metric("weft_documents_stored").await, 0);
    assert_eq!(
        http_get(relay.addr, "/nope").await.0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_get(relay.addr, "/sync").await.0,
        "HTTP/1.1 426 Upgrade Required"
    );
    relay.stop().await;
}

#[tokio::test]
async fn hello_gets_welcome_then_ping_pong_and_reconciliation() {
    let relay = Relay::start(|c| c.max_frame = 1 << 20).await;
    let mut ws = connect(&relay).await;
    send(&mut ws, &hello(protocol::PROTOCOL_VERSION.into())).await;
    let Message::Welcome {
        replica,
        scope,
        max_frame,
    } = recv(&mut ws).await
    else {
        panic!("expected Welcome")
    };
    assert_eq!(scope, WireScope::Collections(vec!["todos".into()]));
    assert_eq!(max_frame, 1 << 20);
    assert_healthy(&mut ws, 7).await;
    send(
        &mut ws,
        &Message::Summary {
            count: 0,
            buckets: vec![0; 256],
        },
    )
    .await;
    // An empty catalog against an empty relay: in sync, said with an empty Entries.
    assert_eq!(
        recv(&mut ws).await,
        Message::Entries {
            buckets: vec![],
            entries: vec![]
        }
    );
    // The session goes on.
    assert_healthy(&mut ws, 8).await;
    assert_eq!(relay.metric("weft_connections").await, 1);
    assert_eq!(relay.metric("weft_frames_in_total").await, 4);
    assert_eq!(relay.metric("weft_frames_out_total").await, 4);
    assert!(relay.metric("weft_bytes_in_total").await > 0);
    assert!(relay.metric("weft_bytes_out_total").await > 0);
    assert_eq!(relay.metric("weft_protocol_errors_total").await, 0);
    // The Summary was one session frame applied: one latency observation.
    assert_eq!(relay.metric("weft_sync_latency_seconds_count").await, 1);
    assert_eq!(
        relay
            .metric("weft_sync_latency_seconds_bucket{le=\"+Inf\"}")
            .await,
        1
    );
    // A clean close by the client is not an error.
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(LIMIT, ws.next()).await {}
    assert_eq!(relay.metric("weft_protocol_errors_total").await, 0);
    // The Welcome carried the id of the relay's stored replica.
    let dir = relay.stop().await.unwrap();
    let stored = weft::Replica::open(dir.path().join("data/relay.db")).unwrap();
    assert_eq!(stored.replica_id(), replica);
}

#[tokio::test]
async fn wrong_protocol_version_is_rejected_and_closed() {
    let relay = Relay::start(|_| {}).await;
    let mut ws = connect(&relay).await;
    send(&mut ws, &hello(99)).await;
    let Message::Reject { code, reason } = recv(&mut ws).await else {
        panic!("expected Reject")
    };
    assert_eq!(code, RejectCode::ProtocolVersion);
    assert!(reason.contains("99"), "{reason}");
    assert_eq!(expect_close(&mut ws).await.0, CloseCode::Protocol);
    drop(ws);
    relay.stop().await;
}

/// Sends `bad` on one connection (after a Hello when `greet`) and checks it is closed with
/// `code`, while a second session on the same relay keeps working.
async fn bad_input_closes_only_that_connection(
    tune: impl FnOnce(&mut RelayConfig),
    greet: bool,
    bad: Vec<WsMessage>,
    code: CloseCode,
) -> String {
    let relay = Relay::start(tune).await;
    let mut good = session(&relay).await;
    let mut bad_ws = if greet {
        session(&relay).await
    } else {
        connect(&relay).await
    };
    for message in bad {
        // feed, not send: a flood goes out without waiting for each flush.
        timeout(LIMIT, bad_ws.feed(message))
            .await
            .expect("feed timed out")
            .expect("feed failed");
    }
    let _ = timeout(LIMIT, bad_ws.flush())
        .await
        .expect("flush timed out");
    let (got, reason) = expect_close(&mut bad_ws).await;
    assert_eq!(got, code, "reason: {reason}");
    assert_healthy(&mut good, 1).await;
    assert_healthy(&mut good, 2).await;
    assert_eq!(relay.metric("weft_protocol_errors_total").await, 1);
    // A new session is welcome too.
    let mut again = session(&relay).await;
    assert_healthy(&mut again, 3).await;
    drop((good, bad_ws, again));
    relay.stop().await;
    reason
}

fn binary(bytes: &[u8]) -> Vec<WsMessage> {
    vec![WsMessage::Binary(Bytes::copy_from_slice(bytes))]
}

#[tokio::test]
async fn garbage_bytes_close_1007() {
    let reason = bad_input_closes_only_that_connection(
        |_| {},
        false,
        binary(b"\x00\x01\x02 not a frame"),
        CloseCode::Invalid,
    )
    .await;
    assert!(reason.contains("bad magic"), "{reason}");
}

#[tokio::test]
async fn malformed_frame_after_hello_closes_1007() {
    let reason = bad_input_closes_only_that_connection(
        |_| {},
        true,
        binary(&[
            b'w',
            b'f',
            weft::protocol::PROTOCOL_VERSION,
            0xff,
            0xff,
            0xff,
        ]),
        CloseCode::Invalid,
    )
    .await;
    assert!(reason.contains("malformed"), "{reason}");
}

#[tokio::test]
async fn oversized_frame_closes_1009() {
    let limit = 64 * 1024;
    bad_input_closes_only_that_connection(
        |c| c.max_frame = limit,
        true,
        binary(&vec![7u8; limit + 1]),
        CloseCode::Size,
    )
    .await;
}

#[tokio::test]
async fn text_frame_closes_1003() {
    bad_input_closes_only_that_connection(
        |_| {},
        true,
        vec![WsMessage::Text("hello?".into())],
        CloseCode::Unsupported,
    )
    .await;
}

#[tokio::test]
async fn ping_flood_closes_1008() {
    let flood = (0..2_000)
        .map(|nonce| WsMessage::Binary(protocol::encode(&Message::Ping { nonce }).into()))
        .collect();
    let reason =
        bad_input_closes_only_that_connection(|_| {}, true, flood, CloseCode::Policy).await;
    assert!(reason.contains("rate"), "{reason}");
}

#[tokio::test]
async fn first_frame_other_than_hello_closes_1002() {
    let frame = protocol::encode(&Message::Ping { nonce: 1 });
    let reason =
        bad_input_closes_only_that_connection(|_| {}, false, binary(&frame), CloseCode::Protocol)
            .await;
    assert!(reason.contains("must be Hello, not Ping"), "{reason}");
}

#[tokio::test]
async fn no_hello_in_time_closes_1008() {
    let relay = Relay::start(|c| c.hello_timeout = Duration::from_millis(200)).await;
    let mut ws = connect(&relay).await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("Hello"), "{reason}");
    drop(ws);
    relay.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_with_503() {
    let relay = Relay::start(|c| c.max_connections = 2).await;
    let mut first = session(&relay).await;
    let mut second = session(&relay).await;
    let url = format!("ws://{}/", relay.addr);
    match timeout(LIMIT, tokio_tungstenite::connect_async(&url))
        .await
        .unwrap()
    {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    assert_eq!(relay.metric("weft_connections_refused_total").await, 1);
    // Plain HTTP is not counted against the cap.
    assert_eq!(http_get(relay.addr, "/healthz").await.1, "ok\n");
    // Closing one session frees its slot by the time the client sees the socket end.
    first.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(LIMIT, first.next()).await {}
    let mut third = session(&relay).await;
    assert_healthy(&mut third, 1).await;
    assert_healthy(&mut second, 2).await;
    assert_eq!(relay.metric("weft_connections").await, 2);
    drop((second, third));
    relay.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_run_returns() {
    let relay = Relay::start(|_| {}).await;
    let mut welcomed = session(&relay).await;
    let mut fresh = connect(&relay).await;
    // A client still sending its request head does not hold up the shutdown.
    let mut slow = TcpStream::connect(relay.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let addr = relay.addr;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(relay.stop());
    let (code, reason) = expect_close(&mut welcomed).await;
    assert_eq!(code, CloseCode::Away, "{reason}");
    drop(welcomed);
    assert_eq!(expect_close(&mut fresh).await.0, CloseCode::Away);
    drop(fresh);
    let mut rest = Vec::new();
    let read = timeout(LIMIT, slow.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err() || rest.is_empty(), "{read:?} {rest:?}");
    timeout(LIMIT, stopping).await.unwrap().unwrap();
    // Well inside the 5 s grace: nothing was waited out.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // The listener is gone.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn weft_serve_process_answers_healthz_and_exits_0_on_sigterm() {
    use std::io::{Read, Write};
    use std::process::Command;
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let mut relay = RelayProcess::start(&data, &[]);
    let addr = relay
        .url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("unexpected address {}", relay.url))
        .to_owned();
    assert!(!addr.ends_with(":0"), "{addr}");

    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("\r\n\r\nok\n"), "{response}");
    assert!(data.join("relay.db").exists());

    let killed = Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            panic!("weft serve did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

/// A well-formed frame whose Automerge content is garbage: typed errors for those documents, the
/// session goes on, and the relay stores nothing of them (its good document is untouched).
#[tokio::test]
async fn garbage_automerge_in_a_valid_frame_is_refused_and_nothing_is_stored() {
    use weft::automerge::AutoCommit;
    use weft::protocol::{ErrorCode, Payload, SyncItem};
    let relay = Relay::start(|_| {}).await;
    let mut ws = session(&relay).await;
    let mut doc = AutoCommit::new();
    weft::json::create_root(
        &mut doc,
        &weft::json::parse_object(r#"{"title":"good"}"#).unwrap(),
    )
    .unwrap();
    let good = weft::DocumentId::from_bytes([1; 16]);
    let heads = doc.get_heads();
    let whole = doc.save();
    let item = |id: [u8; 16], collection: &str, payload: Payload| SyncItem {
        id: weft::DocumentId::from_bytes(id),
        collection: collection.into(),
        payload,
    };
    send(
        &mut ws,
        &Message::Sync {
            batch: vec![item([1; 16], "todos", Payload::Whole(whole.clone()))],
        },
    )
    .await;
    let Message::Persisted { docs } = recv(&mut ws).await else {
        panic!("expected Persisted")
    };
    assert_eq!(docs, vec![(good, heads.iter().map(|h| h.0).collect())]);

    send(
        &mut ws,
        &Message::Sync {
            batch: vec![
                item(
                    [2; 16],
                    "todos",
                    Payload::Whole(b"not automerge at all".to_vec()),
                ),
                item([1; 16], "todos", Payload::Sync(vec![0x42, 0, 1, 2, 3])),
                item([3; 16], "notes", Payload::Whole(whole.clone())),
            ],
        },
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        match recv(&mut ws).await {
            Message::Error { code, message, .. } => {
                assert!(!message.is_empty());
                codes.push(code);
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }
    codes.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        codes,
        vec![
            ErrorCode::BadDocument,
            ErrorCode::BadDocument,
            ErrorCode::Forbidden
        ]
    );
    assert_healthy(&mut ws, 1).await;
    drop(ws);
    let dir = relay.stop().await.unwrap();
    let stored = weft::Replica::open(dir.path().join("data/relay.db")).unwrap();
    assert_eq!(
        stored.counts().unwrap(),
        (1, 0, 1),
        "only the good document, one feed entry"
    );
    let doc = stored.get(&good).unwrap();
    assert_eq!(doc.body, serde_json::json!({"title": "good"}));
    assert_eq!(doc.heads, heads);
}

#[tokio::test]
async fn a_silent_client_is_pinged_then_closed_and_a_listening_one_is_kept() {
    let keepalive = Duration::from_millis(150);
    let relay = Relay::start(|c| c.keepalive = keepalive).await;
    let mut silent = session(&relay).await;
    let mut listening = session(&relay).await;
    // The listening client reads (tungstenite answers each ping with a pong while reading)
    // for well over two keepalive periods and sees the relay's pings.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + keepalive * 5;
    while let Ok(next) = tokio::time::timeout_at(until, listening.next()).await {
        match next {
            Some(Ok(WsMessage::Ping(_))) => pings += 1,
            other => panic!("expected pings only, got {other:?}"),
        }
    }
    assert!(pings >= 1, "the relay pinged a quiet session");
    assert_healthy(&mut listening, 1).await;
    // The silent client never read, so it never answered: it was closed as gone.
    let close = loop {
        match timeout(LIMIT, silent.next()).await.expect("no close") {
            Some(Ok(WsMessage::Ping(_))) => continue,
            Some(Ok(WsMessage::Close(Some(frame)))) => break frame,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Away);
    assert!(close.reason.contains("no traffic"), "{}", close.reason);
    assert_eq!(relay.metric("weft_connections").await, 1);
    assert_eq!(relay.metric("weft_protocol_errors_total").await, 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_answers_keepalive_pings_and_stays_connected() {
    let keepalive = Duration::from_millis(100);
    let relay = Relay::start(|c| c.keepalive = keepalive).await;
    let dir = tempfile::tempdir().unwrap();
    let replica = weft::Replica::open(dir.path().join("client.db")).unwrap();
    let options = weft::net::ConnectOptions {
        // The client's own keepalive stays out of the way: the relay's pings are under test.
        keepalive: Duration::from_secs(60),
        ..Default::default()
    };
    let connection = replica.connect(&relay.url(), options);
    timeout(LIMIT, connection.wait_synced())
        .await
        .expect("sync timed out")
        .expect("sync failed");
    // Idle for ten keepalive periods: the relay pings, the client's pongs keep it open. (The
    // passing of time is what is under test here, so this sleep is the test, not a wait.)
    tokio::time::sleep(keepalive * 10).await;
    assert_eq!(relay.metric("weft_connections").await, 1);
    assert_eq!(
        relay.metric("weft_connections_total").await,
        1,
        "never reconnected"
    );
    assert_eq!(connection.status(), weft::net::Status::Synced);
    connection.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_while_others_keep_syncing() {
    let relay = Relay::start(|c| c.send_timeout = Duration::from_secs(1)).await;
    // A session that reconciles (empty catalog: in sync) and then never reads again.
    let mut stuck = session(&relay).await;
    send(
        &mut stuck,
        &Message::Summary {
            count: 0,
            buckets: vec![0; 256],
        },
    )
    .await;
    // A writer pushes far more than the kernel's socket buffers hold: every document is fanned
    // out to the stuck session (in its scope), which cannot take it.
    let dir = tempfile::tempdir().unwrap();
    let writer = weft::Replica::open(dir.path().join("writer.db")).unwrap();
    let connection = writer.connect(&relay.url(), weft::net::ConnectOptions::default());
    // Incompressible (Automerge deflates long values): ~400 KB stored per document.
    let mut noise = SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for i in 0..60 {
        let blob: String = (0..512 * 1024)
            .map(|_| char::from(alphabet[noise.below(64) as usize]))
            .collect();
        writer
            .create("todos", serde_json::json!({ "i": i, "blob": blob }))
            .unwrap();
    }
    timeout(LIMIT, connection.wait_synced())
        .await
        .expect("the writer did not get in sync")
        .expect("sync failed");
    // The stuck session is closed once a write to it has waited for send_timeout; the writer's
    // session goes on.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while relay.metric("weft_connections").await > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck session was never cut off: {} bytes out, {} stored",
            relay.metric("weft_bytes_out_total").await,
            relay.metric("weft_documents_stored").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.metric("weft_documents_stored").await, 60);
    assert_eq!(relay.metric("weft_protocol_errors_total").await, 1);
    writer
        .create("todos", serde_json::json!({"after": true}))
        .unwrap();
    timeout(LIMIT, connection.wait_synced())
        .await
        .expect("the writer stopped syncing")
        .expect("sync failed");
    assert_eq!(relay.metric("weft_documents_stored").await, 61);
    connection.close().await;
    drop(stuck);
    relay.stop().await;
}
