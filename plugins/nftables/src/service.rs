//! One service port's chains and map elements.

use kwp_sdk::mode::{
    BackendPlan, Endpoint, IpMode, Protocol, ServicePort, SessionAffinity, TrafficPolicy,
};
use kwp_sdk::mode::{Fragment, Item, NftSet};
use kwp_sdk::mode::{ModeConfig, ServiceEndpoints};
use kwp_sdk::sets::MergedSets;

use crate::family::{Fam, V4, V6};

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// `ns.name.port.proto`: unique, since Kubernetes names cannot hold dots.
fn key(svc: &ServicePort) -> String {
    let port = if svc.port_name.is_empty() {
        "_"
    } else {
        svc.port_name.as_str()
    };
    format!(
        "{}.{}.{}.{}",
        svc.namespace,
        svc.name,
        port,
        proto(svc.protocol)
    )
}

/// Both families: a dual-stack Service has a cluster IP (and endpoints) in
/// each; a single-stack one renders nothing for the other family.
pub fn render(
    cfg: &ModeConfig,
    svc: &ServicePort,
    endpoints: &ServiceEndpoints,
) -> Result<Fragment, String> {
    let sets = MergedSets::new(endpoints).map_err(|e| format!("Service {}: {e}", key(svc)))?;
    let mut items = Vec::new();
    for f in [V4, V6] {
        if svc.cluster_ips.iter().any(|ip| f.ip(ip).is_some()) {
            items.extend(render_family(cfg, f, svc, &sets)?.items);
        }
    }
    Ok(Fragment { items })
}

/// Whether traffic can arrive from outside (node port, external or LB IP).
fn externally_accessible(svc: &ServicePort) -> bool {
    !svc.external_ips.is_empty() || !svc.load_balancer_ingress.is_empty() || svc.node_port.is_some()
}

