//! `nft` gone from the proxy's PATH while it runs (issue 14, part 3): a
//! package removed, an image without it. Changes that need `nft` fail with
//! an error that says what is missing, are retried with bounded backoff,
//! leave no partial state (a Service that could not be written is absent,
//! never half there), and are counted; the rules in force stay, a client
//! keeps connecting. `/healthz` turns 503 once a queued change has waited
//! longer than 2 x syncPeriod, as upstream's does, and 200 again once `nft`
//! is back and the change is programmed. The same for `iptables-restore`
//! in iptables mode, and for `nft` missing from the start: the proxy
//! starts, says what is missing, serves health by the same rule and
//! programs everything once `nft` appears.

use crate::common;

use std::time::{Duration, Instant};

use common::faulty_nft::{
    all_captured, converges, hide, hide_nft, metric, path_with_removable_nft, services_n, show,
    show_nft, start_mode_with_path, start_with_path,
};
use common::node_proxy::{Proxy, addr, http_get};
use common::topology::{Cluster, ContinuousClient, NODE_IP};
use common::write;

const HEALTHZ: &str = "127.0.0.1:10256";

fn healthz(c: &Cluster) -> u16 {
    http_get(&c.node, HEALTHZ.parse().unwrap(), "/healthz").0
}

fn yaml(c: &Cluster, round: usize, n: usize) -> String {
    services_n(c, round, n).iter().map(|s| s.yaml()).collect()
}

/// The 12 s after a change was queued that the missing `tool` cannot
/// apply: `/healthz` 200 while the change is young, 503 past 2 x
/// syncPeriod (4 s) and from then on; `still` holds at every look. Then
/// the error names the tool, failed syncs are counted and retried with
/// bounded backoff. Returns when /healthz turned.
fn waits_unhealthy(
    c: &Cluster,
    p: &Proxy,
    tool: &str,
    counters: (f64, f64),
    still: impl Fn(),
) -> Duration {
    let queued = Instant::now();
    let mut turned = None;
    while queued.elapsed() < Duration::from_secs(12) {
        let code = healthz(c);
        if code == 503 && turned.is_none() {
            turned = Some(queued.elapsed());
        }
        if turned.is_some() {
            assert_eq!(code, 503, "/healthz back to 200 with {tool} still missing");
        }
        still();
        std::thread::sleep(Duration::from_millis(250));
    }
    let turned = turned.unwrap_or_else(|| {
        panic!(
            "/healthz stayed 200 for 12 s with a change queued that cannot be applied:\n{}",
            p.logs.text()
        )
    });
    assert!(
        turned >= Duration::from_secs(3),
        "503 after {turned:?}: before 2 x syncPeriod"
    );
    let logs = p.logs.text();
    assert!(
        logs.contains(&format!("(is the {tool} package installed?)")),
        "the error does not say {tool} is missing:\n{logs}"
    );
    let counted = metric(c, "kwp_sync_proxy_rules_errors_total") - counters.0;
    let retried = metric(c, "kwp_sync_proxy_rules_retries_total") - counters.1;
    eprintln!(
        "{tool} missing for 12 s: /healthz 503 after {turned:?}; {counted} failed syncs counted, {retried} retries"
    );
    assert!(counted >= 1.0, "no failed sync counted");
    // Backoff: 1 s doubling up to syncPeriod (2 s), so at most ~7 in 12 s.
    assert!(
        (1.0..=8.0).contains(&retried),
        "{retried} retries in 12 s: unbounded, or none"
    );
    turned
}

fn counters(c: &Cluster) -> (f64, f64) {
    (
        metric(c, "kwp_sync_proxy_rules_errors_total"),
        metric(c, "kwp_sync_proxy_rules_retries_total"),
    )
}

#[test]
fn nft_missing_keeps_the_rules_in_force_and_turns_healthz_503_when_changes_wait() {
    let c = Cluster::new("nftgone");
    let bin = tempfile::tempdir().unwrap();
    let path = path_with_removable_nft(bin.path());
    let p = start_with_path(&c, &path, &yaml(&c, 0, 5));
    converges(&c, &services_n(&c, 0, 5), Duration::from_secs(30));
    assert_eq!(healthz(&c), 200);
    let client =
        ContinuousClient::start_every(&c.client, addr(NODE_IP, 30200), Duration::from_millis(2));
    let table = c.node.sh("nft list table ip kube-wasm-proxy");
    let before = counters(&c);

    hide_nft(bin.path());
    // Two new Services (new chains: only `nft` writes those) and new
    // endpoints for the others, in one batch.
    write(&p.dir, "objects.yaml", &yaml(&c, 1, 7));
    waits_unhealthy(&c, &p, "nftables", before, || {
        // The old table stays whole: every earlier frontend still
        // captured, nothing of the new Services written.
        all_captured(&c, &services_n(&c, 0, 5));
        let now = c.node.sh("nft list table ip kube-wasm-proxy");
        assert!(
            !now.contains("10.96.30.6") && !now.contains("10.96.30.7"),
            "a Service half-written without nft:\n{now}"
        );
    });
    assert_eq!(
        c.node.sh("nft list table ip kube-wasm-proxy"),
        table,
        "the table changed"
    );

    show_nft(bin.path());
    let back = Instant::now();
    converges(&c, &services_n(&c, 1, 7), Duration::from_secs(30));
    eprintln!("nft back: programmed {:?} later", back.elapsed());
    common::poll::eventually("/healthz 200 again", || healthz(&c) == 200);
    let (ok, failed) = client.stop();
    eprintln!("nft missing: {ok} connections, {} failed", failed.len());
    assert!(ok > 100, "the client barely ran: {ok}");
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
}

