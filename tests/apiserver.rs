//! The manifests in deploy/ against a real kube-apiserver (built from the
//! pinned k8s.io/kubernetes by scripts/control-plane.sh): every document
//! passes server-side dry run with strict field validation, the
//! ConfigMap's KubeProxyConfiguration is one upstream kube-proxy accepts
//! strictly (and kube-wasm-proxy too), and the ServiceAccount's RBAC allows
//! exactly what the proxy needs.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use common::apiserver::{self, Apply, ControlPlane, yaml_documents};
use serde_json::json;

const NAMESPACE: &str = "kube-system";
const NAME: &str = "kube-wasm-proxy";

fn deploy_dir() -> PathBuf {
    apiserver::repo_root().join("deploy")
}

/// (file name, document) of every YAML document in deploy/.
fn manifests() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in yaml_documents(&text) {
            out.push((name.clone(), doc));
        }
    }
    out
}

fn yaml(doc: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(doc).unwrap()
}

fn kind_of(doc: &str) -> String {
    yaml(doc)["kind"].as_str().unwrap_or_default().to_string()
}

/// The one document of `kind` in deploy/.
fn manifest(kind: &str) -> String {
    let mut found: Vec<String> = manifests()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| kind_of(d) == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/");
    found.remove(0)
}

/// The ConfigMap's `config.conf` and `kubeconfig.conf`.
fn configmap_file(key: &str) -> String {
    yaml(&manifest("ConfigMap"))["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap has no data.{key}"))
        .to_string()
}

