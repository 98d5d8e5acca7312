//! The accept loop, per-TCP-connection routing, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::Instrument;

use super::applier::Applier;
use super::http::{self, QueryToken, Rewind, Route, Stream};
use super::{Metrics, NetError, RelayConfig, amrepo, connection};
use crate::{Replica, ReplicaId};

/// The pause after a failed accept (typically out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
/// The per-session WebSocket read buffer.
const READ_BUFFER: usize = 16 * 1024;
/// How often the relay ticks its replica (idle-document unloading).
const HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(1);

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) relay_id: ReplicaId,
    pub(crate) replica: Replica,
    pub(crate) metrics: Metrics,
    /// Applies every session's inputs (see `applier`).
    pub(crate) applier: Applier,
    /// One permit per open WebSocket session.
    pub(crate) sessions: Arc<Semaphore>,
}

/// Runs the relay on `listener` until `shutdown` resolves, then closes every session with 1001
/// (going away), waits up to `config.shutdown_grace` for them, and closes the replica.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetError> {
    let replica = open_replica(&config).await?;
    run_with_replica(listener, config, replica, shutdown).await
}

/// [`run`] over a replica the caller opened (any [`Store`](crate::store::Store), any
/// options); `config.data_dir` and `config.max_db_size` are then not used.
pub async fn run_with_replica(
    listener: TcpListener,
    config: RelayConfig,
    replica: Replica,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetError> {
    crate::validate_collection(&config.automerge_collection)
        .map_err(|e| NetError::Config(format!("automerge_collection: {e}")))?;
    let relay_id = replica.replica_id();
    let local = listener.local_addr().ok();
    tracing::info!(?local, relay = %relay_id, data = %config.data_dir.display(), tls = ?config.tls, "relay started");
    let (applier, applier_thread) =
        Applier::start(replica.clone()).map_err(|source| NetError::Io {
            what: "starting the applier thread".into(),
            source,
        })?;
    let shared = Arc::new(Shared {
        applier,
        sessions: Arc::new(Semaphore::new(config.max_connections)),
        config,
        relay_id,
        replica,
        metrics: Metrics::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let housekeeping = tokio::spawn(housekeep(shared.replica.clone(), stop_rx.clone()));
    #[cfg(feature = "postgres")]
    let listener_task = shared.config.listen_postgres.clone().map(|config| {
        tokio::spawn(super::pg_listen::run(
            config,
            shared.replica.clone(),
            shared.metrics.listen.clone(),
            stop_rx.clone(),
        ))
    });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("conn", %peer);
                    let task = serve_tcp(stream, peer, shared.clone(), stop_rx.clone());
                    tasks.spawn(task.instrument(span));
                }
                // Per-connection failures (the peer reset before accept, out of file
                // descriptors): log and go on; a listener must not die of one bad accept.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished tasks so the set does not grow with every connection ever served.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(open = tasks.len(), "shutting down");
    let _ = stop_tx.send(true);
    let grace = shared.config.shutdown_grace;
    if timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(
            left = tasks.len(),
            "sessions did not close in time; aborting them"
        );
        tasks.shutdown().await;
    }
    let _ = housekeeping.await;
    #[cfg(feature = "postgres")]
    if let Some(task) = listener_task {
        let _ = task.await;
    }
    let replica = shared.replica.clone();
    // The last handle to the applier: its thread finishes what is queued and stops.
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || applier_thread.join()).await;
    tokio::task::spawn_blocking(move || replica.checkpoint())
        .await
        .map_err(|e| NetError::Io {
            what: "closing the replica".into(),
            source: std::io::Error::other(e),
        })??;
    tracing::info!("relay stopped");
    Ok(())
}

/// Ticks the replica once a second so idle documents are unloaded even when no client is
/// active (the relay's memory follows the active set). While storage fails, it probes it
/// with backoff (1 s doubling to 30 s), so the relay (and `/healthz`) recovers by itself once
/// the disk has room again, even if no client writes.
async fn housekeep(replica: Replica, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(HOUSEKEEPING);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut probe_every = HOUSEKEEPING;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let r = replica.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    // Commits by another process on relay.db go to the sessions too.
                    if let Err(e) = r.poll_external() {
                        tracing::warn!(error = %e, "checking for other writers failed");
                    }
                    if let Err(e) = r.tick() {
                        tracing::warn!(error = %e, "housekeeping: storage failed");
                    }
                })
                .await;
                if replica.storage_health().is_err() && tokio::time::Instant::now() >= next_probe {
                    let r = replica.clone();
                    let healthy = tokio::task::spawn_blocking(move || r.probe_storage().is_ok())
                        .await
                        .unwrap_or(false);
                    probe_every = if healthy { HOUSEKEEPING } else { (probe_every * 2).min(MAX_PROBE_BACKOFF) };
                    next_probe = tokio::time::Instant::now() + probe_every;
                } else if replica.storage_health().is_ok() {
                    probe_every = HOUSEKEEPING;
                }
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// The longest wait between two storage probes while storage fails.
const MAX_PROBE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

async fn open_replica(config: &RelayConfig) -> Result<Replica, NetError> {
    let dir = config.data_dir.clone();
    let options = crate::ReplicaOptions {
        max_size: config.max_db_size,
        limits: config.limits,
        ..crate::ReplicaOptions::default()
    };
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|source| NetError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        Ok(Replica::open_with(dir.join("relay.db"), options)?)
    })
    .await
    .map_err(|e| NetError::Io {
        what: "opening the replica".into(),
        source: std::io::Error::other(e),
    })?
}

