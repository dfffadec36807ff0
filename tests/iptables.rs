//! iptables mode with real packets, in the namespace cluster of
//! common/topology.rs: the proxy runs `--proxy-mode iptables` in the node
//! namespace; clients in pods, on the node and outside assert who
//! answered and which source address the backend saw.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::node_proxy::{CONFIG, Proxy, addr, answered_by, eventually, many, service, start_full};
use common::topology::{CLIENT_IP, Cluster, NODE_IP, Outcome, tcp_from, udp_from};
use common::write;

fn start(c: &Cluster, objects: &str) -> Proxy {
    start_full(
        c,
        objects,
        CONFIG,
        &Cluster::node_yaml(),
        &["--proxy-mode", "iptables"],
    )
}

fn save(c: &Cluster, table: &str) -> String {
    c.node.sh(&format!("iptables-save -t {table}"))
}

fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn cluster_ip_spreads_over_every_endpoint_by_statistic() {
    let c = Cluster::new("icip");
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    let _p = start(&c, &service(&c, "web", "10.96.0.10", "", &all, "TCP"));
    let nat = save(&c, "nat");
    assert!(
        nat.contains("--mode random --probability 0.2500000000"),
        "{nat}"
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
    let outside = many(8, || tcp_from(&c.client, addr("10.96.0.10", 80)));
    assert!(
        outside
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP)),
        "from outside the cluster CIDR: masqueraded: {outside:?}"
    );
}

#[test]
fn node_port_from_outside_is_masqueraded() {
    let c = Cluster::new("inp");
    let spec = "  type: NodePort\n  # nodePort: 30080\n";
    let _p = start(
        &c,
        &service(&c, "web", "10.96.0.11", spec, &["pod-a", "pod-c"], "TCP"),
    );
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30080)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP)),
        "externalTrafficPolicy Cluster masquerades: {outcomes:?}"
    );
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_local_pods() {
    let c = Cluster::new("ietp");
    let spec = "  type: NodePort\n  externalTrafficPolicy: Local\n  # nodePort: 30081\n";
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.12",
            spec,
            &["pod-a", "pod-b", "pod-c"],
            "TCP",
        ),
    );
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30081)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-b"]));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
        "{outcomes:?}"
    );
}

