//! A desktop todo list that works offline and syncs whenever the relay is reachable.
//!
//! ```sh
//! cargo run --release -- serve &                                  # a relay on ws://127.0.0.1:7420
//! cargo run --example todo -- add "buy milk"
//! cargo run --example todo -- list
//! cargo run --example todo -- done <ID>
//! WEFT_DB=phone.db cargo run --example todo -- list               # a second device
//! ```
//!
//! Every command works on the local file first — with the relay down it just says "offline" and
//! the edit waits in the database. When the relay is up, the command syncs before it shows the
//! list and after it changes something.

use std::time::Duration;

use serde_json::json;
use weft::net::{ConnectOptions, Status};
use weft::{Query, Replica};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = std::env::var("WEFT_DB").unwrap_or_else(|_| "todo.db".into());
    let server = std::env::var("WEFT_SERVER").unwrap_or_else(|_| "ws://127.0.0.1:7420".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let replica = Replica::open(&db)?;

    // Sync in the background while we work; a short wait is enough to pull recent changes.
    let connection = replica.connect(
        &server,
        ConnectOptions {
            reconnect: false,
            ..ConnectOptions::default()
        },
    );
    let online = matches!(
        tokio::time::timeout(Duration::from_secs(2), connection.wait_synced()).await,
        Ok(Ok(()))
    );
    eprintln!(
        "{}",
        if online {
            "online: in sync with the relay"
        } else {
            "offline: working on the local copy"
        }
    );

    match args.first().map(String::as_str) {
        Some("add") => {
            let title = args[1..].join(" ");
            let id = replica.create("todos", json!({"title": title, "done": false}))?;
            println!("added {id}");
        }
        Some("done") => {
            let id = args.get(1).ok_or("usage: todo done ID")?.parse()?;
            replica.update(&id, json!({"done": true}))?;
        }
        Some("rm") => {
            let id = args.get(1).ok_or("usage: todo rm ID")?.parse()?;
            replica.delete(&id)?;
        }
        Some("list") | None => {}
        Some(other) => {
            return Err(format!("unknown command {other}: use add, done, rm or list").into());
        }
    }
    for doc in replica.query(&Query::collection("todos"))? {
        let mark = if doc.body["done"] == json!(true) {
            "x"
        } else {
            " "
        };
        println!(
            "[{mark}] {}  {}",
            doc.id,
            doc.body["title"].as_str().unwrap_or("")
        );
    }
    // Live sessions push each change as it commits; wait until the relay confirms.
    if online && args.first().is_some_and(|a| a != "list") {
        let synced = tokio::time::timeout(Duration::from_secs(5), connection.wait_synced()).await;
        if !matches!(synced, Ok(Ok(()))) || connection.status() != Status::Synced {
            eprintln!("the change is saved locally and will sync next time");
        }
    }
    connection.close().await;
    Ok(())
}
