//! The PostgreSQL store: a relay's replica in a database that several relay nodes share.
//!
//! The same model as the SQLite store (catalog, chunks, change feed, sync states, metadata), in
//! `weft_`-prefixed tables created by versioned migrations. Several processes may use one
//! database at once, as several may use one SQLite file:
//!
//! - **One writer at a time.** A step's transaction takes `pg_advisory_xact_lock` first, as
//!   SQLite's `BEGIN IMMEDIATE` does, so change-feed sequence numbers stay one strictly
//!   increasing series whichever node writes.
//! - **Seeing other nodes' commits.** Every committing transaction that wrote bumps
//!   `weft_clock.version` (SQLite's `data_version`): a step that finds a version it did not
//!   write tells the engine its caches are stale and reads the other writers' feed entries;
//!   `changed_elsewhere` compares without a transaction. The commit also sends
//!   `NOTIFY weft_changes` with the ids it wrote (never document bytes), which the relay's
//!   listener turns into an immediate poll (`net::pg_listen`); a missed notification only
//!   delays that to the next poll, the feed is the truth.
//! - **Acknowledged means committed.** The driver sends acknowledgements after `commit`
//!   returned, which is after PostgreSQL's `COMMIT` returned.
//!
//! A lost connection fails the operation with [`StoreError::Postgres`]; the next step (or
//! `probe`) connects again, and treats everything cached as stale.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row};

use super::{DocRecord, Store, StoreError, SummaryCache, USER_META, decode_heads, encode_heads};
use crate::bundle::{BundleEntry, BundleScope};
use crate::engine::{ChangeEvent, ChangeKind, ChunkKind, StorageOp, StoredChunk, StoredDoc};
use crate::id::{DocumentId, ReplicaId};
use crate::protocol::{CatalogEntry, CatalogSummary, Digest, bucket_of, doc_digest};
use crate::query::Query;

/// The advisory lock every writing transaction takes ("weft").
const WRITE_LOCK: i64 = 0x7765_6674;
/// The channel of change notifications.
pub const CHANNEL: &str = "weft_changes";
/// NOTIFY payloads must stay under 8,000 bytes: at most this many ids (29 bytes each as text).
const NOTIFY_IDS: usize = 200;

/// Schema migrations; `weft_schema.version` is the number applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    // 1: the SQLite store's schema 2, plus the clock other writers are noticed by.
    "CREATE TABLE weft_meta (
        key   TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE weft_documents (
        doc_key     BIGSERIAL PRIMARY KEY,
        doc_id      BYTEA NOT NULL UNIQUE,
        collection  TEXT NOT NULL,
        deleted     BOOLEAN NOT NULL DEFAULT FALSE,
        heads       BYTEA NOT NULL,
        updated_seq BIGINT NOT NULL,
        body        TEXT,
        snapshot    BYTEA
    );
    CREATE INDEX weft_documents_by_collection ON weft_documents (collection);
    CREATE TABLE weft_chunks (
        chunk_id BIGSERIAL PRIMARY KEY,
        doc_key  BIGINT NOT NULL,
        bytes    BYTEA NOT NULL
    );
    CREATE INDEX weft_chunks_by_doc ON weft_chunks (doc_key, chunk_id);
    CREATE TABLE weft_changes (
        seq     BIGINT PRIMARY KEY,
        doc_key BIGINT NOT NULL,
        kind    SMALLINT NOT NULL,
        heads   BYTEA NOT NULL,
        origin  TEXT NOT NULL,
        at      BIGINT NOT NULL
    );
    CREATE TABLE weft_sync_states (
        peer    BYTEA NOT NULL,
        doc_key BIGINT NOT NULL,
        state   BYTEA NOT NULL,
        PRIMARY KEY (peer, doc_key)
    );
    CREATE INDEX weft_sync_states_by_doc ON weft_sync_states (doc_key);
    CREATE TABLE weft_clock (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version BIGINT NOT NULL
    );
    INSERT INTO weft_clock (id, version) VALUES (1, 0);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const RECORD_COLUMNS: &str = "doc_id, collection, deleted, heads, body, updated_seq";

