//! `--source kubernetes` end to end: a real etcd and kube-apiserver, the
//! proxy in the node namespace of the namespace cluster (common/topology.rs)
//! reaching the API server through a loopback relay, with nothing but the
//! DaemonSet's ServiceAccount token (bound to deploy/rbac.yaml) read from a
//! file as a pod reads it. Services and EndpointSlices are created, updated
//! and deleted through the API and checked as rules and as real packets, in
//! userspace and nftables mode; kube-apiserver is restarted under a
//! continuous client; /healthz, /livez and /metrics are read as a kubelet
//! and Prometheus would.

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use common::Logs;
use common::apiserver::{Apply, Client, ControlPlane, repo_root, yaml_documents};
use common::netns::{Forward, Netns};
use common::topology::{Cluster, ContinuousClient, NODE_IP, Outcome, tcp_from, udp_from};
use serde_json::{Value, json};

const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "kube-wasm-proxy";
const CLUSTER_IP: &str = "10.96.0.50";
const NODE_PORT: u16 = 30080;
const HEALTHZ: &str = "127.0.0.1:10256";
pub(crate) const METRICS: &str = "127.0.0.1:10249";

/// A control plane, a namespace cluster and the proxy between them.
pub(crate) struct Setup {
    pub(crate) cp: ControlPlane,
    pub(crate) admin: Client,
    pub(crate) cluster: Cluster,
    pub(crate) proxy: Child,
    pub(crate) logs: Logs,
    mode: &'static str,
    /// The node's path to the API server.
    forward: Forward,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }
}

impl Setup {
    /// Starts everything; the proxy runs as the DaemonSet's ServiceAccount
    /// with `rbac` (deploy/rbac.yaml's documents) applied.
    pub(crate) fn start(tag: &str, mode: &'static str, rbac: &[String]) -> Self {
        Self::start_with(tag, mode, rbac, &[])
    }

    /// Like `start`, with more kube-apiserver flags.
    fn start_with(
        tag: &str,
        mode: &'static str,
        rbac: &[String],
        apiserver_flags: &[&str],
    ) -> Self {
        let cluster = Cluster::new(tag);
        let cp = ControlPlane::start_with(apiserver_flags);
        let forward = cluster.node.forward_loopback(cp.port());
        let admin = cp.admin();
        for doc in rbac {
            admin.apply(doc, Apply::FOR_REAL).expect_ok("applying RBAC");
        }
        admin.ensure_namespace("e2e");
        create_node(&admin);

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(
            &token,
            admin.service_account_token(NAMESPACE, SERVICE_ACCOUNT),
        )
        .unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        cp.write_kubeconfig_token_file(&kubeconfig, &token);
        let mut proxy = cluster.node.spawn(
            env!("CARGO_BIN_EXE_kube-wasm-proxy"),
            &[
                "--proxy-mode",
                mode,
                "--source",
                "kubernetes",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--hostname-override",
                "node-1",
                "--cluster-cidr",
                "10.244.0.0/16",
                "--min-sync-period",
                "50ms",
                "--sync-period",
                "2s",
                "--healthz-bind-address",
                HEALTHZ,
                "--metrics-bind-address",
                METRICS,
            ],
        );
        let logs = Logs::capture(&mut proxy);
        Setup {
            cp,
            admin,
            cluster,
            proxy,
            logs,
            mode,
            forward,
            _dir: dir,
        }
    }

    /// The proxy's nftables table as text ("" while there is none).
    fn rules(&self) -> String {
        let table = match self.mode {
            "userspace" => "kube-wasm-proxy-userspace",
            _ => "kube-wasm-proxy",
        };
        self.cluster
            .node
            .sh(&format!("nft list table ip {table} 2>/dev/null || true"))
    }

