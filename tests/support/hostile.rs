//! Hostile Automerge data, built by hand in milliseconds: a document nested arbitrarily deep and
//! a list of arbitrarily many elements, each as one Automerge change chunk. Automerge accepts a
//! change chunk wherever it takes document bytes (`Automerge::load`, a bundle entry, a `Whole`
//! sync item) and in a sync message's changes, so these are what a hostile writer can send.
//!
//! Built through Automerge itself, a 10-million-element list takes 20 s and 3.8 GB; written
//! column by column (the Automerge binary format's run-length encoding) it is ~115 bytes for
//! any length, because every run is one count and one value. `tests/limits.rs` checks that, for
//! small sizes, these are byte for byte the changes Automerge makes for the same operations, so
//! the large ones are the real thing.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use weft::ChangeHash;
use weft::automerge::sync;

/// The actor of every hostile change (any 16 bytes do).
pub const ACTOR: [u8; 16] = *b"hostile-writer!!";

/// A change chunk whose operations nest `depth` maps: `{"a": {"a": ... {}}}` with `depth`
/// objects below the root (the root counts as one more level). Returns the chunk and its hash
/// (the document's heads).
pub fn deep_maps(depth: u64) -> (Vec<u8>, ChangeHash) {
    assert!(depth >= 1);
    let n = depth;
    // Operation i (counter i, from 1) is a makeMap at key "a" of the object made by i - 1
    // (the root for i = 1).
    let mut obj_actor = Rle::default();
    obj_actor.nulls(1);
    obj_actor.run(n - 1, &uleb_bytes(0));
    let mut obj_ctr = Rle::default();
    obj_ctr.nulls(1);
    for ctr in 1..n {
        obj_ctr.run(1, &uleb_bytes(ctr));
    }
    let mut key_str = Rle::default();
    key_str.run(n, &string_bytes("a"));
    let mut insert = Vec::new();
    uleb(&mut insert, n); // n times false
    let mut action = Rle::default();
    action.run(n, &uleb_bytes(ACTION_MAKE_MAP));
    let mut value_meta = Rle::default();
    value_meta.run(n, &uleb_bytes(0));
    let mut pred = Rle::default();
    pred.run(n, &uleb_bytes(0));
    change_chunk(&[
        (0x01, obj_actor.finish()),
        (0x02, obj_ctr.finish()),
        (0x15, key_str.finish()),
        (0x34, insert),
        (0x42, action.finish()),
        (0x56, value_meta.finish()),
        (0x70, pred.finish()),
    ])
}

/// A change chunk making `{"l": [null, null, ...]}` with `len` nulls (`len >= 2`).
pub fn long_list(len: u64) -> (Vec<u8>, ChangeHash) {
    assert!(len >= 2);
    let n = len;
    // Operation 1: makeList at key "l" of the root. Operations 2..=n+1: insert null into the
    // list (object 1@actor), the first after the list's head, each next after the previous.
    let mut obj_actor = Rle::default();
    obj_actor.nulls(1);
    obj_actor.run(n, &uleb_bytes(0));
    let mut obj_ctr = Rle::default();
    obj_ctr.nulls(1);
    obj_ctr.run(n, &uleb_bytes(1));
    let mut key_actor = Rle::default();
    key_actor.nulls(2); // a map key, then the list's head
    key_actor.run(n - 1, &uleb_bytes(0));
    // Element ids 0 (head), 2, 3, ... n, delta-encoded: 0, 2, then n - 2 times +1.
    let mut key_ctr = Rle::default();
    key_ctr.nulls(1);
    key_ctr.run(1, &sleb_bytes(0));
    key_ctr.run(1, &sleb_bytes(2));
    key_ctr.run(n - 2, &sleb_bytes(1));
    let mut key_str = Rle::default();
    key_str.run(1, &string_bytes("l"));
    key_str.nulls(n);
    let mut insert = Vec::new();
    uleb(&mut insert, 1); // one false
    uleb(&mut insert, n); // then n true
    let mut action = Rle::default();
    action.run(1, &uleb_bytes(ACTION_MAKE_LIST));
    action.run(n, &uleb_bytes(ACTION_SET));
    let mut value_meta = Rle::default();
    value_meta.run(n + 1, &uleb_bytes(0)); // null
    let mut pred = Rle::default();
    pred.run(n + 1, &uleb_bytes(0));
    change_chunk(&[
        (0x01, obj_actor.finish()),
        (0x02, obj_ctr.finish()),
        (0x11, key_actor.finish()),
        (0x13, key_ctr.finish()),
        (0x15, key_str.finish()),
        (0x34, insert),
        (0x42, action.finish()),
        (0x56, value_meta.finish()),
        (0x70, pred.finish()),
    ])
}

