#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (cargo-fuzz, libFuzzer, AddressSanitizer)
# for SECONDS each and prints the executions reached. New corpus inputs
# land in a scratch directory; with --keep, the corpus in git is replaced
# by a minimised one (cargo fuzz cmin). A finding stops with its input
# in fuzz/artifacts/<target>/: copy it to fuzz/regressions/<target>/ once
# fixed, so `cargo test` replays it forever.
# Usage: scripts/fuzz.sh [SECONDS=60] [--keep] [TARGET...]
# Needs: the nightly toolchain and cargo-fuzz (installed here when missing,
# cached in /var/cache/kwp/tools).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=60 keep=0 targets=()
for a in "$@"; do
  case "$a" in
    --keep) keep=1 ;;
    [0-9]*) secs=$a ;;
    *) targets+=("$a") ;;
  esac
done
tools=/var/cache/kwp/tools
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR=${KWP_FUZZ_TARGET_DIR:-/var/tmp/kwp-fuzz-target}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --root "$tools"
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build -O
printf '%-26s %12s %10s %s\n' target executions exec/s outcome
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  log=$(mktemp)
  outcome=ok
  cargo +nightly fuzz run -O "$t" "$scratch" "corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -max_len=65536 >"$log" 2>&1 || outcome="FOUND: see $log"
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  printf '%-26s %12s %10s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$outcome"
  if [ "$keep" = 1 ] && [ "$outcome" = ok ]; then
    cp -n "$scratch"/* "corpus/$t/" 2>/dev/null || true
    cargo +nightly fuzz cmin -O "$t" "corpus/$t" >/dev/null 2>&1
  fi
  rm -rf "$scratch"
done
