//! One WebSocket session: the `Hello` handshake, `Ping`/`Pong`, and closing with a code that says
//! what was wrong when the peer misbehaves.

use std::net::SocketAddr;
use std::ops::ControlFlow;
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

/// What a session was granted at `Hello` (or an automerge-repo `join`).
pub(crate) struct Admitted {
    pub(crate) access: Access,
    /// When the token expires: the session ends then.
    pub(crate) expires: Option<tokio::time::Instant>,
    pub(crate) subject: Option<String>,
}

/// Checks a `Hello`'s token against the relay's secret and narrows the requested scope to
/// what the token allows. `Err`: the `Reject` to send.
pub(crate) fn admit(
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
            interest: crate::Interest::Catalog,
            label: None,
        },
    })
}

pub(crate) type Ws = WebSocketStream<Rewind>;

/// How long closing may take: sending the close frame, then waiting for the peer to hang up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Close reasons must fit a control frame (125 bytes, 2 of them the code).
const MAX_REASON: usize = 120;

/// Why the session ends from our side.
pub(crate) struct Close {
    pub(crate) code: CloseCode,
    pub(crate) reason: String,
}

impl Close {
    pub(crate) fn new(code: CloseCode, reason: impl Into<String>) -> Self {
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

/// What handling one event decided: go on, or end the session with a close frame to send
/// (`None`: the connection is gone, there is nobody to tell).
pub(crate) type Next = ControlFlow<Option<Close>>;

/// The end of the session, with a close frame for the peer.
pub(crate) fn close(code: CloseCode, reason: impl Into<String>) -> Next {
    ControlFlow::Break(Some(Close::new(code, reason)))
}

/// The connection is gone: end without a close frame.
pub(crate) const GONE: Next = ControlFlow::Break(None);

/// What woke the session up.
pub(crate) enum Event {
    Stop,
    TokenExpired,
    Keepalive,
    Outbound(Option<Outbound>),
    /// A WebSocket message (or its end, or an error); `Err`: no handshake in time.
    Incoming(Result<Option<Result<WsMessage, WsError>>, ()>),
}

/// The keepalive check of a relay session: four times per period, so a session is pinged at
/// most 1.25 periods after it went quiet, well before the two periods after which it is closed
/// (and often enough to notice a client paused for longer than the send timeout).
pub(crate) fn keepalive_timer(shared: &Shared) -> tokio::time::Interval {
    let check = (shared.config.keepalive / 4).min(shared.config.send_timeout / 4);
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + check, check);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Waits for what wakes a relay session (of either protocol) next. `handshake_by`: until the
/// handshake is done, when it must have come; `expires`: the token's expiry.
pub(crate) async fn next_event(
    ws: &mut Ws,
    sync: &mut Option<Session>,
    handshake_by: Option<tokio::time::Instant>,
    expires: Option<tokio::time::Instant>,
    keepalive: &mut tokio::time::Interval,
    stop: &mut watch::Receiver<bool>,
) -> Event {
    let next = async {
        match handshake_by {
            Some(by) => tokio::time::timeout_at(by, ws.next()).await.map_err(|_| ()),
            None => Ok(ws.next().await),
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
    tokio::select! {
        () = stopped(stop) => Event::Stop,
        () = expiry => Event::TokenExpired,
        _ = keepalive.tick() => Event::Keepalive,
        out = outbound => Event::Outbound(out),
        incoming = next => Event::Incoming(incoming),
    }
}

/// A WebSocket message as a session receives it: counts as traffic heard; its end or a read
/// error ends the session (`Err`: how).
pub(crate) fn heard(
    incoming: Option<Result<WsMessage, WsError>>,
    last_heard: &mut Instant,
) -> Result<WsMessage, Next> {
    match incoming {
        None => Err(GONE),
        Some(Ok(message)) => {
            *last_heard = Instant::now();
            Ok(message)
        }
        Some(Err(e)) => Err(ControlFlow::Break(close_for_ws_error(e))),
    }
}

/// One relay session's connection and state.
struct Conn<'a> {
    ws: Ws,
    shared: &'a Shared,
    router: std::sync::Arc<Router>,
    phase: Phase,
    /// The replication session, once Welcome is sent: its id and the frames the replica
    /// sends it.
    sync: Option<Session>,
    /// When the session's token expires (never without auth).
    expires: Option<tokio::time::Instant>,
    frames: TokenBucket,
    bytes: TokenBucket,
    last_heard: Instant,
    last_ping: Instant,
}

/// Runs a session until either side closes it or the relay shuts down.
pub(crate) async fn session(
    ws: Ws,
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let gauge = ConnectionGauge::new(&shared.metrics);
    tracing::debug!("session open");
    let mut conn = Conn {
        ws,
        shared,
        router: Router::of(&shared.replica),
        phase: Phase::AwaitingHello,
        sync: None,
        expires: None,
        frames: TokenBucket::new(shared.config.rate_limit, Instant::now()),
        bytes: TokenBucket::new(shared.config.byte_limit, Instant::now()),
        last_heard: Instant::now(),
        last_ping: Instant::now(),
    };
    let outcome = conn.run(&mut stop).await;
    let ending = Ending {
        sync: conn.sync.take(),
        permit,
        gauge,
        peer,
    };
    ending.finish(conn.ws, shared, &conn.router, outcome).await;
}

/// What a relay session (of either protocol) holds until it ends.
pub(crate) struct Ending<'a> {
    pub(crate) sync: Option<Session>,
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) gauge: ConnectionGauge<'a>,
    pub(crate) peer: SocketAddr,
}

impl Ending<'_> {
    /// Ends the replication session, frees the connection slot, and closes the socket with
    /// `outcome`'s code (`None`: the peer is gone or closed first).
    pub(crate) async fn finish(
        self,
        ws: Ws,
        shared: &Shared,
        router: &Router,
        outcome: Option<Close>,
    ) {
        if let Some(Session { peer: peer_id, .. }) = self.sync {
            router.unregister(peer_id);
            let _ = shared
                .applier
                .apply(SessionInput::Disconnected { peer: peer_id }, 0)
                .await;
        }
        // Free the slot before the socket closes: a peer that saw the close may reconnect at
        // once.
        drop(self.permit);
        drop(self.gauge);
        if let Some(close) = outcome {
            if close.code != CloseCode::Away && close.code != CloseCode::Normal {
                shared
                    .metrics
                    .protocol_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(code = u16::from(close.code), reason = %close.reason, peer = %self.peer, "closing");
            close_with(ws, close).await;
        } else {
            tracing::debug!("session closed by peer");
        }
    }
}

impl Conn<'_> {
    /// The session's loop: waits for the next event and hands it to its handler.
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Option<Close> {
        let hello_deadline = tokio::time::Instant::now() + self.shared.config.hello_timeout;
        let mut keepalive = keepalive_timer(self.shared);
        loop {
            let handshake_by = matches!(self.phase, Phase::AwaitingHello).then_some(hello_deadline);
            let event = next_event(
                &mut self.ws,
                &mut self.sync,
                handshake_by,
                self.expires,
                &mut keepalive,
                stop,
            )
            .await;
            let next = match event {
                Event::Stop => close(CloseCode::Away, "relay shutting down"),
                Event::TokenExpired => close(CloseCode::Policy, "the token expired"),
                Event::Keepalive => self.keepalive().await,
                Event::Outbound(out) => self.outbound(out).await,
                Event::Incoming(Err(())) => close(CloseCode::Policy, "no Hello in time"),
                Event::Incoming(Ok(incoming)) => self.incoming(incoming).await,
            };
            if let ControlFlow::Break(outcome) = next {
                return outcome;
            }
        }
    }

