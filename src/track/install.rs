//! The objects tracking puts into the app's file: three `_weft_` tables and three triggers per
//! tracked table, created and dropped in the app's file, in one transaction each.
//!
//! - `_weft_capture`: every row change the app commits, appended by the triggers inside the
//!   app's own transaction (so a change is captured exactly when it commits). `AUTOINCREMENT`
//!   so that ids only grow: the replica remembers the last one it folded in.
//! - `_weft_state`: per tracked table, the replica that tracks it, its collection, the
//!   `applying` flag (1 only inside weft's own transactions, which the triggers then skip:
//!   echo suppression) and how far into the replica's change feed the table is written.
//! - `_weft_rows`: which row key each document stands for, so a tombstone (which has no body)
//!   can still find its row.

use rusqlite::{Connection, TransactionBehavior};

use super::TrackError;
use super::schema::{TableShape, ident, literal};

/// SQLite's default limit on a function's arguments is 127 (`SQLITE_MAX_FUNCTION_ARG` before
/// 3.46): `json_object` takes two per column.
pub(crate) const MAX_COLUMNS: usize = 63;

const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS _weft_state (
        tbl         TEXT PRIMARY KEY,
        replica     TEXT NOT NULL,
        collection  TEXT NOT NULL,
        applying    INTEGER NOT NULL DEFAULT 0,
        applied_seq INTEGER NOT NULL DEFAULT 0,
        columns     TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE IF NOT EXISTS _weft_capture (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        tbl     TEXT NOT NULL,
        op      TEXT NOT NULL,
        pk      TEXT NOT NULL,
        row     TEXT,
        changed TEXT
    );
    CREATE TABLE IF NOT EXISTS _weft_rows (
        doc BLOB PRIMARY KEY,
        tbl TEXT NOT NULL,
        pk  TEXT NOT NULL
    ) WITHOUT ROWID;";

fn trigger_name(kind: &str, table: &str) -> String {
    ident(&format!("_weft_{kind}_{table}"))
}

/// `json_array(P."k1", ...)` over the key columns.
fn key_json(prefix: &str, shape: &TableShape) -> String {
    let cols: Vec<String> = shape
        .key
        .iter()
        .map(|k| format!("{prefix}.{}", ident(k)))
        .collect();
    format!("json_array({})", cols.join(", "))
}

/// `json_object('c1', P."c1", ...)` over every column.
fn row_json(prefix: &str, shape: &TableShape) -> String {
    let pairs: Vec<String> = shape
        .columns
        .iter()
        .map(|c| format!("{}, {prefix}.{}", literal(c), ident(c)))
        .collect();
    format!("json_object({})", pairs.join(", "))
}

/// True when the key did not change in an UPDATE.
fn same_key(shape: &TableShape) -> String {
    let parts: Vec<String> = shape
        .key
        .iter()
        .map(|k| format!("NEW.{0} IS OLD.{0}", ident(k)))
        .collect();
    format!("({})", parts.join(" AND "))
}

/// The trigger statement that refuses a BLOB value (weft carries JSON values only), so the
/// app's write fails with a message instead of going unreplicated.
fn refuse_blobs(table: &str, shape: &TableShape) -> String {
    let tests: Vec<String> = shape
        .columns
        .iter()
        .map(|c| format!("typeof(NEW.{}) = 'blob'", ident(c)))
        .collect();
    let message = format!(
        "weft: a BLOB value in tracked table {table}; weft carries INTEGER, REAL, TEXT and NULL values (store bytes as base64 or hex TEXT)"
    );
    format!(
        "SELECT RAISE(ABORT, {}) WHERE {};",
        literal(&message),
        tests.join(" OR ")
    )
}

/// The three triggers' DDL.
fn triggers(table: &str, shape: &TableShape) -> String {
    let t = ident(table);
    let tl = literal(table);
    let when = format!("coalesce((SELECT applying FROM _weft_state WHERE tbl = {tl}), 1) = 0");
    let blobs = refuse_blobs(table, shape);
    let changed: Vec<String> = shape
        .columns
        .iter()
        .map(|c| {
            format!(
                "CASE WHEN NEW.{0} IS NOT OLD.{0} THEN {1} END",
                ident(c),
                literal(c)
            )
        })
        .collect();
    let any_changed: Vec<String> = shape
        .columns
        .iter()
        .map(|c| format!("NEW.{0} IS NOT OLD.{0}", ident(c)))
        .collect();
    let same = same_key(shape);
    format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {t} WHEN {when} BEGIN
            {blobs}
            INSERT INTO _weft_capture (tbl, op, pk, row) VALUES ({tl}, 'I', {new_key}, {new_row});
         END;
         CREATE TRIGGER {upd} AFTER UPDATE ON {t} WHEN {when} BEGIN
            {blobs}
            INSERT INTO _weft_capture (tbl, op, pk) SELECT {tl}, 'D', {old_key} WHERE NOT {same};
            INSERT INTO _weft_capture (tbl, op, pk, row, changed)
                SELECT {tl}, CASE WHEN {same} THEN 'U' ELSE 'I' END, {new_key}, {new_row},
                       json_array({changed})
                WHERE NOT {same} OR {any_changed};
         END;
         CREATE TRIGGER {del} AFTER DELETE ON {t} WHEN {when} BEGIN
            INSERT INTO _weft_capture (tbl, op, pk) VALUES ({tl}, 'D', {old_key});
         END;",
        ins = trigger_name("ins", table),
        upd = trigger_name("upd", table),
        del = trigger_name("del", table),
        new_key = key_json("NEW", shape),
        old_key = key_json("OLD", shape),
        new_row = row_json("NEW", shape),
        changed = changed.join(", "),
        any_changed = any_changed.join(" OR "),
    )
}

