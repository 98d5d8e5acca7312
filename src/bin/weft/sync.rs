//! `weft sync --once | --watch`: manual and real-time sync with a relay.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use weft::net::{ConnectOptions, Status};

use crate::common::{CliError, CliResult, open};
use crate::serve::shutdown_signal;

/// A relay address: `ws://` or `wss://`. An `http(s)://` URL or a bare `HOST:PORT` is refused
/// with the address to use instead.
pub(crate) fn parse_server(s: &str) -> Result<String, String> {
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

#[derive(Args)]
#[group(id = "mode", required = true, multiple = false)]
pub(crate) struct SyncMode {
    /// Sync until in sync, print a summary, exit.
    #[arg(long)]
    once: bool,
    /// Stay connected (reconnecting as needed) and log what syncs, until Ctrl-C.
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
pub(crate) struct SyncArgs {
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

/// `weft sync --once | --watch`.
pub(crate) fn sync(db: &std::path::Path, args: SyncArgs) -> CliResult {
    let replica = open(db)?;
    let scope = if args.collections.is_empty() {
        weft::Scope::All
    } else {
        weft::Scope::Collections(args.collections.clone())
    };
    for c in &args.collections {
        weft::validate_collection(c)?;
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
    // Tracked tables: what the app wrote while weft was not running goes out now.
    let tracking = !replica.tracked()?.is_empty();
    if tracking && args.mode.once {
        let report = replica.sync_tracked()?;
        if report.folded > 0 {
            eprintln!(
                "tracked tables: {} captured row changes folded in",
                report.folded
            );
        }
    }
    let tracker = if tracking && args.mode.watch {
        Some(weft::track::Tracker::spawn(&replica)?)
    } else {
        None
    };
    let result = runtime.block_on(async {
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
    });
    if let Some(tracker) = tracker {
        tracker.stop();
    }
    if tracking && args.mode.once && result.is_ok() {
        let report = replica.sync_tracked()?;
        eprintln!(
            "tracked tables: {} rows written from the relay's changes",
            report.applied
        );
    }
    result
}

/// "collections a, b" or "every collection".
pub(crate) fn describe(scope: &weft::Scope) -> String {
    match scope {
        weft::Scope::All => "every collection".into(),
        weft::Scope::Collections(c) if c.is_empty() => "no collection".into(),
        weft::Scope::Collections(c) => format!("collections {}", c.join(", ")),
    }
}
