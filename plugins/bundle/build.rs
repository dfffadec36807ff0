use kwp_wasm_build::{Guest, build, write_table};

/// (crate, artifact) of every bundled plugin.
const PLUGINS: &[(&str, &str)] = &[
    ("kwp-plugin-round-robin", "kwp_plugin_round_robin"),
    ("kwp-plugin-random", "kwp_plugin_random"),
    ("kwp-plugin-userspace", "kwp_plugin_userspace"),
    ("kwp-plugin-nftables", "kwp_plugin_nftables"),
    ("kwp-plugin-ipvs", "kwp_plugin_ipvs"),
    ("kwp-plugin-iptables", "kwp_plugin_iptables"),
    ("kwp-plugin-maglev", "kwp_plugin_maglev"),
    ("kwp-plugin-weighted", "kwp_plugin_weighted"),
    (
        "kwp-plugin-least-connections",
        "kwp_plugin_least_connections",
    ),
];

fn main() {
    let guests: Vec<_> = PLUGINS.iter().map(|(p, _)| Guest::Package(p)).collect();
    let built = build(&guests);
    let names: Vec<_> = PLUGINS.iter().map(|(_, a)| *a).collect();
    write_table("bundle.rs", &built, &names);
}
