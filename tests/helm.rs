//! The Helm chart `deploy/helm/kube-wasm-proxy` with a real helm (built
//! from the Go module helm.sh/helm/v4 by scripts/helm.sh): it lints, it
//! renders with default and non-default values, its schema refuses bad
//! values, the rendered manifests pass server-side dry run against the
//! real kube-apiserver, the KubeProxyConfiguration it renders is one
//! upstream kube-proxy decodes strictly and kube-wasm-proxy accepts, and
//! its default rendering says what the plain manifests in deploy/ say.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use clap::Parser;
use common::apiserver::{self, Apply, ControlPlane, repo_root, yaml_documents};
use common::daemonset::deploy_file;
use serde_yaml_ng::Value;

/// Values that change every knob the chart has.
const CUSTOM_VALUES: &str = r#"
image:
  repository: registry.example/kube-wasm-proxy
  tag: 0.1.0-test
  pullPolicy: Always
mode: iptables
defaultPolicy: maglev
apiServer: https://10.0.0.1:6443
policyConfigMaps: [my-policy-0123456789ab, team-policies]
config:
  clusterCIDR: 10.100.0.0/16
  healthzBindAddress: 0.0.0.0:10356
  iptables:
    masqueradeAll: true
    masqueradeBit: 14
    minSyncPeriod: 2s
    syncPeriod: 1m0s
  conntrack:
    maxPerCore: 32768
    min: 131072
    tcpEstablishedTimeout: 24h0m0s
    tcpCloseWaitTimeout: 1h0m0s
logLevel: debug
resources:
  requests: {cpu: 50m, memory: 48Mi}
  limits: {memory: 256Mi}
tolerations:
- {key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}
nodeSelector: {kubernetes.io/os: linux, node.example/proxy: kwp}
extraCapabilities: [SYS_MODULE]
"#;

fn chart() -> PathBuf {
    repo_root().join("deploy/helm/kube-wasm-proxy")
}

/// The path scripts/helm.sh prints (it builds helm the first time on a
/// machine: minutes).
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let script = repo_root().join("scripts/helm.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// helm with `args`: (success, stdout, stderr).
fn run_helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running helm {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A values file with `text`, kept for the test's lifetime.
fn values_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// `helm template` into kube-system with these extra arguments: the YAML
/// documents it renders.
fn render(extra: &[&str]) -> Vec<String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "kube-wasm-proxy",
        chart.to_str().unwrap(),
        "--namespace",
        "kube-system",
    ];
    args.extend(extra);
    let (ok, out, err) = run_helm(&args);
    assert!(ok, "helm {args:?} failed:\n{err}");
    yaml_documents(&out)
}

/// Every document by "Kind name", parsed, with the ConfigMap's embedded files
/// parsed too (so that key order and comments do not count).
fn objects(docs: &[String]) -> BTreeMap<String, Value> {
    docs.iter()
        .map(|d| {
            let mut v: Value = serde_yaml_ng::from_str(d).unwrap();
            if v["kind"] == "ConfigMap" {
                for (_, text) in v["data"].as_mapping_mut().unwrap() {
                    *text = serde_yaml_ng::from_str(text.as_str().unwrap()).unwrap();
                }
            }
            let key = format!(
                "{} {}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            );
            (key, v)
        })
        .collect()
}

fn object<'a>(objects: &'a BTreeMap<String, Value>, kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|(k, _)| k.starts_with(&format!("{kind} ")))
        .unwrap_or_else(|| panic!("no {kind} rendered: {:?}", objects.keys()))
        .1
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn the_chart_lints_and_renders_every_value() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let custom = values_file(CUSTOM_VALUES);
    let custom = custom.path().to_str().unwrap();
    let (ok, out, err) = run_helm(&["version", "--template", "{{.Version}}"]);
    assert!(ok, "{err}");
    let script = std::fs::read_to_string(repo_root().join("scripts/helm.sh")).unwrap();
    assert!(
        script.contains(&format!("HELM_VERSION={}", out.trim())),
        "helm reports {out}"
    );
    for values in [None, Some(custom)] {
        let mut args = vec!["lint", "--strict", chart, "--namespace", "kube-system"];
        args.extend(values.iter().flat_map(|v| ["--values", *v]));
        let (ok, out, err) = run_helm(&args);
        assert!(ok, "helm {args:?}:\n{out}{err}");
    }

    // The chart and the binary have one version; the image tag follows it.
    let chart_yaml: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/helm/kube-wasm-proxy/Chart.yaml"))
            .unwrap(),
    )
    .unwrap();
    let workspace = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let version = workspace
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("version = ")))
        .expect("version in Cargo.toml [workspace.package]");
    assert_eq!(
        version.trim_matches('"'),
        chart_yaml["appVersion"].as_str().unwrap(),
        "Chart.yaml appVersion is not the workspace's version (Cargo.toml)"
    );

    // Every non-default value lands where it should.
    let rendered = objects(&render(&["--values", custom]));
    let ds = object(&rendered, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/kube-wasm-proxy:0.1.0-test");
    assert_eq!(c["imagePullPolicy"], "Always");
    let args = strings(&c["args"]);
    assert!(args.contains(&"--lb-policy=maglev"), "{args:?}");
    assert!(
        args.contains(&"--plugin-dir=/etc/kube-wasm-proxy/plugins"),
        "{args:?}"
    );
    let policies_mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "policies")
        .expect("the policy ConfigMaps mounted");
    assert_eq!(policies_mount["mountPath"], "/etc/kube-wasm-proxy/plugins");
    let sources: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "policies")
        .expect("a policies volume")["projected"]["sources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|s| s["configMap"]["name"].as_str())
        .collect();
    assert_eq!(sources, ["my-policy-0123456789ab", "team-policies"]);
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["add"]),
        ["NET_ADMIN", "NET_RAW", "SYS_MODULE"]
    );
    let values: Value = serde_yaml_ng::from_str(CUSTOM_VALUES).unwrap();
    assert_eq!(c["resources"], values["resources"]);
    assert_eq!(pod["tolerations"], values["tolerations"]);
    assert_eq!(pod["nodeSelector"], values["nodeSelector"]);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"], 10356,
            "{probe} follows healthzBindAddress"
        );
    }
    let rust_log = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "RUST_LOG")
        .unwrap();
    assert_eq!(rust_log["value"], "debug");
    let cm = object(&rendered, "ConfigMap");
    let config = &cm["data"]["config.conf"];
    assert_eq!(config["mode"], "iptables");
    assert_eq!(config["iptables"], values["config"]["iptables"]);
    assert_eq!(config["conntrack"], values["config"]["conntrack"]);
    assert_eq!(config["clusterCIDR"], "10.100.0.0/16");
    assert_eq!(
        config["clientConnection"]["kubeconfig"],
        "/var/lib/kube-wasm-proxy/kubeconfig.conf"
    );
    assert_eq!(
        cm["data"]["kubeconfig.conf"]["clusters"][0]["cluster"]["server"],
        "https://10.0.0.1:6443"
    );

    // The schema refuses what cannot work, naming the value.
    for (bad, names) in [
        ("mode=nftable", "/mode"),
        ("config.mode=iptables", "/config/mode"),
        ("apiServer=10.0.0.1:6443", "/apiServer"),
        ("extraCapabilities[0]=sys_module", "/extraCapabilities/0"),
        ("policyConfigMaps[0]=My_Policy", "/policyConfigMaps/0"),
        ("imageTag=1", "imageTag"),
    ] {
        let (ok, _, err) = run_helm(&["template", "x", chart, "--set", bad]);
        assert!(!ok, "--set {bad} was accepted");
        assert!(
            err.contains(names),
            "--set {bad}: the error does not name {names}:\n{err}"
        );
    }
}

