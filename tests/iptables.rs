//! iptables mode with real packets, in the namespace cluster of
//! common/topology.rs: the proxy runs `--proxy-mode iptables` in the node
//! namespace; clients in pods, on the node and outside assert who
//! answered and which source address the backend saw.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::node_proxy::{
    CONFIG, Proxy, addr, answered_by, assert_three_to_one, eventually, family_slice, many, service,
    start_full, weighted_service,
};
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
    let filter = save(&c, "filter");
    for jump in [
        "-A OUTPUT -m conntrack --ctstate NEW -j KWP-SERVICES",
        "-A FORWARD -j KWP-FORWARD",
        "-A INPUT -m conntrack --ctstate NEW -j KWP-EXTERNAL-SERVICES",
    ] {
        assert_eq!(filter.matches(jump).count(), 1, "{jump}: {filter}");
    }
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

#[test]
fn external_and_load_balancer_ips_with_source_ranges() {
    let c = Cluster::new("ilb");
    // 198.51.100.x stands for addresses routed to this node by a router.
    c.client.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
    let spec = "  type: LoadBalancer\n  externalIPs: [198.51.100.7]\n  loadBalancerSourceRanges: [203.0.113.0/30]\n  # nodePort: 30085\n";
    let objects = service(&c, "lb", "10.96.0.21", spec, &["pod-a"], "TCP").replacen(
        "---\n",
        "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.8}, {ip: 198.51.100.9, ipMode: Proxy}]\n---\n",
        1,
    );
    let closed_spec =
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [192.0.2.0/24]\n  # nodePort: 30086\n";
    let closed = service(&c, "closed", "10.96.0.22", closed_spec, &["pod-a"], "TCP").replacen(
        "---\n",
        "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.10}]\n---\n",
        1,
    );
    let _p = start(&c, &(objects + &closed));
    eventually("rules", || save(&c, "filter").contains("198.51.100.10"));
    let answered_by_a = |ip: &str, port| matches!(tcp_from(&c.client, addr(ip, port)), Outcome::Answered(p, _) if p == "pod-a");
    assert!(answered_by_a("198.51.100.7", 80), "external IP");
    assert!(
        answered_by_a("198.51.100.8", 80),
        "LB IP from an allowed source"
    );
    assert_eq!(
        tcp_from(&c.client, addr("198.51.100.10", 80)),
        Outcome::TimedOut,
        "LB IP from a source outside loadBalancerSourceRanges"
    );
    assert!(
        answered_by_a(NODE_IP, 30086),
        "source ranges apply to LB IPs only, not node ports"
    );
    let nat = save(&c, "nat");
    assert!(
        !nat.contains("198.51.100.9"),
        "ipMode Proxy ingress must not be captured:\n{nat}"
    );
}

