//! Real-packet scenarios that every kernel mode must pass, parameterised
//! by how the mode's proxy starts and how its rules are listed.

use std::time::Duration;

use std::collections::BTreeSet;

use super::node_proxy::{Proxy, addr, answered_by, eventually, many, service};
use super::topology::{CLIENT_IP, Cluster, Outcome, POD_PORT, tcp_from};
use super::write;

/// One long-lived UDP flow (the same 5-tuple throughout) from pod-b to
/// Service `dns` at `ip`: answered by pod-c; when pod-c leaves the Service
/// (still running, so only a stale conntrack entry could reach it) the
/// flow must move to pod-a.
pub fn stale_udp_flow_moves(
    c: &Cluster,
    ip: &'static str,
    start: impl Fn(&Cluster, &str) -> Proxy,
    rules: impl Fn(&Cluster) -> String,
) {
    let p = start(c, &service(c, "dns", ip, "", &["pod-c"], "UDP"));
    eventually("udp rules", || rules(c).contains(ip));
    let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<String>>();
    c.pod("pod-b").ns.background(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(reply_to) = rx.recv() {
            let _ = socket.send_to(b"who", addr(ip, 80));
            let mut buf = [0u8; 128];
            let answer = match socket.recv_from(&mut buf) {
                Ok((n, _)) => String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                Err(_) => "timeout".into(),
            };
            let _ = reply_to.send(answer);
        }
    });
    let ask = || {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        tx.send(reply_tx).unwrap();
        reply_rx.recv().unwrap()
    };
    assert_eq!(ask(), "pod-c");
    write(
        &p.dir,
        "objects.yaml",
        &service(c, "dns", ip, "", &["pod-a"], "UDP"),
    );
    eventually("pod-c removed", || !rules(c).contains("10.244.2.11"));
    let mut answer = String::new();
    eventually("the flow to reach pod-a", || {
        answer = ask();
        answer == "pod-a"
    });
    assert_eq!(ask(), "pod-a");
}

/// A Service over explicit endpoint lines (`- {addresses: [...], ...}`).
pub fn service_with(name: &str, ip: &str, spec: &str, endpoints: &[String]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: {ip}\n{spec}  ports: [{{name: p, port: 80, protocol: TCP}}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
addressType: IPv4\nports: [{{name: p, port: {POD_PORT}, protocol: TCP}}]\nendpoints:\n{}---\n",
        endpoints.concat()
    )
}

pub fn ep(c: &Cluster, pod: &str, extra: &str) -> String {
    let p = c.pod(pod);
    let node = if p.local { "node-1" } else { "node-2" };
    format!("- {{addresses: ['{}'], nodeName: {node}, {extra}}}\n", p.ip)
}

/// Zone hints are followed when every endpoint has them (the node is in
/// zone-a) and ignored when one lacks them.
pub fn topology_hints(c: &Cluster, ip: &'static str, start: impl Fn(&Cluster, &str) -> Proxy) {
    let zone = |z: &str| {
        format!("conditions: {{ready: true}}, zone: {z}, hints: {{forZones: [{{name: {z}}}]}}")
    };
    let hinted: Vec<String> = [
        ("pod-a", "zone-a"),
        ("pod-c", "zone-a"),
        ("pod-b", "zone-b"),
        ("pod-d", "zone-b"),
    ]
    .iter()
    .map(|(pod, z)| ep(c, pod, &zone(z)))
    .collect();
    let p = start(c, &service_with("web", ip, "", &hinted));
    let from = &c.pod("pod-b").ns;
    // The node is in zone-a (Cluster::node_yaml).
    assert_eq!(
        answered_by(&many(20, || tcp_from(from, addr(ip, 80)))),
        BTreeSet::from(["pod-a".to_string(), "pod-c".to_string()])
    );

    // One endpoint without hints: hints are ignored, all four serve.
    let mut partial = hinted.clone();
    partial[3] = ep(c, "pod-d", "conditions: {ready: true}, zone: zone-b");
    write(
        &p.dir,
        "objects.yaml",
        &service_with("web", ip, "", &partial),
    );
    eventually("all four endpoints to serve", || {
        answered_by(&many(40, || tcp_from(from, addr(ip, 80)))).len() == 4
    });
}