fn drop_triggers(conn: &Connection, table: &str) -> rusqlite::Result<()> {
    for kind in ["ins", "upd", "del"] {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {};",
            trigger_name(kind, table)
        ))?;
    }
    Ok(())
}

/// Captures every current row of `table` as an insert: the fold turns each into a document
/// (or, for a row that has one, into an edit of the fields that differ).
fn capture_all(conn: &Connection, table: &str, shape: &TableShape) -> rusqlite::Result<usize> {
    conn.execute(
        &format!(
            "INSERT INTO _weft_capture (tbl, op, pk, row) SELECT {}, 'I', {}, {} FROM {} AS NEW",
            literal(table),
            key_json("NEW", shape),
            row_json("NEW", shape),
            ident(table)
        ),
        [],
    )
}

/// Installs tracking of `table` for `replica` (or re-installs it, after the table's columns
/// changed), capturing its current rows. Returns how many were captured.
pub(crate) fn install(
    conn: &mut Connection,
    table: &str,
    shape: &TableShape,
    replica: &str,
    collection: &str,
) -> Result<usize, TrackError> {
    if shape.columns.len() > MAX_COLUMNS {
        return Err(TrackError::TooManyColumns {
            table: table.to_owned(),
            columns: shape.columns.len(),
        });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(TABLES)?;
    let owner: Option<(String, String)> = tx
        .query_row(
            "SELECT replica, collection FROM _weft_state WHERE tbl = ?1",
            [table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match owner {
        Some((other, _)) if other != replica => {
            return Err(TrackError::TrackedByOther {
                table: table.to_owned(),
                replica: other,
            });
        }
        Some((_, was)) if was != collection => {
            return Err(TrackError::CollectionChange {
                table: table.to_owned(),
                was,
            });
        }
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO _weft_state (tbl, replica, collection) VALUES (?1, ?2, ?3)",
                [table, replica, collection],
            )?;
        }
    }
    let columns = serde_json::to_string(&shape.columns).unwrap_or_default();
    tx.execute(
        "UPDATE _weft_state SET columns = ?2 WHERE tbl = ?1",
        [table, columns.as_str()],
    )?;
    drop_triggers(&tx, table)?;
    tx.execute_batch(&triggers(table, shape))?;
    let captured = capture_all(&tx, table, shape)?;
    tx.commit()?;
    Ok(captured)
}

/// Removes tracking of `table`: its triggers, state, captured changes and row map; the
/// `_weft_` tables too when no tracked table is left. The caller folds in what was captured
/// first (`pending` is checked here, under the write lock, so nothing captured is dropped).
pub(crate) fn uninstall(
    conn: &mut Connection,
    table: &str,
    folded_up_to: i64,
) -> Result<bool, TrackError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !has_tables(&tx)? {
        return Ok(true);
    }
    let pending: i64 = tx.query_row(
        "SELECT count(*) FROM _weft_capture WHERE tbl = ?1 AND id > ?2",
        rusqlite::params![table, folded_up_to],
        |r| r.get(0),
    )?;
    if pending > 0 {
        return Ok(false);
    }
    drop_triggers(&tx, table)?;
    tx.execute("DELETE FROM _weft_state WHERE tbl = ?1", [table])?;
    tx.execute("DELETE FROM _weft_capture WHERE tbl = ?1", [table])?;
    tx.execute("DELETE FROM _weft_rows WHERE tbl = ?1", [table])?;
    let left: i64 = tx.query_row("SELECT count(*) FROM _weft_state", [], |r| r.get(0))?;
    if left == 0 {
        tx.execute_batch(
            "DROP TABLE _weft_state; DROP TABLE _weft_capture; DROP TABLE _weft_rows;",
        )?;
    }
    tx.commit()?;
    Ok(true)
}

