//! The whole kube-wasm-proxy binary in IPVS mode, in a real IPVS kernel:
//! Debian's cloud kernel under QEMU (the host kernel has no IP_VS), real
//! packets through the namespace cluster of common/topology.rs built inside
//! the guest. One VM runs every case (ipvs_vm/harness.rs); each host test
//! reports its case. Clients are outside the cluster or on the remote node
//! unless a case is about masquerading (`masquerade_*`, source ranges and
//! reject: the packet-filter helpers in kwp's nftables table).

use crate::common;

mod guest;
mod harness;
mod soak;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::node_proxy::{addr, answered_by, family_slice, http_get, many, service};
use common::topology::{
    CLIENT_IP, ContinuousClient, NODE_IP, NODE_IP6, Outcome, POD_PORT, tcp_from, tcp_from_source,
    udp_from,
};
use guest::{LINE_PORT, eventually, guest};

/// A test that runs its body inside the VM.
macro_rules! vm_case {
    ($name:ident, $body:block) => {
        #[test]
        fn $name() {
            harness::case(stringify!($name), || $body)
        }
    };
}

/// A continuous client's pace: the emulated CPUs also run the proxy.
const PACE: Duration = Duration::from_millis(20);

const ALL: [&str; 4] = ["pod-a", "pod-b", "pod-c", "pod-d"];

fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// How many answers each pod gave.
fn counts(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for pod in answered_by(outcomes).into_iter() {
        let n = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Answered(p, _) if *p == pod))
            .count();
        by_pod.insert(pod, n);
    }
    by_pod
}

/// The kernel shows `line` and `reals` real servers under it.
fn shows(table: &str, line: &str, reals: usize) -> bool {
    let mut lines = table.lines().skip_while(|l| !l.starts_with(line));
    lines.next().is_some() && lines.take_while(|l| l.starts_with("  ->")).count() == reals
}

/// A Service whose annotation picks load-balancing policy `policy`.
fn with_policy(objects: String, name: &str, policy: &str, config: &str) -> String {
    let config = if config.is_empty() {
        String::new()
    } else {
        format!(", kube-wasm-proxy.io/lb-policy-config: '{config}'")
    };
    objects.replacen(
        &format!("metadata: {{name: {name}, namespace: t}}"),
        &format!("metadata: {{name: {name}, namespace: t, annotations: {{kube-wasm-proxy.io/lb-policy: {policy}{config}}}}}"),
        1,
    )
}

vm_case!(cluster_ip_round_robin_spreads_evenly_over_every_endpoint, {
    let g = guest();
    let c = &g.cluster;
    g.apply(&service(c, "web", "10.96.0.10", "", &ALL, "TCP"), |t| {
        shows(t, "TCP 10.96.0.10:80 rr", 4)
    });
    let outcomes = many(40, || tcp_from(&c.client, addr("10.96.0.10", 80)));
    // rr is deterministic: 40 connections are exactly 10 per endpoint.
    let by_pod = counts(&outcomes);
    assert_eq!(by_pod.keys().cloned().collect::<BTreeSet<_>>(), pods(&ALL));
    assert!(by_pod.values().all(|n| *n == 10), "{by_pod:?}");
    assert!(
        g.addresses().contains("10.96.0.10/32"),
        "bound on kube-ipvs0"
    );
});

