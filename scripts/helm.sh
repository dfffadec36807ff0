#!/usr/bin/env bash
# Prints the path of a real helm for the chart tests (tests/helm.rs), built
# once per machine from the Go module helm.sh/helm/v4 at HELM_VERSION (the
# module proxy and its checksum database pin every dependency through
# helm's own go.mod and go.sum) and cached outside the clone:
#   ${KWP_HELM_CACHE:-/var/cache/kwp}/helm-<version>/helm
# A cold build takes about 5 minutes on 2 cores; Go's module and build
# caches (~/go/pkg/mod, ~/.cache/go-build) make later ones faster.
# Concurrent runs wait for each other (flock), so only one builds.
set -euo pipefail

HELM_VERSION=v4.3.2
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
cache_root="${KWP_HELM_CACHE:-/var/cache/kwp}"
cache="$cache_root/helm-$HELM_VERSION"

log() { echo "helm: $*" >&2; }

cached() {
    [ -x "$cache/helm" ] && "$cache/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

build() {
    local go out start=$SECONDS
    go="$(go_bin)" || exit 1
    out="$cache.tmp.$$"
    rm -rf "$out"
    mkdir -p "$out"
    log "building helm $HELM_VERSION with $("$go" version | cut -d' ' -f3) (minutes, once per machine)"
    # What helm's Makefile stamps into a release: the version helm reports.
    local pkg=helm.sh/helm/v4/internal/version
    CGO_ENABLED=0 GOBIN="$out" GOFLAGS="-buildvcs=false" "$go" install -trimpath \
        -ldflags "-s -w -X $pkg.version=$HELM_VERSION -X $pkg.gitTreeState=clean" \
        "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2
    rm -rf "$cache"
    mv "$out" "$cache"
    log "built in $((SECONDS - start)) s into $cache"
}

mkdir -p "$cache_root"
if ! cached; then
    exec 9>"$cache_root/.helm-$HELM_VERSION.lock"
    flock 9
    cached || build
    flock -u 9
    cached || { log "$cache/helm does not report $HELM_VERSION"; exit 1; }
fi
echo "$cache/helm"