/// The columns the installed triggers of `table` capture.
pub(crate) fn installed_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let text: String = conn.query_row(
        "SELECT columns FROM _weft_state WHERE tbl = ?1",
        [table],
        |r| r.get(0),
    )?;
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

/// Whether the app's file has tracking's tables.
pub(crate) fn has_tables(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '_weft_state'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> (Connection, TableShape) {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE \"to\"\"dos\" (id TEXT PRIMARY KEY, title TEXT, done INTEGER, score REAL);
             INSERT INTO \"to\"\"dos\" VALUES ('a', 'first', 0, 1.5);",
        )
        .unwrap();
        let shape = super::super::schema::inspect(&conn, "to\"dos", false).unwrap();
        assert_eq!(
            install(&mut conn, "to\"dos", &shape, "R1", "todos").unwrap(),
            1
        );
        (conn, shape)
    }

    fn captured(conn: &Connection) -> Vec<(String, String, Option<String>, Option<String>)> {
        let mut stmt = conn
            .prepare("SELECT op, pk, row, changed FROM _weft_capture ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn triggers_capture_inserts_updates_deletes_and_key_changes() {
        let (conn, _) = app();
        conn.execute_batch(
            "DELETE FROM _weft_capture;
             INSERT INTO \"to\"\"dos\" VALUES ('b', 'it''s', NULL, 2);
             UPDATE \"to\"\"dos\" SET done = 1 WHERE id = 'b';
             UPDATE \"to\"\"dos\" SET title = title WHERE id = 'b';
             UPDATE \"to\"\"dos\" SET id = 'c' WHERE id = 'b';
             DELETE FROM \"to\"\"dos\" WHERE id = 'a';",
        )
        .unwrap();
        let c = captured(&conn);
        assert_eq!(c.len(), 5, "{c:?}");
        assert_eq!(c[0].0, "I");
        assert_eq!(
            c[0].2.as_deref(),
            Some(r#"{"id":"b","title":"it's","done":null,"score":2.0}"#)
        );
        assert_eq!(
            (c[1].0.as_str(), c[1].3.as_deref()),
            ("U", Some(r#"[null,null,"done",null]"#))
        );
        // The no-op update was not captured; the key change is a delete and an insert.
        assert_eq!((c[2].0.as_str(), c[2].1.as_str()), ("D", r#"["b"]"#));
        assert_eq!((c[3].0.as_str(), c[3].1.as_str()), ("I", r#"["c"]"#));
        assert_eq!((c[4].0.as_str(), c[4].1.as_str()), ("D", r#"["a"]"#));
    }

    #[test]
    fn applying_flag_suppresses_capture_and_blobs_are_refused() {
        let (conn, _) = app();
        conn.execute_batch(
            "DELETE FROM _weft_capture;
             BEGIN;
             UPDATE _weft_state SET applying = 1;
             INSERT INTO \"to\"\"dos\" VALUES ('x', 'from a peer', 0, 0);
             UPDATE _weft_state SET applying = 0;
             COMMIT;",
        )
        .unwrap();
        assert!(captured(&conn).is_empty());
        let err = conn
            .execute("INSERT INTO \"to\"\"dos\" VALUES ('y', x'00ff', 0, 0)", [])
            .unwrap_err();
        assert!(err.to_string().contains("BLOB"), "{err}");
        assert!(captured(&conn).is_empty());
    }

    #[test]
    fn another_replica_cannot_take_over_and_uninstall_cleans_up() {
        let (mut conn, shape) = app();
        assert!(matches!(
            install(&mut conn, "to\"dos", &shape, "R2", "todos"),
            Err(TrackError::TrackedByOther { .. })
        ));
        let last: i64 = conn
            .query_row("SELECT max(id) FROM _weft_capture", [], |r| r.get(0))
            .unwrap();
        assert!(
            !uninstall(&mut conn, "to\"dos", 0).unwrap(),
            "captures pending"
        );
        assert!(uninstall(&mut conn, "to\"dos", last).unwrap());
        assert!(!has_tables(&conn).unwrap());
        conn.execute(
            "INSERT INTO \"to\"\"dos\" VALUES ('z', 'untracked', 0, 0)",
            [],
        )
        .unwrap();
    }
}
