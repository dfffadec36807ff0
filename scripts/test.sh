#!/usr/bin/env bash
# Runs every test. Installs what the tests need first: the wasm32-wasip2
# target, and (as root) the Debian packages of the network tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_wasm_target
# The IPVS test's static probe program (tests/ipvs.rs).
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
ensure_packages nftables iproute2 conntrack iptables
# The OCI image test (tests/oci_image.rs): deploy/build-image.sh builds the
# image with buildah from this machine's binaries (objcopy strips the test
# build's debug info, kmod is modprobe), podman + crun run it.
ensure_packages buildah podman crun binutils kmod
# A real etcd + kube-apiserver (and upstream kube-proxy) for the API tests,
# built once per machine and cached outside the repository.
scripts/control-plane.sh >/dev/null
# A real helm for the chart tests (tests/helm.rs), built the same way.
scripts/helm.sh >/dev/null
# Three test threads: the e2e crate's tutorial (cold builds at low priority)
# takes one, and at most two namespace clusters run at once
# (tests/common/topology.rs), as two cores carry.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-3}"
cargo test --workspace --locked "$@"