    async fn keepalive(&mut self) -> Next {
        let (last_heard, session) = (self.last_heard, self.sync.as_ref());
        keepalive(
            &mut self.ws,
            self.shared,
            session,
            last_heard,
            &mut self.last_ping,
        )
        .await
    }

    /// What the replica queued for this session: a frame to write, or an event.
    async fn outbound(&mut self, out: Option<Outbound>) -> Next {
        match out {
            Some(Outbound::Frame(frame)) => {
                match send_queued(&mut self.ws, self.shared, self.sync.as_ref(), frame).await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(close) => ControlFlow::Break(close),
                }
            }
            // The engine ended the session (the client broke the protocol); its Error frame
            // saying why was queued before this event and is sent.
            Some(Outbound::Event(PeerEvent::Closed { reason })) => {
                close(CloseCode::Protocol, reason)
            }
            Some(Outbound::Event(event)) => {
                tracing::debug!(?event, "session event");
                ControlFlow::Continue(())
            }
            None => close(CloseCode::Error, "replica router closed"),
        }
    }

    /// A WebSocket message from the client: counted against the rate limits, decoded, and
    /// handled by the phase of the session.
    async fn incoming(&mut self, incoming: Option<Result<WsMessage, WsError>>) -> Next {
        let message = match heard(incoming, &mut self.last_heard) {
            Ok(message) => message,
            Err(end) => return end,
        };
        if message_counts(&message) {
            self.rate_limit(message.len()).await?;
        }
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Text(_) => {
                return close(
                    CloseCode::Unsupported,
                    "text frames are not supported; send binary weft frames",
                );
            }
            // tungstenite answers pings (while reading) and the peer's close by itself.
            _ => return ControlFlow::Continue(()),
        };
        let frame = match protocol::decode(&bytes, self.shared.config.max_frame) {
            Ok(frame) => frame,
            Err(e) => {
                let closing =
                    close_for_decode_error(&mut self.ws, self.shared, &self.phase, e).await;
                return ControlFlow::Break(closing);
            }
        };
        match (&self.phase, frame) {
            (
                Phase::AwaitingHello,
                Message::Hello {
                    protocol: version,
                    replica,
                    scope,
                    token,
                },
            ) => self.hello(version, replica, token, scope).await,
            (Phase::AwaitingHello, other) => close(
                CloseCode::Protocol,
                format!("the first frame must be Hello, not {}", other.kind()),
            ),
            (Phase::Ready, Message::Hello { .. }) => {
                let error = Message::Error {
                    code: ErrorCode::Unexpected,
                    message: "Hello sent twice: the handshake is over".into(),
                    doc: None,
                };
                let _ = send(&mut self.ws, self.shared, &error).await;
                close(CloseCode::Protocol, "Hello sent twice")
            }
            (Phase::Ready, Message::Ping { nonce }) => {
                match send(&mut self.ws, self.shared, &Message::Pong { nonce }).await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => GONE,
                }
            }
            (Phase::Ready, Message::Pong { .. }) => ControlFlow::Continue(()),
            // Every other message goes to the engine, whose role table refuses what a client
            // may not send (Entries, Persisted, Welcome, Reject) and ends the session.
            (Phase::Ready, other) => self.apply(other, bytes.len()).await,
        }
    }

    /// The frame and byte rate limits: a flooding client is told, then closed.
    async fn rate_limit(&mut self, len: usize) -> Next {
        let Some(what) = over_rate(self.shared, &mut self.frames, &mut self.bytes, len) else {
            return ControlFlow::Continue(());
        };
        // Say why in the protocol too (a close reason is easy to lose), then close: a
        // flooding client costs the relay until it is gone.
        let error = Message::Error {
            code: ErrorCode::RateLimited,
            message: what.into(),
            doc: None,
        };
        let _ = send(&mut self.ws, self.shared, &error).await;
        close(CloseCode::Policy, what)
    }

    /// The handshake: the protocol version, the token, then `Welcome` (or `Reject`) and the
    /// replication session.
    async fn hello(
        &mut self,
        version: u16,
        replica: crate::ReplicaId,
        token: Option<String>,
        scope: WireScope,
    ) -> Next {
        let shared = self.shared;
        if version != u16::from(protocol::PROTOCOL_VERSION) {
            let reason = format!(
                "protocol version {version} is not supported (this relay speaks {})",
                protocol::PROTOCOL_VERSION
            );
            return self
                .reject(RejectCode::ProtocolVersion, reason, CloseCode::Protocol)
                .await;
        }
        let admitted = match admit(shared, token, scope) {
            Ok(admitted) => admitted,
            Err((code, reason)) => {
                tracing::info!(client = %replica, ?code, %reason, "refused");
                shared
                    .metrics
                    .sessions_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return self.reject(code, reason, CloseCode::Policy).await;
            }
        };
        tracing::info!(client = %replica, subject = ?admitted.subject, "hello");
        self.expires = admitted.expires;
        let welcome = Message::Welcome {
            replica: shared.relay_id,
            scope: match &admitted.access.read {
                Scope::All => WireScope::All,
                Scope::Collections(c) => WireScope::Collections(c.clone()),
            },
            max_frame: u32::try_from(shared.config.max_frame).unwrap_or(u32::MAX),
        };
        if send(&mut self.ws, shared, &welcome).await.is_err() {
            return GONE;
        }
        self.phase = Phase::Ready;
        let session = self.router.register(None);
        let connected = SessionInput::Connected {
            peer: session.peer,
            remote: replica,
            access: admitted.access,
            initiator: false,
        };
        // Set first, so that the session is unregistered however this ends.
        self.sync = Some(session);
        match shared.applier.apply(connected, 0).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(not_applied(&mut self.ws, shared, e).await),
        }
    }

    /// Refuses the session: `Reject` with the reason, then close.
    async fn reject(&mut self, code: RejectCode, reason: String, close_code: CloseCode) -> Next {
        let reject = Message::Reject {
            code,
            reason: reason.clone(),
        };
        if send(&mut self.ws, self.shared, &reject).await.is_err() {
            return GONE;
        }
        close(close_code, reason)
    }

    /// A session message for the replica, applied by the relay's single writer together with
    /// whatever other sessions sent meanwhile; awaited, so this session's frames are applied
    /// in order.
    async fn apply(&mut self, message: Message, frame_len: usize) -> Next {
        let Some(session) = self.sync.as_ref() else {
            return GONE;
        };
        let arrived = Instant::now();
        let input = SessionInput::Message {
            peer: session.peer,
            message,
        };
        let applied = self.shared.applier.apply(input, frame_len).await;
        self.shared.metrics.sync_latency.observe(arrived.elapsed());
        match applied {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(not_applied(&mut self.ws, self.shared, e).await),
        }
    }
}

