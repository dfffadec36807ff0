//! A node on `--source kubernetes`: a real etcd and kube-apiserver, the
//! proxy in the node namespace of a namespace cluster (topology.rs)
//! reaching the API server through a fault relay (fault_relay.rs), with
//! nothing but the DaemonSet's ServiceAccount token (bound to
//! deploy/rbac.yaml) read from a file as a pod reads it. Used by
//! tests/kubernetes.rs, tests/api_faults.rs and tests/soak.rs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

use super::Logs;
use super::apiserver::{Apply, Client, ControlPlane, repo_root, yaml_documents};
use super::fault_relay::{Fault, FaultRelay};
use super::netns::Netns;
use super::topology::{Cluster, NODE_IP, Outcome, tcp_from};

const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "kube-wasm-proxy";
pub const CLUSTER_IP: &str = "10.96.0.50";
pub const NODE_PORT: u16 = 30080;
pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";

/// A control plane, a namespace cluster and the proxy between them.
pub struct Setup {
    pub cp: ControlPlane,
    pub admin: Client,
    pub cluster: Cluster,
    pub proxy: Child,
    pub logs: Logs,
    mode: &'static str,
    /// The node's path to the API server, which can inject faults.
    pub relay: FaultRelay,
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
    pub fn start(tag: &str, mode: &'static str, rbac: &[String]) -> Self {
        Self::start_with(tag, mode, rbac, &[])
    }

    /// Like `start`, with more kube-apiserver flags.
    pub fn start_with(
        tag: &str,
        mode: &'static str,
        rbac: &[String],
        apiserver_flags: &[&str],
    ) -> Self {
        Self::launch(tag, mode, rbac, apiserver_flags, &[], Fault::None)
    }

    /// Like `start`, with the proxy's environment `env` (`NAME=value`) and
    /// the relay already injecting `fault` when the proxy starts.
    pub fn start_faulty(
        tag: &str,
        mode: &'static str,
        rbac: &[String],
        env: &[&str],
        fault: Fault,
    ) -> Self {
        Self::launch(tag, mode, rbac, &[], env, fault)
    }

    fn launch(
        tag: &str,
        mode: &'static str,
        rbac: &[String],
        apiserver_flags: &[&str],
        env: &[&str],
        fault: Fault,
    ) -> Self {
        let cluster = Cluster::new(tag);
        let cp = ControlPlane::start_with(apiserver_flags);
        let relay = FaultRelay::start(&cluster.node, cp.port(), &cp.dir);
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
        relay.set(fault);
        let mut args: Vec<&str> = env.to_vec();
        args.extend([
            env!("CARGO_BIN_EXE_kube-wasm-proxy"),
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
        ]);
        let mut proxy = cluster.node.spawn("env", &args);
        let logs = Logs::capture(&mut proxy);
        Setup {
            cp,
            admin,
            cluster,
            proxy,
            logs,
            mode,
            relay,
            _dir: dir,
        }
    }

    /// The proxy's nftables table as text ("" while there is none).
    pub fn rules(&self) -> String {
        let table = match self.mode {
            "userspace" => "kube-wasm-proxy-userspace",
            _ => "kube-wasm-proxy",
        };
        self.cluster
            .node
            .sh(&format!("nft list table ip {table} 2>/dev/null || true"))
    }

    /// (status, body) of an HTTP GET inside the node namespace.
    pub fn http(&self, addr: &str, path: &str) -> (u16, String) {
        let out = self.cluster.node.sh(&format!(
            "curl -s --max-time 3 -w '\\n%{{http_code}}' http://{addr}{path} || true"
        ));
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http(METRICS, "/metrics");
        metric(&text, name)
    }

    pub fn pod(&self, name: &str) -> &Netns {
        &self.cluster.pod(name).ns
    }

    /// Applies the Service `web` at CLUSTER_IP (ClusterIP + NodePort, TCP
    /// port 80 and, with `udp`, port 53/UDP; both to 8080).
    pub fn apply_service(&self, udp: bool) {
        self.apply_service_named("web", CLUSTER_IP, Some(NODE_PORT), udp);
    }

    pub fn apply_service_named(&self, name: &str, ip: &str, node_port: Option<u16>, udp: bool) {
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
    pub fn apply_slice(&self, pods: &[&str]) {
        self.apply_slice_of("web", pods);
    }

    pub fn apply_slice_of(&self, service: &str, pods: &[&str]) {
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
    pub fn expect_backends(&self, pods: &[&str]) {
        let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
        let cluster_ip = addr(CLUSTER_IP, 80);
        let node_port = addr(NODE_IP, NODE_PORT);
        eventually(&format!("{cluster_ip} answered by {want:?}"), 30, || {
            answered_by(40, || tcp_from(self.pod("pod-b"), cluster_ip)) == want
                && answered_by(40, || tcp_from(&self.cluster.client, node_port)) == want
        });
    }
}

/// Node `node-1` with InternalIP NODE_IP, as the proxy's node.
pub fn create_node(admin: &Client) {
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

pub fn rbac() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    yaml_documents(&text)
}

pub fn now() -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", jiff::Timestamp::now()).unwrap()
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Who answered `n` attempts; a failed attempt counts as "<failure>".
pub fn answered_by(n: usize, f: impl Fn() -> Outcome) -> BTreeSet<String> {
    (0..n)
        .map(|_| match f() {
            Outcome::Answered(pod, _) => pod,
            other => format!("{other:?}"),
        })
        .collect()
}

pub fn eventually(what: &str, seconds: u64, check: impl FnMut() -> bool) {
    super::poll::eventually_within(what, Duration::from_secs(seconds), check)
}

/// The value of one sample (`name` with its labels, if any) in Prometheus
/// text; 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
