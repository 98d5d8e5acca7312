//! The relay's network shell: one TCP port serving `GET /healthz`, `GET /metrics` (Prometheus
//! text) and the WebSocket endpoint (`/` or `/sync`) where replicas speak [`crate::protocol`].
//!
//! A session does the handshake (`Hello` -> `Welcome` or `Reject`), answers `Ping`, and hands
//! session messages to the relay's replica, whose frames come back through the
//! [`router::Router`]. The client side is [`client`]: `Replica::connect(url, options)`. Bad input closes only the offending connection, with
//! a WebSocket close code saying why:
//!
//! | input | close code |
//! |---|---|
//! | bytes that are not a weft frame, or malformed | 1007 invalid payload |
//! | a frame over `max_frame` | 1009 message too big |
//! | a text frame | 1003 unsupported data |
//! | a valid frame out of order (not `Hello` first, `Hello` twice), wrong protocol version | 1002 protocol error |
//! | more frames per second than the rate limit, no `Hello` in time | 1008 policy violation |
//! | the relay shuts down | 1001 going away |
//!
//! The entry point is [`run`], which takes a bound listener, so tests run it on `127.0.0.1:0`.

mod applier;
mod client;
mod connection;
mod http;
mod metrics;
mod rate;
pub(crate) mod router;
mod server;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{ConnectOptions, Connection, Status};
pub use metrics::Metrics;
pub use server::run;

/// How many frames a connection may send: `per_second` sustained, bursts up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        // A live client sends a frame per local change it makes (plus sync rounds): allow
        // bursts of bulk edits, cut off floods.
        RateLimit {
            per_second: 500.0,
            burst: 1000.0,
        }
    }
}

/// The relay's settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Where the relay keeps its replica (`relay.db`); created if missing.
    pub data_dir: PathBuf,
    /// Open WebSocket sessions at most; more are refused with HTTP 503.
    pub max_connections: usize,
    /// The largest frame (WebSocket message) accepted, in bytes.
    pub max_frame: usize,
    /// Frames per second per connection (WebSocket pings included).
    pub rate_limit: RateLimit,
    /// How long a new session may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// How long a client may take to send its HTTP request head.
    pub request_timeout: Duration,
    /// On shutdown, how long to wait for sessions to close before abandoning them.
    pub shutdown_grace: Duration,
    /// How long writing one frame to a client may take; a client that stops reading for
    /// longer is disconnected (its queue is freed; it reconciles when it reconnects).
    pub send_timeout: Duration,
    /// A session silent for this long gets a WebSocket ping; silent for twice as long, it is
    /// closed (a vanished client must not hold a session forever).
    pub keepalive: Duration,
}

impl RelayConfig {
    /// The defaults, storing in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        RelayConfig {
            data_dir: data_dir.into(),
            max_connections: 10_000,
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            rate_limit: RateLimit::default(),
            hello_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            send_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay storage: {0}")]
    Storage(#[from] crate::Error),
}
