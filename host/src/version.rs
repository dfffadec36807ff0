//! `--version`: the binary's version, the WIT contract it speaks (the
//! versioned `package` lines of `sdk/wit/`, embedded at build time) and the sha256 of
//! each bundled plugin, so an operator can tell which plugin a digest in
//! `inspect` or a ConfigMap pin refers to.

use std::collections::BTreeSet;

/// The WIT files the host is built against.
/// The WIT files the host is built against (a test checks that this is
/// every file of `sdk/wit/`).
const WIT: &[&str] = &[
    include_str!("../../sdk/wit/contract.wit"),
    include_str!("../../sdk/wit/deps/types@0.3.0/types.wit"),
    include_str!("../../sdk/wit/deps/policy@0.3.0/policy.wit"),
    include_str!("../../sdk/wit/deps/mode@0.4.0/mode.wit"),
    include_str!("../../sdk/wit/deps/mode@0.4.0/plan.wit"),
];

/// `kwp:policy@0.3.0`, one per versioned WIT package (the unversioned
/// `kwp:contract` index never appears in a component).
pub fn wit_packages() -> BTreeSet<String> {
    WIT.iter()
        .flat_map(|text| text.lines())
        .filter_map(|l| l.trim().strip_prefix("package "))
        .map(|p| p.trim_end_matches(';').trim().to_string())
        .filter(|p| p.contains('@'))
        .collect()
}

/// What `--version` prints.
pub fn long() -> String {
    let mut out = format!(
        "kube-wasm-proxy {}\nWIT contract: {}\nbundled plugins (sha256):\n",
        env!("CARGO_PKG_VERSION"),
        wit_packages().into_iter().collect::<Vec<_>>().join(", ")
    );
    for (name, bytes) in kwp_plugins_bundle::bundled() {
        let digest = crate::plugin::PluginDigest::of(bytes);
        out.push_str(&format!("  {name:<18} {digest}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package added to `sdk/wit/` without a line in `WIT` would be
    /// missing from `--version` and from the host's version checks.
    #[test]
    fn every_wit_file_is_embedded() {
        fn count(dir: &std::path::Path) -> usize {
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .map(|p| match p.is_dir() {
                    true => count(&p),
                    false => usize::from(p.extension().is_some_and(|x| x == "wit")),
                })
                .sum()
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/wit");
        assert_eq!(count(&dir), WIT.len());
        let packages = wit_packages();
        assert_eq!(packages.len(), 3, "{packages:?}");
        // Each package sits in deps/<name>@<version>/, as its line says.
        for p in &packages {
            let dir_name = p.strip_prefix("kwp:").unwrap();
            assert!(dir.join("deps").join(dir_name).is_dir(), "{p}");
        }
    }
}
