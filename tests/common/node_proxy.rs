//! A kube-wasm-proxy in the node namespace of a namespace cluster (see
//! `topology`), on a file source, and the YAML and assertions the kernel
//! mode tests share.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use super::topology::{Cluster, Outcome, POD_PORT};
use super::write;

pub struct Proxy {
    pub child: Child,
    _dir: tempfile::TempDir,
    pub dir: std::path::PathBuf,
    /// Everything the proxy logged so far.
    pub logs: super::Logs,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16,fd00:10:244::/48\n";

/// Starts the proxy in the node namespace on a file source holding `objects`.
pub fn start(cluster: &Cluster, objects: &str) -> Proxy {
    start_with(cluster, objects, CONFIG, &Cluster::node_yaml())
}

/// Like `start`, with its own KubeProxyConfiguration and Node.
pub fn start_with(cluster: &Cluster, objects: &str, config_text: &str, node_yaml: &str) -> Proxy {
    start_full(cluster, objects, config_text, node_yaml, &[])
}

pub fn start_full(
    cluster: &Cluster,
    objects: &str,
    config_text: &str,
    node_yaml: &str,
    extra: &[&str],
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    write(&path, "node.yaml", node_yaml);
    write(&path, "objects.yaml", objects);
    let config = path.join("config.conf");
    std::fs::write(&config, config_text).unwrap();
    let source = format!("file:{}/objects", path.display());
    std::fs::create_dir(path.join("objects")).unwrap();
    std::fs::rename(path.join("node.yaml"), path.join("objects/node.yaml")).unwrap();
    std::fs::rename(path.join("objects.yaml"), path.join("objects/objects.yaml")).unwrap();
    let mut args = vec![
        "--source",
        &source,
        "--config",
        config.to_str().unwrap(),
        "--hostname-override",
        "node-1",
        "--min-sync-period",
        "50ms",
    ];
    // Defaults the caller may override.
    for (flag, value) in [
        ("--proxy-mode", "nftables"),
        ("--sync-period", "2s"),
        ("--healthz-bind-address", ""),
        ("--metrics-bind-address", ""),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let proxy = launch_in(cluster, dir, &args);
    if extra.contains(&"iptables") {
        // The jump from the built-in chain, not the chain: a staged
        // reconcile declares the chains first and makes them reachable
        // last, in the restore that writes the dispatch.
        eventually("the proxy's chains, reachable", || {
            cluster
                .node
                // Legacy tables present: the proxy may have chosen that backend.
                .sh("iptables-save -t nat; if grep -q . /proc/net/ip_tables_names; then iptables-legacy-save -t nat; fi")
                .contains("-j KWP-SERVICES")
        });
        return proxy;
    }
    eventually("the proxy's table", || {
        cluster
            .node
            .sh("nft list tables")
            .contains("kube-wasm-proxy")
    });
    proxy
}

/// Starts the proxy with `args` in the node namespace, owning `dir`; does
/// not wait for anything.
pub fn launch_in(cluster: &Cluster, dir: tempfile::TempDir, args: &[&str]) -> Proxy {
    launch_in_env(cluster, dir, &[], args)
}

/// Like `launch_in`, with `NAME=VALUE` settings in the proxy's environment
/// only (`env` execs the proxy: the child's pid is the proxy's).
pub fn launch_in_env(
    cluster: &Cluster,
    dir: tempfile::TempDir,
    env: &[String],
    args: &[&str],
) -> Proxy {
    let path = dir.path().to_path_buf();
    let mut full: Vec<&str> = env.iter().map(String::as_str).collect();
    full.push(env!("CARGO_BIN_EXE_kube-wasm-proxy"));
    full.extend_from_slice(args);
    let mut child = cluster.node.spawn("env", &full);
    let logs = super::Logs::capture(&mut child);
    Proxy {
        child,
        _dir: dir,
        dir: path.join("objects"),
        logs,
    }
}

pub use super::poll::eventually;

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// A Service, its EndpointSlice over the named pods, one port 80 -> 8080.
pub fn service(
    cluster: &Cluster,
    name: &str,
    ip: &str,
    spec: &str,
    pods: &[&str],
    proto: &str,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: {ip}\n{spec}  ports: [{{name: p, port: 80, protocol: {proto}, targetPort: {POD_PORT}{np}}}]\n",
        np = spec_node_port(spec),
    );
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {POD_PORT}, protocol: {proto}}}]\nendpoints:\n"
    ));
    for pod in pods {
        let p = cluster.pod(pod);
        let node = if p.local { "node-1" } else { "node-2" };
        y.push_str(&format!(
            "- {{addresses: ['{}'], nodeName: {node}, conditions: {{ready: true}}}}\n",
            p.ip
        ));
    }
    y + "---\n"
}

