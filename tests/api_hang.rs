//! A hung API server (issue 14, part 3): one that accepts connections and
//! never answers, and one whose answers stall after their headers (a watch
//! that goes silent; a list that sends its head and nothing more). The
//! proxy runs `--source kubernetes` in nftables mode against the real
//! kube-apiserver through the fault relay (common/fault_relay.rs), whose
//! stalled connections stay stalled for good: only the proxy's own client
//! timeouts can free them. Throughout, the rules in force stay and a client
//! connecting through the cluster IP sees no failure; after recovery the
//! watch is re-established and the catch-up is measured.
//!
//! The proxy's read timeout is set to 10 s here (`KWP_API_READ_TIMEOUT`;
//! the default is 2 minutes, source/kubernetes.rs) so that the tests take
//! a minute, not ten.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::api_faults::{
    holds, no_connection_failed, programmed, source_errors, started_with, until_programmed,
};
use common::fault_relay::Fault;
use common::kube_node::{Setup, rbac};

const READ_TIMEOUT: &str = "KWP_API_READ_TIMEOUT=10s";

/// The API server hung (connections accepted, never a byte; live watches
/// silent), then stalling every answer after its headers: 20 s each with
/// a change written in the middle. Nothing moves during the fault; the
/// change is programmed after it, within the read timeout plus the watch's
/// backoff (without a read timeout kube-rs notices a silent watch only
/// after 295 s).
#[test]
fn a_hung_api_server_keeps_the_rules_and_the_watch_comes_back() {
    let (s, client) = started_with("apihang", &[READ_TIMEOUT]);
    let mut report = Vec::new();
    for (fault, pod) in [(Fault::Hang, "pod-d"), (Fault::StallAfterHeaders, "pod-a")] {
        let table = s.rules();
        let errors = source_errors(&s);
        let stalled = s.relay.counts.stalled.load(Ordering::Relaxed);
        s.relay.set(fault.clone());
        holds(&s, Duration::from_secs(8), Some(&table));
        s.apply_slice(&[pod]);
        holds(&s, Duration::from_secs(12), Some(&table));
        let stalled = s.relay.counts.stalled.load(Ordering::Relaxed) - stalled;
        let counted = source_errors(&s) - errors;
        assert!(stalled >= 1, "{fault:?}: no connection was stalled");
        s.relay.set(Fault::None);
        let took = until_programmed(&s, &[pod], Duration::from_secs(60));
        eprintln!(
            "{fault:?} for 20 s: {stalled} connections stalled, {counted} watch errors counted during it; caught up {took:?} after recovery"
        );
        report.push((fault, stalled, counted, took));
        holds(&s, Duration::from_millis(500), None);
    }
    s.expect_backends(&["pod-a"]);
    let ok = no_connection_failed(client, "hung API server");
    eprintln!("hung API server: {ok} connections, none failed; {report:?}");
}

/// The proxy starting while every answer stalls after its headers: its
/// first list gets a response head and never a body. Once the API server
/// answers again, the Service is programmed: the stalled list is abandoned
/// at the read timeout and retried (without one it waits for ever: kube-rs
/// sets no read timeout, and its watch idle timeout does not cover a list).
#[test]
fn a_list_that_stalls_after_its_headers_is_abandoned_and_retried() {
    let s = Setup::start_faulty(
        "apistall",
        "nftables",
        &rbac(),
        &[READ_TIMEOUT],
        Fault::StallAfterHeaders,
    );
    s.apply_service(false);
    s.apply_slice(&["pod-a", "pod-c"]);
    std::thread::sleep(Duration::from_secs(15));
    let stalled = s.relay.counts.stalled.load(Ordering::Relaxed);
    assert!(stalled >= 1, "no request was stalled");
    assert!(
        !programmed(&s, &["pod-a", "pod-c"]),
        "programmed through a stalled relay?"
    );
    let (code, _) = s.http(common::kube_node::HEALTHZ, "/healthz");
    let errors = source_errors(&s);
    s.relay.set(Fault::None);
    let recovered = Instant::now();
    let took = until_programmed(&s, &["pod-a", "pod-c"], Duration::from_secs(60));
    eprintln!(
        "stalled lists at start for 15 s ({stalled} connections stalled, {errors} watch errors counted, /healthz {code}): programmed {took:?} after recovery"
    );
    assert!(recovered.elapsed() >= took);
    s.expect_backends(&["pod-a", "pod-c"]);
}
