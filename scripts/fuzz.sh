#!/usr/bin/env bash
# One fuzzing campaign: scripts/fuzz.sh TARGET [SECONDS]   (SECONDS defaults to 600)
# TARGET: frame_decode | bundle_decode | engine_messages | json_automerge | amrepo_decode
# (fuzz/Cargo.toml).
#
# How (BENCHMARKS.md "Fuzzing" has the numbers): cargo-fuzz on the stable toolchain with
# RUSTC_BOOTSTRAP=1 (it passes -Z flags to rustc), one job, debug assertions and overflow checks
# on (-a), no sanitizer by default (weft and its dependencies are safe Rust; AddressSanitizer made
# engine_messages 13x slower). It starts from the seeds (fuzz/seeds/TARGET/, real inputs written
# by tests/it/fuzz_replay.rs) and the committed corpus (fuzz/corpus/TARGET/); new inputs go to
# fuzz/work/TARGET/ (not committed). Afterwards the corpus and the new inputs are minimized
# together into fuzz/corpus/TARGET/ (cargo fuzz cmin) by edge coverage (-use_counters=0: every
# edge stays covered, hit counts are not kept, which makes the committed corpus 3-5x smaller;
# fuzz/work/ keeps the full set for the next campaign). A crash stops the
# campaign: the input is in fuzz/artifacts/TARGET/ (minimize it with cargo fuzz tmin, make it a
# fixture under tests/fixtures/fuzz/TARGET/; tests/it/fuzz_replay.rs replays those).
#
# Knobs: FUZZ_SANITIZER (none; "address" for ASan), FUZZ_CMIN=0 (leave the corpus alone),
# extra libFuzzer flags in FUZZ_ARGS (e.g. "-seed=1"). engine_messages reads
# WEFT_FUZZ_ACCESS=1 (check the access invariants; off by default) and WEFT_FUZZ_SKIP_KNOWN=0
# (stop keeping the known, reported engine bugs out of the inputs; on by default, so campaigns
# find other bugs): fuzz/bodies/engine_messages.rs.
# The log is fuzz/work/TARGET.log. Not part of CI; needs `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}
seconds=${2:-600}
sanitizer=${FUZZ_SANITIZER:-none}
command -v cargo-fuzz >/dev/null || {
    echo "error: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
}
mkdir -p "fuzz/work/$target" "fuzz/corpus/$target" "fuzz/seeds/$target"
log="fuzz/work/$target.log"

cargo fuzz build -a -s "$sanitizer" "$target"
echo "fuzzing $target for ${seconds}s (sanitizer: $sanitizer, log: $log)"
status=0
# shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
cargo fuzz run -a -s "$sanitizer" "$target" "fuzz/work/$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?

grep -E '^#[0-9]+[[:space:]]+INITED' "$log" | tail -1 || true
grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 || true
grep -E '^stat::' "$log" || true
if [ "$status" -ne 0 ]; then
    grep -E "panicked at|^SUMMARY|Test unit written" -A1 "$log" || true
    echo "error: the campaign stopped with status $status (a crash?): see $log" >&2
    exit "$status"
fi

if [ "${FUZZ_CMIN:-1}" != 0 ]; then
    cp -n "fuzz/work/$target"/* "fuzz/corpus/$target"/ 2>/dev/null || true
    cargo fuzz cmin -a -s "$sanitizer" "$target" "fuzz/corpus/$target" -- -use_counters=0 >>"$log" 2>&1
fi
echo "corpus fuzz/corpus/$target: $(find "fuzz/corpus/$target" -type f | wc -l) files," \
    "$(cat "fuzz/corpus/$target"/* | wc -c) bytes"
