//! /healthz, /livez, /metrics, /proxyMode and /configz as an operator's
//! probes and Prometheus see them.

mod common;

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
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

async fn eventually_status(port: u16, path: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((code, body)) =
            tokio::time::timeout(Duration::from_secs(1), get(port, path)).await
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
        .any(|l| l.starts_with("kwp_sync_service_errors_total ") && !l.ends_with(" 0"))
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
