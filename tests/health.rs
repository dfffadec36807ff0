//! /healthz, /livez, /metrics, /proxyMode and /configz as an operator's
//! probes and Prometheus see them.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (status code, body) of GET `path`.
async fn get(port: u16, path: &str) -> (u16, String) {
    try_get(port, path).await.unwrap()
}

/// GET `path`, or why not (nothing listening yet, for one).
async fn try_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    conn.read_to_string(&mut out).await?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

async fn eventually_status(port: u16, path: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Ok((code, body))) =
            tokio::time::timeout(Duration::from_secs(1), try_get(port, path)).await
            && code == want
        {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never answered {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let backend = tcp_backend("b").await;
    let slice = slices("web", "TCP", &[backend]).replace(
        "labels: {kubernetes.io/service-name: web}",
        "labels: {kubernetes.io/service-name: web}\n  annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-01-01T00:00:00Z'}",
    );
    write(
        dir.path(),
        "web.yaml",
        &(service("web", "10.96.0.1", "TCP", "") + &slice),
    );
    let (hz, mp) = (free_port(), free_port());
    let (hz_addr, mp_addr) = (format!("127.0.0.1:{hz}"), format!("127.0.0.1:{mp}"));
    let mapping = start_proxy(
        dir.path(),
        &[
            "--healthz-bind-address",
            &hz_addr,
            "--metrics-bind-address",
            &mp_addr,
            "--sync-period",
            "300ms",
            "--min-sync-period",
            "50ms",
        ],
    )
    .await;
    listener(&mapping, "web").await;

    let body = eventually_status(hz, "/healthz", 200).await;
    assert!(
        body.contains("\"lastUpdated\"") && body.contains("\"nodeEligible\": true"),
        "{body}"
    );
    assert_eq!(get(hz, "/livez").await.0, 200);
    assert_eq!(get(mp, "/proxyMode").await, (200, "userspace".to_string()));
    assert!(
        get(mp, "/configz")
            .await
            .1
            .contains("\"mode\":\"userspace\"")
    );
    let metrics = get(mp, "/metrics").await.1;
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kwp_plugin_calls_total{plugin=\"round-robin\"}",
        "kwp_plugin_reloads_total 0",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }

    // A Service that cannot be programmed (userspace mode has no SCTP) is
    // an error of its own, named and counted; health follows whether the
    // proxy syncs, not whether every object is valid (upstream semantics).
    write(
        dir.path(),
        "sctp.yaml",
        &(service("sig", "10.96.0.2", "SCTP", "") + &slices("sig", "SCTP", &[backend])),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(mp, "/metrics")
        .await
        .1
        .lines()
        .filter_map(|l| l.strip_prefix("kwp_sync_service_errors_total "))
        .any(|v| v.trim().parse::<f64>().is_ok_and(|v| v > 0.0))
    {
        assert!(
            Instant::now() < deadline,
            "the SCTP Service's error was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await; // > 2 x syncPeriod
    assert_eq!(get(hz, "/healthz").await.0, 200);
    assert_eq!(get(hz, "/livez").await.0, 200);
    std::fs::remove_file(dir.path().join("sctp.yaml")).unwrap();

    // A Node being deleted: /healthz says so, /livez does not care.
    write(
        dir.path(),
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: e2e-node, deletionTimestamp: '2026-01-01T00:00:00Z'}\n",
    );
    let body = eventually_status(hz, "/healthz", 503).await;
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    assert_eq!(get(hz, "/livez").await.0, 200);
    let metrics = get(mp, "/metrics").await.1;
    assert!(
        metrics.contains("kubeproxy_proxy_healthz_total{code=\"503\"}"),
        "{metrics}"
    );
}

/// The servers as upstream keeps them: a port still held by someone else
/// (an old proxy, fds exhausted for a moment) is bound as soon as it is
/// free, upstream retrying every 5 s, instead of never.
#[tokio::test(flavor = "current_thread")]
async fn servers_bind_their_port_once_it_is_free() {
    let taken = || std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let (hz_taken, hc_taken) = (taken(), taken());
    let (hz, hc) = (
        hz_taken.local_addr().unwrap().port(),
        hc_taken.local_addr().unwrap().port(),
    );
    let metrics = std::sync::Arc::new(kwp::metrics::Metrics::new(
        "userspace",
        Duration::from_secs(30),
        "{}".into(),
    ));
    let healthz = tokio::spawn(kwp::metrics::serve(
        ([127, 0, 0, 1], hz).into(),
        metrics,
        true,
    ));
    let mut health_checks = kwp::healthcheck::HealthServers::default();
    health_checks.sync(&std::collections::BTreeMap::from([(
        kwp::model::ObjectKey::new("e2e", "web"),
        (hc, 2),
    )]));
    // One turn of this single-threaded runtime: both servers try to bind
    // their taken port now.
    tokio::task::yield_now().await;

    drop((hz_taken, hc_taken));
    let freed = Instant::now();
    eventually_status(hz, "/healthz", 200).await;
    let body = eventually_status(hc, "/", 200).await;
    assert!(
        freed.elapsed() < Duration::from_secs(7),
        "up {:?} after the ports were freed; the retry is every 5 s",
        freed.elapsed()
    );
    assert_eq!(
        body,
        r#"{"service":{"namespace":"e2e","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
    );
    assert!(!healthz.is_finished());

    // Upstream's headers, and 503 once no endpoint is local.
    let answer = exchange(hc, b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n").await;
    for header in [
        "Content-Type: application/json\r\n",
        "X-Content-Type-Options: nosniff\r\n",
        "X-Load-Balancing-Endpoint-Weight: 2\r\n",
    ] {
        assert!(answer.contains(header), "no {header:?} in {answer}");
    }
    health_checks.sync(&std::collections::BTreeMap::from([(
        kwp::model::ObjectKey::new("e2e", "web"),
        (hc, 0),
    )]));
    let answer = exchange(hc, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 503")
            && answer.contains("X-Load-Balancing-Endpoint-Weight: 0\r\n")
            && answer.contains(r#""localEndpoints":0"#),
        "{answer}"
    );
}

/// A transient fd exhaustion (RLIMIT_NOFILE lowered to 0 on the running
/// proxy) makes accept fail; the health server logs it and goes on, and
/// answers the waiting probe once fds are back.
#[test]
fn fd_exhaustion_does_not_stop_the_health_server() {
    let dir = tempfile::tempdir().unwrap();
    let hz = free_port();
    let hz_addr = format!("127.0.0.1:{hz}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"))
        .args(["--proxy-mode", "userspace", "--no-redirect", "--source"])
        .arg(format!("file:{}", dir.path().display()))
        .args([
            "--hostname-override",
            "e2e-node",
            "--metrics-bind-address",
            "",
        ])
        .args(["--healthz-bind-address", &hz_addr])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = Logs::capture(&mut child);
    let proxy = KillOnDrop(child);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(eventually_status(hz, "/healthz", 200));

    let pid = proxy.0.id() as libc::pid_t;
    let mut normal = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let no_fds = libc::rlimit {
        rlim_cur: 0,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls on valid pointers.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut normal) },
        0
    );
    let exhausted = libc::rlimit {
        rlim_max: normal.rlim_max,
        ..no_fds
    };
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &exhausted, std::ptr::null_mut()) },
        0
    );
    // The kernel queues the probe; accepting it needs an fd and fails.
    let mut probe = std::net::TcpStream::connect(&hz_addr).unwrap();
    std::io::Write::write_all(&mut probe, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs
        .text()
        .lines()
        .any(|l| l.contains(&hz_addr) && l.contains("Too many open files"))
    {
        assert!(
            Instant::now() < deadline,
            "accept never failed:\n{}",
            logs.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &normal, std::ptr::null_mut()) },
        0
    );
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut probe, &mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        logs.text()
    );
    runtime.block_on(eventually_status(hz, "/livez", 200));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes sent as they are, then whatever answer comes before the server
