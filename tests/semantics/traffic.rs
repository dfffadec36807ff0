//! Who answers a Service and which source address the pod sees: cluster
//! IPs, node ports, traffic policies, affinity, UDP, dual stack.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Mode, pods};
use crate::common::fixtures::TestService;
use crate::common::node_proxy::{addr, answered_by, eventually, family_slice, many};
use crate::common::topology::{
    CLIENT_IP, CLIENT_IP6, NODE_IP, NODE_IP6, Outcome, tcp_from, udp_from,
};

pub fn cluster_ip_spreads_over_local_and_remote_pods_without_masquerade(mode: &Mode) {
    let c = mode.cluster("cip");
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    let _p = mode.start(
        &c,
        &TestService::new(&c, "web", "10.96.0.10").pods(&all).yaml(),
    );
    let from = &c.pod("pod-b").ns;
    let outcomes = many(40, || tcp_from(from, addr("10.96.0.10", 80)));
    assert_eq!(answered_by(&outcomes), pods(&all));
    for o in &outcomes {
        let Outcome::Answered(pod, src) = o else {
            unreachable!()
        };
        if pod == "pod-b" {
            assert_eq!(src, "10.244.1.1", "hairpin to itself must be masqueraded");
        } else {
            assert_eq!(src, "10.244.1.12", "in-cluster source kept for {pod}");
        }
    }
    // From outside the cluster CIDR: masqueraded.
    let outside = many(8, || tcp_from(&c.client, addr("10.96.0.10", 80)));
    assert!(
        outside
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP)),
        "{outside:?}"
    );
    mode.assert_marks(&c, mode.marks.spread_over_four);
}

pub fn node_port_from_outside_is_masqueraded(mode: &Mode) {
    let c = mode.cluster("np");
    let web = TestService::new(&c, "web", "10.96.0.11")
        .node_port(30080)
        .pods(&["pod-a", "pod-c"]);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30080)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP)),
        "externalTrafficPolicy Cluster masquerades: {outcomes:?}"
    );
}

pub fn external_traffic_policy_local_keeps_the_client_ip_and_local_pods(mode: &Mode) {
    let c = mode.cluster("etp");
    let web = TestService::new(&c, "web", "10.96.0.12")
        .node_port(30081)
        .external_traffic_local()
        .pods(&["pod-a", "pod-b", "pod-c"]);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30081)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-b"]));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
        "{outcomes:?}"
    );
}

pub fn no_endpoints_rejects_and_no_local_endpoints_drops(mode: &Mode) {
    let c = mode.cluster("rej");
    let none = TestService::new(&c, "empty", "10.96.0.13").node_port(30082);
    let remote_only = TestService::new(&c, "far", "10.96.0.14")
        .node_port(30083)
        .external_traffic_local()
        .pods(&["pod-c"]);
    let _p = mode.start(&c, &(none.yaml() + &remote_only.yaml()));
    eventually("rules for both services", || {
        mode.rules(&c).contains("30083")
    });
    // Local policy, no local endpoint: drop. (A mode may write its tables
    // one after the other: wait for it.)
    eventually("the drop of a node port with no local endpoint", || {
        tcp_from(&c.client, addr(NODE_IP, 30083)) == Outcome::TimedOut
    });
    assert_eq!(
        tcp_from(&c.pod("pod-a").ns, addr("10.96.0.13", 80)),
        Outcome::Refused,
        "cluster IP without endpoints"
    );
    assert_eq!(
        tcp_from(&c.client, addr(NODE_IP, 30082)),
        Outcome::Refused,
        "node port without endpoints"
    );
    assert!(
        matches!(tcp_from(&c.pod("pod-a").ns, addr("10.96.0.14", 80)), Outcome::Answered(p, _) if p == "pod-c"),
        "internal traffic still served"
    );
}

