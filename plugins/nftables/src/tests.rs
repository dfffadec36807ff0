//! Rendering, natively: which set each frontend reaches, and drop vs reject.

use kwp_sdk::mode::exports::kwp::proxy::mode::{
    DetectLocal, EndpointSet, ModeConfig, ServiceEndpoints,
};
use kwp_sdk::mode::kwp::proxy::plan::Item;
use kwp_sdk::mode::kwp::proxy::types::{
    BackendPlan, Endpoint, IpAddress, NodeInfo, Protocol, ServicePort, SessionAffinity,
    TrafficPolicy,
};

use crate::service::render;

fn v4(a: [u8; 4]) -> IpAddress {
    IpAddress::V4(u32::from_be_bytes(a))
}

fn cfg() -> ModeConfig {
    ModeConfig {
        node: NodeInfo {
            name: "n1".into(),
            addresses: vec![v4([192, 168, 1, 5])],
            zone: None,
            labels: vec![],
        },
        table: "kube-wasm-proxy".into(),
        masquerade_all: false,
        detect_local: DetectLocal::None,
        extra: String::new(),
    }
}

fn svc(internal: TrafficPolicy, external: TrafficPolicy) -> ServicePort {
    ServicePort {
        id: 1,
        namespace: "ns".into(),
        name: "web".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ips: vec![v4([10, 96, 0, 10])],
        port: 80,
        node_port: Some(30080),
        external_ips: vec![],
        load_balancer_ingress: vec![],
        source_ranges: vec![],
        session_affinity: SessionAffinity::None,
        external_traffic_policy: external,
        internal_traffic_policy: internal,
        health_check_node_port: None,
        lb_policy: "round-robin".into(),
        lb_policy_config: String::new(),
    }
}

/// 10.1.0.`last`:8080; `ready` false means serving and terminating.
fn ep(last: u8, ready: bool, local: bool) -> Endpoint {
    Endpoint {
        address: v4([10, 1, 0, last]),
        port: 8080,
        ready,
        serving: true,
        terminating: !ready,
        node_name: None,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
        is_local: local,
    }
}

fn set(eps: &[Endpoint]) -> EndpointSet {
    EndpointSet {
        endpoints: eps.to_vec(),
        backends: BackendPlan::Weights(vec![1; eps.len()]),
    }
}

fn sets(internal: &[Endpoint], external: &[Endpoint], has_any: bool) -> ServiceEndpoints {
    ServiceEndpoints {
        internal: set(internal),
        external: set(external),
        has_any_endpoints: has_any,
    }
}

/// Chains by name, and map elements as `map: element`.
fn rendered(
    svc: &ServicePort,
    eps: &ServiceEndpoints,
) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let fragment = render(&cfg(), svc, eps).unwrap();
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
    let eps = sets(&[local.clone()], &[local, remote], true);
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
    let eps = sets(&[remote], &[draining], true);
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
    let (_, elements) = rendered(&both_local, &sets(&[], &[], true));
    assert!(
        elements.contains(&"no-endpoint-nodeports: tcp . 30080 : drop".to_string()),
        "{elements:?}"
    );
    assert!(elements.contains(&"no-endpoint-services: 10.96.0.10 . tcp . 80 : drop".to_string()));
    let (_, elements) = rendered(&both_local, &sets(&[], &[], false));
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
    let (_, elements) = rendered(&ext_local, &sets(&[remote], &[], true));
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
    let (chains, elements) = rendered(&port, &sets(&[local.clone(), remote], &[local], true));
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
        &sets(&[local.clone()], &[local, remote], true),
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
