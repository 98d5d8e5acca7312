//! Bundle files: manual sync between replicas that never talk over a network.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic   8 bytes  "WEFTBNDL"
//! version u16      format version (this code writes and reads 1)
//! flags   u16      0 (reserved)
//! length  u64      byte length of the body
//! crc32   u32      CRC-32 (IEEE) of the body
//! body    postcard-encoded `Body`
//! ```
//!
//! The length and checksum catch truncated and damaged files before anything is applied; the
//! version lets a newer weft write a format an older one refuses clearly. Each document entry
//! carries the Automerge bytes of the whole document plus its heads, which the importer checks
//! after loading, so damaged Automerge data is an error, not a silent partial merge.

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::id::{DocumentId, ReplicaId};

/// The bundle format version this build writes.
pub const BUNDLE_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"WEFTBNDL";
const HEADER_LEN: usize = 8 + 2 + 2 + 8 + 4;

/// Why a byte string is not a bundle this build can import.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    #[error("not a weft bundle (bad magic bytes)")]
    NotABundle,
    #[error(
        "bundle format version {found} is newer than this weft supports (up to {supported}); upgrade weft to import it"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("bundle is truncated: expected {expected} bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("bundle is corrupted: {0}")]
    Corrupted(String),
}

/// One entry of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleEntry {
    /// A live document: its whole Automerge content.
    Document {
        id: DocumentId,
        collection: String,
        heads: Vec<ChangeHash>,
        bytes: Vec<u8>,
    },
    /// A deleted document.
    Tombstone { id: DocumentId, collection: String },
}

impl BundleEntry {
    /// The document this entry is about.
    pub fn id(&self) -> DocumentId {
        match self {
            BundleEntry::Document { id, .. } | BundleEntry::Tombstone { id, .. } => *id,
        }
    }
}

/// A decoded bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The replica that exported it.
    pub source: ReplicaId,
    pub entries: Vec<BundleEntry>,
}

/// Which documents an export includes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleScope {
    /// Every document and tombstone.
    All,
    /// Documents and tombstones of one collection.
    Collection(String),
    /// Documents and tombstones changed after this change-feed sequence number.
    Since(u64),
}

#[derive(Serialize, Deserialize)]
struct Body {
    source: [u8; 16],
    entries: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
enum WireEntry {
    Document {
        id: [u8; 16],
        collection: String,
        heads: Vec<[u8; 32]>,
        bytes: Vec<u8>,
    },
    Tombstone {
        id: [u8; 16],
        collection: String,
    },
}

impl Bundle {
    /// Serializes the bundle with header and checksum.
    pub fn encode(&self) -> Vec<u8> {
        let body = Body {
            source: *self.source.as_bytes(),
            entries: self
                .entries
                .iter()
                .map(|e| match e {
                    BundleEntry::Document {
                        id,
                        collection,
                        heads,
                        bytes,
                    } => WireEntry::Document {
                        id: *id.as_bytes(),
                        collection: collection.clone(),
                        heads: heads.iter().map(|h| h.0).collect(),
                        bytes: bytes.clone(),
                    },
                    BundleEntry::Tombstone { id, collection } => WireEntry::Tombstone {
                        id: *id.as_bytes(),
                        collection: collection.clone(),
                    },
                })
                .collect(),
        };
        // Serializing plain owned data into a Vec cannot fail.
        let body = postcard::to_allocvec(&body).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&BUNDLE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses and verifies a bundle. Never panics; allocation is bounded by the input length.
    pub fn decode(bytes: &[u8]) -> Result<Bundle, BundleError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
                BundleError::Truncated {
                    expected: HEADER_LEN as u64,
                    found: bytes.len() as u64,
                }
            } else {
                BundleError::NotABundle
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(BundleError::Truncated {
                expected: HEADER_LEN as u64,
                found: bytes.len() as u64,
            });
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let version = u16_at(8);
        if version > BUNDLE_VERSION {
            return Err(BundleError::UnsupportedVersion {
                found: version,
                supported: BUNDLE_VERSION,
            });
        }
        if version == 0 {
            return Err(BundleError::Corrupted("version 0 does not exist".into()));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[12..20]);
        let body_len = u64::from_le_bytes(len);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[20..24]);
        let crc = u32::from_le_bytes(crc);
        let body = &bytes[HEADER_LEN..];
        if (body.len() as u64) < body_len {
            return Err(BundleError::Truncated {
                // A damaged length can be near u64::MAX.
                expected: (HEADER_LEN as u64).saturating_add(body_len),
                found: bytes.len() as u64,
            });
        }
        if (body.len() as u64) > body_len {
            return Err(BundleError::Corrupted(format!(
                "{} unexpected bytes after the body",
                body.len() as u64 - body_len
            )));
        }
        if crc32fast::hash(body) != crc {
            return Err(BundleError::Corrupted("checksum mismatch".into()));
        }
        let body: Body =
            postcard::from_bytes(body).map_err(|e| BundleError::Corrupted(e.to_string()))?;
        Ok(Bundle {
            source: ReplicaId::from_bytes(body.source),
            entries: body
                .entries
                .into_iter()
                .map(|e| match e {
                    WireEntry::Document {
                        id,
                        collection,
                        heads,
                        bytes,
                    } => BundleEntry::Document {
                        id: DocumentId::from_bytes(id),
                        collection,
                        heads: heads.into_iter().map(ChangeHash).collect(),
                        bytes,
                    },
                    WireEntry::Tombstone { id, collection } => BundleEntry::Tombstone {
                        id: DocumentId::from_bytes(id),
                        collection,
                    },
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            source: ReplicaId::from_bytes([9; 16]),
            entries: vec![
                BundleEntry::Document {
                    id: DocumentId::from_bytes([1; 16]),
                    collection: "todos".into(),
                    heads: vec![ChangeHash([3; 32])],
                    bytes: vec![1, 2, 3],
                },
                BundleEntry::Tombstone {
                    id: DocumentId::from_bytes([2; 16]),
                    collection: "todos".into(),
                },
            ],
        }
    }

    #[test]
    fn a_huge_body_length_is_truncation_not_a_panic() {
        // Found by fuzzing (tests/fixtures/fuzz/bundle_decode/body-length-overflow): the
        // expected size overflowed u64 in the error.
        let mut bytes = sample().encode();
        bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            Bundle::decode(&bytes),
            Err(BundleError::Truncated {
                expected: u64::MAX,
                found: bytes.len() as u64
            })
        );
    }

    #[test]
    fn round_trip() {
        let b = sample();
        assert_eq!(Bundle::decode(&b.encode()).unwrap(), b);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            let err = Bundle::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, BundleError::Truncated { .. } | BundleError::NotABundle),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut bytes = sample().encode();
        bytes[8..10].copy_from_slice(&7u16.to_le_bytes());
        let err = Bundle::decode(&bytes).unwrap_err();
        assert_eq!(
            err,
            BundleError::UnsupportedVersion {
                found: 7,
                supported: 1
            }
        );
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn flipped_bit_is_caught() {
        let bytes = sample().encode();
        for i in HEADER_LEN..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(Bundle::decode(&damaged).is_err(), "byte {i}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
            if state.is_multiple_of(3) && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(MAGIC);
            }
            let _ = Bundle::decode(&bytes);
        }
    }
}
