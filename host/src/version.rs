//! `--version`: the binary's version, the WIT contract it speaks (the
//! `package` lines of `wit/`, embedded at build time) and the sha256 of
//! each bundled plugin, so an operator can tell which plugin a digest in
//! `inspect` or a ConfigMap pin refers to.

use std::collections::BTreeSet;

/// The WIT files the host is built against.
const WIT: &[&str] = &[
    include_str!("../../wit/types.wit"),
    include_str!("../../wit/policy.wit"),
    include_str!("../../wit/mode.wit"),
];

/// `kwp:proxy@0.2.0`, one per WIT package.
pub fn wit_packages() -> BTreeSet<String> {
    WIT.iter()
        .flat_map(|text| text.lines())
        .filter_map(|l| l.trim().strip_prefix("package "))
        .map(|p| p.trim_end_matches(';').trim().to_string())
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
