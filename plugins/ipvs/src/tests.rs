//! Rendering, natively: which virtual and real servers a Service gets.

use kwp_sdk::mode::DetectLocal;
use kwp_sdk::mode::{LoadBalancerIngress, NodeInfo, Protocol};

use super::*;
use kwp_sdk::mode::{BackendPlan, TrafficPolicy};

pub(super) fn v4(a: [u8; 4]) -> IpAddress {
    IpAddress::V4(u32::from_be_bytes(a))
}

pub(super) fn mode() -> ModeConfig {
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

pub(super) fn svc(policy: &str) -> ServicePort {
    ServicePort {
        id: 1,
        namespace: "ns".into(),
        name: "web".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ips: vec![v4([10, 96, 0, 10])],
        port: 80,
        node_port: Some(30080),
        external_ips: vec![v4([203, 0, 113, 7])],
        load_balancer_ingress: vec![
            LoadBalancerIngress {
                ip: v4([198, 51, 100, 1]),
                ip_mode: IpMode::Vip,
            },
            LoadBalancerIngress {
                ip: v4([198, 51, 100, 2]),
                ip_mode: IpMode::Proxy,
            },
        ],
        source_ranges: vec![],
        session_affinity: SessionAffinity::None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        lb_policy: policy.into(),
        lb_policy_config: String::new(),
    }
}

pub(super) fn ep(last: u8, ready: bool, terminating: bool, local: bool) -> Endpoint {
    Endpoint {
        address: v4([10, 1, 0, last]),
        port: 8080,
        ready,
        serving: ready || terminating,
        terminating,
        node_name: None,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
        is_local: local,
    }
}

/// The crate's `render` given the sets the host would hand over for `eps`
/// (all of them inside; only local ones outside under
/// externalTrafficPolicy Local).
pub(super) fn render(
    mode: &ModeConfig,
    ipvs: &IpvsConfig,
    svc: &ServicePort,
    eps: &[Endpoint],
    plan: &BackendPlan,
) -> Result<Fragment, String> {
    let internal = EndpointSet {
        endpoints: eps.to_vec(),
        backends: plan.clone(),
    };
    let external = match (svc.external_traffic_policy, plan) {
        (TrafficPolicy::Local, BackendPlan::Weights(w)) => {
            let (endpoints, weights) = eps
                .iter()
                .zip(w)
                .filter(|(e, _)| e.is_local)
                .map(|(e, w)| (e.clone(), *w))
                .unzip();
            EndpointSet {
                endpoints,
                backends: BackendPlan::Weights(weights),
            }
        }
        _ => internal.clone(),
    };
    let sets = ServiceEndpoints {
        internal,
        external,
        // IPVS has no short-circuit (see lib.rs): the set is not read.
        cluster: EndpointSet {
            endpoints: Vec::new(),
            backends: BackendPlan::Weights(Vec::new()),
        },
        has_any_endpoints: eps.iter().any(|e| e.ready || (e.serving && e.terminating)),
    };
    crate::render(mode, ipvs, svc, &sets)
}

pub(super) fn virtuals(f: &Fragment) -> Vec<(IpAddress, u16, String, u32)> {
    f.items
        .iter()
        .filter_map(|i| match i {
            Item::IpvsVirtualServer(v) => Some((
                v.address,
                v.port,
                v.scheduler.clone(),
                v.persistence_timeout,
            )),
            _ => None,
        })
        .collect()
}

/// (virtual address, real server last octet, weight).
pub(super) fn reals(f: &Fragment) -> Vec<(IpAddress, u8, u32)> {
    f.items
        .iter()
        .filter_map(|i| match i {
            Item::IpvsRealServer(r) => match r.address {
                IpAddress::V4(b) => Some((r.virtual_address, b as u8, r.weight)),
                IpAddress::V6(_) => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn every_frontend_gets_a_virtual_server_and_the_ready_endpoints() {
    let eps = [
        ep(1, true, false, true),
        ep(2, true, false, false),
        ep(3, false, true, false),
    ];
    let f = render(
        &mode(),
        &IpvsConfig::default(),
        &svc("round-robin"),
        &eps,
        &BackendPlan::Weights(vec![1, 1, 0]),
    )
    .expect("renders");
    let vs = virtuals(&f);
    let addrs: Vec<_> = vs.iter().map(|v| (v.0, v.1)).collect();
    assert_eq!(
        addrs,
        [
            (v4([10, 96, 0, 10]), 80),
            (v4([203, 0, 113, 7]), 80),
            (v4([198, 51, 100, 1]), 80),
            (v4([192, 168, 1, 5]), 30080)
        ],
        "ClusterIP, external IP, VIP-mode ingress, node port; not the Proxy-mode ingress"
    );
    assert!(vs.iter().all(|v| v.2 == "rr" && v.3 == 0));
    let cluster: Vec<_> = reals(&f)
        .into_iter()
        .filter(|r| r.0 == v4([10, 96, 0, 10]))
        .collect();
    // The terminating endpoint stays at weight 0 to drain.
    assert_eq!(
        cluster,
        [
            (v4([10, 96, 0, 10]), 1, 1),
            (v4([10, 96, 0, 10]), 2, 1),
            (v4([10, 96, 0, 10]), 3, 0)
        ]
    );
}

#[test]
fn policies_map_to_schedulers_and_weights_and_affinity_to_persistence() {
    let eps = [ep(1, true, false, false), ep(2, true, false, false)];
    let mut s = svc("weighted");
    s.session_affinity = SessionAffinity::ClientIp(10800);
    let f = render(
        &mode(),
        &IpvsConfig::default(),
        &s,
        &eps,
        &BackendPlan::Weights(vec![3, 1]),
    )
    .expect("renders");
    assert!(virtuals(&f).iter().all(|v| v.2 == "wrr" && v.3 == 10800));
    assert_eq!(
        reals(&f)[..2],
        [(v4([10, 96, 0, 10]), 1, 3), (v4([10, 96, 0, 10]), 2, 1)]
    );
    for (policy, sched) in [
        ("maglev", "mh"),
        ("least-connections", "lc"),
        ("round-robin", "wlc"),
        ("random", "wlc"),
    ] {
        assert_eq!(scheduler(policy, "wlc"), sched);
    }
    let configured = IpvsConfig::parse(r#"{"scheduler":"sh"}"#).expect("parses");
    let f = render(
        &mode(),
        &configured,
        &svc("round-robin"),
        &eps,
        &BackendPlan::Slots(vec![0, 1, 1]),
    )
    .expect("renders");
    assert!(virtuals(&f).iter().all(|v| v.2 == "sh"));
    assert!(
        render(
            &mode(),
            &configured,
            &svc("x"),
            &eps,
            &BackendPlan::Weights(vec![1])
        )
        .unwrap_err()
        .contains("ns/web")
    );
}

#[test]
fn external_traffic_policy_local_sends_outside_traffic_to_local_endpoints_only() {
    let eps = [ep(1, true, false, true), ep(2, true, false, false)];
    let mut s = svc("round-robin");
    s.external_traffic_policy = TrafficPolicy::Local;
    let f = render(
        &mode(),
        &IpvsConfig::default(),
        &s,
        &eps,
        &BackendPlan::Weights(vec![1, 1]),
    )
    .expect("renders");
    let np: Vec<_> = reals(&f)
        .into_iter()
        .filter(|r| r.0 == v4([192, 168, 1, 5]))
        .collect();
    assert_eq!(np, [(v4([192, 168, 1, 5]), 1, 1)]);
    let cluster = reals(&f)
        .into_iter()
        .filter(|r| r.0 == v4([10, 96, 0, 10]))
        .count();
    assert_eq!(cluster, 2, "ClusterIP keeps every endpoint");
}

#[test]
fn with_no_ready_endpoint_the_serving_terminating_ones_take_traffic() {
    let eps = [ep(1, false, true, false), ep(2, false, false, false)];
    let f = render(
        &mode(),
        &IpvsConfig::default(),
        &svc("round-robin"),
        &eps,
        &BackendPlan::Weights(vec![1, 1]),
    )
    .expect("renders");
    let cluster: Vec<_> = reals(&f)
        .into_iter()
        .filter(|r| r.0 == v4([10, 96, 0, 10]))
        .collect();
    assert_eq!(cluster, [(v4([10, 96, 0, 10]), 1, 1)]);
}