/// kube-proxy's strict decoding of `config` (as tests/apiserver.rs checks
/// deploy/configmap.yaml): --write-config-to stops after decoding and
/// validating. Panics with its log unless it accepts the file strictly.
fn kube_proxy_accepts(config: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.conf");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(&apiserver::binaries().kube_proxy)
        .arg(format!("--config={}", path.display()))
        .arg(format!(
            "--write-config-to={}",
            dir.path().join("out.yaml").display()
        ))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !log.contains("strict decoding"),
        "upstream kube-proxy does not accept {what} strictly:\n{log}\n{config}"
    );
    // kube-wasm-proxy reads it too.
    let argv = ["kube-wasm-proxy", "--config", path.to_str().unwrap()];
    let cli = kwp::config::Cli::try_parse_from(argv).unwrap();
    kwp::config::Settings::resolve(&cli.flags)
        .unwrap_or_else(|e| panic!("kube-wasm-proxy rejects {what}: {e:#}\n{config}"));
}

#[test]
fn the_rendered_chart_passes_dry_run_and_kube_proxy_accepts_its_configuration() {
    let custom = values_file(CUSTOM_VALUES);
    let renders = [
        ("default values", render(&[])),
        (
            "non-default values",
            render(&["--values", custom.path().to_str().unwrap()]),
        ),
        ("mode ipvs", render(&["--set", "mode=ipvs"])),
    ];
    for (what, docs) in &renders {
        let rendered = objects(docs);
        let text = serde_yaml_ng::to_string(&object(&rendered, "ConfigMap")["data"]["config.conf"])
            .unwrap();
        kube_proxy_accepts(&text, &format!("config.conf of the chart with {what}"));
    }

    let cp = ControlPlane::start();
    let admin = cp.admin();
    admin.ensure_namespace("kube-system");
    for (what, docs) in &renders {
        assert_eq!(docs.len(), 5, "{what}: {docs:?}");
        for doc in docs {
            let kind: Value = serde_yaml_ng::from_str(doc).unwrap();
            admin.apply(doc, Apply::DRY_RUN).expect_ok(&format!(
                "server-side dry run of the chart's {} with {what}",
                kind["kind"].as_str().unwrap_or("?")
            ));
        }
    }
}

#[test]
fn the_plain_manifests_say_what_the_chart_renders_by_default() {
    let mut plain = Vec::new();
    for file in ["rbac.yaml", "configmap.yaml", "daemonset.yaml"] {
        plain.extend(yaml_documents(&deploy_file(file)));
    }
    let plain = objects(&plain);
    let chart = objects(&render(&[]));
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "deploy/ and the chart hold different objects"
    );
    for (key, want) in &plain {
        let got = &chart[key];
        assert!(
            want == got,
            "{key} differs between deploy/ and the chart's default rendering:\n\
             deploy/:\n{}\nchart:\n{}",
            serde_yaml_ng::to_string(want).unwrap(),
            serde_yaml_ng::to_string(got).unwrap()
        );
    }
}
