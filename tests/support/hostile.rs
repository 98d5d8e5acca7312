//! Hostile Automerge data, built by hand in milliseconds: a document nested arbitrarily deep and
//! a list of arbitrarily many elements, each as one Automerge change chunk. Automerge accepts a
//! change chunk wherever it takes document bytes (`Automerge::load`, a bundle entry, a `Whole`
//! sync item) and in a sync message's changes, so these are what a hostile writer can send.
//!
//! Built through Automerge itself, a 10-million-element list takes 20 s and 3.8 GB; written
//! column by column (the Automerge binary format's run-length encoding) it is ~50 bytes for any
//! length, because every run is one count and one value. `tests/limits.rs` checks that Automerge
//! loads these for small sizes with the expected content, so the large ones are the real thing.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use weft::ChangeHash;
use weft::automerge::sync;

/// The actor of every hostile change (any 16 bytes do).
const ACTOR: [u8; 16] = *b"hostile-writer!!";

/// A change chunk whose operations nest `depth` maps: `{"a": {"a": ... {}}}` with `depth`
/// objects below the root (the root counts as one more level). Returns the chunk and its hash
/// (the document's heads).
pub fn deep_maps(depth: u64) -> (Vec<u8>, ChangeHash) {
    assert!(depth >= 1);
    let n = depth;
    // Operation i (counter i, from 1) is a makeMap at key "a" of the object made by i - 1
    // (the root for i = 1).
    let mut obj_actor = Vec::new();
    null_run(&mut obj_actor, 1);
    if n > 1 {
        run(&mut obj_actor, n - 1, 0);
    }
    let mut obj_ctr = Vec::new();
    null_run(&mut obj_ctr, 1);
    if n > 1 {
        // Counters 1, 2, ... n - 1: a literal run.
        sleb(&mut obj_ctr, -((n - 1) as i64));
        for ctr in 1..n {
            uleb(&mut obj_ctr, ctr);
        }
    }
    let mut key_str = Vec::new();
    sleb(&mut key_str, n as i64);
    string(&mut key_str, "a");
    let mut insert = Vec::new();
    uleb(&mut insert, n); // n times false
    let mut action = Vec::new();
    run(&mut action, n, ACTION_MAKE_MAP);
    let mut value_meta = Vec::new();
    run(&mut value_meta, n, 0);
    let mut pred = Vec::new();
    run(&mut pred, n, 0);
    change_chunk(&[
        (0x01, obj_actor),
        (0x02, obj_ctr),
        (0x15, key_str),
        (0x34, insert),
        (0x42, action),
        (0x56, value_meta),
        (0x57, Vec::new()),
        (0x70, pred),
    ])
}

/// A change chunk making `{"l": [null, null, ...]}` with `len` nulls (`len >= 2`).
pub fn long_list(len: u64) -> (Vec<u8>, ChangeHash) {
    assert!(len >= 2);
    let n = len;
    // Operation 1: makeList at key "l" of the root. Operations 2..=n+1: insert null into the
    // list (object 1@actor), the first after the list's head, each next after the previous.
    let mut obj_actor = Vec::new();
    null_run(&mut obj_actor, 1);
    run(&mut obj_actor, n, 0);
    let mut obj_ctr = Vec::new();
    null_run(&mut obj_ctr, 1);
    run(&mut obj_ctr, n, 1);
    let mut key_actor = Vec::new();
    null_run(&mut key_actor, 2); // a map key, then the list's head
    run(&mut key_actor, n - 1, 0);
    // Element ids 0 (head), 2, 3, ... n, delta-encoded: 0, 2, then n - 2 times +1.
    let mut key_ctr = Vec::new();
    null_run(&mut key_ctr, 1);
    sleb(&mut key_ctr, -2);
    sleb(&mut key_ctr, 0);
    sleb(&mut key_ctr, 2);
    if n > 2 {
        sleb(&mut key_ctr, (n - 2) as i64);
        sleb(&mut key_ctr, 1);
    }
    let mut key_str = Vec::new();
    sleb(&mut key_str, 1);
    string(&mut key_str, "l");
    null_run(&mut key_str, n);
    let mut insert = Vec::new();
    uleb(&mut insert, 1); // one false
    uleb(&mut insert, n); // then n true
    let mut action = Vec::new();
    run(&mut action, 1, ACTION_MAKE_LIST);
    run(&mut action, n, ACTION_SET);
    let mut value_meta = Vec::new();
    run(&mut value_meta, n + 1, 0); // null
    let mut pred = Vec::new();
    run(&mut pred, n + 1, 0);
    change_chunk(&[
        (0x01, obj_actor),
        (0x02, obj_ctr),
        (0x11, key_actor),
        (0x13, key_ctr),
        (0x15, key_str),
        (0x34, insert),
        (0x42, action),
        (0x56, value_meta),
        (0x57, Vec::new()),
        (0x70, pred),
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
    for (spec, data) in columns {
        uleb(&mut body, u64::from(*spec));
        uleb(&mut body, data.len() as u64);
    }
    for (_, data) in columns {
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

/// A run of `count` copies of the unsigned `value`.
fn run(out: &mut Vec<u8>, count: u64, value: u64) {
    sleb(out, count as i64);
    uleb(out, value);
}

fn null_run(out: &mut Vec<u8>, count: u64) {
    sleb(out, 0);
    uleb(out, count);
}

fn string(out: &mut Vec<u8>, s: &str) {
    uleb(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
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
