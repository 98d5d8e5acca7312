#!/usr/bin/env bash
# Builds the npm package `weft` in wasm/: the engine compiled to WebAssembly (cargo profile
# wasm-release), wasm-bindgen's ES module glue in wasm/pkg/, then `wasm-opt -Oz` from npm
# binaryen (Debian's binaryen 108 produces wasm that fails to load). Prints the size of the
# .wasm, raw and gzipped.
#
#   scripts/build-wasm.sh            # everything (what `npm run build` in wasm/ runs)
#   scripts/build-wasm.sh compile    # only the cargo build
#   scripts/build-wasm.sh package    # only wasm-bindgen + wasm-opt, on the compiled .wasm
#
# (scripts/test.sh runs the two halves apart: the package half, which needs one core for
# about a minute, runs beside `cargo test`.)
#
# Needs: the wasm32-unknown-unknown target, wasm-bindgen-cli of the same version as the
# wasm-bindgen crate (`cargo install wasm-bindgen-cli --version X`), and `npm ci` done in wasm/
# (for binaryen). Honors CARGO_TARGET_DIR. WEFT_WASM_OPT=0 skips wasm-opt (faster, larger).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
target_dir="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")"
pkg="$root/wasm/pkg"
stage="${1:-all}"
t0=$SECONDS

compile() {
    cargo build -p weft-wasm --target wasm32-unknown-unknown --profile wasm-release
    echo "build-wasm: cargo build (wasm-release) took $((SECONDS - t0))s"
}

package() {
    local t1=$SECONDS
    local want have
    want=$(sed -n 's/^wasm-bindgen = "=\(.*\)"$/\1/p' wasm/Cargo.toml)
    have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
    if [ -z "$have" ]; then
        echo "build-wasm: wasm-bindgen not found; install it: cargo install wasm-bindgen-cli --version $want" >&2
        exit 1
    fi
    if [ -n "$want" ] && [ "$have" != "$want" ]; then
        echo "build-wasm: wasm-bindgen is $have but the crate pins $want; run: cargo install wasm-bindgen-cli --version $want" >&2
        exit 1
    fi
    local wasm_opt="$root/wasm/node_modules/.bin/wasm-opt"
    if [ "${WEFT_WASM_OPT:-1}" != 0 ] && [ ! -x "$wasm_opt" ]; then
        echo "build-wasm: $wasm_opt missing; run npm ci in wasm/ first" >&2
        exit 1
    fi
    local input="$target_dir/wasm32-unknown-unknown/wasm-release/weft_wasm.wasm"
    if [ ! -f "$input" ]; then
        echo "build-wasm: $input missing; run scripts/build-wasm.sh compile first" >&2
        exit 1
    fi

    # One glue for browsers and Node: the `web` target is an ES module whose init takes a URL
    # (browsers fetch it) or the bytes (Node reads the file), so the package ships one .wasm.
    # Built in a scratch folder and moved into place, so wasm/pkg is never half-written.
    local out="$pkg.tmp"
    rm -rf "$out"
    wasm-bindgen --target web --out-dir "$out" --out-name weft_wasm "$input"
    local wasm="$out/weft_wasm_bg.wasm"
    local raw_before
    raw_before=$(stat -c %s "$wasm")
    if [ "${WEFT_WASM_OPT:-1}" != 0 ]; then
        local t2=$SECONDS
        # Rust's wasm32 target emits these post-MVP features; wasm-opt must accept them.
        "$wasm_opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
            --enable-mutable-globals --enable-reference-types --enable-multivalue \
            "$wasm" -o "$wasm.opt"
        mv "$wasm.opt" "$wasm"
        echo "build-wasm: wasm-opt -Oz took $((SECONDS - t2))s"
    fi
    rm -f "$out/package.json" "$out/.gitignore"
    rm -rf "$pkg"
    mv "$out" "$pkg"

    local raw gz
    raw=$(stat -c %s "$pkg/weft_wasm_bg.wasm")
    gz=$(gzip -9 -c "$pkg/weft_wasm_bg.wasm" | wc -c)
    kb() { awk -v b="$1" 'BEGIN { printf "%.0f KB", b / 1024 }'; }
    echo "build-wasm: wasm-bindgen + wasm-opt took $((SECONDS - t1))s"
    echo "build-wasm: weft_wasm_bg.wasm $(kb "$raw") raw ($(kb "$raw_before") before wasm-opt), $(kb "$gz") gzipped (goal < 600 KB)"
}

case "$stage" in
    all) compile; package ;;
    compile) compile ;;
    package) package ;;
    *) echo "usage: $0 [all|compile|package]" >&2; exit 2 ;;
esac