/// Counters of the store's connection, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgCounters {
    /// Connections opened (the first, and each after a lost one).
    pub connects: u64,
    /// Operations that failed because the connection was lost or could not be made.
    pub connection_errors: u64,
    /// Committed transactions that wrote.
    pub commits: u64,
    /// Steps that found another node's commits.
    pub changed_elsewhere: u64,
}

/// A connection and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<String, postgres::Statement>,
}

impl Conn {
    fn new(client: Client) -> Self {
        Conn {
            client,
            statements: HashMap::new(),
        }
    }

    fn stmt(&mut self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(stmt) = self.statements.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    fn query(
        &mut self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let stmt = self.stmt(sql)?;
        self.client.query(&stmt, args)
    }

    fn query_one(
        &mut self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let stmt = self.stmt(sql)?;
        self.client.query_one(&stmt, args)
    }

    fn query_opt(
        &mut self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let stmt = self.stmt(sql)?;
        self.client.query_opt(&stmt, args)
    }

    fn execute(&mut self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let stmt = self.stmt(sql)?;
        self.client.execute(&stmt, args)
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.client.batch_execute(sql)
    }
}

/// A replica stored in PostgreSQL.
pub struct PgStore {
    config: Config,
    /// `user@host:port/db`, for messages (never the password).
    shown: String,
    conn: RefCell<Option<Conn>>,
    replica_id: ReplicaId,
    /// `weft_clock.version` after our last transaction (-1: unknown, after a reconnect).
    version: i64,
    in_tx: bool,
    /// Documents written in the open transaction (for the notification).
    written: Vec<DocumentId>,
    wrote: bool,
    summaries: RefCell<SummaryCache>,
    counters: RefCell<PgCounters>,
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres {
            code: e.code().map(|c| c.code().to_owned()),
            connection: e.is_closed() || e.code().is_none(),
            message: e.to_string(),
        }
    }
}

