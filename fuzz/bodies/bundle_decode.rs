//! `bundle_decode`: the bundle decoder and the importer behind it.
//!
//! Input: bundle file bytes. Invariants:
//! - `Bundle::decode` never panics;
//! - a decoded bundle re-encodes to bytes that decode to the same bundle;
//! - importing it into the world replica (a `Replica` over `MemStore`) never panics; a failed
//!   import commits nothing and changes nothing a reader can see; a successful import is
//!   idempotent (importing it again commits nothing); and a replica restored from the journal
//!   shows what the live one shows.
//!
//! The fuzzer cannot keep a CRC-32 right while it mutates a body, so after checking the bytes as
//! they are, the body also checks them with the header's length and checksum recomputed: that
//! is what lets it reach the postcard body and the importer.

use weft::{Bundle, BundleError};

use super::world;

const HEADER_LEN: usize = 24;

/// `data` with the header's body length and CRC-32 made to match its body (when it has the
/// magic and a whole header).
pub fn with_valid_header(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER_LEN || &data[..8] != b"WEFTBNDL" {
        return None;
    }
    let mut fixed = data.to_vec();
    let body = &data[HEADER_LEN..];
    fixed[12..20].copy_from_slice(&(body.len() as u64).to_le_bytes());
    fixed[20..24].copy_from_slice(&crc32(body).to_le_bytes());
    Some(fixed)
}

/// CRC-32 (IEEE), bitwise: the bodies do not depend on crc32fast.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub fn check(data: &[u8]) {
    let raw = Bundle::decode(data);
    if let Ok(bundle) = &raw {
        import(data, bundle);
        return;
    }
    if let Some(fixed) = with_valid_header(data)
        && fixed != data
    {
        match Bundle::decode(&fixed) {
            Ok(bundle) => import(&fixed, &bundle),
            Err(BundleError::Truncated { .. }) => {
                panic!("a bundle with a valid length is truncated")
            }
            Err(_) => {}
        }
    }
}

fn import(bytes: &[u8], bundle: &Bundle) {
    let again = Bundle::decode(&bundle.encode()).expect("a re-encoded bundle decodes");
    assert_eq!(&again, bundle, "a bundle changed in a re-encode round trip");

    let mut w = world::open();
    let before = world::view(&w.replica);
    match w.replica.import_bundle(bytes) {
        Err(e) => {
            assert_eq!(w.persist(), 0, "a failed import ({e}) committed records");
            assert_eq!(
                world::view(&w.replica),
                before,
                "a failed import ({e}) changed the replica"
            );
        }
        Ok(_) => {
            w.persist();
            let after = world::view(&w.replica);
            let second = w.replica.import_bundle(bytes);
            assert!(
                second.is_ok(),
                "a bundle imported once fails the second time: {second:?}"
            );
            assert_eq!(w.persist(), 0, "importing a bundle twice committed records");
            assert_eq!(
                world::view(&w.replica),
                after,
                "importing a bundle twice changed the replica"
            );
        }
    }
    w.check_restores();
}
