//! The `weft` command line: parse arguments, set up logging, call the library.
//!
//! Output contract: results go to stdout (ids, JSON bodies, NDJSON), everything meant for a
//! human (summaries, progress, errors) goes to stderr. Exit status: 0 ok, 1 runtime error,
//! 2 usage error.
//!
//! Read commands (`doc get`, `doc list`, `changes`, `export-bundle`) never create a replica
//! file, and read one that is not writable read-only; the others write and create it.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use weft::{
    BundleScope, ChangeEvent, DocumentId, Filter, Path as DocPath, Query, Replica, StoreError,
    StoreMode,
};

#[cfg(feature = "net")]
mod bench;
mod malloc;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Offline-first replication of JSON documents (Automerge CRDTs in SQLite)"
)]
struct Cli {
    /// The replica's database file.
    #[arg(long, global = true, env = "WEFT_DB", default_value = "./weft.db")]
    db: PathBuf,
    /// A quota for the database file (`serve`: relay.db), like 500MB or 2GiB: writes that
    /// would grow it further fail as on a full disk, and are reported as such.
    #[arg(long, global = true, env = "WEFT_MAX_DB_SIZE", value_parser = parse_size)]
    max_db_size: Option<u64>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, read, change, delete and list documents.
    #[command(subcommand)]
    Doc(DocCmd),
    /// Bulk-create documents from NDJSON (one JSON object per line; `-` reads stdin).
    ///
    /// The whole input is checked first: a bad line is reported with its number, and then
    /// nothing is imported. The documents are written in transactions of `--batch` (fewer
    /// when their JSON passes 8 MiB): if writing fails part way (a full disk), the batches
    /// written stay, and the error says how many documents were imported and the line to
    /// resume from.
    Import {
        file: PathBuf,
        #[arg(long, short, default_value = "default")]
        collection: String,
        /// Documents per transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
    },
    /// Write a bundle file for manual sync (all documents unless narrowed).
    ExportBundle {
        file: PathBuf,
        /// Only this collection.
        #[arg(long, conflicts_with = "since")]
        collection: Option<String>,
        /// Only documents changed after this change-feed sequence number.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Merge a bundle file into this replica (idempotent).
    ImportBundle { file: PathBuf },
    /// Compact the file: fold incremental chunks into snapshots, keep only the newest change-feed
    /// entry per document, reclaim free pages.
    Compact,
    /// Run the relay: WebSocket sync endpoint, /healthz and /metrics on one port, until
    /// SIGINT or SIGTERM.
    #[cfg(feature = "net")]
    Serve(ServeArgs),
    /// Sync with a relay: `--once` until both sides hold the same version of every document in
    /// scope, or `--watch` to stay connected, pushing and receiving every change live.
    #[cfg(feature = "net")]
    Sync(SyncArgs),
    /// Load generators for replication against a running relay (benchmarks, not tests).
    #[cfg(feature = "net")]
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Signed access tokens for a relay started with `--auth-secret-file`.
    #[cfg(feature = "net")]
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print the change feed as NDJSON.
    Changes {
        /// Only entries with a sequence number greater than this.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
        /// Keep running and print new changes as they are committed (by any process).
        #[arg(long)]
        follow: bool,
    },
}

#[cfg(feature = "net")]
#[derive(Args)]
struct ServeArgs {
    /// The address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// The relay's data directory (created if missing).
    #[arg(long, default_value = "./weft-data")]
    data: PathBuf,
    /// Open WebSocket sessions at most.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Serve TLS (wss://, https://) with this PEM certificate chain, leaf first (needs
    /// --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (may be the same file).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require signed tokens (see `weft token issue`), verified with the secret in this file.
    #[arg(long, env = "WEFT_AUTH_SECRET_FILE")]
    auth_secret_file: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address: anyone who reaches the port
    /// reads and writes everything.
    #[arg(long, conflicts_with = "auth_secret_file")]
    insecure_no_auth: bool,
    /// Documents one connection may create per minute once its burst is spent (0: no limit).
    #[arg(long, default_value_t = 20_000)]
    creates_per_minute: u32,
    /// Documents one connection may create at once (a replica's first sync of the data set
    /// it already has), before --creates-per-minute applies.
    #[arg(long, default_value_t = 100_000)]
    create_burst: u32,
    /// Operations a document's history may hold (changes count as one more); documents
    /// received with more are refused. Loading costs the relay up to ~4 µs and ~0.5 KB per
    /// operation.
    #[arg(long, default_value_t = weft::Limits::DEFAULT.max_ops)]
    max_document_ops: u64,
}

#[cfg(feature = "net")]
#[derive(Subcommand)]
enum TokenCmd {
    /// Print a new token (HS256) signed with the relay's secret.
    Issue {
        /// The file holding the relay's secret (at least 32 bytes).
        #[arg(long)]
        secret_file: PathBuf,
        /// Who the token is for (shown in the relay's log).
        #[arg(long)]
        sub: String,
        /// Collections it may read, comma-separated; `*` for all.
        #[arg(long, default_value = "")]
        read: String,
        /// Collections it may write, comma-separated; `*` for all. Writing needs reading too.
        #[arg(long, default_value = "")]
        write: String,
        /// How long it is valid: a number with a unit, s, m, h or d (`90m`, `24h`, `30d`).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

/// `500MB`, `2GiB`, `4096` (bytes): decimal (kB, MB, GB) and binary (KiB, MiB, GiB) units.
fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a size like 500MB or 2GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: the unit must be B, kB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

/// A relay address: `ws://` or `wss://`. An `http(s)://` URL or a bare `HOST:PORT` is refused
/// with the address to use instead.
#[cfg(feature = "net")]
fn parse_server(s: &str) -> Result<String, String> {
    let scheme = s
        .split_once("://")
        .map(|(scheme, rest)| (scheme.to_ascii_lowercase(), rest));
    match scheme {
        Some((scheme, _)) if scheme == "ws" || scheme == "wss" => Ok(s.to_owned()),
        Some((scheme, rest)) if scheme == "http" => Err(format!(
            "the relay speaks WebSocket: use ws://{rest} (wss:// if it serves TLS)"
        )),
        Some((scheme, rest)) if scheme == "https" => {
            Err(format!("the relay speaks WebSocket: use wss://{rest}"))
        }
        Some((scheme, _)) => Err(format!(
            "{scheme}:// is not a relay address: use ws://HOST:PORT (wss:// with TLS)"
        )),
        None => Err(format!(
            "a relay address starts with ws:// (wss:// with TLS): use ws://{s}"
        )),
    }
}

/// `24h`, `90m`, `30d`, `45s`.
#[cfg(feature = "net")]
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, like 24h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(seconds)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

#[cfg(feature = "net")]
#[derive(Args)]
#[group(id = "mode", required = true, multiple = false)]
struct SyncMode {
    /// Sync until in sync, print a summary, exit.
    #[arg(long)]
    once: bool,
    /// Stay connected (reconnecting as needed) and log what syncs, until Ctrl-C.
    #[arg(long)]
    watch: bool,
}

#[cfg(feature = "net")]
#[derive(Args)]
struct SyncArgs {
    /// The relay's address, as `weft serve` prints it: ws://HOST:PORT (wss:// with TLS).
    #[arg(long, value_parser = parse_server)]
    server: String,
    /// A token, for relays that require one.
    #[arg(long, env = "WEFT_TOKEN")]
    token: Option<String>,
    /// Trust this PEM CA certificate (in addition to the system roots), e.g. for a
    /// self-signed relay.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Only these collections (repeat); all when absent.
    #[arg(long = "collection", short)]
    collections: Vec<String>,
    /// With --once: give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    mode: SyncMode,
}

#[cfg(feature = "net")]
#[derive(Subcommand)]
enum BenchCmd {
    /// Live fan-out (W3): one writer and N receiving replicas in this process; the writer edits
    /// one document at a fixed rate and every receiver records when each edit arrived. Prints
    /// latency percentiles; exits 1 if any receiver missed a change.
    Fanout {
        /// The relay's address, as `weft serve` prints it: ws://HOST:PORT.
        #[arg(long, value_parser = parse_server)]
        server: String,
        /// Receiving replicas (the writer comes on top).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        clients: u32,
        /// Edits the writer makes.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
        changes: u64,
        /// Edits per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// The collection of the benchmark document.
        #[arg(long, default_value = "bench")]
        collection: String,
        /// Where to put the replicas' files (a fresh subdirectory, removed afterwards; default:
        /// the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds the receivers may take to see the last edit after it was made.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// A token, for relays that require one.
        #[arg(long, env = "WEFT_TOKEN")]
        token: Option<String>,
        /// Trust this PEM CA certificate for wss:// (a self-signed relay).
        #[arg(long, value_name = "PEM")]
        ca_file: Option<PathBuf>,
    },
    /// Relay memory with idle clients: N raw WebSocket sessions that say Hello, announce the
    /// catalog summary of `--from` (a replica in sync with the relay), get "in sync", then stay
    /// connected and idle.
    Idle {
        /// The relay's address, as `weft serve` prints it: ws://HOST:PORT.
        #[arg(long, value_parser = parse_server)]
        server: String,
        /// Sessions to open.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        clients: u32,
        /// A replica already in sync with the relay (its catalog equals the relay's).
        #[arg(long, value_name = "DB")]
        from: PathBuf,
        /// Seconds to stay connected after all sessions are in sync; until SIGINT/SIGTERM when
        /// absent.
        #[arg(long, value_name = "SECS")]
        hold: Option<u64>,
        /// A token, for relays that require one (ws:// only).
        #[arg(long, env = "WEFT_TOKEN")]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum DocCmd {
    /// Create a document; prints its id.
    Create {
        #[arg(long, short, default_value = "default")]
        collection: String,
        /// The body as JSON (an object). Read from stdin when absent or `-`.
        #[arg(long)]
        json: Option<String>,
    },
    /// Print a document's JSON body.
    Get {
        id: String,
        /// Wrap the body with id, collection and heads.
        #[arg(long)]
        meta: bool,
        /// Read as of these heads (comma-separated hex hashes, as `--meta` prints them).
        #[arg(long, value_delimiter = ',')]
        at: Option<Vec<String>>,
    },
    /// Change a document.
    Update(UpdateArgs),
    /// Delete a document (replicated tombstone).
    Delete { id: String },
    /// List live documents.
    List {
        #[arg(long, short)]
        collection: Option<String>,
        /// Condition on the body, e.g. `done = false`, `size >= 3`, `owner.name = "ann"`,
        /// `tags[0] exists`. Repeat to AND several.
        #[arg(long = "where", value_name = "COND")]
        conditions: Vec<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// NDJSON lines {"id","collection","body"} instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct UpdateArgs {
    id: String,
    #[command(flatten)]
    how: UpdateHow,
}

/// Exactly one way to change the document.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct UpdateHow {
    /// Apply an RFC 7386 merge patch.
    #[arg(long, value_name = "JSON")]
    merge: Option<String>,
    /// Set the value at a JSON Pointer: --set /path JSON.
    #[arg(long, num_args = 2, value_names = ["POINTER", "JSON"])]
    set: Option<Vec<String>>,
    /// Remove the value at a JSON Pointer.
    #[arg(long, value_name = "POINTER")]
    unset: Option<String>,
    /// Make the value at a pointer collaborative text: --set-text /path TEXT.
    #[arg(long, num_args = 2, value_names = ["POINTER", "TEXT"])]
    set_text: Option<Vec<String>>,
    /// Splice collaborative text: --splice /path INDEX DELETE TEXT.
    #[arg(long, num_args = 4, value_names = ["POINTER", "INDEX", "DELETE", "TEXT"])]
    splice: Option<Vec<String>>,
}

/// A runtime failure: printed as `error: ...`, exit status 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Weft(#[from] weft::Error),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Input(String),
    /// Arguments that parse but make no sense together: exit status 2, like clap's errors.
    #[error("{0}")]
    Usage(String),
    /// Whoever read our output went away (`weft changes | head`): not an error.
    #[error("output closed")]
    OutputClosed,
}

/// A failed write to stdout: a closed pipe ends the command quietly, anything else is an error.
fn output_err(e: io::Error) -> CliError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        CliError::OutputClosed
    } else {
        CliError::Io(format!("writing output: {e}"))
    }
}

type CliResult<T = ()> = Result<T, CliError>;

fn io_err<'a>(what: &str, path: &'a std::path::Path) -> impl Fn(io::Error) -> CliError + 'a {
    let what = what.to_owned();
    move |e| CliError::Io(format!("{what} {}: {e}", path.display()))
}

