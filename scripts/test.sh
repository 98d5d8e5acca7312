#!/usr/bin/env bash
# Every check CI runs, in one command. Installs what it needs first (the wasm32 target, clippy,
# rustfmt), so it works on a fresh machine with only rustup/cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
step() { printf '\n==> %s  (%ss so far)\n' "$*" "$SECONDS"; }

step "toolchain: wasm32 target, clippy, rustfmt"
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

step "format"
cargo fmt --all -- --check

step "clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

# weft-wasm depends on weft without default features, so this also proves the engine builds
# without IO (no SQLite, no tokio).
step "the engine builds for wasm32-unknown-unknown, without IO"
cargo build -p weft-wasm --target wasm32-unknown-unknown

step "tests"
cargo test

step "the examples run (demo, then the change-feed mirror on its output)"
demo_dir=$(mktemp -d)
cargo run --quiet --example demo -- "$demo_dir" >/dev/null
cargo run --quiet --example mirror -- "$demo_dir/phone.db" "$demo_dir/mirror.sqlite"
rm -rf "$demo_dir"

echo
echo "all checks passed in ${SECONDS}s"
