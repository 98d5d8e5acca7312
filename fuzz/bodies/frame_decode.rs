//! `frame_decode`: the wire protocol's frame decoder.
//!
//! Input: one byte choosing the size limit, then the frame. Invariants:
//! - `decode` never panics, whatever the bytes and the limit;
//! - a frame longer than the limit is `TooLarge` (checked before anything is decoded);
//! - a decoded message re-encodes to a frame no longer than the input (postcard's encoding is
//!   the shortest one) that decodes to the same message.

use weft::protocol::{self, DEFAULT_MAX_FRAME, Message, ProtocolError};

/// The limit the first input byte selects: the relay's default, or a small one (0..=2,540
/// bytes) so the size check is exercised on both sides.
pub fn limit_of(selector: u8) -> usize {
    if selector == u8::MAX {
        DEFAULT_MAX_FRAME
    } else {
        usize::from(selector) * 10
    }
}

/// A fuzz input for `frame`: the selector of the default limit, then the frame.
pub fn input(frame: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::MAX];
    out.extend_from_slice(frame);
    out
}

pub fn check(data: &[u8]) {
    let Some((&selector, frame)) = data.split_first() else {
        return;
    };
    let limit = limit_of(selector);
    match protocol::decode(frame, limit) {
        Ok(message) => {
            assert!(frame.len() <= limit, "a frame over the limit decoded");
            round_trip(frame, &message);
        }
        Err(ProtocolError::TooLarge { size, limit: l }) => {
            assert_eq!((size, l), (frame.len(), limit));
            assert!(frame.len() > limit, "TooLarge for a frame within the limit");
        }
        Err(_) => assert!(
            frame.len() <= limit,
            "a frame over the limit was looked into"
        ),
    }
}

fn round_trip(frame: &[u8], message: &Message) {
    let encoded = protocol::encode(message);
    assert!(
        encoded.len() <= frame.len(),
        "{} re-encodes to {} bytes, longer than the {} it was decoded from",
        message.kind(),
        encoded.len(),
        frame.len()
    );
    let again = protocol::decode(&encoded, DEFAULT_MAX_FRAME)
        .unwrap_or_else(|e| panic!("a re-encoded {} does not decode: {e}", message.kind()));
    assert_eq!(
        &again, message,
        "a message changed in a re-encode round trip"
    );
}
