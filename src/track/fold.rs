//! Folding captured row changes into the replica, exactly once.
//!
//! A batch of `_weft_capture` rows becomes engine commands (create or edit a row's document,
//! delete it) plus one `PutMeta` recording the last capture id folded, all in one replica
//! transaction. Only then are the folded rows removed from the app's file. A crash between the
//! two leaves rows the replica's cursor already covers: they are skipped and removed at the
//! next start, never folded twice.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::rows::{KeyDocs, key_docs, key_text, row_id};
use super::{AppFile, TrackError, TrackReport};
use crate::Replica;
use crate::engine::Command;

/// Folded rows are removed from the app's file once this many accumulated, or after
/// [`CLEANUP_EVERY`].
const CLEANUP_ROWS: usize = 5000;
const CLEANUP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Captured rows folded per replica transaction.
const BATCH: usize = 5000;

/// One `_weft_capture` row.
struct Captured {
    id: i64,
    table: String,
    op: String,
    key: String,
    row: Option<String>,
    changed: Option<String>,
}

/// The replica metadata key of an app file's fold cursor.
pub(crate) fn cursor_key(app: &AppFile) -> String {
    format!("track/{}/captured", app.path.display())
}

/// How far the replica has folded in the app file's captures.
pub(crate) fn folded_up_to(replica: &Replica, app: &AppFile) -> Result<i64, TrackError> {
    let bytes = replica.meta(&cursor_key(app))?;
    Ok(bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(i64::from_le_bytes)
        .unwrap_or(0))
}

/// Folds every captured change of the app file into the replica.
pub(crate) fn fold(
    replica: &Replica,
    app: &mut AppFile,
    report: &mut TrackReport,
) -> Result<(), TrackError> {
    let mut cursor = folded_up_to(replica, app)?;
    let leftovers: bool = app.conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM _weft_capture WHERE id <= ?1)",
        [cursor],
        |r| r.get(0),
    )?;
    if leftovers {
        // Folded before a crash, not yet removed.
        app.conn
            .execute("DELETE FROM _weft_capture WHERE id <= ?1", [cursor])?;
    }
    loop {
        let batch = read_batch(app, cursor)?;
        let Some(last) = batch.last().map(|c| c.id) else {
            return Ok(());
        };
        let (mut commands, rows) = plan(replica, app, &batch, report)?;
        // Which key each new document stands for, before the documents exist: a tombstone
        // arriving later finds its row through this map (a row mapped but never created is
        // harmless).
        {
            let tx = app.conn.transaction()?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR IGNORE INTO _weft_rows (doc, tbl, pk) VALUES (?1, ?2, ?3)",
                )?;
                for (doc, table, key) in &rows {
                    put.execute(rusqlite::params![doc.as_bytes().as_slice(), table, key])?;
                }
            }
            tx.commit()?;
        }
        commands.push(Command::PutMeta {
            key: cursor_key(app),
            value: last.to_le_bytes().to_vec(),
        });
        let mut results = replica.execute_commands(commands);
        // The cursor's result: when it failed, the step's transaction did not commit.
        if let Some(Err(e)) = results.pop() {
            return Err(e.into());
        }
        for result in results {
            if let Err(e) = result {
                report.refused += 1;
                tracing::warn!(app = %app.path.display(), error = %e, "a captured row change was refused");
            }
        }
        report.folded += batch.len();
        cursor = last;
        app.folded_rows += batch.len();
        // Folded rows are skipped by the cursor; removing them is housekeeping, done in
        // batches (each removal is a commit, with an fsync, of the app's file).
        if app.folded_rows >= CLEANUP_ROWS || app.last_cleanup.elapsed() >= CLEANUP_EVERY {
            app.conn
                .execute("DELETE FROM _weft_capture WHERE id <= ?1", [cursor])?;
            app.folded_rows = 0;
            app.last_cleanup = std::time::Instant::now();
        }
    }
}

fn read_batch(app: &AppFile, after: i64) -> Result<Vec<Captured>, TrackError> {
    let mut stmt = app.conn.prepare_cached(
        "SELECT id, tbl, op, pk, row, changed FROM _weft_capture WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(rusqlite::params![after, BATCH as i64], |r| {
        Ok(Captured {
            id: r.get(0)?,
            table: r.get(1)?,
            op: r.get(2)?,
            key: r.get(3)?,
            row: r.get(4)?,
            changed: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

type NewRows = Vec<(crate::DocumentId, String, String)>;

/// The commands for a batch, in capture order, and the new documents' rows.
fn plan(
    replica: &Replica,
    app: &AppFile,
    batch: &[Captured],
    report: &mut TrackReport,
) -> Result<(Vec<Command>, NewRows), TrackError> {
    let mut keys: HashMap<(String, String), KeyDocs> = HashMap::new();
    let mut commands = Vec::new();
    let mut rows = Vec::new();
    for c in batch {
        let Some(table) = app.tables.iter().find(|t| t.table == c.table) else {
            continue;
        };
        let collection = &table.collection;
        let Ok(Value::Array(key_values)) = serde_json::from_str::<Value>(&c.key) else {
            report.refused += 1;
            tracing::warn!(table = %c.table, key = %c.key, "a captured key is not a JSON array");
            continue;
        };
        if key_values.iter().any(Value::is_null) {
            // SQLite lets a non-INTEGER primary key column of a rowid table hold NULL, and
            // every such row would be the same document.
            report.refused += 1;
            tracing::warn!(table = %c.table, key = %c.key, "a row whose primary key holds NULL is not carried");
            continue;
        }
        let key = key_text(&key_values);
        let docs = match keys.entry((c.table.clone(), key.clone())) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(key_docs(replica, collection, &key)?)
            }
        };
        match c.op.as_str() {
            "I" | "U" => {
                let Some(Ok(Value::Object(row))) =
                    c.row.as_deref().map(serde_json::from_str::<Value>)
                else {
                    report.refused += 1;
                    tracing::warn!(table = %c.table, key = %key, "a captured row is not a JSON object");
                    continue;
                };
                match &mut docs.live {
                    Some((id, body)) => {
                        let names: Vec<String> = match (&c.op[..], c.changed.as_deref()) {
                            ("U", Some(changed)) => {
                                serde_json::from_str::<Vec<Option<String>>>(changed)
                                    .unwrap_or_default()
                                    .into_iter()
                                    .flatten()
                                    .collect()
                            }
                            _ => row.keys().cloned().collect(),
                        };
                        let mut fields = Map::new();
                        for name in names {
                            if let Some(value) = row.get(&name)
                                && body.get(&name) != Some(value)
                            {
                                body.insert(name.clone(), value.clone());
                                fields.insert(name, value.clone());
                            }
                        }
                        if !fields.is_empty() {
                            commands.push(Command::Upsert {
                                id: *id,
                                collection: collection.clone(),
                                fields,
                            });
                        }
                    }
                    None => {
                        let id = row_id(collection, &key, docs.next_generation);
                        docs.next_generation += 1;
                        rows.push((id, c.table.clone(), key.clone()));
                        commands.push(Command::Upsert {
                            id,
                            collection: collection.clone(),
                            fields: row.clone(),
                        });
                        docs.live = Some((id, row));
                    }
                }
            }
            "D" => {
                if let Some((id, _)) = docs.live.take() {
                    commands.push(Command::Delete { id });
                }
            }
            other => {
                report.refused += 1;
                tracing::warn!(table = %c.table, op = other, "unknown captured operation");
            }
        }
    }
    Ok((commands, rows))
}
