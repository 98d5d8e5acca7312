//! Which collections a hook, subscription or replication session covers.

use serde::{Deserialize, Serialize};

/// Which collections a hook or subscription sees.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Every collection.
    #[default]
    All,
    /// Only these collections.
    Collections(Vec<String>),
}

impl Scope {
    /// One collection.
    pub fn collection(name: impl Into<String>) -> Self {
        Scope::Collections(vec![name.into()])
    }

    /// Whether a collection is in scope.
    pub fn contains(&self, collection: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Collections(names) => names.iter().any(|n| n == collection),
        }
    }
}

/// What a replication session may do: the collections it reads and the ones it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The collections the peer sees: their catalog, documents and live changes.
    pub read: Scope,
    /// The collections the peer may change: send changes, create and delete documents. Only
    /// collections that are also readable count (the session sees nothing else).
    pub write: Scope,
    /// How many documents the peer may create; `None`: no limit.
    pub creates: Option<CreateLimit>,
    /// Which documents of the read scope the session follows.
    pub interest: Interest,
    /// How other sessions see this peer as the sender of ephemeral messages (automerge-repo's
    /// `senderId`); `None`: its replica id.
    pub label: Option<String>,
}

/// Which documents of its read scope a session follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interest {
    /// All of them: reconciliation covers the whole scope and every live change in it is
    /// pushed (weft's own sessions).
    #[default]
    Catalog,
    /// Only those the peer asked about in this session, by a sync message: live changes and
    /// ephemeral messages of those, no reconciliation, and documents sent as sync messages,
    /// never whole. A document the peer asks about that is not here for it (absent, deleted,
    /// another collection, unreadable) is reported as
    /// [`PeerEvent::Unavailable`](crate::engine::PeerEvent::Unavailable). The sessions of
    /// automerge-repo clients, which open documents one by one.
    OnDemand {
        /// The peer's sync states outlive the session, stored under its replica id (an
        /// automerge-repo client that names its storage); otherwise they are forgotten at
        /// its end.
        durable: bool,
    },
}

/// How many documents a session may create: up to `burst` at once (a replica's first sync of
/// the data set it already has), then `per_minute` sustained (a token bucket). Creates beyond
/// it are refused per document with `RateLimited`; the client offers them again later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateLimit {
    pub per_minute: u32,
    /// How many at once; 0: `per_minute`.
    pub burst: u32,
}

impl CreateLimit {
    /// How many documents may be created at once.
    pub fn at_once(&self) -> u32 {
        if self.burst == 0 {
            self.per_minute
        } else {
            self.burst
        }
    }
}

impl Access {
    /// Read and write `scope`, no create limit (replicas syncing with a relay they trust).
    pub fn full(scope: Scope) -> Self {
        Access {
            read: scope.clone(),
            write: scope,
            creates: None,
            interest: Interest::Catalog,
            label: None,
        }
    }
}

impl From<Scope> for Access {
    fn from(scope: Scope) -> Self {
        Access::full(scope)
    }
}
