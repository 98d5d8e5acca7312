//! Checks on a peer's Automerge sync message before Automerge sees it.
//!
//! Automerge 0.12 trusts the Bloom filters in a sync message's `have`: generating the reply
//! probes them, and a filter that claims entries but carries no bits makes every probe a
//! remainder by zero (a panic), while one that claims billions of probes allocates them all up
//! front (16 GiB per change hash for `u32::MAX`). A peer controls both. Found by the
//! `engine_messages` fuzz target (tests/fixtures/fuzz/engine_messages/pending/).

use automerge::sync;

/// The most probes a peer's Bloom filter may use. Automerge writes 7 (a 1% false-positive
/// rate); more than a few dozen never pays off.
pub const MAX_BLOOM_PROBES: u32 = 64;

/// Why a sync message would be unsafe to hand to Automerge, if it would be.
pub fn check_sync_message(message: &sync::Message) -> Result<(), String> {
    for have in &message.have {
        // The wire form: nothing for an empty filter, else entries, bits per entry and probes
        // (LEB128) followed by the bits.
        let bytes = have.bloom.to_bytes();
        if bytes.is_empty() {
            continue;
        }
        let mut rest = bytes.as_slice();
        let (Some(entries), Some(_bits_per_entry), Some(probes)) = (
            leb128_u32(&mut rest),
            leb128_u32(&mut rest),
            leb128_u32(&mut rest),
        ) else {
            return Err("malformed Bloom filter".into());
        };
        if entries != 0 && rest.is_empty() {
            return Err(format!("a Bloom filter of {entries} entries without bits"));
        }
        if probes > MAX_BLOOM_PROBES {
            return Err(format!(
                "a Bloom filter with {probes} probes (at most {MAX_BLOOM_PROBES})"
            ));
        }
        if rest.len() > (u32::MAX / 8) as usize {
            return Err(format!("a Bloom filter of {} bytes", rest.len()));
        }
    }
    Ok(())
}

fn leb128_u32(input: &mut &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for (i, byte) in input.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *input = &input[i + 1..];
            return u32::try_from(value).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{BloomFilter, ChunkList, Have, MessageVersion, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, Automerge, ROOT};

    fn with_bloom(bloom: &[u8]) -> sync::Message {
        sync::Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: vec![Have {
                last_sync: Vec::new(),
                bloom: BloomFilter::try_from(bloom).unwrap(),
            }],
            changes: ChunkList::empty(),
            flags: None,
            version: MessageVersion::V1,
        }
    }

    #[test]
    fn real_sync_messages_pass() {
        let mut a = AutoCommit::new();
        for i in 0..20 {
            a.put(ROOT, "n", i).unwrap();
            a.commit();
        }
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut rounds = 0;
        loop {
            let from_a = a.sync().generate_sync_message(&mut sa);
            let from_b = b.generate_sync_message(&mut sb);
            if from_a.is_none() && from_b.is_none() {
                break;
            }
            for m in from_a.iter().chain(&from_b) {
                let m = sync::Message::decode(&m.clone().encode()).unwrap();
                assert_eq!(check_sync_message(&m), Ok(()));
            }
            if let Some(m) = from_a {
                b.receive_sync_message(&mut sb, m).unwrap();
            }
            if let Some(m) = from_b {
                a.sync().receive_sync_message(&mut sa, m).unwrap();
            }
            rounds += 1;
            assert!(rounds < 10);
        }
        assert_eq!(a.get_heads(), b.get_heads());
        // Whatever Automerge itself builds passes too.
        let filter = BloomFilter::from_hashes(a.get_heads().iter());
        assert_eq!(check_sync_message(&with_bloom(&filter.to_bytes())), Ok(()));
    }

    #[test]
    fn a_filter_without_bits_is_refused_and_would_panic() {
        // 1 entry, 0 bits per entry, 7 probes.
        let message = with_bloom(&[1, 0, 7]);
        assert!(check_sync_message(&message).is_err());
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        doc.commit();
        let mut doc = doc.document().clone();
        let mut state = sync::State::new();
        doc.receive_sync_message(&mut state, message).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            doc.generate_sync_message(&mut state)
        }))
        .is_err();
        // When Automerge stops panicking here, the check can go.
        assert!(
            panicked,
            "automerge no longer panics on a filter without bits"
        );
    }

    #[test]
    fn too_many_probes_are_refused() {
        // 1 entry, 8 bits per entry (one byte), u32::MAX probes.
        let message = with_bloom(&[1, 8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0]);
        assert!(check_sync_message(&message).unwrap_err().contains("probes"));
        let message = with_bloom(&[1, 8, MAX_BLOOM_PROBES as u8, 0]);
        assert_eq!(check_sync_message(&message), Ok(()));
    }
}