fn render_family(
    cfg: &ModeConfig,
    f: Fam,
    svc: &ServicePort,
    sets: &MergedSets,
) -> Result<Fragment, String> {
    let endpoints = &sets.endpoints;
    if fast_path(svc, sets) {
        return Ok(render_fast(
            cfg,
            f,
            svc,
            endpoints,
            &sets.internal.weights,
            sets.has_any,
        ));
    }
    let l3 = f.l3;
    let key = key(svc);
    let p = proto(svc.protocol);
    let svc_chain = format!("svc-{key}");
    let ext_chain = format!("ext-{key}");
    let fw_chain = format!("fw-{key}");
    let mut items: Vec<Item> = Vec::new();
    // Only IPv4 endpoints can back an `ip` table's DNAT.
    let usable: Vec<usize> = (0..endpoints.len())
        .filter(|i| f.ip(&endpoints[*i].address).is_some())
        .collect();

    // Per-endpoint chains.
    let affinity = match svc.session_affinity {
        SessionAffinity::ClientIp(t) => Some(t.max(1)),
        SessionAffinity::None => None,
    };
    for &i in &usable {
        let ep = &endpoints[i];
        let ip = f.ip(&ep.address).expect("usable");
        let mut rules = vec![format!("{l3} saddr {ip} jump mark-for-masquerade")];
        if let Some(timeout) = affinity {
            let set = format!("aff-{key}-{i}");
            items.push(Item::NftSet(NftSet {
                family: f.family,
                table: cfg.table.clone(),
                name: set.clone(),
                declaration: format!(
                    "type {}; flags dynamic,timeout; timeout {timeout}s;",
                    f.addr
                ),
            }));
            rules.push(format!("update @{set} {{ {l3} saddr }}"));
        }
        rules.push(format!(
            "meta l4proto {p} dnat to {}",
            f.host_port(&ip, ep.port)
        ));
        items.push(f.chain(cfg, &format!("ep-{key}-{i}"), None, rules));
    }

    // Internal traffic: the endpoints the host chose for this service's
    // internal traffic policy, spread by the policy's plan.
    let weights = &sets.internal.weights;
    let internal = members(&usable, weights);
    if !internal.is_empty() {
        // Only traffic to the cluster IP, as upstream: external traffic
        // and the short-circuit reach this chain too and must keep their
        // own masquerade decision (a client's address under
        // externalTrafficPolicy Local).
        let cluster_ips: Vec<String> = svc.cluster_ips.iter().filter_map(|ip| f.ip(ip)).collect();
        let to_cluster_ip = format!(
            "{l3} daddr {{ {} }} {p} dport {}",
            cluster_ips.join(", "),
            svc.port
        );
        let mut rules = Vec::new();
        if cfg.masquerade_all {
            rules.push(format!("{to_cluster_ip} jump mark-for-masquerade"));
        } else if let Some(not_local) = f.not_local(cfg)? {
            rules.push(format!(
                "{to_cluster_ip} {not_local} jump mark-for-masquerade"
            ));
        }
        rules.extend(affinity_rules(l3, &key, &internal, affinity));
        rules.push(selection(
            l3,
            &key,
            &internal,
            weights,
            &sets.internal.plan(),
        ));
        items.push(f.chain(cfg, &svc_chain, None, rules));
    }

    // The short-circuit under externalTrafficPolicy Local: this node's pods
    // and the node itself reach external frontends through the host's
    // cluster-wide set, as upstream (not the local one, nor the internal
    // one, which is local too under internalTrafficPolicy Local).
    let local_only = svc.external_traffic_policy == TrafficPolicy::Local;
    let accessible = externally_accessible(svc);
    let cluster_weights = &sets.cluster.weights;
    let short = if accessible && local_only {
        members(&usable, cluster_weights)
    } else {
        Vec::new()
    };
    let short_chain = if sets.cluster_is_internal {
        svc_chain.clone()
    } else {
        format!("cluster-{key}")
    };
    if !short.is_empty() && !sets.cluster_is_internal {
        let mut rules = affinity_rules(l3, &key, &short, affinity);
        rules.push(selection(
            l3,
            &key,
            &short,
            cluster_weights,
            &sets.cluster.plan(),
        ));
        items.push(f.chain(cfg, &short_chain, None, rules));
    }

    // External traffic (node ports, external IPs, load-balancer IPs): the
    // set the host chose for the external traffic policy, with its own plan.
    // The chain also exists with that set empty while the short-circuit has
    // somewhere to go (upstream's EXT chain with no local endpoint).
    let ext_weights = &sets.external.weights;
    let external = if accessible {
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
            // every endpoint (masqueraded from the node: its source is
            // the frontend, a local address).
            if !short.is_empty()
                && let Some(local) = f.is_local(cfg)?
            {
                rules.push(format!("{local} goto {short_chain}"));
            }
            rules.push("fib saddr type local jump mark-for-masquerade".to_string());
            if !short.is_empty() {
                rules.push(format!("fib saddr type local goto {short_chain}"));
            }
        } else {
            rules.push("jump mark-for-masquerade".to_string());
        }
        // With no external endpoint, anything else falls through un-DNATed
        // to the drop of `no-endpoint-services` / `no-endpoint-nodeports`.
        if sets.external_is_internal && !internal.is_empty() {
            rules.push(format!("goto {svc_chain}"));
        } else if !external.is_empty() {
            rules.extend(affinity_rules(l3, &key, &external, affinity));
            rules.push(selection(
                l3,
                &key,
                &external,
                ext_weights,
                &sets.external.plan(),
            ));
        }
        items.push(f.chain(cfg, &ext_chain, None, rules));
    }

    // Map elements. A frontend with no endpoint drops while the Service has
    // endpoints on other nodes (a Local policy) and rejects when it has none.
    let no_endpoints = no_endpoint_verdict(sets.has_any);
    let internal_verdict = if internal.is_empty() {
        None
    } else {
        Some(format!("goto {svc_chain}"))
    };
    for ip in svc.cluster_ips.iter().filter_map(|ip| f.ip(ip)) {
        match &internal_verdict {
            Some(v) => items.push(f.element(
                cfg,
                "service-ips",
                format!("{ip} . {p} . {} : {v}", svc.port),
            )),
            None => items.push(f.element(
                cfg,
                "no-endpoint-services",
                format!("{ip} . {p} . {} : {}", svc.port, no_endpoints),
            )),
        }
    }
    // An external frontend goes to the external chain while it exists, and
    // is dropped (or rejected) by the filter hooks when its own set is
    // empty: then only short-circuited packets, DNATed, get past them.
    let external_verdict = uses_ext_chain.then(|| format!("goto {ext_chain}"));
    let no_external = external.is_empty();
    let mut external_ips: Vec<String> = svc.external_ips.iter().filter_map(|ip| f.ip(ip)).collect();
    let lb_ips: Vec<String> = svc
        .load_balancer_ingress
        .iter()
        .filter(|lb| lb.ip_mode == IpMode::Vip)
        .filter_map(|lb| f.ip(&lb.ip))
        .collect();
    let firewall = !svc.source_ranges.is_empty() && !lb_ips.is_empty();
    if firewall {
        let ranges: Vec<String> = svc
            .source_ranges
            .iter()
            .filter_map(|c| f.ip(&c.address).map(|a| format!("{a}/{}", c.prefix_len)))
            .collect();
        let mut rules = Vec::new();
        if !ranges.is_empty() {
            rules.push(format!("{l3} saddr != {{ {} }} drop", ranges.join(", ")));
        }
        // Sources outside the ranges are dropped whether or not the
        // Service has endpoints (upstream checks the firewall first);
        // without endpoints the chain is entered from the filter hooks'
        // no-endpoint map and ends as that map would.
        rules.push(match &external_verdict {
            Some(_) => format!("goto {ext_chain}"),
            None => no_endpoints.clone(),
        });
        items.push(f.chain(cfg, &fw_chain, None, rules));
    }
    for ip in &lb_ips {
        if firewall {
            let to_fw = format!("{ip} . {p} . {} : goto {fw_chain}", svc.port);
            if external_verdict.is_some() {
                items.push(f.element(cfg, "service-ips", to_fw));
                if no_external {
                    items.push(f.element(
                        cfg,
                        "no-endpoint-services",
                        format!("{ip} . {p} . {} : {no_endpoints}", svc.port),
                    ));
                }
            } else {
                items.push(f.element(cfg, "no-endpoint-services", to_fw));
            }
        } else {
            external_ips.push(ip.clone());
        }
    }
    for ip in &external_ips {
        let frontend = format!("{ip} . {p} . {}", svc.port);
        if let Some(v) = &external_verdict {
            items.push(f.element(cfg, "service-ips", format!("{frontend} : {v}")));
        }
        if no_external {
            items.push(f.element(
                cfg,
                "no-endpoint-services",
                format!("{frontend} : {no_endpoints}"),
            ));
        }
    }
    if let Some(node_port) = svc.node_port {
        let frontend = format!("{p} . {node_port}");
        if let Some(v) = &external_verdict {
            items.push(f.element(cfg, "service-nodeports", format!("{frontend} : {v}")));
        }
        if no_external {
            items.push(f.element(
                cfg,
                "no-endpoint-nodeports",
                format!("{frontend} : {no_endpoints}"),
            ));
        }
    }
    Ok(Fragment { items })
}

