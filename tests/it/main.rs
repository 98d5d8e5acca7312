//! The integration tests, as one test binary (`cargo test --test it`; Cargo finds it as
//! `tests/it/main.rs`). Each module is what used to be a test binary of its own
//! (`tests/NAME.rs`); one binary links the crate and its dependencies once instead of once per
//! file, which was most of the test build's time (README, "Testing").
//!
//! A test's name is `MODULE::TEST`: `cargo test --test it relay_shell::` runs one former file,
//! `cargo test --test it -- --exact crash::kill_9_loses_no_acknowledged_write` one test.
//! Shared helpers: `tests/support` (processes, seeds, the relay harness, hostile documents, a
//! faulty store) and `tests/common` (temporary replicas, database snapshots).

#[path = "../common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod adversary;
mod amrepo;
mod api;
mod auth;
mod bad_input;
mod bundles;
mod catalog;
mod cli;
mod cli_messages;
mod compact;
mod convergence;
mod crash;
mod ephemeral;
mod faults;
mod fuzz_replay;
mod limits;
mod mem_store;
#[cfg(feature = "postgres")]
mod postgres;
mod read_only;
mod relay_security;
mod relay_shell;
mod relay_sync;
mod shared_file;
mod sim;
mod tls;
mod track;

/// Every file in `tests/it/` is a module of this binary: a file without its `mod` line above
/// would be compiled by nobody and its tests silently never run.
#[test]
fn every_test_file_is_a_module() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs")
            && name != "main"
            && !main.contains(&format!("\nmod {name};\n"))
        {
            missing.push(name.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "tests/it/ files without `mod NAME;` in main.rs: {missing:?}"
    );
    // And nothing is left at the top of tests/, where Cargo would build it as a binary of its
    // own (linking everything once more).
    let top: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    assert!(top.is_empty(), "test files outside tests/it/: {top:?}");
}
