//! The API server slow, erroring and flapping (issue 14, part 3), with the
//! proxy on `--source kubernetes` in nftables mode against the real
//! kube-apiserver, reaching it through a fault relay
//! (common/fault_relay.rs) as a node reaches its API server. Throughout a
//! fault the rules in force stay: a client connecting back to back through
//! the cluster IP sees no failure, and the kernel table does not change
//! until a change arrives. A change written during the fault is programmed
//! after it, and the catch-up is measured. Errors are counted in /metrics,
//! and /healthz stays 200 as upstream's does: its health follows changes
//! queued and not programmed, and an outage queues nothing.

use crate::common;

use std::time::{Duration, Instant};

use common::fault_relay::Fault;
use common::kube_node::{CLUSTER_IP, HEALTHZ, Setup, addr, rbac};
use common::topology::ContinuousClient;

/// A node with the Service `web` served by pod-a and pod-c, and a client
/// connecting to its cluster IP from pod-b until stopped.
fn started(tag: &str) -> (Setup, ContinuousClient) {
    started_with(tag, &[])
}

/// `started`, with the proxy's environment `env` (`NAME=value`).
pub(crate) fn started_with(tag: &str, env: &[&str]) -> (Setup, ContinuousClient) {
    let s = Setup::start_faulty(tag, "nftables", &rbac(), env, Fault::None);
    s.apply_service(false);
    s.apply_slice(&["pod-a", "pod-c"]);
    s.expect_backends(&["pod-a", "pod-c"]);
    let client = ContinuousClient::start_every(
        s.pod("pod-b"),
        addr(CLUSTER_IP, 80),
        Duration::from_millis(2),
    );
    (s, client)
}

