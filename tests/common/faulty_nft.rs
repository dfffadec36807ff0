//! A node in nftables (or iptables) mode on a file source whose `nft` can be made to
//! misbehave: a wrapper first on the proxy's PATH (failing, hanging), or
//! no `nft` on its PATH at all. Five Services whose endpoints move with a
//! round number, and the model's verdict on the node's table
//! (common/model). Used by tests/kernel_faults.rs and tests/tool_missing.rs.

use std::path::Path;
use std::time::Duration;

use super::fixtures::TestService;
use super::model::{self, Api, Iptables, Kernel, Viewpoint};
use super::node_proxy::{CONFIG, Proxy, http_get, launch_in_env};
use super::topology::{CLIENT_IP, Cluster, NODE_IP};
use super::write;

pub const METRICS: &str = "127.0.0.1:10249";

/// A wrapper named `nft` in `dir`: `body` runs first with `$n`, the call
/// number; the real nft runs unless it exits.
pub fn wrapper(dir: &Path, body: &str) {
    let count = dir.join("count");
    let script = format!(
        "#!/bin/sh\nn=$(( $(cat {c} 2>/dev/null || echo 0) + 1 )); echo $n > {c}\n{body}\nexec /usr/sbin/nft \"$@\"\n",
        c = count.display()
    );
    let nft = dir.join("nft");
    std::fs::write(&nft, script).unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

pub fn calls(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("count"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Five Services whose endpoints move with `round`.
pub fn services(c: &Cluster, round: usize) -> Vec<TestService<'_>> {
    services_n(c, round, 5)
}

/// `n` such Services (s0..; cluster IPs 10.96.30.1.., node ports 30200..).
pub fn services_n(c: &Cluster, round: usize, n: usize) -> Vec<TestService<'_>> {
    let pods = ["pod-a", "pod-b", "pod-c", "pod-d"];
    (0..n)
        .map(|i| {
            let chosen: Vec<&str> = pods
                .iter()
                .enumerate()
                .filter(|(j, _)| (round + i + j) % 3 != 0)
                .map(|(_, p)| *p)
                .collect();
            TestService::new(c, &format!("s{i}"), &format!("10.96.30.{}", i + 1))
                .node_port(30200 + i as i32)
                .pods(&chosen)
        })
        .collect()
}

/// The proxy in nftables mode on a file source holding `objects`, with
/// `wrap` first on its PATH and every change sent through `nft`.
pub fn start(c: &Cluster, wrap: &Path, objects: &str) -> Proxy {
    let path = format!(
        "{}:{}",
        wrap.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    start_with_path(c, &path, objects)
}

/// `start` with this PATH.
pub fn start_with_path(c: &Cluster, path: &str, objects: &str) -> Proxy {
    start_mode_with_path(c, "nftables", path, objects)
}

/// `start_with_path` in `mode` (nftables or iptables).
pub fn start_mode_with_path(c: &Cluster, mode: &str, path: &str, objects: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let objects_dir = dir.path().join("objects");
    std::fs::create_dir(&objects_dir).unwrap();
    write(&objects_dir, "node.yaml", &Cluster::node_yaml());
    write(&objects_dir, "objects.yaml", objects);
    // Element changes go over netlink and would bypass the faulty `nft`:
    // send every change through it, the path these faults are about.
    let env = [format!("PATH={path}"), "KWP_NFT_ELEMENTS_VIA_NFT=1".into()];
    launch(
        c,
        mode,
        dir,
        &objects_dir,
        &env,
        (METRICS, "127.0.0.1:10256"),
    )
}

/// The proxy on the objects in `objects_dir` (its config file beside
/// them), with `env`, serving (metrics, healthz) there ("" for none).
fn launch(
    c: &Cluster,
    mode: &str,
    dir: tempfile::TempDir,
    objects_dir: &Path,
    env: &[String],
    (metrics, healthz): (&str, &str),
) -> Proxy {
    let config = objects_dir.parent().unwrap().join("config.conf");
    std::fs::write(&config, CONFIG).unwrap();
    let source = format!("file:{}", objects_dir.display());
    launch_in_env(
        c,
        dir,
        env,
        &[
            "--proxy-mode",
            mode,
            "--source",
            &source,
            "--config",
            config.to_str().unwrap(),
            "--hostname-override",
            "node-1",
            "--min-sync-period",
            "50ms",
            "--sync-period",
            "2s",
            "--metrics-bind-address",
            metrics,
            "--healthz-bind-address",
            healthz,
        ],
    )
}

/// The model's verdict on the node's table for `svcs`.
pub fn report(c: &Cluster, svcs: &[TestService]) -> model::Report {
    report_in(c, "nftables", svcs)
}

/// The model's verdict on what `mode` wrote for `svcs`: kwp's nftables
/// table, or the node's IPv4 iptables ruleset.
pub fn report_in(c: &Cluster, mode: &str, svcs: &[TestService]) -> model::Report {
    let api = Api {
        services: svcs.iter().map(|s| s.service.clone()).collect(),
        slices: svcs.iter().map(|s| s.slice.clone()).collect(),
        node: serde_yaml_ng::from_str(&Cluster::node_yaml()).ok(),
    };
    let view = Viewpoint {
        node_name: "node-1".into(),
        client_v4: CLIENT_IP.parse().unwrap(),
        client_v6: "2001:db8:1::2".parse().unwrap(),
        in_interface: "eth-cli".into(),
    };
    if mode == "iptables" {
        let mut k = Iptables::default();
        k.local_addresses = vec![NODE_IP.parse().unwrap()];
        k.add_save(false, &c.node.sh("iptables-save"))
            .expect("the node's iptables-save");
        return model::check(&api, &view, &k).expect("checker");
    }
    let mut k = Kernel::default();
    k.local_addresses = vec![NODE_IP.parse().unwrap()];
    let json = c
        .node
        .sh("nft -j list table ip kube-wasm-proxy 2>/dev/null || true");
    if !json.trim().is_empty() {
        k.add_json(&json).expect("kwp's table");
    }
    model::check(&api, &view, &k).expect("checker")
}

pub fn metric(c: &Cluster, name: &str) -> f64 {
    let (_, body) = http_get(&c.node, METRICS.parse().unwrap(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every frontend of `svcs` still reaches the endpoints of some version:
/// whatever failed or is being retried, never a partial table.
pub fn all_captured(c: &Cluster, svcs: &[TestService]) {
    let r = report(c, svcs);
    assert!(
        r.mismatches
            .iter()
            .all(|m| !m.kernel.contains(&model::Outcome::NotCaptured)),
        "a frontend fell out of the table: {}",
        r.summary(10)
    );
}

pub fn converges(c: &Cluster, svcs: &[TestService], within: Duration) {
    converges_in(c, "nftables", svcs, within);
}

/// `converges` for what `mode` wrote.
pub fn converges_in(c: &Cluster, mode: &str, svcs: &[TestService], within: Duration) {
    let mut last = String::new();
    let ok = super::poll::until(within, || {
        let r = report_in(c, mode, svcs);
        last = r.summary(10);
        r.mismatches.is_empty() && r.known.is_empty() && r.frontends == 2 * svcs.len()
    });
    assert!(ok, "the kernel never matched the model: {last}");
}

/// The proxy again on `objects` (a directory `start` made, moved out of
/// its proxy's temporary directory) in `mode`, without health or
/// metrics servers.
pub fn restart_in(c: &Cluster, mode: &str, wrap: &Path, objects: &Path) -> Proxy {
    let path = format!(
        "PATH={}:{}",
        wrap.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    launch(
        c,
        mode,
        tempfile::tempdir().unwrap(),
        objects,
        &[path],
        ("", ""),
    )
}

/// A PATH on which `nft` is only `dir/nft`: `dir` gets a link to every
/// other program of /usr/sbin (conntrack, modprobe, ...) and one named
/// `nft` to the real one, which `hide_nft` and `show_nft` remove and put
/// back; /usr/sbin and /sbin are left off.
pub fn path_with_removable_nft(dir: &Path) -> String {
    for entry in std::fs::read_dir("/usr/sbin").unwrap().flatten() {
        let _ = std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()));
    }
    format!("{}:/usr/local/bin:/usr/bin", dir.display())
}

pub fn hide_nft(dir: &Path) {
    hide(dir, &["nft"]);
}

pub fn show_nft(dir: &Path) {
    show(dir, &["nft"]);
}

/// Removes the links `names` (programs of /usr/sbin) from a directory
/// `path_with_removable_nft` filled.
pub fn hide(dir: &Path, names: &[&str]) {
    for name in names {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
}

/// Puts them back.
pub fn show(dir: &Path, names: &[&str]) {
    for name in names {
        std::os::unix::fs::symlink(Path::new("/usr/sbin").join(name), dir.join(name)).unwrap();
    }
}
