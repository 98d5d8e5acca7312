//! One WebSocket session: the `Hello` handshake, `Ping`/`Pong`, and closing with a code that says
//! what was wrong when the peer misbehaves.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError as WsProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

use super::applier::NotApplied;
use super::auth::{self, AuthError};
use super::http::Rewind;
use super::metrics::ConnectionGauge;
use super::rate::TokenBucket;
use super::server::Shared;

use super::router::{Frame, Outbound, Router, Session};
use crate::engine::PeerEvent;
use crate::protocol::{self, ErrorCode, Message, ProtocolError, RejectCode, WireScope};
use crate::{Access, Scope, SessionFailure, SessionInput};

/// What a session was granted at `Hello`.
struct Admitted {
    access: Access,
    /// When the token expires: the session ends then.
    expires: Option<tokio::time::Instant>,
    subject: Option<String>,
}

/// Checks a `Hello`'s token against the relay's secret and narrows the requested scope to
/// what the token allows. `Err`: the `Reject` to send.
fn admit(
    shared: &Shared,
    token: Option<String>,
    requested: WireScope,
) -> Result<Admitted, (RejectCode, String)> {
    let requested = match requested {
        WireScope::All => Scope::All,
        WireScope::Collections(c) => Scope::Collections(c),
    };
    let Some(key) = &shared.config.auth else {
        // The client cannot tell (Welcome says nothing about auth); whoever runs the relay
        // may believe tokens are checked: say it once.
        static TOKEN_IGNORED: std::sync::Once = std::sync::Once::new();
        if token.is_some() {
            TOKEN_IGNORED.call_once(|| {
                tracing::warn!(
                    "a client sent a token, but this relay has no authentication \
                     (--auth-secret-file): tokens are ignored, every client reads and writes \
                     everything"
                );
            });
        }
        return Ok(Admitted {
            access: Access {
                creates: shared.config.creates,
                ..Access::full(requested)
            },
            expires: None,
            subject: None,
        });
    };
    let token = token.ok_or((RejectCode::Unauthorized, AuthError::Missing.to_string()))?;
    let grant = key
        .verify(&token)
        .map_err(|e| (RejectCode::Unauthorized, e.to_string()))?;
    let read = auth::narrow(&requested, &grant.read).map_err(|missing| {
        (
            RejectCode::Forbidden,
            format!(
                "the token of {:?} does not allow reading {}",
                grant.subject,
                missing.join(", ")
            ),
        )
    })?;
    let write = auth::intersect(&read, &grant.write);
    Ok(Admitted {
        expires: Some(tokio::time::Instant::now() + grant.remaining()),
        subject: Some(grant.subject),
        access: Access {
            read,
            write,
            creates: shared.config.creates,
        },
    })
}

type Ws = WebSocketStream<Rewind>;

/// How long closing may take: sending the close frame, then waiting for the peer to hang up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Close reasons must fit a control frame (125 bytes, 2 of them the code).
const MAX_REASON: usize = 120;

/// Why the session ends from our side.
struct Close {
    code: CloseCode,
    reason: String,
}

impl Close {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Close {
            code,
            reason: reason.into(),
        }
    }
}

enum Phase {
    AwaitingHello,
    Ready,
}

