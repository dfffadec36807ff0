//! Used by build scripts (never at run time) to compile guest crates of this
//! workspace to `wasm32-wasip2` components, the way wasmtime's
//! `test-programs-artifacts` does.
//!
//! The nested cargo uses its own target directory beside the outer one, so
//! it never waits on the outer build's lock, and is shared by every build
//! script so each guest is compiled once.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// What to build: whole packages (their `cdylib`) or a package's examples.
pub enum Guest<'a> {
    Package(&'a str),
    Examples(&'a str),
}

/// Builds the guests in release mode and returns `(artifact name, path)` for
/// each `.wasm` produced, sorted by name.
pub fn build(guests: &[Guest<'_>]) -> Vec<(String, PathBuf)> {
    let root = workspace_root();
    for dir in ["sdk", "plugins", "host/test-programs"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // `KWP_WASM_TOOLCHAIN` (e.g. `stable`): the guests are built with that
    // rustup toolchain, not the one building the host (scripts/fuzz.sh
    // builds the host on nightly, whose wasm32-wasip2 std may not exist).
    println!("cargo:rerun-if-env-changed=KWP_WASM_TOOLCHAIN");
    let toolchain = std::env::var("KWP_WASM_TOOLCHAIN").ok();
    let target_dir = nested_target_dir();
    let mut cmd = match &toolchain {
        Some(t) => {
            let mut cmd = Command::new("rustup");
            cmd.args(["run", t, "cargo"]);
            for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER"] {
                cmd.env_remove(var);
            }
            cmd
        }
        None => {
            ensure_target();
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        }
    };
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for guest in guests {
        match guest {
            Guest::Package(p) | Guest::Examples(p) => cmd.args(["-p", p]),
        };
    }
    if guests.iter().any(|g| matches!(g, Guest::Package(_))) {
        cmd.arg("--lib");
    }
    if guests.iter().any(|g| matches!(g, Guest::Examples(_))) {
        cmd.arg("--examples");
    }
    // Flags meant for the host build must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    // Guests ship in the binary: keep them small.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    let status = cmd
        .status()
        .expect("failed to run cargo for the wasm guests");
    assert!(
        status.success(),
        "building wasm guests failed; is the target installed? (rustup target add {TARGET})"
    );

    let out = target_dir.join(TARGET).join("release");
    let mut found = Vec::new();
    for dir in [out.clone(), out.join("examples")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            // Skip cargo's hashed copies (`name-0123abcd.wasm`) of examples.
            if path.extension().is_some_and(|e| e == "wasm") && !stem.contains('-') {
                found.push((stem.to_string(), path));
            }
        }
    }
    found.sort();
    found
}

/// Writes `name -> bytes` entries as a Rust array expression into
/// `$OUT_DIR/<file>`, for `include!`.
pub fn write_table(file: &str, artifacts: &[(String, PathBuf)], wanted: &[&str]) {
    let mut src = String::from("&[\n");
    for want in wanted {
        let (_, path) = artifacts
            .iter()
            .find(|(name, _)| name == want)
            .unwrap_or_else(|| panic!("guest {want} was not built"));
        src.push_str(&format!(
            "    ({want:?}, include_bytes!({:?}) as &[u8]),\n",
            path.display().to_string()
        ));
    }
    src.push(']');
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(file);
    std::fs::write(out, src).expect("write artifact table");
}

/// Installs the wasm target with rustup when it is missing, so that a
/// plain `cargo build` works on a fresh machine.
fn ensure_target() {
    let sysroot = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).is_dir()) {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let _ = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("sdk/wit").is_dir() && d.join("plugins").is_dir())
        .map(Path::to_path_buf)
        .expect("workspace root with sdk/wit/")
}

/// `<outer target>/wasm-guests`, found from OUT_DIR
/// (`<target>/<profile>/build/<pkg>-<hash>/out`).
fn nested_target_dir() -> PathBuf {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    out.ancestors()
        .nth(4)
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out.join("wasm-guests"))
}
