//! The binary as a user runs it: `--help`, `--dry-run`, bad flags.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::Netns;

fn kwp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs")
}

#[test]
fn help_lists_the_kube_proxy_flags() {
    let out = kwp(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--proxy-mode",
        "--hostname-override",
        "--healthz-bind-address",
        "--metrics-bind-address",
        "--min-sync-period",
        "--sync-period",
        "--source",
        "--plugin-dir",
        "--lb-policy",
        "--dry-run",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn dry_run_prints_a_readable_plan_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]\n",
    )
    .unwrap();
    let source = format!("file:{}", dir.path().display());
    let out = kwp(&[
        "--dry-run",
        "--source",
        &source,
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# service shop/web:http/tcp"), "{stdout}");
    assert!(
        stdout.contains("endpoints [10.1.0.1:8080, 10.1.0.2:8080]"),
        "{stdout}"
    );
    assert!(stdout.contains("policy round-robin"), "{stdout}");
    assert!(
        stdout.contains("listen tcp for service #1 frontends [10.96.0.10:80]"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = kwp(&["--source", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --source"));
    let out = kwp(&[
        "--source",
        "file:/tmp",
        "--lb-policy",
        "no-such-policy",
        "--dry-run",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no plugin named \"no-such-policy\""), "{err}");
}

/// Issue 16's bad flags: each one is refused at start-up, before anything
/// is applied, with an error naming the flag (exit code 1).
#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let source = format!("file:{}", dir.path().display());
    let config = dir.path().join("zero.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nsyncPeriod: 0s\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--cluster-cidr", "10.244.0.0/16 } accept #"],
            "--cluster-cidr: ",
        ),
        (&["--cluster-cidr", "10.244.0.0/33"], "--cluster-cidr: "),
        (&["--cluster-cidr", "not-a-cidr"], "--cluster-cidr: "),
        (
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "br0\" accept #",
            ],
            "--pod-bridge-interface: ",
        ),
        (&["--sync-period", "99999999999999999999h"], "--sync-period"),
        (
            &["--sync-period", "0s"],
            "--sync-period: must be greater than 0",
        ),
        (&["--config", config], "syncPeriod: must be greater than 0"),
        (
            &["--no-redirect"],
            "--no-redirect applies to --proxy-mode userspace only",
        ),
        (&["--hostname-override", "node_1"], "--hostname-override: "),
    ];
    for (bad, expected) in cases {
        let mut args = vec![
            "--proxy-mode",
            "nftables",
            "--dry-run",
            "--source",
            &source,
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ];
        if !bad.contains(&"--hostname-override") {
            args.extend(["--hostname-override", "node-1"]);
        }
        args.extend_from_slice(bad);
        let out = kwp(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "{bad:?} accepted or crashed: {:?}\n{err}",
            out.status
        );
        assert!(!err.contains("panicked"), "{bad:?} panicked: {err}");
        assert!(
            err.contains(expected),
            "{bad:?}: expected {expected:?} in: {err}"
        );
        assert!(out.stdout.is_empty(), "{bad:?}: a plan was printed");
    }
}

/// Two rule-writing instances in one network namespace: the second
/// refuses to start, naming the lock, and the first keeps running.
#[test]
fn a_second_instance_on_the_node_refuses_to_start() {
    let ns = Netns::new("kwp-lock");
    let dir = tempfile::tempdir().unwrap();
    let source = format!("file:{}", dir.path().display());
    let args = [
        "--proxy-mode",
        "nftables",
        "--source",
        &source,
        "--hostname-override",
        "node-1",
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
    ];
    let bin = env!("CARGO_BIN_EXE_kube-wasm-proxy");
    let mut first = ns.spawn(bin, &args);
    wait_for_lock(&ns, &mut first, "the first instance");
    let second = ns.spawn(bin, &args);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(second.wait_with_output()));
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the second instance kept running")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another kube-wasm-proxy already programs this node's rules")
            && err.contains("@kube-wasm-proxy/node-rules"),
        "{err}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first instance must keep running"
    );
    let _ = first.kill();
    let _ = first.wait();
    // Released with the process: a new instance starts.
    let mut third = ns.spawn(bin, &args);
    wait_for_lock(&ns, &mut third, "an instance started after the kill");
    let _ = third.kill();
    let _ = third.wait();
}

/// Waits until `child` holds the node lock (its abstract socket is listed
/// in the namespace's /proc/net/unix), failing if it exits first.
fn wait_for_lock(ns: &Netns, child: &mut std::process::Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ns
        .sh("cat /proc/net/unix")
        .contains("@kube-wasm-proxy/node-rules")
    {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("{what} exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "{what} never took the lock");
        std::thread::sleep(Duration::from_millis(100));
    }
}
