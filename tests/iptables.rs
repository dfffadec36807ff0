//! What only iptables mode has, in the namespace cluster of
//! common/topology.rs: its chain layout, rule-by-rule deltas, the backend
//! choice (nft or legacy), refusing consistent hashing, SCTP rules and its
//! dry-run format. What a Service means is in `semantics`, run for both
//! iptables backends.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fixtures::TestService;
use common::node_proxy::{CONFIG, Proxy, addr, answered_by, eventually, many, start_full};
use common::topology::{Cluster, NODE_IP, Outcome, tcp_from};
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
fn a_consistent_hash_policy_is_refused_by_name_and_the_others_sync() {
    let c = Cluster::new("imag");
    let maglev = TestService::new(&c, "hashed", "10.96.0.19")
        .annotate("kube-wasm-proxy.io/lb-policy", "maglev")
        .pods(&["pod-a", "pod-c"])
        .yaml();
    let plain = TestService::new(&c, "plain", "10.96.0.20")
        .pods(&["pod-a"])
        .yaml();
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
fn sctp_services_are_programmed() {
    let c = Cluster::new("isctp");
    let _p = start(
        &c,
        &TestService::new(&c, "assoc", "10.96.0.26")
            .protocol("SCTP")
            .pods(&["pod-a"])
            .yaml(),
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
fn services_come_and_go_by_rule_in_the_shared_dispatch_chain() {
    let c = Cluster::new("idel");
    let first = TestService::new(&c, "one", "10.96.0.28")
        .pods(&["pod-a"])
        .yaml();
    let second = TestService::new(&c, "two", "10.96.0.29")
        .node_port(30093)
        .pods(&["pod-c"])
        .yaml();
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
    // The base chains' jumps stay single through the changes and a full
    // resync (--sync-period 2s in `start`).
    std::thread::sleep(Duration::from_millis(2500));
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
fn a_node_on_iptables_legacy_gets_its_rules_in_legacy() {
    let c = Cluster::new("ileg");
    // Another program's rule in the legacy tables: the node uses legacy.
    c.node
        .sh("iptables-legacy -N BYSTANDER && iptables-legacy -A INPUT -j BYSTANDER");
    let p = start(
        &c,
        &TestService::new(&c, "web", "10.96.0.34")
            .pods(&["pod-a", "pod-c"])
            .yaml(),
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
    let objects = TestService::new(&c, "web", "10.96.0.35")
        .pods(&["pod-a"])
        .yaml();
    let dry_run = || {
        common::node_proxy::dry_run(
            &c,
            "iptables",
            &TestService::new(&c, "web", "10.96.0.35")
                .pods(&["pod-a"])
                .yaml(),
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
