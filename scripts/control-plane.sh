#!/usr/bin/env bash
# Installs a real Kubernetes control plane for the tests, once per machine:
#   etcd            built from the Go module go.etcd.io/etcd/server/v3 at the
#                   version k8s.io/kubernetes requires (3.6.4 for 1.34, what
#                   upstream ships). Debian's etcd 3.4.23 lacks the watch
#                   progress requests the API server needs to stream initial
#                   lists (WatchList: etcd >= 3.4.31 or 3.5.13).
#   kube-apiserver  built from the Go module k8s.io/kubernetes at KUBE_VERSION
#   kube-proxy      built the same way, for comparisons with upstream
# The binaries are cached outside the clone (KWP_K8S_CACHE, default
# /var/cache/kwp) and the build is skipped when they are there; Go's module
# and build caches (~/go/pkg/mod, ~/.cache/go-build) are outside it too.
#
# Prints one NAME=PATH line per binary on stdout, so
#   eval "$(scripts/control-plane.sh)"
# sets ETCD, KUBE_APISERVER and KUBE_PROXY. Progress goes to stderr.
# Concurrent runs wait for each other (flock), so only one builds.
#
# The wrapper module scripts/control-plane/ pins the version: its go.mod
# requires k8s.io/kubernetes at KUBE_VERSION and maps each k8s.io staging
# module from v0.0.0 to its published v0.<minor>.<patch>.
set -euo pipefail

KUBE_VERSION=v1.34.12
# The etcd k8s.io/kubernetes $KUBE_VERSION requires (go.mod of scripts/control-plane/).
ETCD_VERSION=3.6.4
here="$(cd "$(dirname "$0")" && pwd)"
module="$here/control-plane"
cache_root="${KWP_K8S_CACHE:-/var/cache/kwp}"
cache="$cache_root/k8s-$KUBE_VERSION"
# go_bin, shared with scripts/helm.sh
source "$here/lib.sh"

log() { echo "control-plane: $*" >&2; }
die() { log "$*"; exit 1; }

# ensure_packages PKG...: installs the missing Debian packages (needs root).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages ${missing[*]}; install them as root"
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# True when the three binaries are cached and report the pinned versions.
cached() {
    [ -x "$cache/kube-apiserver" ] && [ -x "$cache/kube-proxy" ] && [ -x "$cache/etcd" ] || return 1
    "$cache/etcd" --version 2>/dev/null | grep -qx "etcd Version: $ETCD_VERSION" || return 1
    "$cache/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $KUBE_VERSION" || return 1
    "$cache/kube-proxy" --version 2>/dev/null | grep -qx "Kubernetes $KUBE_VERSION"
}

build() {
    local go
    go="$(go_bin)" || die "cannot build without Go"
    grep -q "k8s.io/kubernetes $KUBE_VERSION" "$module/go.mod" \
        || die "$module/go.mod does not pin k8s.io/kubernetes $KUBE_VERSION"
    grep -q "go.etcd.io/etcd/server/v3 v$ETCD_VERSION" "$module/go.mod" \
        || die "$module/go.mod does not pin go.etcd.io/etcd/server/v3 v$ETCD_VERSION"
    local minor="${KUBE_VERSION#v1.}"
    minor="${minor%%.*}"
    # What upstream's hack/lib/version.sh stamps into its release binaries.
    # The API server derives its binary and emulation version from it.
    local ldflags="-s -w"
    local pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    local out="$cache.tmp.$$"
    rm -rf "$out"
    mkdir -p "$out"
    log "building kube-apiserver and kube-proxy $KUBE_VERSION and etcd $ETCD_VERSION with $("$go" version | cut -d' ' -f3) (several minutes, once per machine)"
    local start=$SECONDS
    # Static, as upstream builds its server binaries.
    (cd "$module" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$go" build -trimpath \
        -ldflags "$ldflags" -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-proxy) >&2
    # etcd's main package is the module's root; go names the binary after it.
    (cd "$module" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$go" build -trimpath \
        -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3) >&2
    rm -rf "$cache"
    mv "$out" "$cache"
    log "built in $((SECONDS - start)) s into $cache"
}

ensure_packages openssl curl

mkdir -p "$cache_root"
if ! cached; then
    exec 9>"$cache_root/.k8s-$KUBE_VERSION.lock"
    flock 9
    cached || build
    flock -u 9
    cached || die "the binaries in $cache do not report $KUBE_VERSION and etcd $ETCD_VERSION"
fi

echo "ETCD=$cache/etcd"
echo "KUBE_APISERVER=$cache/kube-apiserver"
echo "KUBE_PROXY=$cache/kube-proxy"
