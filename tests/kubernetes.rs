//! `--source kubernetes` end to end: a real etcd and kube-apiserver, the
//! proxy in the node namespace of the namespace cluster (common/topology.rs)
//! reaching the API server through a relay (common/kube_node.rs), with nothing but the
//! DaemonSet's ServiceAccount token (bound to deploy/rbac.yaml) read from a
//! file as a pod reads it. Services and EndpointSlices are created, updated
//! and deleted through the API and checked as rules and as real packets, in
//! userspace and nftables mode; kube-apiserver is restarted under a
//! continuous client; /healthz, /livez and /metrics are read as a kubelet
//! and Prometheus would.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::apiserver::Apply;
use common::kube_node::{
    CLUSTER_IP, HEALTHZ, METRICS, NODE_PORT, Setup, addr, answered_by, eventually, metric, rbac,
};
use common::topology::{ContinuousClient, NODE_IP, Outcome, tcp_from, udp_from};
use serde_json::json;

/// Everything the issue names, in one life of the proxy: create, update
/// (endpoints, then ports), an API-server restart under traffic, a change
/// after it, deletion, health and metrics, and a Node being deleted.
fn follows_the_api_server(tag: &str, mode: &'static str) {
    let s = Setup::start(tag, mode, &rbac());

    // Started: an event on the Node, as upstream records it.
    eventually("the Starting event", 20, || {
        let events = s
            .admin
            .get("/apis/events.k8s.io/v1/namespaces/default/events")
            .expect_ok("listing events");
        events["items"].as_array().into_iter().flatten().any(|e| {
            e["reason"] == "Starting"
                && e["action"] == "StartKubeProxy"
                && e["regarding"]["kind"] == "Node"
                && e["regarding"]["name"] == "node-1"
        })
    });

    // Create.
    s.apply_service(false);
    s.apply_slice(&["pod-a", "pod-c"]);
    s.expect_backends(&["pod-a", "pod-c"]);
    assert!(s.rules().contains(CLUSTER_IP), "{}", s.rules());

    // Update the endpoints, then the Service's ports.
    s.apply_slice(&["pod-b", "pod-d"]);
    s.expect_backends(&["pod-b", "pod-d"]);
    s.apply_service(true);
    eventually(
        "the UDP port",
        20,
        || matches!(udp_from(s.pod("pod-a"), addr(CLUSTER_IP, 53)), Outcome::Answered(ref p, _) if p == "pod-b" || p == "pod-d"),
    );

    let (code, body) = s.http(HEALTHZ, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    assert_eq!(s.http(HEALTHZ, "/livez").0, 200);
    let errors_before = s.metric("kwp_source_errors_total");

    // kube-apiserver goes away and comes back while a client keeps
    // connecting: nothing fails, health holds (no change is pending).
    let mut s = s;
    let client = ContinuousClient::start(s.pod("pod-a"), addr(CLUSTER_IP, 80));
    std::thread::sleep(Duration::from_millis(500));
    s.cp.stop_apiserver();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        answered_by(10, || tcp_from(&s.cluster.client, addr(NODE_IP, NODE_PORT))),
        BTreeSet::from(["pod-b".to_string(), "pod-d".to_string()]),
        "rules in force while the API server is down"
    );
    let (code, body) = s.http(HEALTHZ, "/healthz");
    assert_eq!(code, 200, "healthz while the API server is down: {body}");
    s.cp.start_apiserver();
    // The next change after it returns is applied.
    s.apply_slice(&["pod-c"]);
    s.expect_backends(&["pod-c"]);
    let (ok, failed) = client.stop();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across the restart: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections");
    assert!(
        s.metric("kwp_source_errors_total") > errors_before,
        "watch errors during the outage were not counted"
    );

    // Delete: the rules go, and the cluster IP no longer reaches a pod.
    s.admin
        .delete("/apis/discovery.k8s.io/v1/namespaces/e2e/endpointslices/web-1")
        .expect_ok("deleting the EndpointSlice");
    s.admin
        .delete("/api/v1/namespaces/e2e/services/web")
        .expect_ok("deleting the Service");
    eventually("the Service's rules to go", 20, || {
        !s.rules().contains(CLUSTER_IP)
    });
    assert!(
        !matches!(
            tcp_from(s.pod("pod-b"), addr(CLUSTER_IP, 80)),
            Outcome::Answered(..)
        ),
        "a deleted Service still answers"
    );

    // Health and metrics, as upstream names them.
    let (code, body) = s.http(HEALTHZ, "/healthz");
    assert_eq!(code, 200, "{body}");
    for key in ["\"lastUpdated\"", "\"currentTime\""] {
        assert!(body.contains(key), "{key} missing in {body}");
    }
    assert_eq!(s.http(HEALTHZ, "/livez").0, 200);
    assert_eq!(s.http(METRICS, "/proxyMode"), (200, mode.to_string()));
    let (_, text) = s.http(METRICS, "/metrics");
    // web created, its ports changed, deleted; `kubernetes` listed.
    assert!(
        metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total") >= 4.0,
        "{text}"
    );
    // web-1 created, updated twice, deleted.
    assert!(
        metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 4.0,
        "{text}"
    );
    // The last change may still be in flight (min-sync-period): pending
    // drains to zero rather than being zero at any given instant.
    eventually("no endpoint change pending", 10, || {
        let (_, text) = s.http(METRICS, "/metrics");
        metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0.0
    });
    assert!(
        metric(
            &text,
            "kubeproxy_network_programming_duration_seconds_count"
        ) >= 3.0,
        "every stamped slice change is a latency sample: {text}"
    );
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 3.0);
    let last = metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let unix = jiff::Timestamp::now().as_second() as f64;
    assert!(
        (unix - 60.0..=unix + 1.0).contains(&last),
        "last sync at {last}, now {unix}"
    );
    assert!(metric(&text, "kubeproxy_proxy_healthz_total{code=\"200\"}") >= 3.0);
    assert!(metric(&text, "kubeproxy_proxy_livez_total{code=\"200\"}") >= 2.0);

    // The Node being deleted (a finalizer holds it): /healthz 503 so load
    // balancers drain the node, /livez still 200.
    s.admin
        .merge_patch(
            "/api/v1/nodes/node-1",
            &json!({"metadata": {"finalizers": ["kwp-tests/hold"]}}),
        )
        .expect_ok("adding a finalizer");
    s.admin
        .delete("/api/v1/nodes/node-1")
        .expect_ok("deleting the Node");
    eventually("/healthz 503 for a Node being deleted", 20, || {
        s.http(HEALTHZ, "/healthz").0 == 503
    });
    assert!(
        s.http(HEALTHZ, "/healthz")
            .1
            .contains("\"nodeEligible\": false")
    );
    assert_eq!(s.http(HEALTHZ, "/livez").0, 200);
    s.admin
        .merge_patch(
            "/api/v1/nodes/node-1",
            &json!({"metadata": {"finalizers": null}}),
        )
        .expect_ok("removing the finalizer");
    assert_eq!(
        s.metric("kwp_sync_proxy_rules_errors_total"),
        0.0,
        "a sync or resync failed:\n{}",
        s.logs.text()
    );
    // The proxy is still alive and well after all this.
    assert!(s.proxy.try_wait().unwrap().is_none(), "the proxy exited");
}

