//! Replays the fuzz seeds (`fuzz/seeds/<target>/`), the minimized corpora
//! (`fuzz/corpus/<target>/`) and every crash the fuzzers found (`tests/fixtures/fuzz/<target>/`)
//! through the fuzz targets' own bodies (`fuzz/bodies/`), so
//! `cargo test` checks exactly what the fuzzers check, without libFuzzer. BENCHMARKS.md
//! ("Fuzzing") has the campaigns; `scripts/fuzz.sh TARGET [SECONDS]` runs one.
//!
//! `cargo test --test it -- --ignored fuzz_replay::write_seeds` regenerates the seed inputs
//! (`fuzz/seeds/<target>/`) from real sessions, frames, bundles and documents.

#[allow(dead_code)]
#[path = "../../fuzz/bodies/mod.rs"]
mod bodies;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use bodies::{amrepo_decode, bundle_decode, engine_messages, frame_decode, json_automerge};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seed, corpus and crash-fixture files of a target.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [
        root().join("fuzz/seeds").join(target),
        root().join("fuzz/corpus").join(target),
        root().join("tests/fixtures/fuzz").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_file() && path.extension().is_none_or(|e| e != "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` over every input of `target`; fails listing every input that panicked.
fn replay(target: &str, check: impl Fn(&[u8])) -> usize {
    let files = inputs(target);
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("an input file reads");
            catch_unwind(AssertUnwindSafe(|| check(&data)))
                .is_err()
                .then(|| {
                    path.strip_prefix(root())
                        .unwrap_or(path)
                        .display()
                        .to_string()
                })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs failed (panics printed above):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
    files.len()
}

#[test]
fn frame_decode() {
    assert!(replay("frame_decode", frame_decode::check) > 0);
}

#[test]
fn amrepo_decode() {
    assert!(replay("amrepo_decode", amrepo_decode::check) > 0);
}

#[test]
fn bundle_decode() {
    assert!(replay("bundle_decode", bundle_decode::check) > 0);
}

#[test]
fn engine_messages() {
    assert!(replay("engine_messages", engine_messages::check) > 0);
}

/// What the Bloom filter panic did to a relay that survived it (`net/applier.rs` catches
/// panics): the batch's other changes stayed in the engine's memory, uncommitted; the next
/// edit stored a chunk without them, and after a restart the document no longer loaded. Now
/// the filter is refused before Automerge sees it, and a step that panics anyway is rolled
/// back with the engine's memory (`Engine::recover`).
#[test]
fn a_panic_mid_batch_does_not_corrupt_a_document() {
    use serde_json::json;
    use weft::automerge::sync::{BloomFilter, ChunkList, Have, Message as SyncMessage};
    use weft::engine::PeerId;
    use weft::protocol::{Message, Payload, SyncItem};
    use weft::{Access, BundleEntry, BundleScope, Scope};

    let docs = &bodies::world::world().docs;
    let (milk, eggs) = (docs[0].0, docs[1].0);
    // A peer's version of `milk`, one change ahead.
    let peer = bodies::world::open_records(&bodies::world::Kv::new(), 2);
    let world = bodies::world::open()
        .replica
        .export_bundle(&BundleScope::All)
        .unwrap();
    peer.replica.import_bundle(&world).unwrap();
    peer.replica.update(&milk, json!({"from_peer": 1})).unwrap();
    let bundle = peer.replica.export_bundle(&BundleScope::All).unwrap();
    let whole = weft::Bundle::decode(&bundle)
        .unwrap()
        .entries
        .into_iter()
        .find_map(|e| match e {
            BundleEntry::Document { id, bytes, .. } if id == milk => Some(bytes),
            _ => None,
        })
        .unwrap();
    let bad = SyncMessage {
        heads: Vec::new(),
        need: Vec::new(),
        have: vec![Have {
            last_sync: Vec::new(),
            bloom: BloomFilter::try_from(&[1u8, 0, 7][..]).unwrap(),
        }],
        changes: ChunkList::empty(),
        flags: None,
        version: weft::automerge::sync::MessageVersion::V1,
    };

    let mut w = bodies::world::open();
    w.replica.peer_connected(
        PeerId(1),
        engine_messages::remote(),
        Access::full(Scope::All),
        false,
    );
    let batch = vec![
        SyncItem {
            id: milk,
            collection: "todos".into(),
            payload: Payload::Whole(whole),
        },
        SyncItem {
            id: eggs,
            collection: "todos".into(),
            payload: Payload::Sync(bad.encode()),
        },
    ];
    let _ = catch_unwind(AssertUnwindSafe(|| {
        w.replica.peer_message(PeerId(1), Message::Sync { batch })
    }));
    w.replica.update(&milk, json!({"local": 2})).unwrap();
    w.persist();
    let restarted = bodies::world::open_records(&w.kv, 99);
    let heads = restarted.replica.get(&milk).unwrap().heads;
    assert!(
        restarted.replica.get_at(&milk, &heads).is_ok(),
        "{:?}",
        restarted.replica.get_at(&milk, &heads)
    );
}

#[test]
fn json_automerge() {
    assert!(replay("json_automerge", json_automerge::check) > 0);
}

// ---------------------------------------------------------------------------------------------
// Seeds

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

/// Writes the seed inputs of every target: recorded sessions, the frames they exchanged (one
/// of each message kind at least), bundles of real replicas, real documents.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand when the bodies' input formats change"]
fn write_seeds() {
    use serde_json::json;
    use weft::protocol::{self, ErrorCode, Message, RejectCode, WireScope};
    use weft::{BundleScope, ReplicaId};

    // engine_messages, and frames from the same sessions.
    let (sessions, mut frames) = engine_messages::seeds();
    for (name, input) in &sessions {
        write("engine_messages", name, input);
    }
    frames.extend([
        Message::Hello {
            protocol: 1,
            replica: ReplicaId::from_seed(2),
            token: Some("eyJhbGciOiJIUzI1NiJ9.e30.sig".into()),
            scope: WireScope::Collections(vec!["todos".into(), "notes".into()]),
        },
        Message::Welcome {
            replica: ReplicaId::from_seed(1),
            scope: WireScope::All,
            max_frame: 16 << 20,
        },
        Message::Reject {
            code: RejectCode::Forbidden,
            reason: "collection \"private\" is not granted".into(),
        },
        Message::Ping { nonce: 7 },
        Message::Pong { nonce: u64::MAX },
        Message::Error {
            code: ErrorCode::RateLimited,
            message: "too many creates".into(),
            doc: Some(bodies::world::world().docs[0].0),
        },
    ]);
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for message in &frames {
        // A few of each kind: enough to show the fuzzer every variant and payload.
        let n = seen.entry(message.kind()).or_default();
        *n += 1;
        if *n <= 6 {
            let frame = protocol::encode(message);
            write(
                "frame_decode",
                &format!("{}-{n}", message.kind()),
                &frame_decode::input(&frame),
            );
        }
    }

    // bundle_decode: the world's own export, a peer's after edits, partial exports, an
    // unrelated replica's.
    let world = bodies::world::open();
    write(
        "bundle_decode",
        "world-all",
        &world.replica.export_bundle(&BundleScope::All).unwrap(),
    );
    let peer = bodies::world::open_records(&bodies::world::Kv::new(), 2);
    peer.replica
        .import_bundle(&world.replica.export_bundle(&BundleScope::All).unwrap())
        .unwrap();
    let since = peer.replica.last_seq();
    let docs = &bodies::world::world().docs;
    peer.replica
        .update(&docs[0].0, json!({"title": "changed", "n": 9.5}))
        .unwrap();
    peer.replica.delete(&docs[3].0).unwrap();
    peer.replica
        .create("todos", json!({"fresh": [1, {"a": null}]}))
        .unwrap();
    for (name, scope) in [
        ("peer-all", BundleScope::All),
        ("peer-notes", BundleScope::Collection("notes".into())),
        ("peer-since", BundleScope::Since(since)),
    ] {
        write(
            "bundle_decode",
            name,
            &peer.replica.export_bundle(&scope).unwrap(),
        );
    }
    let other = bodies::world::open_records(&bodies::world::Kv::new(), 3);
    other.replica.create("todos", json!({"x": 1})).unwrap();
    write(
        "bundle_decode",
        "unrelated",
        &other.replica.export_bundle(&BundleScope::All).unwrap(),
    );

    // json_automerge: documents as JSON text, merge patches, Automerge bytes.
    let texts = [
        (
            "object",
            r#"{"title":"milk","done":false,"n":1,"tags":["a","b"],"x":null}"#,
        ),
        (
            "numbers",
            r#"{"i":-9223372036854775808,"u":18446744073709551615,"f":1.0,"e":1e300,"z":-0.0,"small":5e-324,"p":0.1}"#,
        ),
        (
            "nested",
            r#"{"a":{"b":{"c":[[],{},[{"d":"\u00e9\ud83d\ude00"}]]}},"":""}"#,
        ),
        ("empty", "{}"),
        ("not-an-object", "[1,2,3]"),
        ("scalar", "\"text\""),
        (
            "patch",
            r#"[{"a":1,"b":{"c":2,"d":[1,2,3]},"e":"x"},{"a":null,"b":{"c":2.0,"d":[1,3],"f":{"g":null,"h":1}},"e":{"x":null}}]"#,
        ),
        ("patch-same", r#"[{"a":[1,{"b":2}]},{"a":[1,{"b":2}]}]"#),
    ];
    for (name, text) in texts {
        write("json_automerge", name, &json_automerge::json_input(text));
    }
    for (i, entry) in weft::Bundle::decode(&peer.replica.export_bundle(&BundleScope::All).unwrap())
        .unwrap()
        .entries
        .iter()
        .enumerate()
    {
        if let weft::BundleEntry::Document { bytes, .. } = entry {
            write(
                "json_automerge",
                &format!("automerge-{i}"),
                &json_automerge::automerge_input(bytes),
            );
        }
    }

    // amrepo_decode: every message the relay encodes, and join/request as clients write them.
    {
        use weft::protocol::amrepo::{self, Outgoing};
        let doc = weft::DocumentId::from_bytes([9; 16]);
        let frames: Vec<(&str, Vec<u8>)> = vec![
            (
                "peer",
                amrepo::encode(&Outgoing::Peer { storage_id: "s" }, "relay", "c"),
            ),
            (
                "sync",
                amrepo::encode(
                    &Outgoing::Sync {
                        doc: &doc,
                        data: b"\x42\x01\x00",
                    },
                    "c",
                    "relay",
                ),
            ),
            (
                "unavailable",
                amrepo::encode(&Outgoing::DocUnavailable { doc: &doc }, "relay", "c"),
            ),
            (
                "ephemeral",
                amrepo::encode(
                    &Outgoing::Ephemeral {
                        doc: &doc,
                        data: b"\xa1dnamecbob",
                        session_id: "x",
                        count: 7,
                    },
                    "c",
                    "relay",
                ),
            ),
            (
                "error",
                amrepo::encode(&Outgoing::Error { message: "no" }, "relay", "c"),
            ),
        ];
        for (name, frame) in frames {
            write("amrepo_decode", name, &frame);
        }
    }
}

/// Prints what an input holds, decoded the way its target reads it, and runs it:
/// `FUZZ_INPUT=path/to/<target>/file cargo test --test it -- --ignored fuzz_replay::describe --nocapture`
/// (the target is the name of the file's directory, or `FUZZ_TARGET`).
#[test]
#[ignore = "a debugging aid: set FUZZ_INPUT"]
fn describe() {
    let Ok(path) = std::env::var("FUZZ_INPUT") else {
        return;
    };
    let path = PathBuf::from(path);
    let target = std::env::var("FUZZ_TARGET").unwrap_or_else(|_| {
        let dir = path
            .parent()
            .and_then(|p| p.file_name())
            .unwrap_or_default();
        dir.to_string_lossy().into_owned()
    });
    let data = std::fs::read(&path).expect("FUZZ_INPUT reads");
    println!("{target}: {} bytes", data.len());
    match target.as_str() {
        "amrepo_decode" => {
            println!("{:#?}", weft::protocol::amrepo::decode(&data));
            amrepo_decode::check(&data);
        }
        "frame_decode" => {
            if let Some((&selector, frame)) = data.split_first() {
                let limit = frame_decode::limit_of(selector);
                println!("limit {limit}: {:#?}", weft::protocol::decode(frame, limit));
            }
            frame_decode::check(&data);
        }
        "bundle_decode" => {
            println!("{:#?}", weft::Bundle::decode(&data));
            if let Some(fixed) = bundle_decode::with_valid_header(&data) {
                println!("with a valid header: {:#?}", weft::Bundle::decode(&fixed));
            }
            bundle_decode::check(&data);
        }
        "engine_messages" => {
            if let Some((setup, ops)) = engine_messages::decode_input(&data) {
                println!("{setup:?}\n{:?}", setup.access());
                for mut op in ops {
                    if let engine_messages::Op::Message(m) = &mut op {
                        engine_messages::remap(m);
                    }
                    println!("{op:?}");
                }
            }
            engine_messages::check(&data);
        }
        "json_automerge" => {
            println!(
                "mode {:?}: {:?}",
                data.first(),
                String::from_utf8_lossy(&data[1.min(data.len())..])
            );
            json_automerge::check(&data);
        }
        other => panic!("unknown target {other:?}"),
    }
}
