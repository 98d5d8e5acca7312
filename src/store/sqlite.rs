//! The SQLite store: one file per replica, WAL mode, versioned schema.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params,
    params_from_iter,
};
use serde_json::Value;

use super::{
    DocRecord, Durability, Store, StoreError, StoreMode, SummaryCache, USER_META, decode_heads,
    encode_heads,
};
use crate::bundle::{BundleEntry, BundleScope};
use crate::engine::{ChangeEvent, ChangeKind, ChunkKind, StorageOp, StoredChunk, StoredDoc};
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::{CatalogEntry, CatalogSummary, Digest, bucket_of, doc_digest};
use crate::query::{CmpOp, FieldPath, FieldSeg, Filter, Query};

/// `PRAGMA application_id`: "WEFT".
const APPLICATION_ID: i64 = 0x5745_4654;

/// Schema migrations; `PRAGMA user_version` is the number applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    // 1: catalog (with each document's compacted snapshot), incremental chunks, change feed.
    // Documents are referred to by their integer `doc_key` everywhere but the catalog, so the
    // 16-byte id is stored (and indexed) once.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE documents (
        doc_key     INTEGER PRIMARY KEY,
        doc_id      BLOB NOT NULL UNIQUE,
        collection  TEXT NOT NULL,
        deleted     INTEGER NOT NULL DEFAULT 0,
        heads       BLOB NOT NULL,
        updated_seq INTEGER NOT NULL,
        body        TEXT,
        snapshot    BLOB
    );
    CREATE INDEX documents_by_collection ON documents (collection);
    CREATE TABLE chunks (
        chunk_id INTEGER PRIMARY KEY,
        doc_key  INTEGER NOT NULL,
        bytes    BLOB NOT NULL
    );
    CREATE INDEX chunks_by_doc ON chunks (doc_key, chunk_id);
    CREATE TABLE changes (
        seq     INTEGER PRIMARY KEY,
        doc_key INTEGER NOT NULL,
        kind    INTEGER NOT NULL,
        heads   BLOB NOT NULL,
        origin  TEXT NOT NULL,
        at      INTEGER NOT NULL
    );",
    // 2: per-peer Automerge sync state (the heads both sides are known to share), so a session
    // with a peer seen before resumes each document's sync from there instead of from nothing.
    "CREATE TABLE sync_states (
        peer    BLOB NOT NULL,
        doc_key INTEGER NOT NULL,
        state   BLOB NOT NULL,
        PRIMARY KEY (peer, doc_key)
    ) WITHOUT ROWID;
    CREATE INDEX sync_states_by_doc ON sync_states (doc_key);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Options for [`SqliteStore::open`].
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    pub durability: Durability,
    /// A quota: the file may not grow beyond this many bytes (SQLite's `max_page_count`,
    /// rounded down to whole pages, and never below the file's current size). A write that
    /// needs more fails exactly as on a full disk; reads go on. `None`: no limit.
    pub max_size: Option<u64>,
    /// How long a step waits for another process's write transaction on the file before it
    /// fails with SQLite's `DatabaseBusy` (default 10 s).
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::default(),
            max_size: None,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// A replica's SQLite file.
pub struct SqliteStore {
    conn: Connection,
    replica_id: ReplicaId,
    /// `PRAGMA data_version` at our last transaction: it changes when another connection commits.
    data_version: i64,
    /// Catalog summaries per scope (collection names; `None` = all), kept current by our own
    /// writes (XOR out the old digest, XOR in the new) and dropped when another connection
    /// committed (`version` is the `data_version` they are valid at) or a transaction rolled
    /// back. A live session re-announces its summary after every burst of changes; without
    /// the cache each announcement scans the whole catalog.
    summaries: std::cell::RefCell<SummaryCache>,
    mode: StoreMode,
    /// The file, as shown in messages.
    path: String,
}

/// Whether SQLite failed because it cannot create or open the `-wal` and `-shm` files it needs
/// next to the database (their directory is not writable).
fn cannot_share(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen)
    )
}

/// When the database file is writable but its `-wal` or `-shm` exists and is not (left by
/// another user's process, e.g. created with the mode of a file that was read-only then), the
/// reason writing fails.
fn unwritable_companions(shown: &str) -> Option<String> {
    let stuck: Vec<String> = ["-wal", "-shm"]
        .iter()
        .map(|suffix| format!("{shown}{suffix}"))
        .filter(|f| {
            Path::new(f).exists() && std::fs::OpenOptions::new().write(true).open(f).is_err()
        })
        .collect();
    (!stuck.is_empty()).then(|| {
        format!(
            "{} cannot be written (left by another user's process?); when no process has the \
             file open, delete {}",
            stuck.join(" and "),
            if stuck.len() == 1 { "it" } else { "them" }
        )
    })
}

