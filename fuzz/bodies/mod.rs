//! The fuzz targets' bodies, shared by the libFuzzer binaries (`fuzz/fuzz_targets/`) and the
//! replay test (`tests/it/fuzz_replay.rs`), so a corpus file or crash fixture is checked exactly
//! the same way in both. Each `check(data)` panics when an invariant does not hold.

pub mod amrepo_decode;
pub mod bundle_decode;
pub mod engine_messages;
pub mod frame_decode;
pub mod json_automerge;
pub mod world;
