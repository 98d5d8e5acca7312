//! The relay test harness: an in-process relay (`weft::net::run` on 127.0.0.1:0), its tokens,
//! metrics and stored documents, and a raw WebSocket client that speaks protocol frames. (A
//! `weft serve` process is [`super::RelayProcess`].) Every wait is bounded by [`LIMIT`].

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft::net::auth::TokenKey;
use weft::net::{ConnectOptions, Connection, NetError, RelayConfig, Status};
use weft::protocol::{self, Message, WireScope};
use weft::{DocumentId, Replica, ReplicaId};

use super::weft_command;

/// The failure bound of a single wait on the wire: a frame, a connect, an HTTP answer.
pub const LIMIT: Duration = Duration::from_secs(10);

/// The failure bound of a library client's sync or status change (TLS handshakes, retries with
/// backoff), and of a relay's shutdown.
pub const SYNC_LIMIT: Duration = Duration::from_secs(30);

/// A raw WebSocket to the relay.
pub type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The secret of the relays that require tokens ([`Relay::with_tokens`]).
pub const SECRET: [u8; 32] = [7; 32];

/// An in-process relay on 127.0.0.1:0 (on the test's tokio runtime). Dropping it asks it to
/// stop; [`Relay::stop`] also waits until `run` returned, and fails the test if it returned an
/// error.
pub struct Relay {
    pub addr: SocketAddr,
    key: Option<TokenKey>,
    tls: bool,
    data: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NetError>>>,
    /// The temporary directory holding `data`, when the harness made it.
    dir: Option<tempfile::TempDir>,
}

impl Relay {
    /// A relay without tokens, its data in a fresh temporary directory, configured by `tune`.
    pub async fn start(tune: impl FnOnce(&mut RelayConfig)) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start_in(&dir.path().join("data"), tune).await;
        relay.dir = Some(dir);
        relay
    }

    /// A relay that requires tokens signed with [`SECRET`] ([`Relay::token`] issues them).
    pub async fn with_tokens(tune: impl FnOnce(&mut RelayConfig)) -> Relay {
        Relay::start(|config| {
            config.auth = Some(TokenKey::from_secret(&SECRET).unwrap());
            tune(config);
        })
        .await
    }

    /// A relay with its data in `data` (kept after the relay stops).
    pub async fn start_in(data: &Path, tune: impl FnOnce(&mut RelayConfig)) -> Relay {
        let mut config = RelayConfig::new(data);
        tune(&mut config);
        Relay::spawn(config, |listener, config, stopped| {
            tokio::spawn(weft::net::run(listener, config, stopped))
        })
        .await
    }

    /// A relay serving `replica` (for instance over a store whose faults the test controls);
    /// `data` is the relay's data directory for everything but the replica.
    pub async fn with_replica(
        replica: Replica,
        data: &Path,
        tune: impl FnOnce(&mut RelayConfig),
    ) -> Relay {
        let mut config = RelayConfig::new(data);
        tune(&mut config);
        Relay::spawn(config, |listener, config, stopped| {
            tokio::spawn(weft::net::run_with_replica(
                listener, config, replica, stopped,
            ))
        })
        .await
    }

    async fn spawn(
        config: RelayConfig,
        run: impl FnOnce(
            TcpListener,
            RelayConfig,
            std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        ) -> JoinHandle<Result<(), NetError>>,
    ) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (key, tls, data) = (
            config.auth.clone(),
            config.tls.is_some(),
            config.data_dir.clone(),
        );
        let task = run(
            listener,
            config,
            Box::pin(async {
                let _ = stopped.await;
            }),
        );
        Relay {
            addr,
            key,
            tls,
            data,
            stop: Some(stop),
            task: Some(task),
            dir: None,
        }
    }

    /// `ws://ADDR`, or `wss://ADDR` for a relay serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}", self.addr)
    }

    /// The relay's data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The key that signs the tokens of a relay made by [`Relay::with_tokens`].
    pub fn key(&self) -> &TokenKey {
        self.key.as_ref().expect("a relay without tokens")
    }

    /// A token for a relay made by [`Relay::with_tokens`]: `read` and `write` are collection
    /// lists as `weft token issue` takes them (`"*"`, `"alpha,beta"`, `""`), valid for a day.
    pub fn token(&self, read: &str, write: &str) -> String {
        let parse = |l: &str| weft::net::auth::parse_list(l).unwrap();
        self.key()
            .issue(
                "test",
                &parse(read),
                &parse(write),
                Duration::from_secs(24 * 3600),
            )
            .unwrap()
    }

    /// The relay's stored version of a document: `heads [...]`, or `error ...` (deleted, not
    /// found). Read through the file, beside the running relay.
    pub fn state(&self, id: &DocumentId) -> String {
        relay_db_state(&self.data.join("relay.db"), id)
    }

    /// One counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let (status, body) = http_get(self.addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        metric(&body, name)
    }

    /// A raw WebSocket to the relay (no handshake sent yet).
    pub async fn connect(&self) -> Raw {
        connect(&self.url()).await
    }

    /// A raw session: `Hello` with `token` for every collection, and the relay's answer.
    pub async fn raw(&self, token: &str) -> (Raw, Message) {
        let mut ws = self.connect().await;
        let hello = Message::Hello {
            protocol: protocol::PROTOCOL_VERSION.into(),
            replica: ReplicaId::from_bytes([42; 16]),
            token: Some(token.to_owned()),
            scope: WireScope::All,
        };
        send(&mut ws, &hello).await;
        let answer = recv(&mut ws).await;
        (ws, answer)
    }

    /// Connects `replica` (with `token`, if any) and waits until it is in sync.
    pub async fn synced(&self, replica: &Replica, token: impl Into<Option<String>>) -> Connection {
        let options = ConnectOptions {
            token: token.into(),
            ..ConnectOptions::default()
        };
        let connection = replica.connect(&self.url(), options);
        synced(&connection).await;
        connection
    }

    /// Stops the relay, waits until `run` returned (it must return `Ok`), and hands back the
    /// temporary directory, if the harness made one, so the test can look at what was stored.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        let _ = self.stop.take().unwrap().send(());
        timeout(SYNC_LIMIT, self.task.take().unwrap())
            .await
            .expect("run did not return after shutdown")
            .unwrap()
            .expect("run failed");
        self.dir.take()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A document's stored version in a relay's (or any replica's) file: `heads [...]` or
/// `error ...`.
pub fn relay_db_state(db: &Path, id: &DocumentId) -> String {
    let replica = Replica::open(db).unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    match replica.get(id) {
        Ok(doc) => format!("heads {:?}", doc.heads),
        Err(e) => format!("error {e}"),
    }
}

/// The value of metric `name` in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
}

