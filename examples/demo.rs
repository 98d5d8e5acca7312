//! The weft quick start: two replicas ("laptop" and "phone") edit the same documents offline and
//! converge through a bundle file, while a change hook and the durable change feed report what
//! happened.
//!
//! Run with `cargo run --release --example demo [DIR]` (DIR defaults to ./weft-demo).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use weft::{BundleScope, Filter, Query, Replica, Scope};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "weft-demo".into());
    std::fs::create_dir_all(&dir)?;
    let laptop_path = format!("{dir}/laptop.db");
    let phone_path = format!("{dir}/phone.db");
    for path in [&laptop_path, &phone_path] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    let laptop = Replica::open(&laptop_path)?;
    let phone = Replica::open(&phone_path)?;

    // Trigger-based: react to every committed change on the phone, local or merged.
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let _hook = phone.on_change(Scope::collection("todos"), move |event| {
        counter.fetch_add(1, Ordering::Relaxed);
        println!(
            "  [phone hook] seq {} {:?} {} (from {})",
            event.seq, event.kind, event.id, event.origin
        );
    });

    println!("laptop creates three todos");
    let milk = laptop.create(
        "todos",
        json!({"title": "buy milk", "done": false, "priority": 2}),
    )?;
    let bread = laptop.create(
        "todos",
        json!({"title": "bake bread", "done": false, "priority": 1}),
    )?;
    let notes = laptop.create("notes", json!({"title": "groceries", "tags": ["home"]}))?;
    laptop.set_text(&notes, &weft::Path::from_pointer("/text")?, "milk, eggs")?;

    println!("manual sync: laptop -> bundle file -> phone");
    let bundle = laptop.export_bundle(&BundleScope::All)?;
    std::fs::write(format!("{dir}/laptop.bundle"), &bundle)?;
    let report = phone.import_bundle(&std::fs::read(format!("{dir}/laptop.bundle"))?)?;
    println!("  phone imported: {report:?}");

    println!("both edit offline, concurrently");
    laptop.update(&milk, json!({"done": true}))?;
    laptop.splice(
        &notes,
        &weft::Path::from_pointer("/text")?,
        10,
        0,
        ", flour",
    )?;
    phone.update(&milk, json!({"priority": 5}))?;
    phone.splice(&notes, &weft::Path::from_pointer("/text")?, 0, 0, "oat ")?;
    phone.delete(&bread)?;

    println!("sync both ways");
    phone.import_bundle(&laptop.export_bundle(&BundleScope::All)?)?;
    laptop.import_bundle(&phone.export_bundle(&BundleScope::All)?)?;

    for (name, replica) in [("laptop", &laptop), ("phone", &phone)] {
        let m = replica.get(&milk)?;
        let n = replica.get(&notes)?;
        println!("  {name}: milk = {} notes = {}", m.body, n.body["text"]);
        println!("  {name}: bread deleted = {}", replica.get(&bread).is_err());
    }
    assert_eq!(
        laptop.get(&milk)?.heads,
        phone.get(&milk)?.heads,
        "replicas converge"
    );
    assert_eq!(
        laptop.get(&notes)?.body,
        phone.get(&notes)?.body,
        "text edits merge"
    );

    let open = laptop.query(&Query::collection("todos").filter(Filter::parse("done = false")?))?;
    println!("laptop: {} open todos", open.len());

    println!("the phone's durable change feed (resume from any seq):");
    for event in phone.changes_since(0, 100, None)? {
        println!(
            "  seq {:>2} {:<8} {:<6} {}",
            event.seq,
            format!("{:?}", event.kind),
            event.collection,
            event.id
        );
    }
    println!("phone hook fired {} times", seen.load(Ordering::Relaxed));
    println!("files are in {dir}/ (try: cargo run -- --db {dir}/phone.db doc list)");
    Ok(())
}
