//! One service port's chains and its rules in the shared dispatch chains.

use kwp_sdk::hash::stable_hash;
use kwp_sdk::mode::{Fragment, Item};
use kwp_sdk::mode::{IpMode, Protocol, ServicePort, SessionAffinity, TrafficPolicy};
use kwp_sdk::mode::{ModeConfig, ServiceEndpoints};
use kwp_sdk::sets::MergedSets;

use crate::Settings;
use crate::family::{Fam, V4, V6};

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// `ns/name:port` as upstream names a service port (in comments and errors).
fn display(svc: &ServicePort) -> String {
    let port = if svc.port_name.is_empty() {
        String::new()
    } else {
        format!(":{}", svc.port_name)
    };
    format!("{}/{}{port}", svc.namespace, svc.name)
}

/// A chain name `KWP-<kind>-<16 base32 chars>`: at most 28 characters (the
/// kernel's limit) and stable for the same input, like upstream's hashed
/// `KUBE-SVC-` names.
pub fn chain_name(kind: &str, input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = (u128::from(stable_hash(input.as_bytes())) << 64)
        | u128::from(stable_hash(format!("{input}\0").as_bytes()));
    let hash: String = (0..16)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect();
    format!("KWP-{kind}-{hash}")
}

/// Both families: a dual-stack Service has a cluster IP (and endpoints) in
/// each; a single-stack one renders nothing for the other family.
pub fn render(
    cfg: &ModeConfig,
    s: &Settings,
    svc: &ServicePort,
    endpoints: &ServiceEndpoints,
) -> Result<Fragment, String> {
    let sets = MergedSets::new(endpoints).map_err(|e| format!("Service {}: {e}", display(svc)))?;
    // `-m statistic` draws independently per connection: it cannot hash a
    // client flow into a slot table, so the plan's meaning would be lost.
    if sets.internal.slots.is_some()
        || sets.external.slots.is_some()
        || sets.cluster.slots.is_some()
    {
        return Err(format!(
            "Service {}: policy {:?} plans a consistent-hash slot table, which iptables mode cannot express (use nftables mode, or a weighted policy)",
            display(svc),
            svc.lb_policy
        ));
    }
    let mut items = Vec::new();
    for f in [V4, V6] {
        if svc.cluster_ips.iter().any(|ip| f.ip(ip).is_some()) {
            items.extend(render_family(cfg, s, f, svc, &sets));
        }
    }
    Ok(Fragment { items })
}

/// What one family of one service port renders, chain by chain.
struct Out {
    f: Fam,
    items: Vec<Item>,
}

impl Out {
    fn nat(&mut self, name: &str, rules: Vec<String>) {
        self.items.push(self.f.chain("nat", name, rules));
    }
}

