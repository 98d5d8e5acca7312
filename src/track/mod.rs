//! Tracked tables: an app's own SQLite tables, written with plain SQL by any program, joining
//! replication without code changes.
//!
//! [`Replica::track`] installs triggers on a table of the app's file that capture every row
//! change into `_weft_capture`, in the app's own transaction. A *pass*
//! ([`Replica::sync_tracked`], or continuously a [`Tracker`]) folds the captured changes into
//! the replica — one document per row, its id derived from the collection and the row's key,
//! an UPDATE as a change of the columns it changed — and writes every change of the tracked
//! collection that the replica received back into the table, without capturing those writes
//! again. See `ARCHITECTURE.md` ("Tracked tables") for the design and its limits.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let app_path = dir.path().join("app.sqlite");
//! use weft::Replica;
//! use weft::track::{TrackSpec, Tracker};
//!
//! // The app's own file and table, written with plain SQL (any language, any ORM).
//! let app = rusqlite::Connection::open(&app_path)?;
//! app.execute_batch("CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT, done INTEGER)")?;
//! app.execute("INSERT INTO todos VALUES ('t1', 'buy milk', 0)", [])?;
//!
//! let replica = Replica::open(dir.path().join("replica.db"))?;
//! let (_tracked, report) = replica.track(TrackSpec::new(&app_path, "todos"))?;
//! assert_eq!(report.folded, 1); // the row that was there is a document now
//! assert_eq!(replica.list("todos")?[0].body["title"], "buy milk");
//!
//! // The triggers capture later writes; a pass folds them in (and writes back what the
//! // replica received from elsewhere).
//! app.execute("UPDATE todos SET done = 1 WHERE id = 't1'", [])?;
//! replica.sync_tracked()?;
//! assert_eq!(replica.list("todos")?[0].body["done"], 1);
//!
//! // Live: a tracker next to `replica.connect(url, options)` runs a pass whenever the app or
//! // the replica commits.
//! let tracker = Tracker::spawn(&replica)?;
//! tracker.stop();
//! # Ok(()) }
//! ```
//!
//! This module uses rusqlite on the app's file and the replica's public commands only; it
//! never reaches into the engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::Replica;
use crate::engine::{Command, validate_collection};
use crate::error::{Error, Result};

mod apply;
mod fold;
mod install;
mod live;
mod rows;
mod schema;

pub use live::Tracker;

use schema::TableShape;

/// The replica metadata key of the tracked tables' list.
const REGISTRY: &str = "track/tables";

/// Why tracking a table failed or refused.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("the app's file has no table {0:?}")]
    NoSuchTable(String),
    #[error("{0:?} is a name SQLite or weft reserves; it cannot be tracked")]
    Reserved(String),
    #[error(
        "table {0:?} has no primary key, only SQLite's rowid, which each file numbers on its own: the same rowid on two replicas is two different rows. Give it a key the app chooses, e.g. `id TEXT PRIMARY KEY` holding a UUID"
    )]
    NoPrimaryKey(String),
    #[error(
        "table {0:?} uses AUTOINCREMENT: each replica counts its own ids up, so rows inserted on two replicas collide. Use a key the app chooses, e.g. `id TEXT PRIMARY KEY` holding a UUID"
    )]
    AutoIncrement(String),
    #[error(
        "column {column:?} of table {table:?} is an INTEGER PRIMARY KEY, which SQLite fills in with the next rowid when an INSERT leaves it out: two replicas would give the same number to different rows, and weft would merge them. Use a TEXT key holding a UUID, or, if the app always chooses its ids itself, pass --allow-integer-key (TrackSpec::allow_integer_key)"
    )]
    IntegerKey { table: String, column: String },
    #[error(
        "column {column:?} of table {table:?} is declared BLOB: weft carries INTEGER, REAL, TEXT and NULL values (rows become JSON documents). Store bytes as base64 or hex TEXT"
    )]
    BlobColumn { table: String, column: String },
    #[error("table {table:?} has {columns} columns; tracking carries at most 63")]
    TooManyColumns { table: String, columns: usize },
    #[error(
        "table {table:?} is tracked by replica {replica} already; one replica tracks an app's table (run `track remove` there first)"
    )]
    TrackedByOther { table: String, replica: String },
    #[error(
        "table {table:?} was tracked as collection {was:?}; remove it first to change the collection"
    )]
    CollectionChange { table: String, was: String },
    #[error("table {table:?} of {app} is tracked already")]
    AlreadyTracked { app: PathBuf, table: String },
    #[error("table {table:?} of {app} is not tracked by this replica")]
    NotTracked { app: PathBuf, table: String },
    #[error("the app's file {path}: {reason}")]
    AppFile { path: PathBuf, reason: String },
    #[error(
        "tracking of table {table:?} was removed from {app} (its _weft_state row is gone); run `weft track remove --app {app} --table {table}`"
    )]
    Uninstalled { app: PathBuf, table: String },
    #[error("the app's database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Replica(Box<Error>),
}

