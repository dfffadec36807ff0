//! One bad object must never take a node down: conflicting and invalid
//! Services in nftables mode, with real packets in a namespace cluster.
//! Every Service that can be programmed is, health stays good, and the
//! error names the object (docs/reliability.md).

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::node_proxy::{
    CONFIG, addr, answered_by, eventually, http_get, http_status, launch_in, many, service,
    start_full,
};
use common::topology::{Cluster, NODE_IP, Outcome, tcp_from};
use common::write;

const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

fn serving(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        METRICS,
        "--sync-period",
        "1s",
    ];
    args.extend_from_slice(extra);
    args
}

/// `service(...)` created at `created` (an RFC 3339 time).
fn service_at(
    c: &Cluster,
    name: &str,
    ip: &str,
    spec: &str,
    pods: &[&str],
    created: &str,
) -> String {
    service(c, name, ip, spec, pods, "TCP").replacen(
        &format!("metadata: {{name: {name}, namespace: t}}"),
        &format!("metadata: {{name: {name}, namespace: t, creationTimestamp: '{created}'}}"),
        1,
    )
}

fn healthz(c: &Cluster) -> u16 {
    http_status(&c.node, HEALTHZ.parse().unwrap(), "/healthz")
}

fn metric(c: &Cluster, name: &str) -> f64 {
    let (_, body) = http_get(&c.node, METRICS.parse().unwrap(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn answers(c: &Cluster, to: SocketAddr) -> BTreeSet<String> {
    answered_by(&many(12, || tcp_from(&c.client, to)))
}

#[test]
fn a_shared_frontend_belongs_to_the_oldest_service_and_the_rest_is_programmed() {
    let c = Cluster::new("dup");
    // 198.51.100.x stands for addresses routed to this node by a router.
    c.client.sh("ip route add 198.51.100.0/24 via 203.0.113.1");
    // old and young share an external IP and port (the API server does
    // not check that); clash reuses old's cluster IP (only a file source
    // can); other is unrelated. young also has a node port of its own.
    let ext = "  type: NodePort\n  externalIPs: [198.51.100.7]\n";
    let young = || {
        service_at(
            &c,
            "young",
            "10.96.1.2",
            &format!("{ext}  # nodePort: 30101\n"),
            &["pod-c"],
            "2025-06-01T00:00:00Z",
        )
    };
    let clash = || {
        service_at(
            &c,
            "clash",
            "10.96.1.1",
            "",
            &["pod-d"],
            "2025-07-01T00:00:00Z",
        )
    };
    let other = || service(&c, "other", "10.96.1.3", "", &["pod-b"], "TCP");
    let old = service_at(
        &c,
        "old",
        "10.96.1.1",
        ext,
        &["pod-a"],
        "2024-01-01T00:00:00Z",
    );
    let objects = [young(), clash(), old, other()].concat();
    let p = start_full(&c, &objects, CONFIG, &Cluster::node_yaml(), &serving(&[]));
    eventually("the unrelated Service", || {
        c.node.sh("nft list ruleset").contains("10.96.1.3")
    });
    // A fresh node with conflicts programs everything it can.
    let pod = &c.pod("pod-b").ns;
    let from_pod = |ip: &str| answered_by(&many(6, || tcp_from(pod, addr(ip, 80))));
    let only = |pod: &str| BTreeSet::from([pod.to_string()]);
    assert_eq!(from_pod("10.96.1.3"), only("pod-b"));
    assert_eq!(
        from_pod("10.96.1.1"),
        only("pod-a"),
        "the older Service owns the cluster IP"
    );
    assert_eq!(
        answers(&c, addr("198.51.100.7", 80)),
        only("pod-a"),
        "and the external IP"
    );
    assert_eq!(
        from_pod("10.96.1.2"),
        only("pod-c"),
        "the younger keeps what is its own"
    );
    assert_eq!(answers(&c, addr(NODE_IP, 30101)), only("pod-c"));
    assert_eq!(healthz(&c), 200, "conflicts do not make the node unhealthy");
    eventually("the conflict metric", || {
        metric(&c, "kwp_frontend_conflicts") == 2.0
    });
    eventually("the conflicts named in the log", || {
        let logs = p.logs.text();
        [
            "t/young",
            "t/clash",
            "198.51.100.7:80/tcp",
            "already belongs to an older Service",
        ]
        .iter()
        .all(|s| logs.contains(s))
    });
    // Beyond two sync periods, still healthy and still no failed sync.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(healthz(&c), 200);
    assert_eq!(metric(&c, "kwp_sync_proxy_rules_errors_total"), 0.0);

    // The owner goes: the others take its frontends over.
    write(
        &p.dir,
        "objects.yaml",
        &[young(), clash(), other()].concat(),
    );
    eventually(
        "the younger Service on the shared IP",
        || matches!(tcp_from(&c.client, addr("198.51.100.7", 80)), Outcome::Answered(pod, _) if pod == "pod-c"),
    );
    assert_eq!(answers(&c, addr("198.51.100.7", 80)), only("pod-c"));
    assert_eq!(from_pod("10.96.1.1"), only("pod-d"));
    // The gauge is set once the sync that applied the rules returns.
    eventually("no conflicts counted", || {
        metric(&c, "kwp_frontend_conflicts") == 0.0
    });

    // Both gone: nothing of them stays in the kernel.
    write(&p.dir, "objects.yaml", &other());
    eventually("the shared frontends removed", || {
        let rules = c.node.sh("nft list ruleset");
        !rules.contains("10.96.1.1") && !rules.contains("198.51.100.7")
    });
    assert_eq!(from_pod("10.96.1.3"), only("pod-b"));
}

#[test]
fn an_invalid_service_is_named_and_spares_health_and_the_others() {
    let c = Cluster::new("bad");
    // A name no API server accepts, with ClientIP affinity; and an
    // affinity timeout the kernel refuses.
    let invalid = service(
        &c,
        "bad",
        "10.96.2.1",
        "  sessionAffinity: ClientIP\n",
        &["pod-a"],
        "TCP",
    )
    .replace("name: bad, namespace", "name: 'b;ad', namespace");
    let huge_timeout = service(
        &c,
        "sticky",
        "10.96.2.2",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2147483647}}\n",
        &["pod-a"],
        "TCP",
    );
    let good = service(&c, "good", "10.96.2.3", "", &["pod-b"], "TCP");
    let p = start_full(
        &c,
        &[invalid, huge_timeout, good].concat(),
        CONFIG,
        &Cluster::node_yaml(),
        &serving(&[]),
    );
    let pod = &c.pod("pod-c").ns;
    eventually("the good Service", || {
        matches!(tcp_from(pod, addr("10.96.2.3", 80)), Outcome::Answered(..))
    });
    assert_eq!(
        answered_by(&many(4, || tcp_from(pod, addr("10.96.2.2", 80)))),
        BTreeSet::from(["pod-a".to_string()]),
        "the timeout falls back to the default"
    );
    assert!(
        c.node.sh("nft list ruleset").contains("timeout 3h"),
        "the default 10800 s timeout"
    );
    assert!(!c.node.sh("nft list ruleset").contains("10.96.2.1"));
    let logs = p.logs.text();
    assert!(
        logs.contains("b;ad") && logs.contains("not a valid DNS label"),
        "{logs}"
    );
    assert!(
        logs.contains("t/sticky") && logs.contains("timeoutSeconds 2147483647"),
        "{logs}"
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(healthz(&c), 200);
    assert_eq!(metric(&c, "kwp_sync_proxy_rules_errors_total"), 0.0);
}

#[test]
fn a_kill_during_the_first_sync_converges_after_the_restart() {
    let c = Cluster::new("kill");
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    write(&objects, "node.yaml", &Cluster::node_yaml());
    let all: String = (0..N)
        .map(|i| {
            service(
                &c,
                &format!("s{i}"),
                &format!("10.97.{}.{}", i / 250, i % 250 + 1),
                "",
                &["pod-a"],
                "TCP",
            )
        })
        .collect();
    write(&objects, "services.yaml", &all);
    let config = dir.path().join("config.conf");
    std::fs::write(&config, CONFIG).unwrap();
    let source = format!("file:{}", objects.display());
    let args = [
        "--proxy-mode",
        "nftables",
        "--source",
        &source,
        "--config",
        config.to_str().unwrap(),
        "--hostname-override",
        "node-1",
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        "",
    ];
    let programmed = || {
        c.node
            .sh("nft list map ip kube-wasm-proxy service-ips 2>/dev/null; true")
            .matches(" : goto")
            .count()
    };

    // SIGKILL while the first sync is under way.
    let first = launch_in(&c, tempfile::tempdir().unwrap(), &args);
    eventually("the first run to start", || {
        first.logs.text().contains("kube-wasm-proxy starting")
    });
    // Reading 2,000 Services and rendering them takes longer than this.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(first);
    let left = programmed();
    assert!(left < N, "the kill came after the first sync had finished");

    let second = launch_in(&c, tempfile::tempdir().unwrap(), &args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while programmed() < N {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {N} programmed after the restart (the killed run left {left})",
            programmed()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(healthz(&c), 200);
    assert!(
        !second.logs.text().contains("ERROR"),
        "{}",
        second.logs.text()
    );
    let pod = &c.pod("pod-b").ns;
    assert!(matches!(
        tcp_from(pod, addr("10.97.7.250", 80)),
        Outcome::Answered(..)
    ));
}