/// `# nodePort: N` in a spec becomes the port's nodePort.
pub fn spec_node_port(spec: &str) -> String {
    spec.lines()
        .find_map(|l| l.trim().strip_prefix("# nodePort: "))
        .map(|n| format!(", nodePort: {n}"))
        .unwrap_or_default()
}

pub fn answered_by(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Answered(pod, _) => pod.clone(),
            other => panic!("connection failed: {other:?} in {outcomes:?}"),
        })
        .collect()
}

pub fn many(n: usize, f: impl Fn() -> Outcome) -> Vec<Outcome> {
    (0..n).map(|_| f()).collect()
}

/// The HTTP status of `GET path` at `addr` from inside `ns` (0 if no answer).
pub fn http_status(ns: &super::netns::Netns, addr: SocketAddr, path: &str) -> u16 {
    http_get(ns, addr, path).0
}

/// `GET path` at `addr` from inside `ns`: (status, body); (0, "") if no answer.
pub fn http_get(ns: &super::netns::Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ns.run_in(move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut text = String::new();
        if s.write_all(request.as_bytes()).is_err() || s.read_to_string(&mut text).is_err() {
            return (0, String::new());
        }
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

/// An EndpointSlice of Service `service` (port `p`) for one address family
/// (`IPv4` or `IPv6`) over the named pods.
pub fn family_slice(cluster: &Cluster, service: &str, family: &str, pods: &[&str]) -> String {
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{}, namespace: t, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{{name: p, port: {POD_PORT}, protocol: TCP}}]\nendpoints:\n",
        family.to_lowercase()
    );
    for pod in pods {
        let p = cluster.pod(pod);
        let ip = if family == "IPv6" {
            p.ip6.clone()
        } else {
            p.ip.to_string()
        };
        let node = if p.local { "node-1" } else { "node-2" };
        y.push_str(&format!("- {{addresses: ['{ip}'], nodeName: {node}}}\n"));
    }
    y
}

/// Service `web` at `ip` over pod-a and pod-c, with the weighted policy
/// giving pod-a weight 3 (pod-c the default 1).
pub fn weighted_service(cluster: &Cluster, ip: &str) -> String {
    let a = cluster.pod("pod-a").ip;
    service(cluster, "web", ip, "", &["pod-a", "pod-c"], "TCP").replacen(
        "metadata: {name: web, namespace: t}",
        &format!("metadata: {{name: web, namespace: t, annotations: {{kube-wasm-proxy.io/lb-policy: weighted, kube-wasm-proxy.io/lb-policy-config: '{a}=3'}}}}"),
        1,
    )
}

/// 200 connections from pod-b to `ip`:80 split about 3 : 1 between pod-a and pod-c.
pub fn assert_three_to_one(cluster: &Cluster, ip: &str) {
    use super::topology::tcp_from;
    let outcomes = many(200, || tcp_from(&cluster.pod("pod-b").ns, addr(ip, 80)));
    let on_a = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Answered(p, _) if p == "pod-a"))
        .count();
    assert_eq!(answered_by(&outcomes).len(), 2);
    // 3 : 1 is 150 of 200; allow for randomness.
    assert!(
        (125..=175).contains(&on_a),
        "{on_a} of 200 on the weight-3 pod"
    );
}

/// `--dry-run` of `mode` in the node namespace on a file source holding
/// `objects` and the Node, with `CONFIG`: its standard output.
pub fn dry_run(cluster: &Cluster, mode: &str, objects: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", objects);
    write(dir.path(), "node.yaml", &Cluster::node_yaml());
    let source = format!("file:{}", dir.path().display());
    let config = dir.path().join("config.conf").display().to_string();
    std::fs::write(&config, CONFIG).unwrap();
    let out = cluster.node.spawn(
        env!("CARGO_BIN_EXE_kube-wasm-proxy"),
        &[
            "--proxy-mode",
            mode,
            "--dry-run",
            "--source",
            &source,
            "--hostname-override",
            "node-1",
            "--config",
            &config,
        ],
    );
    let out = out.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
