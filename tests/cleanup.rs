//! `--cleanup` against real kernel rules in a network namespace: kwp's own
//! (made by the binary in nftables and iptables mode, plus the userspace
//! and IPVS modes' leftovers), upstream kube-proxy-shaped ones in both
//! iptables backends and families, and foreign ones that must come out
//! byte-identical.

use crate::common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_kube-wasm-proxy");

fn kwp_in(ns: &Netns, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, BIN])
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("runs")
}

/// Everything cleanup could touch, as text: the nftables ruleset (the
/// iptables-nft rules included), the legacy iptables tables, the links and
/// their addresses. Comment lines (timestamps) are dropped.
fn snapshot(ns: &Netns) -> String {
    ns.sh(
        "nft list ruleset; \
         for t in filter nat mangle; do iptables-legacy-save -t $t; ip6tables-legacy-save -t $t; done; \
         ip -o link show; ip -o addr show",
    )
    .lines()
    .filter(|l| !l.starts_with('#'))
    .map(|l| format!("{l}\n"))
    .collect()
}

/// Rules that belong to neither proxy, in both backends and families,
/// and an interface with an address.
const FOREIGN: &str = "
nft add table inet foreign
nft add chain inet foreign input '{ type filter hook input priority 0; }'
nft add rule inet foreign input tcp dport 22 accept
for t in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy; do
  $t -t filter -N MY-CHAIN
  $t -t filter -A MY-CHAIN -p tcp --dport 2222 -m comment --comment 'admin: -j KUBE-SERVICES is not this' -j ACCEPT
  $t -t filter -A INPUT -j MY-CHAIN
  $t -t filter -N KUBE-FIREWALL
  $t -t filter -A KUBE-FIREWALL -p tcp --dport 9 -j DROP
  $t -t filter -A INPUT -j KUBE-FIREWALL
  $t -t nat -N KUBE-KUBELET-CANARY
  $t -t nat -A POSTROUTING -o lo -j RETURN
  $t -t mangle -A PREROUTING -p udp --dport 9 -j RETURN
  # iptables-nft makes a built-in chain when a rule first goes in and
  # leaves it (empty, policy accept) when it is flushed: as on any node
  # where rules ever ran, they exist beforehand.
  for c in filter:FORWARD filter:OUTPUT nat:PREROUTING nat:OUTPUT; do
    $t -t ${c%%:*} -A ${c#*:} -j RETURN; $t -t ${c%%:*} -D ${c#*:} -j RETURN
  done
done
ip link add other0 type veth peer name other1
ip addr add 192.0.2.1/32 dev other0
";

/// kube-proxy's leftovers as its iptables, IPVS and nftables modes leave
/// them (names, jumps and comments as upstream writes them).
const KUBE_PROXY: &str = r#"
nft add table ip kube-proxy
nft add chain ip kube-proxy services
nft add table ip6 kube-proxy
nft add chain ip6 kube-proxy services
for t in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy; do
$t-restore --noflush <<'EOF'
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-QRSTUVWXYZ234567 - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -p tcp -m tcp --dport 80 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-QRSTUVWXYZ234567
-A KUBE-SEP-QRSTUVWXYZ234567 -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
EOF
done
"#;

/// What a killed userspace-mode kwp and an IPVS-mode kwp leave, and kwp
/// chains in the backend the binary did not choose. This kernel has no
/// dummy interfaces: kube-ipvs0 is a veth here (deleted by name all the
/// same, its peer with it).
const KWP_OTHER_MODES: &str = "
nft add table ip kube-wasm-proxy-userspace
nft add chain ip kube-wasm-proxy-userspace services
ip link add kube-ipvs0 type veth peer name kube-ipvs0-peer
ip addr add 10.96.0.10/32 dev kube-ipvs0
for t in iptables-legacy ip6tables-legacy; do
  $t -t nat -N KWP-SHAPED-SERVICES
  $t -t nat -A KWP-SHAPED-SERVICES -p tcp --dport 80 -j RETURN
  $t -t nat -A OUTPUT -j KWP-SHAPED-SERVICES
done
";

fn objects_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("objects.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus:\n  addresses: [{type: InternalIP, address: 192.0.2.1}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: e2e}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: p, port: 80}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-0, namespace: e2e, labels: {kubernetes.io/service-name: web}}\n\
addressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]\n",
    )
    .unwrap();
    dir
}

