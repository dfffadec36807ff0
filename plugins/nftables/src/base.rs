//! The node-wide base: hook chains, dispatch maps and helper chains.

use kwp_sdk::mode::exports::kwp::proxy::mode::ModeConfig;
use kwp_sdk::mode::kwp::proxy::plan::{Fragment, Item, NftChain, NftElement, NftFamily, NftSet};
use kwp_sdk::mode::kwp::proxy::types::IpAddress;

/// The packet mark bit meaning "masquerade me" (upstream's default bit 14).
pub const MASQ_MARK: &str = "0x4000";

pub fn chain(cfg: &ModeConfig, name: &str, hook: Option<&str>, rules: Vec<String>) -> Item {
    Item::NftChain(NftChain {
        family: NftFamily::Ip,
        table: cfg.table.clone(),
        name: name.into(),
        hook: hook.map(str::to_string),
        rules,
    })
}

pub fn element(cfg: &ModeConfig, set: &str, element: String) -> Item {
    Item::NftElement(NftElement { family: NftFamily::Ip, table: cfg.table.clone(), set: set.into(), element })
}

fn set(cfg: &ModeConfig, name: &str, declaration: &str) -> Item {
    Item::NftSet(NftSet { family: NftFamily::Ip, table: cfg.table.clone(), name: name.into(), declaration: declaration.into() })
}

pub fn ipv4(ip: &IpAddress) -> Option<String> {
    match ip {
        IpAddress::V4(bits) => Some(std::net::Ipv4Addr::from(*bits).to_string()),
        IpAddress::V6(_) => None,
    }
}

pub fn render(cfg: &ModeConfig) -> Result<Fragment, String> {
    let rules = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Node ports answer on the node's addresses (upstream's "primary"
    // default); with no Node object known, on every local address.
    let node_ips: Vec<String> = cfg.node.addresses.iter().filter_map(ipv4).collect();
    let on_node = if node_ips.is_empty() { "fib daddr type local" } else { "ip daddr @nodeport-ips" };
    let mut items = vec![
        set(cfg, "service-ips", "type ipv4_addr . inet_proto . inet_service : verdict"),
        set(cfg, "service-nodeports", "type inet_proto . inet_service : verdict"),
        set(cfg, "no-endpoint-services", "type ipv4_addr . inet_proto . inet_service : verdict"),
        set(cfg, "no-endpoint-nodeports", "type inet_proto . inet_service : verdict"),
        set(cfg, "nodeport-ips", "type ipv4_addr"),
        // Fast-path Services (see service.rs) keep their masquerade and
        // hairpin decisions in these sets instead of chains of their own.
        set(cfg, "masq-services", "type ipv4_addr . inet_proto . inet_service"),
        set(cfg, "masq-nodeports", "type inet_proto . inet_service"),
        set(cfg, "cluster-ips", "type ipv4_addr . inet_proto . inet_service"),
        set(cfg, "hairpin", "type ipv4_addr . ipv4_addr"),
        chain(cfg, "nat-prerouting", Some("type nat hook prerouting priority dstnat"), rules(&["jump services"])),
        chain(cfg, "nat-output", Some("type nat hook output priority -100"), rules(&["jump services"])),
        chain(
            cfg,
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat"),
            rules(&["ct status dnat ip saddr . ip daddr @hairpin masquerade", "jump masquerading"]),
        ),
        chain(
            cfg,
            "services",
            None,
            [
                vec!["ip daddr . meta l4proto . th dport @masq-services jump mark-for-masquerade".to_string()],
                cluster_cidrs(cfg)
                    .map(|c| format!("ip saddr != {{ {c} }} ip daddr . meta l4proto . th dport @cluster-ips jump mark-for-masquerade"))
                    .into_iter()
                    .collect(),
                vec![
                    format!("{on_node} meta l4proto . th dport @masq-nodeports jump mark-for-masquerade"),
                    "ip daddr . meta l4proto . th dport vmap @service-ips".into(),
                    format!("{on_node} meta l4proto . th dport vmap @service-nodeports"),
                ],
            ]
            .concat(),
        ),
        chain(
            cfg,
            "masquerading",
            None,
            vec![
                format!("meta mark & {MASQ_MARK} == 0 return"),
                format!("meta mark set meta mark ^ {MASQ_MARK}"),
                "masquerade fully-random".into(),
            ],
        ),
        chain(cfg, "mark-for-masquerade", None, vec![format!("meta mark set meta mark | {MASQ_MARK}")]),
        chain(
            cfg,
            "service-endpoints-check",
            None,
            vec![
                "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".into(),
                format!("{on_node} meta l4proto . th dport vmap @no-endpoint-nodeports"),
            ],
        ),
        chain(cfg, "reject-chain", None, rules(&["reject"])),
    ];
    for hook in ["input", "forward", "output"] {
        items.push(chain(
            cfg,
            &format!("filter-{hook}"),
            Some(&format!("type filter hook {hook} priority -110")),
            rules(&["ct state new jump service-endpoints-check"]),
        ));
    }
    for ip in node_ips {
        items.push(element(cfg, "nodeport-ips", ip));
    }
    Ok(Fragment { items })
}

/// The IPv4 cluster CIDRs as an nft set body, if any.
pub fn cluster_cidrs(cfg: &ModeConfig) -> Option<String> {
    let v4: Vec<&str> = cfg.cluster_cidrs.iter().map(String::as_str).filter(|c| c.contains('.')).collect();
    (!v4.is_empty()).then(|| v4.join(", "))
}
