//! Rendering, natively: which set each frontend reaches, the short-circuit
//! of external frontends, and drop vs reject.

use kwp_sdk::mode::ServiceEndpoints;
use kwp_sdk::mode::{Item, ModeConfig};
use kwp_sdk::mode::{ServicePort, SessionAffinity, TrafficPolicy};

use crate::service::render;
use kwp_sdk::testing::mode::{config as cfg, endpoint as ep, service as svc, sets, v4};

/// This node's pods: the cluster CIDR of the namespace tests.
fn cluster_cidr() -> ModeConfig {
    kwp_sdk::testing::mode::config_with_pods_in("10.244.0.0/16")
}

/// Chains by name, and map elements as `map: element`.
fn rendered(
    svc: &ServicePort,
    eps: &ServiceEndpoints,
) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    rendered_with(&cfg(), svc, eps)
}

fn rendered_with(
    cfg: &ModeConfig,
    svc: &ServicePort,
    eps: &ServiceEndpoints,
) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let fragment = render(cfg, svc, eps).unwrap();
    let mut chains = Vec::new();
    let mut elements = Vec::new();
    for item in fragment.items {
        match item {
            Item::NftChain(c) => chains.push((c.name, c.rules)),
            Item::NftElement(e) => elements.push(format!("{}: {}", e.set, e.element)),
            _ => {}
        }
    }
    (chains, elements)
}

fn rules<'a>(chains: &'a [(String, Vec<String>)], name: &str) -> &'a [String] {
    &chains
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no chain {name} in {chains:?}"))
        .1
}

fn dnats(chains: &[(String, Vec<String>)]) -> Vec<String> {
    chains
        .iter()
        .flat_map(|(_, r)| r)
        .filter_map(|r| r.split("dnat to ").nth(1).map(str::to_string))
        .collect()
}

const KEY: &str = "ns.web._.tcp";

#[test]
fn internal_local_external_cluster_sends_node_ports_to_every_endpoint() {
    let local = ep(1, true, true);
    let remote = ep(2, true, false);
    let eps = sets(&[local.clone()], &[local, remote], &[], true);
    let (chains, elements) = rendered(&svc(TrafficPolicy::Local, TrafficPolicy::Cluster), &eps);
    // Each endpoint once, though the local one is in both sets.
    assert_eq!(dnats(&chains), ["10.1.0.1:8080", "10.1.0.2:8080"]);
    let internal = rules(&chains, &format!("svc-{KEY}")).join(" ");
    assert!(
        internal.contains("goto ep-") && !internal.contains(&format!("ep-{KEY}-1")),
        "{internal}"
    );
    let external = rules(&chains, &format!("ext-{KEY}")).join(" ");
    assert!(
        external.contains(&format!("goto ep-{KEY}-0"))
            && external.contains(&format!("goto ep-{KEY}-1")),
        "{external}"
    );
    assert!(external.contains("jump mark-for-masquerade"), "{external}");
    assert!(elements.contains(&format!("service-nodeports: tcp . 30080 : goto ext-{KEY}")));
    assert!(elements.contains(&format!(
        "service-ips: 10.96.0.10 . tcp . 80 : goto svc-{KEY}"
    )));
}

#[test]
fn external_local_uses_a_local_terminating_endpoint() {
    // Ready endpoints elsewhere; here only a serving, terminating one.
    let remote = ep(2, true, false);
    let draining = ep(3, false, true);
    let eps = sets(&[remote.clone()], &[draining], &[remote], true);
    let (chains, elements) = rendered(&svc(TrafficPolicy::Cluster, TrafficPolicy::Local), &eps);
    let external = rules(&chains, &format!("ext-{KEY}")).join(" ");
    assert!(external.contains(&format!("goto ep-{KEY}-1")), "{external}");
    assert!(!external.contains(&format!("ep-{KEY}-0")), "{external}");
    assert!(elements.contains(&format!("service-nodeports: tcp . 30080 : goto ext-{KEY}")));
    assert!(
        !elements.iter().any(|e| e.starts_with("no-endpoint")),
        "{elements:?}"
    );
}

