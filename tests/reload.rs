//! Hot reload in userspace mode under a continuous client: a replaced
//! policy file is swapped in with no failed connection, a broken one is
//! rejected, one that fails only under real traffic is rolled back and
//! quarantined.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn bundled(name: &str) -> Vec<u8> {
    kwp_plugins_bundle::bundled()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.to_vec())
        .expect("bundled plugin")
}

/// Replaces `dir/name.wasm` atomically, as an operator's `mv` would.
fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_under_traffic_with_rejection_and_rollback() {
    let state = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    install(plugins.path(), "round-robin", &bundled("round-robin"));
    let backends = [
        tcp_backend("r1").await,
        tcp_backend("r2").await,
        tcp_backend("r3").await,
    ];
    write(
        state.path(),
        "web.yaml",
        &(service("web", "10.96.0.1", "TCP", "") + &slices("web", "TCP", &backends)),
    );
    // The continuous client uses its own Service (same policy instance, its
    // own round-robin position), so `order` below sees clean sequences.
    write(
        state.path(),
        "bg.yaml",
        &(service("bg", "10.96.0.2", "TCP", "") + &slices("bg", "TCP", &backends)),
    );
    let plugin_dir = plugins.path().display().to_string();
    let (mapping, runtime) =
        start_proxy_with_runtime(state.path(), &["--plugin-dir", &plugin_dir]).await;
    let addr = listener(&mapping, "web").await;
    let bg = listener(&mapping, "bg").await;

    // A client that never stops, counting every failed request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match ask(bg).await {
                    Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                    None => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let order = |n: usize| async move {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(ask(addr).await.expect("request"));
        }
        v
    };
    let strictly_cycles = |v: &[String]| {
        v.windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2])
    };
    assert!(
        strictly_cycles(&order(12).await),
        "round-robin to start with"
    );

    // 1. A new version (here: the random policy under the same name) swaps in.
    let reloads = || runtime.reloads.reloads.load(Ordering::Relaxed);
    install(plugins.path(), "round-robin", &bundled("random"));
    wait_for("the reload", || reloads() == 1).await;
    assert!(
        !strictly_cycles(&order(40).await),
        "the new version picks now"
    );

    // 2. A version that hangs in the probe is rejected; the current one stays.
    let rejections = || runtime.reloads.rejections.load(Ordering::Relaxed);
    install(
        plugins.path(),
        "round-robin",
        kwp_test_programs_artifacts::program("pick_loops"),
    );
    wait_for("the rejection", || rejections() == 1).await;
    assert_eq!(reloads(), 1);

    // 3. A version that passes the probe but fails on real traffic is rolled
    // back after its probation failures and quarantined.
    let sneaky = kwp_test_programs_artifacts::program("traps_after_probe");
    install(plugins.path(), "round-robin", sneaky);
    wait_for("the second reload", || reloads() == 2).await;
    let rollbacks = || runtime.reloads.rollbacks.load(Ordering::Relaxed);
    wait_for("the rollback", || rollbacks() == 1).await;
    let mut seen = BTreeMap::new();
    for who in order(30).await {
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "the previous version spreads again: {seen:?}"
    );
    install(
        plugins.path(),
        "round-robin",
        &[sneaky, b"".as_slice()].concat(),
    );
    wait_for("the quarantine to refuse it", || rejections() == 2).await;
    assert_eq!(reloads(), 2);

    // SIGHUP re-reads every plugin file, changed or not (here: refused again).
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    wait_for("SIGHUP to re-read the file", || rejections() == 3).await;

    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} requests succeeded",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
}