impl From<Error> for TrackError {
    fn from(e: Error) -> Self {
        match e {
            Error::Track(inner) => inner,
            other => TrackError::Replica(Box::new(other)),
        }
    }
}

impl From<crate::store::StoreError> for TrackError {
    fn from(e: crate::store::StoreError) -> Self {
        TrackError::Replica(Box::new(e.into()))
    }
}

impl From<TrackError> for Error {
    fn from(e: TrackError) -> Self {
        match e {
            TrackError::Replica(inner) => *inner,
            other => Error::Track(other),
        }
    }
}

/// What to track: a table of an app's SQLite file.
#[derive(Clone, Debug)]
pub struct TrackSpec {
    /// The app's SQLite file (it must exist).
    pub app: PathBuf,
    /// The table.
    pub table: String,
    /// The collection its rows go to (default: the table's name).
    pub collection: Option<String>,
    /// Accept an `INTEGER PRIMARY KEY` (refused by default: see [`TrackError::IntegerKey`]).
    pub allow_integer_key: bool,
}

impl TrackSpec {
    /// Tracks `table` of `app` into the collection of the same name.
    pub fn new(app: impl Into<PathBuf>, table: impl Into<String>) -> Self {
        Self {
            app: app.into(),
            table: table.into(),
            collection: None,
            allow_integer_key: false,
        }
    }
}

/// A tracked table, as the replica remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    /// The app's file (absolute).
    pub app: PathBuf,
    pub table: String,
    pub collection: String,
    pub allow_integer_key: bool,
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackReport {
    /// Captured row changes folded into the replica.
    pub folded: usize,
    /// Rows written into (or deleted from) the app's tables.
    pub applied: usize,
    /// Row changes that could not be carried (beyond the replica's limits, refused by a
    /// constraint of the app's table, malformed); each is logged.
    pub refused: usize,
    /// Documents of a tracked collection that are not rows (no key columns, or an id not
    /// derived from their key); each is logged.
    pub skipped: usize,
}

impl TrackReport {
    fn add(&mut self, other: TrackReport) {
        self.folded += other.folded;
        self.applied += other.applied;
        self.refused += other.refused;
        self.skipped += other.skipped;
    }
}

/// One tracked table as `track list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackStatus {
    pub tracked: Tracked,
    /// Captured changes not folded in yet.
    pub pending: u64,
    /// How far into the replica's change feed the table is written.
    pub applied_seq: u64,
}

/// An open app file and its tracked tables.
pub(crate) struct AppFile {
    pub path: PathBuf,
    pub conn: Connection,
    pub tables: Vec<Tracked>,
    pub shapes: HashMap<String, TableShape>,
    /// `PRAGMA schema_version` when `shapes` were read.
    schema_version: i64,
    /// `PRAGMA data_version` at the last pass.
    data_version: i64,
    /// Per table, how far into the feed the write-back got without writing (see `apply`).
    pub applied: HashMap<String, i64>,
    /// Captured rows folded since the folded ones were last removed from the app's file.
    pub folded_rows: usize,
    pub last_cleanup: std::time::Instant,
}

