//! The error type of every public operation.
//!
//! One enum for the crate; decode boundaries (JSON, bundles, storage) have their own enums that
//! convert into it, so a caller can match on the kind of failure without parsing messages.

use crate::bundle::BundleError;
use crate::id::DocumentId;
use crate::json::JsonError;
use crate::limits::LimitError;
use crate::store::StoreError;

/// Everything that can go wrong in a weft operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value over a size limit (an ephemeral message's data, ...).
    #[error("{what} of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// The operating system gave no randomness (needed for new replica ids and seeds).
    #[error("no OS randomness: {0}")]
    NoRandomness(String),
    /// No document with this id exists on this replica.
    #[error("document {0} not found")]
    NotFound(DocumentId),
    /// The document existed but was deleted (deletes are final and win over concurrent edits).
    #[error("document {0} was deleted")]
    Deleted(DocumentId),
    /// A document or replica id in text form could not be parsed.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidId {
        what: &'static str,
        input: String,
        reason: &'static str,
    },
    /// A collection name outside the allowed alphabet or length.
    #[error(
        "invalid collection name {0:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '-', '.', ':'"
    )]
    InvalidCollection(String),
    /// Tracking an app's table failed or was refused.
    #[cfg(feature = "sqlite")]
    #[error(transparent)]
    Track(crate::track::TrackError),
    /// The document exists in another collection than the one asked for.
    #[error("document {id} is in collection {found:?}, not {expected:?}")]
    WrongCollection {
        id: DocumentId,
        expected: String,
        found: String,
    },
    /// Invalid JSON, a non-object body, or a path that does not fit the document.
    #[error(transparent)]
    Json(#[from] JsonError),
    /// A bundle that is truncated, corrupted, or from a newer format version.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The storage layer failed; the operation was not applied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored or received Automerge bytes that do not load, or do not match their recorded heads.
    #[error("document {id} is corrupt: {reason}")]
    Corrupt { id: DocumentId, reason: String },
    /// A read "as of heads" named a change the document does not contain.
    #[error("document {id} has no change {hash}")]
    UnknownHeads { id: DocumentId, hash: String },
    /// A document, or a value written to one, is outside the structure limits
    /// ([`crate::Limits`]): too deep, too many operations, too large. Nothing was applied.
    #[error("document {}{}", id.map(|id| format!("{id} ")).unwrap_or_default(), source.phrase())]
    Limit {
        /// The document, when the refusal is about an existing or incoming one.
        id: Option<DocumentId>,
        source: LimitError,
    },
    /// A query filter that cannot be evaluated.
    #[error("invalid filter: {0}")]
    Filter(String),
    /// Automerge refused an operation (for example a wrong object type in a power-user change).
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// A bug in weft: an invariant did not hold. Please report it.
    #[error("internal error: {0}")]
    Internal(String),
    /// A power-user change function returned an error; nothing was committed.
    #[error("change function failed: {0}")]
    ChangeFn(String),
}

impl From<LimitError> for Error {
    fn from(source: LimitError) -> Self {
        Error::Limit { id: None, source }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