#[test]
fn internal_traffic_policy_local_and_traffic_from_the_node() {
    let c = Cluster::new("iitp");
    let spec = "  internalTrafficPolicy: Local\n";
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.23",
            spec,
            &["pod-a", "pod-c", "pod-d"],
            "TCP",
        ),
    );
    let outcomes = many(15, || tcp_from(&c.pod("pod-b").ns, addr("10.96.0.23", 80)));
    assert_eq!(
        answered_by(&outcomes),
        pods(&["pod-a"]),
        "only the local endpoint"
    );
    // From the node itself (nat OUTPUT).
    let outcomes = many(5, || tcp_from(&c.node, addr("10.96.0.23", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a"]));
}

#[test]
fn masquerade_all_and_the_masquerade_bit_come_from_the_iptables_section() {
    let c = Cluster::new("imall");
    let config = format!("{CONFIG}iptables:\n  masqueradeAll: true\n");
    let _p = start_full(
        &c,
        &service(&c, "web", "10.96.0.24", "", &["pod-c"], "TCP"),
        &config,
        &Cluster::node_yaml(),
        &["--proxy-mode", "iptables"],
    );
    match tcp_from(&c.pod("pod-b").ns, addr("10.96.0.24", 80)) {
        Outcome::Answered(pod, src) => {
            assert_eq!(pod, "pod-c");
            assert_eq!(
                src, "10.0.0.1",
                "masqueradeAll: the pod sees the node's address"
            );
        }
        other => panic!("{other:?}"),
    }
    let nat = save(&c, "nat");
    assert!(
        nat.contains("-A KWP-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"),
        "default masqueradeBit 14:\n{nat}"
    );
    assert!(nat.contains("--random-fully"), "{nat}");
}

#[test]
fn dual_stack_services_answer_on_both_families() {
    let c = Cluster::new("ids");
    let slice = |family: &str, pods: &[&str]| family_slice(&c, "web", family, pods);
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.25\n  clusterIPs: [10.96.0.25, 'fd00:96::25']\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30092}]\n".to_string();
    let _p = start(
        &c,
        &(svc + &slice("IPv4", &["pod-a", "pod-c"]) + &slice("IPv6", &["pod-a", "pod-c"])),
    );
    eventually("ip6tables rules", || {
        c.node
            .sh("ip6tables-save -t nat")
            .contains("fd00:96::25/128")
    });
    let from = &c.pod("pod-b").ns;
    let v4 = many(16, || tcp_from(from, addr("10.96.0.25", 80)));
    assert_eq!(answered_by(&v4), pods(&["pod-a", "pod-c"]));
    let v6 = many(16, || tcp_from(from, "[fd00:96::25]:80".parse().unwrap()));
    assert_eq!(answered_by(&v6), pods(&["pod-a", "pod-c"]));
    let pod_b6 = c.pod("pod-b").ip6.clone();
    assert!(
        v6.iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if *src == pod_b6)),
        "in-cluster IPv6 source kept: {v6:?}"
    );
    let np = many(8, || {
        tcp_from(
            &c.client,
            format!("[{}]:30092", common::topology::NODE_IP6)
                .parse()
                .unwrap(),
        )
    });
    assert!(
        np.iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != common::topology::CLIENT_IP6)),
        "{np:?}"
    );
}

#[test]
fn sctp_services_are_programmed() {
    let c = Cluster::new("isctp");
    let _p = start(
        &c,
        &service(&c, "assoc", "10.96.0.26", "", &["pod-a"], "SCTP"),
    );
    eventually("sctp rules", || {
        save(&c, "nat").contains("-d 10.96.0.26/32 -p sctp")
    });
    let nat = save(&c, "nat");
    assert!(nat.contains("-m sctp --dport 80 -j KWP-SVC-"), "{nat}");
    assert!(
        nat.contains("-m sctp -j DNAT --to-destination 10.244.1.11:8080"),
        "{nat}"
    );
}

#[test]
fn weighted_policy_weights_become_statistic_probabilities() {
    let c = Cluster::new("iwt");
    let objects = weighted_service(&c, "10.96.0.27");
    let _p = start(&c, &objects);
    eventually("weighted rules", || {
        save(&c, "nat").contains("--probability 0.75000000")
    });
    assert_three_to_one(&c, "10.96.0.27");
}

#[test]
fn services_come_and_go_by_rule_in_the_shared_dispatch_chain() {
    let c = Cluster::new("idel");
    let first = service(&c, "one", "10.96.0.28", "", &["pod-a"], "TCP");
    let second = service(
        &c,
        "two",
        "10.96.0.29",
        "  type: NodePort\n  # nodePort: 30093\n",
        &["pod-c"],
        "TCP",
    );
    let p = start(&c, &first);
    let from = &c.pod("pod-b").ns;
    assert!(
        matches!(tcp_from(from, addr("10.96.0.28", 80)), Outcome::Answered(p, _) if p == "pod-a")
    );
    write(&p.dir, "objects.yaml", &(first.clone() + &second));
    eventually(
        "the second service",
        || matches!(tcp_from(&c.client, addr(NODE_IP, 30093)), Outcome::Answered(p, _) if p == "pod-c"),
    );
    write(&p.dir, "objects.yaml", &first);
    eventually("the second service gone", || {
        !save(&c, "nat").contains("10.96.0.29")
    });
    let nat = save(&c, "nat");
    assert!(!nat.contains("--dport 30093"), "{nat}");
    assert_eq!(
        nat.matches("-j KWP-SVC-").count(),
        1,
        "only the first service is dispatched:\n{nat}"
    );
    assert!(
        matches!(tcp_from(from, addr("10.96.0.28", 80)), Outcome::Answered(p, _) if p == "pod-a")
    );
    let logs = p.logs.text();
    assert!(
        !logs.contains("reconciling in full"),
        "the deltas (append, then delete by rule) must apply as such:\n{logs}"
    );
}

