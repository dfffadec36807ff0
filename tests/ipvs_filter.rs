//! IPVS mode's packet-filter helpers through real nft: the binary with
//! `--proxy-mode ipvs --dry-run` renders the bundled plugin's plan and
//! applies its nftables part in a scratch network namespace (the diff
//! against the kernel), so nft itself accepts or refuses every set,
//! chain and element. Needs root (`ip netns`) and nft, as the nftables
//! tests do.

use std::process::Command;

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [10.1.2.3/8]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.1], nodeName: elsewhere}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 53, protocol: UDP}]
";

#[test]
fn nft_accepts_the_ipvs_modes_filter_plan_with_upstreams_set_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.yaml"), SERVICES).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"))
        .args(["--proxy-mode", "ipvs", "--dry-run", "--source"])
        .arg(format!("file:{}", dir.path().display()))
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("run kube-wasm-proxy");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = stdout
        .split("# packet filter: diff against the kernel")
        .nth(1)
        .unwrap_or_else(|| panic!("no packet-filter diff:\n{stdout}"));
    assert!(!diff.contains("cannot compute"), "nft refused:\n{diff}");
    // Lines as nft lists them back from the kernel.
    for want in [
        "ip kube-wasm-proxy: set lb-source-cidrs",
        "198.51.100.1 . tcp . 80 . 10.0.0.0/8",
        "ip kube-wasm-proxy: set lb-no-node-access",
        "ip kube-wasm-proxy: set external-ips-local",
        "ip kube-wasm-proxy: set node-ports-local",
        // ETP Local with its only endpoint elsewhere: drop; no endpoint: reject.
        "203.0.113.7 . tcp . 80 : drop",
        "tcp . 30080 : drop",
        "10.96.0.11 . udp . 53 : goto reject-chain",
        "ip kube-wasm-proxy: chain ipvs-filter",
        "ip kube-wasm-proxy: chain source-ranges",
    ] {
        assert!(diff.contains(want), "diff lacks {want:?}:\n{diff}");
    }
}