impl AppFile {
    fn open(path: &Path, tables: Vec<Tracked>) -> Result<Self, TrackError> {
        let app_err = |reason: String| TrackError::AppFile {
            path: path.to_owned(),
            reason,
        };
        if !path.is_file() {
            return Err(app_err(
                "no such file (if it moved for good, `weft track remove --app PATH --table T` forgets its tables)".into(),
            ));
        }
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| app_err(e.to_string()))?;
        // While the app commits, SQLite answers BUSY; its default busy handler then sleeps
        // 1, 2, 5, 10 ... 25 ms between tries, which made a live tracker notice a commit up to
        // 200 ms late. Retry every millisecond instead, for up to 10 s.
        conn.busy_handler(Some(retry_every_millisecond))?;
        // The shapes are read (and checked against the installed triggers) by the first pass.
        Ok(AppFile {
            path: path.to_owned(),
            conn,
            tables,
            shapes: HashMap::new(),
            schema_version: -1,
            data_version: -1,
            applied: HashMap::new(),
            folded_rows: 0,
            last_cleanup: std::time::Instant::now(),
        })
    }

    /// Re-reads the tables' shapes when the schema changed.
    fn refresh_shapes(&mut self) -> Result<bool, TrackError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        if version == self.schema_version {
            return Ok(false);
        }
        for t in &self.tables {
            let shape = schema::inspect(&self.conn, &t.table, t.allow_integer_key)?;
            self.shapes.insert(t.table.clone(), shape);
        }
        self.schema_version = version;
        Ok(true)
    }

    /// Whether another connection committed to the file since the last call.
    fn changed(&mut self) -> Result<bool, TrackError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let changed = version != self.data_version;
        self.data_version = version;
        Ok(changed)
    }

    /// One pass: keep up with schema changes, fold in what the app captured, write back what
    /// the replica has.
    fn pass(&mut self, replica: &Replica) -> Result<TrackReport, TrackError> {
        let mut report = TrackReport::default();
        if self.refresh_shapes()? {
            self.reinstall_changed(replica)?;
        }
        // A bounded number of rounds: the app may keep writing while we apply.
        for _ in 0..16 {
            fold::fold(replica, self, &mut report)?;
            let folded_up_to = fold::folded_up_to(replica, self)?;
            let mut again = false;
            for table in self.tables.clone() {
                self.check_installed(&table)?;
                if let apply::Applied::FoldFirst =
                    apply::apply(replica, self, &table, folded_up_to, &mut report)?
                {
                    again = true;
                }
            }
            if !again {
                break;
            }
        }
        Ok(report)
    }

    /// A tracked table whose columns changed (ALTER TABLE ADD/RENAME COLUMN) gets triggers for
    /// its new columns, and every row is captured again so that what was written in between
    /// reaches its document (unchanged fields are no-ops in the fold).
    fn reinstall_changed(&mut self, replica: &Replica) -> Result<(), TrackError> {
        let replica_id = replica.replica_id().to_string();
        for table in self.tables.clone() {
            let Some(new) = self.shapes.get(&table.table).cloned() else {
                continue;
            };
            self.check_installed(&table)?;
            if install::installed_columns(&self.conn, &table.table)? == new.columns {
                continue;
            }
            tracing::info!(table = %table.table, columns = ?new.columns, "a tracked table's columns changed; triggers re-installed");
            install::install(
                &mut self.conn,
                &table.table,
                &new,
                &replica_id,
                &table.collection,
            )?;
        }
        Ok(())
    }

    /// Removes the captured rows the replica has folded in (a one-shot pass leaves none).
    fn remove_folded(&mut self, replica: &Replica) -> Result<(), TrackError> {
        let cursor = fold::folded_up_to(replica, self)?;
        self.conn
            .execute("DELETE FROM _weft_capture WHERE id <= ?1", [cursor])?;
        self.folded_rows = 0;
        Ok(())
    }

    fn check_installed(&self, table: &Tracked) -> Result<(), TrackError> {
        let installed = install::has_tables(&self.conn)?
            && self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM _weft_state WHERE tbl = ?1)",
                [&table.table],
                |r| r.get::<_, bool>(0),
            )?;
        if installed {
            Ok(())
        } else {
            Err(TrackError::Uninstalled {
                app: self.path.clone(),
                table: table.table.clone(),
            })
        }
    }
}

/// The document id of generation `generation` of the row with key `key` (the key columns'
/// values, in key order) of a table tracked into `collection`. Generation 0 is a key's first
/// document; each delete and insert again of the key makes the next.
pub fn row_document_id(
    collection: &str,
    key: &[serde_json::Value],
    generation: u32,
) -> crate::DocumentId {
    rows::row_id(collection, &rows::key_text(key), generation)
}

fn retry_every_millisecond(tries: i32) -> bool {
    std::thread::sleep(std::time::Duration::from_millis(1));
    tries < 10_000
}

