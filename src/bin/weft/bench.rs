//! `weft bench`: load generators for replication against a running relay (`weft serve`).
//!
//! * [`fanout`] (W3, live fan-out): one writer and N receivers, each a real replica on its own
//!   SQLite file connected with `Replica::connect`; the writer edits one document at a fixed rate
//!   and every receiver's change hook records when each edit arrived.
//! * [`idle`] (relay memory): many raw WebSocket sessions that complete the handshake and one
//!   reconciliation round ("in sync"), then stay connected and idle.
//!
//! Results go to stdout, progress to stderr (the CLI's output contract). Neither command changes
//! the relay's data beyond what a normal client would (fan-out creates one document per run).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use weft::net::{ConnectOptions, Connection, Status};
use weft::protocol::{self, CatalogSummary, Message, WireScope};
use weft::{ChangeEvent, ChangeKind, Replica, ReplicaId, Scope};

use crate::common::{CliError, CliResult, out};
use crate::serve::shutdown_signal;

/// How long connecting and the initial sync of all replicas may take.
const SETUP_LIMIT: Duration = Duration::from_secs(120);
/// How long the new document may take to reach every receiver.
const DOC_LIMIT: Duration = Duration::from_secs(30);
/// One WebSocket handshake, `Welcome`, or reconciliation answer in `idle`.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Handshakes in flight at once in `idle` (more would overflow the relay's accept backlog).
const IDLE_CONCURRENCY: usize = 64;

