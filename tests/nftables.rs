//! nftables mode with real packets: a proxy in the node namespace of a
//! small namespace cluster (see common/topology.rs), clients in pods, on
//! the node and outside, asserting who answered and which source address
//! the backend saw.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::node_proxy::{
    CONFIG, addr, answered_by, assert_three_to_one, eventually, family_slice, many, service, start,
    start_full, start_with, weighted_service,
};
use common::topology::{
    CLIENT_IP, CLIENT_IP6, Cluster, NODE_IP, NODE_IP6, Outcome, tcp_from, udp_from,
};
use common::write;

#[test]
fn cluster_ip_spreads_over_local_and_remote_pods_without_masquerade() {
    let c = Cluster::new("cip");
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.10",
            "",
            &["pod-a", "pod-b", "pod-c", "pod-d"],
            "TCP",
        ),
    );
    let from = &c.pod("pod-b").ns;
    let outcomes = many(40, || tcp_from(from, addr("10.96.0.10", 80)));
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a", "pod-b", "pod-c", "pod-d"].map(String::from))
    );
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
}

#[test]
fn node_port_from_outside_is_masqueraded() {
    let c = Cluster::new("np");
    let spec = "  type: NodePort\n  # nodePort: 30080\n";
    let _p = start(
        &c,
        &service(&c, "web", "10.96.0.11", spec, &["pod-a", "pod-c"], "TCP"),
    );
    let outcomes = many(20, || tcp_from(&c.client, addr(NODE_IP, 30080)));
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );
    for o in &outcomes {
        let Outcome::Answered(_, src) = o else {
            unreachable!()
        };
        assert_ne!(src, CLIENT_IP, "externalTrafficPolicy Cluster masquerades");
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_local_pods() {
    let c = Cluster::new("etp");
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
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()])
    );
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
        "{outcomes:?}"
    );
}

