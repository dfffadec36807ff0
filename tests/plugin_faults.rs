//! Policy plugin files under fire (issue 14, part 3), in userspace mode
//! under a continuous client: a file swapped a hundred times a second
//! between a good and a corrupt build, and a file rewritten in place while
//! the proxy reads it. The last good version stays in force, no request
//! fails, and every refused version is counted.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::plugins::{AskLoop, answers, bundled, install, strictly_cycles};
use common::*;

/// Two Services on the policy `storm` from `plugins`, three backends
/// each: `web` to look at, `bg` for the continuous client (its own
/// round-robin position, so `web`'s answers stay clean sequences).
async fn node(
    state: &Path,
    plugins: &Path,
) -> (std::net::SocketAddr, AskLoop, Arc<kwp::plugin::Runtime>) {
    let backends = [
        tcp_backend("s1").await,
        tcp_backend("s2").await,
        tcp_backend("s3").await,
    ];
    for (name, ip) in [("web", "10.96.0.1"), ("bg", "10.96.0.2")] {
        let svc = service(name, ip, "TCP", "").replace(
            "  namespace: e2e\n",
            "  namespace: e2e\n  annotations: {kube-wasm-proxy.io/lb-policy: storm}\n",
        );
        write(
            state,
            &format!("{name}.yaml"),
            &(svc + &slices(name, "TCP", &backends)),
        );
    }
    let dir = plugins.display().to_string();
    let (mapping, runtime) = start_proxy_with_runtime(state, &["--plugin-dir", &dir]).await;
    let web = listener(&mapping, "web").await;
    let client = AskLoop::start(listener(&mapping, "bg").await);
    (web, client, runtime)
}

async fn no_request_failed(client: AskLoop, what: &str) {
    let (ok, failed) = client.stop().await;
    eprintln!("{what}: {ok} requests, {failed} failed");
    assert_eq!(failed, 0, "{what}: {ok} requests answered");
    assert!(ok > 100, "{what}: the client barely ran ({ok})");
}

/// Which build answers `web`: round-robin strictly cycles, pick-first
/// always names one backend, random does neither.
async fn in_force(web: std::net::SocketAddr) -> &'static str {
    let v = answers(web, 30).await;
    if strictly_cycles(&v) {
        "round-robin"
    } else if v.iter().all(|a| *a == v[0]) {
        "pick-first"
    } else {
        "random"
    }
}

/// Waits until the watcher (a poll every 500 ms, then a compile) has
/// nothing left to look at: the counters stand still for 2 s.
async fn settled(runtime: &kwp::plugin::Runtime) -> (u64, u64) {
    let counts = || {
        (
            runtime.reloads.reloads.load(Ordering::Relaxed),
            runtime.reloads.rejections.load(Ordering::Relaxed),
        )
    };
    let mut last = counts();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = counts();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swapped_a_hundred_times_a_second_with_a_corrupt_build_keeps_the_last_good() {
    let (state, plugins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    install(plugins.path(), "storm", &bundled("round-robin"));
    let (web, client, runtime) = node(state.path(), plugins.path()).await;
    assert_eq!(in_force(web).await, "round-robin");

    // 500 swaps, 100 a second, between pick-first and the same build cut
    // in half; the last one leaves the corrupt build in place.
    let good = kwp_test_programs_artifacts::program("pick_first");
    let corrupt = &good[..good.len() / 2];
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    for swap in 0..500 {
        tick.tick().await;
        let build = if swap % 2 == 0 { good } else { corrupt };
        install(plugins.path(), "storm", build);
    }
    let took = started.elapsed();
    let (reloads, rejections) = settled(&runtime).await;
    let now = in_force(web).await;
    eprintln!(
        "500 swaps in {took:?}: {reloads} reloads of the good build, {rejections} corrupt ones refused; in force: {now}"
    );
    assert!(rejections >= 1, "the corrupt build was never refused");
    // The last good version: pick-first if a swap to it landed, else the
    // round-robin from before.
    let last_good = if reloads > 0 {
        "pick-first"
    } else {
        "round-robin"
    };
    assert_eq!(now, last_good);

    // A good build installed once is taken.
    install(plugins.path(), "storm", &bundled("random"));
    settled(&runtime).await;
    assert_eq!(in_force(web).await, "random");
    no_request_failed(client, "policy swap storm").await;
}

/// Rewrites `path` in place (truncate, then 4 KiB every 5 ms), as a copy
/// over the file or an editor without rename does: a reader in between
/// sees a prefix.
async fn rewrite_slowly(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    for chunk in bytes.chunks(4096) {
        f.write_all(chunk).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_rewritten_while_read_is_never_taken_half_written() {
    let (state, plugins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    install(plugins.path(), "storm", &bundled("round-robin"));
    let (web, client, runtime) = node(state.path(), plugins.path()).await;
    assert_eq!(in_force(web).await, "round-robin");
    let file = plugins.path().join("storm.wasm");
    let pick_first = kwp_test_programs_artifacts::program("pick_first");
    let random = bundled("random");

    // Ten rewrites, the last leaving `random` whole.
    for i in 0..10 {
        let bytes = if i % 2 == 0 { pick_first } else { &random[..] };
        rewrite_slowly(&file, bytes).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (reloads, rejections) = settled(&runtime).await;
    let now = in_force(web).await;
    eprintln!(
        "10 in-place rewrites: {reloads} reloads, {rejections} half-written reads refused; in force: {now}"
    );
    assert!(
        rejections >= 1,
        "no read ever saw a half-written file: the test proves nothing"
    );
    assert_eq!(
        now, "random",
        "the file's final, whole version is not in force"
    );
    no_request_failed(client, "in-place rewrites").await;
}
