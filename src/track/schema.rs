//! What a tracked table looks like: its columns and key, read from the app's file, and the
//! refusals for tables weft cannot carry safely.

use rusqlite::Connection;

use super::TrackError;

/// A table's shape, as tracking needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableShape {
    /// Every column, in table order.
    pub columns: Vec<String>,
    /// The primary-key columns, in key order.
    pub key: Vec<String>,
}

/// `"name"` with inner quotes doubled: an SQL identifier, whatever the name holds.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled: an SQL string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Reads the shape of `table` and refuses what weft cannot carry: no primary key of its own
/// (rowid only), AUTOINCREMENT, an `INTEGER PRIMARY KEY` (a rowid alias SQLite fills in)
/// unless `allow_integer_key`, and columns declared BLOB.
pub(crate) fn inspect(
    conn: &Connection,
    table: &str,
    allow_integer_key: bool,
) -> Result<TableShape, TrackError> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some(sql) = sql else {
        return Err(TrackError::NoSuchTable(table.to_owned()));
    };
    if table.starts_with("_weft_") || table.starts_with("sqlite_") {
        return Err(TrackError::Reserved(table.to_owned()));
    }
    let mut columns = Vec::new();
    let mut keyed: Vec<(i64, String, String)> = Vec::new();
    let mut blobs = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?1)")?;
        let mut rows = stmt.query([table])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let declared: String = row.get(1)?;
            let pk: i64 = row.get(2)?;
            if declared.to_ascii_uppercase().contains("BLOB") {
                blobs.push(name.clone());
            }
            if pk > 0 {
                keyed.push((pk, name.clone(), declared.clone()));
            }
            columns.push(name);
        }
    }
    if keyed.is_empty() {
        return Err(TrackError::NoPrimaryKey(table.to_owned()));
    }
    if sql.to_ascii_uppercase().contains("AUTOINCREMENT") {
        return Err(TrackError::AutoIncrement(table.to_owned()));
    }
    keyed.sort();
    let without_rowid = sql
        .to_ascii_uppercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w == ["WITHOUT", "ROWID"]);
    // A single INTEGER key column of a rowid table is the rowid itself.
    if let [(_, name, declared)] = keyed.as_slice()
        && declared.eq_ignore_ascii_case("INTEGER")
        && !without_rowid
        && !allow_integer_key
    {
        return Err(TrackError::IntegerKey {
            table: table.to_owned(),
            column: name.clone(),
        });
    }
    if let Some(column) = blobs.into_iter().next() {
        return Err(TrackError::BlobColumn {
            table: table.to_owned(),
            column,
        });
    }
    Ok(TableShape {
        columns,
        key: keyed.into_iter().map(|(_, name, _)| name).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ddl: &str, allow_integer_key: bool) -> Result<TableShape, TrackError> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(ddl).unwrap();
        inspect(&conn, "t", allow_integer_key)
    }

    #[test]
    fn accepts_text_and_composite_keys() {
        let s = shape(
            "CREATE TABLE t (id TEXT PRIMARY KEY, title TEXT, n INTEGER)",
            false,
        )
        .unwrap();
        assert_eq!(s.columns, ["id", "title", "n"]);
        assert_eq!(s.key, ["id"]);
        let s = shape(
            "CREATE TABLE t (b TEXT, a INTEGER, v, PRIMARY KEY (a, b))",
            false,
        )
        .unwrap();
        assert_eq!(s.key, ["a", "b"]);
        let s = shape(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT) WITHOUT ROWID",
            false,
        );
        assert_eq!(s.unwrap().key, ["id"]);
    }

    #[test]
    fn refuses_what_would_collide_or_not_carry() {
        let refused = |ddl: &str| shape(ddl, false).unwrap_err().to_string();
        assert!(refused("CREATE TABLE t (a TEXT, b TEXT)").contains("no primary key"));
        assert!(
            refused("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
                .contains("AUTOINCREMENT")
        );
        assert!(refused("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)").contains("rowid"));
        assert!(refused("CREATE TABLE t (id TEXT PRIMARY KEY, v BLOB)").contains("BLOB"));
        assert!(
            shape("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", true).is_ok(),
            "--allow-integer-key"
        );
        let conn = Connection::open_in_memory().unwrap();
        assert!(matches!(
            inspect(&conn, "missing", false),
            Err(TrackError::NoSuchTable(_))
        ));
    }

    #[test]
    fn quoting_survives_hostile_names() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
