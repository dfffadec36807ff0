use std::path::{Path, PathBuf};

use super::confinement::{iptables_restore, nft_script};
use super::*;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The fuzzers' kept inputs (a minimised corpus and every input that once
/// found something) run on every `cargo test`, so a regression fails CI
/// without libFuzzer.
#[test]
fn every_kept_input_replays_without_a_finding() {
    for (name, target) in TARGETS {
        let mut replayed = 0;
        for kept in ["corpus", "regressions"] {
            let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kept).join(name)) else {
                continue;
            };
            for entry in dir {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name}: {} fails again", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "{name} has no kept inputs in fuzz/");
    }
}

/// `fuzz/fuzz_targets/` and TARGETS name the same targets.
#[test]
fn every_fuzz_target_is_replayed() {
    let mut files: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .replace(".rs", "")
        })
        .collect();
    files.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(files, names);
}

#[test]
fn the_nft_reading_refuses_what_leaves_the_table() {
    let t = "kube-wasm-proxy";
    assert!(
        nft_script(
            "add rule ip kube-wasm-proxy c ip daddr { 10.0.0.1 } drop\n",
            t
        )
        .is_ok()
    );
    for bad in [
        "add rule ip filter INPUT drop",
        "add rule ip kube-wasm-proxy c drop; flush ruleset",
        "add rule ip kube-wasm-proxy c ip daddr { 10.0.0.1",
        "add rule ip kube-wasm-proxy c comment \"open",
        "add set ip kube-wasm-proxy s { type ipv4_addr # }",
        "add rule ip kube-wasm-proxy c drop\0flush ruleset",
        "flush ruleset",
        "add rule inet kube-wasm-proxy c drop",
    ] {
        assert!(nft_script(bad, t).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn the_iptables_reading_refuses_what_leaves_kwp_chains() {
    let p = "KWP-";
    assert!(iptables_restore("*nat\n:KWP-A - [0:0]\n-A KWP-A -j DNAT --to-destination 10.0.0.1:80\n-A PREROUTING -j KWP-A\nCOMMIT\n", p).is_ok());
    for bad in [
        "*mangle",
        ":INPUT DROP [0:0]",
        "-F INPUT",
        "-A INPUT -j DROP",
        "-A KWP-A -j KUBE-SERVICES",
        "-A KWP-A -jKUBE-SERVICES",
        "-A KWP-A -vj KUBE-SERVICES",
        "-A KWP-A --ju KUBE-SERVICES",
        "-A KWP-A --goto=KUBE-SERVICES",
        "-A KWP-A --flu",
        "-A KWP-A -m comment --comment \"x\" -j ACCEPT",
    ] {
        assert!(iptables_restore(bad, p).is_err(), "{bad:?} was accepted");
    }
}
