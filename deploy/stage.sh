#!/usr/bin/env bash
# Lays out the image's files under OUT, as deploy/Dockerfile copies them:
#   OUT/bin/kube-wasm-proxy
#   OUT/plugins/<name>.wasm   every bundled plugin (kwp_plugin_round_robin -> round-robin.wasm)
#
#   deploy/stage.sh OUT              builds (release, --locked), then lays out
#   deploy/stage.sh --no-build OUT   lays out an existing build: KWP_BINARY is the
#                                    binary, CARGO_TARGET_DIR holds wasm-guests/
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
if [ "${1:-}" = "--no-build" ]; then build=0; shift; fi
out="${1:?usage: deploy/stage.sh [--no-build] OUT}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ "$build" = 1 ]; then
    cargo build --release --locked -p kube-wasm-proxy --bin kube-wasm-proxy
    binary="$target/release/kube-wasm-proxy"
else
    binary="${KWP_BINARY:?KWP_BINARY must name the binary with --no-build}"
fi
# plugins/bundle's build script compiles the plugins (always release) here.
guests="$target/wasm-guests/wasm32-wasip2/release"
mkdir -p "$out/bin" "$out/plugins"
cp "$binary" "$out/bin/kube-wasm-proxy"
found=0
for f in "$guests"/kwp_plugin_*.wasm; do
    [ -e "$f" ] || break
    name="$(basename "$f" .wasm)"
    name="${name#kwp_plugin_}"
    cp "$f" "$out/plugins/${name//_/-}.wasm"
    found=$((found + 1))
done
if [ "$found" = 0 ]; then
    echo "no plugins in $guests (was the host built?)" >&2
    exit 1
fi
"$out/bin/kube-wasm-proxy" --version
ls "$out/plugins"