/// A sync message carrying `chunk` as its changes, as a peer that has it would send.
pub fn sync_message(chunk: Vec<u8>, heads: Vec<ChangeHash>) -> Vec<u8> {
    sync::Message {
        heads,
        need: Vec::new(),
        have: vec![sync::Have::default()],
        changes: chunk.into(),
        flags: None,
        version: sync::MessageVersion::V1,
    }
    .encode()
}

const ACTION_MAKE_MAP: u64 = 0;
const ACTION_SET: u64 = 1;
const ACTION_MAKE_LIST: u64 = 2;

/// A change chunk (type 1): no dependencies, seq 1, start op 1, the given operation columns.
fn change_chunk(columns: &[(u32, Vec<u8>)]) -> (Vec<u8>, ChangeHash) {
    let columns: Vec<_> = columns
        .iter()
        .filter(|(_, data)| !data.is_empty())
        .collect();
    let mut body = Vec::new();
    uleb(&mut body, 0); // dependencies
    uleb(&mut body, ACTOR.len() as u64);
    body.extend_from_slice(&ACTOR);
    uleb(&mut body, 1); // seq
    uleb(&mut body, 1); // start op
    sleb(&mut body, 0); // time
    uleb(&mut body, 0); // message
    uleb(&mut body, 0); // other actors
    uleb(&mut body, columns.len() as u64);
    for (spec, data) in &columns {
        uleb(&mut body, u64::from(*spec));
        uleb(&mut body, data.len() as u64);
    }
    for (_, data) in &columns {
        body.extend_from_slice(data);
    }
    let mut hashed = vec![1u8]; // chunk type: change
    uleb(&mut hashed, body.len() as u64);
    hashed.extend_from_slice(&body);
    let hash: [u8; 32] = Sha256::digest(&hashed).into();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83];
    chunk.extend_from_slice(&hash[..4]);
    chunk.extend_from_slice(&hashed);
    (chunk, ChangeHash(hash))
}

/// Run-length encoding as Automerge writes it (canonical: Automerge re-derives a change's bytes
/// and hash when it saves a document, and a change encoded any other way, though accepted,
/// makes the saved document fail to load): a value repeated at least twice is a run
/// (`count`, value), single values gather into one literal run (`-count`, values...), nulls
/// are a null run (0, `count`). Values come encoded.
/// A column holding only nulls is left out, as Automerge does.
#[derive(Default)]
struct Rle {
    out: Vec<u8>,
    literal: Vec<Vec<u8>>,
    values: bool,
}

impl Rle {
    fn run(&mut self, count: u64, value: &[u8]) {
        self.values |= count > 0;
        match count {
            0 => {}
            1 => self.literal.push(value.to_vec()),
            _ => {
                self.flush();
                sleb(&mut self.out, count as i64);
                self.out.extend_from_slice(value);
            }
        }
    }

    fn nulls(&mut self, count: u64) {
        self.flush();
        sleb(&mut self.out, 0);
        uleb(&mut self.out, count);
    }

    fn flush(&mut self) {
        if !self.literal.is_empty() {
            sleb(&mut self.out, -(self.literal.len() as i64));
            for value in self.literal.drain(..) {
                self.out.extend_from_slice(&value);
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.flush();
        if !self.values {
            self.out.clear();
        }
        self.out
    }
}

fn uleb_bytes(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    uleb(&mut out, value);
    out
}

fn sleb_bytes(value: i64) -> Vec<u8> {
    let mut out = Vec::new();
    sleb(&mut out, value);
    out
}

fn string_bytes(s: &str) -> Vec<u8> {
    let mut out = uleb_bytes(s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

fn uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn sleb(out: &mut Vec<u8>, mut value: i64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}