/// Watches the node for `how_long`: every half second /healthz must be 200
/// and, with `table`, the kernel table exactly `table`. Returns the number
/// of checks made.
pub(crate) fn holds(s: &Setup, how_long: Duration, table: Option<&str>) -> usize {
    let end = Instant::now() + how_long;
    let mut checks = 0;
    while Instant::now() < end {
        let (code, body) = s.http(HEALTHZ, "/healthz");
        assert_eq!(code, 200, "/healthz during the fault: {body}");
        if let Some(table) = table {
            let now = s.rules();
            assert!(
                now == table,
                "the table changed during the fault (fault {:?}):\nbefore:\n{table}\nnow:\n{now}",
                s.relay.fault()
            );
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    checks
}

/// Whether the table sends the Service to exactly `pods` (by address).
pub(crate) fn programmed(s: &Setup, pods: &[&str]) -> bool {
    let table = s.rules();
    s.cluster
        .pods
        .iter()
        .all(|p| table.contains(&format!("{} ", p.ip)) == pods.contains(&p.name))
}

/// How long from now until `pods` are programmed (polled every 50 ms).
pub(crate) fn until_programmed(s: &Setup, pods: &[&str], within: Duration) -> Duration {
    let started = Instant::now();
    while !programmed(s, pods) {
        assert!(
            started.elapsed() < within,
            "{pods:?} not programmed within {within:?}:\n{}\n{}",
            s.rules(),
            s.logs.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

pub(crate) fn source_errors(s: &Setup) -> f64 {
    s.metric("kwp_source_errors_total")
}

/// Stops the client: nothing may have failed.
pub(crate) fn no_connection_failed(client: ContinuousClient, what: &str) -> usize {
    let (ok, failed) = client.stop();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} connections failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "{what}: the client barely ran ({ok})");
    ok
}

/// A slow API server (3 s added each way on every byte): the watch keeps
/// working, late; a change is programmed once it crosses, nothing else
/// moves, nothing fails.
#[test]
fn a_slow_api_server_delays_changes_and_loses_nothing() {
    let (s, client) = started("apislow");
    let table = s.rules();
    let latency = Duration::from_secs(3);
    s.relay.set(Fault::Latency(latency));
    holds(&s, Duration::from_secs(6), Some(&table));
    s.apply_slice(&["pod-d"]);
    let took = until_programmed(&s, &["pod-d"], Duration::from_secs(60));
    eprintln!(
        "slow API server (+{latency:?} each way): a change was programmed {took:?} after it was written"
    );
    assert!(
        took >= latency,
        "programmed in {took:?}: did it cross the relay?"
    );
    holds(&s, Duration::from_secs(2), None);
    s.relay.set(Fault::None);
    s.apply_slice(&["pod-a"]);
    let took = until_programmed(&s, &["pod-a"], Duration::from_secs(30));
    eprintln!("after the latency went: the next change took {took:?}");
    s.expect_backends(&["pod-a"]);
    let ok = no_connection_failed(client, "slow API server");
    eprintln!("slow API server: {ok} connections, none failed");
    assert!(
        s.relay
            .counts
            .relayed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// The API server refusing connections, resetting them, answering 503,
/// then 429: each for 8 s with a change written in the middle. The rules
/// in force stay through each; each change is programmed after recovery
/// (the catch-up, printed, is the watch's backoff: 0.8 s doubling up to
/// 30 s with jitter, as client-go's reflector); each fault is counted.
#[test]
fn an_erroring_api_server_keeps_the_rules_and_catches_up() {
    let (s, client) = started("apierr");
    let rounds = [
        (Fault::Refuse, "pod-d"),
        (Fault::Reset, "pod-a"),
        (Fault::Http(503), "pod-c"),
        (Fault::Http(429), "pod-d"),
    ];
    let mut report = Vec::new();
    for (fault, pod) in rounds {
        let table = s.rules();
        let errors = source_errors(&s);
        s.relay.set(fault.clone());
        holds(&s, Duration::from_secs(4), Some(&table));
        s.apply_slice(&[pod]);
        holds(&s, Duration::from_secs(4), Some(&table));
        let counted = source_errors(&s) - errors;
        assert!(
            counted >= 1.0,
            "{fault:?}: no watch error counted in /metrics"
        );
        s.relay.set(Fault::None);
        let took = until_programmed(&s, &[pod], Duration::from_secs(45));
        eprintln!(
            "{fault:?} for 8 s: {counted} watch errors counted; caught up {took:?} after recovery"
        );
        report.push((fault, counted, took));
        holds(&s, Duration::from_millis(500), None);
    }
    s.expect_backends(&["pod-d"]);
    let ok = no_connection_failed(client, "erroring API server");
    let counts = &s.relay.counts;
    let (resets, http) = (
        counts.reset.load(std::sync::atomic::Ordering::Relaxed),
        counts
            .http_errors
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!(
        "erroring API server: {ok} connections, none failed; relay reset {resets}, answered {http} HTTP errors; {report:?}"
    );
    assert!(resets >= 1 && http >= 2, "the faults were not injected");
}

/// The API server flapping: down (refusing, then resetting, in turn) and
/// up every 3 s for a minute (`KWP_FLAP_SECS`). Nothing changes for the
/// first half, then a change is written; it is programmed by the end, and
/// how long it took (through the remaining flaps) is printed.
#[test]
fn a_flapping_api_server_for_a_minute_loses_nothing() {
    let (s, client) = started("apiflap");
    let seconds: u64 = std::env::var("KWP_FLAP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let table = s.rules();
    let errors = source_errors(&s);
    let started = Instant::now();
    let (mut written, mut arrived) = (None, None);
    let mut flaps = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let down = if flaps % 2 == 0 {
            Fault::Refuse
        } else {
            Fault::Reset
        };
        for fault in [down, Fault::None] {
            s.relay.set(fault);
            let phase = Instant::now() + Duration::from_secs(3);
            while Instant::now() < phase {
                let (code, body) = s.http(HEALTHZ, "/healthz");
                assert_eq!(code, 200, "/healthz while flapping: {body}");
                if written.is_none() {
                    assert_eq!(s.rules(), table, "the table changed with nothing to change");
                } else if arrived.is_none() && programmed(&s, &["pod-d"]) {
                    arrived = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        flaps += 1;
        if written.is_none() && started.elapsed() >= Duration::from_secs(seconds / 2) {
            s.apply_slice(&["pod-d"]);
            written = Some(Instant::now());
        }
    }
    let after_end = until_programmed(&s, &["pod-d"], Duration::from_secs(45));
    let written = written.expect("a change was written");
    let took = arrived.unwrap_or_else(Instant::now) - written;
    let counted = source_errors(&s) - errors;
    eprintln!(
        "flapping API server: {flaps} outages in {:?}; {counted} watch errors counted; a change written during the flaps was programmed {took:?} later ({after_end:?} after they ended)",
        started.elapsed()
    );
    assert!(counted >= 2.0, "watch errors not counted: {counted}");
    s.expect_backends(&["pod-d"]);
    let ok = no_connection_failed(client, "flapping API server");
    eprintln!("flapping API server: {ok} connections, none failed");
}
