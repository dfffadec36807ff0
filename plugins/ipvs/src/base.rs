//! The node-wide packet filter of IPVS mode, in kwp's own `ip`/`ip6`
//! tables: upstream builds it from ipsets and iptables chains; here the
//! ipsets are nft sets of the same keys (VIP . protocol . port, ...) that
//! each Service fills with elements (`filter.rs`), and the chains are
//! upstream's, rule for rule where nftables has the same meaning:
//!
//! | upstream | here |
//! |---|---|
//! | KUBE-CLUSTER-IP, KUBE-EXTERNAL-IP(-LOCAL), KUBE-LOAD-BALANCER(-LOCAL, -FW) | `cluster-ips`, `external-ips(-local)`, `lb-ips(-local)`, `lb-fw` |
//! | KUBE-LOAD-BALANCER-SOURCE-CIDR / -SOURCE-IP | `lb-source-cidrs` / `lb-source-ips` |
//! | KUBE-NODE-PORT-{TCP,UDP,SCTP}(-LOCAL) | `node-ports(-local)`, keyed by protocol . port |
//! | KUBE-HEALTH-CHECK-NODE-PORT, KUBE-IPVS-IPS, KUBE-LOOP-BACK | `health-check-node-ports`, `ipvs-ips`, `loop-back` |
//! | nat KUBE-SERVICES, KUBE-LOAD-BALANCER, KUBE-NODE-PORT, KUBE-POSTROUTING, KUBE-MARK-MASQ | `services`, `load-balancer`, `node-port`, `nat-postrouting` + `masquerading`, `mark-for-masquerade` |
//! | filter KUBE-PROXY-FIREWALL, KUBE-SOURCE-RANGES-FIREWALL, KUBE-IPVS-FILTER, KUBE-IPVS-OUT-FILTER | `firewall`, `source-ranges`, `ipvs-filter`, `ipvs-out-filter` |
//!
//! Added beside upstream's: `endpoints-check` rejects new connections to
//! a Service without endpoints and drops them for externalTrafficPolicy
//! Local without local endpoints, as kube-proxy's other modes do.

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
    let ip_port = format!("type {addr} . inet_proto . inet_service");
    let ip_port_ip = format!("{ip_port} . {addr}");
    let proto_port = "type inet_proto . inet_service".to_string();
    let sets = [
        ("cluster-ips", ip_port.clone()),
        ("external-ips", ip_port.clone()),
        ("external-ips-local", ip_port.clone()),
        ("lb-ips", ip_port.clone()),
        ("lb-ips-local", ip_port.clone()),
        ("lb-fw", ip_port.clone()),
        ("lb-source-cidrs", format!("{ip_port_ip}; flags interval")),
        ("lb-source-ips", ip_port_ip.clone()),
        ("lb-no-node-access", ip_port.clone()),
        ("node-ports", proto_port.clone()),
        ("node-ports-local", proto_port.clone()),
        ("health-check-node-ports", "type inet_service".into()),
        ("ipvs-ips", format!("type {addr}")),
        ("loop-back", ip_port_ip),
        ("no-endpoint-services", format!("{ip_port} : verdict")),
        ("no-endpoint-nodeports", format!("{proto_port} : verdict")),
    ];
    let mut items: Vec<Item> = sets
        .into_iter()
        .map(|(name, decl)| f.set(cfg, name, decl))
        .collect();
    let dst = format!("{l3} daddr . meta l4proto . th dport");
    let loopback = if l3 == "ip" { "127.0.0.0/8" } else { "::1" };
    // Cluster IPs: masquerade what does not come from this node's pods
    // (or everything under masqueradeAll); with no local detection, what
    // the node sends from a VIP (upstream's "src,dst" match).
    let cluster = if cfg.masquerade_all {
        format!("{dst} @cluster-ips jump mark-for-masquerade")
    } else if let Some(not_local) = f.not_local(cfg)? {
        format!("{not_local} {dst} @cluster-ips jump mark-for-masquerade")
    } else {
        format!("{l3} saddr . meta l4proto . th dport @cluster-ips jump mark-for-masquerade")
    };
    let chains: Vec<(&str, Option<&str>, Vec<String>)> = vec![
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority dstnat"),
            vec!["jump services".into()],
        ),
        (
            "nat-output",
            Some("type nat hook output priority -100"),
            vec!["jump services".into()],
        ),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat"),
            vec![
                // Hairpin: a local endpoint reached through a VIP from itself.
                format!("{dst} . {l3} saddr @loop-back masquerade"),
                "jump masquerading".into(),
            ],
        ),
        (
            "masquerading",
            None,
            vec![
                format!("meta mark & {MASQ_MARK} == 0 return"),
                format!("meta mark set meta mark ^ {MASQ_MARK}"),
                "masquerade fully-random".into(),
            ],
        ),
        (
            "mark-for-masquerade",
            None,
            vec![format!("meta mark set meta mark | {MASQ_MARK}")],
        ),
        (
            "services",
            None,
            vec![
                format!("{l3} saddr {loopback} return"),
                format!("{dst} @lb-ips jump load-balancer"),
                cluster,
                format!("{dst} @external-ips jump mark-for-masquerade"),
                format!("{dst} @external-ips return"),
                format!("{dst} @external-ips-local return"),
                "fib daddr type local jump node-port".into(),
            ],
        ),
        (
            "load-balancer",
            None,
            vec![
                format!("{dst} @lb-ips-local return"),
                "jump mark-for-masquerade".into(),
            ],
        ),
        (
            "node-port",
            None,
            vec![
                "meta l4proto . th dport @node-ports-local return".into(),
                "meta l4proto . th dport @node-ports jump mark-for-masquerade".into(),
            ],
        ),
        (
            "firewall",
            None,
            vec![format!("{dst} @lb-fw jump source-ranges")],
        ),
        (
            "source-ranges",
            None,
            vec![
                format!("{dst} . {l3} saddr @lb-source-cidrs return"),
                format!("{dst} . {l3} saddr @lb-source-ips return"),
                "drop".into(),
            ],
        ),
        (
            // Only Services answer on kube-ipvs0 addresses, not the node's
            // own listeners (kubernetes#72236).
            "ipvs-filter",
            None,
            vec![
                format!("{dst} @lb-ips return"),
                format!("{dst} @cluster-ips return"),
                format!("{dst} @external-ips return"),
                format!("{dst} @external-ips-local return"),
                "tcp dport @health-check-node-ports return".into(),
                format!("ct state new {l3} daddr @ipvs-ips reject"),
            ],
        ),
        (
            // The node itself may not reach a load balancer whose source
            // ranges leave it out (kubernetes#119656). Hooked before IPVS
            // rewrites the destination, so no ipvs match is needed.
            "ipvs-out-filter",
            None,
            vec![format!("{dst} @lb-no-node-access drop")],
        ),
        (
            "endpoints-check",
            None,
            vec![
                format!("{dst} vmap @no-endpoint-services"),
                "fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports".into(),
            ],
        ),
        ("reject-chain", None, vec!["reject".into()]),
        (
            "filter-input",
            Some("type filter hook input priority -110"),
            vec![
                "jump firewall".into(),
                "jump ipvs-filter".into(),
                "ct state new jump endpoints-check".into(),
            ],
        ),
        (
            "filter-forward",
            Some("type filter hook forward priority -110"),
            vec![
                "jump firewall".into(),
                "ct state new jump endpoints-check".into(),
            ],
        ),
        (
            "filter-output",
            Some("type filter hook output priority -110"),
            vec![
                "jump ipvs-out-filter".into(),
                "ct state new jump endpoints-check".into(),
            ],
        ),
    ];
    items.extend(
        chains
            .into_iter()
            .map(|(name, hook, rules)| f.chain(cfg, name, hook, rules)),
    );
    Ok(items)
}