#[test]
fn a_local_policy_drops_with_endpoints_elsewhere_and_rejects_without_any() {
    let remote = ep(2, true, false);
    let both_local = svc(TrafficPolicy::Local, TrafficPolicy::Local);
    let (_, elements) = rendered(&both_local, &sets(&[], &[], &[remote.clone()], true));
    assert!(
        elements.contains(&"no-endpoint-nodeports: tcp . 30080 : drop".to_string()),
        "{elements:?}"
    );
    assert!(elements.contains(&"no-endpoint-services: 10.96.0.10 . tcp . 80 : drop".to_string()));
    let (_, elements) = rendered(&both_local, &sets(&[], &[], &[], false));
    assert!(
        elements.contains(&"no-endpoint-nodeports: tcp . 30080 : goto reject-chain".to_string())
    );
    assert!(
        elements.contains(
            &"no-endpoint-services: 10.96.0.10 . tcp . 80 : goto reject-chain".to_string()
        )
    );
    // externalTrafficPolicy Local alone: the cluster IP still serves, the
    // node port drops (the Service has endpoints, none here).
    let ext_local = svc(TrafficPolicy::Cluster, TrafficPolicy::Local);
    let (_, elements) = rendered(&ext_local, &sets(&[remote.clone()], &[], &[remote], true));
    assert!(
        elements.contains(&"no-endpoint-nodeports: tcp . 30080 : drop".to_string()),
        "{elements:?}"
    );
    assert!(elements.contains(&format!(
        "service-ips: 10.96.0.10 . tcp . 80 : goto svc-{KEY}"
    )));
}

#[test]
fn external_ips_under_external_local_reach_local_endpoints_only() {
    let local = ep(1, true, true);
    let remote = ep(2, true, false);
    let mut port = svc(TrafficPolicy::Cluster, TrafficPolicy::Local);
    port.external_ips = vec![v4([203, 0, 113, 7])];
    let all = [local.clone(), remote];
    let (chains, elements) = rendered(&port, &sets(&all, &[local], &all, true));
    let external = rules(&chains, &format!("ext-{KEY}")).join(" ");
    assert!(
        external.contains(&format!("goto ep-{KEY}-0"))
            && !external.contains(&format!("ep-{KEY}-1")),
        "{external}"
    );
    // Traffic from the node itself goes on as internal traffic.
    assert!(
        external.contains(&format!("fib saddr type local goto svc-{KEY}")),
        "{external}"
    );
    assert!(elements.contains(&format!(
        "service-ips: 203.0.113.7 . tcp . 80 : goto ext-{KEY}"
    )));
}

