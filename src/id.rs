//! Identifiers: [`DocumentId`] and [`ReplicaId`].
//!
//! Both are 16 random bytes. Their text form is bs58check, the same encoding automerge-repo uses
//! for its document URLs, so ids are short, copy-paste safe and carry a checksum that catches typos.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// `N` random bytes from the operating system: the one place weft asks it (new replica ids,
/// engine seeds, backoff jitter). Everything else random comes from seeded generators.
pub fn os_random<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| Error::NoRandomness(e.to_string()))?;
    Ok(bytes)
}

/// bs58check's checksum: the first 4 bytes of SHA-256(SHA-256(payload)). (With the `sha2`
/// Automerge already uses: `bs58`'s own `check` feature would bring a second version.)
fn checksum(payload: &[u8]) -> [u8; 4] {
    use sha2::{Digest, Sha256};
    let twice = Sha256::digest(Sha256::digest(payload));
    [twice[0], twice[1], twice[2], twice[3]]
}

/// The bs58check text of `payload`.
fn encode_check(payload: &[u8]) -> String {
    let mut bytes = payload.to_vec();
    bytes.extend_from_slice(&checksum(payload));
    bs58::encode(bytes).into_string()
}

/// The payload of a bs58check text, or why it is not one.
fn decode_check(text: &str) -> Result<Vec<u8>, &'static str> {
    let mut bytes = bs58::decode(text).into_vec().map_err(|e| match e {
        bs58::decode::Error::InvalidCharacter { .. } => "not base58",
        _ => "not base58check",
    })?;
    if bytes.len() < 4 {
        return Err("not base58check");
    }
    let sum = bytes.split_off(bytes.len() - 4);
    if sum != checksum(&bytes) {
        return Err("checksum mismatch (typo?)");
    }
    Ok(bytes)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name([u8; 16]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Reads an id from a byte slice that must be exactly 16 bytes long.
            pub fn try_from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 16]>::try_from(bytes).ok().map(Self)
            }

            /// A new random id, from the operating system.
            pub fn random() -> Result<Self, Error> {
                os_random().map(Self)
            }

            /// An id derived from a seed (splitmix64): the same on every platform, for
            /// replays and tests. Real ids are random.
            pub fn from_seed(seed: u64) -> Self {
                let mut bytes = [0u8; 16];
                let mut x = seed;
                for chunk in bytes.chunks_mut(8) {
                    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = x;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
                }
                Self(bytes)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&encode_check(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                let invalid = |reason: &'static str| Error::InvalidId {
                    what: $what,
                    input: s.chars().take(64).collect(),
                    reason,
                };
                if s.len() > 64 {
                    return Err(invalid("too long"));
                }
                let bytes = decode_check(s).map_err(invalid)?;
                Self::try_from_slice(&bytes).ok_or_else(|| invalid("wrong length, expected 16 bytes"))
            }
        }
    };
}

id_type!(
    /// The identity of a document, the same on every replica.
    DocumentId,
    "document id"
);

id_type!(
    /// The identity of a replica (one SQLite file, one browser database, one relay).
    ReplicaId,
    "replica id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_is_bs58check() {
        // Fixed values, as automerge-repo (and the `bs58` crate's check feature) write them.
        assert_eq!(
            DocumentId::from_bytes([7; 16]).to_string(),
            "6gMHXjsZ5cxdn4qSbgGYYY8CnKK"
        );
        assert_eq!(
            DocumentId::from_bytes(*b"0123456789abcdef").to_string(),
            "fwaoKqDyZ5CbBM9gJn6sXgFZrfo"
        );
    }

    #[test]
    fn text_form_round_trips() {
        let id = DocumentId::from_bytes([7; 16]);
        let text = id.to_string();
        assert_eq!(text.parse::<DocumentId>().unwrap(), id);
    }

    #[test]
    fn typo_is_caught_by_checksum() {
        let text = DocumentId::from_bytes([1; 16]).to_string();
        let mut chars: Vec<char> = text.chars().collect();
        chars[3] = if chars[3] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        let err = typo.parse::<DocumentId>().unwrap_err().to_string();
        assert!(err.contains("document id"), "{err}");
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in ["", "0OIl", "abc", &"x".repeat(200)] {
            assert!(bad.parse::<DocumentId>().is_err(), "{bad:?}");
        }
    }
}
