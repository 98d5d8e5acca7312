//! The `weft` command line: parse arguments, set up logging, call the library.
//!
//! Output contract: results go to stdout (ids, JSON bodies, NDJSON), everything meant for a
//! human (summaries, progress, errors) goes to stderr. Exit status: 0 ok, 1 runtime error,
//! 2 usage error.
//!
//! Read commands (`doc get`, `doc list`, `changes`, `export-bundle`) never create a replica
//! file, and read one that is not writable read-only; the others write and create it.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_cmd;
mod changes;
mod common;
mod doc;
mod files;
mod import;
mod malloc;
mod serve;
mod sync;
mod token;
mod track;

use bench_cmd::BenchCmd;
use common::{CliError, CliResult, MAX_DB_SIZE, parse_size};
use doc::DocCmd;
use serve::ServeArgs;
use sync::SyncArgs;
use token::TokenCmd;
use track::TrackCmd;

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
    Serve(ServeArgs),
    /// Sync with a relay: `--once` until both sides hold the same version of every document in
    /// scope, or `--watch` to stay connected, pushing and receiving every change live.
    Sync(SyncArgs),
    /// Load generators for replication against a running relay (benchmarks, not tests).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Tracked tables: an app's own SQLite tables, written with plain SQL, replicated row by
    /// row (captured by triggers, applied back without echo).
    #[command(subcommand)]
    Track(TrackCmd),
    /// Signed access tokens for a relay started with `--auth-secret-file`.
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

fn run(cli: Cli) -> CliResult {
    let _ = MAX_DB_SIZE.set(cli.max_db_size);
    match cli.command {
        Cmd::Doc(cmd) => doc::doc(&cli.db, cmd),
        Cmd::Import {
            file,
            collection,
            batch,
        } => import::import(&cli.db, &file, &collection, batch as usize),
        Cmd::ExportBundle {
            file,
            collection,
            since,
        } => files::export_bundle(&cli.db, &file, collection, since),
        Cmd::ImportBundle { file } => files::import_bundle(&cli.db, &file),
        Cmd::Changes {
            since,
            collection,
            follow,
        } => changes::changes(&cli.db, since, collection, follow),
        Cmd::Serve(args) => serve::serve(args),
        Cmd::Sync(args) => sync::sync(&cli.db, args),
        Cmd::Bench(cmd) => bench_cmd::bench_cmd(cmd),
        Cmd::Token(cmd) => token::token_cmd(cmd),
        Cmd::Track(cmd) => track::track(&cli.db, cmd),
        Cmd::Compact => files::compact(&cli.db),
    }
}
