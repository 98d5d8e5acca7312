//! The relay's network shell: one TCP port serving `GET /healthz`, `GET /metrics` (Prometheus
//! text) and the WebSocket endpoint (`/` or `/sync`) where replicas speak [`crate::protocol`].
//! With [`RelayConfig::tls`] ([`TlsConfig`]) the port speaks TLS only: `wss://`, and `https://`
//! for `/healthz` and `/metrics` (a plain-HTTP request gets 400, a failed TLS handshake drops just
//! that connection). The client dials `wss://` with the system's root certificates plus
//! [`ConnectOptions::ca_file`]; the TLS library is rustls on the ring provider.
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

mod amrepo;
mod applier;
pub mod auth;
mod client;
mod connection;
mod http;
mod metrics;
#[cfg(feature = "postgres")]
mod pg_listen;
mod rate;
pub(crate) mod router;
mod server;
mod tls;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{ConnectOptions, Connection, Ephemeral, OfflineError, Refusal, Status};
pub use metrics::Metrics;
pub use server::{run, run_with_replica};
pub use tls::TlsConfig;

/// A rate: `per_second` sustained, bursts up to `burst` (frames, or bytes).
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
    /// Serve TLS (`wss://`, and `https://` for `/healthz` and `/metrics`) with this
    /// certificate; `None` (the default): plain `ws://`, e.g. behind a TLS-terminating proxy.
    pub tls: Option<TlsConfig>,
    /// Open WebSocket sessions at most; more are refused with HTTP 503.
    pub max_connections: usize,
    /// The largest frame (WebSocket message) accepted, in bytes.
    pub max_frame: usize,
    /// Frames per second per connection (WebSocket pings included).
    pub rate_limit: RateLimit,
    /// Frames per connection for automerge-repo clients (`/automerge`): they send a frame per
    /// document and sync round where weft batches up to 1 MiB of documents in one, so an app
    /// opening or creating thousands of documents at once sends thousands of frames. The byte
    /// limit is the same for both.
    pub automerge_rate_limit: RateLimit,
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
    /// The secret that verifies clients' tokens. `None`: no authentication, every client
    /// reads and writes everything (the CLI allows that only on loopback unless told so).
    pub auth: Option<auth::TokenKey>,
    /// Bytes per second per connection (frame payloads), sustained and burst.
    pub byte_limit: RateLimit,
    /// Documents one connection may create: a burst, then a rate (`None`: no limit); more
    /// are refused per document with a `RateLimited` error and offered again by the client
    /// later.
    pub creates: Option<crate::CreateLimit>,
    /// A quota for `relay.db` in bytes (`None`: the disk is the limit). Past it, writes fail
    /// as on a full disk: the relay refuses them (`Error Storage`), reports it on `/healthz`,
    /// and goes on serving reads.
    pub max_db_size: Option<u64>,
    /// How deep, how many operations and how large a document may be; a document received
    /// beyond them is refused with a `BadDocument` error naming the limit.
    pub limits: crate::Limits,
    /// The collection that automerge-repo clients (`/automerge`) read and write: the
    /// documents they create live there, and they can open only documents stored there.
    pub automerge_collection: String,
    /// When the replica is stored in PostgreSQL with other relay nodes: the database to
    /// `LISTEN` on for their changes (see `store::postgres`).
    #[cfg(feature = "postgres")]
    pub listen_postgres: Option<tokio_postgres::Config>,
}

impl RelayConfig {
    /// The defaults, storing in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        RelayConfig {
            data_dir: data_dir.into(),
            tls: None,
            max_connections: 10_000,
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            rate_limit: RateLimit::default(),
            automerge_rate_limit: RateLimit {
                per_second: 5_000.0,
                burst: 30_000.0,
            },
            hello_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            send_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(30),
            auth: None,
            // A cold sync pushes a replica's whole catalog in 1 MiB frames as fast as the
            // relay applies them (about 20 MB/s on 2 cores): allow that, cut off floods.
            byte_limit: RateLimit {
                per_second: 32.0 * 1024.0 * 1024.0,
                burst: 128.0 * 1024.0 * 1024.0,
            },
            // A replica's first sync of the data set it already has goes through at full
            // speed (up to 100,000 documents); after that, 20,000 a minute.
            creates: Some(crate::CreateLimit {
                per_minute: 20_000,
                burst: 100_000,
            }),
            max_db_size: None,
            limits: crate::Limits::default(),
            automerge_collection: "automerge".to_owned(),
            #[cfg(feature = "postgres")]
            listen_postgres: None,
        }
    }
}

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A `RelayConfig` field that cannot work (say which and why).
    #[error("relay configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay storage: {0}")]
    Storage(#[from] crate::Error),
    /// A certificate file (the relay's, or a client's CA file) holds no PEM certificate.
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    /// The TLS key file holds no PEM private key.
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoPrivateKey { path: PathBuf },
    /// A PEM file is malformed.
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The TLS private key is not the key of the certificate (the first one in its file).
    #[error(
        "the private key in {} does not belong to the certificate in {}",
        key.display(),
        cert.display()
    )]
    TlsKeyMismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the TLS configuration (e.g. an unsupported key type).
    #[error("{what}: {source}")]
    Tls {
        what: String,
        #[source]
        source: rustls::Error,
    },
}
