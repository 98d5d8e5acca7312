//! `weft bench`: the load generators' command line (the generators are in `bench.rs`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use crate::bench;
use crate::common::CliResult;
use crate::sync::parse_server;

#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Live fan-out (W3): one writer and N receiving replicas in this process; the writer edits
    /// one document at a fixed rate and every receiver records when each edit arrived. Prints
    /// latency percentiles; exits 1 if any receiver missed a change.
    Fanout {
        /// The relay's address, as `weft serve` prints it: ws://HOST:PORT.
        #[arg(long, value_parser = parse_server)]
        server: String,
        /// Connect the receivers to these relays instead, round-robin (repeat; relay nodes
        /// sharing one PostgreSQL database); the writer stays on --server.
        #[arg(long = "receivers-at", value_parser = parse_server)]
        receivers_at: Vec<String>,
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

/// `weft bench fanout | idle` (the load generators live in `bench.rs`).
pub(crate) fn bench_cmd(cmd: BenchCmd) -> CliResult {
    match cmd {
        BenchCmd::Fanout {
            server,
            receivers_at,
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
            receivers_at,
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
