//! `nft` gone from the proxy's PATH while it runs (issue 14, part 3): a
//! package removed, an image without it. Changes that need `nft` fail with
//! an error that says what is missing, are retried with bounded backoff,
//! leave no partial state (a Service that could not be written is absent,
//! never half there), and are counted; the rules in force stay, a client
//! keeps connecting. `/healthz` turns 503 once a queued change has waited
//! longer than 2 x syncPeriod, as upstream's does, and 200 again once `nft`
//! is back and the change is programmed.

use crate::common;

use std::time::{Duration, Instant};

use common::faulty_nft::{
    all_captured, converges, hide_nft, metric, path_with_removable_nft, services_n, show_nft,
    start_with_path,
};
use common::node_proxy::{addr, http_get};
use common::topology::{Cluster, ContinuousClient, NODE_IP};
use common::write;

const HEALTHZ: &str = "127.0.0.1:10256";

fn healthz(c: &Cluster) -> u16 {
    http_get(&c.node, HEALTHZ.parse().unwrap(), "/healthz").0
}

fn yaml(c: &Cluster, round: usize, n: usize) -> String {
    services_n(c, round, n).iter().map(|s| s.yaml()).collect()
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
    let (errors, retries) = (
        metric(&c, "kwp_sync_proxy_rules_errors_total"),
        metric(&c, "kwp_sync_proxy_rules_retries_total"),
    );

    hide_nft(bin.path());
    // Two new Services (new chains: only `nft` writes those) and new
    // endpoints for the others, in one batch.
    write(&p.dir, "objects.yaml", &yaml(&c, 1, 7));
    let queued = Instant::now();
    // /healthz: 200 while the change is young, 503 past 2 x syncPeriod (4 s).
    let mut turned = None;
    while queued.elapsed() < Duration::from_secs(12) {
        let code = healthz(&c);
        if code == 503 && turned.is_none() {
            turned = Some(queued.elapsed());
        }
        if turned.is_some() {
            assert_eq!(code, 503, "/healthz back to 200 with nft still missing");
        }
        // The old table stays whole: every earlier frontend still
        // captured, nothing of the new Services written.
        all_captured(&c, &services_n(&c, 0, 5));
        let now = c.node.sh("nft list table ip kube-wasm-proxy");
        assert!(
            !now.contains("10.96.30.6") && !now.contains("10.96.30.7"),
            "a Service half-written without nft:\n{now}"
        );
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
    assert_eq!(
        c.node.sh("nft list table ip kube-wasm-proxy"),
        table,
        "the table changed"
    );
    let logs = p.logs.text();
    assert!(
        logs.contains("running nft (is the nftables package installed?)"),
        "the error does not say nft is missing:\n{logs}"
    );
    let counted = metric(&c, "kwp_sync_proxy_rules_errors_total") - errors;
    let retried = metric(&c, "kwp_sync_proxy_rules_retries_total") - retries;
    eprintln!(
        "nft missing for 12 s: /healthz 503 after {turned:?}; {counted} failed syncs counted, {retried} retries"
    );
    assert!(counted >= 1.0, "no failed sync counted");
    // Backoff: 1 s doubling up to syncPeriod (2 s), so at most ~7 in 12 s.
    assert!(
        (1.0..=8.0).contains(&retried),
        "{retried} retries in 12 s: unbounded, or none"
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
