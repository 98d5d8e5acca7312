//! `weft changes [--since SEQ] [--follow]`: the change feed as NDJSON.

use std::io::{self, Write};
use std::time::Duration;

use serde_json::json;
use weft::ChangeEvent;

use crate::common::{CliResult, Reader, heads_json, output_err};

pub(crate) fn change_line(e: &ChangeEvent) -> String {
    json!({
        "seq": e.seq,
        "id": e.id.to_string(),
        "collection": e.collection,
        "kind": e.kind,
        "heads": heads_json(&e.heads),
        "origin": e.origin.to_string(),
        "at": e.at,
    })
    .to_string()
}

pub(crate) fn changes(
    db: &std::path::Path,
    since: u64,
    collection: Option<String>,
    follow: bool,
) -> CliResult {
    let mut reader = Reader::new(db);
    let mut last = since;
    loop {
        let page = reader.read(|r| r.changes_since(last, 1000, collection.as_deref()))?;
        let mut stdout = io::BufWriter::new(io::stdout().lock());
        for e in &page {
            writeln!(stdout, "{}", change_line(e)).map_err(output_err)?;
            last = e.seq;
        }
        stdout.flush().map_err(output_err)?;
        if page.len() == 1000 {
            continue;
        }
        if !follow {
            return Ok(());
        }
        // Other processes write to the file; SQLite has no cross-process notification, so poll.
        std::thread::sleep(Duration::from_millis(50));
    }
}