#[test]
fn no_endpoints_rejects_and_no_local_endpoints_drops() {
    let c = Cluster::new("rej");
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
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("30083")
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
    let c = Cluster::new("aff");
    let spec = "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  # nodePort: 30084\n";
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.15",
            spec,
            &["pod-a", "pod-b", "pod-c", "pod-d"],
            "TCP",
        ),
    );
    let outcomes = many(12, || tcp_from(&c.client, addr(NODE_IP, 30084)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
    let outcomes = many(12, || tcp_from(&c.pod("pod-a").ns, addr("10.96.0.15", 80)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
}

#[test]
fn udp_cluster_ip_works() {
    let c = Cluster::new("udp");
    let _p = start(
        &c,
        &service(&c, "dns", "10.96.0.53", "", &["pod-a", "pod-c"], "UDP"),
    );
    eventually("udp rules", || {
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.96.0.53 . udp")
    });
    let outcomes = many(20, || udp_from(&c.pod("pod-b").ns, addr("10.96.0.53", 80)));
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );
}

#[test]
fn endpoint_changes_apply_incrementally_and_other_tables_are_untouched() {
    let c = Cluster::new("inc");
    c.node.sh("nft add table inet bystander && nft add chain inet bystander input '{ type filter hook input priority 0; }' && nft add rule inet bystander input tcp dport 9 accept");
    let before = c.node.sh("nft list table inet bystander");
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
    eventually("pod-d removed", || {
        !c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.244.2.12")
    });
    assert_eq!(
        answered_by(&many(20, || tcp_from(from, addr("10.96.0.16", 80)))),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );
    assert_eq!(
        c.node.sh("nft list table inet bystander"),
        before,
        "another program's table changed"
    );
}

#[test]
fn a_deleted_table_is_repaired_within_sync_period() {
    let c = Cluster::new("rep");
    let _p = start(&c, &service(&c, "web", "10.96.0.17", "", &["pod-a"], "TCP"));
    assert!(matches!(
        tcp_from(&c.pod("pod-b").ns, addr("10.96.0.17", 80)),
        Outcome::Answered(..)
    ));
    c.node.sh("nft delete table ip kube-wasm-proxy");
    // --sync-period 2s in `start`.
    eventually("the table to come back", || {
        c.node.sh("nft list tables").contains("kube-wasm-proxy")
    });
    eventually("traffic to flow again", || {
        matches!(
            tcp_from(&c.pod("pod-b").ns, addr("10.96.0.17", 80)),
            Outcome::Answered(..)
        )
    });
}

#[test]
fn a_restart_adopts_the_table_without_dropping_a_connection() {
    let c = Cluster::new("rst");
    let objects = service(&c, "web", "10.96.0.18", "", &["pod-a", "pod-c"], "TCP");
    let first = start(&c, &objects);
    assert!(matches!(
        tcp_from(&c.pod("pod-b").ns, addr("10.96.0.18", 80)),
        Outcome::Answered(..)
    ));

    // A client hammering the Service while the proxy is killed and replaced.
    let client =
        common::topology::ContinuousClient::start(&c.pod("pod-b").ns, addr("10.96.0.18", 80));
    std::thread::sleep(Duration::from_millis(300));
    drop(first); // SIGKILL: the table stays behind
    let second = start(&c, &objects);
    std::thread::sleep(Duration::from_millis(2500)); // its first (full) sync and a resync ran
    let (ok, failed) = client.stop();
    let logs = second.logs.text();
    assert!(
        !logs.contains("failed"),
        "adopting the table (or resyncing it) failed:\n{logs}"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections");
    assert!(
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.96.0.18 . tcp . 80")
    );
    drop(second);
}

#[test]
fn external_and_load_balancer_ips_with_source_ranges() {
    let c = Cluster::new("lb");
    // 198.51.100.x stands for addresses routed to this node by a router.
    c.client.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
    let spec = "  type: LoadBalancer\n  externalIPs: [198.51.100.7]\n  loadBalancerSourceRanges: [203.0.113.0/30]\n  # nodePort: 30085\n";
    let mut objects = service(&c, "lb", "10.96.0.19", spec, &["pod-a"], "TCP");
    objects = objects.replacen("---\n", "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.8}, {ip: 198.51.100.9, ipMode: Proxy}]\n---\n", 1);
    let spec2 =
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [192.0.2.0/24]\n  # nodePort: 30086\n";
    let mut other = service(&c, "closed", "10.96.0.20", spec2, &["pod-a"], "TCP");
    other = other.replacen(
        "---\n",
        "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.10}]\n---\n",
        1,
    );
    let p = start(&c, &(objects + &other));
    eventually("rules", || {
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("198.51.100.10")
    });
    let _ = &p;
    assert!(
        matches!(tcp_from(&c.client, addr("198.51.100.7", 80)), Outcome::Answered(p, _) if p == "pod-a"),
        "external IP"
    );
    assert!(
        matches!(tcp_from(&c.client, addr("198.51.100.8", 80)), Outcome::Answered(p, _) if p == "pod-a"),
        "LB IP from an allowed source"
    );
    assert_eq!(
        tcp_from(&c.client, addr("198.51.100.10", 80)),
        Outcome::TimedOut,
        "LB IP from a source outside loadBalancerSourceRanges"
    );
    assert!(
        matches!(
            tcp_from(&c.client, addr(NODE_IP, 30086)),
            Outcome::Answered(..)
        ),
        "source ranges apply to LB IPs only, not node ports"
    );
    let table = c.node.sh("nft list table ip kube-wasm-proxy");
    assert!(
        !table.contains("198.51.100.9"),
        "ipMode Proxy ingress must not be captured:\n{table}"
    );
}

#[test]
fn internal_traffic_policy_local_and_traffic_from_the_node() {
    let c = Cluster::new("itp");
    let spec = "  internalTrafficPolicy: Local\n";
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.21",
            spec,
            &["pod-a", "pod-c", "pod-d"],
            "TCP",
        ),
    );
    let outcomes = many(15, || tcp_from(&c.pod("pod-b").ns, addr("10.96.0.21", 80)));
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a".to_string()]),
        "only the local endpoint"
    );
    // From the node itself (OUTPUT hook); off-cluster source, so masqueraded.
    let outcomes = many(5, || tcp_from(&c.node, addr("10.96.0.21", 80)));
    assert_eq!(
        answered_by(&outcomes),
        BTreeSet::from(["pod-a".to_string()])
    );
}

