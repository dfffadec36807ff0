//! The image and the DaemonSet without a container runtime: the files
//! `deploy/stage.sh` lays out (what `deploy/Dockerfile` copies into the
//! image), started with the DaemonSet's own command, arguments and
//! environment, the ConfigMap's files and a service-account token where the
//! pod would mount them, and only the capabilities the DaemonSet grants;
//! against a real kube-apiserver, in a network namespace of its own.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::Logs;
use common::apiserver::{Apply, repo_root, yaml_documents};
use common::netns::Netns;
use serde_json::json;
use serde_yaml_ng::Value;

/// Where a pod finds its service-account token and CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn deploy(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("deploy").join(file))
        .unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

fn document(file: &str, kind: &str) -> Value {
    yaml_documents(&deploy(file))
        .iter()
        .map(|d| serde_yaml_ng::from_str::<Value>(d).unwrap())
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/{file}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The image path the Dockerfile copies `from` (a path under /out) to.
fn image_path(dockerfile: &str, from: &str) -> String {
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

/// Lays out the image's files from this build with deploy/stage.sh.
fn stage(out: &Path) {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_kube-wasm-proxy"));
    // <target>/<profile>/kube-wasm-proxy
    let target = binary.parent().and_then(Path::parent).unwrap();
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/stage.sh"))
        .arg("--no-build")
        .arg(out)
        .env("KWP_BINARY", &binary)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("running deploy/stage.sh");
    assert!(status.success(), "deploy/stage.sh failed");
}

#[test]
fn the_staged_image_runs_as_the_daemonset_says_and_gets_ready() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("out");
    stage(&out);

    // Every plugin crate is in the image, under the name the flags use.
    let mut want: Vec<String> = std::fs::read_dir(repo_root().join("plugins"))
        .unwrap()
        .filter_map(|e| {
            let manifest = std::fs::read_to_string(e.ok()?.path().join("Cargo.toml")).ok()?;
            let name = manifest
                .lines()
                .find_map(|l| l.strip_prefix("name = \"kwp-plugin-"))?;
            Some(format!("{}.wasm", name.trim_end_matches('"')))
        })
        .collect();
    let mut staged: Vec<String> = std::fs::read_dir(out.join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    staged.sort();
    assert!(want.len() >= 7, "plugin crates found: {want:?}");
    assert_eq!(staged, want, "plugins in the image");

    // Image paths, from the Dockerfile; pod paths, from the DaemonSet.
    let dockerfile = deploy("Dockerfile");
    let image_binary = image_path(&dockerfile, "/out/bin/kube-wasm-proxy");
    let image_plugins = image_path(&dockerfile, "/out/plugins");
    let ds = document("daemonset.yaml", "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config_volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == "kube-wasm-proxy")
        .expect("a volume of the ConfigMap")["name"]
        .clone();
    let config_mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume)
        .expect("the ConfigMap mounted")["mountPath"]
        .as_str()
        .unwrap()
        .to_string();

    // The control plane, the RBAC, this node.
    let cp = common::apiserver::ControlPlane::start();
    let admin = cp.admin();
    for doc in yaml_documents(&deploy("rbac.yaml")) {
        admin
            .apply(&doc, Apply::FOR_REAL)
            .expect_ok("applying RBAC");
    }
    admin
        .post(
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
        )
        .expect_ok("creating the Node");

    // The pod's files: the ConfigMap's keys and a projected token.
    let (config_dir, sa_dir) = (root.join("config"), root.join("serviceaccount"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::copy(&cp.ca_file, sa_dir.join("ca.crt")).unwrap();
    std::fs::write(
        sa_dir.join("token"),
        admin.service_account_token("kube-system", "kube-wasm-proxy"),
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let rewrite = |text: &str| -> String {
        text.replace(&image_binary, &s(&out.join("bin/kube-wasm-proxy")))
            .replace(&image_plugins, &s(&out.join("plugins")))
            .replace(&config_mount, &s(&config_dir))
            .replace(SERVICE_ACCOUNT_DIR, &s(&sa_dir))
            // docs/deploy.md: set `server` to the API server's address.
            .replace("https://control-plane.invalid:6443", &cp.url)
    };
    let configmap = document("configmap.yaml", "ConfigMap");
    for (key, text) in configmap["data"].as_mapping().unwrap() {
        std::fs::write(
            config_dir.join(key.as_str().unwrap()),
            rewrite(text.as_str().unwrap()),
        )
        .unwrap();
    }

    // The container's command line, with $(VAR) expanded as the kubelet does.
    let mut command = strings(&container["command"]);
    command.extend(strings(&container["args"]));
    assert_eq!(
        command[0], image_binary,
        "the DaemonSet runs the binary the image has"
    );
    let node_name_from_field = container["env"].as_sequence().unwrap().iter().any(|e| {
        e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    });
    assert!(node_name_from_field, "NODE_NAME from spec.nodeName");
    let command: Vec<String> = command
        .iter()
        .map(|a| rewrite(a).replace("$(NODE_NAME)", "node-1"))
        .collect();
    for arg in &command[1..] {
        assert!(
            !arg.contains("/usr/") && !arg.contains("/var/"),
            "{arg} points at a path neither the image nor a mount provides"
        );
    }

    // Only the capabilities the DaemonSet adds, and no new privileges.
    let caps = strings(&container["securityContext"]["capabilities"]["add"]);
    assert_eq!(
        strings(&container["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    let bounding = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect::<String>();
    let ns = Netns::new("kwp-image");
    let forward = ns.forward_loopback(cp.port());
    let mut args = vec![
        format!("--bounding-set=-all{bounding}"),
        "--no-new-privs".into(),
    ];
    args.extend(command);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy = ns.spawn("setpriv", &args);
    let logs = Logs::capture(&mut proxy);

    // The readiness and liveness probes, as the kubelet sends them.
    let probe = |name: &str| -> u16 {
        let p = &container[name]["httpGet"];
        let url = format!(
            "http://{}:{}{}",
            p["host"].as_str().unwrap_or("127.0.0.1"),
            p["port"].as_u64().expect("numeric probe port"),
            p["path"].as_str().unwrap()
        );
        ns.sh(&format!(
            "curl -s -o /dev/null --max-time 2 -w '%{{http_code}}' {url} || true"
        ))
        .trim()
        .parse()
        .unwrap_or(0)
    };
    wait_for(&mut proxy, &logs, "readiness (/healthz 200)", || {
        probe("readinessProbe") == 200
    });
    assert_eq!(probe("livenessProbe"), 200);
    // `ip netns exec` and setpriv exec in place: this is the proxy itself.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.id())).unwrap();
    let cap = |field: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    const NET_ADMIN_AND_NET_RAW: u64 = (1 << 12) | (1 << 13);
    assert_eq!(cap("CapBnd:"), NET_ADMIN_AND_NET_RAW, "{status}");
    assert_eq!(cap("CapEff:") & !NET_ADMIN_AND_NET_RAW, 0, "{status}");

    // It programs the kernel from the API, with the image's plugin files.
    admin.ensure_namespace("e2e");
    admin
        .post(
            "/api/v1/namespaces/e2e/services",
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                    "spec": {"clusterIP": "10.96.0.77", "ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .expect_ok("creating a Service");
    admin
        .post(
            "/apis/discovery.k8s.io/v1/namespaces/e2e/endpointslices",
            &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}]}),
        )
        .expect_ok("creating an EndpointSlice");
    wait_for(&mut proxy, &logs, "the Service in the kernel", || {
        ns.sh("nft list table ip kube-wasm-proxy 2>/dev/null || true")
            .contains("10.96.0.77")
    });
    let text = logs.text();
    for plugin in ["nftables.wasm", "round-robin.wasm"] {
        let path = s(&out.join("plugins").join(plugin));
        assert!(
            text.contains(&path),
            "{plugin} was not loaded from the image's plugin directory:\n{text}"
        );
    }
    assert!(!text.contains("ERROR"), "the proxy logged errors:\n{text}");
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(forward);
}

/// Waits up to 30 s for `check`, failing at once if the proxy exits.
fn wait_for(proxy: &mut Child, logs: &Logs, what: &str, check: impl Fn() -> bool) {
    let done = common::poll::until(Duration::from_secs(30), || {
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