/// `user@host:port/db` of a connection string, without its password.
pub fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Parses a `postgres://` connection string.
pub fn parse_url(url: &str) -> Result<Config, StoreError> {
    let mut config: Config = url.parse().map_err(|e: postgres::Error| StoreError::Open {
        path: "postgres".into(),
        reason: format!("not a PostgreSQL connection string: {e}"),
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true);
    config.application_name("weft");
    Ok(config)
}

impl PgStore {
    /// Connects, brings the schema up to date (under the write lock, so nodes starting together
    /// migrate once) and reads the replica id (created by the first node).
    pub fn open(config: Config) -> Result<Self, StoreError> {
        let shown = describe(&config);
        let client = config.connect(NoTls).map_err(|e| StoreError::Open {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let mut store = PgStore {
            config,
            shown,
            conn: RefCell::new(Some(Conn::new(client))),
            replica_id: ReplicaId::from_bytes([0; 16]),
            version: -1,
            in_tx: false,
            written: Vec::new(),
            wrote: false,
            summaries: RefCell::default(),
            counters: RefCell::new(PgCounters {
                connects: 1,
                ..PgCounters::default()
            }),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Where the store is, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The connection's counters.
    pub fn counters(&self) -> PgCounters {
        *self.counters.borrow()
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let fresh = ReplicaId::random().map_err(|e| StoreError::Open {
            path: self.shown.clone(),
            reason: e.to_string(),
        })?;
        let shown = self.shown.clone();
        let replica_id = self.with_client(|c| {
            c.batch_execute("BEGIN")?;
            c.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            c.batch_execute("CREATE TABLE IF NOT EXISTS weft_schema (version BIGINT NOT NULL);")?;
            let version: i64 = match c.query_opt("SELECT version FROM weft_schema", &[])? {
                Some(row) => row.get(0),
                None => {
                    c.execute("INSERT INTO weft_schema (version) VALUES (0)", &[])?;
                    0
                }
            };
            if version > SCHEMA_VERSION {
                c.batch_execute("ROLLBACK")?;
                return Ok(Err(StoreError::SchemaTooNew {
                    found: version,
                    supported: SCHEMA_VERSION,
                }));
            }
            for (i, sql) in MIGRATIONS
                .iter()
                .enumerate()
                .skip(usize::try_from(version).unwrap_or(0))
            {
                tracing::info!(store = %shown, to = i + 1, "migrating schema");
                c.batch_execute(sql)?;
                c.execute("UPDATE weft_schema SET version = $1", &[&(i as i64 + 1)])?;
            }
            c.execute(
                "INSERT INTO weft_meta (key, value) VALUES ('replica_id', $1) ON CONFLICT (key) DO NOTHING",
                &[&fresh.as_bytes().as_slice()],
            )?;
            let bytes: Vec<u8> = c
                .query_one("SELECT value FROM weft_meta WHERE key = 'replica_id'", &[])?
                .get(0);
            c.batch_execute("COMMIT")?;
            Ok(ReplicaId::try_from_slice(&bytes)
                .ok_or_else(|| StoreError::Corrupt("replica id is not 16 bytes".into())))
        })??;
        self.replica_id = replica_id;
        Ok(())
    }

    /// Runs `f` on the connection, connecting first if there is none; a lost connection is
    /// dropped (the next call connects again) and counted.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = None;
            match self.config.connect(NoTls) {
                Ok(client) => {
                    self.counters.borrow_mut().connects += 1;
                    tracing::info!(store = %self.shown, "connected to PostgreSQL again");
                    *slot = Some(Conn::new(client));
                }
                Err(e) => {
                    self.counters.borrow_mut().connection_errors += 1;
                    return Err(e.into());
                }
            }
        }
        let Some(conn) = slot.as_mut() else {
            return Err(StoreError::Corrupt("no connection".into()));
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_closed() || conn.client.is_closed() {
                    *slot = None;
                    self.counters.borrow_mut().connection_errors += 1;
                }
                Err(e.into())
            }
        }
    }

    fn lost_connection(&mut self) {
        // Whatever we knew of the other writers' progress is void.
        self.version = -1;
        self.summaries.borrow_mut().abandon();
        self.summaries.borrow_mut().by_scope.clear();
    }

    fn query(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        self.with_client(|c| c.query(sql, args))
    }

    fn query_opt(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.with_client(|c| c.query_opt(sql, args))
    }

    fn execute(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.with_client(|c| c.execute(sql, args))
    }

    fn load_batch(&self, ids: &[DocumentId]) -> Result<Vec<Option<StoredDoc>>, StoreError> {
        let wanted: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes().as_slice()).collect();
        let rows = self.query(
            "SELECT doc_key, doc_id, collection, deleted, heads, snapshot FROM weft_documents
             WHERE doc_id = ANY($1)",
            &[&wanted],
        )?;
        let mut docs: HashMap<DocumentId, (i64, StoredDoc)> = HashMap::with_capacity(rows.len());
        let mut live_keys = Vec::new();
        for row in &rows {
            let key: i64 = row.get(0);
            let id = doc_id(row.get::<_, &[u8]>(1))?;
            let deleted: bool = row.get(3);
            let mut chunks = Vec::new();
            if !deleted {
                live_keys.push(key);
                if let Some(bytes) = row.get::<_, Option<Vec<u8>>>(5) {
                    chunks.push(StoredChunk {
                        kind: ChunkKind::Snapshot,
                        bytes,
                    });
                }
            }
            let doc = StoredDoc {
                collection: row.get(2),
                deleted,
                heads: decode_heads(row.get::<_, &[u8]>(4))?,
                chunks,
                cursor: (!deleted).then_some(0),
            };
            docs.insert(id, (key, doc));
        }
        if !live_keys.is_empty() {
            let mut by_key: HashMap<i64, Vec<(i64, Vec<u8>)>> = HashMap::new();
            for row in self.query(
                "SELECT doc_key, chunk_id, bytes FROM weft_chunks WHERE doc_key = ANY($1) ORDER BY doc_key, chunk_id",
                &[&live_keys],
            )? {
                by_key
                    .entry(row.get(0))
                    .or_default()
                    .push((row.get(1), row.get(2)));
            }
            for (key, doc) in docs.values_mut() {
                for (chunk_id, bytes) in by_key.remove(key).unwrap_or_default() {
                    doc.cursor = doc.cursor.map(|c| c.max(chunk_id));
                    doc.chunks.push(StoredChunk {
                        kind: ChunkKind::Incremental,
                        bytes,
                    });
                }
            }
        }
        Ok(ids
            .iter()
            .map(|id| docs.get(id).map(|(_, doc)| doc.clone()))
            .collect())
    }

    fn incrementals(&self, key: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .query(
                "SELECT bytes FROM weft_chunks WHERE doc_key = $1 ORDER BY chunk_id",
                &[&key],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn scan_catalog(
        &self,
        collections: Option<&[String]>,
        mut f: impl FnMut(DocumentId, &str, Digest, bool),
    ) -> Result<(), StoreError> {
        let names: Option<Vec<String>> = collections.map(<[String]>::to_vec);
        let rows = self.query(
            "SELECT doc_id, collection, deleted, heads FROM weft_documents
             WHERE $1::text[] IS NULL OR collection = ANY($1)",
            &[&names],
        )?;
        for row in rows {
            let id = doc_id(row.get::<_, &[u8]>(0))?;
            let collection: &str = row.get(1);
            let deleted: bool = row.get(2);
            let heads = decode_heads(row.get::<_, &[u8]>(3))?;
            f(id, collection, doc_digest(&id, &heads, deleted), deleted);
        }
        Ok(())
    }

    fn version_now(&self) -> Result<i64, StoreError> {
        Ok(self
            .query("SELECT version FROM weft_clock WHERE id = 1", &[])?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0))
    }

    fn key_of(
        &self,
        keys: &mut HashMap<DocumentId, i64>,
        id: &DocumentId,
    ) -> Result<i64, StoreError> {
        if let Some(key) = keys.get(id) {
            return Ok(*key);
        }
        let key = self
            .query_opt(
                "SELECT doc_key FROM weft_documents WHERE doc_id = $1",
                &[&id.as_bytes().as_slice()],
            )?
            .map(|r| r.get::<_, i64>(0))
            .ok_or_else(|| {
                StoreError::Corrupt(format!("write for {id}, which has no catalog row"))
            })?;
        keys.insert(*id, key);
        Ok(key)
    }

    fn write_op(
        &mut self,
        keys: &mut HashMap<DocumentId, i64>,
        op: &StorageOp,
    ) -> Result<(), StoreError> {
        match op {
            StorageOp::PutDocument {
                id,
                collection,
                deleted,
                heads,
                body,
                seq,
            } => {
                let old = if self.summaries.borrow().covers(collection) {
                    self.query_opt(
                        "SELECT deleted, heads FROM weft_documents WHERE doc_id = $1",
                        &[&id.as_bytes().as_slice()],
                    )?
                    .map(|r| {
                        decode_heads(r.get::<_, &[u8]>(1))
                            .map(|heads| doc_digest(id, &heads, r.get(0)))
                    })
                    .transpose()?
                } else {
                    None
                };
                let key: i64 = self
                    .query(
                        "INSERT INTO weft_documents (doc_id, collection, deleted, heads, updated_seq, body)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (doc_id) DO UPDATE SET deleted = EXCLUDED.deleted, heads = EXCLUDED.heads,
                             updated_seq = EXCLUDED.updated_seq, body = EXCLUDED.body
                         RETURNING doc_key",
                        &[&id.as_bytes().as_slice(), collection, deleted, &encode_heads(heads), &pg_int(*seq), body],
                    )?
                    .first()
                    .map(|r| r.get(0))
                    .ok_or_else(|| StoreError::Corrupt("no doc_key returned".into()))?;
                keys.insert(*id, key);
                self.summaries.borrow_mut().update(
                    collection,
                    id,
                    old,
                    doc_digest(id, heads, *deleted),
                );
                self.written.push(*id);
            }
            StorageOp::InsertDocument {
                id,
                collection,
                heads,
                body,
                snapshot,
                seq,
            } => {
                let key: i64 = self
                    .query(
                        "INSERT INTO weft_documents (doc_id, collection, deleted, heads, updated_seq, body, snapshot)
                         VALUES ($1, $2, FALSE, $3, $4, $5, $6) RETURNING doc_key",
                        &[&id.as_bytes().as_slice(), collection, &encode_heads(heads), &pg_int(*seq), body, snapshot],
                    )?
                    .first()
                    .map(|r| r.get(0))
                    .ok_or_else(|| StoreError::Corrupt("no doc_key returned".into()))?;
                keys.insert(*id, key);
                self.summaries.borrow_mut().update(
                    collection,
                    id,
                    None,
                    doc_digest(id, heads, false),
                );
                self.written.push(*id);
            }
            StorageOp::ReplaceChunks { id, snapshot } => {
                let key = self.key_of(keys, id)?;
                self.execute(
                    "UPDATE weft_documents SET snapshot = $2 WHERE doc_key = $1",
                    &[&key, snapshot],
                )?;
                self.execute("DELETE FROM weft_chunks WHERE doc_key = $1", &[&key])?;
            }
            StorageOp::AppendChunk { id, bytes } => {
                let key = self.key_of(keys, id)?;
                self.execute(
                    "INSERT INTO weft_chunks (doc_key, bytes) VALUES ($1, $2)",
                    &[&key, bytes],
                )?;
            }
            StorageOp::PurgeChunks { id } => {
                let key = self.key_of(keys, id)?;
                for sql in [
                    "UPDATE weft_documents SET snapshot = NULL WHERE doc_key = $1",
                    "DELETE FROM weft_chunks WHERE doc_key = $1",
                    "DELETE FROM weft_sync_states WHERE doc_key = $1",
                ] {
                    self.execute(sql, &[&key])?;
                }
            }
            StorageOp::PutSyncState { peer, id, state } => {
                self.execute(
                    "INSERT INTO weft_sync_states (peer, doc_key, state)
                     SELECT $1, doc_key, $3 FROM weft_documents WHERE doc_id = $2 AND NOT deleted
                     ON CONFLICT (peer, doc_key) DO UPDATE SET state = EXCLUDED.state",
                    &[
                        &peer.as_bytes().as_slice(),
                        &id.as_bytes().as_slice(),
                        state,
                    ],
                )?;
            }
            StorageOp::AppendChange(event) => {
                let key = self.key_of(keys, &event.id)?;
                self.execute(
                    "INSERT INTO weft_changes (seq, doc_key, kind, heads, origin, at) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &pg_int(event.seq),
                        &key,
                        &i16::from(event.kind.as_u8()),
                        &encode_heads(&event.heads),
                        &event.origin.to_string(),
                        &event.at,
                    ],
                )?;
            }
            StorageOp::PutMeta { key, value } => {
                self.execute(
                    "INSERT INTO weft_meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&format!("{USER_META}{key}"), value],
                )?;
            }
        }
        Ok(())
    }

    /// The notification payload: the ids written (as many as fit), never document bytes.
    fn payload(&self) -> String {
        let ids: Vec<String> = self
            .written
            .iter()
            .take(NOTIFY_IDS)
            .map(ToString::to_string)
            .collect();
        serde_json::json!({
            "ids": ids,
            "more": self.written.len() > NOTIFY_IDS,
        })
        .to_string()
    }
}

impl Drop for PgStore {
    /// The synchronous client closes its connection by blocking on a runtime of its own,
    /// which panics inside another runtime (a replica's last handle may go away in async
    /// code): close it on a thread of its own.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().take() {
            let _ = std::thread::Builder::new()
                .name("weft-pg-close".into())
                .spawn(move || drop(conn));
        }
    }
}

