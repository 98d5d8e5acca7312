//! `weft track add | list | remove`: an app's own SQLite tables joining replication.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use weft::track::TrackSpec;

use crate::common::{CliResult, open, open_read, output_err};

#[derive(Subcommand)]
pub(crate) enum TrackCmd {
    /// Track a table of an app's SQLite file: install triggers that capture every row change
    /// the app commits, and turn its current rows into documents (one per row). `sync` then
    /// carries the rows both ways.
    Add {
        /// The app's SQLite file.
        #[arg(long)]
        app: PathBuf,
        /// The table (it needs a PRIMARY KEY the app chooses, e.g. a UUID text).
        #[arg(long)]
        table: String,
        /// The collection of its documents (default: the table's name).
        #[arg(long)]
        collection: Option<String>,
        /// Accept an INTEGER PRIMARY KEY: only if the app always chooses its ids itself
        /// (SQLite fills in the next rowid otherwise, and two replicas collide).
        #[arg(long)]
        allow_integer_key: bool,
    },
    /// List tracked tables: app file, table, collection, captured changes not yet folded in.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One pass now, without a relay: fold in what the apps' triggers captured, write into the
    /// tables what the replica received (from a bundle, say). `sync` does this by itself.
    Sync,
    /// Stop tracking a table: fold in what was captured, then drop the triggers and weft's
    /// tables from the app's file. The table's rows and the documents stay.
    Remove {
        #[arg(long)]
        app: PathBuf,
        #[arg(long)]
        table: String,
    },
}

pub(crate) fn track(db: &Path, cmd: TrackCmd) -> CliResult {
    match cmd {
        TrackCmd::Add {
            app,
            table,
            collection,
            allow_integer_key,
        } => {
            let replica = open(db)?;
            let spec = TrackSpec {
                collection,
                allow_integer_key,
                ..TrackSpec::new(app, table)
            };
            let (tracked, report) = replica.track(spec)?;
            eprintln!(
                "tracking table {} of {} as collection {}: {} rows now documents",
                tracked.table,
                tracked.app.display(),
                tracked.collection,
                report.folded
            );
            if report.refused > 0 {
                eprintln!(
                    "warning: {} rows could not be carried (see the log with WEFT_LOG=warn)",
                    report.refused
                );
            }
            Ok(())
        }
        TrackCmd::List { json } => {
            let replica = open_read(db)?;
            let mut out = std::io::stdout().lock();
            for s in replica.track_status()? {
                if json {
                    let line = serde_json::json!({
                        "app": s.tracked.app,
                        "table": s.tracked.table,
                        "collection": s.tracked.collection,
                        "pending": s.pending,
                        "applied_seq": s.applied_seq,
                    });
                    writeln!(out, "{line}").map_err(output_err)?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{} pending",
                        s.tracked.app.display(),
                        s.tracked.table,
                        s.tracked.collection,
                        s.pending
                    )
                    .map_err(output_err)?;
                }
            }
            Ok(())
        }
        TrackCmd::Sync => {
            let replica = open(db)?;
            let report = replica.sync_tracked()?;
            eprintln!(
                "tracked tables: {} captured changes folded in, {} rows written{}",
                report.folded,
                report.applied,
                if report.refused > 0 {
                    format!(", {} refused (see the log)", report.refused)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        TrackCmd::Remove { app, table } => {
            let replica = open(db)?;
            replica.untrack(&app, &table)?;
            eprintln!("stopped tracking table {table} of {}", app.display());
            Ok(())
        }
    }
}