/// `weft bench fanout`.
pub struct FanoutOptions {
    pub server: String,
    /// Where the receivers connect, round-robin (relay nodes sharing one database); the
    /// writer's `server` when empty.
    pub receivers_at: Vec<String>,
    pub clients: usize,
    pub changes: u64,
    /// Writes per second.
    pub rate: f64,
    pub collection: String,
    /// The parent of the run's scratch directory (the system temp dir when absent).
    pub dir: Option<PathBuf>,
    /// How long receivers may take to see the last write, after it was made.
    pub timeout: Duration,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// `weft bench idle`.
pub struct IdleOptions {
    pub server: String,
    pub clients: usize,
    /// A replica in sync with the relay: its summary is what every client announces.
    pub from: PathBuf,
    /// Stay connected this long; until SIGINT/SIGTERM when absent.
    pub hold: Option<Duration>,
    pub token: Option<String>,
}

fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_u64() -> CliResult<u64> {
    Ok(weft::id::os_random().map(u64::from_le_bytes)?)
}

fn random_replica_id() -> CliResult<ReplicaId> {
    Ok(ReplicaId::random()?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The value at quantile `q` (nearest rank) of sorted values.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A fresh scratch directory for one run, removed (with the replicas in it) when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(parent: Option<&Path>) -> CliResult<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let name = format!("weft-bench-{}-{:016x}", std::process::id(), random_u64()?);
        let path = parent.join(name);
        std::fs::create_dir_all(&path)
            .map_err(|e| CliError::Io(format!("creating {}: {e}", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

// ----- fanout ------------------------------------------------------------------------------

/// What one receiver has seen of the benchmark document.
struct Seen {
    /// The highest "i" read so far (`None`: the document has not arrived).
    upto: Option<u64>,
    /// Arrival instant of change n at index n - 1.
    arrivals: Vec<Option<Instant>>,
    /// Hook calls for the benchmark document (fewer than changes + 1 when edits coalesced).
    events: u64,
}

/// Receivers that have the document, and receivers that have seen the last change.
#[derive(Clone, Copy, Default)]
struct Progress {
    have_doc: usize,
    done: usize,
}

pub fn fanout(o: FanoutOptions) -> CliResult {
    weft::validate_collection(&o.collection)?;
    if o.clients == 0 || o.changes == 0 {
        return Err(CliError::Input(
            "--clients and --changes must be at least 1".into(),
        ));
    }
    if !(o.rate.is_finite() && o.rate > 0.0) {
        return Err(CliError::Input("--rate must be a positive number".into()));
    }
    let scratch = ScratchDir::new(o.dir.as_deref())?;
    let replicas = (0..=o.clients)
        .map(|k| Ok(Replica::open(scratch.0.join(format!("replica-{k}.db")))?))
        .collect::<CliResult<Vec<Replica>>>()?;
    let result = runtime()?.block_on(fanout_run(&o, replicas));
    drop(scratch);
    result
}

async fn fanout_run(o: &FanoutOptions, replicas: Vec<Replica>) -> CliResult {
    let changes =
        usize::try_from(o.changes).map_err(|_| CliError::Input("--changes is too large".into()))?;
    // Marks this run's document: a relay that already holds documents of earlier runs in the
    // same collection sends them too, and those must not count.
    let run = random_u64()? & ((1 << 53) - 1);

    eprintln!("connecting {} replicas to {} ...", replicas.len(), o.server);
    let started = Instant::now();
    let connections: Vec<Connection> = replicas
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let options = ConnectOptions {
                token: o.token.clone(),
                ca_file: o.ca_file.clone(),
                ..ConnectOptions::default()
            };
            let server = match (k, o.receivers_at.len()) {
                (0, _) | (_, 0) => &o.server,
                (k, n) => &o.receivers_at[(k - 1) % n],
            };
            r.connect(server, options)
        })
        .collect();
    // Count every drop: the client reconnects by itself, which would hide a lost connection
    // behind a late arrival.
    let drops = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for c in &connections {
        let mut status = c.watch();
        let drops = drops.clone();
        watchers.push(tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let now = status.borrow_and_update().clone();
                if let Status::Offline { error } = now {
                    drops.fetch_add(1, Ordering::Relaxed);
                    eprintln!("warning: a connection dropped: {error}");
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + SETUP_LIMIT;
    for (k, c) in connections.iter().enumerate() {
        match tokio::time::timeout_at(deadline, c.wait_synced()).await {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                return Err(CliError::Io(format!(
                    "replica {k} did not sync with {}: {status:?}",
                    o.server
                )));
            }
            Err(_) => {
                return Err(CliError::Io(format!(
                    "replica {k} not in sync with {} after {} s",
                    o.server,
                    SETUP_LIMIT.as_secs()
                )));
            }
        }
    }
    let setup = started.elapsed();

    let (writer, receivers) = replicas
        .split_first()
        .ok_or_else(|| CliError::Input("no replicas".into()))?;
    let (progress_tx, mut progress) = watch::channel(Progress::default());
    let progress_tx = Arc::new(progress_tx);
    let mut seen = Vec::with_capacity(receivers.len());
    let mut hooks = Vec::with_capacity(receivers.len());
    for r in receivers {
        let state = Arc::new(Mutex::new(Seen {
            upto: None,
            arrivals: vec![None; changes],
            events: 0,
        }));
        seen.push(state.clone());
        let (replica, progress_tx, last) = (r.clone(), progress_tx.clone(), o.changes);
        hooks.push(r.on_change(
            Scope::collection(o.collection.as_str()),
            move |e: &ChangeEvent| {
                if !matches!(e.kind, ChangeKind::Created | ChangeKind::Updated) {
                    return;
                }
                let Ok(doc) = replica.get(&e.id) else { return };
                // The body just read is at least as new as this event: every change up to its
                // "i" has arrived by now.
                let now = Instant::now();
                if doc.body.get("run").and_then(Value::as_u64) != Some(run) {
                    return;
                }
                let Some(i) = doc.body.get("i").and_then(Value::as_u64) else {
                    return;
                };
                let mut s = lock(&state);
                s.events += 1;
                let first = s.upto.is_none();
                let before = s.upto.unwrap_or(0);
                if !first && i <= before {
                    return;
                }
                for n in (before + 1)..=i.min(last) {
                    if let Some(slot) = usize::try_from(n - 1)
                        .ok()
                        .and_then(|k| s.arrivals.get_mut(k))
                    {
                        *slot = Some(now);
                    }
                }
                s.upto = Some(i);
                let finished = before < last && i >= last;
                drop(s);
                if first || finished {
                    progress_tx.send_modify(|p| {
                        p.have_doc += usize::from(first);
                        p.done += usize::from(finished);
                    });
                }
            },
        ));
    }

    let created = Instant::now();
    let w = writer.clone();
    let collection = o.collection.clone();
    let id =
        tokio::task::spawn_blocking(move || w.create(&collection, json!({"run": run, "i": 0})))
            .await
            .map_err(|e| CliError::Io(format!("writer task failed: {e}")))??;
    let n_receivers = receivers.len();
    if tokio::time::timeout(DOC_LIMIT, progress.wait_for(|p| p.have_doc >= n_receivers))
        .await
        .is_err()
    {
        let have = progress.borrow().have_doc;
        return Err(CliError::Io(format!(
            "the new document reached only {have} of {n_receivers} receivers in {} s",
            DOC_LIMIT.as_secs()
        )));
    }
    let doc_spread = created.elapsed();

    eprintln!(
        "writing {} changes at {}/s to {} receivers ...",
        o.changes, o.rate, n_receivers
    );
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / o.rate));
    let mut sent: Vec<Instant> = Vec::with_capacity(changes);
    for n in 1..=o.changes {
        ticks.tick().await;
        sent.push(Instant::now());
        let w = writer.clone();
        tokio::task::spawn_blocking(move || w.update(&id, json!({"i": n})))
            .await
            .map_err(|e| CliError::Io(format!("writer task failed: {e}")))??;
    }
    let writing = match (sent.first(), sent.last()) {
        (Some(a), Some(b)) => b.duration_since(*a),
        _ => Duration::ZERO,
    };
    let complete = tokio::time::timeout(o.timeout, progress.wait_for(|p| p.done >= n_receivers))
        .await
        .is_ok();
    if !complete {
        eprintln!(
            "warning: {} of {n_receivers} receivers saw the last change within {} s",
            progress.borrow().done,
            o.timeout.as_secs()
        );
    }
    drop(hooks);

    let mut latencies = Vec::with_capacity(n_receivers * changes);
    let mut events = 0;
    for state in &seen {
        let s = lock(state);
        events += s.events;
        for (arrived, sent) in s.arrivals.iter().zip(&sent) {
            if let Some(at) = arrived {
                latencies.push(at.saturating_duration_since(*sent));
            }
        }
    }
    latencies.sort_unstable();
    let expected = n_receivers * changes;
    let received = latencies.len();
    let dropped = drops.load(Ordering::Relaxed);

    out(&format!(
        "fanout: clients {n_receivers}, changes {}, rate {}/s",
        o.changes, o.rate
    ))?;
    out(&format!(
        "  setup: {} replicas connected and in sync in {:.1} ms; the new document reached every receiver in {:.1} ms",
        replicas.len(),
        ms(setup),
        ms(doc_spread)
    ))?;
    let achieved = if writing.is_zero() {
        0.0
    } else {
        (o.changes - 1) as f64 / writing.as_secs_f64()
    };
    out(&format!(
        "  writes: {} in {:.2} s ({achieved:.1}/s); receiver hook events: {events} for {expected} deliveries",
        o.changes,
        writing.as_secs_f64()
    ))?;
    out(&format!(
        "  latency ms: p50 {:.2}  p99 {:.2}  max {:.2}  (over {received} (receiver, change) pairs)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    ))?;
    out(&format!(
        "  received: {received}/{expected}{}; connection drops: {dropped}",
        if received == expected {
            " (all)"
        } else {
            " (MISSING SOME)"
        }
    ))?;

    for c in connections {
        c.close().await;
    }
    for w in watchers {
        w.abort();
    }
    if received < expected {
        return Err(CliError::Io(format!(
            "{} of {expected} deliveries missing",
            expected - received
        )));
    }
    Ok(())
}

// ----- idle --------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Counters shared by the idle sessions.
#[derive(Default)]
struct IdleStats {
    pings: AtomicUsize,
    closed_by_relay: AtomicUsize,
    /// The first few reasons sessions ended on the relay's side.
    reasons: Mutex<Vec<String>>,
}

impl IdleStats {
    fn lost(&self, why: String) {
        self.closed_by_relay.fetch_add(1, Ordering::Relaxed);
        let mut reasons = lock(&self.reasons);
        if reasons.len() < 5 {
            reasons.push(why);
        }
    }
}

pub fn idle(o: IdleOptions) -> CliResult {
    if !o.from.exists() {
        return Err(CliError::Input(format!(
            "{} does not exist (pass a replica that is in sync with the relay)",
            o.from.display()
        )));
    }
    let summary = Replica::open(&o.from)?.catalog_summary(&Scope::All)?;
    runtime()?.block_on(idle_run(&o, summary))
}

async fn idle_run(o: &IdleOptions, summary: CatalogSummary) -> CliResult {
    let summary = Message::Summary {
        count: summary.count,
        buckets: summary.buckets,
    };
    let frame = Arc::new(protocol::encode(&summary));
    let stats = Arc::new(IdleStats::default());
    let handshakes = Arc::new(Semaphore::new(IDLE_CONCURRENCY));
    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<Result<(), String>>();
    eprintln!(
        "opening {} idle sessions to {} ({} documents in scope) ...",
        o.clients,
        o.server,
        match &summary {
            Message::Summary { count, .. } => *count,
            _ => 0,
        }
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        let replica = random_replica_id()?;
        let (server, token, frame, stats, handshakes) = (
            o.server.clone(),
            o.token.clone(),
            frame.clone(),
            stats.clone(),
            handshakes.clone(),
        );
        let (ready_tx, mut stop) = (ready_tx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let ws = {
                let Ok(_permit) = handshakes.acquire().await else {
                    return;
                };
                tokio::select! {
                    r = idle_handshake(&server, token, replica, &frame) => match r {
                        Ok(ws) => {
                            let _ = ready_tx.send(Ok(()));
                            ws
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    },
                    () = stopped(&mut stop) => return,
                }
            };
            drop(ready_tx);
            idle_hold(ws, &stats, &mut stop).await;
        }));
    }
    drop(ready_tx);

    let mut in_sync = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut failed = 0;
    while let Some(r) = ready.recv().await {
        match r {
            Ok(()) => in_sync += 1,
            Err(e) => {
                failed += 1;
                if failures.len() < 5 {
                    failures.push(e);
                }
            }
        }
        if in_sync + failed == o.clients {
            break;
        }
    }
    let took = started.elapsed();
    out(&format!(
        "idle: {in_sync}/{} sessions connected and in sync in {:.2} s; {failed} failed",
        o.clients,
        took.as_secs_f64()
    ))?;
    for f in &failures {
        eprintln!("  failure: {f}");
    }
    if in_sync == 0 {
        return Err(CliError::Io(format!(
            "no session got in sync with {}",
            o.server
        )));
    }
    match o.hold {
        Some(hold) => {
            eprintln!(
                "holding for {} s (or until SIGINT/SIGTERM) ...",
                hold.as_secs()
            );
            tokio::select! {
                _ = tokio::time::sleep(hold) => {}
                () = shutdown_signal() => {}
            }
        }
        None => {
            eprintln!("holding until SIGINT/SIGTERM ...");
            shutdown_signal().await;
        }
    }
    let closed = stats.closed_by_relay.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    out(&format!(
        "idle: held {in_sync} sessions for {:.1} s; {closed} closed by the relay meanwhile; {} pings answered",
        (started.elapsed() - took).as_secs_f64(),
        stats.pings.load(Ordering::Relaxed)
    ))?;
    for r in lock(&stats.reasons).iter() {
        eprintln!("  closed: {r}");
    }
    if in_sync < o.clients {
        return Err(CliError::Io(format!(
            "{} of {} sessions did not get in sync",
            o.clients - in_sync,
            o.clients
        )));
    }
    Ok(())
}

async fn send(ws: &mut Ws, message: &Message) -> Result<(), String> {
    send_bytes(ws, protocol::encode(message)).await
}

async fn send_bytes(ws: &mut Ws, bytes: Vec<u8>) -> Result<(), String> {
    tokio::time::timeout(STEP_LIMIT, ws.send(WsMessage::Binary(bytes.into())))
        .await
        .map_err(|_| "send timed out".to_owned())?
        .map_err(|e| format!("send: {e}"))
}

/// The next protocol message, answering `Ping`s on the way.
async fn recv(ws: &mut Ws) -> Result<Message, String> {
    loop {
        let next = tokio::time::timeout(STEP_LIMIT, ws.next())
            .await
            .map_err(|_| format!("no answer within {} s", STEP_LIMIT.as_secs()))?;
        match next {
            Some(Ok(WsMessage::Binary(bytes))) => {
                match protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME) {
                    Ok(Message::Ping { nonce }) => send(ws, &Message::Pong { nonce }).await?,
                    Ok(message) => return Ok(message),
                    Err(e) => return Err(format!("bad frame from the relay: {e}")),
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(format!(
                    "the relay closed the session: {}",
                    frame
                        .map(|f| format!("{} {}", f.code, f.reason))
                        .unwrap_or_default()
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("connection error: {e}")),
            None => return Err("the relay hung up".into()),
        }
    }
}

/// Connect, `Hello` -> `Welcome`, announce `summary`, expect "in sync" (`Entries` of no bucket).
async fn idle_handshake(
    url: &str,
    token: Option<String>,
    replica: ReplicaId,
    summary: &[u8],
) -> Result<Ws, String> {
    // A small read buffer: these sessions only ever receive a few small frames, and a thousand
    // default 128 KiB buffers would make this process, not the relay, the memory hog.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    let (mut ws, _) = tokio::time::timeout(STEP_LIMIT, connecting)
        .await
        .map_err(|_| format!("connecting to {url} timed out"))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let hello = Message::Hello {
        protocol: u16::from(protocol::PROTOCOL_VERSION),
        replica,
        token,
        scope: WireScope::All,
    };
    send(&mut ws, &hello).await?;
    match recv(&mut ws).await? {
        Message::Welcome { .. } => {}
        Message::Reject { code, reason } => return Err(format!("rejected: {code}: {reason}")),
        other => return Err(format!("expected Welcome, got {}", other.kind())),
    }
    send_bytes(&mut ws, summary.to_vec()).await?;
    loop {
        match recv(&mut ws).await? {
            Message::Entries { buckets, .. } if buckets.is_empty() => return Ok(ws),
            Message::Entries { buckets, .. } => {
                return Err(format!(
                    "not in sync: {} buckets differ (is --from in sync with this relay?)",
                    buckets.len()
                ));
            }
            // Nothing else is expected; a stray typed error or acknowledgement is not fatal.
            Message::Error { code, message, .. } => {
                return Err(format!("relay error {code}: {message}"));
            }
            other => eprintln!("  note: unexpected {} during reconciliation", other.kind()),
        }
    }
}

/// Stays connected, answering `Ping`s (WebSocket pings are answered by tungstenite while we
/// read), until asked to stop or the relay ends the session.
async fn idle_hold(mut ws: Ws, stats: &IdleStats, stop: &mut watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = stopped(stop) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            next = ws.next() => match next {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    if let Ok(Message::Ping { nonce }) = protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME) {
                        stats.pings.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = send(&mut ws, &Message::Pong { nonce }).await {
                            stats.lost(e);
                            return;
                        }
                    }
                }
                Some(Ok(WsMessage::Ping(_))) => {
                    stats.pings.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    stats.lost(frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_else(|| "close without a code".into()));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    stats.lost(format!("connection error: {e}"));
                    return;
                }
                None => {
                    stats.lost("the relay hung up".into());
                    return;
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone), without holding the watch guard.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
