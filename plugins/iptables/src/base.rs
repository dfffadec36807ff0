//! The node-wide base, once per IP family: the entry chains the host jumps
//! to from the built-in chains, masquerading, and the (empty) dispatch
//! chains that every Service adds its rules to.

use kwp_sdk::mode::exports::kwp::proxy::mode::ModeConfig;
use kwp_sdk::mode::kwp::proxy::plan::{Fragment, Item};

use crate::Settings;
use crate::family::{Fam, V4, V6};

pub fn render(cfg: &ModeConfig, s: &Settings) -> Result<Fragment, String> {
    let mut items = Vec::new();
    for fam in [V4, V6] {
        items.extend(render_family(cfg, s, fam));
    }
    Ok(Fragment { items })
}

/// The matches that select "addressed to a node port": the node's
/// addresses when known (or limited by nodePortAddresses), else every local
/// address, where localhostNodePorts false (and IPv6, which never routes
/// loopback) excludes the loopback range as upstream does.
pub fn node_port_destinations(cfg: &ModeConfig, s: &Settings, f: Fam) -> Vec<String> {
    let ips: Vec<String> = cfg.node.addresses.iter().filter_map(|a| f.ip(a)).collect();
    if !cfg.node.addresses.is_empty() {
        return ips.iter().map(|ip| format!("-d {}", f.host(ip))).collect();
    }
    let mut m = "-m addrtype --dst-type LOCAL".to_string();
    if f.ipv6 {
        m.push_str(" ! -d ::1/128");
    } else if !s.localhost_node_ports {
        m.push_str(" ! -d 127.0.0.0/8");
    }
    vec![m]
}

fn render_family(cfg: &ModeConfig, s: &Settings, f: Fam) -> Vec<Item> {
    let mark = s.mark();
    let mut services = vec!["-j KWP-SERVICE-IPS".to_string()];
    // Node ports last: a service IP that is also a node address matches
    // its own rule first.
    for dst in node_port_destinations(cfg, s, f) {
        services.push(format!("{dst} -j KWP-NODEPORTS"));
    }
    vec![
        f.chain("nat", "KWP-SERVICES", services),
        f.chain("nat", "KWP-SERVICE-IPS", vec![]),
        f.chain("nat", "KWP-NODEPORTS", vec![]),
        f.chain(
            "nat",
            "KWP-MARK-MASQ",
            vec![format!("-j MARK --or-mark {mark}")],
        ),
        f.chain(
            "nat",
            "KWP-POSTROUTING",
            vec![
                format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                // Clear the mark so a re-traversal (hairpin) is not masqueraded twice.
                format!("-j MARK --xor-mark {mark}"),
                "-j MASQUERADE --random-fully".into(),
            ],
        ),
        f.chain(
            "filter",
            "KWP-FORWARD",
            vec![
                "-m conntrack --ctstate INVALID -j DROP".into(),
                format!("-m mark --mark {mark}/{mark} -j ACCEPT"),
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            ],
        ),
        f.chain("filter", "KWP-SERVICES", vec![]),
        f.chain("filter", "KWP-EXTERNAL-SERVICES", vec![]),
        f.chain("filter", "KWP-PROXY-FIREWALL", vec![]),
        f.chain("filter", "KWP-NODEPORTS", vec![]),
    ]
}