vm_case!(node_port_answers_from_outside_on_the_node_address, {
    let g = guest();
    let c = &g.cluster;
    let spec = "  type: NodePort\n  # nodePort: 30080\n";
    let objects = service(c, "web", "10.96.0.11", spec, &["pod-a", "pod-c"], "TCP");
    g.apply(&objects, |t| shows(t, "TCP 203.0.113.1:30080 rr", 2));
    let outcomes = many(10, || tcp_from(&c.client, addr(NODE_IP, 30080)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
    // A node address is never bound to kube-ipvs0.
    let bound = g.addresses();
    let kube_ipvs0: Vec<&str> = bound.lines().filter(|l| l.contains("kube-ipvs0")).collect();
    assert!(
        !kube_ipvs0.iter().any(|l| l.contains(NODE_IP)),
        "{kube_ipvs0:?}"
    );
});

vm_case!(external_ip_answers_from_outside, {
    let g = guest();
    let c = &g.cluster;
    let spec = "  externalIPs: [198.51.100.7]\n";
    let objects = service(c, "ext", "10.96.0.12", spec, &["pod-c", "pod-d"], "TCP");
    g.apply(&objects, |t| shows(t, "TCP 198.51.100.7:80 rr", 2));
    let outcomes = many(10, || tcp_from(&c.client, addr("198.51.100.7", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-c", "pod-d"]));
    // A port the Service does not expose is not answered through the IP.
    assert_ne!(
        tcp_from(&c.client, addr("198.51.100.7", 81)).answered(),
        true
    );
});

vm_case!(client_ip_affinity_is_persistence_and_sticks_to_one_pod, {
    let g = guest();
    let c = &g.cluster;
    let spec =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    g.apply(&service(c, "aff", "10.96.0.13", spec, &ALL, "TCP"), |t| {
        // /proc prints the timeout in jiffies: 60 s at Debian's CONFIG_HZ=250.
        shows(t, "TCP 10.96.0.13:80 rr persistent 15000", 4)
    });
    let outcomes = many(12, || tcp_from(&c.client, addr("10.96.0.13", 80)));
    assert_eq!(answered_by(&outcomes).len(), 1, "{outcomes:?}");
});

vm_case!(weighted_policy_is_wrr_and_splits_three_to_one, {
    let g = guest();
    let c = &g.cluster;
    let a = c.pod("pod-a").ip;
    let objects = service(c, "web", "10.96.0.14", "", &["pod-a", "pod-c"], "TCP");
    let objects = with_policy(objects, "web", "weighted", &format!("{a}=3"));
    g.apply(&objects, |t| shows(t, "TCP 10.96.0.14:80 wrr", 2));
    let outcomes = many(200, || tcp_from(&c.client, addr("10.96.0.14", 80)));
    let by_pod = counts(&outcomes);
    // wrr cycles a, a, a, c: 150 of 200 up to where the cycle started.
    let on_a = by_pod.get("pod-a").copied().unwrap_or(0);
    assert!((147..=153).contains(&on_a), "{by_pod:?}\n{}", g.ipvs());
    assert_eq!(on_a + by_pod.get("pod-c").copied().unwrap_or(0), 200);
});

vm_case!(least_connections_policy_is_lc_and_avoids_busy_pods, {
    let g = guest();
    let c = &g.cluster;
    let objects = with_policy(
        service(c, "lc", "10.96.0.15", "", &ALL, "TCP"),
        "lc",
        "least-connections",
        "",
    );
    // Line servers keep a connection open (and active) for as long as the
    // client wants, however slow the emulated CPU is.
    g.line_servers(&ALL);
    let objects = objects.replace(&POD_PORT.to_string(), &LINE_PORT.to_string());
    g.apply(&objects, |t| shows(t, "TCP 10.96.0.15:80 lc", 4));
    let target = addr("10.96.0.15", 80);
    // Three connections held open keep three pods busy...
    let mut held: Vec<guest::LineConn> = (0..3)
        .map(|_| guest::LineConn::open(&c.client, target))
        .collect();
    let busy: BTreeSet<String> = held.iter_mut().map(|h| h.ask()).collect();
    assert_eq!(busy.len(), 3, "held connections on distinct pods: {busy:?}");
    // ...so lc sends every new connection to the fourth (rr would cycle).
    let idle: BTreeSet<String> = (0..4)
        .map(|_| guest::LineConn::open(&c.client, target).ask())
        .collect();
    assert_eq!(idle.len(), 1, "{idle:?}\n{}", g.ipvs());
    assert!(idle.is_disjoint(&busy), "new {idle:?} busy {busy:?}");
    drop(held);
});

vm_case!(maglev_policy_is_mh_and_keeps_each_client_on_one_pod, {
    let g = guest();
    let c = &g.cluster;
    let objects = with_policy(
        service(c, "mh", "10.96.0.16", "", &ALL, "TCP"),
        "mh",
        "maglev",
        "",
    );
    g.apply(&objects, |t| shows(t, "TCP 10.96.0.16:80 mh", 4));
    // Twelve client addresses: each always lands on one pod (mh hashes
    // the source), and together they reach more than one.
    let sources: Vec<IpAddr> = (100..112)
        .map(|i| format!("203.0.113.{i}").parse().unwrap())
        .collect();
    for s in &sources {
        c.client.sh(&format!(
            "ip addr replace {s}/24 dev eth0 2>/dev/null || true"
        ));
    }
    let mut reached = BTreeSet::new();
    for s in &sources {
        let target = addr("10.96.0.16", 80);
        let got = answered_by(&many(4, || tcp_from_source(&c.client, *s, target)));
        assert_eq!(got.len(), 1, "source {s} moved between pods: {got:?}");
        reached.extend(got);
    }
    assert!(reached.len() > 1, "12 sources all on {reached:?}");
});

vm_case!(udp_cluster_ip_answers_from_every_endpoint, {
    let g = guest();
    let c = &g.cluster;
    let objects = service(c, "dns", "10.96.0.17", "", &["pod-a", "pod-c"], "UDP");
    g.apply(&objects, |t| shows(t, "UDP 10.96.0.17:80 rr", 2));
    let outcomes = many(10, || udp_from(&c.client, addr("10.96.0.17", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-c"]));
});

vm_case!(dual_stack_service_answers_on_both_families, {
    let g = guest();
    let c = &g.cluster;
    let slice = |family: &str| family_slice(c, "ds", family, &["pod-a", "pod-c"]);
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: ds, namespace: t}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.18\n  clusterIPs: [10.96.0.18, 'fd00:96::18']\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30091}]\n";
    g.apply(&(svc.to_string() + &slice("IPv4") + &slice("IPv6")), |t| {
        shows(t, "TCP [fd00:96::18]:80 rr", 2) && shows(t, "TCP 10.96.0.18:80 rr", 2)
    });
    let v6 = many(8, || {
        tcp_from(&c.client, "[fd00:96::18]:80".parse().unwrap())
    });
    assert_eq!(answered_by(&v6), pods(&["pod-a", "pod-c"]));
    let v4 = many(8, || tcp_from(&c.client, addr("10.96.0.18", 80)));
    assert_eq!(answered_by(&v4), pods(&["pod-a", "pod-c"]));
    let np6: SocketAddr = format!("[{NODE_IP6}]:30091").parse().unwrap();
    let np = many(4, || tcp_from(&c.client, np6));
    assert_eq!(answered_by(&np), pods(&["pod-a", "pod-c"]));
});

vm_case!(restart_under_a_continuous_client_fails_no_connection, {
    let g = guest();
    let c = &g.cluster;
    let objects = service(c, "rs", "10.96.0.20", "", &["pod-c", "pod-d"], "TCP");
    g.apply(&objects, |t| shows(t, "TCP 10.96.0.20:80 rr", 2));
    let client = ContinuousClient::start_every(&c.client, addr("10.96.0.20", 80), PACE);
    std::thread::sleep(Duration::from_millis(500));
    g.kill_proxy();
    let took = g.start_proxy();
    // The new instance adopted the table and applies changes.
    let more = service(
        c,
        "rs",
        "10.96.0.20",
        "",
        &["pod-a", "pod-c", "pod-d"],
        "TCP",
    );
    g.apply(&more, |t| shows(t, "TCP 10.96.0.20:80 rr", 3));
    let (ok, failed) = client.stop();
    println!(
        "restart took {:.1} s; {ok} connections during it",
        took.as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections");
});

vm_case!(
    the_ipvs_mode_plugin_reloads_under_traffic_and_a_broken_one_is_rejected,
    {
        let g = guest();
        let c = &g.cluster;
        let objects = service(c, "rl", "10.96.0.21", "", &["pod-c", "pod-d"], "TCP");
        g.apply(&objects, |t| shows(t, "TCP 10.96.0.21:80 rr", 2));
        let logged = |what: &str| g.logs().matches(what).count();
        let (reloads, rejections) = (logged("reloaded proxy mode"), logged("reload rejected"));
        let install = |bytes: &[u8]| {
            std::fs::write(g.plugins.join(".tmp"), bytes).unwrap();
            std::fs::rename(g.plugins.join(".tmp"), g.plugins.join("ipvs.wasm")).unwrap();
        };
        let client = ContinuousClient::start_every(&c.client, addr("10.96.0.21", 80), PACE);
        install(&guest::ipvs_plugin());
        eventually("the mode reload", || {
            logged("reloaded proxy mode") > reloads
        });
        install(b"not a wasm component");
        eventually("the rejection", || logged("reload rejected") > rejections);
        // The reloaded mode still applies changes.
        let more = service(
            c,
            "rl",
            "10.96.0.21",
            "",
            &["pod-b", "pod-c", "pod-d"],
            "TCP",
        );
        g.apply(&more, |t| shows(t, "TCP 10.96.0.21:80 rr", 3));
        let (ok, failed) = client.stop();
        assert!(
            failed.is_empty(),
            "{} failed of {}: {failed:?}",
            failed.len(),
            ok + failed.len()
        );
        assert!(ok > 10, "only {ok} connections");
        install(&guest::ipvs_plugin());
    }
);

vm_case!(
    a_terminating_endpoint_drains_at_weight_zero_and_gets_no_new_connections,
    {
        let g = guest();
        let c = &g.cluster;
        // Servers that keep a connection open and answer every line, so a
        // connection can outlive its endpoint's termination.
        g.line_servers(&["pod-a", "pod-d"]);
        let (a, d) = (c.pod("pod-a").ip, c.pod("pod-d").ip);
        let slice = |d_conditions: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: drain, namespace: t}}\nspec:\n  clusterIP: 10.96.0.19\n  ports: [{{name: p, port: 80, protocol: TCP, targetPort: {LINE_PORT}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: drain-1, namespace: t, labels: {{kubernetes.io/service-name: drain}}}}\naddressType: IPv4\nports: [{{name: p, port: {LINE_PORT}, protocol: TCP}}]\nendpoints:\n- {{addresses: ['{a}'], nodeName: node-1, conditions: {{ready: true}}}}\n- {{addresses: ['{d}'], nodeName: node-2, conditions: {d_conditions}}}\n"
            )
        };
        g.apply(&slice("{ready: true}"), |t| {
            shows(t, "TCP 10.96.0.19:80 rr", 2)
        });
        let target = addr("10.96.0.19", 80);
        // rr: two connections, one on each pod; both stay open.
        let mut held: Vec<guest::LineConn> = (0..2)
            .map(|_| guest::LineConn::open(&c.client, target))
            .collect();
        let first: BTreeSet<String> = held.iter_mut().map(|h| h.ask()).collect();
        assert_eq!(first, pods(&["pod-a", "pod-d"]));
        g.apply(
            &slice("{ready: false, serving: true, terminating: true}"),
            |t| t.contains(&format!("-> {d}:{LINE_PORT} Masq 0")),
        );
        // No new connection reaches the draining pod...
        let fresh: BTreeSet<String> = (0..6)
            .map(|_| guest::LineConn::open(&c.client, target).ask())
            .collect();
        assert_eq!(fresh, pods(&["pod-a"]), "{}", g.ipvs());
        // ...and its open connection still works.
        let again: BTreeSet<String> = held.iter_mut().map(|h| h.ask()).collect();
        assert_eq!(
            again,
            pods(&["pod-a", "pod-d"]),
            "the draining connection broke"
        );
    }
);

vm_case!(
    external_traffic_policy_local_keeps_the_client_ip_with_health_check_node_ports,
    {
        let g = guest();
        let c = &g.cluster;
        let here = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n  # nodePort: 30087\n";
        let away = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n  # nodePort: 30088\n";
        let objects = service(
            c,
            "here",
            "10.96.0.27",
            here,
            &["pod-a", "pod-b", "pod-c"],
            "TCP",
        ) + &service(c, "away", "10.96.0.28", away, &["pod-c"], "TCP");
        // The node port gets the local endpoints only; the ClusterIP all.
        g.apply(&objects, |t| {
            shows(t, "TCP 203.0.113.1:30087 rr", 2) && shows(t, "TCP 10.96.0.27:80 rr", 3)
        });
        let outcomes = many(8, || tcp_from(&c.client, addr(NODE_IP, 30087)));
        assert_eq!(answered_by(&outcomes), pods(&["pod-a", "pod-b"]));
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Answered(_, src) if src == CLIENT_IP)),
            "the client's address is kept: {outcomes:?}"
        );
        assert!(
            !tcp_from(&c.client, addr(NODE_IP, 30088)).answered(),
            "no local endpoint: not answered"
        );
        let mut status = (0, String::new());
        eventually("the health check node port", || {
            status = http_get(&c.client, addr(NODE_IP, 32001), "/healthz");
            status.0 != 0
        });
        assert_eq!(status.0, 200, "{}", status.1);
        assert!(status.1.contains(r#""localEndpoints":2"#), "{}", status.1);
        let (code, body) = http_get(&c.client, addr(NODE_IP, 32002), "/healthz");
        assert!(
            code == 503 && body.contains(r#""localEndpoints":0"#),
            "{code} {body}"
        );
    }
);

// The cases below need the packet-filter helpers (masquerade, source
// ranges, reject) that IPVS mode builds in kwp's nftables table.

vm_case!(masquerade_hairpin_to_itself_and_in_cluster_sources_kept, {
    let g = guest();
    let c = &g.cluster;
    let objects = service(c, "hp", "10.96.0.22", "", &["pod-b", "pod-c"], "TCP");
    g.apply(&objects, |t| shows(t, "TCP 10.96.0.22:80 rr", 2));
    let from = &c.pod("pod-b").ns;
    let outcomes = many(8, || tcp_from(from, addr("10.96.0.22", 80)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-b", "pod-c"]));
    for o in &outcomes {
        let Outcome::Answered(pod, src) = o else {
            unreachable!()
        };
        let want = if pod == "pod-b" {
            "10.244.1.1"
        } else {
            "10.244.1.12"
        };
        assert_eq!(
            src, want,
            "source {pod} saw (hairpin masqueraded, in-cluster kept)"
        );
    }
});

vm_case!(masquerade_node_port_from_outside, {
    let g = guest();
    let c = &g.cluster;
    let spec = "  type: NodePort\n  # nodePort: 30082\n";
    let objects = service(c, "npm", "10.96.0.23", spec, &["pod-c", "pod-d"], "TCP");
    g.apply(&objects, |t| shows(t, "TCP 203.0.113.1:30082 rr", 2));
    let outcomes = many(6, || tcp_from(&c.client, addr(NODE_IP, 30082)));
    assert_eq!(answered_by(&outcomes), pods(&["pod-c", "pod-d"]));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, src) if src != CLIENT_IP)),
        "externalTrafficPolicy Cluster masquerades: {outcomes:?}"
    );
});

vm_case!(
    load_balancer_source_ranges_filter_and_no_endpoints_rejects,
    {
        let g = guest();
        let c = &g.cluster;
        let open = "  type: LoadBalancer\n  loadBalancerSourceRanges: [203.0.113.0/30]\n  # nodePort: 30085\n";
        let closed = "  type: LoadBalancer\n  loadBalancerSourceRanges: [192.0.2.0/24]\n  # nodePort: 30086\n";
        let ingress =
            |ip: &str| format!("status:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n---\n");
        let objects = service(c, "lb", "10.96.0.24", open, &["pod-c"], "TCP").replacen(
            "---\n",
            &ingress("198.51.100.8"),
            1,
        ) + &service(c, "lbc", "10.96.0.25", closed, &["pod-c"], "TCP").replacen(
            "---\n",
            &ingress("198.51.100.10"),
            1,
        ) + &service(c, "empty", "10.96.0.26", "", &[], "TCP");
        g.apply(&objects, |t| {
            shows(t, "TCP 198.51.100.8:80 rr", 1) && shows(t, "TCP 198.51.100.10:80 rr", 1)
        });
        // The filter lives in kwp's nftables table.
        eventually("the filter table", || {
            c.node.sh("nft list ruleset").contains("198.51.100.10")
        });
        assert!(
            tcp_from(&c.client, addr("198.51.100.8", 80)).answered(),
            "allowed source"
        );
        assert_eq!(
            tcp_from(&c.client, addr("198.51.100.10", 80)),
            Outcome::TimedOut,
            "a source outside loadBalancerSourceRanges is dropped"
        );
        assert!(
            tcp_from(&c.client, addr(NODE_IP, 30086)).answered(),
            "source ranges apply to LB IPs only, not node ports"
        );
        assert_eq!(
            tcp_from(&c.client, addr("10.96.0.26", 80)),
            Outcome::Refused,
            "a Service without endpoints rejects"
        );
    }
);

// The churn soak of tests/soak.rs in IPVS mode, against the real
// kube-apiserver on the host (ipvs_vm/soak.rs): a short one here, kept
// small since every check runs under emulation; the long one through
// `scripts/soak.sh SECONDS RATE ipvs`.

vm_case!(churn_soak_against_the_api_server_matches_the_model, {
    let t = soak::in_guest("vsoak", 30, 5, 5);
    assert!(t.rounds >= 2 && t.changes >= 20, "{} changes", t.changes);
    assert!(t.probes > 0, "no frontend probed");
});

#[test]
#[ignore = "minutes long: scripts/soak.sh SECONDS RATE ipvs"]
fn churn_soak_long_in_ipvs_mode() {
    harness::alone("churn_soak_long_in_ipvs_mode", &soak::long_env(), || {
        let seconds = soak::env_or("KWP_SOAK_SECONDS", 600);
        soak::in_guest("vsoakl", seconds, soak::env_or("KWP_SOAK_RATE", 100), 10);
    });
}

/// Whether a connection got an answer from a pod.
trait Answered {
    fn answered(&self) -> bool;
}

impl Answered for Outcome {
    fn answered(&self) -> bool {
        matches!(self, Outcome::Answered(..))
    }
}
