#!/usr/bin/env bash
# Builds the kube-wasm-proxy OCI image without a daemon and without pulling
# anything: buildah, FROM scratch, with
#   /usr/local/bin/kube-wasm-proxy                   the binary (deploy/stage.sh)
#   /usr/local/lib/kube-wasm-proxy/plugins/*.wasm    every bundled plugin
#   the programs the dataplanes run (docs/architecture.md, "Other programs
#   the host runs"): nft, iptables/ip6tables (+ -restore/-save, nft and
#   legacy backends) with their xtables modules, conntrack, modprobe, ip,
#   and the shared libraries they and the binary link, copied from this
#   Debian machine (ldd);
# so it holds what deploy/Dockerfile installs from Debian packages (the
# test tests/oci_image.rs checks that the two name the same packages).
#
#   deploy/build-image.sh [options] [TAG]          TAG: kube-wasm-proxy:<version>
#     --binary PATH     use this binary (a debug build is stripped of its
#                       debug info) instead of `cargo build --release`;
#                       CARGO_TARGET_DIR must hold the plugins it embeds
#     --archive FILE    also write the image as an OCI archive (for
#                       `skopeo copy oci-archive:FILE docker://REGISTRY/...`)
#     --root DIR --runroot DIR --storage-driver D
#                       containers-storage to commit into (buildah's global
#                       options; podman run with the same ones sees the image)
#
# Prints `IMAGE=<tag>`, `ID=<image id>` and `SIZE=<bytes>` on stdout;
# progress goes to stderr. Needs root (buildah), binutils and buildah.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
archive=""
storage=()
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="${2:?--binary PATH}"; shift 2 ;;
        --archive) archive="${2:?--archive FILE}"; shift 2 ;;
        --root | --runroot | --storage-driver) storage+=("$1" "${2:?$1 VALUE}"); shift 2 ;;
        -*) echo "build-image.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
# The workspace's version ([workspace.package] in Cargo.toml), which the
# binary reports and the DaemonSet's image tag carries.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
[ -n "$version" ] || { echo "build-image.sh: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
tag="${1:-kube-wasm-proxy:$version}"

# Where deploy/Dockerfile puts them; the DaemonSet's command and
# --plugin-dir name the same paths.
BINARY_PATH=/usr/local/bin/kube-wasm-proxy
PLUGIN_DIR=/usr/local/lib/kube-wasm-proxy/plugins
# The programs, by the path Debian installs them at. iptables and friends
# are symlinks (alternatives, multi-call binaries): recreated below.
TOOLS=(/usr/sbin/nft /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi
    /usr/sbin/conntrack /usr/bin/kmod /usr/bin/ip)
XTABLES_DIR=/usr/lib/x86_64-linux-gnu/xtables

log() { echo "build-image: $*" >&2; }
die() { log "$*"; exit 1; }
for tool in buildah objcopy ldd "${TOOLS[@]}"; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install buildah binutils nftables iptables conntrack kmod iproute2)"
done
[ -d "$XTABLES_DIR" ] || die "$XTABLES_DIR is missing (the iptables package's modules)"
start=$SECONDS