fn main() -> ExitCode {
    malloc::tune();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(io::stderr)
        // Colour codes only for a terminal: not in log files, pipes and CI output.
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::OutputClosed) => ExitCode::SUCCESS,
        Err(CliError::Usage(message)) => {
            eprintln!("error: {message}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--max-db-size`, set once at start.
static MAX_DB_SIZE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn replica_options() -> weft::ReplicaOptions {
    weft::ReplicaOptions {
        max_size: MAX_DB_SIZE.get().copied().flatten(),
        ..weft::ReplicaOptions::default()
    }
}

/// Opens (creating if needed) the replica for a command that writes.
fn open(db: &std::path::Path) -> CliResult<Replica> {
    Replica::open_with(db, replica_options()).map_err(|e| match e {
        weft::Error::Store(StoreError::ReadOnly { .. }) => CliError::Io(format!(
            "{e}; it can be read (doc get, doc list, changes, export-bundle), not changed"
        )),
        e => e.into(),
    })
}

/// Opens the replica for a command that only reads: a missing file is an error (nothing is
/// created), and a file that is not writable, or in a directory that is not, is read
/// read-only.
fn open_read(db: &std::path::Path) -> CliResult<Replica> {
    if let Err(e) = std::fs::metadata(db)
        && e.kind() == io::ErrorKind::NotFound
    {
        return Err(CliError::Io(format!(
            "no such replica file: {}",
            db.display()
        )));
    }
    match Replica::open_with(db, replica_options()) {
        Err(weft::Error::Store(StoreError::ReadOnly { reason, .. })) => {
            tracing::debug!(db = %db.display(), %reason, "not writable: reading it read-only");
            Ok(Replica::open_read_only(db, replica_options())?)
        }
        opened => Ok(opened?),
    }
}

/// A read command's replica. Opened once and kept, unless it is a snapshot
/// (`StoreMode::Snapshot`: a file that is not writable and that no writer has open, read
/// without SQLite's locks), which shows no later commits and is therefore reopened for every
/// read; a snapshot read is repeated when the file changed while it ran (a process that may
/// write the file started to).
struct Reader {
    db: PathBuf,
    replica: Option<Replica>,
}

impl Reader {
    fn new(db: &std::path::Path) -> Self {
        Self {
            db: db.to_owned(),
            replica: None,
        }
    }

    fn read<T>(&mut self, read: impl Fn(&Replica) -> weft::Result<T>) -> CliResult<T> {
        for _ in 0..5 {
            let before = snapshot_state(&self.db);
            let replica = match self.replica.take() {
                Some(kept) => kept,
                None => open_read(&self.db)?,
            };
            let result = read(&replica);
            if replica.mode() != StoreMode::Snapshot {
                self.replica = Some(replica);
                return Ok(result?);
            }
            drop(replica);
            if before.is_some() && snapshot_state(&self.db) == before {
                return Ok(result?);
            }
        }
        Err(CliError::Io(format!(
            "{} kept changing while it was read (a process writes it); try again",
            self.db.display()
        )))
    }
}

/// What a snapshot read relies on: the file stays the same (identity, size, modification time)
/// and no `-wal` appears (a writer creates one before it writes).
fn snapshot_state(db: &std::path::Path) -> Option<(u64, u64, std::time::SystemTime, bool)> {
    let meta = std::fs::metadata(db).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::Path::new(&wal).exists();
    Some((inode, meta.len(), meta.modified().ok()?, wal))
}

fn parse_id(text: &str) -> CliResult<DocumentId> {
    Ok(text.trim().parse()?)
}

fn out(line: &str) -> CliResult {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}").map_err(output_err)
}

fn read_json_arg(arg: Option<String>) -> CliResult<Value> {
    let text = match arg.as_deref() {
        Some("-") | None => {
            if io::stdin().is_terminal() {
                eprintln!(
                    "reading the JSON from stdin: type or paste it, then press Ctrl-D \
                     (or pass it with --json)"
                );
            }
            let mut buf = String::new();
            io::stdin()
                .read_to_string(&mut buf)
                .map_err(|e| CliError::Io(format!("reading stdin: {e}")))?;
            buf
        }
        Some(text) => text.to_owned(),
    };
    Ok(serde_json::Value::Object(
        weft::json::parse_object(&text).map_err(weft::Error::from)?,
    ))
}

fn parse_value(text: &str) -> CliResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| CliError::Input(format!("invalid JSON value {text:?}: {e}")))
}