/// `file:PATH?immutable=1`: SQLite reads the file without locks or `-shm`, as if nothing
/// could change it.
fn immutable_uri(path: &Path) -> String {
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().replace('\\', "/").into_bytes();
    // An absolute path gets an empty authority (`file:///...`), so a path starting with `//`
    // is not read as a host name.
    let mut uri = String::from(if bytes.first() == Some(&b'/') {
        "file://"
    } else {
        "file:"
    });
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

fn random_replica_id() -> Result<ReplicaId, StoreError> {
    ReplicaId::random().map_err(|e| StoreError::Open {
        path: String::new(),
        reason: e.to_string(),
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// A file that exists but cannot be written (its permissions, a read-only file system, or
    /// a directory where SQLite cannot create the `-wal` and `-shm` files it needs) is
    /// [`StoreError::ReadOnly`]: [`open_read_only`](Self::open_read_only) reads it.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Open {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        // SQLite opens a file it may not write read-only without saying so (and then fails at
        // the first write with "attempt to write a readonly database"): say it now.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::ReadOnly {
                path: shown,
                reason: "the file is not writable".into(),
            });
        }
        Self::open_writable(conn, &shown, options).map_err(|e| match e {
            e @ StoreError::Sqlite {
                code: Some(ErrorCode::ReadOnly),
                ..
            } => StoreError::ReadOnly {
                reason: unwritable_companions(&shown).unwrap_or_else(|| e.to_string()),
                path: shown.clone(),
            },
            e => e,
        })
    }

    fn open_writable(
        conn: Connection,
        shown: &str,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        conn.busy_timeout(options.busy_timeout)?;
        let not_weft = |reason: String| StoreError::NotWeft {
            path: shown.to_owned(),
            reason,
        };
        // Reading the header is the first thing that fails on a file that is not SQLite, and
        // on one whose `-wal` and `-shm` SQLite cannot create or open for writing.
        let _: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| {
                if cannot_share(&e) {
                    StoreError::ReadOnly {
                        path: shown.to_owned(),
                        reason: unwritable_companions(shown).unwrap_or_else(|| {
                            format!(
                                "SQLite cannot create {shown}-wal and {shown}-shm next to it; is \
                                 its directory writable? ({e})"
                            )
                        }),
                    }
                } else {
                    not_weft(e.to_string())
                }
            })?;
        // Switching to WAL needs the file to itself, and SQLite answers BUSY at once (without
        // its busy handler) while another process is creating or using it: retry, within the
        // busy timeout.
        let started = std::time::Instant::now();
        let journal: String = loop {
            match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
                Err(e)
                    if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                        && started.elapsed() < options.busy_timeout =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => break other?,
            }
        };
        if !journal.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: shown.to_owned(),
                reason: format!("WAL mode unavailable (journal_mode is {journal})"),
            });
        }
        let sync = match options.durability {
            Durability::Process => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -32000;"))?;

        let mut store = Self {
            conn,
            replica_id: ReplicaId::from_bytes([0; 16]),
            data_version: 0,
            summaries: Default::default(),
            mode: StoreMode::ReadWrite,
            path: shown.to_owned(),
        };
        let tx = store
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        // Again, under the write lock: another process may have been creating the file when
        // it was first read (its tables committed since, with the id).
        let app_id: i64 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if app_id != APPLICATION_ID {
            let tables: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
            if app_id != 0 || tables != 0 {
                return Err(not_weft(format!(
                    "application_id {app_id:#x}, {tables} schema objects"
                )));
            }
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tracing::info!(path = %shown, to = i + 1, "migrating schema");
            tx.execute_batch(sql)?;
        }
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))?;
        let existing: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM meta WHERE key = 'replica_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        store.replica_id = match existing {
            Some(bytes) => ReplicaId::try_from_slice(&bytes)
                .ok_or_else(|| StoreError::Corrupt("replica_id is not 16 bytes".into()))?,
            None => {
                let id = random_replica_id()?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('replica_id', ?1)",
                    [id.as_bytes().as_slice()],
                )?;
                id
            }
        };
        tx.commit()?;
        store.data_version = store
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if let Some(bytes) = options.max_size {
            let page: i64 = store.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(1);
            let set: i64 =
                store
                    .conn
                    .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                        r.get(0)
                    })?;
            tracing::debug!(path = %shown, max_pages = set, "quota set");
        }
        Ok(store)
    }

    /// Opens an existing replica for reading only: it is not created, migrated or written.
    /// Writes fail with [`StoreError::ReadOnly`].
    ///
    /// SQLite shares a WAL database between processes through its `-wal` file and `-shm`
    /// index. When a `-wal` exists (a writer has the file open), or the file is writable and
    /// SQLite can create them, they are used and the store sees other processes' commits as
    /// they happen ([`StoreMode::ReadOnly`]). Otherwise no process is writing the file — a
    /// writer needs the `-wal` — and the main file holds every commit: it is read as it is,
    /// without locks and without creating anything ([`StoreMode::Snapshot`], SQLite's
    /// `immutable`). Creating them is not an option then: in a directory that is not writable
    /// it fails, and next to a file that is not writable they would get its mode, and the
    /// owner's next write after making the file writable again would fail on them.
    ///
    /// A snapshot does not see commits made after it was opened: reopen to see them. A
    /// process that may write the file (its owner, root) could start writing during a read
    /// and change the file under it; the file's size and modification time then change,
    /// which a reader that must be sure can check around its read.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let open_err = |reason: String| StoreError::Open {
            path: shown.clone(),
            reason,
        };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { path: shown });
            }
            Err(e) => return Err(open_err(e.to_string())),
            Ok(meta) if meta.is_dir() => return Err(open_err("it is a directory".into())),
            Ok(_) => {}
        }
        let not_weft = |reason: String| StoreError::NotWeft {
            path: shown.clone(),
            reason,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let open = |name: &str| {
            Connection::open_with_flags(name, flags).map_err(|e| open_err(e.to_string()))
        };
        let header =
            |conn: &Connection| conn.query_row("PRAGMA application_id", [], |r| r.get::<_, i64>(0));
        let snapshot = || -> Result<_, StoreError> {
            let conn = open(&immutable_uri(path))?;
            let app_id = header(&conn).map_err(|e| not_weft(e.to_string()))?;
            Ok((conn, StoreMode::Snapshot, app_id))
        };
        let wal = format!("{shown}-wal");
        let wal_exists = Path::new(&wal).exists();
        // Opening for writing (and closing at once) changes nothing, and answers exactly what
        // SQLite's own open would find: permissions, root, `chattr +i`, a read-only mount.
        let writable = std::fs::OpenOptions::new().write(true).open(path).is_ok();
        let (conn, mode, app_id) = if wal_exists || writable {
            let conn =
                Connection::open_with_flags(path, flags).map_err(|e| open_err(e.to_string()))?;
            conn.busy_timeout(Duration::from_secs(10))?;
            match header(&conn) {
                Ok(app_id) => (conn, StoreMode::ReadOnly, app_id),
                Err(e) if cannot_share(&e) && wal_exists => {
                    // A writer we cannot share with has the file open (typically for the
                    // moment of a write): say so as a passing condition, to try again.
                    return Err(StoreError::InUse(format!(
                        "{wal} holds commits that may not be in the file yet, and SQLite \
                         cannot open {shown}-shm to read them (is the directory writable?): {e}"
                    )));
                }
                // A directory that is not writable: no `-wal`, so no writer.
                Err(e) if cannot_share(&e) => snapshot()?,
                Err(e) => return Err(not_weft(e.to_string())),
            }
        } else {
            snapshot()?
        };
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if app_id != APPLICATION_ID {
            let tables: i64 =
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
            return Err(not_weft(if app_id == 0 && tables == 0 {
                "an empty database: no replica was created in it".into()
            } else {
                format!("application_id {app_id:#x}, {tables} schema objects")
            }));
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            return Err(StoreError::SchemaTooOld {
                path: shown,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let bytes: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'replica_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let replica_id = bytes
            .as_deref()
            .and_then(ReplicaId::try_from_slice)
            .ok_or_else(|| StoreError::Corrupt("no valid replica_id".into()))?;
        let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        tracing::debug!(path = %shown, ?mode, "opened read-only");
        Ok(Self {
            conn,
            replica_id,
            data_version,
            summaries: Default::default(),
            mode,
            path: shown,
        })
    }

    /// The error of a write to a store opened read-only.
    fn refuse_write(&self) -> Result<(), StoreError> {
        match self.mode {
            StoreMode::ReadWrite => Ok(()),
            StoreMode::ReadOnly | StoreMode::Snapshot => Err(StoreError::ReadOnly {
                path: self.path.clone(),
                reason: "it was opened read-only".into(),
            }),
        }
    }

    fn incrementals(&self, key: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT bytes FROM chunks WHERE doc_key = ?1 ORDER BY chunk_id")?;
        let rows = stmt.query_map([key], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn scan_catalog(
        &self,
        collections: Option<&[String]>,
        mut f: impl FnMut(DocumentId, &str, Digest, bool),
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT doc_id, collection, deleted, heads FROM documents")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            if let Some(names) = collections {
                let collection = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
                if !names.iter().any(|n| n == collection) {
                    continue;
                }
            }
            let collection = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
            let id = doc_id(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?)?;
            let deleted: bool = row.get(2)?;
            let heads = decode_heads(row.get_ref(3)?.as_blob().map_err(rusqlite::Error::from)?)?;
            f(id, collection, doc_digest(&id, &heads, deleted), deleted);
        }
        Ok(())
    }
}

const RECORD_COLUMNS: &str = "doc_id, collection, deleted, heads, body, updated_seq";

/// SQLite integers are signed: larger values are clamped (a "since" past every entry).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn doc_id(bytes: &[u8]) -> Result<DocumentId, StoreError> {
    DocumentId::try_from_slice(bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("document id of {} bytes", bytes.len())))
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<DocRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let heads: Vec<u8> = r.get(3)?;
    let collection = r.get(1)?;
    let deleted = r.get(2)?;
    let body = r.get(4)?;
    let updated_seq = r.get::<_, i64>(5)? as u64;
    Ok((|| {
        Ok(DocRecord {
            id: doc_id(&id)?,
            collection,
            deleted,
            heads: decode_heads(&heads)?,
            body,
            updated_seq,
        })
    })())
}

