//! Catalog reconciliation: how two sides find the documents that differ.
//!
//! The *initiator* (the side that connected) announces a [`Message::Summary`] of its catalog in
//! scope. The responder compares it with its own summary; if no bucket differs it answers
//! `Entries { buckets: [] }` — "in sync" — otherwise it answers with its entries for the
//! differing buckets. The initiator diffs them against its own entries and acts per document:
//! sends it whole (the peer has none), asks for it whole (`Want`, we have none), sends a
//! tombstone, applies the peer's tombstone, or starts the Automerge sync protocol (both have
//! it, different heads). While sync traffic flows the initiator stays quiet; once a tick finds
//! the session quiet for [`RESYNC_QUIET_MS`](super::RESYNC_QUIET_MS) it announces again, until
//! the responder says "in sync" ([`PeerEvent::InSync`]). A reconnect with nothing changed costs
//! one Summary (about 2 KiB) and one empty Entries.
//!
//! Reconciliation only *decides*: a tombstone it finds is applied by `receive`, through the
//! write gate, like any tombstone in a `Sync` frame. Only the initiator acts on `Entries`, and
//! only on the answer to its own `Summary` (the role table in `session.rs`).

use std::collections::{BTreeMap, BTreeSet};

use super::receive::PeerWork;
use super::session::{PeerEvent, PeerId};
use super::{Effects, Engine, Work};
use crate::id::DocumentId;
use crate::protocol::{CatalogEntry, CatalogSummary, ErrorCode, Message, Payload, SyncItem};
use crate::scope::Scope;
use crate::store::StoreError;

/// Why the engine asks for catalog data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPurpose {
    /// Initiator: to announce our summary.
    Announce,
    /// Responder: to compare with the peer's summary.
    Compare,
    /// Responder: our entries of the differing buckets, to send.
    Reply,
    /// Initiator: our entries of the differing buckets, to diff with the peer's.
    Diff,
}

/// A catalog read the driver performs (and answers with `Input::Catalog`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogRead {
    pub peer: PeerId,
    pub scope: Scope,
    /// `None`: the summary; `Some(buckets)`: the entries of these buckets.
    pub buckets: Option<Vec<u8>>,
    pub purpose: ReadPurpose,
}

/// The answer to a [`CatalogRead`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogAnswer {
    Summary(CatalogSummary),
    Entries(Vec<CatalogEntry>),
}

