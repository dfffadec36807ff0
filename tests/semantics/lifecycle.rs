//! Services and endpoints that change under a running proxy, and the proxy
//! itself replaced: incremental changes, adoption on restart, stale UDP
//! flows, zone hints, terminating endpoints.

use std::time::Duration;

use super::{Mode, pods};
use crate::common::fixtures::TestService;
use crate::common::node_proxy::{addr, answered_by, eventually, many};
use crate::common::scenarios;
use crate::common::topology::{ContinuousClient, Outcome, tcp_from};
use crate::common::write;

pub fn endpoint_changes_apply_incrementally_and_foreign_rules_are_untouched(mode: &Mode) {
    let c = mode.cluster("inc");
    (mode.add_foreign)(&c);
    let before = (mode.foreign)(&c);
    assert!(!before.is_empty(), "the foreign rules are listed");
    let web = |pods: &[&str]| TestService::new(&c, "web", "10.96.0.16").pods(pods).yaml();
    let p = mode.start(&c, &web(&["pod-a", "pod-c", "pod-d"]));
    let from = &c.pod("pod-b").ns;
    assert!(answered_by(&many(30, || tcp_from(from, addr("10.96.0.16", 80)))).contains("pod-d"));

    write(&p.dir, "objects.yaml", &web(&["pod-a", "pod-c"]));
    eventually("pod-d removed", || !mode.rules(&c).contains("10.244.2.12"));
    assert_eq!(
        answered_by(&many(20, || tcp_from(from, addr("10.96.0.16", 80)))),
        pods(&["pod-a", "pod-c"])
    );
    std::thread::sleep(Duration::from_millis(2500)); // a full resync ran too
    assert_eq!(
        (mode.foreign)(&c),
        before,
        "another program's rules changed"
    );
}

pub fn a_restart_adopts_the_rules_without_dropping_a_connection(mode: &Mode) {
    let c = mode.cluster("rst");
    let objects = TestService::new(&c, "web", "10.96.0.18")
        .pods(&["pod-a", "pod-c"])
        .yaml();
    let first = mode.start(&c, &objects);
    assert!(matches!(
        tcp_from(&c.pod("pod-b").ns, addr("10.96.0.18", 80)),
        Outcome::Answered(..)
    ));

    // A client hammering the Service while the proxy is killed and replaced.
    let client = ContinuousClient::start(&c.pod("pod-b").ns, addr("10.96.0.18", 80));
    std::thread::sleep(Duration::from_millis(300));
    drop(first); // SIGKILL: the rules stay behind
    let second = mode.start(&c, &objects);
    std::thread::sleep(Duration::from_millis(2500)); // its first (full) sync and a resync ran
    let (ok, failed) = client.stop();
    let logs = second.logs.text();
    assert!(
        !logs.contains("failed"),
        "adopting the rules (or resyncing them) failed:\n{logs}"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections");
    assert!(mode.rules(&c).contains("10.96.0.18"));
    drop(second);
}

pub fn stale_udp_conntrack_entries_are_flushed_when_an_endpoint_goes(mode: &Mode) {
    let c = mode.cluster("ct");
    scenarios::stale_udp_flow_moves(
        &c,
        "10.96.0.27",
        |c, objects| mode.start(c, objects),
        |c| mode.rules(c),
    );
}

pub fn topology_hints_keep_traffic_in_the_zone_when_every_endpoint_has_them(mode: &Mode) {
    let c = mode.cluster("topo");
    scenarios::topology_hints(&c, "10.96.0.28", |c, objects| mode.start(c, objects));
}

pub fn terminating_endpoints_serve_only_when_nothing_is_ready(mode: &Mode) {
    let c = mode.cluster("term");
    scenarios::terminating_fallback(&c, "10.96.0.29", |c, objects| mode.start(c, objects));
}
