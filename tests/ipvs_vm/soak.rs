//! The churn soak (tests/soak.rs) in IPVS mode: the real kube-apiserver on
//! the host's loopback, kwp in IPVS mode in the VM's namespace cluster,
//! watching it through the VM's NIC (QEMU's 10.0.2.2 is the host's
//! loopback). In the guest the soak's own rounds run unchanged: the churn
//! through the API, the independent model (common/model/ipvs.rs over
//! `/proc/net/ip_vs`, the node's addresses and kwp's helper table) after
//! each round settles, and real TCP probes from the client namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::common;
use crate::soak::{Node, Totals, report, run};
use common::Logs;
use common::apiserver::{Apply, Client, ControlPlane, kubeconfig};
use common::kube_node::{HEALTHZ, METRICS, create_node, rbac};
use common::netns::forward_here;
use common::topology::Cluster;
use serde_json::json;

/// The suite's short soak: its name (the harness starts the host's API
/// server only when this case runs).
pub const SHORT: &str = "churn_soak_against_the_api_server_matches_the_model";

/// The host's side: a control plane the guest reaches, with the RBAC of
/// deploy/rbac.yaml, namespace `e2e`, Node `node-1` and a token of the
/// DaemonSet's ServiceAccount.
pub struct HostApi {
    cp: ControlPlane,
    /// The CA and the token, where the guest can have them (its /dev is
    /// a devtmpfs mounted over the initramfs's, so not /dev/shm).
    ca_file: PathBuf,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostApi {
    /// None (said why) when no control plane can start here: the soak
    /// case then fails in the guest, saying the API is missing.
    pub fn start() -> Option<Self> {
        let started = std::panic::catch_unwind(|| {
            let cp = ControlPlane::start();
            let admin = cp.admin();
            for doc in rbac() {
                admin
                    .apply(&doc, Apply::FOR_REAL)
                    .expect_ok("applying RBAC");
            }
            admin.ensure_namespace("e2e");
            create_node(&admin);
            let dir = tempfile::tempdir().expect("tempdir");
            let token_file = dir.path().join("token");
            let token = admin.service_account_token("kube-system", "kube-wasm-proxy");
            std::fs::write(&token_file, token).expect("token file");
            let ca_file = dir.path().join("ca.crt");
            std::fs::copy(&cp.ca_file, &ca_file).expect("a copy of the CA");
            HostApi {
                cp,
                ca_file,
                token_file,
                _dir: dir,
            }
        });
        started
            .map_err(|_| eprintln!("the IPVS soak's API server did not start (see above)"))
            .ok()
    }

    /// Host files the guest needs at the same paths.
    pub fn files(&self) -> Vec<String> {
        [&self.ca_file, &self.token_file]
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    /// The guest's environment: where the API server is and who to be.
    pub fn env(&self) -> Vec<String> {
        vec![
            format!("KWP_SOAK_API_PORT={}", self.cp.port()),
            format!("KWP_SOAK_CA={}", self.ca_file.display()),
            format!("KWP_SOAK_ADMIN_TOKEN={}", self.cp.admin_token),
            format!("KWP_SOAK_TOKEN_FILE={}", self.token_file.display()),
            // The tests' API client loads the system's roots too, and the
            // guest has none: the test CA stands for them.
            format!("SSL_CERT_FILE={}", self.ca_file.display()),
        ]
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: the host started no API server for the soak (see its log)")
    })
}

/// The guest's side: kwp in IPVS mode on `--source kubernetes`, then the
/// soak's rounds; asserts no mismatch and no failed probe.
pub fn in_guest(tag: &str, seconds: u64, rate: u64, sample: usize) -> Totals {
    let port: u16 = var("KWP_SOAK_API_PORT").parse().expect("a port");
    let ca = PathBuf::from(var("KWP_SOAK_CA"));
    // 127.0.0.1:port in the guest and in its node namespace is the host's
    // API server: the serving certificate names 127.0.0.1.
    let _to_host = forward_here(port, SocketAddr::from(([10, 0, 2, 2], port)));
    let cluster = Cluster::new(tag);
    let _to_guest = cluster.node.forward_loopback(port);
    let url = format!("https://127.0.0.1:{port}");
    let admin = Client {
        url: url.clone(),
        ca_file: ca.clone(),
        token: Some(var("KWP_SOAK_ADMIN_TOKEN")),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kubeconfig");
    let user = format!("tokenFile: {}", var("KWP_SOAK_TOKEN_FILE"));
    std::fs::write(&config, kubeconfig(&url, &ca, &user)).expect("kubeconfig");
    let config = config.display().to_string();
    let args = [
        "--proxy-mode",
        "ipvs",
        "--source",
        "kubernetes",
        "--kubeconfig",
        &config,
        "--hostname-override",
        "node-1",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--min-sync-period",
        "50ms",
        "--sync-period",
        "10s",
        // Wasm under emulation runs tens of times slower than natively.
        "--plugin-call-timeout",
        "5s",
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        METRICS,
    ];
    let mut proxy = cluster
        .node
        .spawn(env!("CARGO_BIN_EXE_kube-wasm-proxy"), &args);
    let logs = Logs::capture(&mut proxy);
    let tail = || {
        let text = logs.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let up = common::poll::until(Duration::from_secs(180), || {
        let exited = matches!(proxy.try_wait(), Ok(Some(_)));
        exited
            || logs.text().contains("loaded proxy mode")
                && cluster.node.sh("ip -o link show").contains("kube-ipvs0")
    });
    let up = up && matches!(proxy.try_wait(), Ok(None));
    assert!(up, "the proxy did not program the kernel:\n{}", tail());
    warm_up(&admin, &logs);
    let node = Node {
        admin: &admin,
        cluster: &cluster,
        proxy: proxy.id(),
        mode: "ipvs",
    };
    // The settle bound: under emulation a policy's first use compiles it
    // (the first round settled in 27 s), and each comparison reads the
    // API and the kernel (nft, ip) in the guest.
    let t = run(
        &node,
        seconds,
        rate,
        Duration::from_secs(10),
        Duration::from_secs(60),
        sample,
    );
    report(&t);
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(
        t.mismatches,
        0,
        "mismatches after the syncs settled; proxy log:\n{}",
        tail()
    );
    assert!(
        t.probe_failures.is_empty(),
        "{:?}; proxy log:\n{}",
        t.probe_failures,
        tail()
    );
    t
}

/// Loads every policy the churn picks before the first round: under
/// emulation a policy's first use compiles it, seconds to tens of
/// seconds, which would otherwise be the first round's settle time.
fn warm_up(admin: &Client, logs: &Logs) {
    let started = std::time::Instant::now();
    let policies: Vec<&str> = crate::soak::policies("ipvs")
        .into_iter()
        .filter(|p| *p != "no-such-policy")
        .collect();
    for (i, policy) in policies.iter().enumerate() {
        let name = format!("warm-{policy}");
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "e2e",
                         "annotations": {"kube-wasm-proxy.io/lb-policy": policy}},
            "spec": {"clusterIP": format!("10.96.20.{}", i + 1),
                     "ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}]}});
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "e2e",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.11"], "conditions": {"ready": true}}]});
        for object in [svc, slice] {
            admin
                .apply(&object.to_string(), Apply::FOR_REAL)
                .expect_ok("a warm-up object");
        }
    }
    let loaded = common::poll::until(Duration::from_secs(180), || {
        let text = logs.text();
        policies
            .iter()
            .all(|p| text.contains(&format!("loaded lb policy policy={p}")))
    });
    assert!(loaded, "the policies did not load:\n{}", logs.text());
    for policy in &policies {
        let name = format!("warm-{policy}");
        admin.delete(&format!("/api/v1/namespaces/e2e/services/{name}"));
        admin.delete(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/e2e/endpointslices/{name}-1"
        ));
    }
    eprintln!(
        "soak: {} policies loaded in {:.1} s",
        policies.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The long soak's parameters on the host (`KWP_SOAK_SECONDS`,
/// `KWP_SOAK_RATE`), for the guest's environment.
pub fn long_env() -> Vec<String> {
    ["KWP_SOAK_SECONDS", "KWP_SOAK_RATE"]
        .iter()
        .filter_map(|k| Some(format!("{k}={}", std::env::var(k).ok()?)))
        .collect()
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