/// The endpoints of `usable` (merged indices) a set reaches: weight above 0.
fn members(usable: &[usize], weights: &[u32]) -> Vec<usize> {
    usable.iter().copied().filter(|i| weights[*i] > 0).collect()
}

/// What a frontend without endpoints does, as upstream: drop when the
/// Service has endpoints elsewhere, reject when it has none at all.
fn no_endpoint_verdict(has_any: bool) -> String {
    if has_any {
        "drop".to_string()
    } else {
        "goto reject-chain".to_string()
    }
}

/// Most Services need no chain of their own: no affinity, no source ranges
/// on LB IPs, externalTrafficPolicy Cluster, a weighted (not hashed)
/// plan, one set for every frontend. They are pure map elements, which
/// keeps the kernel's per-transaction validation (linear in the number of
/// chains) small.
fn fast_path(svc: &ServicePort, sets: &MergedSets) -> bool {
    let firewall = !svc.source_ranges.is_empty()
        && svc
            .load_balancer_ingress
            .iter()
            .any(|lb| lb.ip_mode == IpMode::Vip);
    let one_set = sets.external_is_internal || !externally_accessible(svc);
    sets.internal.slots.is_none()
        && one_set
        && svc.session_affinity == SessionAffinity::None
        && svc.external_traffic_policy == TrafficPolicy::Cluster
        && !firewall
}

