//! automerge-repo clients on `/automerge`: the stock `WebSocketClientAdapter` of
//! `@automerge/automerge-repo-network-websocket` (protocol "1") talks to the relay's replica.
//!
//! An automerge-repo client is a replication session like any other (the same gate, limits,
//! rate limits and metrics), with two differences, both in the engine's
//! [`Interest::OnDemand`](crate::Interest::OnDemand): it opens documents one by one (`request`,
//! `sync`) instead of reconciling a catalog, and it hears only of the documents it opened. Its
//! documents are weft documents of one collection (`RelayConfig::automerge_collection`), under
//! the same ids (automerge-repo's document id is bs58check of 16 bytes, like
//! [`DocumentId`](crate::DocumentId)).
//!
//! The translation, both ways:
//!
//! | automerge-repo | weft |
//! |---|---|
//! | `join` (+ `?token=` on the URL) | the handshake: `peer`, then a session |
//! | `request`, `sync` | `Sync` item (`Payload::Sync`) in the automerge collection |
//! | `ephemeral` | `Ephemeral` |
//! | `doc-unavailable` (sent) | `PeerEvent::Unavailable`, or a tombstone (deleted) |
//! | `error` (sent) | `Error` (a refused write, a document beyond the limits...) |
//! | `leave` | the end of the session |
//! | `remote-subscription-change`, `remote-heads-changed` | ignored |
//!
//! Sync states: a client that names its storage (`peerMetadata.storageId`, not ephemeral) gets
//! them kept across sessions under a replica id derived from the storage id, as weft's own
//! peers do; an ephemeral client's are forgotten when it leaves.

mod session;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_tungstenite::tungstenite::Bytes;

use crate::protocol::amrepo::{self as wire, Outgoing};
pub(crate) use session::session;

use super::router::Frame;
use crate::ReplicaId;
use crate::protocol::{Message, Payload};

/// Encodes what the engine sends an automerge-repo session (see the module's table).
pub(crate) struct Codec {
    /// Our peer id, as the client knows it from `peer`.
    sender: String,
    /// The client's peer id, from its `join`.
    target: String,
    /// Ephemeral messages: this session's stream id and counter (automerge-repo drops a
    /// message whose count it has seen in that stream).
    session_id: String,
    count: AtomicU64,
}

impl Codec {
    pub(crate) fn new(sender: String, target: String, session_id: String) -> Self {
        Codec {
            sender,
            target,
            session_id,
            count: AtomicU64::new(0),
        }
    }

    fn frame(&self, message: &Outgoing<'_>, sync: bool) -> Frame {
        Frame {
            bytes: Bytes::from(wire::encode(message, &self.sender, &self.target)),
            sync,
        }
    }

    /// The frames for one engine message (none for what automerge-repo has no message for:
    /// `Persisted`, reconciliation).
    pub(crate) fn frames(&self, message: Message) -> Vec<Frame> {
        match message {
            Message::Sync { batch } => batch
                .iter()
                .filter_map(|item| match &item.payload {
                    Payload::Sync(data) => Some(self.frame(
                        &Outgoing::Sync {
                            doc: &item.id,
                            data,
                        },
                        true,
                    )),
                    Payload::Tombstone => {
                        Some(self.frame(&Outgoing::DocUnavailable { doc: &item.id }, false))
                    }
                    // The engine sends an on-demand session sync messages only.
                    Payload::Whole(_) | Payload::Want => {
                        tracing::error!(doc = %item.id, "a whole document for an automerge-repo session; not sent");
                        None
                    }
                })
                .collect(),
            Message::Ephemeral { doc, data, sender } => {
                // The original sender's name, so automerge-repo's presence tells peers apart;
                // the stream (session id, count) is this connection's, counted from 1, so its
                // counts rise for every sender (automerge-repo drops a count it has seen for a
                // sender and session).
                let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
                let message = Outgoing::Ephemeral {
                    doc: &doc,
                    data: &data,
                    session_id: &self.session_id,
                    count,
                };
                vec![Frame {
                    bytes: Bytes::from(wire::encode(&message, &sender, &self.target)),
                    sync: false,
                }]
            }
            Message::Error { code, message, doc } => {
                let message = match doc {
                    Some(doc) => format!("{code}: {message} (document {doc})"),
                    None => format!("{code}: {message}"),
                };
                vec![self.frame(&Outgoing::Error { message: &message }, false)]
            }
            _ => Vec::new(),
        }
    }
}

/// The replica id under which a client's sync states are kept: derived from its storage id
/// (so every tab of one browser storage shares them, as automerge-repo intends), in a space
/// of its own (a storage id can never name a weft replica's states).
pub(crate) fn storage_replica(storage_id: &str) -> ReplicaId {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"weft automerge-repo storage\0")
        .chain_update(storage_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    ReplicaId::from_bytes(bytes)
}
