//! What only nftables mode has, in the namespace cluster of
//! common/topology.rs: its table repaired and its transactions refused in
//! part, Maglev in the kernel's maps, SCTP rules, its dry-run format and
//! the mode plugin reloaded under traffic. What a Service means is in
//! `semantics`, run for every kernel mode.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fixtures::TestService;
use common::node_proxy::{CONFIG, addr, eventually, start, start_full};
use common::topology::{Cluster, NODE_IP, Outcome, tcp_from};
use common::write;

#[test]
fn a_deleted_table_is_repaired_within_sync_period() {
    let c = Cluster::new("rep");
    let _p = start(
        &c,
        &TestService::new(&c, "web", "10.96.0.17")
            .pods(&["pod-a"])
            .yaml(),
    );
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
fn dry_run_shows_the_diff_against_the_kernel_and_applies_nothing() {
    let c = Cluster::new("dry");
    let dry_run = |pods: &[&str]| {
        common::node_proxy::dry_run(
            &c,
            "nftables",
            &TestService::new(&c, "web", "10.96.0.22").pods(pods).yaml(),
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

    let p = start(
        &c,
        &TestService::new(&c, "web", "10.96.0.22")
            .pods(&["pod-a"])
            .yaml(),
    );
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
        TestService::new(&c, "web", "10.96.0.23")
            .node_port(30087)
            .annotate("kube-wasm-proxy.io/lb-policy", "maglev")
            .pods(pods)
            .yaml()
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
    let sig = TestService::new(&c, "sig", "10.96.0.24")
        .protocol("SCTP")
        .node_port(30088)
        .pods(&["pod-a"]);
    let _p = start(&c, &sig.yaml());
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
        &TestService::new(&c, "web", "10.96.0.36")
            .pods(&["pod-a", "pod-c"])
            .yaml(),
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

/// A table an earlier kwp left, with the endpoint checks hooked before DNAT
/// (`filter-input/forward/output`, priority -110): the first reconcile
/// replaces them with the post-DNAT chains in one transaction (a kernel
/// cannot re-hook a base chain, so they have new names), and the node's own
/// connection to a node port short-circuited to a remote pod is no longer
/// dropped by the old check.
#[test]
fn the_pre_dnat_endpoint_checks_of_an_earlier_version_are_replaced() {
    let c = Cluster::new("upg");
    let old = ["input", "forward", "output"]
        .map(|hook| {
            format!(
                "add chain ip kube-wasm-proxy filter-{hook} {{ type filter hook {hook} priority -110; }}\nadd rule ip kube-wasm-proxy filter-{hook} ct state new jump service-endpoints-check\n"
            )
        })
        .concat();
    c.node.sh(&format!(
        "printf '%s' 'add table ip kube-wasm-proxy\nadd chain ip kube-wasm-proxy service-endpoints-check\n{old}' | nft -f -"
    ));
    let far = TestService::new(&c, "far", "10.96.0.39")
        .node_port(30095)
        .internal_traffic_local()
        .external_traffic_local()
        .pods(&["pod-c"]);
    let p = start(&c, &far.yaml());
    eventually("the post-DNAT checks in place of the old ones", || {
        let table = c.node.sh("nft list table ip kube-wasm-proxy");
        table.contains("chain filter-output-post-dnat") && !table.contains("chain filter-output {")
    });
    assert!(
        matches!(tcp_from(&c.node, addr(NODE_IP, 30095)), Outcome::Answered(pod, _) if pod == "pod-c"),
        "the node's own connection, short-circuited to the remote pod"
    );
    let logs = p.logs.text();
    assert!(!logs.contains("failed"), "{logs}");
}
