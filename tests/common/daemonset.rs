//! The pod `deploy/daemonset.yaml` describes, read as the kubelet reads
//! it: the container's command line with `$(VAR)` expanded, its
//! environment, capabilities, probes and volume mounts, and the files of
//! `deploy/configmap.yaml` and a service-account token where the pod
//! finds them. The topics that start the proxy "as the DaemonSet does"
//! (tests/image.rs without a runtime, tests/oci_image.rs with podman)
//! take everything from here, so a change to the manifest reaches both.

use std::path::Path;

use serde_yaml_ng::Value;

use super::apiserver::{Client, ControlPlane, repo_root, yaml_documents};

/// Where a pod finds its service-account token and CA (the kubelet mounts
/// them there in every container).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The placeholder API server address in deploy/configmap.yaml that
/// docs/deploy.md tells the operator to replace.
pub const PLACEHOLDER_SERVER: &str = "https://control-plane.invalid:6443";

/// The text of `deploy/<file>`.
pub fn deploy_file(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("deploy").join(file))
        .unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// The one document of `kind` in `deploy/<file>`.
pub fn document(file: &str, kind: &str) -> Value {
    yaml_documents(&deploy_file(file))
        .iter()
        .map(|d| serde_yaml_ng::from_str::<Value>(d).expect("deploy/ YAML parses"))
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/{file}"))
}

/// A YAML sequence of strings.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// What backs a volume mount.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    ConfigMap(String),
    /// A `hostPath`; `file` for type `File` or `FileOrCreate`.
    HostPath {
        path: String,
        file: bool,
    },
    /// An `emptyDir`; `memory` for `medium: Memory`.
    EmptyDir {
        memory: bool,
        size_limit: Option<String>,
    },
}

/// One of the container's `volumeMounts`, with its volume.
#[derive(Debug, Clone)]
pub struct Mount {
    pub name: String,
    pub path: String,
    pub read_only: bool,
    pub source: Source,
}

/// The DaemonSet's pod template and its one container.
pub struct Pod {
    pub spec: Value,
    pub container: Value,
}

impl Pod {
    pub fn load() -> Self {
        let ds = document("daemonset.yaml", "DaemonSet");
        let spec = ds["spec"]["template"]["spec"].clone();
        let container = spec["containers"][0].clone();
        Self { spec, container }
    }

    pub fn image(&self) -> String {
        self.container["image"]
            .as_str()
            .expect("containers[0].image")
            .to_string()
    }

    /// `command` + `args`, `$(NODE_NAME)` expanded as the kubelet does
    /// (checking that NODE_NAME comes from `spec.nodeName`).
    pub fn command_line(&self, node_name: &str) -> Vec<String> {
        let from_field = self.container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|e| {
                e["name"] == "NODE_NAME"
                    && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            });
        assert!(from_field, "NODE_NAME from spec.nodeName");
        let mut command = strings(&self.container["command"]);
        command.extend(strings(&self.container["args"]));
        command
            .iter()
            .map(|a| a.replace("$(NODE_NAME)", node_name))
            .collect()
    }

    /// The environment: plain values, and NODE_NAME as the node's name.
    pub fn env(&self, node_name: &str) -> Vec<(String, String)> {
        self.container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|e| {
                let name = e["name"].as_str().expect("env name").to_string();
                let value = match e["value"].as_str() {
                    Some(v) => v.to_string(),
                    None if name == "NODE_NAME" => node_name.to_string(),
                    None => panic!("env {name}: only plain values and NODE_NAME are known"),
                };
                (name, value)
            })
            .collect()
    }

    /// `securityContext.capabilities.add`, after checking that `drop` is ALL.
    pub fn capabilities(&self) -> Vec<String> {
        let caps = &self.container["securityContext"]["capabilities"];
        assert_eq!(strings(&caps["drop"]), ["ALL"], "the DaemonSet drops ALL");
        strings(&caps["add"])
    }

    /// `http://host:port/path` of `readinessProbe` or `livenessProbe`.
    pub fn probe_url(&self, probe: &str) -> String {
        let p = &self.container[probe]["httpGet"];
        format!(
            "http://{}:{}{}",
            p["host"].as_str().unwrap_or("127.0.0.1"),
            p["port"].as_u64().expect("numeric probe port"),
            p["path"].as_str().expect("probe path")
        )
    }

    /// Every volume mount with what backs it.
    pub fn mounts(&self) -> Vec<Mount> {
        let volumes = self.spec["volumes"].as_sequence().expect("volumes");
        self.container["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .map(|m| {
                let name = m["name"].as_str().expect("mount name").to_string();
                let v = volumes
                    .iter()
                    .find(|v| v["name"] == name.as_str())
                    .unwrap_or_else(|| panic!("no volume {name}"));
                let source = if let Some(cm) = v["configMap"]["name"].as_str() {
                    Source::ConfigMap(cm.to_string())
                } else if let Some(path) = v["hostPath"]["path"].as_str() {
                    let kind = v["hostPath"]["type"].as_str().unwrap_or_default();
                    Source::HostPath {
                        path: path.to_string(),
                        file: kind == "File" || kind == "FileOrCreate",
                    }
                } else if v.get("emptyDir").is_some() {
                    Source::EmptyDir {
                        memory: v["emptyDir"]["medium"] == "Memory",
                        size_limit: v["emptyDir"]["sizeLimit"].as_str().map(str::to_string),
                    }
                } else {
                    panic!("volume {name}: a kind the tests do not know: {v:?}")
                };
                Mount {
                    path: m["mountPath"].as_str().expect("mountPath").to_string(),
                    read_only: m["readOnly"].as_bool().unwrap_or(false),
                    name,
                    source,
                }
            })
            .collect()
    }

    /// Where the ConfigMap `kube-wasm-proxy` is mounted.
    pub fn config_mount(&self) -> String {
        self.mounts()
            .into_iter()
            .find(|m| m.source == Source::ConfigMap("kube-wasm-proxy".into()))
            .expect("the ConfigMap kube-wasm-proxy mounted")
            .path
    }
}