work="$(mktemp -d "${TMPDIR:-/var/tmp}/kwp-image.XXXXXX")"
ctr=""
cleanup() {
    [ -n "$ctr" ] && buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The binary and plugins, as the Dockerfile's build stage lays them out.
if [ -n "$binary" ]; then
    KWP_BINARY="$binary" deploy/stage.sh --no-build "$work/out" >&2
else
    deploy/stage.sh "$work/out" >&2
fi
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/bin" "$rootfs/usr/sbin" "$rootfs/usr/lib/x86_64-linux-gnu" \
    "$rootfs/usr/lib64" "$rootfs/usr/local/bin" "$rootfs/$PLUGIN_DIR" "$rootfs/etc/ssl/certs"
# Debian's merged /usr, so the paths programs and ldd name all resolve.
for d in bin sbin lib lib64; do ln -s "usr/$d" "$rootfs/$d"; done
# A debug binary's DWARF is most of its size; a release binary keeps its
# line tables for backtraces (the release profile's debug setting).
if [ -n "$binary" ]; then
    objcopy --strip-debug "$work/out/bin/kube-wasm-proxy" "$rootfs/$BINARY_PATH"
else
    cp "$work/out/bin/kube-wasm-proxy" "$rootfs/$BINARY_PATH"
fi
cp "$work/out/plugins/"*.wasm "$rootfs/$PLUGIN_DIR/"

for tool in "${TOOLS[@]}"; do cp "$(readlink -f "$tool")" "$rootfs/$tool"; done
ln -s ../bin/kmod "$rootfs/usr/sbin/modprobe"
ln -s ../bin/ip "$rootfs/usr/sbin/ip"
# iptables, ip6tables and their -restore/-save: the nft backend by default,
# as Debian's alternatives choose, and both backends by name (the
# dataplane picks the one holding the node's rules, and --cleanup reads both).
for family in iptables ip6tables; do
    for suffix in "" -restore -save; do
        ln -s xtables-nft-multi "$rootfs/usr/sbin/$family$suffix"
        ln -s xtables-nft-multi "$rootfs/usr/sbin/$family-nft$suffix"
        ln -s xtables-legacy-multi "$rootfs/usr/sbin/$family-legacy$suffix"
    done
done
mkdir -p "$rootfs/$XTABLES_DIR"
cp "$XTABLES_DIR"/*.so "$rootfs/$XTABLES_DIR/"

# Every shared library any of them links (the loader included), under the
# name it is asked for.
libs="$(for f in "$rootfs/$BINARY_PATH" "${TOOLS[@]}" "$XTABLES_DIR"/*.so; do ldd "$f"; done \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)"
for lib in $libs; do
    dest="$rootfs/usr/lib/x86_64-linux-gnu/$(basename "$lib")"
    [ -e "$dest" ] || cp "$(readlink -f "$lib")" "$dest"
done
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$rootfs/usr/lib64/ld-linux-x86-64.so.2"
[ -e "$rootfs/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "ldd named no loader"

# Protocol and service names (iptables -p, nft), CA certificates, and the
# mount points the DaemonSet uses on a read-only root filesystem.
cp /etc/protocols /etc/services "$rootfs/etc/"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
mkdir -p "$rootfs/tmp" "$rootfs/run" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" \
    "$rootfs/lib/modules" "$rootfs/var/lib/kube-wasm-proxy" \
    "$rootfs/var/run/secrets/kubernetes.io/serviceaccount"
chmod 1777 "$rootfs/tmp"
touch "$rootfs/run/xtables.lock"

# Everything must run in there: a missing library shows here, not on a node.
for cmd in "$BINARY_PATH --version" "nft --version" "conntrack --version" "modprobe --version" \
    "ip -V" "iptables --version" "ip6tables-restore --version" "iptables-save --version" \
    "iptables-legacy-save --version" "ip6tables-nft-save --version"; do
    out="$(chroot "$rootfs" $cmd 2>&1)" \
        || die "'$cmd' fails inside the image: $out"
done
# An xtables module is loaded only when a rule uses it: check one.
out="$(chroot "$rootfs" /usr/sbin/iptables-nft -m comment -h 2>&1)" \
    || die "iptables cannot load its comment module inside the image: $out"

# One layer, owned by root.
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
ctr="$(buildah "${storage[@]}" from scratch)"
buildah "${storage[@]}" add "$ctr" "$work/rootfs.tar" / >/dev/null
buildah "${storage[@]}" config \
    --entrypoint "[\"$BINARY_PATH\"]" --cmd '["--help"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --port 10256/tcp \
    --label org.opencontainers.image.title=kube-wasm-proxy \
    --label "org.opencontainers.image.version=$version" \
    "$ctr"
buildah "${storage[@]}" commit --quiet --rm "$ctr" "$tag" >/dev/null
ctr=""
id="$(buildah "${storage[@]}" images --noheading --no-trunc --format '{{.ID}}' "$tag" | head -n1)"
# The image's one layer, uncompressed: what a node stores.
size="$(stat -c %s "$work/rootfs.tar")"
if [ -n "$archive" ]; then
    rm -f "$archive"
    buildah "${storage[@]}" push --quiet "$tag" "oci-archive:$archive:$tag" >/dev/null
    log "archive $archive: $(du -h "$archive" | cut -f1)"
fi
log "built $tag ($((size / 1048576)) MiB) in $((SECONDS - start)) s"
echo "IMAGE=$tag"
echo "ID=$id"
echo "SIZE=$size"
