//! Writing the replica's documents back into the app's table.
//!
//! Every change of a tracked collection in the replica's change feed (from peers, bundles and
//! our own folds alike) makes the row match its document. The writes happen in one app
//! transaction per batch that also sets `_weft_state.applying` (so the triggers do not capture
//! them again: no echo) and advances `applied_seq` (so after a crash the batch is applied
//! again, never half). The transaction first checks, under the write lock, that the app has no
//! captured change not yet folded in: otherwise the fold goes first, so a row's local edit is
//! merged into its document before the document is written back over the row.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Transaction, TransactionBehavior};
use serde_json::{Map, Value};

use super::rows::{generation_of, key_docs, key_of, key_text, same, to_sql};
use super::schema::{TableShape, ident};
use super::{AppFile, TrackError, TrackReport, Tracked};
use crate::Replica;
use crate::id::DocumentId;

/// Feed entries applied per app transaction.
const BATCH: usize = 5000;

/// How many generations of a key a document id is searched among.
const GENERATIONS: u32 = 1024;

/// Whether the table is written up to the replica's feed.
pub(crate) enum Applied {
    Done,
    /// The app has captured changes that are not folded in yet: fold, then apply again.
    FoldFirst,
}

/// Writes into `table`'s rows every change of its collection since the table's cursor.
pub(crate) fn apply(
    replica: &Replica,
    app: &mut AppFile,
    table: &Tracked,
    folded_up_to: i64,
    report: &mut TrackReport,
) -> Result<Applied, TrackError> {
    let Some(shape) = app.shapes.get(&table.table).cloned() else {
        return Ok(Applied::Done);
    };
    loop {
        let stored: i64 = app.conn.query_row(
            "SELECT applied_seq FROM _weft_state WHERE tbl = ?1",
            [&table.table],
            |r| r.get(0),
        )?;
        // Batches that wrote no row advance only this in-memory position (no commit, no
        // fsync of the app's file): applying them again after a crash changes nothing.
        let applied = stored.max(app.applied.get(&table.table).copied().unwrap_or(0));
        let events =
            replica.changes_since(applied.max(0) as u64, BATCH, Some(&table.collection))?;
        let Some(up_to) = events.last().map(|e| e.seq) else {
            return Ok(Applied::Done);
        };
        let tx = app
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pending: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM _weft_capture WHERE tbl = ?1 AND id > ?2)",
            rusqlite::params![table.table, folded_up_to],
            |r| r.get(0),
        )?;
        if pending {
            return Ok(Applied::FoldFirst);
        }
        tx.execute(
            "UPDATE _weft_state SET applying = 1 WHERE tbl = ?1",
            [&table.table],
        )?;
        // Each document once, in the order of its last change.
        let mut seen = HashSet::new();
        let ids: Vec<DocumentId> = events
            .iter()
            .rev()
            .filter(|e| seen.insert(e.id))
            .map(|e| e.id)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let before = report.applied + report.refused;
        for id in ids {
            apply_doc(replica, &tx, table, &shape, &id, report)?;
        }
        app.applied.insert(table.table.clone(), up_to as i64);
        if report.applied + report.refused == before {
            // Nothing written (our own folds, documents whose rows match): no commit.
            drop(tx);
            continue;
        }
        tx.execute(
            "UPDATE _weft_state SET applying = 0, applied_seq = ?2 WHERE tbl = ?1",
            rusqlite::params![table.table, up_to as i64],
        )?;
        tx.commit()?;
    }
}