/// Runs a session until either side closes it or the relay shuts down.
pub(crate) async fn session(
    mut ws: Ws,
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let gauge = ConnectionGauge::new(&shared.metrics);
    tracing::debug!("session open");
    let mut bucket = TokenBucket::new(shared.config.rate_limit, Instant::now());
    let mut byte_bucket = TokenBucket::new(shared.config.byte_limit, Instant::now());
    // When the session's token expires (never without auth).
    let mut expires: Option<tokio::time::Instant> = None;
    let mut phase = Phase::AwaitingHello;
    let router = Router::of(&shared.replica);
    // The replication session, once Welcome is sent: its id and the frames the replica sends it.
    let mut sync: Option<Session> = None;
    let hello_deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let keepalive_every = shared.config.keepalive;
    // Checked four times per period: a session is pinged at most 1.25 periods after it went
    // quiet, well before the two periods after which it is closed. (And often enough to notice
    // a client paused for longer than the send timeout.)
    let check = (keepalive_every / 4).min(shared.config.send_timeout / 4);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + check, check);
    let mut last_ping = Instant::now();
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let outcome: Option<Close> = loop {
        let next = async {
            match phase {
                Phase::AwaitingHello => tokio::time::timeout_at(hello_deadline, ws.next())
                    .await
                    .map_err(|_| ()),
                Phase::Ready => Ok(ws.next().await),
            }
        };
        let outbound = async {
            match sync.as_mut() {
                Some(session) => session.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let expiry = async {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let incoming = tokio::select! {
            () = stopped(&mut stop) => {
                break Some(Close::new(CloseCode::Away, "relay shutting down"));
            }
            () = expiry => {
                break Some(Close::new(CloseCode::Policy, "the token expired"));
            }
            _ = keepalive.tick() => {
                // A client that has not read its queue down for the send timeout: its frames
                // fit the socket buffers, so no single write timed out, but it is not reading.
                if let Some(paused) = sync
                    .as_ref()
                    .and_then(|s| s.flow.paused_for())
                    .filter(|p| *p >= shared.config.send_timeout)
                {
                    break Some(Close::new(
                        CloseCode::Policy,
                        format!("the client did not read for {} s", paused.as_secs()),
                    ));
                }
                let silent = last_heard.elapsed();
                if silent >= keepalive_every * 2 {
                    break Some(Close::new(
                        CloseCode::Away,
                        format!("no traffic for {} s", silent.as_secs()),
                    ));
                }
                if silent >= keepalive_every && last_ping.elapsed() >= keepalive_every {
                    last_ping = Instant::now();
                    if ws.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                        break None;
                    }
                }
                continue;
            }
            out = outbound => {
                match out {
                    Some(Outbound::Frame(frame)) => {
                        if let Err(close) = send_queued(&mut ws, shared, sync.as_ref(), frame).await {
                            break close;
                        }
                    }
                    // The engine ended the session (the client broke the protocol); its
                    // Error frame saying why was queued before this event and is sent.
                    Some(Outbound::Event(PeerEvent::Closed { reason })) => {
                        break Some(Close::new(CloseCode::Protocol, reason));
                    }
                    Some(Outbound::Event(event)) => tracing::debug!(?event, "session event"),
                    None => break Some(Close::new(CloseCode::Error, "replica router closed")),
                }
                continue;
            }
            incoming = next => incoming,
        };
        let incoming = match incoming {
            Ok(incoming) => incoming,
            Err(()) => break Some(Close::new(CloseCode::Policy, "no Hello in time")),
        };
        let message = match incoming {
            None => break None,
            Some(Ok(message)) => {
                last_heard = Instant::now();
                message
            }
            Some(Err(e)) => break close_for_ws_error(e),
        };
        if message_counts(&message) {
            shared.metrics.frame_in(message.len());
            let now = Instant::now();
            let limited = if !bucket.take(now) {
                Some("frame rate limit exceeded")
            } else if !byte_bucket.take_n(message.len() as f64, now) {
                Some("byte rate limit exceeded")
            } else {
                None
            };
            if let Some(what) = limited {
                shared
                    .metrics
                    .rate_limited
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Say why in the protocol too (a close reason is easy to lose), then close:
                // a flooding client costs the relay until it is gone.
                let error = Message::Error {
                    code: ErrorCode::RateLimited,
                    message: what.into(),
                    doc: None,
                };
                let _ = send(&mut ws, shared, &error).await;
                break Some(Close::new(CloseCode::Policy, what));
            }
        }
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Text(_) => {
                break Some(Close::new(
                    CloseCode::Unsupported,
                    "text frames are not supported; send binary weft frames",
                ));
            }
            // tungstenite answers pings (while reading) and the peer's close by itself.
            _ => continue,
        };
        let frame_len = bytes.len();
        let frame = match protocol::decode(&bytes, shared.config.max_frame) {
            Ok(frame) => frame,
            Err(e) => break close_for_decode_error(&mut ws, shared, &phase, e).await,
        };
        match (&phase, frame) {
            (
                Phase::AwaitingHello,
                Message::Hello {
                    protocol: version,
                    replica,
                    scope,
                    token,
                },
            ) => {
                if version != u16::from(protocol::PROTOCOL_VERSION) {
                    let reason = format!(
                        "protocol version {version} is not supported (this relay speaks {})",
                        protocol::PROTOCOL_VERSION
                    );
                    let reject = Message::Reject {
                        code: RejectCode::ProtocolVersion,
                        reason: reason.clone(),
                    };
                    if send(&mut ws, shared, &reject).await.is_err() {
                        break None;
                    }
                    break Some(Close::new(CloseCode::Protocol, reason));
                }
                let admitted = match admit(shared, token, scope) {
                    Ok(admitted) => admitted,
                    Err((code, reason)) => {
                        tracing::info!(client = %replica, ?code, %reason, "refused");
                        shared
                            .metrics
                            .sessions_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let reject = Message::Reject {
                            code,
                            reason: reason.clone(),
                        };
                        if send(&mut ws, shared, &reject).await.is_err() {
                            break None;
                        }
                        break Some(Close::new(CloseCode::Policy, reason));
                    }
                };
                tracing::info!(client = %replica, subject = ?admitted.subject, "hello");
                expires = admitted.expires;
                let welcome = Message::Welcome {
                    replica: shared.relay_id,
                    scope: match &admitted.access.read {
                        Scope::All => WireScope::All,
                        Scope::Collections(c) => WireScope::Collections(c.clone()),
                    },
                    max_frame: u32::try_from(shared.config.max_frame).unwrap_or(u32::MAX),
                };
                if send(&mut ws, shared, &welcome).await.is_err() {
                    break None;
                }
                phase = Phase::Ready;
                let session = router.register(None);
                let peer_id = session.peer;
                let connected = SessionInput::Connected {
                    peer: peer_id,
                    remote: replica,
                    access: admitted.access,
                    initiator: false,
                };
                // Set first, so that the session is unregistered however this ends.
                sync = Some(session);
                if let Err(e) = shared.applier.apply(connected, 0).await {
                    break not_applied(&mut ws, shared, e).await;
                }
            }
            (Phase::AwaitingHello, other) => {
                break Some(Close::new(
                    CloseCode::Protocol,
                    format!("the first frame must be Hello, not {}", other.kind()),
                ));
            }
            (Phase::Ready, Message::Hello { .. }) => {
                let error = Message::Error {
                    code: ErrorCode::Unexpected,
                    message: "Hello sent twice: the handshake is over".into(),
                    doc: None,
                };
                let _ = send(&mut ws, shared, &error).await;
                break Some(Close::new(CloseCode::Protocol, "Hello sent twice"));
            }
            (Phase::Ready, Message::Ping { nonce }) => {
                if send(&mut ws, shared, &Message::Pong { nonce })
                    .await
                    .is_err()
                {
                    break None;
                }
            }
            (Phase::Ready, Message::Pong { .. }) => {}
            // Every other message goes to the engine, whose role table refuses what a client
            // may not send (Entries, Persisted, Welcome, Reject) and ends the session.
            (Phase::Ready, other) => {
                let Some(session) = sync.as_ref() else {
                    break None;
                };
                let arrived = Instant::now();
                // Applied by the relay's single writer, together with whatever other sessions
                // sent meanwhile; awaited, so this session's frames are applied in order.
                let applied = shared
                    .applier
                    .apply(
                        SessionInput::Message {
                            peer: session.peer,
                            message: other,
                        },
                        frame_len,
                    )
                    .await;
                shared.metrics.sync_latency.observe(arrived.elapsed());
                if let Err(e) = applied {
                    break not_applied(&mut ws, shared, e).await;
                }
            }
        }
    };
    if let Some(Session { peer: peer_id, .. }) = sync.take() {
        router.unregister(peer_id);
        let _ = shared
            .applier
            .apply(SessionInput::Disconnected { peer: peer_id }, 0)
            .await;
    }
    // Free the slot before the socket closes: a peer that saw the close may reconnect at once.
    drop(permit);
    drop(gauge);
    if let Some(close) = outcome {
        if close.code != CloseCode::Away {
            shared
                .metrics
                .protocol_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(code = u16::from(close.code), reason = %close.reason, %peer, "closing");
        close_with(ws, close).await;
    } else {
        tracing::debug!("session closed by peer");
    }
}

/// A frame the relay could not apply ends the session, saying why: a failed store (a full
/// disk) as a typed `Error { Storage }` first, so the client reports the cause and retries
/// later; nothing of the frame was stored or acknowledged.
async fn not_applied(ws: &mut Ws, shared: &Shared, e: NotApplied) -> Option<Close> {
    match e {
        NotApplied::Gone => Some(Close::new(CloseCode::Away, "relay shutting down")),
        NotApplied::Failed(SessionFailure::Panicked) => Some(Close::new(
            CloseCode::Error,
            "internal error while applying a frame",
        )),
        NotApplied::Failed(SessionFailure::Storage(cause)) => {
            tracing::warn!(%cause, "storage failed: the session's writes were refused");
            let error = Message::Error {
                code: ErrorCode::Storage,
                message: format!("the relay could not store what this session sent: {cause}"),
                doc: None,
            };
            let _ = send(ws, shared, &error).await;
            Some(Close::new(
                CloseCode::Again,
                format!("relay storage failed: {cause}"),
            ))
        }
    }
}

/// Frames that count for metrics and the rate limit: everything the peer sends but its close.
fn message_counts(message: &WsMessage) -> bool {
    !matches!(message, WsMessage::Close(_) | WsMessage::Frame(_))
}

/// A WebSocket-level read failure: a close code when the peer can still hear one.
fn close_for_ws_error(e: WsError) -> Option<Close> {
    match e {
        WsError::Capacity(e) => Some(Close::new(CloseCode::Size, e.to_string())),
        WsError::Utf8(e) => Some(Close::new(CloseCode::Invalid, e)),
        WsError::Protocol(WsProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(e) => Some(Close::new(CloseCode::Protocol, e.to_string())),
        e => {
            tracing::debug!("connection lost: {e}");
            None
        }
    }
}

/// A frame that does not decode. A frame of another protocol version gets a `Reject` first
/// when it opens the session, so an old or new client can tell the user to upgrade.
async fn close_for_decode_error(
    ws: &mut Ws,
    shared: &Shared,
    phase: &Phase,
    e: ProtocolError,
) -> Option<Close> {
    let code = match e {
        ProtocolError::TooLarge { .. } => CloseCode::Size,
        ProtocolError::Version { .. } => {
            if matches!(phase, Phase::AwaitingHello) {
                let reject = Message::Reject {
                    code: RejectCode::ProtocolVersion,
                    reason: e.to_string(),
                };
                send(ws, shared, &reject).await.ok()?;
            }
            CloseCode::Protocol
        }
        _ => CloseCode::Invalid,
    };
    Some(Close::new(code, e.to_string()))
}

/// Writes a frame the replica queued for this session, within the send timeout, and resumes
/// the session if this drained its queue (see `router`). `Err(None)`: the connection is gone.
async fn send_queued(
    ws: &mut Ws,
    shared: &Shared,
    session: Option<&Session>,
    frame: Frame,
) -> Result<(), Option<Close>> {
    let len = frame.bytes.len();
    match timeout(
        shared.config.send_timeout,
        ws.send(WsMessage::Binary(frame.bytes)),
    )
    .await
    {
        Err(_) => {
            return Err(Some(Close::new(
                CloseCode::Policy,
                format!(
                    "the client did not read for {:?}",
                    shared.config.send_timeout
                ),
            )));
        }
        Ok(Err(_)) => return Err(None),
        Ok(Ok(())) => shared.metrics.frame_out(len),
    }
    if let Some(session) = session.filter(|s| s.flow.written(len)) {
        let resumed = SessionInput::Flow {
            peer: session.peer,
            paused: false,
        };
        let _ = shared.applier.apply(resumed, 0).await;
    }
    Ok(())
}

async fn send(ws: &mut Ws, shared: &Shared, message: &Message) -> Result<(), WsError> {
    let frame = protocol::encode(message);
    let len = frame.len();
    ws.send(WsMessage::Binary(Bytes::from(frame))).await?;
    shared.metrics.frame_out(len);
    Ok(())
}

/// Sends the close frame, then closes our half and discards whatever the peer still sends until
/// it hangs up (bounded). Dropping a socket with unread bytes would make the kernel send a reset,
/// which can destroy the close frame before the peer reads it — typical after an oversized frame,
/// whose payload we never read.
async fn close_with(mut ws: Ws, close: Close) {
    let mut reason = close.reason;
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let frame = CloseFrame {
        code: close.code,
        reason: reason.into(),
    };
    let _ = timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
    let stream = ws.get_mut();
    let _ = timeout(CLOSE_TIMEOUT, async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Resolves once `stop` turns true (or its sender is gone), without holding the watch guard.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