fn run(cli: Cli) -> CliResult {
    let _ = MAX_DB_SIZE.set(cli.max_db_size);
    match cli.command {
        Cmd::Doc(cmd) => doc(&cli.db, cmd),
        Cmd::Import {
            file,
            collection,
            batch,
        } => import(&cli.db, &file, &collection, batch as usize),
        Cmd::ExportBundle {
            file,
            collection,
            since,
        } => {
            let scope = match (collection, since) {
                (Some(c), _) => BundleScope::Collection(c),
                (None, Some(seq)) => BundleScope::Since(seq),
                (None, None) => BundleScope::All,
            };
            let bytes = Reader::new(&cli.db).read(|r| r.export_bundle(&scope))?;
            let entries = weft::Bundle::decode(&bytes)
                .map(|b| b.entries.len())
                .unwrap_or(0);
            write_atomically(&file, &bytes)?;
            eprintln!(
                "exported {entries} documents ({} bytes) to {}",
                bytes.len(),
                file.display()
            );
            Ok(())
        }
        Cmd::ImportBundle { file } => {
            let bytes = std::fs::read(&file).map_err(io_err("reading", &file))?;
            let replica = open(&cli.db)?;
            let r = replica.import_bundle(&bytes)?;
            eprintln!(
                "imported {}: {} created, {} updated, {} deleted, {} unchanged",
                file.display(),
                r.created,
                r.updated,
                r.deleted,
                r.unchanged
            );
            Ok(())
        }
        Cmd::Changes {
            since,
            collection,
            follow,
        } => changes(&cli.db, since, collection, follow),
        #[cfg(feature = "net")]
        Cmd::Serve(args) => serve(args),
        #[cfg(feature = "net")]
        Cmd::Sync(args) => sync(&cli.db, args),
        #[cfg(feature = "net")]
        Cmd::Bench(cmd) => bench_cmd(cmd),
        #[cfg(feature = "net")]
        Cmd::Token(cmd) => token_cmd(cmd),
        Cmd::Compact => {
            let replica = open(&cli.db)?;
            let before = file_size(&cli.db);
            let report = replica.compact()?;
            eprintln!(
                "compacted {} documents, removed {} superseded change-feed entries; {} -> {} bytes",
                report.documents,
                report.feed_entries_removed,
                before,
                file_size(&cli.db)
            );
            Ok(())
        }
    }
}