/// Makes the row of document `id` match it.
fn apply_doc(
    replica: &Replica,
    tx: &Transaction<'_>,
    table: &Tracked,
    shape: &TableShape,
    id: &DocumentId,
    report: &mut TrackReport,
) -> Result<(), TrackError> {
    let Some(record) = replica.record(id)? else {
        return Ok(());
    };
    let collection = &table.collection;
    if record.deleted {
        let key: Option<String> = tx
            .query_row(
                "SELECT pk FROM _weft_rows WHERE doc = ?1",
                [id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let Some(key) = key else {
            return Ok(()); // never a row here
        };
        let Ok(key_values) = serde_json::from_str::<Vec<Value>>(&key) else {
            return Ok(());
        };
        match key_docs(replica, collection, &key)?.live {
            // A later generation of the key lives on: the row is its.
            Some((_, body)) => write_row(tx, &table.table, shape, &key_values, &body, report)?,
            None => delete_row(tx, &table.table, shape, &key_values, report)?,
        }
        return Ok(());
    }
    let Some(Value::Object(body)) = record
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())
    else {
        return Ok(());
    };
    let Some(key_values) = key_of(&body, &shape.key) else {
        report.skipped += 1;
        tracing::warn!(doc = %id, table = %table.table, "a document of a tracked collection lacks the key columns; not written to the table");
        return Ok(());
    };
    let key = key_text(&key_values);
    if generation_of(collection, &key, id, GENERATIONS).is_none() {
        report.skipped += 1;
        tracing::warn!(doc = %id, table = %table.table, "a document of a tracked collection whose id is not its row key's (created through the document API?); not written to the table");
        return Ok(());
    }
    if key_docs(replica, collection, &key)?
        .live
        .is_none_or(|(current, _)| current != *id)
    {
        return Ok(()); // an older generation of a key inserted again
    }
    tx.prepare_cached("INSERT OR IGNORE INTO _weft_rows (doc, tbl, pk) VALUES (?1, ?2, ?3)")?
        .execute(rusqlite::params![
            id.as_bytes().as_slice(),
            table.table,
            key
        ])?;
    write_row(tx, &table.table, shape, &key_values, &body, report)
}

fn key_clause(shape: &TableShape, first: usize) -> String {
    shape
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", ident(k), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Inserts or updates the row of `key` so that every column the body has holds its value
/// (columns the body lacks keep theirs, or their default on insert).
fn write_row(
    tx: &Transaction<'_>,
    table: &str,
    shape: &TableShape,
    key: &[Value],
    body: &Map<String, Value>,
    report: &mut TrackReport,
) -> Result<(), TrackError> {
    let columns: Vec<String> = shape.columns.iter().map(|c| ident(c)).collect();
    let key_args: Vec<SqlValue> = key.iter().map(to_sql).collect();
    let select = format!(
        "SELECT {} FROM {} WHERE {}",
        columns.join(", "),
        ident(table),
        key_clause(shape, 1)
    );
    let stored: Option<Vec<SqlValue>> = tx
        .prepare_cached(&select)?
        .query_row(rusqlite::params_from_iter(&key_args), |r| {
            (0..shape.columns.len()).map(|i| r.get(i)).collect()
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match stored {
        Some(stored) => {
            let mut sets = Vec::new();
            let mut args = Vec::new();
            for (i, column) in shape.columns.iter().enumerate() {
                if let Some(value) = body.get(column)
                    && !same(&stored[i], value)
                {
                    args.push(to_sql(value));
                    sets.push(format!("{} = ?{}", ident(column), args.len()));
                }
            }
            if sets.is_empty() {
                return Ok(());
            }
            let first = args.len() + 1;
            args.extend(key_args);
            let sql = format!(
                "UPDATE {} SET {} WHERE {}",
                ident(table),
                sets.join(", "),
                key_clause(shape, first)
            );
            if !written(tx, &sql, &args, table, report)? {
                return Ok(());
            }
        }
        None => {
            let present: Vec<&String> = shape
                .columns
                .iter()
                .filter(|c| body.contains_key(*c))
                .collect();
            let args: Vec<SqlValue> = present.iter().map(|c| to_sql(&body[*c])).collect();
            let marks: Vec<String> = (1..=args.len()).map(|i| format!("?{i}")).collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                ident(table),
                present
                    .iter()
                    .map(|c| ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                marks.join(", ")
            );
            if !written(tx, &sql, &args, table, report)? {
                return Ok(());
            }
        }
    }
    report.applied += 1;
    Ok(())
}

/// Runs a row write. A constraint of the app's table (NOT NULL, UNIQUE, CHECK, a foreign key)
/// that refuses the replicated row fails only that statement: the row is counted as refused
/// and logged (the document keeps it), the rest of the batch goes on.
fn written(
    tx: &Transaction<'_>,
    sql: &str,
    args: &[SqlValue],
    table: &str,
    report: &mut TrackReport,
) -> Result<bool, TrackError> {
    match tx
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(args))
    {
        Ok(_) => Ok(true),
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
            report.refused += 1;
            tracing::warn!(table, error = %e, "the app's table refused a replicated row");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn delete_row(
    tx: &Transaction<'_>,
    table: &str,
    shape: &TableShape,
    key: &[Value],
    report: &mut TrackReport,
) -> Result<(), TrackError> {
    let sql = format!(
        "DELETE FROM {} WHERE {}",
        ident(table),
        key_clause(shape, 1)
    );
    let args: Vec<SqlValue> = key.iter().map(to_sql).collect();
    if tx
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(&args))?
        > 0
    {
        report.applied += 1;
    }
    Ok(())
}