fn render_family(
    cfg: &ModeConfig,
    _settings: &Settings,
    f: Fam,
    svc: &ServicePort,
    sets: &MergedSets,
) -> Vec<Item> {
    let endpoints = &sets.endpoints;
    let p = proto(svc.protocol);
    let key = format!("{}{}/{p}", display(svc), if f.ipv6 { "/6" } else { "" });
    let comment = format!("-m comment --comment {}", display(svc));
    let svc_chain = chain_name("SVC", &key);
    let ext_chain = chain_name("EXT", &key);
    let cluster_chain = chain_name("CLU", &key);
    let fw_chain = chain_name("FW", &key);
    let dport = |port: u16| format!("-p {p} -m {p} --dport {port}");
    let mut out = Out {
        f,
        items: Vec::new(),
    };
    // Only this family's endpoints can back its DNAT.
    let usable: Vec<usize> = (0..endpoints.len())
        .filter(|i| f.ip(&endpoints[*i].address).is_some())
        .collect();
    let affinity = match svc.session_affinity {
        SessionAffinity::ClientIp(t) => Some(t.max(1)),
        SessionAffinity::None => None,
    };
    let sep = |i: usize| {
        let ep = &endpoints[i];
        chain_name(
            "SEP",
            &format!(
                "{key}/{}",
                f.host_port(&f.ip(&ep.address).unwrap_or_default(), ep.port)
            ),
        )
    };

    // Per-endpoint chains: hairpin masquerade, affinity record, DNAT.
    for &i in &usable {
        let ep = &endpoints[i];
        let ip = f.ip(&ep.address).unwrap_or_default();
        let name = sep(i);
        let recent = match affinity {
            Some(_) => format!(" -m recent --name {name} --set"),
            None => String::new(),
        };
        out.nat(
            &name,
            vec![
                format!("{comment} -s {} -j KWP-MARK-MASQ", f.host(&ip)),
                format!(
                    "{comment} -p {p}{recent} -m {p} -j DNAT --to-destination {}",
                    f.host_port(&ip, ep.port)
                ),
            ],
        );
    }

    // Internal traffic: the endpoints the host chose for this service's
    // internal traffic policy (weight > 0), spread by the policy's weights.
    let weights = &sets.internal.weights;
    let internal = members(&usable, weights);
    let cluster_ips: Vec<String> = svc.cluster_ips.iter().filter_map(|ip| f.ip(ip)).collect();
    if !internal.is_empty() {
        let mut rules = Vec::new();
        for ip in &cluster_ips {
            let to = format!("-d {} {}", f.host(ip), dport(svc.port));
            if cfg.masquerade_all {
                rules.push(format!("{comment} {to} -j KWP-MARK-MASQ"));
            } else if let Some(not_local) = f.detect_local(cfg, false) {
                rules.push(format!("{comment} {not_local} {to} -j KWP-MARK-MASQ"));
            }
        }
        rules.extend(pick(&comment, &internal, weights, affinity, &sep));
        out.nat(&svc_chain, rules);
    }

    // The short-circuit under externalTrafficPolicy Local: this node's pods
    // and the node itself reach external frontends through the host's
    // cluster-wide set, as upstream (not the local one, nor the internal
    // one, which is local too under internalTrafficPolicy Local).
    let local_only = svc.external_traffic_policy == TrafficPolicy::Local;
    let has_external = !svc.external_ips.is_empty()
        || !svc.load_balancer_ingress.is_empty()
        || svc.node_port.is_some();
    let short = if has_external && local_only {
        members(&usable, &sets.cluster.weights)
    } else {
        Vec::new()
    };
    let short_chain = if sets.cluster_is_internal {
        svc_chain.clone()
    } else {
        cluster_chain
    };
    if !short.is_empty() && !sets.cluster_is_internal {
        let rules = pick(&comment, &short, &sets.cluster.weights, affinity, &sep);
        out.nat(&short_chain, rules);
    }

    // External traffic (node ports, external IPs, load-balancer IPs).
    // The set the host chose for the external traffic policy, with its own
    // plan. The chain also exists with that set empty while the
    // short-circuit has somewhere to go (upstream's EXT chain with no
    // local endpoint).
    let ext_weights = &sets.external.weights;
    let external = if has_external {
        members(&usable, ext_weights)
    } else {
        Vec::new()
    };
    let uses_ext_chain = sets.has_any && (!external.is_empty() || !short.is_empty());
    if uses_ext_chain {
        let mut rules = Vec::new();
        if local_only {
            // From outside, keep the client address and use local
            // endpoints only; from this node's pods and the node itself,
            // every endpoint (masqueraded from the node: its source is the
            // frontend, a local address).
            if !short.is_empty()
                && let Some(local) = f.detect_local(cfg, true)
            {
                rules.push(format!("{comment} {local} -j {short_chain}"));
            }
            rules.push(format!(
                "{comment} -m addrtype --src-type LOCAL -j KWP-MARK-MASQ"
            ));
            if !short.is_empty() {
                rules.push(format!(
                    "{comment} -m addrtype --src-type LOCAL -j {short_chain}"
                ));
            }
        } else {
            rules.push(format!("{comment} -j KWP-MARK-MASQ"));
        }
        // With no external endpoint, anything else returns un-DNATed to
        // the filter table's drop (KWP-EXTERNAL-SERVICES).
        if sets.external_is_internal && !internal.is_empty() {
            rules.push(format!("{comment} -j {svc_chain}"));
        } else if !external.is_empty() {
            rules.extend(pick(&comment, &external, ext_weights, affinity, &sep));
        }
        out.nat(&ext_chain, rules);
    }

    // Dispatch: nat for served frontends, filter for those without
    // endpoints: as upstream, they drop while the Service has endpoints on
    // other nodes (a Local policy) and reject when it has none at all.
    let no_endpoints = if sets.has_any { "DROP" } else { "REJECT" };
    let mut service_ips = Vec::new();
    let mut filter_services = Vec::new();
    let mut filter_external = Vec::new();
    let mut firewall = Vec::new();
    for ip in &cluster_ips {
        let to = format!("{comment} -d {} {}", f.host(ip), dport(svc.port));
        if internal.is_empty() {
            let verdict = no_endpoints;
            filter_services.push(format!("{to} -j {verdict}"));
        } else {
            service_ips.push(format!("{to} -j {svc_chain}"));
        }
    }
    let lb_ips: Vec<String> = svc
        .load_balancer_ingress
        .iter()
        .filter(|lb| lb.ip_mode == IpMode::Vip)
        .filter_map(|lb| f.ip(&lb.ip))
        .collect();
    let external_ips: Vec<String> = svc.external_ips.iter().filter_map(|ip| f.ip(ip)).collect();
    // loadBalancerSourceRanges, as upstream: nat `KWP-FW-H` sends allowed
    // sources on to the external chain; the rest fall through un-DNATed and
    // filter `KWP-PROXY-FIREWALL` drops them by their LB destination.
    let ranges: Vec<String> = svc.source_ranges.iter().filter_map(|c| f.cidr(c)).collect();
    let firewalled = !svc.source_ranges.is_empty() && uses_ext_chain;
    if firewalled && !lb_ips.is_empty() {
        out.nat(
            &fw_chain,
            ranges
                .iter()
                .map(|r| format!("{comment} -s {r} -j {ext_chain}"))
                .collect(),
        );
    }
    for ip in external_ips.iter().chain(&lb_ips) {
        let to = format!("{comment} -d {} {}", f.host(ip), dport(svc.port));
        let lb = lb_ips.contains(ip) && !external_ips.contains(ip);
        if lb && firewalled {
            service_ips.push(format!("{to} -j {fw_chain}"));
            firewall.push(format!("{to} -j DROP"));
        } else if uses_ext_chain {
            service_ips.push(format!("{to} -j {ext_chain}"));
        }
        // Dropped unless short-circuited (DNATed) by the external chain.
        if external.is_empty() {
            filter_external.push(format!("{to} -j {}", no_endpoints));
        }
    }
    let mut node_ports = Vec::new();
    if let Some(np) = svc.node_port {
        if uses_ext_chain {
            node_ports.push(format!("{comment} {} -j {ext_chain}", dport(np)));
        }
        if external.is_empty() {
            filter_external.push(format!(
                "{comment} -m addrtype --dst-type LOCAL {} -j {}",
                dport(np),
                no_endpoints
            ));
        }
    }
    let mut health = Vec::new();
    if let Some(hc) = svc.health_check_node_port {
        health.push(format!("{comment} -p tcp -m tcp --dport {hc} -j ACCEPT"));
    }
    // Only the dispatch chains this Service adds to: an empty contribution
    // would still be a rewrite of a shared chain for nothing.
    for (table, chain, rules) in [
        ("nat", "KWP-SERVICE-IPS", service_ips),
        ("nat", "KWP-NODEPORTS", node_ports),
        ("filter", "KWP-SERVICES", filter_services),
        ("filter", "KWP-EXTERNAL-SERVICES", filter_external),
        ("filter", "KWP-PROXY-FIREWALL", firewall),
        ("filter", "KWP-NODEPORTS", health),
    ] {
        if !rules.is_empty() {
            out.items.push(f.chain(table, chain, rules));
        }
    }
    out.items
}