/// `weft serve`: binds, prints `weft relay listening on ws://ADDR` (wss:// with TLS), runs until
/// a signal.
#[cfg(feature = "net")]
fn serve(args: ServeArgs) -> CliResult {
    // Read the certificate first: a bad file is reported before the port is taken.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            weft::net::TlsConfig::from_pem_files(cert, key)
                .map_err(|e| CliError::Input(format!("TLS: {e}")))?,
        ),
        _ => None,
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        // The auth decision comes before the port is taken: a refused public address is
        // never listened on, not even briefly.
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&args.listen)
            .await
            .map_err(|e| CliError::Input(format!("--listen {}: {e}", args.listen)))?
            .collect();
        let auth = relay_auth(&args, &resolved)?;
        let listener = tokio::net::TcpListener::bind(&resolved[..])
            .await
            .map_err(|e| CliError::Io(format!("listening on {}: {e}", args.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CliError::Io(format!("listening on {}: {e}", args.listen)))?;
        let mut config = weft::net::RelayConfig::new(args.data.clone());
        config.auth = auth;
        config.max_connections = args.max_connections;
        config.tls = tls;
        config.creates = (args.creates_per_minute > 0).then_some(weft::CreateLimit {
            per_minute: args.creates_per_minute,
            burst: args.create_burst,
        });
        config.limits.max_ops = args.max_document_ops;
        // Say "listening" only once the store is open too: a relay that cannot open its
        // database never claims to serve.
        let data = args.data.clone();
        let mut options = replica_options();
        options.limits = config.limits;
        let replica = tokio::task::spawn_blocking(move || -> CliResult<Replica> {
            std::fs::create_dir_all(&data).map_err(io_err("creating", &data))?;
            Ok(Replica::open_with(data.join("relay.db"), options)?)
        })
        .await
        .map_err(|e| CliError::Io(format!("opening the relay's database: {e}")))??;
        out(&format!("weft relay listening on {scheme}://{addr}"))?;
        weft::net::run_with_replica(listener, config, replica, shutdown_signal())
            .await
            .map_err(|e| CliError::Io(e.to_string()))
    })
}