/// Every `*-restore` an iptables backend may use: hiding them all is
/// iptables mode with its restore tool missing (`iptables-save` stays).
const RESTORES: &[&str] = &[
    "iptables-restore",
    "ip6tables-restore",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
];

/// kwp's lines of the nat table.
fn kwp_nat(c: &Cluster) -> String {
    c.node
        .sh("iptables-save -t nat")
        .lines()
        .filter(|l| l.contains("KWP-"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn nat_has(c: &Cluster, n: usize) -> bool {
    let nat = kwp_nat(c);
    (1..=n).all(|i| nat.contains(&format!("-d 10.96.30.{i}/32")))
}

#[test]
fn iptables_restore_missing_keeps_the_rules_and_turns_healthz_503_when_changes_wait() {
    let c = Cluster::new("iptgone");
    let bin = tempfile::tempdir().unwrap();
    let path = path_with_removable_nft(bin.path());
    let p = start_mode_with_path(&c, "iptables", &path, &yaml(&c, 0, 5));
    common::poll::eventually("five Services in the nat table", || nat_has(&c, 5));
    common::poll::eventually("/healthz 200", || healthz(&c) == 200);
    let client =
        ContinuousClient::start_every(&c.client, addr(NODE_IP, 30200), Duration::from_millis(2));
    let table = kwp_nat(&c);
    let before = counters(&c);

    hide(bin.path(), RESTORES);
    write(&p.dir, "objects.yaml", &yaml(&c, 1, 7));
    waits_unhealthy(&c, &p, "iptables", before, || {
        assert_eq!(
            kwp_nat(&c),
            table,
            "the nat table changed without iptables-restore"
        );
    });

    show(bin.path(), RESTORES);
    let back = Instant::now();
    common::poll::eventually("seven Services in the nat table", || nat_has(&c, 7));
    eprintln!(
        "iptables-restore back: programmed {:?} later",
        back.elapsed()
    );
    common::poll::eventually("/healthz 200 again", || healthz(&c) == 200);
    let (ok, failed) = client.stop();
    eprintln!(
        "iptables-restore missing: {ok} connections, {} failed",
        failed.len()
    );
    assert!(ok > 100, "the client barely ran: {ok}");
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
}

/// `nft` not installed when the proxy starts (an image without it, a
/// package installed later): the proxy starts and stays up, says what is
/// missing, programs nothing half, turns `/healthz` 503 once the first
/// objects have waited past 2 x syncPeriod (upstream's rule), and
/// programs everything once `nft` appears, without a restart.
#[test]
fn nft_missing_at_start_is_reported_and_everything_is_programmed_once_it_appears() {
    let c = Cluster::new("nftlate");
    let bin = tempfile::tempdir().unwrap();
    let path = path_with_removable_nft(bin.path());
    hide_nft(bin.path());
    let mut p = start_with_path(&c, &path, &yaml(&c, 0, 5));
    let started = Instant::now();
    let mut turned = None;
    while started.elapsed() < Duration::from_secs(8) {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "the proxy exited ({status}) without nft:\n{}",
                p.logs.text()
            );
        }
        let code = healthz(&c);
        if code == 503 && turned.is_none() {
            turned = Some(started.elapsed());
        }
        assert!(
            c.node
                .sh("nft list table ip kube-wasm-proxy 2>/dev/null || true")
                .trim()
                .is_empty(),
            "a table was written without nft"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let logs = p.logs.text();
    assert!(
        logs.contains("nft is not installed (not on PATH)")
            && logs.contains("running nft (is the nftables package installed?)"),
        "the proxy does not say nft is missing:\n{logs}"
    );
    let turned = turned.unwrap_or_else(|| panic!("/healthz never turned 503 without nft:\n{logs}"));
    eprintln!("nft missing at start: /healthz 503 after {turned:?} (syncPeriod 2 s)");

    show_nft(bin.path());
    let back = Instant::now();
    converges(&c, &services_n(&c, 0, 5), Duration::from_secs(30));
    eprintln!(
        "nft appeared: everything programmed {:?} later",
        back.elapsed()
    );
    common::poll::eventually("/healthz 200", || healthz(&c) == 200);
    assert!(p.child.try_wait().unwrap().is_none(), "the proxy exited");
}