/// Runs the proxy in `mode` until `done` holds, then `meanwhile`, then
/// kills it (SIGKILL: nothing of it gets to tidy up, as after a crash or a
/// node reboot).
fn run_proxy_until(ns: &Netns, mode: &str, done: impl Fn(&str) -> bool, meanwhile: impl FnOnce()) {
    let dir = objects_dir();
    let source = format!("file:{}", dir.path().display());
    let mut child = ns.spawn(
        BIN,
        &[
            "--proxy-mode",
            mode,
            "--source",
            &source,
            "--hostname-override",
            "node-1",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ],
    );
    let logs = common::Logs::capture(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&snapshot(ns)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{mode} proxy never programmed the kernel:\n{}", logs.text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // While it runs, cleanup refuses: the proxy would put it all back.
    let refused = kwp_in(ns, &["--cleanup"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("another kube-wasm-proxy"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    meanwhile();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn cleanup_removes_kwps_and_then_kube_proxys_rules_and_leaves_foreign_ones_byte_identical() {
    let ns = Netns::new("kwp-cleanup");
    ns.sh(FOREIGN);
    let foreign_only = snapshot(&ns);

    ns.sh(KWP_OTHER_MODES);
    ns.sh(KUBE_PROXY);
    // The switch-over: kube-proxy's leftovers go while kwp runs; kwp's
    // own (and the shared kube-ipvs0) stay.
    run_proxy_until(
        &ns,
        "nftables",
        |s| s.contains("table ip kube-wasm-proxy {"),
        || {
            let out = kwp_in(&ns, &["--cleanup-kube-proxy"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let s = snapshot(&ns);
            for gone in [
                "kube-proxy",
                "KUBE-SVC-",
                "KUBE-SEP-",
                "KUBE-PROXY-CANARY",
                "KUBE-FORWARD",
            ] {
                assert!(!s.contains(gone), "{gone} left:\n{s}");
            }
            for kept in [
                "table ip kube-wasm-proxy ",
                "KWP-SHAPED-SERVICES",
                "kube-ipvs0",
                "KUBE-FIREWALL",
            ] {
                assert!(s.contains(kept), "{kept} removed:\n{s}");
            }
        },
    );
    run_proxy_until(&ns, "iptables", |s| s.contains("KWP-SERVICES"), || ());
    // The proxy used one backend (and deleted stale KWP- chains there):
    // leftovers of a run on the other backend, in both families.
    ns.sh(
        "for t in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy; do
           $t -t nat -N KWP-LEFTOVER; $t -t nat -A KWP-LEFTOVER -j RETURN
           $t -t nat -A OUTPUT -j KWP-LEFTOVER
         done",
    );
    // kube-proxy ran again (a rollback, say).
    ns.sh(KUBE_PROXY);
    let dirty = snapshot(&ns);
    for present in [
        "table ip kube-wasm-proxy ",
        "table ip kube-wasm-proxy-userspace",
        "KWP-SERVICES",
        "KWP-LEFTOVER",
        "kube-ipvs0",
        "table ip kube-proxy",
        "KUBE-SVC-ABCDEFGHIJKLMNOP",
    ] {
        assert!(dirty.contains(present), "setup lacks {present}:\n{dirty}");
    }

    // kwp's own, in every mode; kube-proxy's stay.
    let out = kwp_in(&ns, &["--cleanup"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed interface kube-ipvs0"), "{stdout}");
    let after = snapshot(&ns);
    for gone in ["kube-wasm-proxy", "KWP-", "kube-ipvs0", "10.96.0.10"] {
        assert!(!after.contains(gone), "{gone} left:\n{after}");
    }
    for kept in [
        "table ip kube-proxy",
        "KUBE-SVC-ABCDEFGHIJKLMNOP",
        "KUBE-FORWARD",
    ] {
        assert!(after.contains(kept), "{kept} removed:\n{after}");
    }

    // With --cleanup-kube-proxy, upstream's go too: what is left is
    // exactly the foreign state, byte for byte.
    let out = kwp_in(&ns, &["--cleanup", "--cleanup-kube-proxy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&ns), foreign_only);

    // Again: nothing to do, quietly (no IPVS in this kernel is no warning).
    let out = kwp_in(&ns, &["--cleanup", "--cleanup-kube-proxy"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nothing to remove\n");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "{stderr}"
    );
}