/// The relay's token key, and the safe default without one: loopback only, unless the
/// operator insists.
#[cfg(feature = "net")]
fn relay_auth(
    args: &ServeArgs,
    addrs: &[std::net::SocketAddr],
) -> CliResult<Option<weft::net::auth::TokenKey>> {
    if let Some(file) = &args.auth_secret_file {
        let key = weft::net::auth::TokenKey::from_file(file)
            .map_err(|e| CliError::Input(e.to_string()))?;
        eprintln!(
            "weft: clients need a token signed with the secret in {}",
            file.display()
        );
        return Ok(Some(key));
    }
    let listen = &args.listen;
    if !addrs.iter().all(|a| a.ip().is_loopback()) && !args.insecure_no_auth {
        return Err(CliError::Input(format!(
            "refusing to serve {listen} without authentication: anyone who reaches it could read \
             and write every document. Pass --auth-secret-file FILE (tokens: `weft token issue`), \
             listen on 127.0.0.1, or pass --insecure-no-auth if a proxy in front checks access"
        )));
    }
    eprintln!(
        "weft: WARNING: no authentication (--auth-secret-file not given): every client that \
         reaches {listen} reads and writes every document"
    );
    Ok(None)
}

/// `weft token issue`.
#[cfg(feature = "net")]
fn token_cmd(cmd: TokenCmd) -> CliResult {
    use weft::net::auth::{TokenKey, parse_list};
    match cmd {
        TokenCmd::Issue {
            secret_file,
            sub,
            read,
            write,
            ttl,
        } => {
            let key =
                TokenKey::from_file(&secret_file).map_err(|e| CliError::Input(e.to_string()))?;
            let read = parse_list(&read).map_err(|e| CliError::Input(e.to_string()))?;
            let write = parse_list(&write).map_err(|e| CliError::Input(e.to_string()))?;
            // A token that allows nothing, or less than asked for, is a mistake: say so now
            // rather than when a client is refused.
            if read == weft::Scope::Collections(Vec::new()) {
                return Err(CliError::Usage(
                    "a token without --read allows nothing (writing needs reading too): pass \
                     --read with the collections it may read, `*` for all"
                        .into(),
                ));
            }
            let unreadable = match (&write, &read) {
                (_, weft::Scope::All) => Vec::new(),
                (weft::Scope::All, weft::Scope::Collections(_)) => vec!["*".to_owned()],
                (weft::Scope::Collections(w), weft::Scope::Collections(r)) => {
                    w.iter().filter(|c| !r.contains(c)).cloned().collect()
                }
            };
            if !unreadable.is_empty() {
                return Err(CliError::Usage(format!(
                    "--write {0}: a token can write only collections it can also read: add {0} to \
                     --read",
                    unreadable.join(",")
                )));
            }
            let token = key
                .issue(&sub, &read, &write, ttl)
                .map_err(|e| CliError::Io(e.to_string()))?;
            out(&token)
        }
    }
}