#[test]
fn userspace_mode_follows_the_api_server_through_a_restart() {
    follows_the_api_server("k8us", "userspace");
}

#[test]
fn nftables_mode_follows_the_api_server_through_a_restart() {
    follows_the_api_server("k8nf", "nftables");
}

/// No rules before Services and EndpointSlices have both been listed: with
/// a role that cannot list EndpointSlices the proxy writes nothing; once the
/// role is fixed, its backoff retries and the rules appear.
#[test]
fn no_rules_until_services_and_endpoint_slices_are_listed() {
    let docs = rbac();
    let crippled: Vec<String> = docs
        .iter()
        .map(|doc| without_endpoint_slices(doc))
        .collect();
    assert_ne!(crippled, docs, "rbac.yaml grants no EndpointSlice access?");
    let s = Setup::start("k8gate", "nftables", &crippled);
    s.apply_service(false);
    s.apply_slice(&["pod-a"]);
    eventually("a denied EndpointSlice watch to be counted", 30, || {
        s.metric("kwp_source_errors_total") > 0.0
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        s.rules(),
        "",
        "rules written before EndpointSlices were listed"
    );
    assert!(
        !matches!(
            tcp_from(s.pod("pod-b"), addr(CLUSTER_IP, 80)),
            Outcome::Answered(..)
        ),
        "traffic proxied before EndpointSlices were listed"
    );

    for doc in &docs {
        s.admin.apply(doc, Apply::FOR_REAL).expect_ok("fixing RBAC");
    }
    // kube-rs backs off up to ~30 s between attempts.
    eventually("rules once EndpointSlices can be listed", 90, || {
        s.rules().contains(CLUSTER_IP)
    });
    s.expect_backends(&["pod-a"]);
}

/// The ClusterRole of `doc` without its EndpointSlice rule (other documents
/// unchanged).
fn without_endpoint_slices(doc: &str) -> String {
    let mut v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap();
    if v["kind"] == "ClusterRole" {
        let rules = v["rules"].as_sequence_mut().unwrap();
        rules.retain(|r| {
            !r["resources"]
                .as_sequence()
                .is_some_and(|rs| rs.iter().any(|x| x == "endpointslices"))
        });
    }
    serde_yaml_ng::to_string(&v).unwrap()
}

/// A proxy cut off from the API server while a Service is deleted and
/// etcd's history is compacted gets 410 Gone when it watches again, relists,
/// and drops what vanished; the rest of its rules stay in force throughout.
#[test]
fn a_partitioned_proxy_relists_after_410_gone_and_drops_what_vanished() {
    let s = Setup::start_with("k8gone", "nftables", &rbac(), &["--watch-cache=false"]);
    s.apply_service(false);
    s.apply_slice(&["pod-a"]);
    s.apply_service_named("old", "10.96.0.51", None, false);
    s.apply_slice_of("old", &["pod-c"]);
    s.expect_backends(&["pod-a"]);
    eventually("the second Service", 20, || {
        s.rules().contains("10.96.0.51")
    });

    s.relay.cut();
    s.admin
        .delete("/apis/discovery.k8s.io/v1/namespaces/e2e/endpointslices/old-1")
        .expect_ok("deleting old-1");
    s.admin
        .delete("/api/v1/namespaces/e2e/services/old")
        .expect_ok("deleting old");
    s.apply_slice(&["pod-d"]);
    s.cp.compact_etcd();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        answered_by(10, || tcp_from(s.pod("pod-b"), addr(CLUSTER_IP, 80))),
        BTreeSet::from(["pod-a".to_string()]),
        "rules in force while cut off"
    );
    s.relay.restore();

    s.expect_backends(&["pod-d"]);
    eventually("the vanished Service's rules to go", 60, || {
        !s.rules().contains("10.96.0.51")
    });
    let logs = s.logs.text();
    assert!(
        logs.contains("410") || logs.contains("resourceVersion for the provided watch is too old"),
        "no 410 Gone seen; the relist was not exercised:\n{logs}"
    );
}