/// Liveness: a client that stopped reading, or went silent, is closed; a quiet one is pinged.
pub(crate) async fn keepalive(
    ws: &mut Ws,
    shared: &Shared,
    session: Option<&Session>,
    last_heard: Instant,
    last_ping: &mut Instant,
) -> Next {
    let config = &shared.config;
    // A client that has not read its queue down for the send timeout: its frames fit the
    // socket buffers, so no single write timed out, but it is not reading.
    if let Some(paused) = session
        .and_then(|s| s.flow.paused_for())
        .filter(|p| *p >= config.send_timeout)
    {
        return close(
            CloseCode::Policy,
            format!("the client did not read for {} s", paused.as_secs()),
        );
    }
    let silent = last_heard.elapsed();
    if silent >= config.keepalive * 2 {
        return close(
            CloseCode::Away,
            format!("no traffic for {} s", silent.as_secs()),
        );
    }
    if silent >= config.keepalive && last_ping.elapsed() >= config.keepalive {
        *last_ping = Instant::now();
        if ws.send(WsMessage::Ping(Bytes::new())).await.is_err() {
            return GONE;
        }
    }
    ControlFlow::Continue(())
}

/// Counts a frame of `len` bytes against a session's frame and byte rate limits; `Some`: the
/// limit it went over (the session is told, then closed).
pub(crate) fn over_rate(
    shared: &Shared,
    frames: &mut TokenBucket,
    bytes: &mut TokenBucket,
    len: usize,
) -> Option<&'static str> {
    shared.metrics.frame_in(len);
    let now = Instant::now();
    let limited = if !frames.take(now) {
        Some("frame rate limit exceeded")
    } else if !bytes.take_n(len as f64, now) {
        Some("byte rate limit exceeded")
    } else {
        None
    };
    if limited.is_some() {
        shared
            .metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    limited
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
pub(crate) fn message_counts(message: &WsMessage) -> bool {
    !matches!(message, WsMessage::Close(_) | WsMessage::Frame(_))
}

/// A WebSocket-level read failure: a close code when the peer can still hear one.
pub(crate) fn close_for_ws_error(e: WsError) -> Option<Close> {
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
pub(crate) async fn send_queued(
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
pub(crate) async fn close_with(mut ws: Ws, close: Close) {
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
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
