//! The IPVS dataplane's netlink code against a real IPVS kernel: builds
//! tests/ipvs-probe as a static program, runs it in Debian's cloud kernel
//! under QEMU (scripts/ipvs-vm.sh), and checks what the probe saw and what
//! the kernel itself reports in /proc/net/ip_vs, and a real TCP connection
//! through a virtual server to a listener in a network namespace in the VM;
//! then the whole `IpvsDataplane` (adoption, ownership, deltas) in the VM.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-musl";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds the probe and returns its path.
fn build_probe() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["build", "-p", "kwp-ipvs-probe", "--target", TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the probe failed (is the {TARGET} target installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the probe's executable")
}

/// The lines between `begin` and `end` markers.
fn section<'a>(log: &'a str, begin: &str, end: &str) -> Vec<&'a str> {
    log.lines()
        .skip_while(|l| !l.contains(begin))
        .skip(1)
        .take_while(|l| !l.contains(end))
        .map(str::trim_end)
        .collect()
}

#[test]
fn services_destinations_addresses_and_a_real_connection_through_a_real_ipvs_kernel() {
    let probe = build_probe();
    let started = std::time::Instant::now();
    let out = Command::new(root().join("scripts/ipvs-vm.sh"))
        .arg(&probe)
        .output()
        .expect("run scripts/ipvs-vm.sh");
    if out.status.code() == Some(77) {
        eprintln!(
            "SKIPPED: this machine cannot run the IPVS VM: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let log = String::from_utf8_lossy(&out.stdout);
    eprintln!("VM run took {:?}", started.elapsed());
    assert!(
        log.contains("KWP-VM-IPVS-LOADED"),
        "ip_vs did not load:\n{log}"
    );
    for step in [
        "link",
        "services",
        "destinations",
        "updates",
        "adoption",
        "removal",
    ] {
        assert!(
            log.contains(&format!("PROBE-STEP {step} ok")),
            "step {step} failed:\n{log}"
        );
    }
    assert!(
        log.contains("PROBE-OK") && log.contains("KWP-VM-PROBE-EXIT 0"),
        "{log}"
    );

    // A real connection to a virtual address reached the pod's listener in
    // its own network namespace (and the same address without a virtual
    // server on that port was refused).
    assert!(
        log.contains("PROBE-PACKET 10.96.0.20:80 answered \"pod\" from 10.244.9.2:8080"),
        "{log}"
    );

    // The whole dataplane: adoption by a second instance cost one call (the
    // recorded node port's deletion), and its virtual server carries traffic.
    assert!(log.contains("PROBE-ADOPTION calls 1"), "{log}");
    assert!(
        log.contains("PROBE-DATAPLANE-PACKET 10.96.1.1:80 answered \"pod\""),
        "{log}"
    );
    let end = section(&log, "PROBE-DATAPLANE-BEGIN", "PROBE-DATAPLANE-END").join("\n");
    assert!(end.contains("TCP  0A600101:0050 rr"), "{end}"); // 10.96.1.1:80
    assert!(
        end.contains("TCP  C0000201:01BB rr"),
        "foreign server kept:\n{end}"
    );
    assert!(!end.contains("0AF40901:7580"), "node port kept:\n{end}");

    // What the kernel itself says (addresses and ports in hex).
    let first = section(&log, "PROBE-DUMP-BEGIN", "PROBE-DUMP-END");
    for want in [
        "UDP  0A600035:0035 wrr  persistent", // 10.96.0.53:53, ClientIP affinity
        "-> 0AF40201:0035      Masq    2",
        "TCP  0A60000A:0050 rr",
        "-> 0AF40101:1F90      Masq    1",
        "-> 0AF40102:1F90      Masq    3",
        "-> 0AF40103:1F90      Masq    0", // a draining endpoint
        "TCP  [fd00:0000:0000:0000:0000:0000:0000:0010]:01BB mh",
        "-> [fd00:0244:0000:0000:0000:0000:0000:0001]:20FB      Masq    1",
        "TCP  0A00020F:7580 lc", // a node port
    ] {
        assert!(
            first.iter().any(|l| l.contains(want)),
            "/proc/net/ip_vs lacks {want:?}:\n{}",
            first.join("\n")
        );
    }
    let last = section(&log, "PROBE-FINAL-BEGIN", "PROBE-FINAL-END").join("\n");
    assert!(
        last.contains("TCP  0A60000A:0050 wrr  persistent"),
        "{last}"
    );
    assert!(last.contains("-> 0AF40101:1F90      Masq    5"), "{last}");
    assert!(
        !last.contains("0AF40103"),
        "deleted destination still there:\n{last}"
    );
    assert!(
        !last.contains("0A00020F:7580"),
        "deleted service still there:\n{last}"
    );
}

/// The binary with `--proxy-mode ipvs --dry-run`: the bundled plugin's
/// plan, through the host's validation, as the dataplane would get it.
#[test]
fn the_ipvs_mode_plans_virtual_servers_per_frontend_with_the_policys_scheduler() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, \
         annotations: {kube-wasm-proxy.io/lb-policy: weighted}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  externalIPs: [203.0.113.7]\n  \
         sessionAffinity: ClientIP\n  ports: [{name: http, port: 80, nodePort: 30080}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\n\
         endpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]\n",
    )
    .expect("write");
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
    for want in [
        "ipvs virtual tcp 10.96.0.10:80 scheduler wrr persistent 10800s",
        "ipvs virtual tcp 203.0.113.7:80 scheduler wrr persistent 10800s",
        "ipvs real tcp 10.96.0.10:80 -> 10.1.0.1:8080 weight",
        "ipvs real tcp 10.96.0.10:80 -> 10.1.0.2:8080 weight",
        "ipvs real tcp 203.0.113.7:80 -> 10.1.0.2:8080 weight",
    ] {
        assert!(stdout.contains(want), "plan lacks {want:?}:\n{stdout}");
    }
}