/// One HTTP/1.1 GET on a plain socket: (status line, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    timeout(LIMIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP response timed out")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("no head end");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// A raw WebSocket to `url`, without Nagle's algorithm: a frame and a small one behind it (a
/// Ping) must not wait for a delayed ACK (40 ms per frame on Linux).
pub async fn connect(url: &str) -> Raw {
    let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
    timeout(LIMIT, connecting)
        .await
        .expect("connect timed out")
        .expect("connect failed")
        .0
}

/// Sends one protocol frame.
pub async fn send(ws: &mut Raw, message: &Message) {
    send_raw(ws, WsMessage::Binary(protocol::encode(message).into())).await;
}

/// Sends one WebSocket message as it is.
pub async fn send_raw(ws: &mut Raw, message: WsMessage) {
    timeout(LIMIT, ws.send(message))
        .await
        .expect("send timed out")
        .expect("send failed");
}

/// The next protocol frame from the relay (WebSocket pings and pongs skipped).
pub async fn recv(ws: &mut Raw) -> Message {
    loop {
        match timeout(LIMIT, ws.next()).await.expect("recv timed out") {
            Some(Ok(WsMessage::Binary(bytes))) => {
                return protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME).unwrap();
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// Reads (skipping frames) until the relay's close frame, then until the relay hangs up;
/// returns the close code and reason.
pub async fn expect_close(ws: &mut Raw) -> (CloseCode, String) {
    loop {
        match timeout(LIMIT, ws.next()).await.expect("close timed out") {
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                while let Some(Ok(_)) = timeout(LIMIT, ws.next()).await.expect("no hang-up") {}
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(WsMessage::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Waits until `connection` is in sync (bounded), failing the test on a sync error.
pub async fn synced(connection: &Connection) {
    timeout(SYNC_LIMIT, connection.wait_synced())
        .await
        .expect("sync timed out")
        .expect("sync failed");
}

/// Waits (bounded) for a status of `connection` that satisfies `f`, and returns it.
pub async fn await_status(connection: &Connection, f: impl Fn(&Status) -> bool) -> Status {
    let mut rx = connection.watch();
    timeout(SYNC_LIMIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("status never matched; now {:?}", connection.status()))
        .unwrap()
        .clone()
}

/// Waits (bounded) for `connection` to report itself offline; returns the error as text.
pub async fn offline(connection: &Connection) -> String {
    match await_status(connection, |s| matches!(s, Status::Offline { .. })).await {
        Status::Offline { error } => error.to_string(),
        other => unreachable!("{other:?}"),
    }
}

/// A `weft serve` process on 127.0.0.1 (a free port), killed when dropped. `url` is the
/// address it printed (`ws://` or `wss://`).
pub struct RelayProcess {
    pub child: Child,
    pub url: String,
    /// Its `--data` directory.
    pub data: PathBuf,
}

impl RelayProcess {
    /// Starts `weft serve --listen 127.0.0.1:0 --data DATA EXTRA...` and waits for its
    /// listening line.
    pub fn start(data: &Path, extra: &[&OsStr]) -> Self {
        let mut child = weft_command()
            .env_remove("WEFT_TOKEN")
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn weft serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout pipe"))
            .read_line(&mut line)
            .expect("read the listening line");
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned();
        assert!(
            url.starts_with("ws://127.0.0.1:") || url.starts_with("wss://127.0.0.1:"),
            "{line:?}"
        );
        RelayProcess {
            child,
            url,
            data: data.to_owned(),
        }
    }

    /// [`RelayProcess::start`] with string arguments.
    pub fn start_with(data: &Path, extra: &[&str]) -> Self {
        let extra: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        RelayProcess::start(data, &extra)
    }

    /// The relay's stored version of a document (see [`Relay::state`]), read beside the
    /// running process.
    pub fn state(&self, id: &DocumentId) -> String {
        relay_db_state(&self.data.join("relay.db"), id)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