/// `weft bench fanout | idle` (the load generators live in `bench.rs`).
#[cfg(feature = "net")]
fn bench_cmd(cmd: BenchCmd) -> CliResult {
    match cmd {
        BenchCmd::Fanout {
            server,
            clients,
            changes,
            rate,
            collection,
            dir,
            timeout,
            token,
            ca_file,
        } => bench::fanout(bench::FanoutOptions {
            server,
            clients: clients as usize,
            changes,
            rate,
            collection,
            dir,
            timeout: Duration::from_secs(timeout),
            token,
            ca_file,
        }),
        BenchCmd::Idle {
            server,
            clients,
            from,
            hold,
            token,
        } => bench::idle(bench::IdleOptions {
            server,
            clients: clients as usize,
            from,
            hold: hold.map(Duration::from_secs),
            token,
        }),
    }
}

/// `weft sync --once | --watch`.
#[cfg(feature = "net")]
fn sync(db: &std::path::Path, args: SyncArgs) -> CliResult {
    use weft::net::{ConnectOptions, Status};
    let replica = open(db)?;
    let scope = if args.collections.is_empty() {
        weft::Scope::All
    } else {
        weft::Scope::Collections(args.collections.clone())
    };
    for c in &args.collections {
        weft::engine::validate_collection(c)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))?;
    let options = ConnectOptions {
        scope: scope.clone(),
        token: args.token.clone(),
        reconnect: args.mode.watch,
        ca_file: args.ca_file.clone(),
        ..ConnectOptions::default()
    };
    runtime.block_on(async {
        let started = std::time::Instant::now();
        let before = replica.last_seq();
        let connection = replica.connect(&args.server, options);
        if args.mode.once {
            // Waits out the relay's create limit too: a first sync of a large data set takes
            // longer but finishes.
            let result = tokio::time::timeout(
                Duration::from_secs(args.timeout),
                connection.wait_all_synced(|held| {
                    eprintln!(
                        "{} limits how many documents a session creates: {held} wait, offered again within a minute",
                        args.server
                    )
                }),
            )
            .await;
            let status = connection.status();
            let refused = connection.refused();
            let granted = connection.granted();
            connection.close().await;
            // A token may grant fewer collections than asked for: say so, and count those.
            let scope = match granted {
                Some(granted) if granted != scope => {
                    eprintln!("note: {} grants only {}; other collections were not synced", args.server, describe(&granted));
                    granted
                }
                _ => scope,
            };
            return match result {
                Err(_) => Err(CliError::Io(format!("not in sync with {} after {} s", args.server, args.timeout))),
                Ok(Err(Status::Rejected { code, reason })) => Err(CliError::Io(format!("{} rejected the session ({code}): {reason}", args.server))),
                Ok(Err(Status::Offline { error })) => Err(CliError::Io(error.to_string())),
                Ok(Err(other)) => Err(CliError::Io(format!("sync with {} failed: {other:?}", args.server))),
                Ok(Ok(())) if !refused.is_empty() => {
                    let list: Vec<String> = refused
                        .iter()
                        .map(|r| format!("  {} ({}: {})", r.doc, r.code, r.message))
                        .collect();
                    Err(CliError::Io(format!(
                        "{} refused {} document(s); everything else is in sync:\n{}",
                        args.server,
                        refused.len(),
                        list.join("\n")
                    )))
                }
                Ok(Ok(())) => {
                    let _ = status;
                    let summary = replica.catalog_summary(&scope)?;
                    let received = replica.changes_since(before, usize::MAX, None)?.iter().filter(|e| matches!(e.origin, weft::Origin::Peer(_))).count();
                    eprintln!(
                        "in sync with {}: {} documents in scope, {} changes received, {:.2} s",
                        args.server,
                        summary.count,
                        received,
                        started.elapsed().as_secs_f64()
                    );
                    Ok(())
                }
            };
        }
        let mut status = connection.watch();
        let _hook = replica.on_change(scope, |e| {
            eprintln!("{} {:?} {} {}", e.origin, e.kind, e.collection, e.id);
        });
        // Refusals do not change the status: show new ones as they come.
        let mut shown = std::collections::HashSet::new();
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every_second.tick() => {
                    for r in connection.refused() {
                        if shown.insert((r.doc, r.message.clone())) {
                            if r.code == weft::protocol::ErrorCode::RateLimited {
                                eprintln!("held back by {}'s create limit, offered again within a minute: {}", args.server, r.doc);
                            } else {
                                eprintln!("refused by {}: {} ({}: {})", args.server, r.doc, r.code, r.message);
                            }
                        }
                    }
                }
                changed = status.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = status.borrow().clone();
                    eprintln!("status: {now}");
                    if let Status::Rejected { code, reason } = now {
                        return Err(CliError::Io(format!("{} rejected the session ({code}): {reason}", args.server)));
                    }
                }
                () = shutdown_signal() => {
                    connection.close().await;
                    return Ok(());
                }
            }
        }
    })
}

