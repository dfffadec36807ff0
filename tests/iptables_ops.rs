//! iptables mode in operation, with real packets in the namespace cluster
//! of common/topology.rs: upstream's iptables metrics as a scrape shows
//! them, drift repair when someone flushes iptables under the proxy,
//! localhost node ports, and hot reload of the mode plugin.

use crate::common;

use std::time::{Duration, Instant};

use common::node_proxy::{
    CONFIG, Proxy, addr, answered_by, eventually, http_get, many, service, start_full,
};
use common::topology::{Cluster, Outcome, tcp_from};
use common::write;

const METRICS: &str = "127.0.0.1:10249";

fn start(c: &Cluster, objects: &str, extra: &[&str]) -> Proxy {
    let mut args = vec![
        "--proxy-mode",
        "iptables",
        "--metrics-bind-address",
        METRICS,
    ];
    args.extend_from_slice(extra);
    start_full(c, objects, CONFIG, &Cluster::node_yaml(), &args)
}

fn save(c: &Cluster, table: &str) -> String {
    c.node.sh(&format!("iptables-save -t {table}"))
}

/// The value of one sample line of the proxy's `/metrics`, 0 if absent.
fn sample(c: &Cluster, series: &str) -> f64 {
    let (status, body) = http_get(&c.node, METRICS.parse().unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Rules in our chains of one table, as iptables-save shows them (the
/// canary aside: upstream's is empty, so its count leaves it out).
fn our_rules(c: &Cluster, table: &str) -> usize {
    save(c, table)
        .lines()
        .filter(|l| l.starts_with("-A KWP-") && !l.starts_with("-A KWP-PROXY-CANARY "))
        .count()
}

#[test]
fn upstream_iptables_metrics_count_what_the_kernel_holds() {
    let c = Cluster::new("imet");
    let objects = |pods: &[&str]| service(&c, "web", "10.96.0.40", "", pods, "TCP");
    let p = start(&c, &objects(&["pod-a", "pod-c", "pod-d"]), &[]);
    let nat = r#"kubeproxy_sync_proxy_rules_iptables_total{table="nat",ip_family="IPv4"}"#;
    let filter = r#"kubeproxy_sync_proxy_rules_iptables_total{table="filter",ip_family="IPv4"}"#;
    eventually("the rule counts", || {
        sample(&c, nat) as usize == our_rules(&c, "nat")
            && sample(&c, filter) as usize == our_rules(&c, "filter")
    });
    assert!(sample(&c, nat) > 10.0);
    assert_eq!(
        sample(&c, r#"kwp_iptables_backend_info{backend="nft"}"#),
        1.0
    );
    let full = r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#;
    let partial = r#"kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#;
    assert!(sample(&c, full) >= 1.0);
    let partial_before = sample(&c, partial);
    // One endpoint goes: a partial sync, and the counts follow the kernel.
    write(&p.dir, "objects.yaml", &objects(&["pod-a", "pod-c"]));
    eventually("pod-d removed", || !save(&c, "nat").contains("10.244.2.12"));
    eventually("a partial sync counted", || {
        sample(&c, partial) > partial_before && sample(&c, nat) as usize == our_rules(&c, "nat")
    });
    let last = r#"kubeproxy_sync_proxy_rules_iptables_last{table="nat",ip_family="IPv4"}"#;
    assert!(
        sample(&c, last) < sample(&c, nat),
        "a partial sync writes less than the whole table"
    );
    assert_eq!(
        sample(
            &c,
            r#"kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}"#
        ),
        0.0
    );
}

/// Time until `from` reaches `ip`:80 again, polling every 20 ms.
fn until_answered(c: &Cluster, ip: &str) -> Duration {
    let start = Instant::now();
    let from = &c.pod("pod-b").ns;
    while !matches!(tcp_from(from, addr(ip, 80)), Outcome::Answered(..)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{ip} never answered again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn a_flushed_nat_table_comes_back_long_before_the_sync_period() {
    let c = Cluster::new("ican");
    let _p = start(
        &c,
        &service(&c, "web", "10.96.0.41", "", &["pod-a", "pod-c"], "TCP"),
        &["--sync-period", "120s"],
    );
    let from = &c.pod("pod-b").ns;
    assert_eq!(
        answered_by(&many(10, || tcp_from(from, addr("10.96.0.41", 80)))).len(),
        2
    );
    let canary = "-A KWP-PROXY-CANARY -j RETURN";
    assert!(save(&c, "nat").contains(canary), "{}", save(&c, "nat"));
    assert!(save(&c, "filter").contains(canary));
    // `iptables -t nat -F`: every rule gone, chains kept.
    c.node.sh("iptables -t nat -F");
    assert!(!save(&c, "nat").contains("10.96.0.41"));
    let flushed = until_answered(&c, "10.96.0.41");
    // `-F` and `-X`: our chains gone too, as a firewall restart leaves it.
    c.node.sh("iptables -t nat -F && iptables -t nat -X");
    let deleted = until_answered(&c, "10.96.0.41");
    eprintln!("service back after nat -F in {flushed:?}, after -F -X in {deleted:?}");
    for took in [flushed, deleted] {
        assert!(
            took < Duration::from_secs(5),
            "{took:?}: not the canary (syncPeriod is 120 s)"
        );
    }
    assert!(save(&c, "nat").contains(canary));
    assert_eq!(
        save(&c, "nat")
            .matches("-A PREROUTING -j KWP-SERVICES")
            .count(),
        1
    );
    assert_eq!(sample(&c, "kwp_iptables_canary_resyncs_total"), 2.0);
}
