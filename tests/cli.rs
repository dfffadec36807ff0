//! The binary as a user runs it: `--help`, `--dry-run`, bad flags.

use std::process::Command;

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
