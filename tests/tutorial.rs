//! Runs every `sh` block of docs/writing-a-policy.md, in order, in an empty
//! directory, so the tutorial cannot rot: it builds a policy from the
//! template, tests it, installs it and checks that the proxy uses it.

use std::path::Path;
use std::process::Command;

#[test]
fn the_policy_tutorial_works_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf();
    let doc = std::fs::read_to_string(repo.join("docs/writing-a-policy.md")).expect("the tutorial");
    let mut script = String::from("set -euxo pipefail\n");
    let mut in_block = false;
    let mut blocks = 0;
    for line in doc.lines() {
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
    assert!(blocks >= 5, "found only {blocks} sh blocks");
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
    // Two cold cargo builds: at the lowest priority, so that the tests
    // running beside it (timing assertions among them) keep the cores.
    let out = Command::new("nice")
        .args(["-n", "19", "bash", "-c"])
        .arg(&script)
        .current_dir(work.path())
        .env("KWP_REPO", &repo)
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        // The tutorial builds in its own target/, as a reader would.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "the tutorial failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(work.path().join("plugins/prefer-local.wasm").exists());
}
