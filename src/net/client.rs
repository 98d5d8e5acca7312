//! The native client: `Replica::connect(url, options)` keeps a replica in sync with a relay.
//!
//! A background task connects, says `Hello`, waits for `Welcome`, then runs the session: frames
//! from the relay go to the replica, the replica's frames (including every local change, pushed
//! live) go to the relay. When the connection drops it reconnects with exponential backoff and
//! jitter; edits made meanwhile are simply in the database and go out on reconnect.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::router::{Outbound, Router};
use super::tls;
use crate::engine::PeerEvent;
use crate::id::DocumentId;
use crate::protocol::{self, ErrorCode, Message, RejectCode, WireScope};
use crate::{Replica, Scope, SessionFailure, SessionInput};

/// How a connection behaves.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The collections to sync (all by default).
    pub scope: Scope,
    /// A token for relays that require one.
    pub token: Option<String>,
    /// Reconnect after the connection drops (default). Without it the connection ends with
    /// [`Status::Offline`] at the first failure.
    pub reconnect: bool,
    /// First reconnect delay; doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The largest frame accepted from the relay.
    pub max_frame: usize,
    /// How often the session checks whether a quiet sync needs a new reconciliation round.
    pub tick: Duration,
    /// A relay silent for this long gets a WebSocket ping; silent for twice as long, the
    /// connection counts as lost (and is reconnected).
    pub keepalive: Duration,
    /// Trust this PEM CA certificate (in addition to the system roots), e.g. for a
    /// self-signed relay. Used for `wss://` URLs; read at every connection attempt.
    pub ca_file: Option<PathBuf>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            scope: Scope::All,
            token: None,
            reconnect: true,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_frame: protocol::DEFAULT_MAX_FRAME,
            tick: Duration::from_millis(5),
            keepalive: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

/// Where a connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Dialing (or waiting for `Welcome`).
    Connecting,
    /// The session is up; reconciliation is running.
    Connected,
    /// Both sides hold the same version of every document in scope (as of this moment).
    Synced,
    /// Not connected; `error` says why. With reconnect on, a new attempt follows.
    Offline { error: OfflineError },
    /// The relay refused the session (`code` says why: a bad or expired token, a collection
    /// the token does not grant, another protocol version); no further attempt is made.
    Rejected { code: RejectCode, reason: String },
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Connecting => f.write_str("connecting"),
            Status::Connected => f.write_str("connected"),
            Status::Synced => f.write_str("synced"),
            Status::Offline { error } => write!(f, "offline: {error}"),
            Status::Rejected { code, reason } => write!(f, "rejected ({code}): {reason}"),
        }
    }
}

/// Why a connection is offline: what failed (to act on), and the message a person reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OfflineError {
    /// The relay could not be reached: no route, refused, TLS, or the WebSocket handshake.
    #[error("{0}")]
    Unreachable(String),
    /// The connection was up and ended: closed, silent, a bad frame, a failed send.
    #[error("{0}")]
    Lost(String),
    /// The relay is at its connection limit (`Reject Busy`); a later attempt may get in.
    #[error("the relay is busy: {0}")]
    Busy(String),
    /// This replica's storage failed (a full disk): what the relay sent was not stored.
    #[error("local storage failed: {0}")]
    LocalStorage(crate::store::StoreError),
    /// The relay's storage failed (a full disk): what this replica sent was not stored.
    #[error("relay storage failed: {0}")]
    RelayStorage(String),
    /// A side broke the protocol (a message out of its role) and the session was ended.
    #[error("the session ended: {0}")]
    Protocol(String),
}

/// A document the relay refused to take from this replica: a write its token does not allow,
/// a create over the relay's create limit (offered again later), or a document it will not
/// take (`BadDocument`: beyond its limits, or not loadable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub doc: DocumentId,
    pub code: ErrorCode,
    pub message: String,
}

