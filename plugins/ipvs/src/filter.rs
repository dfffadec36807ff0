//! One Service port's elements in the packet-filter sets of `base.rs`,
//! with the keys upstream's IPVS proxier puts in its ipsets.

use kwp_sdk::mode::Item;
use kwp_sdk::mode::ModeConfig;
use kwp_sdk::mode::{Cidr, Endpoint, IpAddress, IpMode, Protocol, ServicePort, TrafficPolicy};

use crate::family::{Fam, V4, V6};

/// Whether the Service has endpoints that take new connections, for
/// traffic to its cluster IPs and from outside (node ports, external and
/// load-balancer IPs).
pub struct Usable {
    pub internal: bool,
    pub external: bool,
    /// The Service has a usable endpoint on some node.
    pub has_any: bool,
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// Every family the Service has a cluster IP in.
pub fn render(
    cfg: &ModeConfig,
    svc: &ServicePort,
    endpoints: &[Endpoint],
    usable: &Usable,
) -> Vec<Item> {
    let mut items = Vec::new();
    for f in [V4, V6] {
        if svc.cluster_ips.iter().any(|ip| f.ip(ip).is_some()) {
            render_family(cfg, f, svc, endpoints, usable, &mut items);
        }
    }
    items
}

fn render_family(
    cfg: &ModeConfig,
    f: Fam,
    svc: &ServicePort,
    endpoints: &[Endpoint],
    usable: &Usable,
    items: &mut Vec<Item>,
) {
    let p = proto(svc.protocol);
    let port = svc.port;
    let mut add = |set: &str, element: String| items.push(f.element(cfg, set, element));
    let ips = |list: &mut dyn Iterator<Item = &IpAddress>| -> Vec<String> {
        list.filter_map(|ip| f.ip(ip)).collect()
    };
    let node_ips = ips(&mut cfg.node.addresses.iter());
    let local_policy = svc.external_traffic_policy == TrafficPolicy::Local;
    // No endpoint anywhere: reject; endpoints only elsewhere (a Local
    // policy): drop, as upstream's other modes.
    let verdict = if usable.has_any {
        "drop"
    } else {
        "goto reject-chain"
    };
    for ip in ips(&mut svc.cluster_ips.iter()) {
        add("cluster-ips", format!("{ip} . {p} . {port}"));
        add("ipvs-ips", ip.clone());
        if !usable.internal {
            add(
                "no-endpoint-services",
                format!("{ip} . {p} . {port} : {verdict}"),
            );
        }
    }
    let external = |ip: &String, set: &str, add: &mut dyn FnMut(&str, String)| {
        add(set, format!("{ip} . {p} . {port}"));
        if !node_ips.contains(ip) {
            add("ipvs-ips", ip.clone());
        }
        if !usable.external {
            add(
                "no-endpoint-services",
                format!("{ip} . {p} . {port} : {}", verdict),
            );
        }
    };
    let external_set = if local_policy {
        "external-ips-local"
    } else {
        "external-ips"
    };
    for ip in ips(&mut svc.external_ips.iter()) {
        external(&ip, external_set, &mut add);
    }
    let lbs: Vec<IpAddress> = svc
        .load_balancer_ingress
        .iter()
        .filter(|lb| lb.ip_mode == IpMode::Vip)
        .map(|lb| lb.ip)
        .collect();
    let ranges: Vec<(String, Cidr)> = svc
        .source_ranges
        .iter()
        .filter_map(|c| network(f, c).map(|text| (text, *c)))
        .collect();
    // The node's own traffic to the LB is allowed when a range holds a
    // node address (upstream checks the node IP of the family).
    let from_node = cfg
        .node
        .addresses
        .iter()
        .any(|a| ranges.iter().any(|(_, c)| contains(c, a)));
    for lb in ips(&mut lbs.iter()) {
        external(&lb, "lb-ips", &mut add);
        if local_policy {
            add("lb-ips-local", format!("{lb} . {p} . {port}"));
        }
        if svc.source_ranges.is_empty() {
            continue;
        }
        add("lb-fw", format!("{lb} . {p} . {port}"));
        for (net, _) in &ranges {
            add("lb-source-cidrs", format!("{lb} . {p} . {port} . {net}"));
        }
        if from_node {
            add("lb-source-ips", format!("{lb} . {p} . {port} . {lb}"));
        } else {
            add("lb-no-node-access", format!("{lb} . {p} . {port}"));
        }
    }
    if let Some(np) = svc.node_port {
        add("node-ports", format!("{p} . {np}"));
        if local_policy {
            add("node-ports-local", format!("{p} . {np}"));
        }
        if !usable.external {
            add("no-endpoint-nodeports", format!("{p} . {np} : {}", verdict));
        }
    }
    if let Some(hc) = svc.health_check_node_port {
        add("health-check-node-ports", hc.to_string());
    }
    // Hairpin: a local endpoint reaching itself through the Service.
    for ep in endpoints.iter().filter(|e| e.is_local) {
        if let Some(ip) = f.ip(&ep.address) {
            add("loop-back", format!("{ip} . {p} . {} . {ip}", ep.port));
        }
    }
}

/// `c` as nft writes a network of family `f` (host bits cleared, which
/// nft requires of an interval element); `None` for the other family.
fn network(f: Fam, c: &Cidr) -> Option<String> {
    let masked = mask(c)?;
    Some(format!("{}/{}", f.ip(&masked)?, c.prefix_len))
}

fn mask(c: &Cidr) -> Option<IpAddress> {
    match c.address {
        IpAddress::V4(bits) if c.prefix_len <= 32 => Some(IpAddress::V4(
            bits & u32::MAX
                .checked_shl(32 - u32::from(c.prefix_len))
                .unwrap_or(0),
        )),
        IpAddress::V6((hi, lo)) if c.prefix_len <= 128 => {
            let all = (u128::from(hi) << 64) | u128::from(lo);
            let m = all
                & u128::MAX
                    .checked_shl(128 - u32::from(c.prefix_len))
                    .unwrap_or(0);
            Some(IpAddress::V6(((m >> 64) as u64, m as u64)))
        }
        _ => None,
    }
}

fn contains(c: &Cidr, ip: &IpAddress) -> bool {
    let one = Cidr {
        address: *ip,
        prefix_len: c.prefix_len,
    };
    matches!((mask(c), mask(&one)), (Some(a), Some(b)) if a == b)
}
