//! Each frontend's real servers come from its own set: cluster IPs from the
//! internal one, node ports, external and load-balancer IPs from the
//! external one; drop vs reject from whether any endpoint exists.

use kwp_sdk::mode::NftFamily;

use super::tests::{ep, mode, reals, svc, v4};
use super::*;
use kwp_sdk::mode::{BackendPlan, TrafficPolicy};

const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const NODE_IP: [u8; 4] = [192, 168, 1, 5];

fn set(eps: &[Endpoint]) -> EndpointSet {
    EndpointSet {
        endpoints: eps.to_vec(),
        backends: BackendPlan::Weights(vec![1; eps.len()]),
    }
}

fn rendered(
    s: &ServicePort,
    internal: &[Endpoint],
    external: &[Endpoint],
    has_any: bool,
) -> Fragment {
    let sets = ServiceEndpoints {
        internal: set(internal),
        external: set(external),
        cluster: set(&[]),
        has_any_endpoints: has_any,
    };
    crate::render(&mode(), &IpvsConfig::default(), s, &sets).expect("renders")
}

/// (endpoint's last octet, weight) of the virtual server at `vip`.
fn reals_of(f: &Fragment, vip: [u8; 4]) -> Vec<(u8, u32)> {
    reals(f)
        .into_iter()
        .filter(|r| r.0 == v4(vip))
        .map(|r| (r.1, r.2))
        .collect()
}

fn elements(f: &Fragment) -> Vec<String> {
    f.items
        .iter()
        .filter_map(|i| match i {
            Item::NftElement(e) if e.family == NftFamily::Ip => {
                Some(format!("{}: {}", e.set, e.element))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn internal_local_external_cluster_gives_node_ports_every_endpoint() {
    let (local, remote) = (ep(1, true, false, true), ep(2, true, false, false));
    let mut s = svc("round-robin");
    s.internal_traffic_policy = TrafficPolicy::Local;
    let f = rendered(&s, &[local.clone()], &[local, remote], true);
    assert_eq!(reals_of(&f, CLUSTER_IP), [(1, 1)]);
    assert_eq!(reals_of(&f, NODE_IP), [(1, 1), (2, 1)]);
    assert_eq!(reals_of(&f, [203, 0, 113, 7]), [(1, 1), (2, 1)]);
}

#[test]
fn external_local_uses_a_local_terminating_endpoint() {
    let (remote, draining) = (ep(2, true, false, false), ep(3, false, true, true));
    let mut s = svc("round-robin");
    s.external_traffic_policy = TrafficPolicy::Local;
    let f = rendered(&s, &[remote], &[draining], true);
    assert_eq!(reals_of(&f, CLUSTER_IP), [(2, 1)]);
    assert_eq!(reals_of(&f, NODE_IP), [(3, 1)]);
    assert!(
        !elements(&f).iter().any(|e| e.starts_with("no-endpoint")),
        "{:?}",
        elements(&f)
    );
}

#[test]
fn a_local_policy_drops_with_endpoints_elsewhere_and_rejects_without_any() {
    let mut s = svc("round-robin");
    s.external_traffic_policy = TrafficPolicy::Local;
    let f = rendered(&s, &[ep(2, true, false, false)], &[], true);
    let all = elements(&f);
    assert!(
        all.contains(&"no-endpoint-nodeports: tcp . 30080 : drop".to_string()),
        "{all:?}"
    );
    assert!(
        !all.iter()
            .any(|e| e.starts_with("no-endpoint-services: 10.96.0.10")),
        "{all:?}"
    );
    s.internal_traffic_policy = TrafficPolicy::Local;
    let all = elements(&rendered(&s, &[], &[], false));
    assert!(all.contains(&"no-endpoint-nodeports: tcp . 30080 : goto reject-chain".to_string()));
    assert!(
        all.contains(
            &"no-endpoint-services: 10.96.0.10 . tcp . 80 : goto reject-chain".to_string()
        )
    );
    let all = elements(&rendered(&s, &[], &[], true));
    assert!(
        all.contains(&"no-endpoint-services: 10.96.0.10 . tcp . 80 : drop".to_string()),
        "{all:?}"
    );
}