/// What the sessions learned that the status does not say, shared with the [`Connection`].
/// The router keeps `refused` current as it delivers each step's events, in commit order, so
/// a caller that sees `Synced` also sees the refusals of the same step.
pub(crate) struct Report {
    /// The documents the relay refused, until it acknowledges a later version of one.
    refused: Mutex<BTreeMap<DocumentId, Refusal>>,
    /// The collections the relay granted in the latest session.
    granted: Mutex<Option<Scope>>,
    /// Ephemeral messages from the relay, to every [`Connection::ephemeral`] receiver.
    ephemeral: tokio::sync::broadcast::Sender<Ephemeral>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            refused: Mutex::default(),
            granted: Mutex::default(),
            ephemeral: tokio::sync::broadcast::channel(EPHEMERAL_BUFFER).0,
        }
    }
}

/// Ephemeral messages a slow receiver may fall behind by before it misses some (they are
/// presence and cursors: the next one replaces the last).
const EPHEMERAL_BUFFER: usize = 256;

/// Ephemeral data about a document (presence, cursors) from another session, through the
/// relay: never stored. weft's JS package and automerge-repo encode `data` as CBOR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ephemeral {
    pub doc: DocumentId,
    pub data: Vec<u8>,
    /// Who sent it (a weft replica's id, an automerge-repo client's peer id), as the relay
    /// names it.
    pub sender: String,
}

impl Report {
    /// Keeps the refused documents current with a session event, and hands ephemeral
    /// messages to the connection's receivers.
    pub(crate) fn note(&self, event: &PeerEvent) {
        if let PeerEvent::Ephemeral { doc, data, sender } = event {
            // No receiver is fine: nobody listens.
            let _ = self.ephemeral.send(Ephemeral {
                doc: *doc,
                data: data.clone(),
                sender: sender.clone(),
            });
            return;
        }
        let Ok(mut refused) = self.refused.lock() else {
            return;
        };
        match event {
            PeerEvent::Error {
                code:
                    code @ (ErrorCode::Forbidden | ErrorCode::RateLimited | ErrorCode::BadDocument),
                message,
                doc: Some(doc),
            } => {
                refused.insert(
                    *doc,
                    Refusal {
                        doc: *doc,
                        code: *code,
                        message: message.clone(),
                    },
                );
            }
            // The relay stored a later version of these: no longer refused.
            PeerEvent::Persisted(docs) => {
                for (doc, _) in docs {
                    refused.remove(doc);
                }
            }
            _ => {}
        }
    }
}

pub(crate) type SharedReport = Arc<Report>;

/// A live connection to a relay. Dropping it disconnects.
pub struct Connection {
    replica: Replica,
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    report: SharedReport,
}