#[test]
fn dry_run_shows_the_diff_against_the_kernel_and_applies_nothing() {
    let c = Cluster::new("dry");
    let dry_run = |pods: &[&str]| {
        common::node_proxy::dry_run(
            &c,
            "nftables",
            &service(&c, "web", "10.96.0.22", "", pods, "TCP"),
        )
    };
    let first = dry_run(&["pod-a"]);
    assert!(
        first.contains("+   10.96.0.22 . tcp . 80 : goto class-1"),
        "{first}"
    );
    assert!(
        !c.node.sh("nft list tables").contains("kube-wasm-proxy"),
        "a dry run must not touch the kernel"
    );

    let p = start(&c, &service(&c, "web", "10.96.0.22", "", &["pod-a"], "TCP"));
    eventually("rules", || {
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.96.0.22")
    });
    drop(p);
    assert!(
        dry_run(&["pod-a"]).contains("# no changes"),
        "same plan as the kernel"
    );

    let diff = dry_run(&["pod-c"]);
    assert!(
        diff.contains("+   10.96.0.22 . tcp . 80 . 0 : 10.244.2.11 . 8080")
            && diff.contains("-   10.96.0.22 . tcp . 80 . 0 : 10.244.1.11 . 8080"),
        "{diff}"
    );
}

#[test]
fn maglev_in_the_kernel_keeps_clients_and_moves_few_when_a_pod_goes() {
    let c = Cluster::new("mag");
    let clients: Vec<std::net::IpAddr> = (10..70)
        .map(|i| format!("203.0.113.{i}").parse().unwrap())
        .collect();
    for ip in &clients {
        c.client.sh(&format!("ip addr add {ip}/24 dev eth0"));
    }
    let annotated = |pods: &[&str]| {
        service(&c, "web", "10.96.0.23", "  type: NodePort\n  # nodePort: 30087\n", pods, "TCP")
            .replacen("metadata: {name: web, namespace: t}", "metadata: {name: web, namespace: t, annotations: {kube-wasm-proxy.io/lb-policy: maglev}}", 1)
    };
    let p = start(&c, &annotated(&["pod-a", "pod-b", "pod-c", "pod-d"]));
    eventually("maglev rules", || {
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("jhash ip saddr mod 251")
    });
    let who = |src: std::net::IpAddr| match common::topology::tcp_from_source(
        &c.client,
        src,
        addr(NODE_IP, 30087),
    ) {
        Outcome::Answered(pod, _) => pod,
        other => panic!("{src}: {other:?}"),
    };
    let before: Vec<String> = clients.iter().map(|ip| who(*ip)).collect();
    for (ip, pod) in clients.iter().zip(&before).take(10) {
        assert_eq!(&who(*ip), pod, "a client must stick to its pod");
    }
    let used: BTreeSet<&String> = before.iter().collect();
    assert!(used.len() >= 3, "hash spreads clients: {used:?}");

    write(
        &p.dir,
        "objects.yaml",
        &annotated(&["pod-a", "pod-b", "pod-c"]),
    );
    eventually("pod-d gone", || {
        !c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.244.2.12")
    });
    let after: Vec<String> = clients.iter().map(|ip| who(*ip)).collect();
    assert!(!after.contains(&"pod-d".to_string()));
    let moved =
        before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / clients.len() as f64;
    let had_d = before.iter().filter(|p| *p == "pod-d").count() as f64 / clients.len() as f64;
    // Those on pod-d must move; Maglev moves few others (about 1/N in all).
    assert!(
        moved <= had_d + 0.12,
        "moved {moved:.2} of clients, {had_d:.2} were on the removed pod"
    );
}