/// "collections a, b" or "every collection".
#[cfg(feature = "net")]
fn describe(scope: &weft::Scope) -> String {
    match scope {
        weft::Scope::All => "every collection".into(),
        weft::Scope::Collections(c) if c.is_empty() => "no collection".into(),
        weft::Scope::Collections(c) => format!("collections {}", c.join(", ")),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
#[cfg(feature = "net")]
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("shutting down");
}

/// Size of the database file plus its WAL.
fn file_size(db: &std::path::Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.as_os_str().to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes to a temporary file in the same directory, then renames: a crash never leaves a
/// half-written bundle under the final name.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> CliResult {
    let tmp = path.with_extension("weft-tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::Io(format!("writing {}: {e}", path.display()))
    })
}

fn heads_json(heads: &[weft::ChangeHash]) -> Value {
    Value::Array(heads.iter().map(|h| Value::String(h.to_string())).collect())
}

fn doc(db: &std::path::Path, cmd: DocCmd) -> CliResult {
    match cmd {
        DocCmd::Create { collection, json } => {
            let body = read_json_arg(json)?;
            let replica = open(db)?;
            let id = replica.create(&collection, body)?;
            out(&id.to_string())
        }
        DocCmd::Get { id, meta, at } => {
            let id = parse_id(&id)?;
            let heads = match at {
                Some(hashes) => Some(
                    hashes
                        .iter()
                        .map(|h| {
                            h.trim().parse::<weft::ChangeHash>().map_err(|_| {
                                CliError::Input(format!(
                                    "{h:?} is not a change hash (64 hex characters)"
                                ))
                            })
                        })
                        .collect::<CliResult<Vec<_>>>()?,
                ),
                None => None,
            };
            let doc = Reader::new(db).read(|r| match &heads {
                Some(heads) => r.get_at(&id, heads),
                None => r.get(&id),
            })?;
            if meta {
                out(&json!({"id": doc.id.to_string(), "collection": doc.collection, "heads": heads_json(&doc.heads), "body": doc.body}).to_string())
            } else {
                out(&doc.body.to_string())
            }
        }
        DocCmd::Update(args) => {
            let id = parse_id(&args.id)?;
            let args_id = args.id.trim().to_owned();
            let pointer = |p: &str| DocPath::from_pointer(p).map_err(weft::Error::from);
            let replica = open(db)?;
            let args = args.how;
            if let Some(patch) = args.merge {
                replica.update(&id, read_json_arg(Some(patch))?)?;
            } else if let Some(v) = args.set {
                replica.set(&id, &pointer(&v[0])?, parse_value(&v[1])?)?;
            } else if let Some(p) = args.unset {
                replica.delete_path(&id, &pointer(&p)?)?;
            } else if let Some(v) = args.set_text {
                replica.set_text(&id, &pointer(&v[0])?, &v[1])?;
            } else if let Some(v) = args.splice {
                let number = |s: &str| {
                    s.parse::<usize>().map_err(|_| {
                        CliError::Input(format!("{s:?} is not a non-negative integer"))
                    })
                };
                replica
                    .splice(&id, &pointer(&v[0])?, number(&v[1])?, number(&v[2])?, &v[3])
                    .map_err(|e| match e {
                        // The library names its own call (`set_text`); say the CLI's option.
                        weft::Error::Json(weft::JsonError::NotText { found, .. }) => {
                            CliError::Input(format!(
                                "the value at {} is {found}, not collaborative text: make it \
                                 text first with `weft doc update {} --set-text {} TEXT`",
                                v[0], args_id, v[0]
                            ))
                        }
                        e => e.into(),
                    })?;
            }
            Ok(())
        }
        DocCmd::Delete { id } => {
            let id = parse_id(&id)?;
            let replica = open(db)?;
            // A missing document is an error; an already deleted one is not.
            replica.delete(&id)?;
            Ok(())
        }
        DocCmd::List {
            collection,
            conditions,
            limit,
            json,
        } => {
            let mut query = Query {
                collection,
                filter: None,
                limit,
            };
            for c in &conditions {
                query = query.filter(Filter::parse(c)?);
            }
            let docs = Reader::new(db).read(|r| r.query(&query))?;
            let mut stdout = io::BufWriter::new(io::stdout().lock());
            let write = |w: &mut dyn Write, line: String| writeln!(w, "{line}").map_err(output_err);
            for d in docs {
                if json {
                    write(
                        &mut stdout,
                        json!({"id": d.id.to_string(), "collection": d.collection, "body": d.body})
                            .to_string(),
                    )?;
                } else {
                    let mut body = d.body.to_string();
                    if body.chars().count() > 100 {
                        body = body.chars().take(99).collect::<String>() + "…";
                    }
                    write(
                        &mut stdout,
                        format!("{}  {:<12}  {}", d.id, d.collection, body),
                    )?;
                }
            }
            stdout.flush().map_err(output_err)
        }
    }
}

