//! The frame codec: header check, size limit, postcard body.

use super::Message;

/// The protocol version this build speaks (2: `Ephemeral` messages).
pub const PROTOCOL_VERSION: u8 = 2;
/// The default maximum frame size: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
const MAGIC: &[u8; 2] = b"wf";
const HEADER_LEN: usize = 3;

/// Why bytes are not a frame this build accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("not a weft frame (bad magic bytes)")]
    BadMagic,
    #[error("protocol version {found} is not supported (this build speaks {supported})")]
    Version { found: u8, supported: u8 },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a message as one frame.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    // Serializing owned plain data into a Vec cannot fail.
    postcard::to_extend(message, out).unwrap_or_default()
}

/// Decodes one frame, refusing anything longer than `max_frame` before looking inside.
pub fn decode(bytes: &[u8], max_frame: usize) -> Result<Message, ProtocolError> {
    if bytes.len() > max_frame {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            limit: max_frame,
        });
    }
    if bytes.len() < HEADER_LEN || &bytes[..2] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    if bytes[2] != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            found: bytes[2],
            supported: PROTOCOL_VERSION,
        });
    }
    let (message, rest) = postcard::take_from_bytes::<Message>(&bytes[HEADER_LEN..])
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_frame_is_tagged_5_after_the_header() {
        // wasm/js/connection.js tells frames that carry changes by this byte (to turn a
        // "synced" status back to "connected"); a new variant before `Sync` must update it.
        let frame = encode(&Message::Sync { batch: Vec::new() });
        assert_eq!(frame[3], 5);
    }
    use crate::id::{DocumentId, ReplicaId};
    use crate::protocol::{
        CatalogEntry, ErrorCode, Payload, RejectCode, SyncItem, WireScope, doc_digest,
    };
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn samples() -> Vec<Message> {
        let id = DocumentId::from_bytes([7; 16]);
        vec![
            Message::Hello {
                protocol: 1,
                replica: ReplicaId::from_bytes([1; 16]),
                token: Some("t".into()),
                scope: WireScope::All,
            },
            Message::Welcome {
                replica: ReplicaId::from_bytes([2; 16]),
                scope: WireScope::Collections(vec!["a".into()]),
                max_frame: 1 << 20,
            },
            Message::Reject {
                code: RejectCode::Unauthorized,
                reason: "expired".into(),
            },
            Message::Summary {
                count: 3,
                buckets: vec![0; 256],
            },
            Message::Entries {
                buckets: vec![1, 2],
                entries: vec![CatalogEntry {
                    id,
                    collection: "c".into(),
                    digest: 42,
                    deleted: true,
                }],
            },
            Message::Sync {
                batch: vec![
                    SyncItem {
                        id,
                        collection: "c".into(),
                        payload: Payload::Sync(vec![1, 2, 3]),
                    },
                    SyncItem {
                        id,
                        collection: "c".into(),
                        payload: Payload::Whole(vec![0; 1000]),
                    },
                    SyncItem {
                        id,
                        collection: "c".into(),
                        payload: Payload::Tombstone,
                    },
                ],
            },
            Message::Persisted {
                docs: vec![(id, vec![[5; 32]])],
            },
            Message::Ping { nonce: 9 },
            Message::Pong { nonce: 9 },
            Message::Error {
                code: ErrorCode::Forbidden,
                message: "no".into(),
                doc: Some(id),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m), DEFAULT_MAX_FRAME).unwrap(), m);
        }
    }

    #[test]
    fn bytes_are_compact() {
        let m = Message::Sync {
            batch: vec![SyncItem {
                id: DocumentId::from_bytes([0; 16]),
                collection: "c".into(),
                payload: Payload::Whole(vec![0; 1000]),
            }],
        };
        // header 3 + variant + len + id 16 + collection 2 + payload tag + len 2 + 1000
        assert!(encode(&m).len() < 1030, "{}", encode(&m).len());
    }

    #[test]
    fn limits_and_headers_are_enforced() {
        let frame = encode(&Message::Ping { nonce: 1 });
        assert_eq!(
            decode(&frame, 3),
            Err(ProtocolError::TooLarge {
                size: frame.len(),
                limit: 3
            })
        );
        assert_eq!(decode(b"xx\x01\x00", 100), Err(ProtocolError::BadMagic));
        assert_eq!(decode(b"wf", 100), Err(ProtocolError::BadMagic));
        assert_eq!(
            decode(b"wf\x09\x00", 100),
            Err(ProtocolError::Version {
                found: 9,
                supported: PROTOCOL_VERSION
            })
        );
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing, 100),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_and_mutations_never_panic() {
        let seed: u64 = std::env::var("WEFT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        eprintln!("seed = {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let frames: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        for _ in 0..20_000 {
            let mut bytes = frames[rng.random_range(0..frames.len())].clone();
            match rng.random_range(0..4) {
                0 => {
                    let len = rng.random_range(0..bytes.len());
                    bytes.truncate(len);
                }
                1 => {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
                2 => {
                    // A huge length prefix where a vector starts: must not allocate it.
                    let i = rng.random_range(HEADER_LEN..bytes.len());
                    bytes.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
                }
                _ => {
                    let len = rng.random_range(0..64);
                    bytes = vec![b'w', b'f', PROTOCOL_VERSION];
                    bytes.extend((0..len).map(|_| rng.random::<u8>()));
                }
            }
            let _ = decode(&bytes, DEFAULT_MAX_FRAME);
        }
    }

    #[test]
    fn digests_depend_on_heads_and_tombstone_not_order() {
        use automerge::ChangeHash;
        let id = DocumentId::from_bytes([3; 16]);
        let (a, b) = (ChangeHash([1; 32]), ChangeHash([2; 32]));
        assert_eq!(
            doc_digest(&id, &[a, b], false),
            doc_digest(&id, &[b, a], false)
        );
        assert_ne!(
            doc_digest(&id, &[a], false),
            doc_digest(&id, &[a, b], false)
        );
        assert_ne!(doc_digest(&id, &[a], false), doc_digest(&id, &[a], true));
        assert_eq!(
            doc_digest(&id, &[a], true),
            doc_digest(&id, &[], true),
            "tombstones ignore heads"
        );
        assert_ne!(
            doc_digest(&id, &[a], false),
            doc_digest(&DocumentId::from_bytes([4; 16]), &[a], false)
        );
    }
}
