//! The "write to a target database" pattern: follow a replica's durable change feed and keep a
//! plain SQLite table in step with it — for reporting, search, or a legacy app that reads SQL.
//!
//! ```sh
//! cargo run --example mirror -- app.db mirror.sqlite            # catch up, then exit
//! cargo run --example mirror -- app.db mirror.sqlite --follow   # and keep following
//! ```
//!
//! The position in the feed is stored in the target database in the same transaction as the
//! rows it produced, so the mirror resumes exactly where it stopped, after a crash too. Run it
//! next to `weft sync --watch` on the same file and the table follows every replica in real time.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use weft::{ChangeKind, Replica, Scope};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(source), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!("usage: mirror SOURCE.db TARGET.sqlite [--follow]");
        std::process::exit(2);
    };
    let follow = args.iter().any(|a| a == "--follow");
    let replica = Replica::open(source)?;
    let mut db = Connection::open(target)?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS mirror (id TEXT PRIMARY KEY, collection TEXT NOT NULL, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS mirror_position (one INTEGER PRIMARY KEY CHECK (one = 1), seq INTEGER NOT NULL);",
    )?;
    let since: i64 = db
        .query_row("SELECT seq FROM mirror_position", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    eprintln!("mirroring {source} into {target} from seq {since}");
    // A subscription catches up from the durable feed first, then delivers live changes.
    let mut feed = replica.subscribe(Scope::All, since as u64);
    let mut applied = 0u64;
    loop {
        let wait = if follow {
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        };
        let Some(event) = feed.next_timeout(wait)? else {
            if follow {
                continue;
            }
            break;
        };
        let tx = db.transaction()?;
        match event.kind {
            ChangeKind::Deleted => {
                tx.execute("DELETE FROM mirror WHERE id = ?1", [event.id.to_string()])?;
            }
            ChangeKind::Created | ChangeKind::Updated => match replica.get(&event.id) {
                Ok(doc) => {
                    tx.execute(
                        "INSERT INTO mirror (id, collection, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                        params![event.id.to_string(), event.collection, doc.body.to_string()],
                    )?;
                }
                // Deleted since this entry was written: its own entry comes later.
                Err(weft::Error::Deleted(_)) => {}
                Err(e) => return Err(e.into()),
            },
        }
        tx.execute("INSERT INTO mirror_position (one, seq) VALUES (1, ?1) ON CONFLICT (one) DO UPDATE SET seq = excluded.seq", [event.seq as i64])?;
        tx.commit()?;
        applied += 1;
        if follow {
            // One line per change, so a supervisor (or a test) can follow along.
            println!("{} {:?} {}", event.seq, event.kind, event.id);
        }
    }
    let rows: i64 = db.query_row("SELECT count(*) FROM mirror", [], |r| r.get(0))?;
    eprintln!("applied {applied} changes; the mirror holds {rows} documents");
    Ok(())
}
