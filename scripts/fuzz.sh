#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (cargo-fuzz, libFuzzer; AddressSanitizer
# unless --sanitizer=none) for SECONDS each, or until --runs=N executions (libFuzzer's -runs; then
# SECONDS, if given, caps the time), and prints the executions reached, the
# rate and the time taken. New corpus inputs land in a scratch directory;
# with --keep, the corpus in git is replaced by a minimised one (cargo fuzz
# cmin). A finding stops with its input
# in fuzz/artifacts/<target>/: copy it to fuzz/regressions/<target>/ once
# fixed, so `cargo test` replays it forever.
# Usage: scripts/fuzz.sh [SECONDS=60] [--runs=N] [--keep]
#                        [--sanitizer=address|none] [TARGET...]
# e.g. nice -n 15 scripts/fuzz.sh --runs=10000000 hostile_plan
# --sanitizer=none builds without ASan (several times faster): fit only for
# a target whose code path has no `unsafe` of its own or in what it calls
# (docs/reliability.md says which target was run with which). Each
# sanitizer builds in its own target directory, so switching keeps both warm.
# Needs: the nightly toolchain and cargo-fuzz (installed here when missing,
# cached in /var/cache/kwp/tools).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs= runs=-1 keep=0 sanitizer=address targets=()
for a in "$@"; do
  case "$a" in
    --keep) keep=1 ;;
    --runs=[0-9]*) runs=${a#--runs=} ;;
    --sanitizer=address | --sanitizer=none) sanitizer=${a#--sanitizer=} ;;
    [0-9]*) secs=$a ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) targets+=("$a") ;;
  esac
done
tools=/var/cache/kwp/tools
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR=${KWP_FUZZ_TARGET_DIR:-/var/tmp/kwp-fuzz-target}
[ "$sanitizer" = address ] || CARGO_TARGET_DIR+="-$sanitizer"
# The bundled plugins (Wasm guests) build on stable: nightly's wasm32-wasip2
# std may not be published for the nightly installed.
export KWP_WASM_TOOLCHAIN=${KWP_WASM_TOOLCHAIN:-stable}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --root "$tools"
# Without --runs the default is 60 s; with it, no time limit unless given.
[ -n "$secs" ] || { [ "$runs" -ge 0 ] && secs=0 || secs=60; }
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build -O -s "$sanitizer"
echo "sanitizer: $sanitizer"
printf '%-26s %12s %10s %8s %s\n' target executions exec/s seconds outcome
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  log=$(mktemp)
  outcome=ok started=$(date +%s)
  # The binaries built above, run directly (as `cargo fuzz run -O` would,
  # without rebuilding if a source changed meanwhile).
  mkdir -p "artifacts/$t"
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0} \
    "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time="$secs" -runs="$runs" -print_final_stats=1 -max_len=65536 \
      "$scratch" "corpus/$t" >"$log" 2>&1 || outcome="FOUND: see $log"
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  printf '%-26s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$(( $(date +%s) - started ))" "$outcome"
  if [ "$keep" = 1 ] && [ "$outcome" = ok ]; then
    cp -n "$scratch"/* "corpus/$t/" 2>/dev/null || true
    cargo +nightly fuzz cmin -O -s "$sanitizer" "$t" "corpus/$t" >/dev/null 2>&1
  fi
  rm -rf "$scratch"
done