/// A fast-path Service: for W slots (endpoints repeated by weight), each
/// frontend maps to `goto class-W`, whose one rule DNATs through
/// `backends-W` keyed by frontend and `numgen random mod W`.
fn render_fast(
    cfg: &ModeConfig,
    f: Fam,
    svc: &ServicePort,
    endpoints: &[Endpoint],
    weights: &[u32],
    has_any: bool,
) -> Fragment {
    let p = proto(svc.protocol);
    let l3 = f.l3;
    let mut items = Vec::new();
    let slots: Vec<(String, u16)> = endpoints
        .iter()
        .zip(weights)
        .filter_map(|(ep, w)| {
            f.ip(&ep.address)
                .map(|ip| std::iter::repeat_n((ip, ep.port), *w as usize))
        })
        .flatten()
        .collect();
    let w = slots.len();
    let cluster: Vec<String> = svc.cluster_ips.iter().filter_map(|ip| f.ip(ip)).collect();
    let external: Vec<String> = svc
        .external_ips
        .iter()
        .filter_map(|ip| f.ip(ip))
        .chain(
            svc.load_balancer_ingress
                .iter()
                .filter(|lb| lb.ip_mode == IpMode::Vip)
                .filter_map(|lb| f.ip(&lb.ip)),
        )
        .collect();
    if w == 0 {
        let verdict = no_endpoint_verdict(has_any);
        for ip in cluster.iter().chain(&external) {
            items.push(f.element(
                cfg,
                "no-endpoint-services",
                format!("{ip} . {p} . {} : {verdict}", svc.port),
            ));
        }
        if let Some(np) = svc.node_port {
            items.push(f.element(
                cfg,
                "no-endpoint-nodeports",
                format!("{p} . {np} : {verdict}"),
            ));
        }
        return Fragment { items };
    }
    let class = |prefix: &str, key: &str| -> Vec<Item> {
        vec![
            Item::NftSet(NftSet {
                family: f.family,
                table: cfg.table.clone(),
                name: format!("{prefix}backends-{w}"),
                declaration: format!("typeof {key} . numgen random mod {w} : {l3} daddr . th dport"),
            }),
            f.chain(
                cfg,
                &format!("{prefix}class-{w}"),
                None,
                vec![format!("meta l4proto {{ tcp, udp, sctp }} dnat {l3} to {key} . numgen random mod {w} map @{prefix}backends-{w}")],
            ),
        ]
    };
    items.extend(class("", &format!("{l3} daddr . meta l4proto . th dport")));
    for (i, ip) in cluster.iter().chain(&external).enumerate() {
        let frontend = format!("{ip} . {p} . {}", svc.port);
        items.push(f.element(cfg, "service-ips", format!("{frontend} : goto class-{w}")));
        for (j, (ep, port)) in slots.iter().enumerate() {
            items.push(f.element(
                cfg,
                &format!("backends-{w}"),
                format!("{frontend} . {j} : {ep} . {port}"),
            ));
        }
        let is_external = i >= cluster.len();
        if is_external || cfg.masquerade_all {
            items.push(f.element(cfg, "masq-services", frontend));
        } else {
            items.push(f.element(cfg, "cluster-ips", frontend));
        }
    }
    if let Some(np) = svc.node_port {
        items.extend(class("np-", "meta l4proto . th dport"));
        items.push(f.element(
            cfg,
            "service-nodeports",
            format!("{p} . {np} : goto np-class-{w}"),
        ));
        for (j, (ep, port)) in slots.iter().enumerate() {
            items.push(f.element(
                cfg,
                &format!("np-backends-{w}"),
                format!("{p} . {np} . {j} : {ep} . {port}"),
            ));
        }
        items.push(f.element(cfg, "masq-nodeports", format!("{p} . {np}")));
    }
    let mut pods: Vec<&String> = slots.iter().map(|(ip, _)| ip).collect();
    pods.sort();
    pods.dedup();
    for ip in pods {
        items.push(f.element(cfg, "hairpin", format!("{ip} . {ip}")));
    }
    Fragment { items }
}

