//! `amrepo_decode`: the decoder of automerge-repo's WebSocket protocol (`/automerge`).
//!
//! Input: one frame. Invariants:
//! - `decode` never panics, whatever the bytes (depth and value-count bounds hold);
//! - a decoded `sync`, `doc-unavailable`, `ephemeral` or `error` re-encodes (as the relay
//!   encodes them) to a frame that decodes to the same message.

use weft::protocol::amrepo::{self, Incoming, Outgoing};

pub fn check(data: &[u8]) {
    let Ok(message) = amrepo::decode(data) else {
        return;
    };
    let again = |out: &Outgoing<'_>| {
        let frame = amrepo::encode(out, "sender", "target");
        amrepo::decode(&frame).unwrap_or_else(|e| panic!("a re-encoded frame does not decode: {e}"))
    };
    let expected = match &message {
        Incoming::Sync { doc, data } => again(&Outgoing::Sync { doc, data }),
        Incoming::DocUnavailable { doc } => again(&Outgoing::DocUnavailable { doc }),
        Incoming::Ephemeral {
            doc,
            data,
            sender_id,
        } => {
            let frame = amrepo::encode(
                &Outgoing::Ephemeral {
                    doc,
                    data,
                    session_id: "s",
                    count: 1,
                },
                sender_id.as_deref().unwrap_or(""),
                "target",
            );
            let mut again = amrepo::decode(&frame)
                .unwrap_or_else(|e| panic!("a re-encoded frame does not decode: {e}"));
            if sender_id.is_none() {
                // Encoded with an empty sender: the same message but for that.
                if let Incoming::Ephemeral { sender_id: s, .. } = &mut again {
                    *s = None;
                }
            }
            again
        }
        Incoming::Error { message } => again(&Outgoing::Error { message }),
        _ => return,
    };
    assert_eq!(
        expected, message,
        "a message changed in a re-encode round trip"
    );
}