/// Writes each key of deploy/configmap.yaml into `dir` (as the kubelet
/// projects a ConfigMap), through `rewrite`.
pub fn write_configmap(dir: &Path, rewrite: impl Fn(&str) -> String) {
    std::fs::create_dir_all(dir).expect("config dir");
    let configmap = document("configmap.yaml", "ConfigMap");
    for (key, text) in configmap["data"].as_mapping().expect("data") {
        let (key, text) = (key.as_str().expect("key"), text.as_str().expect("text"));
        std::fs::write(dir.join(key), rewrite(text)).expect("write ConfigMap key");
    }
}

/// Writes the CA and a TokenRequest token of kube-system/kube-wasm-proxy
/// into `dir`, as the kubelet projects the service account.
pub fn write_service_account(dir: &Path, cp: &ControlPlane, admin: &Client) {
    std::fs::create_dir_all(dir).expect("service-account dir");
    std::fs::copy(&cp.ca_file, dir.join("ca.crt")).expect("copy the CA");
    std::fs::write(
        dir.join("token"),
        admin.service_account_token("kube-system", "kube-wasm-proxy"),
    )
    .expect("write the token");
}

/// deploy/rbac.yaml applied for real and the Node `node_name` created: what
/// a cluster has before the DaemonSet's pod starts on a node.
pub fn install_rbac_and_node(admin: &Client, node_name: &str) {
    for doc in yaml_documents(&deploy_file("rbac.yaml")) {
        admin
            .apply(&doc, super::apiserver::Apply::FOR_REAL)
            .expect_ok("applying deploy/rbac.yaml");
    }
    admin
        .post(
            "/api/v1/nodes",
            &serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name}}),
        )
        .expect_ok("creating the Node");
}

/// Service `e2e/web` at `cluster_ip`:80 with one ready endpoint
/// `endpoint_ip`:8080, created through the API.
pub fn create_web_service(admin: &Client, cluster_ip: &str, endpoint_ip: &str) {
    use serde_json::json;
    admin.ensure_namespace("e2e");
    admin
        .post(
            "/api/v1/namespaces/e2e/services",
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                    "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .expect_ok("creating a Service");
    admin
        .post(
            "/apis/discovery.k8s.io/v1/namespaces/e2e/endpointslices",
            &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [endpoint_ip], "conditions": {"ready": true}}]}),
        )
        .expect_ok("creating an EndpointSlice");
}

/// Waits up to 30 s for `check`, failing at once (with its logs) if the
/// proxy's process exits meanwhile.
pub fn wait_for(
    proxy: &mut std::process::Child,
    logs: &super::Logs,
    what: &str,
    check: impl Fn() -> bool,
) {
    let done = super::poll::until(std::time::Duration::from_secs(30), || {
        if let Ok(Some(status)) = proxy.try_wait() {
            panic!(
                "the proxy exited ({status}) while waiting for {what}:\n{}",
                logs.text()
            );
        }
        check()
    });
    assert!(
        done,
        "timed out waiting for {what}; the proxy logged:\n{}",
        logs.text()
    );
}

/// The image path the Dockerfile copies `from` (a path under /out) to.
pub fn image_path(dockerfile: &str, from: &str) -> String {
    dockerfile
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("COPY --from=build ")?;
            let (src, dest) = rest.split_once(' ')?;
            (src.trim_end_matches('/') == from)
                .then(|| dest.trim().trim_end_matches('/').to_string())
        })
        .unwrap_or_else(|| panic!("the Dockerfile does not copy {from} into the image"))
}