impl Engine {
    /// Initiator: asks for our summary, to announce it.
    pub(crate) fn announce(&mut self, peer: PeerId, fx: &mut Effects) {
        let now = self.now;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.announced = true;
            p.busy = false;
            // Documents refused for a while (a create limit) whose time has come are in this
            // round; the next retry is for those still waiting.
            p.rejected.retain(|_, until| *until > now);
            p.retry_at = p
                .rejected
                .values()
                .copied()
                .filter(|until| *until != i64::MAX)
                .min();
            fx.catalog_reads.push(CatalogRead {
                peer,
                scope: p.scope.clone(),
                buckets: None,
                purpose: ReadPurpose::Announce,
            });
        }
    }

    /// Responder: the initiator's summary; ours is read to compare.
    pub(crate) fn on_summary(&mut self, peer: PeerId, buckets: Vec<u64>, fx: &mut Effects) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.their_summary = Some(buckets);
            fx.catalog_reads.push(CatalogRead {
                peer,
                scope: p.scope.clone(),
                buckets: None,
                purpose: ReadPurpose::Compare,
            });
        }
    }

    /// Initiator: the responder's answer to our summary. Empty: in sync. Otherwise its entries
    /// of the differing buckets; ours of the same buckets are read to diff. Entries outside
    /// the buckets it names, or outside our scope, are dropped.
    pub(crate) fn on_entries(
        &mut self,
        peer: PeerId,
        buckets: Vec<u8>,
        entries: Vec<CatalogEntry>,
        fx: &mut Effects,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.announced = false;
        if buckets.is_empty() {
            if !p.busy {
                fx.peer_events.push((peer, PeerEvent::InSync));
            }
            return;
        }
        let named: BTreeSet<u8> = buckets.into_iter().collect();
        let entries = entries
            .into_iter()
            .filter(|e| named.contains(&crate::protocol::bucket_of(&e.id)))
            .filter(|e| p.scope.contains(&e.collection))
            .collect();
        p.their_entries = Some(entries);
        fx.catalog_reads.push(CatalogRead {
            peer,
            scope: p.scope.clone(),
            buckets: Some(named.into_iter().collect()),
            purpose: ReadPurpose::Diff,
        });
    }

    pub(crate) fn catalog_answer(
        &mut self,
        peer: PeerId,
        purpose: ReadPurpose,
        answer: Result<CatalogAnswer, StoreError>,
        fx: &mut Effects,
    ) {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(?peer, error = %e, "catalog read failed");
                fx.send.push((
                    peer,
                    Message::Error {
                        code: ErrorCode::Internal,
                        message: format!("catalog read failed: {e}"),
                        doc: None,
                    },
                ));
                return;
            }
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match (purpose, answer) {
            (ReadPurpose::Announce, CatalogAnswer::Summary(ours)) => {
                fx.send.push((
                    peer,
                    Message::Summary {
                        count: ours.count,
                        buckets: ours.buckets,
                    },
                ));
            }
            (ReadPurpose::Compare, CatalogAnswer::Summary(ours)) => {
                let theirs = p.their_summary.take().unwrap_or_default();
                let differing = ours.differing(&theirs);
                if differing.is_empty() {
                    fx.send.push((
                        peer,
                        Message::Entries {
                            buckets: Vec::new(),
                            entries: Vec::new(),
                        },
                    ));
                } else {
                    p.reply_buckets = differing.clone();
                    fx.catalog_reads.push(CatalogRead {
                        peer,
                        scope: p.scope.clone(),
                        buckets: Some(differing),
                        purpose: ReadPurpose::Reply,
                    });
                }
            }
            (ReadPurpose::Reply, CatalogAnswer::Entries(entries)) => {
                let buckets = std::mem::take(&mut p.reply_buckets);
                fx.send.push((peer, Message::Entries { buckets, entries }));
            }
            (ReadPurpose::Diff, CatalogAnswer::Entries(ours)) => {
                let theirs = p.their_entries.take().unwrap_or_default();
                self.diff(peer, ours, theirs, fx);
            }
            (purpose, _) => tracing::error!(?peer, ?purpose, "catalog answer of the wrong kind"),
        }
    }

    /// Decides, document by document, what reconciliation found.
    fn diff(
        &mut self,
        peer: PeerId,
        ours: Vec<CatalogEntry>,
        theirs: Vec<CatalogEntry>,
        fx: &mut Effects,
    ) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let mut both: BTreeMap<DocumentId, (Option<CatalogEntry>, Option<CatalogEntry>)> =
            BTreeMap::new();
        for e in ours {
            let id = e.id;
            both.entry(id).or_default().0 = Some(e);
        }
        for e in theirs {
            let id = e.id;
            both.entry(id).or_default().1 = Some(e);
        }
        // Whether reconciliation found something to exchange: documents the peer refused are
        // left out, and if they are all that differs the session is as in sync as it can be.
        let mut work = false;
        for (id, pair) in both {
            if p.refused(&id, now) {
                continue;
            }
            work |= !matches!(&pair, (Some(o), Some(t)) if o.digest == t.digest);
            match pair {
                (Some(o), Some(t)) if o.digest == t.digest => {}
                (Some(o), _) if o.deleted => p.outbox.push(SyncItem {
                    id,
                    collection: o.collection,
                    payload: Payload::Tombstone,
                }),
                // Applied by `receive`, through the write gate.
                (_, Some(t)) if t.deleted => self.queue.push_back(Work::Peer(
                    peer,
                    PeerWork::Receive(SyncItem {
                        id,
                        collection: t.collection,
                        payload: Payload::Tombstone,
                    }),
                )),
                (Some(_), None) => {
                    if self.docs.contains_key(&id) {
                        self.queue
                            .push_back(Work::Peer(peer, PeerWork::SendWhole(id)));
                    } else {
                        fx.whole_reads.push((peer, id));
                    }
                }
                (None, Some(t)) => p.outbox.push(SyncItem {
                    id,
                    collection: t.collection,
                    payload: Payload::Want,
                }),
                (Some(_), Some(_)) => self
                    .queue
                    .push_back(Work::Peer(peer, PeerWork::SendSync(id))),
                (None, None) => {}
            }
        }
        if work {
            p.busy = true;
        } else if !p.busy {
            fx.peer_events.push((peer, PeerEvent::InSync));
        }
    }
}
