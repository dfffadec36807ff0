# Shared helpers for scripts/ and .ci/run.

# The build cache lives outside the clone, so fresh clones build fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kwp-target}"

ensure_wasm_target() {
    if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        return
    fi
    if ! rustup target add wasm32-wasip2; then
        # Offline fallback: the standard library shipped in ../shared.
        local tarball
        tarball="$(ls ../shared/toolchain/rust-std-*-wasm32-wasip2.tar.xz 2>/dev/null | head -n1 || true)"
        [ -n "$tarball" ] || { echo "cannot install wasm32-wasip2" >&2; return 1; }
        tar -xJf "$tarball" -C "$(rustc --print sysroot)/lib/rustlib"
    fi
}

# ensure_packages PKG...: apt-get install the missing ones when root.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: not root; tests needing ${missing[*]} will fail" >&2
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# go_bin: prints the Go toolchain's path (PATH, else /usr/local/go/bin),
# for the tools built from the Go module proxy (scripts/control-plane.sh,
# scripts/helm.sh).
go_bin() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [ -x /usr/local/go/bin/go ]; then
        echo /usr/local/go/bin/go
    else
        echo "Go is not installed (looked in PATH and /usr/local/go/bin)" >&2
        return 1
    fi
}