/// JSON text per `import` transaction, unless one line is more: a transaction's documents
/// are in memory together, parsed (~8 times their text) and as stored bodies and snapshots.
const IMPORT_BATCH_BYTES: usize = 8 << 20;

fn import(
    db: &std::path::Path,
    file: &std::path::Path,
    collection: &str,
    batch: usize,
) -> CliResult {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(io::BufReader::new(io::stdin()))
    } else {
        Box::new(io::BufReader::new(
            std::fs::File::open(file).map_err(io_err("opening", file))?,
        ))
    };
    if file.as_os_str() == "-" && io::stdin().is_terminal() {
        eprintln!("reading NDJSON from stdin, one JSON object per line; end with Ctrl-D");
    }
    // Parse and check every line first: a bad line aborts the import before anything is
    // written. Each line keeps its number, to say where a failed write stopped, and stays text
    // until its batch (parsed, it takes ~8 times the memory).
    let mut lines = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        // Invalid UTF-8 surfaces here, so name the line like any other bad line.
        let line = line.map_err(|e| {
            CliError::Io(format!(
                "reading {} line {}: {e}; nothing was imported",
                file.display(),
                n + 1
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let mut line = line;
        weft::json::parse_object(&line).map_err(|e| {
            CliError::Input(format!(
                "{} line {}: {e}; nothing was imported",
                file.display(),
                n + 1
            ))
        })?;
        line.shrink_to_fit();
        lines.push((n + 1, line));
    }
    weft::engine::validate_collection(collection)?;
    let replica = open(db)?;
    let total = lines.len();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} documents ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut imported = 0;
    let mut through = 0;
    let mut rest = lines.into_iter().peekable();
    while let Some(&(first_line, _)) = rest.peek() {
        // Up to `batch` documents, and no more JSON than IMPORT_BATCH_BYTES unless it is one.
        let mut lines = Vec::new();
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some((n, text)) = rest.next_if(|(_, text)| {
            lines.is_empty() || (lines.len() < batch && bytes + text.len() <= IMPORT_BATCH_BYTES)
        }) {
            bytes += text.len();
            // Parsed once already: this cannot fail.
            let body = weft::json::parse_object(&text).map_err(weft::Error::from)?;
            drop(text);
            lines.push(n);
            chunk.push(Value::Object(body));
        }
        if let Err(e) = replica.create_many(collection, chunk) {
            bar.finish_and_clear();
            // Earlier batches are committed and stay; this one and the rest are not written.
            if imported == 0 {
                return Err(CliError::Io(format!("{e}; nothing was imported")));
            }
            let input = if file.as_os_str() == "-" {
                "INPUT".to_owned()
            } else {
                file.display().to_string()
            };
            return Err(CliError::Io(format!(
                "importing lines {first_line}-{} failed: {e}. {imported} of {total} documents \
                 (through line {through}) were imported and stay; the rest were not. To resume: \
                 tail -n +{first_line} {input} | weft import - -c {collection}",
                lines.last().copied().unwrap_or(first_line)
            )));
        }
        imported += lines.len();
        through = lines.last().copied().unwrap_or(through);
        bar.inc(lines.len() as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "imported {total} documents into {collection} in {secs:.2} s ({:.0}/s)",
        total as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn change_line(e: &ChangeEvent) -> String {
    json!({
        "seq": e.seq,
        "id": e.id.to_string(),
        "collection": e.collection,
        "kind": e.kind,
        "heads": heads_json(&e.heads),
        "origin": e.origin.to_string(),
        "at": e.at,
    })
    .to_string()
}

fn changes(
    db: &std::path::Path,
    since: u64,
    collection: Option<String>,
    follow: bool,
) -> CliResult {
    let mut reader = Reader::new(db);
    let mut last = since;
    loop {
        let page = reader.read(|r| r.changes_since(last, 1000, collection.as_deref()))?;
        let mut stdout = io::BufWriter::new(io::stdout().lock());
        for e in &page {
            writeln!(stdout, "{}", change_line(e)).map_err(output_err)?;
            last = e.seq;
        }
        stdout.flush().map_err(output_err)?;
        if page.len() == 1000 {
            continue;
        }
        if !follow {
            return Ok(());
        }
        // Other processes write to the file; SQLite has no cross-process notification, so poll.
        std::thread::sleep(Duration::from_millis(50));
    }
}
