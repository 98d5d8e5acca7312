#!/usr/bin/env bash
# Every check CI runs, in one command. Installs what it needs first (the wasm32 target, clippy,
# rustfmt; for the JS package wasm-bindgen-cli, Debian's Chromium and the npm packages), so it
# works on a fresh machine with rustup/cargo and Node >= 20.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# Each step prints the seconds so far and the CPU seconds the finished commands used so far:
# on 2 cores, CPU close to twice the wall time means both cores were busy.
step() {
    # `times` (a builtin) reports this shell's children: it must run here, not in a $(...)
    # subshell, which has no children of its own.
    times >"$bg_dir/times"
    printf '\n==> %s  (%ss so far, %s CPU s)\n' "$*" "$SECONDS" "$(cpu_so_far)"
}
cpu_so_far() {
    local shell children
    { read -r shell; read -r children; } <"$bg_dir/times"
    awk '{ s = 0; for (i = 1; i <= NF; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } printf "%d", s }' <<<"$children"
}

# ----- slow installs, in the background from the start ------------------------------------
# Each runs as a job with its log in $bg_dir; `wait_bg NAME` waits for it where it is needed
# and fails the script with its log if it failed. (If the script fails first, they are left
# to finish: interrupting apt-get or cargo install midway helps nobody.)
bg_dir=$(mktemp -d)
declare -A bg_pid=()
start_bg() {
    local name=$1
    shift
    (
        start=$SECONDS
        set +e
        "$@" >"$bg_dir/$name.log" 2>&1
        rc=$?
        echo "$rc $((SECONDS - start))" >"$bg_dir/$name.rc"
    ) &
    bg_pid[$name]=$!
    echo "started in the background: $name"
}
wait_bg() {
    local name=$1
    [ -n "${bg_pid[$name]:-}" ] || return 0
    wait "${bg_pid[$name]}" || true
    unset "bg_pid[$name]"
    local rc secs
    read -r rc secs <"$bg_dir/$name.rc" 2>/dev/null || { rc=1; secs=?; }
    if [ "$rc" != 0 ]; then
        echo "FAILED: $name (exit $rc after ${secs}s); its log:" >&2
        cat "$bg_dir/$name.log" >&2
        exit 1
    fi
    echo "$name: done in ${secs}s (background)"
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step "the JS toolchain: Node >= 20; installs in the background"
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
    echo "Node.js >= 20 is required for the JS package (found: $(node --version 2>/dev/null || echo none))" >&2
    exit 1
fi
# wasm-bindgen-cli must be the version the crate pins. A debug build: it compiles in half the
# time of a release build (100 s vs 190 s on 2 cores) and runs in 2 s instead of 0.3 s.
wasm_bindgen_version=$(sed -n 's/^wasm-bindgen = "=\(.*\)"$/\1/p' wasm/Cargo.toml)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$wasm_bindgen_version" ]; then
    start_bg wasm-bindgen cargo install wasm-bindgen-cli --version "$wasm_bindgen_version" --debug
fi
if [ ! -x /usr/bin/chromium ]; then
    start_bg chromium as_root env DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get update -q && apt-get install -y -q -o DPkg::Lock::Timeout=600 chromium'
fi
# A private PostgreSQL cluster for the relay's PostgreSQL tests (scripts/pg.sh: initdb into a
# temporary directory, 127.0.0.1 on a free port; Debian's postgresql-15 installed if missing),
# stopped when this script exits.
pg_dir=$(mktemp -d)
trap 'scripts/pg.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
start_bg postgres scripts/pg.sh start "$pg_dir"

if [ ! -f wasm/node_modules/.package-lock.json ] || [ wasm/package-lock.json -nt wasm/node_modules/.package-lock.json ]; then
    # npm ci refuses the lock when a registry lacks the optional native packages of cbor-x's
    # cbor-extract (npm 11: "Missing: @cbor-extract/... from lock file"; this machine kind's
    # registry has none of them); npm install then installs the same locked versions.
    start_bg npm sh -c 'cd wasm && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; }'
fi

step "toolchain: wasm32 target, clippy, rustfmt"
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

step "format"
cargo fmt --all -- --check

step "clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

# The tests' build and the wasm32 build run side by side: each ends on long stretches that keep
# one core busy (the weft crate and the test binary; the wasm's link-time optimization with one
# codegen unit), and the other fills the second core. The wasm build's target directories
# (target/wasm-release, target/wasm32-unknown-unknown) are apart from target/debug, so neither
# waits for the other's lock.
# weft-wasm depends on weft without default features, so the wasm32 build also proves the engine
# builds without IO (no SQLite, no tokio). It is the npm package's build (profile wasm-release).
step "the tests' build, beside the wasm32 build of the engine (in the background)"
start_bg wasm scripts/build-wasm.sh compile
cargo test --no-run

step "the engine builds for wasm32-unknown-unknown, without IO (the npm package's wasm)"
wait_bg wasm
grep -v -e "^ *Compiling " -e "^ *Downloaded " -e "^ *Downloading " "$bg_dir/wasm.log"

# wasm-bindgen and wasm-opt (one core, about a minute) run beside the tests.
wait_bg wasm-bindgen
wait_bg npm
start_bg package scripts/build-wasm.sh package

step "tests"
wait_bg postgres
WEFT_TEST_PG=$(tail -1 "$bg_dir/postgres.log")
export WEFT_TEST_PG
echo "PostgreSQL for the tests: $WEFT_TEST_PG"
# cargo-nextest (on these machines) runs each test as its own process, two at a time, the
# slowest first (.config/nextest.toml); it does not run doc tests, so those run apart. Without
# it: cargo test, which runs them all.
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run
    cargo test --doc
else
    cargo test
fi

step "the examples run (demo, then the change-feed mirror on its output)"
demo_dir=$(mktemp -d)
cargo run --quiet --example demo -- "$demo_dir" >/dev/null
cargo run --quiet --example mirror -- "$demo_dir/phone.db" "$demo_dir/mirror.sqlite"
rm -rf "$demo_dir"

step "the npm package (wasm-bindgen, wasm-opt -Oz)"
wait_bg package
cat "$bg_dir/package.log"

# Node: the installed package, a Node replica against `weft serve` and CLI replicas.
# Chromium (Debian's, driven by playwright-core): IndexedDB, live sync, offline + reload, the
# example page. Both use target/debug/weft from `cargo test`.
step "JS tests (Node and Chromium)"
wait_bg chromium
(cd wasm && npm test)
rm -rf "$bg_dir"

echo
echo "all checks passed in ${SECONDS}s"