/// The registry, grouped by app file.
fn by_app(tracked: Vec<Tracked>) -> Vec<(PathBuf, Vec<Tracked>)> {
    let mut groups: Vec<(PathBuf, Vec<Tracked>)> = Vec::new();
    for t in tracked {
        match groups.iter_mut().find(|(app, _)| *app == t.app) {
            Some((_, tables)) => tables.push(t),
            None => groups.push((t.app.clone(), vec![t])),
        }
    }
    groups
}

fn absolute(app: &Path) -> Result<PathBuf, TrackError> {
    std::fs::canonicalize(app).map_err(|e| TrackError::AppFile {
        path: app.to_owned(),
        reason: e.to_string(),
    })
}

impl Replica {
    /// The tables this replica tracks.
    pub fn tracked(&self) -> Result<Vec<Tracked>> {
        match self.meta(REGISTRY)? {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                crate::store::StoreError::Corrupt(format!("the tracked tables' list: {e}")).into()
            }),
        }
    }

    fn put_registry(&self, tracked: &[Tracked]) -> Result<()> {
        let value = serde_json::to_vec(tracked)
            .map_err(|e| Error::Internal(format!("the tracked tables' list: {e}")))?;
        self.execute_commands(vec![Command::PutMeta {
            key: REGISTRY.into(),
            value,
        }])
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("no result".into())))
        .map(drop)
    }

    /// Starts tracking a table of an app's SQLite file: installs its triggers, captures its
    /// current rows and folds them in (so they are documents when this returns). Refuses a
    /// table weft cannot carry safely, with the reason (see [`TrackError`]).
    pub fn track(&self, spec: TrackSpec) -> Result<(Tracked, TrackReport)> {
        let app = absolute(&spec.app)?;
        let collection = spec.collection.unwrap_or_else(|| spec.table.clone());
        validate_collection(&collection)?;
        let mut registry = self.tracked()?;
        if registry
            .iter()
            .any(|t| t.app == app && t.table == spec.table)
        {
            return Err(TrackError::AlreadyTracked {
                app,
                table: spec.table,
            }
            .into());
        }
        let tracked = Tracked {
            app: app.clone(),
            table: spec.table.clone(),
            collection: collection.clone(),
            allow_integer_key: spec.allow_integer_key,
        };
        let mut file = AppFile::open(&app, vec![tracked.clone()])?;
        let shape = schema::inspect(&file.conn, &spec.table, spec.allow_integer_key)?;
        install::install(
            &mut file.conn,
            &spec.table,
            &shape,
            &self.replica_id().to_string(),
            &collection,
        )?;
        registry.push(tracked.clone());
        self.put_registry(&registry)?;
        drop(file);
        let report = self.sync_tracked_app(&app)?;
        Ok((tracked, report))
    }

    /// Stops tracking a table: folds in what its triggers captured, then drops the triggers,
    /// its captured changes and row map (and the `_weft_` tables when no table is left). The
    /// table and the documents stay.
    pub fn untrack(&self, app: &Path, table: &str) -> Result<()> {
        let missing = !app.exists();
        let app = if missing {
            std::path::absolute(app).map_err(|e| TrackError::AppFile {
                path: app.to_owned(),
                reason: e.to_string(),
            })?
        } else {
            absolute(app)?
        };
        let mut registry = self.tracked()?;
        let Some(at) = registry
            .iter()
            .position(|t| t.app == app && t.table == table)
        else {
            return Err(TrackError::NotTracked {
                app,
                table: table.to_owned(),
            }
            .into());
        };
        if missing {
            // The app's file is gone, and with it whatever it had captured: forget the table.
            tracing::warn!(app = %app.display(), table, "the app's file is gone; forgetting its tracked table");
            registry.remove(at);
            return self.put_registry(&registry);
        }
        let tables: Vec<Tracked> = registry.iter().filter(|t| t.app == app).cloned().collect();
        let mut file = AppFile::open(&app, tables)?;
        loop {
            let mut report = TrackReport::default();
            fold::fold(self, &mut file, &mut report)?;
            let folded_up_to = fold::folded_up_to(self, &file)?;
            if install::uninstall(&mut file.conn, table, folded_up_to)? {
                break;
            }
        }
        registry.remove(at);
        self.put_registry(&registry)
    }

    /// One pass over every tracked table: folds in the app's captured changes, writes back the
    /// replica's. `sync --once` runs one before and one after syncing.
    pub fn sync_tracked(&self) -> Result<TrackReport> {
        let mut total = TrackReport::default();
        for (app, tables) in by_app(self.tracked()?) {
            let mut file = AppFile::open(&app, tables)?;
            total.add(file.pass(self)?);
            file.remove_folded(self)?;
        }
        Ok(total)
    }

    fn sync_tracked_app(&self, app: &Path) -> Result<TrackReport> {
        let tables: Vec<Tracked> = self
            .tracked()?
            .into_iter()
            .filter(|t| t.app == app)
            .collect();
        let mut file = AppFile::open(app, tables)?;
        Ok(file.pass(self)?)
    }

    /// Each tracked table with its pending captures and write-back position.
    pub fn track_status(&self) -> Result<Vec<TrackStatus>> {
        let mut out = Vec::new();
        for (app, tables) in by_app(self.tracked()?) {
            let file = AppFile::open(&app, tables.clone())?;
            let folded_up_to = fold::folded_up_to(self, &file)?;
            for tracked in tables {
                file.check_installed(&tracked)?;
                let (pending, applied_seq): (i64, i64) = file
                    .conn
                    .query_row(
                        "SELECT (SELECT count(*) FROM _weft_capture WHERE tbl = ?1 AND id > ?2),
                                (SELECT applied_seq FROM _weft_state WHERE tbl = ?1)",
                        rusqlite::params![tracked.table, folded_up_to],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(TrackError::from)?;
                out.push(TrackStatus {
                    tracked,
                    pending: pending.max(0) as u64,
                    applied_seq: applied_seq.max(0) as u64,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A row the app changed, captured but not folded in, and a remote change of the same row
    /// waiting in the replica: the write-back gives way to the fold, and the row ends with both.
    #[test]
    fn a_pending_local_edit_is_merged_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (app_a, app_b) = (dir.path().join("a.sqlite"), dir.path().join("b.sqlite"));
        for app in [&app_a, &app_b] {
            Connection::open(app)
                .unwrap()
                .execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, x TEXT, y TEXT)")
                .unwrap();
        }
        Connection::open(&app_a)
            .unwrap()
            .execute("INSERT INTO t VALUES ('k', 'x0', 'y0')", [])
            .unwrap();
        let ra = Replica::open(dir.path().join("a.db")).unwrap();
        let rb = Replica::open(dir.path().join("b.db")).unwrap();
        ra.track(TrackSpec::new(&app_a, "t")).unwrap();
        rb.track(TrackSpec::new(&app_b, "t")).unwrap();
        let share = |from: &Replica, to: &Replica| {
            let bundle = from.export_bundle(&crate::BundleScope::All).unwrap();
            to.import_bundle(&bundle).unwrap();
        };
        share(&ra, &rb);
        rb.sync_tracked().unwrap();

        // b's app edits x (captured, not folded); a's edit of y reaches b's replica.
        let b_app = Connection::open(&app_b).unwrap();
        b_app.execute("UPDATE t SET x = 'x-from-b'", []).unwrap();
        Connection::open(&app_a)
            .unwrap()
            .execute("UPDATE t SET y = 'y-from-a'", [])
            .unwrap();
        ra.sync_tracked().unwrap();
        share(&ra, &rb);

        let tracked = rb.tracked().unwrap();
        let mut file = AppFile::open(&app_b, tracked.clone()).unwrap();
        file.refresh_shapes().unwrap();
        let mut report = TrackReport::default();
        let folded_up_to = fold::folded_up_to(&rb, &file).unwrap();
        assert!(matches!(
            apply::apply(&rb, &mut file, &tracked[0], folded_up_to, &mut report).unwrap(),
            apply::Applied::FoldFirst
        ));
        let row = |c: &Connection| -> (String, String) {
            c.query_row("SELECT x, y FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
        };
        assert_eq!(
            row(&b_app),
            ("x-from-b".into(), "y0".into()),
            "nothing overwritten"
        );

        file.pass(&rb).unwrap();
        assert_eq!(row(&b_app), ("x-from-b".into(), "y-from-a".into()));
        let doc = &rb.list("t").unwrap()[0];
        assert_eq!(
            doc.body,
            json!({"id": "k", "x": "x-from-b", "y": "y-from-a"})
        );
    }
}