/// closes (it may close, or reset, before reading them all).
async fn exchange(port: u16, request: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = conn.write_all(request).await;
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Clients that send nothing, send slowly or send too much get their own
/// answer (or none) and never hold up another probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_oversized_clients_do_not_hold_up_probes() {
    let hz = free_port();
    let metrics = std::sync::Arc::new(kwp::metrics::Metrics::new(
        "userspace",
        Duration::from_secs(30),
        "{}".into(),
    ));
    tokio::spawn(kwp::metrics::serve(
        ([127, 0, 0, 1], hz).into(),
        metrics,
        true,
    ));
    eventually_status(hz, "/healthz", 200).await;

    // Connections that never send a byte.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", hz))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    assert_eq!(get(hz, "/livez").await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));

    // A request head arriving in pieces is read whole.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", hz))
        .await
        .unwrap();
    for piece in ["GE", "T /liv", "ez HTTP/1.1\r\n", "Host: x\r\n", "\r\n"] {
        conn.write_all(piece.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"lastUpdated\""), "{answer}");

    // A head larger than any probe sends is refused, not buffered.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = exchange(hz, huge.as_bytes()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(get(hz, "/healthz").await.0, 200);

    // The silent connections are closed once the head timeout passes.
    for mut conn in silent {
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.read(&mut byte))
            .await
            .expect("a silent connection is closed within the head timeout");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
}
