//! One automerge-repo session: `join` → `peer`, then frames translated to and from the engine's
//! (see the module docs of `amrepo`). Keepalive, rate limits, the send timeout and closing are
//! the relay's, shared with weft sessions (`connection.rs`).

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::Instant;

use futures_util::SinkExt;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message as WsMessage};

use super::{Codec, storage_replica};
use crate::engine::PeerEvent;
use crate::net::applier::NotApplied;
use crate::net::connection::{self, Close, Ending, Event, GONE, Next, Ws, close, message_counts};
use crate::net::metrics::ConnectionGauge;
use crate::net::rate::TokenBucket;
use crate::net::router::{Codec as RouterCodec, Outbound, Router, Session};
use crate::net::server::Shared;
use crate::protocol::amrepo::{self as wire, Incoming, Outgoing};
use crate::protocol::{Message, Payload, SyncItem, WireScope};
use crate::{DocumentId, Interest, ReplicaId, SessionFailure, SessionInput};

/// The longest peer id accepted (automerge-repo's are UUIDs or short random strings).
const MAX_PEER_ID: usize = 256;

struct AmConn<'a> {
    ws: Ws,
    shared: &'a Shared,
    router: std::sync::Arc<Router>,
    /// The token from the URL's query (`?token=`).
    token: Option<String>,
    /// Our peer id (`weft-` and the relay's replica id).
    our_id: String,
    /// The client's peer id, once it joined.
    their_id: Option<String>,
    sync: Option<Session>,
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
    token: Option<String>,
) {
    let gauge = ConnectionGauge::new(&shared.metrics);
    tracing::debug!("automerge-repo session open");
    let mut conn = AmConn {
        ws,
        shared,
        router: Router::of(&shared.replica),
        token,
        our_id: format!("weft-{}", shared.relay_id),
        their_id: None,
        sync: None,
        expires: None,
        frames: TokenBucket::new(shared.config.automerge_rate_limit, Instant::now()),
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

impl AmConn<'_> {
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Option<Close> {
        let join_deadline = tokio::time::Instant::now() + self.shared.config.hello_timeout;
        let mut keepalive = connection::keepalive_timer(self.shared);
        loop {
            let handshake_by = self.their_id.is_none().then_some(join_deadline);
            let event = connection::next_event(
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
                Event::TokenExpired => {
                    self.error_close(CloseCode::Policy, "the token expired")
                        .await
                }
                Event::Keepalive => {
                    let (last_heard, session) = (self.last_heard, self.sync.as_ref());
                    connection::keepalive(
                        &mut self.ws,
                        self.shared,
                        session,
                        last_heard,
                        &mut self.last_ping,
                    )
                    .await
                }
                Event::Outbound(out) => self.outbound(out).await,
                Event::Incoming(Err(())) => close(CloseCode::Policy, "no join in time"),
                Event::Incoming(Ok(incoming)) => self.incoming(incoming).await,
            };
            if let ControlFlow::Break(outcome) = next {
                return outcome;
            }
        }
    }

    /// Sends an automerge-repo `error` (which the client logs), then closes with `code`.
    async fn error_close(&mut self, code: CloseCode, reason: &str) -> Next {
        let target = self.their_id.as_deref().unwrap_or("");
        let frame = wire::encode(&Outgoing::Error { message: reason }, &self.our_id, target);
        if self.send(Bytes::from(frame)).await.is_err() {
            return GONE;
        }
        close(code, reason.to_owned())
    }

    async fn send(&mut self, frame: Bytes) -> Result<(), WsError> {
        let len = frame.len();
        self.ws.send(WsMessage::Binary(frame)).await?;
        self.shared.metrics.frame_out(len);
        Ok(())
    }

    async fn outbound(&mut self, out: Option<Outbound>) -> Next {
        match out {
            Some(Outbound::Frame(frame)) => {
                match connection::send_queued(&mut self.ws, self.shared, self.sync.as_ref(), frame)
                    .await
                {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(close) => ControlFlow::Break(close),
                }
            }
            Some(Outbound::Event(PeerEvent::Unavailable { doc })) => {
                let target = self.their_id.as_deref().unwrap_or("");
                let frame = wire::encode(
                    &Outgoing::DocUnavailable { doc: &doc },
                    &self.our_id,
                    target,
                );
                match self.send(Bytes::from(frame)).await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => GONE,
                }
            }
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

    async fn incoming(&mut self, incoming: Option<Result<WsMessage, WsError>>) -> Next {
        let message = match connection::heard(incoming, &mut self.last_heard) {
            Ok(message) => message,
            Err(end) => return end,
        };
        if message_counts(&message) {
            let len = message.len();
            if let Some(what) =
                connection::over_rate(self.shared, &mut self.frames, &mut self.bytes, len)
            {
                return self.error_close(CloseCode::Policy, what).await;
            }
        }
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Text(_) => {
                return self
                    .error_close(
                        CloseCode::Unsupported,
                        "text frames are not supported; send CBOR in binary frames",
                    )
                    .await;
            }
            _ => return ControlFlow::Continue(()),
        };
        let message = match wire::decode(&bytes) {
            Ok(message) => message,
            Err(e) => {
                let reason = format!("malformed message: {e}");
                return self.error_close(CloseCode::Invalid, &reason).await;
            }
        };
        match (self.their_id.is_some(), message) {
            (
                false,
                Incoming::Join {
                    sender_id,
                    versions,
                    storage_id,
                    ephemeral,
                },
            ) => self.join(sender_id, versions, storage_id, ephemeral).await,
            (false, other) => {
                let reason = format!("the first message must be join, not {}", other.kind());
                self.error_close(CloseCode::Protocol, &reason).await
            }
            (true, Incoming::Join { .. }) => {
                self.error_close(CloseCode::Protocol, "join sent twice")
                    .await
            }
            (true, Incoming::Request { doc, data } | Incoming::Sync { doc, data }) => {
                let item = SyncItem {
                    id: doc,
                    collection: self.shared.config.automerge_collection.clone(),
                    payload: Payload::Sync(data),
                };
                self.apply(Message::Sync { batch: vec![item] }, bytes.len())
                    .await
            }
            // automerge-repo clients pass every ephemeral message they receive on to their
            // other peers, the relay included, keeping its sender: that echo is dropped here
            // (the relay passed the message on already), as automerge-repo's own server does.
            (
                true,
                Incoming::Ephemeral {
                    sender_id: Some(s), ..
                },
            ) if Some(&s) != self.their_id.as_ref() => ControlFlow::Continue(()),
            (true, Incoming::Ephemeral { doc, data, .. }) => {
                // The engine names the sender (the client's peer id, from its join).
                let message = Message::Ephemeral {
                    doc,
                    data,
                    sender: String::new(),
                };
                self.apply(message, bytes.len()).await
            }
            (true, Incoming::Leave) => close(CloseCode::Normal, "the client left"),
            (true, Incoming::Error { message }) => {
                tracing::info!(%message, "automerge-repo client reported an error");
                ControlFlow::Continue(())
            }
            // We never ask a client for a document; remote heads gossip is not kept.
            (true, Incoming::DocUnavailable { .. } | Incoming::Ignored { .. }) => {
                ControlFlow::Continue(())
            }
        }
    }

    /// The handshake: protocol version, the token from the URL, then `peer` and the session.
    async fn join(
        &mut self,
        sender_id: String,
        versions: Vec<String>,
        storage_id: Option<String>,
        ephemeral: bool,
    ) -> Next {
        let shared = self.shared;
        // A join without versions is automerge-repo 1.x's: version "1".
        if !versions.is_empty() && !versions.iter().any(|v| v == wire::PROTOCOL_VERSION) {
            let reason = format!(
                "unsupported protocol version(s) {versions:?}: this relay speaks {:?}",
                wire::PROTOCOL_VERSION
            );
            return self.error_close(CloseCode::Protocol, &reason).await;
        }
        if sender_id.is_empty() || sender_id.len() > MAX_PEER_ID {
            let reason = format!("a peer id must be 1 to {MAX_PEER_ID} bytes");
            return self.error_close(CloseCode::Policy, &reason).await;
        }
        let collection = shared.config.automerge_collection.clone();
        let requested = WireScope::Collections(vec![collection]);
        let admitted = match connection::admit(shared, self.token.take(), requested) {
            Ok(admitted) => admitted,
            Err((code, reason)) => {
                tracing::info!(client = %sender_id, ?code, %reason, "automerge-repo client refused");
                shared
                    .metrics
                    .sessions_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.their_id = Some(sender_id);
                return self.error_close(CloseCode::Policy, &reason).await;
            }
        };
        let durable = storage_id.is_some() && !ephemeral;
        let remote = match storage_id.as_deref().filter(|_| durable) {
            Some(storage) => storage_replica(storage),
            None => match ReplicaId::random() {
                Ok(id) => id,
                Err(e) => {
                    return self
                        .error_close(CloseCode::Error, &format!("internal error: {e}"))
                        .await;
                }
            },
        };
        tracing::info!(client = %sender_id, subject = ?admitted.subject, durable, "automerge-repo join");
        self.expires = admitted.expires;
        let peer = wire::encode(
            &Outgoing::Peer {
                storage_id: &shared.relay_id.to_string(),
            },
            &self.our_id,
            &sender_id,
        );
        if self.send(Bytes::from(peer)).await.is_err() {
            return GONE;
        }
        let session_id = DocumentId::random()
            .map(|id| id.to_string())
            .unwrap_or_else(|_| format!("{}", Instant::now().elapsed().as_nanos()));
        let session = self.router.register_with(
            None,
            RouterCodec::AutomergeRepo(Codec::new(
                self.our_id.clone(),
                sender_id.clone(),
                session_id,
            )),
        );
        let mut access = admitted.access;
        access.interest = Interest::OnDemand { durable };
        access.label = Some(sender_id.clone());
        self.their_id = Some(sender_id);
        let connected = SessionInput::Connected {
            peer: session.peer,
            remote,
            access,
            initiator: false,
        };
        self.sync = Some(session);
        match shared.applier.apply(connected, 0).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => self.not_applied(e).await,
        }
    }

    /// A message for the replica, applied by the relay's single writer; awaited, so this
    /// session's messages are applied in order.
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
            Err(e) => self.not_applied(e).await,
        }
    }

    async fn not_applied(&mut self, e: NotApplied) -> Next {
        match e {
            NotApplied::Gone => close(CloseCode::Away, "relay shutting down"),
            NotApplied::Failed(SessionFailure::Panicked) => {
                self.error_close(CloseCode::Error, "internal error while applying a message")
                    .await
            }
            NotApplied::Failed(SessionFailure::Storage(cause)) => {
                tracing::warn!(%cause, "storage failed: the session's writes were refused");
                let reason = format!("the relay could not store what this session sent: {cause}");
                self.error_close(CloseCode::Again, &reason).await
            }
        }
    }
}
