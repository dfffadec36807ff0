//! Hot reload in userspace mode under a continuous client: a replaced
//! policy file is swapped in with no failed connection, a broken one is
//! rejected, one that fails only under real traffic is rolled back and
//! quarantined.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::plugins::{AskLoop, answers, bundled, install, strictly_cycles, wait_for};
use common::*;

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
    let client = AskLoop::start(bg);
    let order = |n: usize| answers(addr, n);
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

    let (ok, failed) = client.stop().await;
    assert_eq!(failed, 0, "{ok} requests succeeded");
    assert!(ok > 50);
}

/// The kubelet's atomic update of a mounted ConfigMap: the files in a new
/// `..<timestamp>` directory, a `..data_tmp` symlink to it renamed over
/// `..data`, the old directory removed; each key is a symlink
/// `<key> -> ..data/<key>`, made when the volume is first set up.
fn kubelet_configmap_update(dir: &Path, stamp: &str, files: &[(&str, &[u8])]) {
    use std::os::unix::fs::symlink;
    let versioned = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&versioned).unwrap();
    for (name, bytes) in files {
        std::fs::write(versioned.join(name), bytes).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(format!("..{stamp}"), dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_in_a_mounted_configmap_is_reloaded_when_the_kubelet_swaps_data() {
    let state = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    // `kubectl create configmap my-policy --from-file=my-policy.wasm`,
    // mounted as the plugin directory.
    kubelet_configmap_update(
        plugins.path(),
        "2026_12_05_08_00_00.000000001",
        &[("my-policy.wasm", &bundled("round-robin"))],
    );
    let backends = [
        tcp_backend("c1").await,
        tcp_backend("c2").await,
        tcp_backend("c3").await,
    ];
    write(
        state.path(),
        "web.yaml",
        &(service("web", "10.96.0.1", "TCP", "").replace(
            "  namespace: e2e\n",
            "  namespace: e2e\n  annotations: {kube-wasm-proxy.io/lb-policy: my-policy}\n",
        ) + &slices("web", "TCP", &backends)),
    );
    let plugin_dir = plugins.path().display().to_string();
    let (mapping, runtime) =
        start_proxy_with_runtime(state.path(), &["--plugin-dir", &plugin_dir]).await;
    let addr = listener(&mapping, "web").await;
    let order = |n: usize| answers(addr, n);
    assert!(
        strictly_cycles(&order(12).await),
        "my-policy is round-robin to start with"
    );

    // `kubectl create configmap my-policy --from-file=my-policy.wasm
    // --dry-run=client -o yaml | kubectl replace -f -` with a new version:
    // the kubelet swaps `..data`; the link `my-policy.wasm` stays as it was.
    let reloads = || runtime.reloads.reloads.load(Ordering::Relaxed);
    kubelet_configmap_update(
        plugins.path(),
        "2026_12_05_08_01_00.000000002",
        &[("my-policy.wasm", &bundled("random"))],
    );
    // At least one: a SIGHUP from the other test re-reads every file too.
    wait_for("the reload of my-policy", || reloads() >= 1).await;
    assert!(
        !strictly_cycles(&order(40).await),
        "the ConfigMap's new version picks now"
    );
}
