//! The node-wide base, once per IP family: the entry chains the host jumps
//! to from the built-in chains, masquerading, and the (empty) dispatch
//! chains that every Service adds its rules to.

use kwp_sdk::mode::ModeConfig;
use kwp_sdk::mode::{Fragment, Item};

use crate::Settings;
use crate::family::{Fam, V4, V6};

pub fn render(cfg: &ModeConfig, s: &Settings) -> Result<Fragment, String> {
    let mut items = Vec::new();
    for fam in [V4, V6] {
        items.extend(render_family(cfg, s, fam));
    }
    Ok(Fragment { items })
}

/// The matches that select "addressed to a node port", per family, as
/// upstream's iptables mode chooses them:
/// - nodePortAddresses without a CIDR of this family (unset, the default):
///   every local address (`addrtype LOCAL`), less loopback for IPv6 (never
///   routed) and for IPv4 unless localhostNodePorts is in effect;
/// - `primary`: the node's IP of this family (every local address when
///   the node has none);
/// - CIDRs: the local addresses within them (the host lists them in
///   `node.addresses`), loopback ones only where allowed.
pub fn node_port_destinations(cfg: &ModeConfig, s: &Settings, f: Fam) -> Vec<String> {
    let mut ips = cfg.node.addresses.iter().filter_map(|a| f.ip(a));
    let loopback_ok = !f.ipv6 && s.localhost_node_ports_in_effect(has_primary_ipv4(cfg));
    let to = |ip: &String| format!("-d {}", f.host(ip));
    if s.node_port_addresses.iter().any(|c| c == "primary") {
        // Upstream never takes a loopback node IP as primary.
        if let Some(ip) = ips.find(|ip| !is_loopback(ip)) {
            return vec![to(&ip)];
        }
    } else if !s.node_port_cidrs(f.ipv6).is_empty() {
        return ips
            .filter(|ip| loopback_ok || !is_loopback(ip))
            .map(|ip| to(&ip))
            .collect();
    }
    let mut m = "-m addrtype --dst-type LOCAL".to_string();
    if f.ipv6 {
        m.push_str(" ! -d ::1/128");
    } else if !loopback_ok {
        m.push_str(" ! -d 127.0.0.0/8");
    }
    vec![m]
}

/// Whether the node has an IPv4 address `primary` can stand for.
fn has_primary_ipv4(cfg: &ModeConfig) -> bool {
    (cfg.node.addresses.iter().filter_map(|a| V4.ip(a))).any(|ip| !is_loopback(&ip))
}

fn is_loopback(ip: &str) -> bool {
    ip.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// With node ports on 127.0.0.1 the kernel must route loopback
/// destinations (`route_localnet`, which the host sets when it sees this
/// chain); this drops what that would let in from outside: packets to
/// 127.0.0.0/8 not from it and not DNATed to a node port's endpoint.
pub const LOCALNET_GUARD: &str = "KWP-FIREWALL";

fn render_family(cfg: &ModeConfig, s: &Settings, f: Fam) -> Vec<Item> {
    let mark = s.mark();
    let mut services = vec!["-j KWP-SERVICE-IPS".to_string()];
    // Node ports last: a service IP that is also a node address matches
    // its own rule first.
    for dst in node_port_destinations(cfg, s, f) {
        services.push(format!("{dst} -j KWP-NODEPORTS"));
    }
    let mut items = vec![
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
    ];
    if !f.ipv6 && s.localhost_node_ports_in_effect(has_primary_ipv4(cfg)) {
        items.push(f.chain(
            "filter",
            LOCALNET_GUARD,
            vec![
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
                    .into(),
            ],
        ));
    }
    items
}

#[cfg(test)]
mod tests {
    use kwp_sdk::mode::DetectLocal;
    use kwp_sdk::mode::{IpAddress, NodeInfo};

    use super::*;

    fn cfg(addresses: &[[u8; 4]]) -> ModeConfig {
        ModeConfig {
            node: NodeInfo {
                name: "n1".into(),
                addresses: addresses
                    .iter()
                    .map(|a| IpAddress::V4(u32::from_be_bytes(*a)))
                    .collect(),
                zone: None,
                labels: vec![],
            },
            table: String::new(),
            masquerade_all: false,
            detect_local: DetectLocal::None,
            extra: String::new(),
        }
    }

    fn settings(json: &str) -> Settings {
        Settings::parse(json).unwrap()
    }

    /// Upstream's iptables mode: unset means every local address (the
    /// Node's addresses do not matter), loopback included while
    /// localhostNodePorts is on; "primary" the node's IP; CIDRs the local
    /// addresses within them (the host lists those).
    #[test]
    fn node_port_destinations_are_upstreams() {
        let node = cfg(&[[203, 0, 113, 1], [198, 51, 100, 1]]);
        let unset = settings(r#"{"nodePortAddresses":[]}"#);
        assert_eq!(
            node_port_destinations(&node, &unset, V4),
            ["-m addrtype --dst-type LOCAL"]
        );
        assert_eq!(
            node_port_destinations(&node, &unset, V6),
            ["-m addrtype --dst-type LOCAL ! -d ::1/128"]
        );
        let off = settings(r#"{"localhostNodePorts":false,"nodePortAddresses":[]}"#);
        assert_eq!(
            node_port_destinations(&node, &off, V4),
            ["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8"]
        );
        let primary = settings(r#"{"nodePortAddresses":["primary"]}"#);
        assert_eq!(
            node_port_destinations(&node, &primary, V4),
            ["-d 203.0.113.1/32"]
        );
        let local = cfg(&[[127, 0, 0, 1], [203, 0, 113, 1]]);
        let cidrs = settings(r#"{"nodePortAddresses":["127.0.0.0/8","203.0.113.0/24"]}"#);
        assert_eq!(
            node_port_destinations(&local, &cidrs, V4),
            ["-d 127.0.0.1/32", "-d 203.0.113.1/32"]
        );
        let cidrs_off = settings(
            r#"{"localhostNodePorts":false,"nodePortAddresses":["127.0.0.0/8","203.0.113.0/24"]}"#,
        );
        assert_eq!(
            node_port_destinations(&local, &cidrs_off, V4),
            ["-d 203.0.113.1/32"]
        );
        assert_eq!(
            node_port_destinations(&local, &cidrs, V6),
            ["-m addrtype --dst-type LOCAL ! -d ::1/128"],
            "no IPv6 CIDR: every IPv6 address"
        );
        // The guard goes with localhost node ports, IPv4 only.
        let guard = |s: &Settings, f: Fam| {
            render_family(&node, s, f)
                .iter()
                .any(|i| matches!(i, Item::IptablesChain(c) if c.name == LOCALNET_GUARD))
        };
        assert!(guard(&unset, V4));
        assert!(!guard(&unset, V6));
        assert!(!guard(&off, V4));
        assert!(!guard(&primary, V4));
        // Primary on a node without IPv4: upstream's IPv4 side is then
        // every address, 127.0.0.1 included, with the guard.
        let mut v6_only = cfg(&[]);
        (v6_only.node.addresses).push(IpAddress::V6((0x2001_0db8 << 32, 1)));
        assert_eq!(
            node_port_destinations(&v6_only, &primary, V4),
            ["-m addrtype --dst-type LOCAL"]
        );
        assert!(
            render_family(&v6_only, &primary, V4)
                .iter()
                .any(|i| matches!(i, Item::IptablesChain(c) if c.name == LOCALNET_GUARD))
        );
    }
}