#[test]
fn no_endpoints_rejects_and_no_local_endpoints_drops() {
    let c = Cluster::new("irej");
    let none = service(
        &c,
        "empty",
        "10.96.0.13",
        "  type: NodePort\n  # nodePort: 30082\n",
        &[],
        "TCP",
    );
    let remote_only = service(
        &c,
        "far",
        "10.96.0.14",
        "  type: NodePort\n  externalTrafficPolicy: Local\n  # nodePort: 30083\n",
        &["pod-c"],
        "TCP",
    );
    let _p = start(&c, &(none + &remote_only));
    eventually("rules for both services", || {
        save(&c, "filter").contains("--dport 30083")
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
    assert_eq!(
        tcp_from(&c.client, addr(NODE_IP, 30083)),
        Outcome::TimedOut,
        "Local policy, no local endpoint: drop"
    );
    assert!(
        matches!(tcp_from(&c.pod("pod-a").ns, addr("10.96.0.14", 80)), Outcome::Answered(p, _) if p == "pod-c"),
        "internal traffic still served"
    );
}

#[test]
fn client_ip_affinity_sticks_to_one_pod() {
    let c = Cluster::new("iaff");
    let spec = "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  # nodePort: 30084\n";
    let all = ["pod-a", "pod-b", "pod-c", "pod-d"];
    let _p = start(&c, &service(&c, "web", "10.96.0.15", spec, &all, "TCP"));
    assert!(save(&c, "nat").contains("--rcheck --seconds 60 --reap"));
    let outcomes = many(12, || tcp_from(&c.client, addr(NODE_IP, 30084)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
    let outcomes = many(12, || tcp_from(&c.pod("pod-a").ns, addr("10.96.0.15", 80)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
}

#[test]
fn udp_cluster_ip_works() {
    let c = Cluster::new("iudp");
    let _p = start(
        &c,
        &service(&c, "dns", "10.96.0.53", "", &["pod-a", "pod-c"], "UDP"),
    );
    let outcomes = many(20, || udp_from(&c.pod("pod-b").ns, addr("10.96.0.53", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
}

#[test]
fn endpoint_removal_rewrites_only_its_chains_and_foreign_chains_survive() {
    let c = Cluster::new("iinc");
    c.node.sh(
        "iptables -N BYSTANDER && iptables -A BYSTANDER -p tcp --dport 9 -j ACCEPT && iptables -A INPUT -j BYSTANDER && iptables -t nat -N BYSTANDER-NAT && iptables -t nat -A PREROUTING -j BYSTANDER-NAT",
    );
    let foreign = |c: &Cluster| -> Vec<String> {
        (save(c, "filter") + &save(c, "nat"))
            .lines()
            .filter(|l| l.contains("BYSTANDER"))
            .map(String::from)
            .collect()
    };
    let before = foreign(&c);
    assert_eq!(before.len(), 5, "{before:?}");
    let p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.16",
            "",
            &["pod-a", "pod-c", "pod-d"],
            "TCP",
        ),
    );
    let from = &c.pod("pod-b").ns;
    assert!(answered_by(&many(30, || tcp_from(from, addr("10.96.0.16", 80)))).contains("pod-d"));
    write(
        &p.dir,
        "objects.yaml",
        &service(&c, "web", "10.96.0.16", "", &["pod-a", "pod-c"], "TCP"),
    );
    eventually("pod-d removed", || !save(&c, "nat").contains("10.244.2.12"));
    assert_eq!(
        answered_by(&many(20, || tcp_from(from, addr("10.96.0.16", 80)))),
        pods(&["pod-a", "pod-c"])
    );
    std::thread::sleep(Duration::from_millis(2500)); // a full resync ran too
    assert_eq!(foreign(&c), before, "another program's rules changed");
    let nat = save(&c, "nat");
    assert_eq!(
        nat.matches("-A PREROUTING -j KWP-SERVICES").count(),
        1,
        "one jump: {nat}"
    );
}

#[test]
fn a_restart_adopts_the_chains_without_dropping_a_connection() {
    let c = Cluster::new("irst");
    let objects = service(&c, "web", "10.96.0.18", "", &["pod-a", "pod-c"], "TCP");
    let first = start(&c, &objects);
    assert!(matches!(
        tcp_from(&c.pod("pod-b").ns, addr("10.96.0.18", 80)),
        Outcome::Answered(..)
    ));
    let client =
        common::topology::ContinuousClient::start(&c.pod("pod-b").ns, addr("10.96.0.18", 80));
    std::thread::sleep(Duration::from_millis(300));
    drop(first); // SIGKILL: the chains stay behind
    let second = start(&c, &objects);
    std::thread::sleep(Duration::from_millis(2500)); // its first (full) sync and a resync ran
    let (ok, failed) = client.stop();
    let logs = second.logs.text();
    assert!(
        !logs.contains("failed"),
        "adopting the chains failed:\n{logs}"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections");
    assert!(save(&c, "nat").contains("-d 10.96.0.18/32"));
}

#[test]
fn a_consistent_hash_policy_is_refused_by_name_and_the_others_sync() {
    let c = Cluster::new("imag");
    let maglev = service(&c, "hashed", "10.96.0.19", "", &["pod-a", "pod-c"], "TCP").replacen(
        "metadata: {name: hashed, namespace: t}",
        "metadata: {name: hashed, namespace: t, annotations: {kube-wasm-proxy.io/lb-policy: maglev}}",
        1,
    );
    let plain = service(&c, "plain", "10.96.0.20", "", &["pod-a"], "TCP");
    let p = start(&c, &(maglev + &plain));
    eventually("the plain service", || {
        save(&c, "nat").contains("-d 10.96.0.20/32")
    });
    assert!(matches!(
        tcp_from(&c.pod("pod-b").ns, addr("10.96.0.20", 80)),
        Outcome::Answered(..)
    ));
    assert!(!save(&c, "nat").contains("10.96.0.19"));
    eventually("the refusal in the log", || {
        let logs = p.logs.text();
        logs.contains("t/hashed") && logs.contains("cannot express")
    });
}