/// The endpoints of `usable` (merged indices) a set reaches: weight above 0.
fn members(usable: &[usize], weights: &[u32]) -> Vec<usize> {
    usable.iter().copied().filter(|i| weights[*i] > 0).collect()
}

/// Existing ClientIP affinity first, then a weighted random pick: endpoint
/// i of the remaining ones is taken with probability w_i / (sum of the
/// remaining weights), the last one unconditionally, so each endpoint gets
/// w_i / W of new connections.
fn pick(
    comment: &str,
    eps: &[usize],
    weights: &[u32],
    affinity: Option<u32>,
    sep: &dyn Fn(usize) -> String,
) -> Vec<String> {
    let mut rules = Vec::new();
    if let Some(timeout) = affinity {
        for &i in eps {
            let name = sep(i);
            rules.push(format!(
                "{comment} -m recent --name {name} --rcheck --seconds {timeout} --reap -j {name}"
            ));
        }
    }
    let mut remaining: u64 = eps.iter().map(|i| u64::from(weights[*i])).sum();
    for (n, &i) in eps.iter().enumerate() {
        let w = u64::from(weights[i]);
        if n + 1 == eps.len() {
            rules.push(format!("{comment} -j {}", sep(i)));
        } else {
            rules.push(format!(
                "{comment} -m statistic --mode random --probability {:.10} -j {}",
                w as f64 / remaining as f64,
                sep(i)
            ));
        }
        remaining -= w;
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_are_stable() {
        let a = chain_name("SEP", "default/web:http/tcp/10.0.0.1:80");
        assert_eq!(a.len(), 24);
        assert!(a.len() <= 28);
        assert_eq!(a, chain_name("SEP", "default/web:http/tcp/10.0.0.1:80"));
        assert_ne!(a, chain_name("SEP", "default/web:http/tcp/10.0.0.2:80"));
    }

    #[test]
    fn probabilities_follow_the_weights() {
        let sep = |i: usize| format!("E{i}");
        assert_eq!(
            pick("c", &[0, 1, 2], &[1, 1, 1], None, &sep),
            [
                "c -m statistic --mode random --probability 0.3333333333 -j E0",
                "c -m statistic --mode random --probability 0.5000000000 -j E1",
                "c -j E2"
            ]
        );
        assert_eq!(
            pick("c", &[0, 2], &[3, 0, 1], Some(60), &sep),
            [
                "c -m recent --name E0 --rcheck --seconds 60 --reap -j E0",
                "c -m recent --name E2 --rcheck --seconds 60 --reap -j E2",
                "c -m statistic --mode random --probability 0.7500000000 -j E0",
                "c -j E2"
            ]
        );
    }
}