/// One TCP connection: the TLS handshake when the relay serves TLS, then [`serve_stream`].
async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = &shared.config.tls else {
        return serve_stream(Stream::Plain(stream), peer, shared, stop).await;
    };
    let acceptor = TlsAcceptor::from(tls.server_config().clone());
    let handshake = timeout(shared.config.request_timeout, accept_tls(acceptor, stream));
    let handshake = tokio::select! {
        handshake = handshake => handshake,
        _ = stop.wait_for(|stopping| *stopping) => return,
    };
    // A failed handshake (a client that does not trust the certificate, a port scanner) costs
    // only this connection.
    let stream = match handshake {
        Ok(Ok(Accepted::Tls(stream))) => Stream::Tls(stream),
        Ok(Ok(Accepted::PlainHttp(stream))) => {
            tracing::debug!("plain HTTP on the TLS port");
            tokio::select! {
                () = refuse_plain_http(stream, shared.config.request_timeout) => {}
                _ = stop.wait_for(|stopping| *stopping) => {}
            }
            return;
        }
        Ok(Ok(Accepted::Closed)) => return,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    serve_stream(stream, peer, shared, stop).await;
}

/// What arrived on the TLS port.
enum Accepted {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Not a TLS handshake: most likely plain HTTP (`ws://`, `http://`) sent to the TLS port.
    PlainHttp(TcpStream),
    /// The peer closed before sending anything.
    Closed,
}

async fn accept_tls(acceptor: TlsAcceptor, stream: TcpStream) -> std::io::Result<Accepted> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(Accepted::Closed);
    }
    if first[0] != http::TLS_HANDSHAKE {
        return Ok(Accepted::PlainHttp(stream));
    }
    Ok(Accepted::Tls(Box::new(acceptor.accept(stream).await?)))
}

/// Answers a plain-HTTP request sent to the TLS port with 400 and why.
async fn refuse_plain_http(mut stream: TcpStream, request_timeout: std::time::Duration) {
    // Read the head first: closing with unread bytes would reset the connection before the
    // client reads the answer.
    let _ = timeout(request_timeout, http::read_head(&mut stream)).await;
    let _ = http::respond_text(
        &mut stream,
        "400 Bad Request",
        "this port speaks TLS: use wss:// or https://\n",
    )
    .await;
}

/// One connection (plain or TLS): read the request head, answer HTTP, or hand over to a
/// WebSocket session.
async fn serve_stream(
    mut stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let read = timeout(shared.config.request_timeout, http::read_head(&mut stream));
    // A client still sending its request head when the relay stops is dropped at once.
    let read = tokio::select! {
        read = read => read,
        _ = stop.wait_for(|stopping| *stopping) => return,
    };
    let head = match read {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!("bad request head: {e}");
            let _ = http::respond_text(&mut stream, "400 Bad Request", "bad request\n").await;
            return;
        }
        Err(_) => {
            tracing::debug!("no request head in time");
            let _ = http::respond_text(&mut stream, "408 Request Timeout", "timeout\n").await;
            return;
        }
    };
    let route = http::route(&head);
    tracing::debug!(?route, "request");
    let result = match route {
        Route::Healthz => match shared.replica.storage_health() {
            Ok(()) => http::respond_text(&mut stream, "200 OK", "ok\n").await,
            Err(cause) => {
                let body = format!("storage failing: {cause}\n");
                http::respond_text(&mut stream, "503 Service Unavailable", &body).await
            }
        },
        Route::Metrics => {
            let replica = shared.replica.clone();
            let (stored, loaded, store) = tokio::task::spawn_blocking(move || {
                let stored = replica.counts().ok().map(|(live, _, _)| live);
                (stored, replica.loaded_documents(), replica.store_counters())
            })
            .await
            .unwrap_or((None, 0, Vec::new()));
            let body = shared.metrics.render(stored, loaded, &store);
            http::respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                "",
                &body,
            )
            .await
        }
        Route::Upgrade | Route::UpgradeAutomerge(_) => {
            let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
                shared.metrics.connections_refused.fetch_add(1, Relaxed);
                tracing::info!("refused: at the connection limit");
                let _ = http::respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    "Retry-After: 1\r\n",
                    "the relay is at its connection limit\n",
                )
                .await;
                return;
            };
            // tungstenite zero-fills its whole read buffer (128 KiB by default) on every read,
            // making it resident: most of an idle session's memory. 16 KiB still reads a 1 MiB
            // frame in few system calls (the buffer grows for a large frame while it arrives).
            let ws_config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(shared.config.max_frame))
                .max_frame_size(Some(shared.config.max_frame));
            let handshake = tokio_tungstenite::accept_async_with_config(
                Rewind::new(head, stream),
                Some(ws_config),
            );
            match timeout(shared.config.request_timeout, handshake).await {
                Ok(Ok(ws)) => match route {
                    Route::UpgradeAutomerge(QueryToken(token)) => {
                        amrepo::session(ws, peer, &shared, stop, permit, token).await;
                    }
                    _ => connection::session(ws, peer, &shared, stop, permit).await,
                },
                Ok(Err(e)) => tracing::debug!("WebSocket handshake failed: {e}"),
                Err(_) => tracing::debug!("WebSocket handshake timed out"),
            }
            return;
        }
        Route::UpgradeRequired => {
            http::respond(
                &mut stream,
                "426 Upgrade Required",
                "text/plain; charset=utf-8",
                "Upgrade: websocket\r\n",
                "this endpoint speaks WebSocket\n",
            )
            .await
        }
        Route::MethodNotAllowed => {
            http::respond_text(
                &mut stream,
                "405 Method Not Allowed",
                "method not allowed\n",
            )
            .await
        }
        Route::NotFound => http::respond_text(&mut stream, "404 Not Found", "not found\n").await,
        Route::BadRequest => {
            http::respond_text(&mut stream, "400 Bad Request", "bad request\n").await
        }
    };
    if let Err(e) = result {
        tracing::debug!("writing response: {e}");
    }
}
