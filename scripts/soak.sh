#!/usr/bin/env bash
# The full churn soak of issue 14 (tests/soak.rs `soak_long`): a real
# kube-apiserver, kwp in MODE (nftables or iptables) in a namespace cluster, RATE random
# API changes a second for SECONDS; every 10 s the churn pauses, the sync
# settles and the independent model (tests/common/model) compares every
# frontend with the kernel, and real TCP connections go to a sample of
# frontends. Prints per-round mismatches, RSS and descriptors, the sync
# latency histogram and totals; fails on any mismatch or failed probe.
# Then SIGKILL at random points of syncs KWP_KILLS (100) times under a
# continuous client (tests/kernel_faults.rs).
# MODE=ipvs runs the same rounds inside the IPVS VM (scripts/ipvs-vm.sh, QEMU TCG:
# the host's kernel has no IPVS) against a kube-apiserver on the host
# (tests/ipvs_vm/soak.rs); the SIGKILL loop is not run there.
# Usage: scripts/soak.sh [SECONDS=600] [RATE=100] [MODE=nftables|iptables|ipvs]   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
export KWP_SOAK_SECONDS=${1:-600} KWP_SOAK_RATE=${2:-100} KWP_SOAK_MODE=${3:-nftables}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/kwp-target}
./scripts/control-plane.sh >/dev/null
if [ "$KWP_SOAK_MODE" = ipvs ]; then
  # Boot, cluster and proxy start take minutes under emulation.
  export KWP_IPVS_VM_TIMEOUT=$((KWP_SOAK_SECONDS * 2 + 900))
  exec nice -n 10 cargo test -p kube-wasm-proxy --test e2e ipvs_vm::churn_soak_long_in_ipvs_mode -- \
    --ignored --exact --nocapture --test-threads 1
fi
nice -n 10 cargo test -p kube-wasm-proxy --test e2e soak::soak_long -- \
  --ignored --nocapture --test-threads 1
# SIGKILL at random points of syncs, KILLS times, under a continuous client.
KWP_KILLS=${KWP_KILLS:-100} nice -n 10 cargo test -p kube-wasm-proxy --test e2e \
  kernel_faults::sigkill -- --nocapture --test-threads 1