/// SQLite JSON path for a field path: `$."a"[2]."b"`.
fn json_path(path: &FieldPath) -> String {
    let mut out = String::from("$");
    for seg in &path.0 {
        match seg {
            // Inside a quoted label SQLite ends the label at the next '"'; there is no escape,
            // so such keys are matched by a label that cannot exist (no row matches).
            FieldSeg::Key(k) => {
                out.push_str(".\"");
                out.push_str(&k.replace('"', "\u{fffd}"));
                out.push('"');
            }
            FieldSeg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Appends the SQL for `filter` to `sql`, pushing every path and value to `args`. The SQL
/// evaluates to 1 or 0 (never NULL), matching [`Filter::matches`].
fn compile_filter(filter: &Filter, sql: &mut String, args: &mut Vec<SqlValue>) {
    match filter {
        Filter::Exists(path) => {
            sql.push_str("(json_type(body, ?) IS NOT NULL)");
            args.push(SqlValue::Text(json_path(path)));
        }
        Filter::Cmp(path, op, value) => {
            let p = SqlValue::Text(json_path(path));
            let eq = |sql: &mut String, args: &mut Vec<SqlValue>| match value {
                Value::Null => {
                    sql.push_str("coalesce(json_type(body, ?) = 'null', 0)");
                    args.push(p.clone());
                }
                Value::Bool(b) => {
                    sql.push_str("coalesce(json_type(body, ?) = ?, 0)");
                    args.extend([
                        p.clone(),
                        SqlValue::Text(if *b { "true" } else { "false" }.into()),
                    ]);
                }
                Value::Number(_) => {
                    sql.push_str("coalesce(json_type(body, ?) IN ('integer', 'real') AND json_extract(body, ?) = ?, 0)");
                    args.extend([p.clone(), p.clone(), number_arg(value)]);
                }
                Value::String(s) => {
                    sql.push_str(
                        "coalesce(json_type(body, ?) = 'text' AND json_extract(body, ?) = ?, 0)",
                    );
                    args.extend([p.clone(), p.clone(), SqlValue::Text(s.clone())]);
                }
                Value::Array(_) | Value::Object(_) => {
                    sql.push_str("coalesce(json_type(body, ?) IN ('array', 'object') AND json_extract(body, ?) = ?, 0)");
                    args.extend([p.clone(), p.clone(), SqlValue::Text(value.to_string())]);
                }
            };
            match op {
                CmpOp::Eq => eq(sql, args),
                CmpOp::Ne => {
                    sql.push_str("(json_type(body, ?) IS NOT NULL AND NOT ");
                    args.push(p.clone());
                    eq(sql, args);
                    sql.push(')');
                }
                CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => {
                    let kinds = if value.is_number() {
                        "('integer', 'real')"
                    } else {
                        "('text')"
                    };
                    let arg = match value {
                        Value::String(s) => SqlValue::Text(s.clone()),
                        Value::Number(_) => number_arg(value),
                        // validate() rejects these; compile to false rather than guess.
                        _ => {
                            sql.push('0');
                            return;
                        }
                    };
                    sql.push_str(&format!(
                        "coalesce(json_type(body, ?) IN {kinds} AND json_extract(body, ?) {} ?, 0)",
                        op.as_str()
                    ));
                    args.extend([p.clone(), p, arg]);
                }
            }
        }
        Filter::And(fs) | Filter::Or(fs) => {
            let (join, empty) = if matches!(filter, Filter::And(_)) {
                (" AND ", "1")
            } else {
                (" OR ", "0")
            };
            if fs.is_empty() {
                sql.push_str(empty);
                return;
            }
            sql.push('(');
            for (i, f) in fs.iter().enumerate() {
                if i > 0 {
                    sql.push_str(join);
                }
                compile_filter(f, sql, args);
            }
            sql.push(')');
        }
        Filter::Not(f) => {
            sql.push_str("(NOT ");
            compile_filter(f, sql, args);
            sql.push(')');
        }
    }
}

fn number_arg(value: &Value) -> SqlValue {
    match value.as_i64() {
        Some(i) => SqlValue::Integer(i),
        None => SqlValue::Real(value.as_f64().unwrap_or(f64::NAN)),
    }
}

/// The replica's storage interface, answered by the methods above.
impl Store for SqliteStore {
    /// This replica's id (created with the file).
    fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    /// The highest change-feed sequence number stored (0 when empty).
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([format!("{USER_META}{key}")], |r| r.get(0))
            .optional()?)
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        let max: i64 =
            self.conn
                .query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                    r.get(0)
                })?;
        Ok(max as u64)
    }

    /// Starts the write transaction that one driver step runs in (`BEGIN IMMEDIATE`: waits for
    /// other writers, then keeps them out until [`commit`](Self::commit)). Returns true when
    /// another connection — another process — committed since this store's last transaction:
    /// then whatever the caller cached from storage is stale.
    fn begin(&mut self) -> Result<bool, StoreError> {
        // A panic between begin and commit (e.g. in a user's change closure) leaves the
        // transaction open; without this every later write would fail with "cannot start a
        // transaction within a transaction". Nothing of it was committed, so roll it back.
        self.rollback();
        // Read-only: a read transaction (its steps only read, e.g. `get_at`).
        let begin = match self.mode {
            StoreMode::ReadWrite => "BEGIN IMMEDIATE",
            StoreMode::ReadOnly | StoreMode::Snapshot => "BEGIN",
        };
        self.conn.prepare_cached(begin)?.execute([])?;
        let version: i64 = match self
            .conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
        {
            Ok(v) => v,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        let changed = version != self.data_version;
        self.data_version = version;
        Ok(changed)
    }

    /// Commits the transaction opened by [`begin`](Self::begin).
    fn commit(&mut self) -> Result<(), StoreError> {
        match self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
        {
            Ok(_) => {
                self.summaries.borrow_mut().uncommitted = false;
                Ok(())
            }
            Err(e) => {
                // SQLite may have rolled the transaction back itself (a full disk does):
                // whatever the cache learned from it goes either way.
                self.summaries.borrow_mut().abandon();
                Err(e.into())
            }
        }
    }

    /// Abandons the transaction opened by [`begin`](Self::begin), if any.
    fn rollback(&mut self) {
        self.summaries.borrow_mut().abandon();
        if !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "rollback failed");
        }
    }

    /// Applies engine writes inside the transaction opened by [`begin`](Self::begin).
    fn write(&mut self, ops: &[StorageOp]) -> Result<(), StoreError> {
        if !ops.is_empty() {
            self.refuse_write()?;
        }
        let mut batch = WriteBatch {
            conn: &self.conn,
            summaries: &self.summaries,
            keys: std::collections::HashMap::new(),
        };
        for op in ops {
            match op {
                StorageOp::PutDocument {
                    id,
                    collection,
                    deleted,
                    heads,
                    body,
                    seq,
                } => batch.put_document(id, collection, *deleted, heads, body.as_deref(), *seq)?,
                StorageOp::InsertDocument {
                    id,
                    collection,
                    heads,
                    body,
                    snapshot,
                    seq,
                } => batch.insert_document(id, collection, heads, body, snapshot, *seq)?,
                StorageOp::ReplaceChunks { id, snapshot } => batch.replace_chunks(id, snapshot)?,
                StorageOp::AppendChunk { id, bytes } => batch.append_chunk(id, bytes)?,
                StorageOp::PurgeChunks { id } => batch.purge_chunks(id)?,
                StorageOp::PutSyncState { peer, id, state } => {
                    batch.put_sync_state(peer, id, state)?
                }
                StorageOp::AppendChange(event) => batch.append_change(event)?,
                StorageOp::PutMeta { key, value } => {
                    self.conn
                        .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                        .execute(params![format!("{USER_META}{key}"), value])?;
                }
            }
        }
        Ok(())
    }

    fn load(&self, id: &DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        let row = self
            .conn
            .prepare_cached("SELECT doc_key, collection, deleted, heads, snapshot FROM documents WHERE doc_id = ?1")?
            .query_row([id.as_bytes().as_slice()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?, r.get::<_, Vec<u8>>(3)?, r.get::<_, Option<Vec<u8>>>(4)?))
            })
            .optional()?;
        let Some((key, collection, deleted, heads, snapshot)) = row else {
            return Ok(None);
        };
        let mut chunks = Vec::new();
        if !deleted {
            if let Some(bytes) = snapshot {
                chunks.push(StoredChunk {
                    kind: ChunkKind::Snapshot,
                    bytes,
                });
            }
            for bytes in self.incrementals(key)? {
                chunks.push(StoredChunk {
                    kind: ChunkKind::Incremental,
                    bytes,
                });
            }
        }
        Ok(Some(StoredDoc {
            cursor: None,
            collection,
            deleted,
            heads: decode_heads(&heads)?,
            chunks,
        }))
    }

    /// Reads what the engine needs to bring a document into memory.
    /// The persisted sync state of `id` with `peer` (see `StorageOp::PutSyncState`).
    fn load_sync_state(
        &self,
        peer: &ReplicaId,
        id: &DocumentId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT s.state FROM sync_states s JOIN documents d ON d.doc_key = s.doc_key
                 WHERE s.peer = ?1 AND d.doc_id = ?2",
            )?
            .query_row(
                params![peer.as_bytes().as_slice(), id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// One catalog row.
    fn get(&self, id: &DocumentId) -> Result<Option<DocRecord>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM documents WHERE doc_id = ?1"
            ))?
            .query_row([id.as_bytes().as_slice()], record_from_row)
            .optional()?
            .transpose()
    }

    /// Live documents matching a query, in creation order.
    fn query(&self, query: &Query) -> Result<Vec<DocRecord>, StoreError> {
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM documents WHERE deleted = 0");
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(collection) = &query.collection {
            sql.push_str(" AND collection = ?");
            args.push(SqlValue::Text(collection.clone()));
        }
        if let Some(filter) = &query.filter {
            sql.push_str(" AND ");
            compile_filter(filter, &mut sql, &mut args);
        }
        sql.push_str(" ORDER BY doc_key");
        if let Some(limit) = query.limit {
            sql.push_str(" LIMIT ?");
            args.push(SqlValue::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        }
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), record_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Change-feed entries with `seq > since`, oldest first, at most `limit`.
    fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.seq, d.doc_id, d.collection, c.kind, c.heads, c.origin, c.at
             FROM changes c JOIN documents d ON d.doc_key = c.doc_key
             WHERE c.seq > ?1 AND (?2 IS NULL OR d.collection = ?2) ORDER BY c.seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                sql_int(since),
                collection,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u8>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            },
        )?;
        rows.map(|row| {
            let (seq, id, collection, kind, heads, origin, at) = row?;
            Ok(ChangeEvent {
                seq: seq as u64,
                id: doc_id(&id)?,
                collection,
                kind: ChangeKind::from_u8(kind).ok_or_else(|| {
                    StoreError::Corrupt(format!("change {seq} has unknown kind {kind}"))
                })?,
                heads: decode_heads(&heads)?,
                origin: origin.parse().map_err(|_| {
                    StoreError::Corrupt(format!("change {seq} has unknown origin {origin:?}"))
                })?,
                at,
            })
        })
        .collect()
    }

    /// Bundle entries for an export: documents as their stored chunks, deletions as tombstones.
    fn export(&self, scope: &BundleScope) -> Result<Vec<BundleEntry>, StoreError> {
        let (clause, arg) = match scope {
            BundleScope::All => ("1 = 1 OR ?1 IS NULL", SqlValue::Null),
            BundleScope::Collection(c) => ("collection = ?1", SqlValue::Text(c.clone())),
            BundleScope::Since(seq) => ("updated_seq > ?1", SqlValue::Integer(sql_int(*seq))),
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT doc_key, doc_id, collection, deleted, heads, snapshot, EXISTS (SELECT 1 FROM chunks c WHERE c.doc_key = d.doc_key)
             FROM documents d WHERE {clause} ORDER BY doc_key"
        ))?;
        let rows = stmt.query_map([arg], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
                r.get::<_, bool>(6)?,
            ))
        })?;
        let mut entries = Vec::new();
        for row in rows {
            let (key, id, collection, deleted, heads, snapshot, has_incrementals) = row?;
            let id = doc_id(&id)?;
            if deleted {
                entries.push(BundleEntry::Tombstone { id, collection });
                continue;
            }
            let mut bytes = snapshot.unwrap_or_default();
            if has_incrementals {
                for chunk in self.incrementals(key)? {
                    bytes.extend_from_slice(&chunk);
                }
            }
            entries.push(BundleEntry::Document {
                id,
                collection,
                heads: decode_heads(&heads)?,
                bytes,
            });
        }
        Ok(entries)
    }

    /// The reconciliation summary of the documents (live and deleted) in `collections` (all
    /// when `None`).
    fn catalog_summary(
        &self,
        collections: Option<&[String]>,
    ) -> Result<CatalogSummary, StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let key = collections.map(<[String]>::to_vec);
        {
            let mut cache = self.summaries.borrow_mut();
            if cache.version != version {
                cache.by_scope.clear();
                cache.version = version;
            }
            if let Some(summary) = cache.by_scope.get(&key) {
                return Ok(summary.clone());
            }
        }
        let mut summary = CatalogSummary::empty();
        self.scan_catalog(collections, |id, _, digest, _| summary.add(&id, digest))?;
        self.summaries
            .borrow_mut()
            .by_scope
            .insert(key, summary.clone());
        Ok(summary)
    }

    /// The catalog entries of the given reconciliation buckets.
    fn catalog_entries(
        &self,
        collections: Option<&[String]>,
        buckets: &[u8],
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        let mut wanted = [false; 256];
        for b in buckets {
            wanted[usize::from(*b)] = true;
        }
        let mut entries = Vec::new();
        self.scan_catalog(collections, |id, collection, digest, deleted| {
            if wanted[usize::from(bucket_of(&id))] {
                entries.push(CatalogEntry {
                    id,
                    collection: collection.to_owned(),
                    digest,
                    deleted,
                });
            }
        })?;
        Ok(entries)
    }

    /// Documents that have incremental chunks waiting to be folded into their snapshot.
    fn uncompacted(&self) -> Result<Vec<DocumentId>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT doc_id FROM documents WHERE doc_key IN (SELECT DISTINCT doc_key FROM chunks) AND deleted = 0")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|r| doc_id(&r?)).collect()
    }

    /// Log-compacts the change feed: keeps only the newest entry of each document. A consumer
    /// resuming from any sequence number still learns of every document changed since (with its
    /// latest version); only superseded intermediate entries disappear. Returns entries removed.
    fn compact_feed(&mut self) -> Result<usize, StoreError> {
        self.refuse_write()?;
        Ok(self.conn.execute(
            "DELETE FROM changes WHERE seq NOT IN (SELECT max(seq) FROM changes GROUP BY doc_key)",
            [],
        )?)
    }

    /// Rebuilds the file without free pages (`VACUUM`). Needs no open transaction.
    fn vacuum(&mut self) -> Result<(), StoreError> {
        self.refuse_write()?;
        self.conn.execute_batch("VACUUM")?;
        Ok(())
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` when SQLite reports "ok".
    fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("integrity_check: {result}")))
        }
    }

    /// Counts of live documents, tombstones and change-feed entries.
    fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        Ok(self.conn.query_row(
            "SELECT (SELECT count(*) FROM documents WHERE deleted = 0), (SELECT count(*) FROM documents WHERE deleted = 1), (SELECT count(*) FROM changes)",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
        )?)
    }

    /// Writes the WAL back into the main file and truncates it (used before measuring file size
    /// and on clean shutdown).
    fn checkpoint(&self) -> Result<(), StoreError> {
        if self.mode != StoreMode::ReadWrite {
            // Nothing of ours to fold back, and no right to.
            return Ok(());
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// How the file is open.
    fn mode(&self) -> StoreMode {
        self.mode
    }

    fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        let version: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        Ok(version != self.data_version)
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        // Room for a quarter MiB: the write grows the file (so a quota or a full disk shows),
        // and is taken back in the same transaction.
        self.refuse_write()?;
        self.begin()?;
        let written = self
            .conn
            .execute_batch(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(262144));
                 DELETE FROM meta WHERE key = 'probe';",
            )
            .map_err(StoreError::from)
            .and_then(|()| self.commit());
        if written.is_err() {
            self.rollback();
        }
        written
    }
}

/// One step's writes, applied in the open transaction: the statements for each kind of
/// [`StorageOp`], and the `doc_key` of each document written (a document's catalog row is
/// always written before its chunks and feed entries).
struct WriteBatch<'a> {
    conn: &'a Connection,
    summaries: &'a std::cell::RefCell<SummaryCache>,
    keys: std::collections::HashMap<DocumentId, i64>,
}

impl WriteBatch<'_> {
    /// The `doc_key` of a document written in this batch or stored before.
    fn key_of(&mut self, id: &DocumentId) -> Result<i64, StoreError> {
        if let Some(key) = self.keys.get(id) {
            return Ok(*key);
        }
        let key = self
            .conn
            .prepare_cached("SELECT doc_key FROM documents WHERE doc_id = ?1")?
            .query_row([id.as_bytes().as_slice()], |r| r.get(0))
            .optional()?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("write for {id}, which has no catalog row"))
            })?;
        self.keys.insert(*id, key);
        Ok(key)
    }

    /// Inserts or replaces the catalog row and body; the cached summaries follow.
    fn put_document(
        &mut self,
        id: &DocumentId,
        collection: &str,
        deleted: bool,
        heads: &[automerge::ChangeHash],
        body: Option<&str>,
        seq: u64,
    ) -> Result<(), StoreError> {
        // The version this write replaces, for the cached summaries.
        let old = if self.summaries.borrow().covers(collection) {
            self.conn
                .prepare_cached("SELECT deleted, heads FROM documents WHERE doc_id = ?1")?
                .query_row([id.as_bytes().as_slice()], |r| {
                    Ok((r.get::<_, bool>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .optional()?
                .map(|(deleted, heads)| {
                    decode_heads(&heads).map(|heads| doc_digest(id, &heads, deleted))
                })
                .transpose()?
        } else {
            None
        };
        let key: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO documents (doc_id, collection, deleted, heads, updated_seq, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (doc_id) DO UPDATE SET deleted = excluded.deleted, heads = excluded.heads,
                     updated_seq = excluded.updated_seq, body = excluded.body
                 RETURNING doc_key",
            )?
            .query_row(
                params![id.as_bytes().as_slice(), collection, deleted, encode_heads(heads), sql_int(seq), body],
                |r| r.get(0),
            )?;
        self.keys.insert(*id, key);
        self.summaries
            .borrow_mut()
            .update(collection, id, old, doc_digest(id, heads, deleted));
        Ok(())
    }

    /// A document new to storage: catalog row, body and snapshot in one row.
    fn insert_document(
        &mut self,
        id: &DocumentId,
        collection: &str,
        heads: &[automerge::ChangeHash],
        body: &str,
        snapshot: &[u8],
        seq: u64,
    ) -> Result<(), StoreError> {
        let key: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO documents (doc_id, collection, deleted, heads, updated_seq, body, snapshot)
                 VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6) RETURNING doc_key",
            )?
            .query_row(
                params![id.as_bytes().as_slice(), collection, encode_heads(heads), sql_int(seq), body, snapshot],
                |r| r.get(0),
            )?;
        self.keys.insert(*id, key);
        self.summaries
            .borrow_mut()
            .update(collection, id, None, doc_digest(id, heads, false));
        Ok(())
    }

    /// Compaction: one snapshot replaces every chunk.
    fn replace_chunks(&mut self, id: &DocumentId, snapshot: &[u8]) -> Result<(), StoreError> {
        let key = self.key_of(id)?;
        self.conn
            .prepare_cached("UPDATE documents SET snapshot = ?2 WHERE doc_key = ?1")?
            .execute(params![key, snapshot])?;
        self.conn
            .prepare_cached("DELETE FROM chunks WHERE doc_key = ?1")?
            .execute([key])?;
        Ok(())
    }

    fn append_chunk(&mut self, id: &DocumentId, bytes: &[u8]) -> Result<(), StoreError> {
        let key = self.key_of(id)?;
        self.conn
            .prepare_cached("INSERT INTO chunks (doc_key, bytes) VALUES (?1, ?2)")?
            .execute(params![key, bytes])?;
        Ok(())
    }

    /// A deleted document's content and sync states go; its catalog row stays as the
    /// tombstone.
    fn purge_chunks(&mut self, id: &DocumentId) -> Result<(), StoreError> {
        let key = self.key_of(id)?;
        for sql in [
            "UPDATE documents SET snapshot = NULL WHERE doc_key = ?1",
            "DELETE FROM chunks WHERE doc_key = ?1",
            "DELETE FROM sync_states WHERE doc_key = ?1",
        ] {
            self.conn.prepare_cached(sql)?.execute([key])?;
        }
        Ok(())
    }

    fn put_sync_state(
        &mut self,
        peer: &ReplicaId,
        id: &DocumentId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        // A document that is not stored (yet) has no state worth keeping.
        self.conn
            .prepare_cached(
                "INSERT INTO sync_states (peer, doc_key, state)
                 SELECT ?1, doc_key, ?3 FROM documents WHERE doc_id = ?2 AND deleted = 0
                 ON CONFLICT (peer, doc_key) DO UPDATE SET state = excluded.state",
            )?
            .execute(params![
                peer.as_bytes().as_slice(),
                id.as_bytes().as_slice(),
                state
            ])?;
        Ok(())
    }

    fn append_change(&mut self, event: &ChangeEvent) -> Result<(), StoreError> {
        let key = self.key_of(&event.id)?;
        self.conn
            .prepare_cached(
                "INSERT INTO changes (seq, doc_key, kind, heads, origin, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                sql_int(event.seq),
                key,
                event.kind.as_u8(),
                encode_heads(&event.heads),
                event.origin.to_string(),
                event.at
            ])?;
        Ok(())
    }
}