#[test]
fn every_manifest_passes_server_side_dry_run() {
    let docs = manifests();
    let kinds: BTreeSet<String> = docs.iter().map(|(_, d)| kind_of(d)).collect();
    for want in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        assert!(kinds.contains(want), "deploy/ has no {want}: {kinds:?}");
    }

    let cp = ControlPlane::start();
    let admin = cp.admin();
    admin.ensure_namespace(NAMESPACE);
    for (file, doc) in &docs {
        let r = admin.apply(doc, Apply::DRY_RUN);
        r.expect_ok(&format!(
            "server-side dry run of a {} in deploy/{file}",
            kind_of(doc)
        ));
    }
    // Admission does not resolve a pod template's priority class; check that
    // the one named exists (the API server creates it at start).
    let class = yaml(&manifest("DaemonSet"))["spec"]["template"]["spec"]["priorityClassName"]
        .as_str()
        .unwrap()
        .to_string();
    admin
        .get(&format!(
            "/apis/scheduling.k8s.io/v1/priorityclasses/{class}"
        ))
        .expect_ok(&format!("PriorityClass {class}"));
    // A dry run stores nothing.
    let ds_path = admin.object_path("apps/v1", "DaemonSet", Some(NAMESPACE), Some(NAME));
    assert_eq!(
        admin.get(&ds_path).status,
        404,
        "dry run created the DaemonSet"
    );

    // The check can fail: a misspelled field, a value out of its enum, a
    // probe port out of range.
    let ds = manifest("DaemonSet");
    for (what, from, to, expect) in [
        (
            "misspelled field",
            "hostNetwork:",
            "hostNetwrok:",
            "hostNetwrok",
        ),
        (
            "unknown hostPath type",
            "type: FileOrCreate",
            "type: FileOrCreat",
            "FileOrCreat",
        ),
        (
            "invalid probe port",
            "port: 10256",
            "port: 1025600",
            "1025600",
        ),
    ] {
        assert!(ds.contains(from), "daemonset.yaml has no {from:?}");
        let r = admin.apply(&ds.replacen(from, to, 1), Apply::DRY_RUN);
        assert!(
            !r.ok(),
            "a DaemonSet with a {what} passed the dry run: {}",
            r.body
        );
        assert!(
            r.body.contains(expect),
            "{what}: the error does not name {expect:?}: {}",
            r.body
        );
    }
    let role = manifest("ClusterRole");
    let r = admin.apply(&role.replacen("verbs:", "verb:", 1), Apply::DRY_RUN);
    assert!(
        !r.ok(),
        "a ClusterRole with a misspelled field passed: {}",
        r.body
    );

    // What the DaemonSet promises to replace kubeadm's kube-proxy with.
    let v = yaml(&ds);
    let spec = &v["spec"]["template"]["spec"];
    assert_eq!(v["metadata"]["namespace"], NAMESPACE);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["serviceAccountName"], NAME);
    assert!(
        spec["tolerations"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates everything"
    );
    let c = &spec["containers"][0];
    assert_ne!(c["securityContext"]["privileged"], true, "not privileged");
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for m in ["/run/xtables.lock", "/lib/modules"] {
        assert!(mounts.contains(&m), "no mount {m}: {mounts:?}");
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
}

#[test]
fn the_configmap_is_a_configuration_kube_proxy_and_kube_wasm_proxy_accept() {
    let bins = apiserver::binaries();
    let version = apiserver::kube_version();
    for bin in [&bins.kube_proxy, &bins.kube_apiserver] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("Kubernetes {version}"),
            "{}",
            bin.display()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let config = configmap_file("config.conf");
    // kube-proxy decodes the file strictly, falls back to lenient decoding
    // with a log line, then validates; --write-config-to stops it there.
    let kube_proxy = |text: &str| {
        let path = dir.path().join("config.conf");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(&bins.kube_proxy)
            .arg(format!("--config={}", path.display()))
            .arg(format!(
                "--write-config-to={}",
                dir.path().join("out.yaml").display()
            ))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, log) = kube_proxy(&config);
    assert!(
        ok && !log.contains("strict decoding"),
        "kube-proxy {version} does not accept config.conf strictly:\n{log}"
    );
    let (ok, log) = kube_proxy(&config.replacen("masqueradeAll", "masqueradAll", 1));
    assert!(
        ok && log.contains("strict decoding error"),
        "a misspelled field went unnoticed:\n{log}"
    );
    let (ok, log) = kube_proxy(&config.replacen("mode: nftables", "mode: nftable", 1));
    assert!(
        !ok && log.contains("nftable"),
        "an invalid mode was accepted:\n{log}"
    );

    // kube-wasm-proxy reads the same file, with the DaemonSet's arguments.
    let path = dir.path().join("config.conf");
    std::fs::write(&path, &config).unwrap();
    let ds = yaml(&manifest("DaemonSet"));
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .expect("config mount")["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    let mut argv = vec!["kube-wasm-proxy".to_string()];
    for a in c["args"].as_sequence().unwrap() {
        let a = a.as_str().unwrap().replace("$(NODE_NAME)", "node-1");
        argv.push(a.replace(&format!("{mount}/config.conf"), path.to_str().unwrap()));
    }
    let cli = kwp::config::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("kube-wasm-proxy rejects the DaemonSet's args {argv:?}: {e}"));
    let settings =
        kwp::config::Settings::resolve(&cli.flags).expect("kube-wasm-proxy accepts config.conf");
    assert_eq!(settings.mode, kwp::config::ProxyMode::Nftables);
    assert_eq!(settings.hostname, "node-1");
    let healthz = settings.healthz_bind_address.expect("a healthz address");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_u64(),
            Some(u64::from(healthz.port())),
            "{probe} port is healthzBindAddress's"
        );
    }
    let kubeconfig_path = yaml(&config)["clientConnection"]["kubeconfig"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        Path::new(&kubeconfig_path).parent().unwrap(),
        Path::new(&mount),
        "clientConnection.kubeconfig is in the ConfigMap's mount"
    );

    let kubeconfig = yaml(&configmap_file("kubeconfig.conf"));
    assert_eq!(kubeconfig["kind"], "Config");
    assert_eq!(
        kubeconfig["users"][0]["user"]["tokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
}

#[test]
fn the_service_account_may_do_what_the_proxy_needs_and_no_more() {
    let cp = ControlPlane::start();
    let admin = cp.admin();
    admin.ensure_namespace(NAMESPACE);
    let rbac = std::fs::read_to_string(deploy_dir().join("rbac.yaml")).unwrap();
    for doc in yaml_documents(&rbac) {
        admin
            .apply(&doc, Apply::FOR_REAL)
            .expect_ok(&format!("applying a {} from rbac.yaml", kind_of(&doc)));
    }
    let sa = cp.client(&admin.service_account_token(NAMESPACE, NAME));
    assert_eq!(
        sa.whoami()["username"],
        format!("system:serviceaccount:{NAMESPACE}:{NAME}")
    );

    // Real requests, cluster-wide, as the proxy makes them.
    admin.ensure_namespace("e2e");
    admin
        .post(
            "/api/v1/namespaces/e2e/services",
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .expect_ok("creating a Service as admin");
    admin
        .post(
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
        )
        .expect_ok("creating a Node as admin");
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/nodes",
    ] {
        sa.get(path).expect_ok(&format!("list {path}"));
        let r = sa.get(&format!("{path}?watch=1&timeoutSeconds=1"));
        assert_eq!(r.status, 200, "watch {path}: {}", r.body);
    }
    // With the selectors the kubernetes source watches with.
    sa.get("/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name,%21service.kubernetes.io%2Fheadless")
        .expect_ok("list Services the proxy handles");
    let mine = sa
        .get("/api/v1/nodes?fieldSelector=metadata.name%3Dnode-1")
        .expect_ok("list its own Node");
    assert_eq!(mine["items"][0]["metadata"]["name"], "node-1");
    sa.get("/api/v1/namespaces/e2e/services/web")
        .expect_ok("get a Service");
    sa.get("/api/v1/nodes/node-1").expect_ok("get its Node");
    let event = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "node-1.kwp-test", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "kube-wasm-proxy.io/proxy",
        "reportingInstance": "kube-wasm-proxy-node-1", "action": "StartKubeProxy", "reason": "Starting", "type": "Normal",
        "regarding": {"kind": "Node", "name": "node-1", "uid": "node-1"},
    });
    sa.post("/apis/events.k8s.io/v1/namespaces/default/events", &event)
        .expect_ok("create an Event");
    sa.merge_patch(
        "/apis/events.k8s.io/v1/namespaces/default/events/node-1.kwp-test",
        &json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}}),
    )
    .expect_ok("patch an Event");
    let core_event = json!({
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "node-1.kwp-core", "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": "node-1"}, "reason": "Starting", "message": "m", "type": "Normal",
    });
    sa.post("/api/v1/namespaces/default/events", &core_event)
        .expect_ok("create a core Event");

    // And nothing else.
    for (method, path) in [
        ("GET", "/api/v1/secrets"),
        ("GET", "/api/v1/namespaces/kube-system/secrets"),
        ("GET", "/api/v1/configmaps"),
        ("GET", "/api/v1/pods"),
        ("GET", "/api/v1/endpoints"),
        ("GET", "/api/v1/namespaces/default/events"),
        ("DELETE", "/api/v1/namespaces/e2e/services/web?dryRun=All"),
        ("DELETE", "/api/v1/nodes/node-1?dryRun=All"),
        (
            "DELETE",
            "/apis/events.k8s.io/v1/namespaces/default/events/node-1.kwp-test?dryRun=All",
        ),
    ] {
        let r = sa.request(method, path, None);
        assert_eq!(
            r.status, 403,
            "{method} {path} was not forbidden: {}",
            r.body
        );
    }
    let r = sa.merge_patch(
        "/api/v1/nodes/node-1?dryRun=All",
        &json!({"metadata": {"labels": {"x": "y"}}}),
    );
    assert_eq!(
        r.status, 403,
        "patching a Node was not forbidden: {}",
        r.body
    );
    let r = sa.post("/api/v1/namespaces/e2e/services?dryRun=All", &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}}));
    assert_eq!(
        r.status, 403,
        "creating a Service was not forbidden: {}",
        r.body
    );

    // The whole matrix, by access review.
    let read = ["get", "list", "watch"];
    let write = ["create", "update", "patch", "delete", "deletecollection"];
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ] {
        for verb in read {
            assert!(
                sa.can(verb, group, resource, None),
                "cannot {verb} {resource}"
            );
        }
        for verb in write {
            assert!(
                !sa.can(verb, group, resource, None),
                "may {verb} {resource}"
            );
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            assert!(
                sa.can(verb, group, "events", Some("default")),
                "cannot {verb} events in group {group:?}"
            );
        }
        for verb in [
            "get",
            "list",
            "watch",
            "update",
            "delete",
            "deletecollection",
        ] {
            assert!(
                !sa.can(verb, group, "events", Some("default")),
                "may {verb} events in group {group:?}"
            );
        }
    }
    for (verb, group, resource) in [
        ("get", "", "secrets"),
        ("list", "", "endpoints"),
        ("list", "", "pods"),
        ("get", "", "configmaps"),
        ("update", "", "services/status"),
        ("patch", "", "nodes/status"),
        ("impersonate", "", "users"),
        ("create", "", "serviceaccounts/token"),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles"),
        ("bind", "rbac.authorization.k8s.io", "clusterroles"),
        ("create", "authentication.k8s.io", "tokenreviews"),
        ("*", "*", "*"),
    ] {
        assert!(
            !sa.can(verb, group, resource, Some(NAMESPACE)),
            "may {verb} {group}/{resource}"
        );
    }

    // A kubeconfig for the token works the same way.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    cp.write_kubeconfig(&path, sa.token.as_deref().unwrap());
    let kubeconfig = std::fs::read_to_string(&path).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&kubeconfig).unwrap();
    assert_eq!(
        v["clusters"][0]["cluster"]["server"].as_str(),
        Some(cp.url.as_str())
    );
}