#[test]
fn stale_udp_conntrack_entries_are_flushed_when_an_endpoint_goes() {
    let c = Cluster::new("ict");
    common::scenarios::stale_udp_flow_moves(&c, "10.96.0.30", start, |c: &Cluster| save(c, "nat"));
}

#[test]
fn topology_hints_keep_traffic_in_the_zone_when_every_endpoint_has_them() {
    let c = Cluster::new("itopo");
    common::scenarios::topology_hints(&c, "10.96.0.31", start);
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let c = Cluster::new("iterm");
    common::scenarios::terminating_fallback(&c, "10.96.0.32", start);
}

#[test]
fn detect_local_modes_decide_who_is_masqueraded() {
    let c = Cluster::new("idl");
    common::scenarios::detect_local_modes(
        &c,
        "10.96.0.33",
        |c: &Cluster, objects: &str, config: &str, node: &str| {
            start_full(c, objects, config, node, &["--proxy-mode", "iptables"])
        },
        |c: &Cluster| save(c, "nat"),
        |c: &Cluster| {
            // Everything in this test's own namespace.
            c.node
                .sh("iptables -t nat -F && iptables -t nat -X && iptables -F && iptables -X");
        },
    );
}

#[test]
fn a_node_on_iptables_legacy_gets_its_rules_in_legacy() {
    let c = Cluster::new("ileg");
    // Another program's rule in the legacy tables: the node uses legacy.
    c.node
        .sh("iptables-legacy -N BYSTANDER && iptables-legacy -A INPUT -j BYSTANDER");
    let p = start(
        &c,
        &service(&c, "web", "10.96.0.34", "", &["pod-a", "pod-c"], "TCP"),
    );
    let legacy = c.node.sh("iptables-legacy-save -t nat");
    assert!(legacy.contains("-A PREROUTING -j KWP-SERVICES"), "{legacy}");
    assert!(
        !c.node.sh("iptables-nft-save -t nat").contains("KWP-"),
        "nothing in the nft backend"
    );
    assert!(p.logs.text().contains("legacy"), "the backend is logged");
    let from = &c.pod("pod-b").ns;
    assert_eq!(
        answered_by(&many(20, || tcp_from(from, addr("10.96.0.34", 80)))),
        pods(&["pod-a", "pod-c"])
    );
    assert!(
        c.node
            .sh("iptables-legacy-save -t filter")
            .contains("-A INPUT -j BYSTANDER")
    );
}

#[test]
fn dry_run_shows_the_diff_against_the_kernel_and_applies_nothing() {
    let c = Cluster::new("idry");
    let objects = service(&c, "web", "10.96.0.35", "", &["pod-a"], "TCP");
    let dry_run = || {
        common::node_proxy::dry_run(
            &c,
            "iptables",
            &service(&c, "web", "10.96.0.35", "", &["pod-a"], "TCP"),
        )
    };
    let first = dry_run();
    assert!(
        first.contains("+ iptables -t nat -A KWP-SERVICE-IPS -d 10.96.0.35/32"),
        "{first}"
    );
    assert!(
        first.contains("+ iptables -t nat -A PREROUTING -j KWP-SERVICES"),
        "{first}"
    );
    assert!(
        !save(&c, "nat").contains("KWP-"),
        "a dry run must not touch the kernel"
    );

    let p = start(&c, &objects);
    let second = dry_run();
    let diff = second
        .split("# diff against the kernel\n")
        .nth(1)
        .unwrap_or("?");
    assert_eq!(diff, "", "in sync: nothing to change:\n{second}");
    drop(p);
}
