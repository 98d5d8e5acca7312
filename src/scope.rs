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