impl Connection {
    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The collections the relay granted in the latest session (its token may allow fewer
    /// than [`ConnectOptions::scope`] asked for); `None` before the first session.
    pub fn granted(&self) -> Option<Scope> {
        self.report.granted.lock().ok().and_then(|g| g.clone())
    }

    /// The documents the relay refused (see [`Refusal`]). [`Status::Synced`] means in sync
    /// except for these: their local changes stay here, and reconciliation leaves them out.
    pub fn refused(&self) -> Vec<Refusal> {
        self.report
            .refused
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until the replica is in sync with the relay. Fails when the relay rejects the
    /// session, or (without reconnect) when the connection is lost.
    pub async fn wait_synced(&self) -> Result<(), Status> {
        let mut rx = self.status.clone();
        let result = rx
            .wait_for(|s| {
                matches!(s, Status::Synced | Status::Rejected { .. })
                    || matches!(s, Status::Offline { .. })
                        && self.task.as_ref().is_some_and(|t| t.is_finished())
            })
            .await
            .map(|s| s.clone());
        match result {
            Ok(Status::Synced) => Ok(()),
            Ok(other) => Err(other),
            Err(_) => Err(self.status()),
        }
    }

    /// Like [`wait_synced`](Self::wait_synced), and also waits out the relay's create limit:
    /// documents it refused with `RateLimited` are offered again later
    /// ([`ReplicaOptions::rate_limited_retry`](crate::ReplicaOptions::rate_limited_retry)),
    /// so this returns once every document the relay accepts is in sync. Documents it
    /// forbids stay in [`refused`](Self::refused). `on_wait(n)` is called each time `n`
    /// documents wait for the limit (to show progress).
    pub async fn wait_all_synced(&self, mut on_wait: impl FnMut(usize)) -> Result<(), Status> {
        loop {
            self.wait_synced().await?;
            // Seen from here on: a round that starts (and even ends) after this wakes us.
            let mut status = self.status.clone();
            status.borrow_and_update();
            let held = self
                .refused()
                .iter()
                .filter(|r| r.code == ErrorCode::RateLimited)
                .count();
            if held == 0 {
                return Ok(());
            }
            on_wait(held);
            if status.changed().await.is_err() {
                return Err(self.status());
            }
        }
    }

    /// Ephemeral messages (presence, cursors) other sessions sent about documents this
    /// replica may read, from now on. A receiver that falls more than 256 messages behind
    /// misses the oldest (`RecvError::Lagged`).
    pub fn ephemeral(&self) -> tokio::sync::broadcast::Receiver<Ephemeral> {
        self.report.ephemeral.subscribe()
    }

    /// Sends ephemeral data about a document to every other session that may read it (see
    /// [`Replica::broadcast`]); returns how many of this replica's sessions it went to.
    pub fn broadcast(&self, doc: &DocumentId, data: Vec<u8>) -> crate::Result<usize> {
        self.replica.broadcast(doc, data)
    }

    /// Closes the connection and waits for the session to end.
    pub async fn close(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Replica {
    /// Connects to a relay (`ws://host:port`, or `wss://host:port` for TLS) and keeps this
    /// replica in sync with it, in the background, until the returned [`Connection`] is
    /// dropped. Must be called inside a tokio runtime.
    pub fn connect(&self, url: &str, options: ConnectOptions) -> Connection {
        let (status_tx, status_rx) = watch::channel(Status::Connecting);
        let status_tx = std::sync::Arc::new(status_tx);
        let (stop_tx, stop_rx) = watch::channel(false);
        let report = SharedReport::default();
        let task = tokio::spawn(run(
            self.clone(),
            url.to_owned(),
            options,
            (status_tx, report.clone()),
            stop_rx,
        ));
        Connection {
            replica: self.clone(),
            status: status_rx,
            stop: stop_tx,
            task: Some(task),
            report,
        }
    }
}

/// Why one connection attempt ended.
enum Ended {
    /// We were asked to stop.
    Stopped,
    /// The relay refused us: do not retry.
    Rejected(RejectCode, String),
    /// Anything else: retry if allowed.
    Lost(OfflineError),
}

fn lost(message: impl Into<String>) -> Ended {
    Ended::Lost(OfflineError::Lost(message.into()))
}

/// The replica failed a step of the session (a tick, picking up another process's commits).
fn local_failure(e: crate::Error) -> Ended {
    match e {
        crate::Error::Store(e) => Ended::Lost(OfflineError::LocalStorage(e)),
        other => lost(format!("the local replica failed: {other}")),
    }
}

async fn run(
    replica: Replica,
    url: String,
    options: ConnectOptions,
    (status, report): (std::sync::Arc<watch::Sender<Status>>, SharedReport),
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = options.initial_backoff;
    let mut attempt: u64 = 0;
    loop {
        let _ = status.send(Status::Connecting);
        let reporting = (status.clone(), report.clone());
        let mut reached_sync = false;
        match session(
            &replica,
            &url,
            &options,
            reporting,
            &mut stop,
            &mut reached_sync,
        )
        .await
        {
            Ended::Stopped => return,
            Ended::Rejected(code, reason) => {
                // Reported through the status; the application decides how loud to be.
                tracing::info!(%url, %code, %reason, "relay rejected the session");
                let _ = status.send(Status::Rejected { code, reason });
                return;
            }
            Ended::Lost(error) => {
                tracing::info!(%url, %error, "offline");
                let _ = status.send(Status::Offline { error });
                if !options.reconnect {
                    return;
                }
            }
        }
        // Exponential backoff with up to 50% jitter, so that many clients cut off at once (a
        // relay restart) spread their reconnects. A session that got in sync starts the
        // backoff over; one that failed before (a relay or a disk that keeps failing) does not.
        if reached_sync {
            backoff = options.initial_backoff;
        }
        attempt += 1;
        let jitter = backoff.mul_f64(random_fraction() / 2.0);
        tracing::debug!(attempt, delay = ?(backoff + jitter), "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(options.max_backoff);
    }
}

type Sink = futures_util::stream::SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, WsMessage>;
type Stream = futures_util::stream::SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>;

/// One connection attempt: the handshake, then the live session until it ends.
async fn session(
    replica: &Replica,
    url: &str,
    options: &ConnectOptions,
    (status, report): (std::sync::Arc<watch::Sender<Status>>, SharedReport),
    stop: &mut watch::Receiver<bool>,
    reached_sync: &mut bool,
) -> Ended {
    let (sink, mut stream, remote, scope) = tokio::select! {
        shaken = handshake(replica, url, options) => match shaken {
            Ok(connected) => connected,
            Err(ended) => return ended,
        },
        () = stopped(stop) => return Ended::Stopped,
    };
    if let Ok(mut granted) = report.granted.lock() {
        *granted = Some(scope.clone());
    }
    let router = Router::of(replica);
    // The router moves the status between Connected and Synced itself, under the replica's
    // lock and in commit order: a write made after `wait_synced` saw Synced has already
    // turned it back to Connected when the write returns.
    let mut session = router.register(Some((status.clone(), report.clone())));
    let peer = session.peer;
    let _ = status.send(Status::Connected);
    tracing::info!(%url, %remote, ?peer, "connected");
    blocking(replica, move |r| {
        r.peer_connected(peer, remote, scope, true)
    })
    .await;
    let mut live = Live {
        replica,
        options,
        status: &status,
        sink,
        peer,
        flow: session.flow.clone(),
        last_heard: std::time::Instant::now(),
        last_ping: std::time::Instant::now(),
        reached_sync,
    };
    let mut ticker = tokio::time::interval(options.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Commits by other processes on our file (a CLI next to us) go out within this.
    let mut external = tokio::time::interval(EXTERNAL_POLL);
    external.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ended = loop {
        let next = tokio::select! {
            out = session.rx.recv() => live.outbound(out).await,
            incoming = stream.next() => live.incoming(incoming, &mut stream).await,
            _ = ticker.tick() => live.tick().await,
            _ = external.tick() => match blocking(replica, |r| r.poll_external()).await {
                Some(Err(e)) => ControlFlow::Break(local_failure(e)),
                _ => ControlFlow::Continue(()),
            },
            () = stopped(stop) => {
                let _ = live.sink.send(WsMessage::Close(None)).await;
                ControlFlow::Break(Ended::Stopped)
            }
        };
        if let ControlFlow::Break(ended) = next {
            break ended;
        }
    };
    router.unregister(peer);
    blocking(replica, move |r| r.peer_disconnected(peer)).await;
    ended
}

/// Dials the relay, says `Hello`, and waits for `Welcome` (or `Reject`): the connection, the
/// relay's id and the collections it granted.
async fn handshake(
    replica: &Replica,
    url: &str,
    options: &ConnectOptions,
) -> Result<(Sink, Stream, crate::ReplicaId, Scope), Ended> {
    // A small read buffer: tungstenite zero-fills the free part of it before every read.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(options.max_frame))
        .max_frame_size(Some(options.max_frame));
    let ws = dial(url, options, config)
        .await
        .map_err(|error| Ended::Lost(OfflineError::Unreachable(error)))?;
    let (mut sink, mut stream) = ws.split();
    let hello = Message::Hello {
        protocol: u16::from(protocol::PROTOCOL_VERSION),
        replica: replica.replica_id(),
        token: options.token.clone(),
        scope: match &options.scope {
            Scope::All => WireScope::All,
            Scope::Collections(c) => WireScope::Collections(c.clone()),
        },
    };
    if let Err(e) = sink
        .send(WsMessage::Binary(protocol::encode(&hello).into()))
        .await
    {
        return Err(lost(format!("sending Hello: {e}")));
    }
    // The first frame must be Welcome or Reject.
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let bytes = match next {
            Err(_) => return Err(lost("no Welcome from the relay within 10 s")),
            Ok(None) => return Err(lost("the relay closed the connection during the handshake")),
            Ok(Some(Err(e))) => {
                return Err(Ended::Lost(OfflineError::Unreachable(format!(
                    "handshake: {e}"
                ))));
            }
            Ok(Some(Ok(WsMessage::Binary(bytes)))) => bytes,
            // Closed without a Reject: not a verdict on this replica; try again later.
            Ok(Some(Ok(WsMessage::Close(frame)))) => {
                return Err(lost(format!(
                    "the relay closed the connection during the handshake: {}",
                    frame
                        .map(|f| format!("{} {}", f.code, f.reason))
                        .unwrap_or_default()
                )));
            }
            Ok(Some(Ok(_))) => continue,
        };
        return match protocol::decode(&bytes, options.max_frame) {
            Ok(Message::Welcome {
                replica: remote,
                scope,
                ..
            }) => {
                let scope = match scope {
                    WireScope::All => Scope::All,
                    WireScope::Collections(c) => Scope::Collections(c),
                };
                Ok((sink, stream, remote, scope))
            }
            Ok(Message::Reject { code, reason }) => Err(match code {
                RejectCode::Busy => Ended::Lost(OfflineError::Busy(reason)),
                _ => Ended::Rejected(code, reason),
            }),
            Ok(other) => Err(lost(format!("expected Welcome, got {}", other.kind()))),
            Err(e) => Err(lost(format!("bad frame from the relay: {e}"))),
        };
    }
}

/// A live session's connection and state, and a handler per event.
struct Live<'a> {
    replica: &'a Replica,
    options: &'a ConnectOptions,
    status: &'a watch::Sender<Status>,
    sink: Sink,
    peer: crate::engine::PeerId,
    flow: std::sync::Arc<super::router::Flow>,
    last_heard: std::time::Instant,
    last_ping: std::time::Instant,
    reached_sync: &'a mut bool,
}

impl Live<'_> {
    /// What the replica queued for the relay: a frame to send, or a session event.
    async fn outbound(&mut self, out: Option<Outbound>) -> ControlFlow<Ended> {
        match out {
            Some(Outbound::Frame(frame)) => {
                let len = frame.bytes.len();
                if let Err(e) = self.sink.send(WsMessage::Binary(frame.bytes)).await {
                    return ControlFlow::Break(lost(format!("sending: {e}")));
                }
                if self.flow.written(len) {
                    let peer = self.peer;
                    blocking(self.replica, move |r| r.peer_flow(peer, false)).await;
                }
            }
            Some(Outbound::Event(PeerEvent::InSync)) => *self.reached_sync = true,
            Some(Outbound::Event(PeerEvent::Error {
                code: ErrorCode::Storage,
                message,
                ..
            })) => {
                // The relay stored nothing of what we sent last; it closes the session.
                return ControlFlow::Break(Ended::Lost(OfflineError::RelayStorage(message)));
            }
            // Refusals were recorded by the router (`Report::note`).
            Some(Outbound::Event(PeerEvent::Error { code, message, doc })) => {
                tracing::info!(?code, %message, ?doc, "relay reported an error");
            }
            Some(Outbound::Event(PeerEvent::Closed { reason })) => {
                // The relay broke the protocol; the Error frame saying so went out first.
                let close = CloseFrame {
                    code: CloseCode::Protocol,
                    reason: reason.clone().into(),
                };
                let _ = self.sink.send(WsMessage::Close(Some(close))).await;
                return ControlFlow::Break(Ended::Lost(OfflineError::Protocol(reason)));
            }
            // Refusals and ephemeral messages were handed on by the router (`Report::note`).
            // (A client's sessions follow the catalog: never unavailable.)
            Some(Outbound::Event(
                PeerEvent::Persisted(_)
                | PeerEvent::Ephemeral { .. }
                | PeerEvent::Unavailable { .. },
            )) => {}
            None => return ControlFlow::Break(lost("router closed")),
        }
        ControlFlow::Continue(())
    }

    /// Frames from the relay: every frame that has already arrived (up to [`MAX_BATCH`]) is
    /// applied in one replica step — one commit for a burst instead of one per frame.
    async fn incoming(
        &mut self,
        first: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
        stream: &mut Stream,
    ) -> ControlFlow<Ended> {
        self.last_heard = std::time::Instant::now();
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut ended = None;
        let mut next = Some(first);
        while let Some(incoming) = next.take() {
            if let Some(Ok(WsMessage::Binary(frame))) = &incoming {
                bytes += frame.len();
            }
            match read(incoming, self.options.max_frame) {
                Read::Session(message) => batch.push(message),
                Read::Ping(nonce) => {
                    let pong = protocol::encode(&Message::Pong { nonce });
                    let _ = self.sink.send(WsMessage::Binary(pong.into())).await;
                }
                Read::Nothing => {}
                Read::End(reason) => {
                    ended = Some(reason);
                    break;
                }
            }
            if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                next = stream.next().now_or_never();
            }
        }
        // The relay's storage failed: it says so, then closes. Report the cause, not the
        // close, whichever of the two this read saw first.
        let relay_storage = batch.iter().find_map(|m| match m {
            Message::Error {
                code: ErrorCode::Storage,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        });
        if !batch.is_empty() {
            if batch.iter().any(|m| matches!(m, Message::Sync { .. }))
                && *self.status.borrow() == Status::Synced
            {
                let _ = self.status.send(Status::Connected);
            }
            let peer = self.peer;
            let inputs = batch
                .into_iter()
                .map(|message| SessionInput::Message { peer, message })
                .collect();
            let failed = blocking(self.replica, move |r| r.peer_batch(inputs)).await;
            match failed.as_deref() {
                Some([]) => {}
                Some([(_, SessionFailure::Storage(e)), ..]) => {
                    return ControlFlow::Break(Ended::Lost(OfflineError::LocalStorage(e.clone())));
                }
                _ => {
                    return ControlFlow::Break(lost(
                        "internal error while applying the relay's frames",
                    ));
                }
            }
        }
        if let Some(message) = relay_storage {
            return ControlFlow::Break(Ended::Lost(OfflineError::RelayStorage(message)));
        }
        match ended {
            Some(reason) => ControlFlow::Break(lost(reason)),
            None => ControlFlow::Continue(()),
        }
    }

    /// Keepalive (a silent relay is pinged, then given up on), and the replica's tick (a
    /// quiet session checks again that it is in sync).
    async fn tick(&mut self) -> ControlFlow<Ended> {
        let keepalive = self.options.keepalive;
        let silent = self.last_heard.elapsed();
        if silent >= keepalive * 2 {
            return ControlFlow::Break(lost(format!(
                "the relay was silent for {} s",
                silent.as_secs()
            )));
        }
        if silent >= keepalive && self.last_ping.elapsed() >= keepalive {
            self.last_ping = std::time::Instant::now();
            if let Err(e) = self.sink.send(WsMessage::Ping(Default::default())).await {
                return ControlFlow::Break(lost(format!("sending: {e}")));
            }
        }
        // Checked without waiting for the replica: most ticks have nothing to do.
        if self.replica.tick_wanted()
            && let Some(Err(e)) = blocking(self.replica, |r| r.tick()).await
        {
            return ControlFlow::Break(local_failure(e));
        }
        ControlFlow::Continue(())
    }
}

/// Opens the WebSocket: `ws://` as it is, `wss://` through rustls, trusting the system's root
/// certificates plus `options.ca_file`. The error says what failed (a TLS failure as such).
async fn dial(
    url: &str,
    options: &ConnectOptions,
    config: WebSocketConfig,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, String> {
    let secure = url
        .get(..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("wss://"));
    let connector = if secure {
        // Reads files (the CA file; the system's roots the first time): off the async workers.
        let ca_file = options.ca_file.clone();
        let built = tokio::task::spawn_blocking(move || tls::client_config(ca_file.as_deref()))
            .await
            .map_err(|e| format!("TLS setup for {url}: {e}"))?;
        Some(Connector::Rustls(
            built.map_err(|e| format!("TLS setup for {url}: {e}"))?,
        ))
    } else {
        None
    };
    tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| tls::dial_error(url, &e))
}

/// How often a connected replica checks its file for commits by other processes.
const EXTERNAL_POLL: Duration = Duration::from_millis(50);

/// Frames applied per replica step at most: many small live frames share a commit, while
/// the (up to 1 MiB) frames of a cold sync go one per step, which keeps memory flat (two per
/// step doubled the client's peak RSS in W1 and made it slower).
const MAX_BATCH: usize = 64;
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// What one read from the relay's socket amounts to.
enum Read {
    /// A session message, for the replica.
    Session(Message),
    /// A protocol ping, to answer.
    Ping(u64),
    /// Nothing to do (a WebSocket control frame, a pong).
    Nothing,
    /// The connection is over, and why.
    End(String),
}

fn read(
    incoming: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    max_frame: usize,
) -> Read {
    match incoming {
        None => Read::End("the relay closed the connection".into()),
        Some(Err(e)) => Read::End(format!("connection error: {e}")),
        Some(Ok(WsMessage::Binary(bytes))) => match protocol::decode(&bytes, max_frame) {
            Ok(Message::Ping { nonce }) => Read::Ping(nonce),
            Ok(Message::Pong { .. }) => Read::Nothing,
            Ok(message) => Read::Session(message),
            Err(e) => Read::End(format!("bad frame from the relay: {e}")),
        },
        Some(Ok(WsMessage::Close(frame))) => Read::End(format!(
            "the relay closed the connection: {}",
            frame
                .map(|f| format!("{} {}", f.code, f.reason))
                .unwrap_or_default()
        )),
        Some(Ok(_)) => Read::Nothing,
    }
}

/// Runs replica work (SQLite) off the async workers; awaited, so a session's frames are applied
/// in order. `None` if it panicked.
async fn blocking<T: Send + 'static>(
    replica: &Replica,
    f: impl FnOnce(&Replica) -> T + Send + 'static,
) -> Option<T> {
    let replica = replica.clone();
    match tokio::task::spawn_blocking(move || f(&replica)).await {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::error!(error = %e, "replica work failed");
            None
        }
    }
}

/// A uniformly random number in [0, 1] from the OS (0.5 if it has none to give).
fn random_fraction() -> f64 {
    match crate::id::os_random() {
        Ok(bytes) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    }
}

/// Resolves once `stop` turns true (or its sender is gone), without holding the watch guard.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::random_fraction;

    #[test]
    fn backoff_jitter_is_random_and_in_range() {
        let draws: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..=1.0).contains(f)), "{draws:?}");
        let distinct: std::collections::BTreeSet<u64> = draws.iter().map(|f| f.to_bits()).collect();
        assert!(distinct.len() > 32, "{draws:?}");
    }
}