/// Existing ClientIP affinity wins over a new pick.
fn affinity_rules(l3: &str, key: &str, eps: &[usize], affinity: Option<u32>) -> Vec<String> {
    match affinity {
        Some(_) => eps
            .iter()
            .map(|i| format!("{l3} saddr @aff-{key}-{i} goto ep-{key}-{i}"))
            .collect(),
        None => Vec::new(),
    }
}

/// The rule choosing among `eps`: `numgen` over weight ranges, or a hash
/// of the client address into the policy's slot table.
fn selection(l3: &str, key: &str, eps: &[usize], weights: &[u32], plan: &BackendPlan) -> String {
    if let BackendPlan::Slots(slots) = plan {
        let allowed: Vec<u32> = slots
            .iter()
            .copied()
            .filter(|s| eps.contains(&(*s as usize)))
            .collect();
        if allowed.len() == slots.len() && !slots.is_empty() {
            let entries = runs(slots.iter().map(|s| *s as usize))
                .into_iter()
                .map(|(lo, hi, ep)| arm(key, lo, hi, ep))
                .collect::<Vec<_>>();
            // A fixed seed: without one the kernel picks a random seed per
            // rule, and every re-render would reshuffle all clients.
            return format!(
                "jhash {l3} saddr mod {} seed {JHASH_SEED:#x} vmap {{ {} }}",
                slots.len(),
                entries.join(", ")
            );
        }
    }
    let mut arms = Vec::new();
    let mut at = 0u32;
    for &i in eps {
        let w = weights[i].max(1);
        arms.push(arm(key, at, at + w - 1, i));
        at += w;
    }
    format!("numgen random mod {at} vmap {{ {} }}", arms.join(", "))
}

const JHASH_SEED: u32 = 0x6b77_7031;

fn arm(key: &str, lo: u32, hi: u32, ep: usize) -> String {
    if lo == hi {
        format!("{lo} : goto ep-{key}-{ep}")
    } else {
        format!("{lo}-{hi} : goto ep-{key}-{ep}")
    }
}

/// Consecutive equal values as (first index, last index, value).
fn runs(values: impl Iterator<Item = usize>) -> Vec<(u32, u32, usize)> {
    let mut out: Vec<(u32, u32, usize)> = Vec::new();
    for (i, v) in values.enumerate() {
        match out.last_mut() {
            Some((_, hi, last)) if *last == v => *hi = i as u32,
            _ => out.push((i as u32, i as u32, v)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_the_plan() {
        assert_eq!(
            selection(
                "ip",
                "k",
                &[0, 1],
                &[1, 1],
                &BackendPlan::Weights(vec![1, 1])
            ),
            "numgen random mod 2 vmap { 0 : goto ep-k-0, 1 : goto ep-k-1 }"
        );
        assert_eq!(
            selection(
                "ip",
                "k",
                &[0, 2],
                &[3, 0, 1],
                &BackendPlan::Weights(vec![3, 0, 1])
            ),
            "numgen random mod 4 vmap { 0-2 : goto ep-k-0, 3 : goto ep-k-2 }"
        );
        assert_eq!(
            selection(
                "ip",
                "k",
                &[0, 1],
                &[2, 1],
                &BackendPlan::Slots(vec![0, 0, 1])
            ),
            "jhash ip saddr mod 3 seed 0x6b777031 vmap { 0-1 : goto ep-k-0, 2 : goto ep-k-1 }"
        );
        assert!(kwp_sdk::mode_weights(&BackendPlan::Weights(vec![1]), 2).is_err());
        assert!(kwp_sdk::mode_weights(&BackendPlan::Slots(vec![5]), 2).is_err());
    }
}