pub fn client_ip_affinity_sticks_to_one_pod(mode: &Mode) {
    let c = mode.cluster("aff");
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    let web = TestService::new(&c, "web", "10.96.0.15")
        .node_port(30084)
        .affinity(60)
        .pods(&all);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(12, || tcp_from(&c.client, addr(NODE_IP, 30084)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
    let outcomes = many(12, || tcp_from(&c.pod("pod-a").ns, addr("10.96.0.15", 80)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
    mode.assert_marks(&c, mode.marks.affinity_60s);
}

pub fn client_ip_affinity_expires_after_its_timeout(mode: &Mode) {
    let c = mode.cluster("afft");
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    // 2 s: long enough for a burst of connections on a loaded machine.
    let web = TestService::new(&c, "web", "10.96.0.34")
        .affinity(2)
        .pods(&all);
    let _p = mode.start(&c, &web.yaml());
    let from = &c.client;
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        // Back to back: sticky...
        let burst = answered_by(&many(3, || tcp_from(from, addr("10.96.0.34", 80))));
        assert_eq!(burst.len(), 1, "{burst:?}");
        seen.extend(burst);
        // ...then idle past the timeout: a fresh pick.
        std::thread::sleep(Duration::from_millis(2600));
    }
    assert!(
        seen.len() > 1,
        "after the timeout the client must be free to move: {seen:?}"
    );
}

pub fn udp_cluster_ip_works(mode: &Mode) {
    let c = mode.cluster("udp");
    let dns = TestService::new(&c, "dns", "10.96.0.53")
        .protocol("UDP")
        .pods(&["pod-a", "pod-c"]);
    let _p = mode.start(&c, &dns.yaml());
    eventually("udp rules", || mode.rules(&c).contains("10.96.0.53"));
    let outcomes = many(20, || udp_from(&c.pod("pod-b").ns, addr("10.96.0.53", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
}

pub fn internal_traffic_policy_local_and_traffic_from_the_node(mode: &Mode) {
    let c = mode.cluster("itp");
    let web = TestService::new(&c, "web", "10.96.0.21")
        .internal_traffic_local()
        .pods(&["pod-a", "pod-c", "pod-d"]);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(15, || tcp_from(&c.pod("pod-b").ns, addr("10.96.0.21", 80)));
    assert_eq!(
        answered_by(&outcomes),
        pods(&["pod-a"]),
        "only the local endpoint"
    );
    // From the node itself (the output hook); off-cluster source, so masqueraded.
    let outcomes = many(5, || tcp_from(&c.node, addr("10.96.0.21", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a"]));
}

pub fn dual_stack_services_answer_on_both_families(mode: &Mode) {
    let c = mode.cluster("ds");
    let slice = |family: &str, pods: &[&str]| family_slice(&c, "web", family, pods);
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.31\n  clusterIPs: [10.96.0.31, 'fd00:96::31']\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30091}]\n".to_string();
    let _p = mode.start(
        &c,
        &(svc + &slice("IPv4", &["pod-a", "pod-c"]) + &slice("IPv6", &["pod-a", "pod-c"])),
    );
    eventually("IPv6 rules", || mode.rules(&c).contains("fd00:96::31"));
    let from = &c.pod("pod-b").ns;
    let v4 = many(16, || tcp_from(from, addr("10.96.0.31", 80)));
    assert_eq!(answered_by(&v4), pods(&["pod-a", "pod-c"]));
    let v6 = many(16, || tcp_from(from, "[fd00:96::31]:80".parse().unwrap()));
    assert_eq!(answered_by(&v6), pods(&["pod-a", "pod-c"]));
    let pod_b6 = c.pod("pod-b").ip6.clone();
    assert!(
        v6.iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if *src == pod_b6)),
        "in-cluster IPv6 source kept: {v6:?}"
    );
    // IPv6 node port from outside: answered and masqueraded.
    let np = many(8, || {
        tcp_from(&c.client, format!("[{NODE_IP6}]:30091").parse().unwrap())
    });
    assert!(
        np.iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP6)),
        "{np:?}"
    );
}

/// internalTrafficPolicy Local narrows only cluster-IP traffic: a node port
/// under externalTrafficPolicy Cluster reaches every pod, remote ones too.
pub fn internal_local_leaves_node_ports_to_every_endpoint(mode: &Mode) {
    let c = mode.cluster("itpnp");
    let web = TestService::new(&c, "web", "10.96.0.22")
        .node_port(30084)
        .internal_traffic_local()
        .pods(&["pod-a", "pod-c", "pod-d"]);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30084)));
    assert_eq!(
        answered_by(&outcomes),
        pods(&["pod-a", "pod-c", "pod-d"]),
        "the node port serves the cluster-wide set"
    );
    let outcomes = many(10, || tcp_from(&c.pod("pod-b").ns, addr("10.96.0.22", 80)));
    assert_eq!(
        answered_by(&outcomes),
        pods(&["pod-a"]),
        "the cluster IP only the local pod"
    );
}

