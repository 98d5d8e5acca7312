//! # weft
//!
//! An offline-first replication engine for JSON-like documents. Every replica keeps its documents
//! as [Automerge](https://automerge.org) CRDTs in a SQLite file (IndexedDB in the browser), so
//! copies edited independently always merge without losing a write.
//!
//! ```no_run
//! use serde_json::json;
//! use weft::{Replica, Scope};
//!
//! # fn main() -> weft::Result<()> {
//! let replica = Replica::open("app.db")?;
//! let id = replica.create("todos", json!({"title": "buy milk", "done": false}))?;
//! replica.update(&id, json!({"done": true}))?;          // RFC 7386 merge patch
//! let doc = replica.get(&id)?;
//! assert_eq!(doc.body["done"], json!(true));
//!
//! // React to every committed change (local or merged from elsewhere).
//! let _hook = replica.on_change(Scope::collection("todos"), |event| {
//!     println!("{} {:?} {}", event.seq, event.kind, event.id);
//! });
//!
//! // Manual sync by file.
//! let bundle = replica.export_bundle(&weft::BundleScope::All)?;
//! let other = Replica::open("other.db")?;
//! other.import_bundle(&bundle)?;
//! # Ok(()) }
//! ```
//!
//! ## How it is built
//!
//! The core is [`engine::Engine`], a sans-IO state machine: `handle(now, input) -> Effects`.
//! It owns the Automerge documents and turns commands into storage writes and change events, but
//! never performs IO itself: no files, sockets, clocks or OS randomness. [`Replica`] drives it
//! over SQLite ([`store::sqlite`]); the wasm build drives the same engine over IndexedDB.
//! See ARCHITECTURE.md for the invariants.

pub mod bundle;
pub mod engine;
pub mod error;
mod hooks;
pub mod id;
pub mod json;
pub mod limits;
#[cfg(feature = "net")]
pub mod net;
pub mod protocol;
pub mod query;
mod replica;
pub mod scope;
pub mod store;
#[cfg(feature = "sqlite")]
pub mod track;

pub use automerge;
pub use automerge::ChangeHash;
pub use bundle::{Bundle, BundleEntry, BundleError, BundleScope};
pub use engine::{ChangeEvent, ChangeKind, ImportReport, Origin, validate_collection};
pub use error::{Error, Result};
pub use hooks::{HookGuard, Subscription};
pub use id::{DocumentId, ReplicaId};
pub use json::{JsonError, Path, PathSeg};
pub use limits::{LimitError, Limits};
pub use query::{CmpOp, FieldPath, Filter, Query};
pub use replica::{
    Clock, CompactReport, Document, Durability, Replica, ReplicaOptions, SessionFailure,
    SessionInput,
};
pub use scope::{Access, CreateLimit, Interest, Scope};
pub use store::{StoreError, StoreMode};
