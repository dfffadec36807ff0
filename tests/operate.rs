//! Operating the binary like kube-proxy: `--version`, `--v` and
//! `--logging-format`, `inspect` against a running proxy, and conntrack
//! tuning from the configuration in a network namespace.

use crate::common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_kube-wasm-proxy");

fn kwp(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs")
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn version_names_the_wit_contract_and_every_bundled_plugins_digest() {
    let out = kwp(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("kube-wasm-proxy {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    // The packages of the WIT the host was built with, one directory each
    // (sdk/wit/deps/<name>@<version>).
    let deps = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/wit/deps");
    let mut packages: Vec<String> = std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .map(|e| format!("kwp:{}", e.file_name().to_string_lossy()))
        .collect();
    packages.sort();
    assert_eq!(packages.len(), 3, "{packages:?}");
    let line = format!("WIT contract: {}", packages.join(", "));
    assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    let mut count = 0;
    for (name, bytes) in kwp_plugins_bundle::bundled() {
        let line = format!("  {name:<18} {}", hex(bytes));
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        count += 1;
    }
    assert!(count >= 9, "{count} bundled plugins");
    assert_eq!(kwp(&["-V"]).stdout, out.stdout);
}

fn dry_run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    dir
}

/// The log lines of a dry run with `args`.
fn dry_run_logs(args: &[&str]) -> String {
    let dir = dry_run_dir();
    let source = format!("file:{}", dir.path().display());
    let mut all = vec![
        "--dry-run",
        "--source",
        &source,
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
    ];
    all.extend_from_slice(args);
    let out = kwp(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn v_and_logging_format_set_the_level_and_the_format() {
    // Default and --v=2: info, as text.
    for args in [&[][..], &["--v=2"]] {
        let text = dry_run_logs(args);
        assert!(text.contains("INFO"), "{text}");
        assert!(!text.contains("DEBUG"), "{args:?}: {text}");
        assert!(!text.trim_start().starts_with('{'), "{text}");
    }
    // --v=4 --logging-format=json: debug lines (the file source's), each
    // line a JSON object with a level.
    let json = dry_run_logs(&["--v=4", "--logging-format=json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "no debug line in {json}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object())
    );
    let bad = kwp(&["--logging-format=xml"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("json"));
}

#[test]
fn the_configurations_logging_section_sets_level_and_format_unless_flags_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         logging:\n  format: json\n  verbosity: 4\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let json = dry_run_logs(&["--config", config]);
    assert!(
        json.lines().all(|l| l.starts_with('{')) && json.contains("\"level\":\"DEBUG\""),
        "{json}"
    );
    let text = dry_run_logs(&["--config", config, "--v=0", "--logging-format=text"]);
    assert!(!text.contains('{') && !text.contains("DEBUG"), "{text}");
}

/// A userspace proxy without redirects (no rules on the host) on `source`,
/// metrics on `metrics` ("" for none), no healthz server.
fn userspace_proxy<'a>(source: &'a str, metrics: &'a str) -> [&'a str; 9] {
    [
        "--proxy-mode",
        "userspace",
        "--no-redirect",
        "--source",
        source,
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        metrics,
    ]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn inspect_lists_each_service_with_its_policy_digest_endpoints_rules_and_sync() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("objects.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-0, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [127.0.0.1]}, {addresses: [127.0.0.2]}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: cache, namespace: shop, annotations: {kube-wasm-proxy.io/lb-policy: maglev}}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: redis, port: 6379}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: cache-0, namespace: shop, labels: {kubernetes.io/service-name: cache}}\n\
addressType: IPv4\nports: [{name: redis, port: 6379}]\nendpoints: [{addresses: [127.0.0.3]}]\n",
    )
    .unwrap();
    let source = format!("file:{}", dir.path().display());
    let metrics = format!("127.0.0.1:{}", free_port());
    let _proxy = Running(
        Command::new(BIN)
            .args(userspace_proxy(&source, &metrics))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let services = loop {
        let out = kwp(&["inspect", "--address", &metrics, "--json"]);
        if out.status.success() {
            let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            if v.len() == 2 {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "inspect never listed both");
        std::thread::sleep(Duration::from_millis(200));
    };
    let bundled = |name: &str| {
        let (_, bytes) = kwp_plugins_bundle::bundled()
            .find(|(n, _)| n == name)
            .unwrap();
        format!("sha256:{}", hex(bytes))
    };
    let cache = &services[0];
    assert_eq!(cache["service"], "shop/cache:redis/tcp");
    assert_eq!(cache["policy"], "maglev");
    assert_eq!(cache["plugin"], "bundled:maglev");
    assert_eq!(cache["digest"], bundled("maglev"));
    assert_eq!(cache["endpoints"], 1);
    assert_eq!(cache["last_sync"], "ok");
    assert_eq!(cache["rules"], 1, "one userspace listener");
    let web = &services[1];
    assert_eq!(web["service"], "shop/web:http/tcp");
    assert_eq!(web["policy"], "round-robin");
    assert_eq!(web["digest"], bundled("round-robin"));
    assert_eq!(web["endpoints"], 2);

    let table = kwp(&["inspect", "--address", &metrics]);
    let text = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("SERVICE"), "{text}");
    assert!(
        lines[1].contains("shop/cache:redis/tcp")
            && lines[1].contains("bundled:maglev")
            && lines[1].ends_with("ok"),
        "{text}"
    );

    // Nothing listening: a clear error naming the address.
    let closed = format!("127.0.0.1:{}", free_port());
    let out = kwp(&["inspect", "--address", &closed]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&closed),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const CONNTRACK_SYSCTLS: &[&str] = &[
    "nf_conntrack_max",
    "nf_conntrack_tcp_timeout_established",
    "nf_conntrack_tcp_timeout_close_wait",
    "nf_conntrack_udp_timeout",
    "nf_conntrack_udp_timeout_stream",
    "nf_conntrack_tcp_be_liberal",
];

/// The conntrack sysctls as `ns` sees them (the host's with `None`).
fn conntrack_values(ns: Option<&common::netns::Netns>) -> Vec<String> {
    let script = CONNTRACK_SYSCTLS
        .iter()
        .map(|n| format!("cat /proc/sys/net/netfilter/{n}"))
        .collect::<Vec<_>>()
        .join("; ");
    let out = match ns {
        Some(ns) => ns.sh(&script),
        None => String::from_utf8(
            Command::new("sh")
                .args(["-c", &script])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    };
    out.lines().map(str::to_string).collect()
}

/// Runs the proxy in `ns` with `config` until its log shows `wanted`.
fn run_with_config(ns: &common::netns::Netns, config: &str, wanted: &str) -> String {
    let dir = dry_run_dir();
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let source = format!("file:{}", dir.path().display());
    let config_path = dir.path().join("config.yaml");
    let mut args = vec!["--config", config_path.to_str().unwrap()];
    args.extend(userspace_proxy(&source, ""));
    let mut child = ns.spawn(BIN, &args);
    let logs = common::Logs::capture(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs.text().contains(wanted) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no {wanted:?} in\n{}", logs.text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    logs.text()
}

#[test]
fn conntrack_settings_apply_in_the_proxys_namespace_and_a_node_wide_one_is_refused_clearly() {
    let ns = common::netns::Netns::new("kwp-conntrack");
    // Loads nf_conntrack's per-namespace sysctls here.
    ns.sh("nft add table ip t; nft add chain ip t c; nft add rule ip t c ct state established accept; nft delete table ip t");
    let host_before = conntrack_values(None);
    let ns_before = conntrack_values(Some(&ns));
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    // No conntrack section: nothing changes (least privilege).
    run_with_config(&ns, head, "kube-wasm-proxy starting");
    assert_eq!(conntrack_values(Some(&ns)), ns_before);

    // Everything set: the per-namespace timeouts change here; the node-wide
    // maximum (400000 > the kernel's) cannot be written from a namespace:
    // a warning names it, and the rest is applied all the same.
    let config = format!(
        "{head}conntrack:\n  maxPerCore: 200000\n  min: 0\n  tcpEstablishedTimeout: 1h\n  \
         tcpCloseWaitTimeout: 2m\n  udpTimeout: 45s\n  udpStreamTimeout: 150s\n  tcpBeLiberal: true\n"
    );
    let cpus: u64 = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .unwrap()
        .trim()
        .split(',')
        .map(|p| {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
        })
        .sum();
    let logs = run_with_config(&ns, &config, "conntrack settings applied");
    let warning = logs
        .lines()
        .find(|l| l.contains("cannot apply conntrack setting"))
        .unwrap_or_else(|| panic!("no warning in\n{logs}"));
    assert!(
        warning.contains("nf_conntrack_max")
            && warning.contains(&format!("value={}", 200_000 * cpus))
            && warning.contains("node-wide"),
        "{warning}"
    );
    let after = conntrack_values(Some(&ns));
    assert_eq!(
        after[1..],
        ["3600", "120", "45", "150", "1"].map(String::from),
        "{after:?}"
    );
    assert_eq!(after[0], ns_before[0], "nf_conntrack_max unchanged");
    assert_eq!(
        conntrack_values(None),
        host_before,
        "the host's values stay"
    );
}