/// externalTrafficPolicy Local with ready pods elsewhere and only a
/// terminating (still serving) pod here: outside traffic goes to that pod,
/// with the client's address (upstream's local terminating fallback).
pub fn external_local_falls_back_to_a_local_terminating_pod(mode: &Mode) {
    let c = mode.cluster("etpterm");
    let web = TestService::new(&c, "web", "10.96.0.23")
        .node_port(30085)
        .external_traffic_local()
        .pods(&["pod-c"])
        .draining_pods(&["pod-a"]);
    let _p = mode.start(&c, &web.yaml());
    let outcomes = many(10, || tcp_from(&c.client, addr(NODE_IP, 30085)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a"]), "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
        "{outcomes:?}"
    );
    let outcomes = many(10, || tcp_from(&c.pod("pod-b").ns, addr("10.96.0.23", 80)));
    assert_eq!(
        answered_by(&outcomes),
        pods(&["pod-c"]),
        "the cluster IP the ready pod"
    );
}

/// A Local policy with endpoints only on other nodes drops (the client
/// retries elsewhere); the other kind of traffic is still served.
pub fn internal_local_without_local_pods_drops_and_node_ports_serve(mode: &Mode) {
    let c = mode.cluster("itpdrop");
    let web = TestService::new(&c, "web", "10.96.0.24")
        .node_port(30086)
        .internal_traffic_local()
        .pods(&["pod-c"]);
    let _p = mode.start(&c, &web.yaml());
    eventually(
        "the node port serves the remote pod",
        || matches!(tcp_from(&c.client, addr(NODE_IP, 30086)), Outcome::Answered(p, _) if p == "pod-c"),
    );
    assert_eq!(
        tcp_from(&c.pod("pod-a").ns, addr("10.96.0.24", 80)),
        Outcome::TimedOut,
        "cluster IP with no local endpoint: dropped, not rejected"
    );
}

/// Upstream's short-circuit under both traffic policies Local: this node's
/// pods and the node itself reach a node port or external IP through the
/// cluster-wide set (remote pods too; the node masqueraded, its source
/// being the frontend's own address), while clients outside reach only this
/// node's pods, their address kept, and are dropped where it has none.
pub fn both_local_short_circuit_pods_and_the_node_to_every_endpoint(mode: &Mode) {
    let c = mode.cluster("short");
    // 198.51.100.x stands for addresses routed to this node by a router.
    c.client.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
    let both_local = |name: &str, ip: &str, node_port: i32, external_ip: &str| {
        TestService::new(&c, name, ip)
            .node_port(node_port)
            .external_ips(&[external_ip])
            .internal_traffic_local()
            .external_traffic_local()
    };
    let near = both_local("near", "10.96.0.37", 30093, "198.51.100.21").pods(&["pod-a", "pod-c"]);
    let far = both_local("far", "10.96.0.38", 30094, "198.51.100.22").pods(&["pod-c"]);
    let _p = mode.start(&c, &(near.yaml() + &far.yaml()));
    eventually("rules for both services", || {
        mode.rules(&c).contains("198.51.100.22")
    });
    let pod_b = &c.pod("pod-b").ns;
    // A local pod and the node: every endpoint, by node port and external IP.
    for (frontend, expected) in [
        (addr(NODE_IP, 30093), &["pod-a", "pod-c"][..]),
        (addr("198.51.100.21", 80), &["pod-a", "pod-c"]),
        (addr(NODE_IP, 30094), &["pod-c"]),
        (addr("198.51.100.22", 80), &["pod-c"]),
    ] {
        for (from, who) in [(pod_b, "pod-b"), (&c.node, "the node")] {
            let outcomes = many(16, || tcp_from(from, frontend));
            assert_eq!(
                answered_by(&outcomes),
                pods(expected),
                "{who} to {frontend}: {outcomes:?}"
            );
        }
    }
    // From outside: this node's pods only, the client's address kept...
    let outside = many(10, || tcp_from(&c.client, addr(NODE_IP, 30093)));
    assert_eq!(answered_by(&outside), pods(&["pod-a"]));
    assert!(
        outside
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
        "{outside:?}"
    );
    // ...and none here: dropped, by node port and external IP alike.
    for frontend in [addr(NODE_IP, 30094), addr("198.51.100.22", 80)] {
        assert_eq!(
            tcp_from(&c.client, frontend),
            Outcome::TimedOut,
            "{frontend}"
        );
    }
    // The cluster IPs keep to this node's pods (internalTrafficPolicy Local).
    let outcomes = many(10, || tcp_from(pod_b, addr("10.96.0.37", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a"]));
    assert_eq!(
        tcp_from(pod_b, addr("10.96.0.38", 80)),
        Outcome::TimedOut,
        "no local endpoint: dropped"
    );
}
