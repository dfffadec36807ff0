//! What the Service's and the proxy's configuration switch on: external and
//! load-balancer IPs, masqueradeAll, detect-local modes, node port
//! addresses, health-check node ports, policy weights.

use std::time::Duration;

use super::Mode;
use crate::common::fixtures::TestService;
use crate::common::node_proxy::{CONFIG, addr, assert_three_to_one, eventually};
use crate::common::scenarios;
use crate::common::topology::{Cluster, NODE_IP, Outcome, tcp_from};

pub fn external_and_load_balancer_ips_with_source_ranges(mode: &Mode) {
    let c = mode.cluster("lb");
    // 198.51.100.x stands for addresses routed to this node by a router.
    c.client.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
    let open = TestService::new(&c, "lb", "10.96.0.19")
        .load_balancer(30085)
        .external_ips(&["198.51.100.7"])
        .source_ranges(&["203.0.113.0/30"])
        .ingress("198.51.100.8", None)
        .ingress("198.51.100.9", Some("Proxy"))
        .pods(&["pod-a"]);
    let closed = TestService::new(&c, "closed", "10.96.0.20")
        .load_balancer(30086)
        .source_ranges(&["192.0.2.0/24"])
        .ingress("198.51.100.10", None)
        .pods(&["pod-a"]);
    let _p = mode.start(&c, &(open.yaml() + &closed.yaml()));
    eventually("rules", || mode.rules(&c).contains("198.51.100.10"));
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
    let rules = mode.rules(&c);
    assert!(
        !rules.contains("198.51.100.9"),
        "ipMode Proxy ingress must not be captured:\n{rules}"
    );
}

pub fn masquerade_all_masquerades_in_cluster_sources_too(mode: &Mode) {
    let c = mode.cluster("mall");
    let config = format!("{CONFIG}{}:\n  masqueradeAll: true\n", mode.config_section);
    let _p = mode.start_with(
        &c,
        &TestService::new(&c, "web", "10.96.0.30")
            .pods(&["pod-c"])
            .yaml(),
        &config,
        &Cluster::node_yaml(),
    );
    eventually("rules", || mode.rules(&c).contains("10.96.0.30"));
    match tcp_from(&c.pod("pod-b").ns, addr("10.96.0.30", 80)) {
        Outcome::Answered(pod, src) => {
            assert_eq!(pod, "pod-c");
            assert_eq!(
                src, "10.0.0.1",
                "masqueradeAll: the pod sees the node's address"
            );
        }
        other => panic!("{other:?}"),
    }
    mode.assert_marks(&c, mode.marks.masquerade_all);
}

pub fn detect_local_modes_decide_who_is_masqueraded(mode: &Mode) {
    let c = mode.cluster("dl");
    scenarios::detect_local_modes(
        &c,
        "10.96.0.32",
        |c, objects, config, node| mode.start_with(c, objects, config, node),
        |c| mode.rules(c),
        |c| (mode.clean)(c),
    );
}

pub fn node_port_addresses_limit_where_node_ports_answer(mode: &Mode) {
    let c = mode.cluster("npa");
    let config = format!("{CONFIG}nodePortAddresses: [10.0.0.0/24]\n");
    let _p = mode.start_with(
        &c,
        &TestService::new(&c, "web", "10.96.0.33")
            .node_port(30092)
            .pods(&["pod-a"])
            .yaml(),
        &config,
        &Cluster::node_yaml(),
    );
    eventually("rules", || mode.rules(&c).contains("30092"));
    // 10.0.0.1 (the node's address towards the remote node) is in range...
    assert!(
        matches!(tcp_from(&c.remote, addr("10.0.0.1", 30092)), Outcome::Answered(p, _) if p == "pod-a")
    );
    // ...the Node's InternalIP is not, so nothing listens there.
    assert_eq!(tcp_from(&c.client, addr(NODE_IP, 30092)), Outcome::Refused);
}

pub fn health_check_node_ports_report_local_endpoints(mode: &Mode) {
    let c = mode.cluster("hc");
    let local = |name, ip, node_port, health_port| {
        TestService::new(&c, name, ip)
            .load_balancer(node_port)
            .external_traffic_local()
            .health_check_node_port(health_port)
    };
    let here = local("here", "10.96.0.25", 30089, 32001).pods(&["pod-a", "pod-b", "pod-c"]);
    let away = local("away", "10.96.0.26", 30090, 32002).pods(&["pod-c"]);
    let _p = mode.start(&c, &(here.yaml() + &away.yaml()));
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

pub fn weighted_policy_weights_reach_the_kernel(mode: &Mode) {
    let c = mode.cluster("wt");
    // pod-a weight 3, pod-c the default 1.
    let web = TestService::new(&c, "web", "10.96.0.35")
        .annotate("kube-wasm-proxy.io/lb-policy", "weighted")
        .annotate(
            "kube-wasm-proxy.io/lb-policy-config",
            &format!("{}=3", c.pod("pod-a").ip),
        )
        .pods(&["pod-a", "pod-c"]);
    let _p = mode.start(&c, &web.yaml());
    eventually("weighted rules", || {
        mode.rules(&c).contains(mode.marks.three_to_one)
    });
    assert_three_to_one(&c, "10.96.0.35");
}