    /// (status, body) of an HTTP GET inside the node namespace.
    pub(crate) fn http(&self, addr: &str, path: &str) -> (u16, String) {
        let out = self.cluster.node.sh(&format!(
            "curl -s --max-time 3 -w '\\n%{{http_code}}' http://{addr}{path} || true"
        ));
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http(METRICS, "/metrics");
        metric(&text, name)
    }

    fn pod(&self, name: &str) -> &Netns {
        &self.cluster.pod(name).ns
    }

    /// Applies the Service `web` at CLUSTER_IP (ClusterIP + NodePort, TCP
    /// port 80 and, with `udp`, port 53/UDP; both to 8080).
    fn apply_service(&self, udp: bool) {
        self.apply_service_named("web", CLUSTER_IP, Some(NODE_PORT), udp);
    }

    fn apply_service_named(&self, name: &str, ip: &str, node_port: Option<u16>, udp: bool) {
        let mut ports = vec![
            json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port}),
        ];
        if udp {
            ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8080}));
        }
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "e2e"},
            "spec": {"type": if node_port.is_some() { "NodePort" } else { "ClusterIP" }, "clusterIP": ip, "ports": ports},
        });
        self.admin
            .apply(&svc.to_string(), Apply::FOR_REAL)
            .expect_ok(&format!("applying Service e2e/{name}"));
    }

    /// Applies the EndpointSlice of `web` over `pods`, stamped with the
    /// trigger time the EndpointSlice controller would set.
    fn apply_slice(&self, pods: &[&str]) {
        self.apply_slice_of("web", pods);
    }

    fn apply_slice_of(&self, service: &str, pods: &[&str]) {
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|p| {
                let pod = self.cluster.pod(p);
                let node = if pod.local { "node-1" } else { "node-2" };
                json!({"addresses": [pod.ip], "conditions": {"ready": true}, "nodeName": node,
                       "targetRef": {"kind": "Pod", "namespace": "e2e", "name": pod.name}})
            })
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-1"), "namespace": "e2e",
                         "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "kwp-tests"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now()}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 8080, "protocol": "UDP"}],
            "endpoints": endpoints,
        });
        self.admin
            .apply(&slice.to_string(), Apply::FOR_REAL)
            .expect_ok(&format!("applying EndpointSlice e2e/{service}-1"));
    }

    /// Waits until TCP to the cluster IP (from pod-b) and to the node port
    /// (from outside) is answered by exactly `pods`.
    fn expect_backends(&self, pods: &[&str]) {
        let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
        let cluster_ip = addr(CLUSTER_IP, 80);
        let node_port = addr(NODE_IP, NODE_PORT);
        eventually(&format!("{cluster_ip} answered by {want:?}"), 30, || {
            answered_by(40, || tcp_from(self.pod("pod-b"), cluster_ip)) == want
                && answered_by(40, || tcp_from(&self.cluster.client, node_port)) == want
        });
    }
}

fn create_node(admin: &Client) {
    admin
        .post(
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
                    "spec": {"podCIDR": "10.244.1.0/24"}}),
        )
        .expect_ok("creating Node node-1");
    admin
        .merge_patch(
            "/api/v1/nodes/node-1/status",
            &json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}),
        )
        .expect_ok("setting Node node-1's addresses");
}

pub(crate) fn rbac() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    yaml_documents(&text)
}

fn now() -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", jiff::Timestamp::now()).unwrap()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Who answered `n` attempts; a failed attempt counts as "<failure>".
fn answered_by(n: usize, f: impl Fn() -> Outcome) -> BTreeSet<String> {
    (0..n)
        .map(|_| match f() {
            Outcome::Answered(pod, _) => pod,
            other => format!("{other:?}"),
        })
        .collect()
}

fn eventually(what: &str, seconds: u64, check: impl FnMut() -> bool) {
    common::poll::eventually_within(what, Duration::from_secs(seconds), check)
}

/// The value of one sample (`name` with its labels, if any) in Prometheus
/// text; 0 when absent.
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

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

    s.forward.cut();
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
    s.forward.restore();

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
