#!/usr/bin/env bash
# Soak run of the adversarial model test (tests/it/adversary.rs): the same generator and checks
# as `cargo test --test it adversary::`, in release, 100,000 frame sequences (a fresh relay every
# 5,000), with a progress line every 1,000. Bounded by the count only: 100,000 took 6 min on
# 2 cores shared with other builds, plus the release build. It ends with the same report as
# the test (every kind of violation, with the first sequence that showed it). Knobs:
#   WEFT_ADVERSARY_SEQUENCES    sequences to run (100000)
#   WEFT_ADVERSARY_PROGRESS     progress line every this many sequences (1000)
#   WEFT_ADVERSARY_RELAY_EVERY  a fresh relay every this many sequences (5000)
#   WEFT_SEED                   replay a run (its seed is printed at the start)
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export WEFT_ADVERSARY_SEQUENCES=${WEFT_ADVERSARY_SEQUENCES:-100000}
export WEFT_ADVERSARY_PROGRESS=${WEFT_ADVERSARY_PROGRESS:-1000}
exec cargo test --release --test it -- adversary::adversary_model --exact --nocapture