#[test]
fn sctp_services_are_programmed() {
    // This kernel has no SCTP sockets, so SCTP is checked by inspecting the
    // rules the kernel accepted.
    let c = Cluster::new("sctp");
    let spec = "  type: NodePort\n  # nodePort: 30088\n";
    let _p = start(
        &c,
        &service(&c, "sig", "10.96.0.24", spec, &["pod-a"], "SCTP"),
    );
    eventually("sctp rules", || {
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.96.0.24 . sctp . 80")
    });
    let table = c.node.sh("nft list table ip kube-wasm-proxy");
    assert!(
        table.contains("10.96.0.24 . sctp . 80 : goto class-1"),
        "{table}"
    );
    assert!(
        table.contains("10.96.0.24 . sctp . 80 . 0 : 10.244.1.11 . 8080"),
        "{table}"
    );
    assert!(table.contains("sctp . 30088 : goto np-class-1"), "{table}");
    assert!(
        table.contains("sctp . 30088 . 0 : 10.244.1.11 . 8080"),
        "{table}"
    );
    assert!(
        table.contains("meta l4proto { tcp, udp, sctp } dnat ip to"),
        "{table}"
    );
}

#[test]
fn health_check_node_ports_report_local_endpoints() {
    let c = Cluster::new("hc");
    let local = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n  # nodePort: 30089\n";
    let remote = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n  # nodePort: 30090\n";
    let _p = start(
        &c,
        &(service(
            &c,
            "here",
            "10.96.0.25",
            local,
            &["pod-a", "pod-b", "pod-c"],
            "TCP",
        ) + &service(&c, "away", "10.96.0.26", remote, &["pod-c"], "TCP")),
    );
    let get = |port: u16| {
        c.client.run_in(move || {
            let mut conn =
                std::net::TcpStream::connect_timeout(&addr(NODE_IP, port), Duration::from_secs(1))
                    .map_err(|e| e.to_string())?;
            use std::io::{Read, Write};
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            conn.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok::<String, String>(out)
        })
    };
    let mut here = Err(String::new());
    eventually("the health server", || {
        here = get(32001);
        here.is_ok()
    });
    let here = here.unwrap();
    assert!(here.starts_with("HTTP/1.1 200"), "{here}");
    assert!(
        here.contains(r#""localEndpoints":2"#) && here.contains(r#""serviceProxyHealthy":true"#),
        "{here}"
    );
    assert!(
        here.contains(r#""service":{"namespace":"t","name":"here"}"#),
        "{here}"
    );
    let away = get(32002).unwrap();
    assert!(
        away.starts_with("HTTP/1.1 503") && away.contains(r#""localEndpoints":0"#),
        "{away}"
    );
}

#[test]
fn stale_udp_conntrack_entries_are_flushed_when_an_endpoint_goes() {
    let c = Cluster::new("ct");
    common::scenarios::stale_udp_flow_moves(&c, "10.96.0.27", start, |c: &Cluster| {
        c.node.sh("nft list table ip kube-wasm-proxy")
    });
}

#[test]
fn topology_hints_keep_traffic_in_the_zone_when_every_endpoint_has_them() {
    let c = Cluster::new("topo");
    common::scenarios::topology_hints(&c, "10.96.0.28", start);
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let c = Cluster::new("term");
    common::scenarios::terminating_fallback(&c, "10.96.0.29", start);
}

#[test]
fn masquerade_all_masquerades_in_cluster_sources_too() {
    let c = Cluster::new("mall");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "node.yaml", &Cluster::node_yaml());
    write(
        dir.path(),
        "objects.yaml",
        &service(&c, "web", "10.96.0.30", "", &["pod-c"], "TCP"),
    );
    let config = dir.path().join("config.conf");
    std::fs::write(
        &config,
        format!("{CONFIG}nftables:\n  masqueradeAll: true\n"),
    )
    .unwrap();
    let source = format!("file:{}", dir.path().display());
    let mut child = c.node.spawn(
        env!("CARGO_BIN_EXE_kube-wasm-proxy"),
        &[
            "--proxy-mode",
            "nftables",
            "--source",
            &source,
            "--config",
            config.to_str().unwrap(),
            "--hostname-override",
            "node-1",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ],
    );
    eventually("rules", || {
        c.node.sh("nft list ruleset").contains("10.96.0.30")
    });
    let outcome = tcp_from(&c.pod("pod-b").ns, addr("10.96.0.30", 80));
    let _ = child.kill();
    let _ = child.wait();
    match outcome {
        Outcome::Answered(pod, src) => {
            assert_eq!(pod, "pod-c");
            assert_eq!(
                src, "10.0.0.1",
                "masqueradeAll: the pod sees the node's address"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dual_stack_services_answer_on_both_families() {
    let c = Cluster::new("ds");
    let slice = |family: &str, pods: &[&str]| family_slice(&c, "web", family, pods);
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.31\n  clusterIPs: [10.96.0.31, 'fd00:96::31']\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30091}]\n".to_string();
    let _p = start(
        &c,
        &(svc + &slice("IPv4", &["pod-a", "pod-c"]) + &slice("IPv6", &["pod-a", "pod-c"])),
    );
    eventually("ip6 rules", || {
        c.node
            .sh("nft list ruleset")
            .contains("fd00:96::31 . tcp . 80")
    });
    let from = &c.pod("pod-b").ns;
    let v4 = many(16, || tcp_from(from, addr("10.96.0.31", 80)));
    assert_eq!(
        answered_by(&v4),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );
    let v6 = many(16, || tcp_from(from, "[fd00:96::31]:80".parse().unwrap()));
    assert_eq!(
        answered_by(&v6),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );
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

#[test]
fn detect_local_modes_decide_who_is_masqueraded() {
    let c = Cluster::new("dl");
    common::scenarios::detect_local_modes(
        &c,
        "10.96.0.32",
        start_with,
        |c: &Cluster| c.node.sh("nft list ruleset"),
        |c: &Cluster| {
            c.node
                .sh("nft delete table ip kube-wasm-proxy && nft delete table ip6 kube-wasm-proxy");
        },
    );
}

#[test]
fn a_refused_transaction_keeps_the_last_good_rules_and_spares_other_services() {
    use kwp::dataplane::Dataplane;
    use kwp::dataplane::nftables::NftDataplane;
    use kwp::model::{Protocol, ServicePortName};
    use kwp::plan::{Fragment, Item, NftFamily};

    let ns = common::netns::Netns::new("kwp-txn");
    ns.run_in(|| {
        let name = |n: &str| ServicePortName {
            namespace: "t".into(),
            name: n.into(),
            port: "p".into(),
            protocol: Protocol::Tcp,
        };
        let chain = |chain: &str, rule: &str| Fragment {
            items: vec![Item::NftChain {
                family: NftFamily::Ip,
                table: "kube-wasm-proxy".into(),
                name: chain.into(),
                hook: None,
                rules: vec![rule.into()],
            }]
            .into(),
        };
        let list = || {
            String::from_utf8_lossy(
                &std::process::Command::new("nft")
                    .args(["list", "table", "ip", "kube-wasm-proxy"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .into_owned()
        };
        let mut dp = NftDataplane::new("kube-wasm-proxy");
        let (a, b) = (name("a"), name("b"));
        dp.apply(
            Some(&chain("base", "accept")),
            &[(a.clone(), Some(&chain("svc-a", "tcp dport 1 accept")))],
        )
        .unwrap();

        // a's new rule is not nft; b is fine: b lands, a keeps its old rule.
        let bad = chain("svc-a", "this is not nft");
        let good = chain("svc-b", "tcp dport 2 accept");
        let applied = dp
            .apply(None, &[(a.clone(), Some(&bad)), (b.clone(), Some(&good))])
            .unwrap();
        let [(Some(refused), err)] = &applied.refused[..] else {
            panic!("a alone is refused: {:?}", applied.refused)
        };
        assert_eq!(*refused, a);
        assert!(format!("{err:#}").contains("this is not nft"), "{err:#}");
        let table = list();
        assert!(
            table.contains("tcp dport 1 accept"),
            "the last good rule of a stays:\n{table}"
        );
        assert!(
            table.contains("tcp dport 2 accept"),
            "b is applied despite a:\n{table}"
        );
        assert_eq!(dp.failures, 2, "the batch and a's retry");

        // Fixing a applies it: the failure was recoverable.
        dp.apply(
            None,
            &[(a.clone(), Some(&chain("svc-a", "tcp dport 3 accept")))],
        )
        .unwrap();
        assert!(list().contains("tcp dport 3 accept"));
    });
}

#[test]
fn node_port_addresses_limit_where_node_ports_answer() {
    let c = Cluster::new("npa");
    let config = format!("{CONFIG}nodePortAddresses: [10.0.0.0/24]\n");
    let spec = "  type: NodePort\n  # nodePort: 30092\n";
    let _p = start_with(
        &c,
        &service(&c, "web", "10.96.0.33", spec, &["pod-a"], "TCP"),
        &config,
        &Cluster::node_yaml(),
    );
    eventually("rules", || c.node.sh("nft list ruleset").contains("30092"));
    // 10.0.0.1 (the node's address towards the remote node) is in range...
    assert!(
        matches!(tcp_from(&c.remote, addr("10.0.0.1", 30092)), Outcome::Answered(p, _) if p == "pod-a")
    );
    // ...the Node's InternalIP is not, so nothing listens there.
    assert_eq!(tcp_from(&c.client, addr(NODE_IP, 30092)), Outcome::Refused);
}

#[test]
fn client_ip_affinity_expires_after_its_timeout() {
    let c = Cluster::new("afft");
    // 2 s: long enough for a burst of connections on a loaded machine.
    let spec =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n";
    let _p = start(
        &c,
        &service(
            &c,
            "web",
            "10.96.0.34",
            spec,
            &["pod-a", "pod-b", "pod-c", "pod-d"],
            "TCP",
        ),
    );
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

#[test]
fn weighted_policy_weights_reach_the_kernel() {
    let c = Cluster::new("wt");
    let objects = weighted_service(&c, "10.96.0.35");
    let _p = start(&c, &objects);
    eventually("weighted rules", || {
        c.node.sh("nft list ruleset").contains("goto class-4")
    });
    assert_three_to_one(&c, "10.96.0.35");
}

#[test]
fn the_mode_plugin_reloads_under_traffic_and_a_broken_one_is_rejected() {
    let c = Cluster::new("mrl");
    let plugins = tempfile::tempdir().unwrap();
    let nftables = kwp_plugins_bundle::bundled()
        .find(|(n, _)| n == "nftables")
        .unwrap()
        .1
        .to_vec();
    let install = |bytes: &[u8]| {
        std::fs::write(plugins.path().join(".tmp"), bytes).unwrap();
        std::fs::rename(
            plugins.path().join(".tmp"),
            plugins.path().join("nftables.wasm"),
        )
        .unwrap();
    };
    install(&nftables);
    let dir = plugins.path().display().to_string();
    let p = start_full(
        &c,
        &service(&c, "web", "10.96.0.36", "", &["pod-a", "pod-c"], "TCP"),
        CONFIG,
        &Cluster::node_yaml(),
        &["--plugin-dir", &dir],
    );
    eventually("rules", || {
        c.node.sh("nft list ruleset").contains("10.96.0.36")
    });
    let logged = |what: &str| p.logs.text().matches(what).count();

    let client =
        common::topology::ContinuousClient::start(&c.pod("pod-b").ns, addr("10.96.0.36", 80));
    // A new build of the mode (same code here) is swapped in and everything
    // re-rendered with it.
    install(&[nftables.as_slice(), b"".as_slice()].concat());
    eventually("the mode reload", || logged("reloaded proxy mode") == 1);
    // A mode whose plan names another table fails its probe: rejected.
    install(kwp_test_programs_artifacts::program("foreign_table"));
    eventually("the rejection", || logged("reload rejected") == 1);
    // One that passes the probe but whose rules the kernel refuses: rolled
    // back in the same sync, and refused if installed again.
    let breaks = kwp_test_programs_artifacts::program("mode_breaks_after_probe");
    install(breaks);
    eventually("the rollback", || {
        logged("rolled back to the previous version") == 1
    });
    install(breaks);
    eventually("the quarantined version refused", || {
        logged("reload rejected") == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = client.stop();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 10, "only {ok} connections");
    assert!(
        c.node
            .sh("nft list table ip kube-wasm-proxy")
            .contains("10.96.0.36 . tcp . 80")
    );
}
