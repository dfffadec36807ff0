#!/usr/bin/env bash
# IPVS mode against nftables mode, side by side in one boot of the IPVS VM
# (scripts/ipvs-vm.sh): for each size, a fresh kwp per mode on N Services x 5
# endpoints through the file source, from an empty kernel: full sync (process
# start until the kernel shows every Service), one-endpoint changes (file
# renamed into place until the kernel shows the new endpoint; median), peak
# RSS. The guest side is tests/ipvs-probe/src/bench (`/probe bench ...`);
# docs/ipvs.md has the method and the figures. Not part of scripts/test.sh.
#
# Usage (as root): scripts/ipvs-vm-bench.sh
#   KWP_BENCH_SIZES    Services per run (1000,10000)
#   KWP_BENCH_CHANGES  changes per run (7)
#   KWP_BENCH_MODES    (nftables,ipvs; with KWP_IPVS_VM_NET=1 nftables,ipvs,upstream)
#   KWP_BENCH_FULL_TIMEOUT  seconds after which a full sync is reported as a
#                      lower bound and its changes skipped (1800)
#   KWP_IPVS_VM_NET=1  every proxy watches a real kube-apiserver on this host
#                      (scripts/ipvs-vm-bench-api.py; the guest reaches it as
#                      10.0.2.2 through QEMU user networking), and mode
#                      `upstream`, kube-proxy --proxy-mode ipvs (the binary
#                      scripts/control-plane.sh builds), is the third column
#   KWP_IPVS_VM_MEM / KWP_IPVS_VM_SMP  guest memory in MiB (6144) and CPUs (2)
# The console is kept in ${TMPDIR:-/tmp}/kwp-ipvs-vm-bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
sizes=${KWP_BENCH_SIZES:-1000,10000}
changes=${KWP_BENCH_CHANGES:-7}
net=${KWP_IPVS_VM_NET:-0}
if [ "$net" = 1 ]; then modes=${KWP_BENCH_MODES:-nftables,ipvs,upstream}; else modes=${KWP_BENCH_MODES:-nftables,ipvs}; fi

ensure_wasm_target
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
# kwp as the nftables bench builds it (docs/performance.md): the dev profile,
# whose dependencies are optimised, with kwp itself at opt-level 2 (a release
# build of the whole tree takes much longer here and would be a different
# binary from the one the suite runs).
cargo build --profile dev --config 'profile.dev.package.kube-wasm-proxy.opt-level=2' \
    -p kube-wasm-proxy --bin kube-wasm-proxy
# Copied at once: the next plain dev build writes the same path.
kwp="$CARGO_TARGET_DIR/ipvs-vm-bench/kube-wasm-proxy"
mkdir -p "$(dirname "$kwp")"
cp "$CARGO_TARGET_DIR/debug/kube-wasm-proxy" "$kwp"
cargo build --release -p kwp-ipvs-probe --target x86_64-unknown-linux-musl
probe="$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/release/kwp-ipvs-probe"

files="$kwp $(command -v nft) $(command -v ip)"
opts=("full-timeout=${KWP_BENCH_FULL_TIMEOUT:-1800}")
if [ "$net" = 1 ]; then
  eval "$(scripts/control-plane.sh)"
  api_dir=$(mktemp -d /dev/shm/kwp-ipvs-bench-api.XXXXXX)
  python3 scripts/ipvs-vm-bench-api.py "$ETCD" "$KUBE_APISERVER" "$api_dir" \
    >"$api_dir/ready" 2>"$api_dir/helper.log" &
  api_pid=$!
  trap 'kill $api_pid 2>/dev/null; wait $api_pid 2>/dev/null; rm -rf "$api_dir"' EXIT
  for _ in $(seq 180); do
    grep -q READY "$api_dir/ready" && break
    kill -0 $api_pid 2>/dev/null || { cat "$api_dir/helper.log" >&2; exit 1; }
    sleep 1
  done
  read -r _ api_port control_port kubeconfig < "$api_dir/ready" || { cat "$api_dir/helper.log" >&2; exit 1; }
  # Placed at the same path in the guest, whose /dev is its own devtmpfs.
  cp "$kubeconfig" "${TMPDIR:-/tmp}/kwp-ipvs-vm-bench.kubeconfig"
  kubeconfig=${TMPDIR:-/tmp}/kwp-ipvs-vm-bench.kubeconfig
  echo "API server on 127.0.0.1:$api_port (10.0.2.2 in the guest), control server on :$control_port"
  files="$files $kubeconfig $KUBE_PROXY"
  opts+=("api=$kubeconfig,10.0.2.2:$control_port,$KUBE_PROXY")
fi

log=${TMPDIR:-/tmp}/kwp-ipvs-vm-bench.log
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "host kernel $(uname -r), $(qemu-system-x86_64 --version | head -1)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
KWP_IPVS_VM_FILES="$files" KWP_IPVS_VM_NET=$net \
KWP_IPVS_VM_MEM=${KWP_IPVS_VM_MEM:-6144} KWP_IPVS_VM_SMP=${KWP_IPVS_VM_SMP:-2} \
KWP_IPVS_VM_TIMEOUT=${KWP_IPVS_VM_TIMEOUT:-7200} \
    scripts/ipvs-vm.sh "$probe" bench "$kwp" "$sizes" "$changes" "$modes" "${opts[@]}" | tee "$log" | grep --line-buffered "^bench:" || true
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); the VM ran $(( $(date +%s) - started )) s"
if [ "$net" = 1 ]; then cp "$api_dir/helper.log" "${TMPDIR:-/tmp}/kwp-ipvs-vm-bench-api.log"; fi
grep -q "KWP-VM-PROBE-EXIT 0" "$log" || { echo "the benchmark failed; console in $log" >&2; exit 1; }
sed -n '/KWP-BENCH-TABLE-BEGIN/,/KWP-BENCH-TABLE-END/p' "$log" | sed '1d;$d'
