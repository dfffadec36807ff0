//! Runs every `sh` block of the SDK tutorials (docs/writing-a-policy.md,
//! docs/writing-a-mode.md), in order, in an empty directory, so they cannot
//! rot: each builds a plugin from its template, tests it, installs it and
//! checks that the proxy uses it. Also packages the SDK as crates.io would
//! get it and builds the package alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The `sh` blocks of `doc`, as one script.
fn script_of(doc: &str) -> String {
    let text = std::fs::read_to_string(repo().join(doc)).expect("the tutorial");
    let mut script = String::from("set -euxo pipefail\n");
    let mut in_block = false;
    let mut blocks = 0;
    for line in text.lines() {
        match (in_block, line.trim_end()) {
            (false, "```sh") => {
                in_block = true;
                blocks += 1;
            }
            (true, "```") => in_block = false,
            (true, l) => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(blocks >= 5, "{doc}: found only {blocks} sh blocks");
    // The SDK ships its WIT: a reader copies a template and adds the
    // dependency, nothing is patched by hand.
    assert!(!script.contains("sed "), "{doc} edits files with sed");
    script
}

/// `cmd` at the lowest priority: these are cold cargo builds, and the tests
/// running beside them (timing assertions among them) keep the cores.
fn nice(cmd: &str) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "19", cmd])
        .env("RUST_LOG", "warn")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `doc` in a fresh directory and returns it.
fn run_tutorial(doc: &str) -> tempfile::TempDir {
    let script = script_of(doc);
    let work = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = nice("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("KWP_REPO", repo())
        .env("PATH", path)
        // The tutorial builds in its own target/, as a reader would.
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("bash runs");
    assert_ok(doc, &out);
    work
}

#[test]
fn the_policy_tutorial_works_as_written() {
    let work = run_tutorial("docs/writing-a-policy.md");
    assert!(work.path().join("plugins/prefer-local.wasm").exists());
}

#[test]
fn the_mode_tutorial_works_as_written() {
    let work = run_tutorial("docs/writing-a-mode.md");
    assert!(work.path().join("plugins/nftables.wasm").exists());
}

/// `cargo package -p kwp-sdk` takes only what is inside `sdk/`: the
/// package must carry every WIT file (wit-bindgen reads them when a user's
/// build compiles the SDK), and the packaged crate must build on its own.
#[test]
fn the_sdk_packages_with_its_wit_and_the_package_builds() {
    let repo = repo();
    let out = nice("cargo")
        .args(["package", "-p", "kwp-sdk", "--list", "--allow-dirty"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_ok("cargo package --list", &out);
    let listed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut wit = Vec::new();
    walk(&repo.join("sdk"), &repo.join("sdk/wit"), &mut wit);
    assert!(wit.len() >= 5, "{wit:?}");
    for file in &wit {
        assert!(listed.contains(file), "{file} is not packaged: {listed:?}");
    }
    assert!(
        !listed.iter().any(|f| f.starts_with("templates/")),
        "templates are crates of their own: {listed:?}"
    );

    // The verification step unpacks the .crate and builds it alone, as a
    // user's build would; its own target directory beside the suite's keeps
    // it warm between runs.
    let target = Path::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"))
        .ancestors()
        .nth(2)
        .expect("target directory")
        .join("sdk-package");
    let out = nice("cargo")
        .args(["package", "-p", "kwp-sdk", "--allow-dirty", "--target-dir"])
        .arg(&target)
        .current_dir(&repo)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert_ok("cargo package", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Verifying kwp-sdk"), "{stderr}");
}

/// Files under `dir`, relative to `base`.
fn walk(base: &Path, dir: &Path, into: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(base, &path, into);
        } else {
            let rel = path.strip_prefix(base).unwrap();
            into.push(rel.to_string_lossy().into_owned());
        }
    }
}
