//! The node-wide base: hook chains, dispatch maps and helper chains, once
//! per IP family.

use kwp_sdk::mode::ModeConfig;
use kwp_sdk::mode::{Fragment, Item};

use crate::family::{Fam, V4, V6};

/// The packet mark bit meaning "masquerade me" (upstream's default bit 14).
pub const MASQ_MARK: &str = "0x4000";

pub fn render(cfg: &ModeConfig) -> Result<Fragment, String> {
    let mut items = Vec::new();
    for fam in [V4, V6] {
        items.extend(render_family(cfg, fam)?);
    }
    Ok(Fragment { items })
}

fn render_family(cfg: &ModeConfig, f: Fam) -> Result<Vec<Item>, String> {
    let (l3, addr) = (f.l3, f.addr);
    // Node ports answer on the node's addresses (upstream's "primary"
    // default); with no Node object known, on every local address.
    let node_ips: Vec<String> = cfg.node.addresses.iter().filter_map(|a| f.ip(a)).collect();
    let on_node = if cfg.node.addresses.is_empty() {
        "fib daddr type local".to_string()
    } else {
        format!("{l3} daddr @nodeport-ips")
    };
    let frontend = format!("{l3} daddr . meta l4proto . th dport");
    let mut services = vec![format!(
        "{frontend} @masq-services jump mark-for-masquerade"
    )];
    if let Some(not_local) = f.not_local(cfg)? {
        services.push(format!(
            "{not_local} {frontend} @cluster-ips jump mark-for-masquerade"
        ));
    }
    services.extend([
        format!("{on_node} meta l4proto . th dport @masq-nodeports jump mark-for-masquerade"),
        format!("{frontend} vmap @service-ips"),
        format!("{on_node} meta l4proto . th dport vmap @service-nodeports"),
    ]);
    let mut items = vec![
        f.set(
            cfg,
            "service-ips",
            format!("type {addr} . inet_proto . inet_service : verdict"),
        ),
        f.set(
            cfg,
            "service-nodeports",
            "type inet_proto . inet_service : verdict".into(),
        ),
        f.set(
            cfg,
            "no-endpoint-services",
            format!("type {addr} . inet_proto . inet_service : verdict"),
        ),
        f.set(
            cfg,
            "no-endpoint-nodeports",
            "type inet_proto . inet_service : verdict".into(),
        ),
        f.set(cfg, "nodeport-ips", format!("type {addr}")),
        // Fast-path Services (see service.rs) keep their masquerade and
        // hairpin decisions in these sets instead of chains of their own.
        f.set(
            cfg,
            "masq-services",
            format!("type {addr} . inet_proto . inet_service"),
        ),
        f.set(
            cfg,
            "masq-nodeports",
            "type inet_proto . inet_service".into(),
        ),
        f.set(
            cfg,
            "cluster-ips",
            format!("type {addr} . inet_proto . inet_service"),
        ),
        f.set(cfg, "hairpin", format!("type {addr} . {addr}")),
        f.chain(
            cfg,
            "nat-prerouting",
            Some("type nat hook prerouting priority dstnat"),
            vec!["jump services".into()],
        ),
        f.chain(
            cfg,
            "nat-output",
            Some("type nat hook output priority -100"),
            vec!["jump services".into()],
        ),
        f.chain(
            cfg,
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat"),
            vec![
                format!("ct status dnat {l3} saddr . {l3} daddr @hairpin masquerade"),
                "jump masquerading".into(),
            ],
        ),
        f.chain(cfg, "services", None, services),
        f.chain(
            cfg,
            "masquerading",
            None,
            vec![
                format!("meta mark & {MASQ_MARK} == 0 return"),
                format!("meta mark set meta mark ^ {MASQ_MARK}"),
                "masquerade fully-random".into(),
            ],
        ),
        f.chain(
            cfg,
            "mark-for-masquerade",
            None,
            vec![format!("meta mark set meta mark | {MASQ_MARK}")],
        ),
        f.chain(
            cfg,
            "service-endpoints-check",
            None,
            vec![format!("{frontend} vmap @no-endpoint-services")],
        ),
        f.chain(
            cfg,
            "nodeport-endpoints-check",
            None,
            vec![format!(
                "{on_node} meta l4proto . th dport vmap @no-endpoint-nodeports"
            )],
        ),
        f.chain(cfg, "reject-chain", None, vec!["reject".into()]),
    ];
    // After DNAT, as upstream since kubernetes#132456 (in 1.34): what
    // a Service's pods or this node send to an external frontend is
    // DNATed by its short-circuit first and so never meets the drop of a
    // frontend with no local endpoint. Node ports are checked on input
    // only: the node's own packets to them are DNATed in the output hook.
    // New names, not the old pre-DNAT chains re-hooked: the kernel cannot
    // change a base chain's priority, and the reconcile deletes the old
    // chains in the same transaction.
    for hook in ["input", "forward", "output"] {
        let mut rules = Vec::new();
        if hook == "input" {
            rules.push("ct state new jump nodeport-endpoints-check".to_string());
        }
        rules.push("ct state new jump service-endpoints-check".to_string());
        items.push(f.chain(
            cfg,
            &format!("filter-{hook}-post-dnat"),
            Some(&format!("type filter hook {hook} priority filter")),
            rules,
        ));
    }
    for ip in node_ips {
        items.push(f.element(cfg, "nodeport-ips", ip));
    }
    Ok(items)
}