fn pg_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn doc_id(bytes: &[u8]) -> Result<DocumentId, StoreError> {
    DocumentId::try_from_slice(bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("document id of {} bytes", bytes.len())))
}

fn record(row: &Row) -> Result<DocRecord, StoreError> {
    Ok(DocRecord {
        id: doc_id(row.get::<_, &[u8]>(0))?,
        collection: row.get(1),
        deleted: row.get(2),
        heads: decode_heads(row.get::<_, &[u8]>(3))?,
        body: row.get(4),
        updated_seq: row.get::<_, i64>(5).max(0) as u64,
    })
}

impl Store for PgStore {
    fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        let max: i64 = self
            .query(
                "SELECT coalesce(max(seq), 0)::BIGINT FROM weft_changes",
                &[],
            )?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        Ok(max.max(0) as u64)
    }

    fn begin(&mut self) -> Result<bool, StoreError> {
        self.rollback();
        let began = self.with_client(|c| {
            c.batch_execute("BEGIN")?;
            c.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            Ok(
                c.query_one("SELECT version FROM weft_clock WHERE id = 1", &[])?
                    .get::<_, i64>(0),
            )
        });
        let version = match began {
            Ok(v) => v,
            Err(e) => {
                self.lost_connection();
                // A transaction may have begun before the failure.
                self.in_tx = true;
                self.rollback();
                return Err(e);
            }
        };
        self.in_tx = true;
        self.wrote = false;
        self.written.clear();
        let changed = version != self.version;
        if changed {
            self.counters.borrow_mut().changed_elsewhere += 1;
            self.summaries.borrow_mut().by_scope.clear();
        }
        self.version = version;
        Ok(changed)
    }

    fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        Ok(self.version_now()? != self.version)
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if !self.in_tx {
            return Ok(());
        }
        let wrote = self.wrote;
        let payload = self.payload();
        let committed = self.with_client(|c| {
            let version = if wrote {
                let v: i64 = c
                    .query_one(
                        "UPDATE weft_clock SET version = version + 1 WHERE id = 1 RETURNING version",
                        &[],
                    )?
                    .get(0);
                c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
                Some(v)
            } else {
                None
            };
            c.batch_execute("COMMIT")?;
            Ok(version)
        });
        self.in_tx = false;
        self.written.clear();
        match committed {
            Ok(version) => {
                if let Some(v) = version {
                    self.version = v;
                    self.counters.borrow_mut().commits += 1;
                }
                self.summaries.borrow_mut().uncommitted = false;
                Ok(())
            }
            Err(e) => {
                // Whether PostgreSQL applied the COMMIT is unknown when the connection broke
                // during it: treat every cache as stale either way.
                let _ = self.with_client(|c| c.batch_execute("ROLLBACK"));
                self.lost_connection();
                Err(e)
            }
        }
    }

    fn rollback(&mut self) {
        self.summaries.borrow_mut().abandon();
        if self.in_tx {
            self.in_tx = false;
            self.written.clear();
            let open = self
                .conn
                .borrow()
                .as_ref()
                .is_some_and(|c| !c.client.is_closed());
            if open && let Err(e) = self.with_client(|c| c.batch_execute("ROLLBACK")) {
                tracing::warn!(error = %e, "rollback failed");
            }
        }
    }

    fn write(&mut self, ops: &[StorageOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.wrote = true;
        let mut keys = HashMap::new();
        for op in ops {
            self.write_op(&mut keys, op)?;
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .query_opt(
                "SELECT value FROM weft_meta WHERE key = $1",
                &[&format!("{USER_META}{key}")],
            )?
            .map(|r| r.get(0)))
    }

    fn load(&self, id: &DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        Ok(self.load_batch(std::slice::from_ref(id))?.pop().flatten())
    }

    /// The chunks appended after `cursor`, with the stored heads (one query).
    fn chunks_after(
        &self,
        id: &DocumentId,
        cursor: i64,
    ) -> Result<Option<crate::engine::NewChunks>, StoreError> {
        let rows = self.query(
            "SELECT d.deleted, d.heads, c.chunk_id, c.bytes FROM weft_documents d
             LEFT JOIN weft_chunks c ON c.doc_key = d.doc_key AND c.chunk_id > $2
             WHERE d.doc_id = $1 ORDER BY c.chunk_id",
            &[&id.as_bytes().as_slice(), &cursor],
        )?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut new = crate::engine::NewChunks {
            chunks: Vec::new(),
            cursor,
            heads: decode_heads(first.get::<_, &[u8]>(1))?,
            deleted: first.get(0),
        };
        for row in &rows {
            if let Some(chunk_id) = row.get::<_, Option<i64>>(2) {
                new.cursor = new.cursor.max(chunk_id);
                new.chunks.push(row.get(3));
            }
        }
        Ok(Some(new))
    }

    /// Two queries for up to a thousand documents: their catalog rows, then their chunks.
    fn load_many(&self, ids: &[DocumentId]) -> Vec<Result<Option<StoredDoc>, StoreError>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(1000) {
            match self.load_batch(batch) {
                Ok(docs) => out.extend(docs.into_iter().map(Ok)),
                Err(e) => out.extend(batch.iter().map(|_| Err(e.clone()))),
            }
        }
        out
    }

    fn load_sync_state(
        &self,
        peer: &ReplicaId,
        id: &DocumentId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .query_opt(
                "SELECT s.state FROM weft_sync_states s JOIN weft_documents d ON d.doc_key = s.doc_key
                 WHERE s.peer = $1 AND d.doc_id = $2",
                &[&peer.as_bytes().as_slice(), &id.as_bytes().as_slice()],
            )?
            .map(|r| r.get(0)))
    }

    fn get(&self, id: &DocumentId) -> Result<Option<DocRecord>, StoreError> {
        self.query_opt(
            &format!("SELECT {RECORD_COLUMNS} FROM weft_documents WHERE doc_id = $1"),
            &[&id.as_bytes().as_slice()],
        )?
        .as_ref()
        .map(record)
        .transpose()
    }

    /// Live documents matching a query, in creation order. The filter runs here, over the
    /// parsed bodies (`Filter::matches`, the same semantics as the SQLite store's SQL): a
    /// relay's store is queried rarely (`doc list` on it, tests).
    fn query(&self, query: &Query) -> Result<Vec<DocRecord>, StoreError> {
        let rows = self.query(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM weft_documents
                 WHERE NOT deleted AND ($1::text IS NULL OR collection = $1) ORDER BY doc_key"
            ),
            &[&query.collection],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            if query.limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let record = record(row)?;
            if let Some(filter) = &query.filter {
                let body: serde_json::Value = record
                    .body
                    .as_deref()
                    .and_then(|b| serde_json::from_str(b).ok())
                    .unwrap_or(serde_json::Value::Null);
                if !filter.matches(&body) {
                    continue;
                }
            }
            out.push(record);
        }
        Ok(out)
    }

    fn changes_since(
        &self,
        since: u64,
        limit: usize,
        collection: Option<&str>,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let rows = self.query(
            "SELECT c.seq, d.doc_id, d.collection, c.kind, c.heads, c.origin, c.at
             FROM weft_changes c JOIN weft_documents d ON d.doc_key = c.doc_key
             WHERE c.seq > $1 AND ($2::text IS NULL OR d.collection = $2) ORDER BY c.seq LIMIT $3",
            &[
                &pg_int(since),
                &collection,
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                let kind: i16 = r.get(3);
                let origin: String = r.get(5);
                Ok(ChangeEvent {
                    seq: seq.max(0) as u64,
                    id: doc_id(r.get::<_, &[u8]>(1))?,
                    collection: r.get(2),
                    kind: u8::try_from(kind)
                        .ok()
                        .and_then(ChangeKind::from_u8)
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("change {seq} has unknown kind {kind}"))
                        })?,
                    heads: decode_heads(r.get::<_, &[u8]>(4))?,
                    origin: origin.parse().map_err(|_| {
                        StoreError::Corrupt(format!("change {seq} has unknown origin {origin:?}"))
                    })?,
                    at: r.get(6),
                })
            })
            .collect()
    }

    fn export(&self, scope: &BundleScope) -> Result<Vec<BundleEntry>, StoreError> {
        let (collection, since): (Option<String>, i64) = match scope {
            BundleScope::All => (None, -1),
            BundleScope::Collection(c) => (Some(c.clone()), -1),
            BundleScope::Since(seq) => (None, pg_int(*seq)),
        };
        let rows = self.query(
            "SELECT doc_key, doc_id, collection, deleted, heads, snapshot
             FROM weft_documents WHERE ($1::text IS NULL OR collection = $1) AND updated_seq > $2
             ORDER BY doc_key",
            &[&collection, &since],
        )?;
        let mut entries = Vec::new();
        for row in rows {
            let id = doc_id(row.get::<_, &[u8]>(1))?;
            let collection: String = row.get(2);
            if row.get::<_, bool>(3) {
                entries.push(BundleEntry::Tombstone { id, collection });
                continue;
            }
            let mut bytes: Vec<u8> = row.get::<_, Option<Vec<u8>>>(5).unwrap_or_default();
            for chunk in self.incrementals(row.get(0))? {
                bytes.extend_from_slice(&chunk);
            }
            entries.push(BundleEntry::Document {
                id,
                collection,
                heads: decode_heads(row.get::<_, &[u8]>(4))?,
                bytes,
            });
        }
        Ok(entries)
    }

    fn catalog_summary(
        &self,
        collections: Option<&[String]>,
    ) -> Result<CatalogSummary, StoreError> {
        let key = collections.map(<[String]>::to_vec);
        // Outside a step, another node may have written since: look at the clock.
        if !self.in_tx {
            let version = self.version_now()?;
            let mut cache = self.summaries.borrow_mut();
            if cache.version != version || version != self.version {
                cache.by_scope.clear();
                cache.version = version;
            }
        }
        if let Some(summary) = self.summaries.borrow().by_scope.get(&key) {
            return Ok(summary.clone());
        }
        let mut summary = CatalogSummary::empty();
        self.scan_catalog(collections, |id, _, digest, _| summary.add(&id, digest))?;
        self.summaries
            .borrow_mut()
            .by_scope
            .insert(key, summary.clone());
        Ok(summary)
    }

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

    fn uncompacted(&self) -> Result<Vec<DocumentId>, StoreError> {
        self.query(
            "SELECT doc_id FROM weft_documents
             WHERE doc_key IN (SELECT DISTINCT doc_key FROM weft_chunks) AND NOT deleted",
            &[],
        )?
        .iter()
        .map(|r| doc_id(r.get::<_, &[u8]>(0)))
        .collect()
    }

    fn compact_feed(&mut self) -> Result<usize, StoreError> {
        let removed = self.execute(
            "DELETE FROM weft_changes WHERE seq NOT IN (SELECT max(seq) FROM weft_changes GROUP BY doc_key)",
            &[],
        )?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }

    /// PostgreSQL reclaims space with autovacuum; an explicit VACUUM of weft's tables.
    fn vacuum(&mut self) -> Result<(), StoreError> {
        self.with_client(|c| {
            c.batch_execute(
                "VACUUM weft_documents, weft_chunks, weft_changes, weft_sync_states, weft_meta",
            )
        })
    }

    /// PostgreSQL checks its own pages; this checks weft's invariants that SQL can: every
    /// chunk and feed entry belongs to a catalog row.
    fn integrity_check(&self) -> Result<(), StoreError> {
        let orphans: i64 = self
            .query(
                "SELECT (SELECT count(*) FROM weft_chunks c WHERE NOT EXISTS (SELECT 1 FROM weft_documents d WHERE d.doc_key = c.doc_key))
                      + (SELECT count(*) FROM weft_changes c WHERE NOT EXISTS (SELECT 1 FROM weft_documents d WHERE d.doc_key = c.doc_key))",
                &[],
            )?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        if orphans == 0 {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!(
                "{orphans} chunks or feed entries without a document"
            )))
        }
    }

    fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let row = self.query(
            "SELECT (SELECT count(*) FROM weft_documents WHERE NOT deleted),
                    (SELECT count(*) FROM weft_documents WHERE deleted),
                    (SELECT count(*) FROM weft_changes)",
            &[],
        )?;
        let row = row
            .first()
            .ok_or_else(|| StoreError::Corrupt("no counts".into()))?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        Ok((n(0), n(1), n(2)))
    }

    /// Nothing to fold back: a commit is durable in PostgreSQL when it returns.
    fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let c = self.counters();
        vec![
            (
                "weft_pg_connects_total",
                "Connections the store opened to PostgreSQL (the first and each after a lost one).",
                c.connects,
            ),
            (
                "weft_pg_connection_errors_total",
                "Store operations that failed on a lost or refused PostgreSQL connection.",
                c.connection_errors,
            ),
            (
                "weft_pg_commits_total",
                "Transactions that wrote, committed in PostgreSQL.",
                c.commits,
            ),
            (
                "weft_pg_changed_elsewhere_total",
                "Steps that found commits of other relay nodes.",
                c.changed_elsewhere,
            ),
        ]
    }

    /// Connects if needed and commits a small write, to learn that PostgreSQL works again.
    fn probe(&mut self) -> Result<(), StoreError> {
        self.rollback();
        self.with_client(|c| {
            c.batch_execute(
                "BEGIN;
                 INSERT INTO weft_meta (key, value) VALUES ('probe', '\\x00')
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
                 DELETE FROM weft_meta WHERE key = 'probe';
                 COMMIT;",
            )
        })
    }
}