/// The initial lists stream over the watch (`sendInitialEvents`): the
/// proxy never asks the API server to LIST Services or EndpointSlices. With
/// the WatchList feature gate off, the API server refuses the parameter and
/// the proxy lists in pages instead, saying so once per watched kind. Either
/// way the Service is programmed. The proxy's requests are read from the API
/// server's audit log (its ServiceAccount only).
#[test]
fn initial_lists_stream_over_the_watch_and_fall_back_to_listing() {
    const FALLBACK: &str = "does not stream initial lists";
    for (tag, watch_list, streams) in [("k8strm", "true", true), ("k8list", "false", false)] {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_THE_PROXY).unwrap();
        let audit = dir.path().join("audit.log");
        let flags = [
            format!("--feature-gates=WatchList={watch_list}"),
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", audit.display()),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let s = Setup::start_with(tag, "nftables", &rbac(), &flags);
        s.apply_service(false);
        s.apply_slice(&["pod-a"]);
        s.expect_backends(&["pod-a"]);
        let requests = proxy_reads(&audit);
        let lists: Vec<&String> = requests.iter().filter(|r| r.starts_with("list ")).collect();
        let streamed = requests
            .iter()
            .filter(|r| r.starts_with("watch ") && r.contains("sendInitialEvents=true"))
            .count();
        let logs = s.logs.text();
        if streams {
            assert!(lists.is_empty(), "{tag}: listed {lists:#?}\n{logs}");
            assert_eq!(streamed, 3, "{tag}: streaming watches {requests:#?}");
            assert!(
                !logs.contains(FALLBACK),
                "{tag}: fell back to listing:\n{logs}"
            );
        } else {
            assert_eq!(
                lists.len(),
                3,
                "{tag}: one LIST per kind expected: {requests:#?}"
            );
            assert_eq!(
                logs.matches(FALLBACK).count(),
                3,
                "{tag}: one fallback per watched kind expected:\n{logs}"
            );
        }
    }
}

/// Every request of the proxy's ServiceAccount, logged when its response
/// starts (so that open watches are in the log too).
const AUDIT_THE_PROXY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\n\
omitStages: [RequestReceived]\nrules:\n\
- level: Metadata\n  users: [\"system:serviceaccount:kube-system:kube-wasm-proxy\"]\n\
- level: None\n";

/// The proxy's reads as `verb requestURI`, from the audit log.
fn proxy_reads(audit: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let mut seen = BTreeSet::new();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| matches!(e["verb"].as_str(), Some("list" | "watch")))
        .filter(|e| seen.insert(e["auditID"].as_str().unwrap_or_default().to_string()))
        .map(|e| {
            format!(
                "{} {}",
                e["verb"].as_str().unwrap_or_default(),
                e["requestURI"].as_str().unwrap_or_default()
            )
        })
        .collect()
}