#[test]
fn affinity_is_one_record_per_endpoint_shared_by_both_sets() {
    let local = ep(1, true, true);
    let remote = ep(2, true, false);
    let mut port = svc(TrafficPolicy::Local, TrafficPolicy::Cluster);
    port.session_affinity = SessionAffinity::ClientIp(60);
    let fragment = render(
        &cfg(),
        &port,
        &sets(&[local.clone()], &[local, remote], &[], true),
    )
    .unwrap();
    let sets: Vec<String> = fragment
        .items
        .iter()
        .filter_map(|i| match i {
            Item::NftSet(s) => Some(s.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(sets, [format!("aff-{KEY}-0"), format!("aff-{KEY}-1")]);
}

/// Both policies Local: clients outside reach the local endpoint with
/// their address kept; this node's pods and the node itself are
/// short-circuited to the cluster-wide set (upstream's cluster policy
/// chain), not to the internal set, which is local too.
#[test]
fn both_policies_local_short_circuit_pods_and_the_node_to_the_cluster_wide_set() {
    let (port, eps) = kwp_sdk::testing::mode::both_local_with_an_external_ip();
    let (chains, elements) = rendered_with(&cluster_cidr(), &port, &eps);
    let cluster = rules(&chains, &format!("cluster-{KEY}")).join(" ");
    assert!(
        cluster.contains(&format!("goto ep-{KEY}-0"))
            && cluster.contains(&format!("goto ep-{KEY}-1")),
        "{cluster}"
    );
    assert!(!cluster.contains("mark-for-masquerade"), "{cluster}");
    let internal = rules(&chains, &format!("svc-{KEY}"));
    assert!(
        !internal.join(" ").contains(&format!("ep-{KEY}-1")),
        "{internal:?}"
    );
    // Its masquerade is for cluster-IP traffic only: outside clients sent
    // on from `ext-` (the local set is the internal one) keep their address.
    assert_eq!(
        internal[0],
        "ip daddr { 10.96.0.10 } tcp dport 80 ip saddr != { 10.244.0.0/16 } jump mark-for-masquerade"
    );
    assert_eq!(
        rules(&chains, &format!("ext-{KEY}")),
        [
            format!("ip saddr {{ 10.244.0.0/16 }} goto cluster-{KEY}"),
            "fib saddr type local jump mark-for-masquerade".to_string(),
            format!("fib saddr type local goto cluster-{KEY}"),
            // The rest: the local set, here the internal one too.
            format!("goto svc-{KEY}"),
        ]
    );
    for wanted in [
        format!("service-nodeports: tcp . 30080 : goto ext-{KEY}"),
        format!("service-ips: 203.0.113.7 . tcp . 80 : goto ext-{KEY}"),
    ] {
        assert!(elements.contains(&wanted), "no {wanted:?} in {elements:?}");
    }
    assert!(
        !elements.iter().any(|e| e.starts_with("no-endpoint")),
        "{elements:?}"
    );
}

/// Both policies Local and no endpoint here: the external chain still
/// short-circuits pods and the node to the remote endpoints; anything else
/// falls through to the drop, which the filter hooks apply after DNAT.
#[test]
fn both_policies_local_without_local_endpoints_keep_the_short_circuit() {
    let remote = ep(2, true, false);
    let mut port = svc(TrafficPolicy::Local, TrafficPolicy::Local);
    port.external_ips = vec![v4([203, 0, 113, 7])];
    let (chains, elements) =
        rendered_with(&cluster_cidr(), &port, &sets(&[], &[], &[remote], true));
    assert_eq!(
        rules(&chains, &format!("ext-{KEY}")),
        [
            format!("ip saddr {{ 10.244.0.0/16 }} goto cluster-{KEY}"),
            "fib saddr type local jump mark-for-masquerade".to_string(),
            format!("fib saddr type local goto cluster-{KEY}"),
        ]
    );
    assert_eq!(dnats(&chains), ["10.1.0.2:8080"]);
    for wanted in [
        format!("service-nodeports: tcp . 30080 : goto ext-{KEY}"),
        "no-endpoint-nodeports: tcp . 30080 : drop".to_string(),
        format!("service-ips: 203.0.113.7 . tcp . 80 : goto ext-{KEY}"),
        "no-endpoint-services: 203.0.113.7 . tcp . 80 : drop".to_string(),
        "no-endpoint-services: 10.96.0.10 . tcp . 80 : drop".to_string(),
    ] {
        assert!(elements.contains(&wanted), "no {wanted:?} in {elements:?}");
    }
    assert!(
        !elements
            .iter()
            .any(|e| e.starts_with("service-ips: 10.96.0.10")),
        "the cluster IP has no local endpoint: {elements:?}"
    );
}

/// The endpoint checks run after DNAT (upstream since kubernetes#132456),
/// node ports on input only, in chains of new names (a base chain's
/// priority cannot be changed in place).
#[test]
fn endpoint_checks_hook_after_dnat() {
    let base = crate::base::render(&cfg()).unwrap();
    let hooked: Vec<(String, String, Vec<String>)> = base
        .items
        .into_iter()
        .filter_map(|i| match i {
            Item::NftChain(c) if c.family == kwp_sdk::mode::NftFamily::Ip => {
                c.hook.map(|h| (c.name, h, c.rules))
            }
            _ => None,
        })
        .filter(|(_, h, _)| h.starts_with("type filter"))
        .collect();
    assert_eq!(hooked.len(), 3, "{hooked:?}");
    for (name, hook, rules) in hooked {
        assert!(name.ends_with("-post-dnat"), "{name}");
        assert!(hook.ends_with("priority filter"), "{hook}");
        let nodeports = rules.iter().any(|r| r.contains("nodeport-endpoints-check"));
        assert_eq!(
            nodeports,
            name == "filter-input-post-dnat",
            "{name}: {rules:?}"
        );
        assert!(
            rules.contains(&"ct state new jump service-endpoints-check".to_string()),
            "{name}: {rules:?}"
        );
    }
}