/// Terminating (still serving) endpoints serve only when none is ready.
pub fn terminating_fallback(
    c: &Cluster,
    ip: &'static str,
    start: impl Fn(&Cluster, &str) -> Proxy,
) {
    let ready = "conditions: {ready: true, serving: true, terminating: false}";
    let draining = "conditions: {ready: false, serving: true, terminating: true}";
    let gone = "conditions: {ready: false, serving: false, terminating: true}";
    let p = start(
        c,
        &service_with(
            "web",
            ip,
            "",
            &[ep(c, "pod-a", ready), ep(c, "pod-c", draining)],
        ),
    );
    let from = &c.pod("pod-b").ns;
    assert_eq!(
        answered_by(&many(12, || tcp_from(from, addr(ip, 80)))),
        BTreeSet::from(["pod-a".to_string()])
    );

    write(
        &p.dir,
        "objects.yaml",
        &service_with(
            "web",
            ip,
            "",
            &[ep(c, "pod-a", gone), ep(c, "pod-c", draining)],
        ),
    );
    eventually(
        "fallback to the draining endpoint",
        || matches!(tcp_from(from, addr(ip, 80)), Outcome::Answered(p, _) if p == "pod-c"),
    );
    assert_eq!(
        answered_by(&many(12, || tcp_from(from, addr(ip, 80)))),
        BTreeSet::from(["pod-c".to_string()])
    );
}

/// Each detect-local mode (BridgeInterface, InterfaceNamePrefix, NodeCIDR
/// matching and not matching the pod) decides whether an in-cluster source
/// is masqueraded; an outside source always is. `clean` removes the rules
/// a killed proxy left, so that each case waits for its own.
pub fn detect_local_modes(
    c: &Cluster,
    ip: &'static str,
    start: impl Fn(&Cluster, &str, &str, &str) -> Proxy,
    rules: impl Fn(&Cluster) -> String,
    clean: impl Fn(&Cluster),
) {
    let objects = service(c, "web", ip, "", &["pod-c"], "TCP");
    let base = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let source_seen = |from: &super::netns::Netns| match tcp_from(from, addr(ip, 80)) {
        Outcome::Answered(_, src) => src,
        other => panic!("{other:?}"),
    };
    let node_with_cidr = |cidr: &str| {
        Cluster::node_yaml().replace(
            "status:",
            &format!("spec:\n  podCIDRs: ['{cidr}']\nstatus:"),
        )
    };
    let cases = [
        (
            format!(
                "{base}detectLocalMode: BridgeInterface\ndetectLocal: {{bridgeInterface: br0}}\n"
            ),
            Cluster::node_yaml(),
            true,
        ),
        (
            format!(
                "{base}detectLocalMode: InterfaceNamePrefix\ndetectLocal: {{interfaceNamePrefix: br}}\n"
            ),
            Cluster::node_yaml(),
            true,
        ),
        (
            format!("{base}detectLocalMode: NodeCIDR\n"),
            node_with_cidr("10.244.1.0/24"),
            true,
        ),
        (
            format!("{base}detectLocalMode: NodeCIDR\n"),
            node_with_cidr("10.244.9.0/24"),
            false,
        ),
    ];
    for (config, node, pod_is_local) in cases {
        let p = start(c, &objects, &config, &node);
        eventually("rules", || rules(c).contains(ip));
        let from_pod = source_seen(&c.pod("pod-b").ns);
        assert_eq!(
            from_pod == "10.244.1.12",
            pod_is_local,
            "{config} {node}: pod source seen as {from_pod}"
        );
        assert_ne!(
            source_seen(&c.client),
            CLIENT_IP,
            "{config}: an outside source is masqueraded"
        );
        drop(p);
        clean(c);
    }
}
