//! Cleanup against the in-memory kernels: kwp's and upstream-shaped
//! leftovers in every mode, foreign objects that must survive unchanged.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::*;
use crate::dataplane::iptables::fake::FakeIptables;
use crate::dataplane::ipvs::fake::FakeIpvs;
use crate::dataplane::ipvs::kernel::VirtualServer;
use crate::dataplane::nftables::fake::FakeNft;
use crate::model::Protocol;

/// Deletes the fake IPVS kernel's `kube-ipvs0`.
struct FakeLinks(FakeIpvs);

impl LinkKernel for FakeLinks {
    fn delete_link(&mut self, name: &str) -> Result<bool> {
        assert_eq!(name, LINK_NAME);
        Ok(self.0.state().link.take().is_some())
    }
}

const NAT_V4: &str = "*nat
:KWP-SERVICES - [0:0]
:KWP-SVC-WEB - [0:0]
:KWP-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEF - [0:0]
:KUBE-SEP-123456 - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:MY-CHAIN - [0:0]
-A PREROUTING -j KWP-SERVICES
-A OUTPUT -j KWP-SERVICES
-A POSTROUTING -j KWP-POSTROUTING
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A PREROUTING -j MY-CHAIN
-A KWP-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -j KWP-SVC-WEB
-A KWP-SVC-WEB -j DNAT --to-destination 10.1.0.1:8080
-A KWP-POSTROUTING -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -j KUBE-SVC-ABCDEF
-A KUBE-SVC-ABCDEF -j KUBE-SEP-123456
-A KUBE-SEP-123456 -j KUBE-MARK-MASQ
-A KUBE-SEP-123456 -p tcp -j DNAT --to-destination 10.1.0.1:8080
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -j MASQUERADE
-A MY-CHAIN -s 192.0.2.0/24 -j ACCEPT
COMMIT
";

const FILTER_V4: &str = "*filter
:KWP-FORWARD - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A FORWARD -j KWP-FORWARD
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 22 -j ACCEPT
-A KWP-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FIREWALL -d 127.0.0.0/8 -j DROP
COMMIT
";

const NAT_V6: &str = "*nat
:KWP-SERVICES - [0:0]
-A OUTPUT -j KWP-SERVICES
-A KWP-SERVICES -d fd00::10/128 -j ACCEPT
COMMIT
";

const MANGLE_V4: &str = "*mangle
:KUBE-PROXY-CANARY - [0:0]
:KUBE-IPTABLES-HINT - [0:0]
COMMIT
";

fn iptables_with_leftovers() -> FakeIptables {
    let ipt = FakeIptables::default();
    ipt.preload(false, "nat", NAT_V4);
    ipt.preload(false, "filter", FILTER_V4);
    ipt.preload(true, "nat", NAT_V6);
    ipt.preload(false, "mangle", MANGLE_V4);
    ipt
}

fn nft_with_leftovers() -> FakeNft {
    let nft = FakeNft::default();
    nft.preload(
        "add table ip kube-wasm-proxy\nadd chain ip kube-wasm-proxy services\n\
         add table ip6 kube-wasm-proxy\nadd chain ip6 kube-wasm-proxy services\n\
         add table ip kube-wasm-proxy-userspace\nadd chain ip kube-wasm-proxy-userspace services\n\
         add table ip kube-proxy\nadd chain ip kube-proxy services\n\
         add table ip6 kube-proxy\nadd chain ip6 kube-proxy services\n\
         add table ip firewalld\nadd chain ip firewalld input\nadd rule ip firewalld input tcp dport 22 accept\n",
    );
    nft
}

fn vs(addr: &str, protocol: Protocol) -> VirtualServer {
    VirtualServer {
        key: VirtualKey {
            address: addr.parse().unwrap(),
            protocol,
        },
        scheduler: "rr".into(),
        persistence_timeout: 0,
    }
}

/// kube-ipvs0 holds 10.96.0.10; the node is 192.168.1.10; kwp recorded
/// one node port; upstream left another; two servers are someone else's.
fn ipvs_with_leftovers() -> FakeIpvs {
    let ipvs = FakeIpvs::new();
    let mut k = ipvs.clone();
    k.ensure_link().unwrap();
    k.bind("10.96.0.10".parse().unwrap()).unwrap();
    ipvs.state().node_addresses = ["192.168.1.10".parse().unwrap()].into();
    for (addr, p) in [
        ("10.96.0.10:80", Protocol::Tcp),
        ("10.96.0.10:53", Protocol::Udp),
        ("192.168.1.10:30080", Protocol::Tcp),
        ("192.168.1.10:31000", Protocol::Tcp),
        ("192.168.1.10:8080", Protocol::Tcp),
        ("203.0.113.7:443", Protocol::Tcp),
    ] {
        k.add_service(&vs(addr, p)).unwrap();
    }
    ipvs
}

fn kernels(nft: &FakeNft, ipt: &FakeIptables, ipvs: &FakeIpvs, record: Option<PathBuf>) -> Kernels {
    Kernels {
        nft: Some(Box::new(nft.clone())),
        iptables: vec![("iptables-fake".into(), Box::new(ipt.clone()))],
        ipvs: Some(Box::new(ipvs.clone())),
        links: Box::new(FakeLinks(ipvs.clone())),
        ipvs_record: record,
    }
}

/// A node with every kind of leftover, and kwp's record of node port
/// 30080.
struct Node {
    nft: FakeNft,
    ipt: FakeIptables,
    ipvs: FakeIpvs,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn dirty() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("ipvs-virtual-servers");
        std::fs::write(&record, "tcp 192.168.1.10:30080\n").unwrap();
        Self {
            nft: nft_with_leftovers(),
            ipt: iptables_with_leftovers(),
            ipvs: ipvs_with_leftovers(),
            record,
            _dir: dir,
        }
    }

    /// Cleans `scope`; returns the report, which must hold no error.
    fn clean(&self, scope: Scope) -> Report {
        let record = Some(self.record.clone());
        let report = cleanup(
            &mut kernels(&self.nft, &self.ipt, &self.ipvs, record),
            scope,
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report
    }
}

fn chains(ipt: &FakeIptables, ipv6: bool, table: &str) -> BTreeSet<String> {
    parse_save(&ipt.clone().save(ipv6, table).unwrap())
        .into_keys()
        .collect()
}

fn services(ipvs: &FakeIpvs) -> BTreeSet<SocketAddr> {
    ipvs.state().services.keys().map(|k| k.address).collect()
}

#[test]
fn kwp_cleanup_removes_kwps_objects_in_every_mode_and_nothing_else() {
    let node = Node::dirty();
    let report = node.clean(Scope::KWP);
    let (nft, ipt, ipvs, record) = (&node.nft, &node.ipt, &node.ipvs, &node.record);

    let dump = nft.dump();
    assert!(!dump.contains("kube-wasm-proxy"), "{dump}");
    assert!(dump.contains("ip kube-proxy chain services"), "{dump}");
    assert!(dump.contains("ip6 kube-proxy chain services"), "{dump}");
    assert!(dump.contains("ip firewalld chain input"), "{dump}");

    let nat = chains(&ipt, false, "nat");
    assert!(nat.iter().all(|c| !c.starts_with("KWP-")), "{nat:?}");
    for kept in ["KUBE-SERVICES", "KUBE-SVC-ABCDEF", "MY-CHAIN"] {
        assert!(nat.contains(kept), "{kept} removed: {nat:?}");
    }
    let prerouting = ipt.rules(false, "nat", "PREROUTING").unwrap();
    assert_eq!(
        prerouting,
        vec![
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-j MY-CHAIN"
        ]
    );
    assert!(!chains(&ipt, false, "filter").contains("KWP-FORWARD"));
    assert!(!chains(&ipt, true, "nat").contains("KWP-SERVICES"));
    assert_eq!(
        ipt.rules(true, "nat", "OUTPUT").unwrap(),
        Vec::<String>::new()
    );

    // IPVS: the kube-ipvs0 servers and the recorded node port; the link
    // and the record go too.
    let left = services(&ipvs);
    let want: BTreeSet<SocketAddr> = ["192.168.1.10:31000", "192.168.1.10:8080", "203.0.113.7:443"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(left, want);
    assert!(ipvs.state().link.is_none());
    assert!(!record.exists());
    assert!(
        report
            .removed
            .contains(&"IPVS virtual server tcp 10.96.0.10:80".to_string()),
        "{:?}",
        report.removed
    );
}

#[test]
fn kube_proxy_scope_also_removes_upstreams_leftovers_but_not_the_kubelets() {
    let node = Node::dirty();
    let (nft, ipt, ipvs) = (&node.nft, &node.ipt, &node.ipvs);
    let filter_before = ipt.rules(false, "filter", "INPUT").unwrap();
    node.clean(Scope::BOTH);
    let dump = nft.dump();
    assert!(!dump.contains("kube-proxy"), "{dump}");
    assert!(dump.contains("ip firewalld chain input: tcp dport 22 accept"));

    let nat = chains(&ipt, false, "nat");
    let want: BTreeSet<String> = [
        "PREROUTING",
        "INPUT",
        "OUTPUT",
        "POSTROUTING",
        "KUBE-KUBELET-CANARY",
        "MY-CHAIN",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(nat, want);
    assert_eq!(
        ipt.rules(false, "nat", "PREROUTING").unwrap(),
        vec!["-j MY-CHAIN"]
    );
    assert_eq!(
        ipt.rules(false, "nat", "MY-CHAIN").unwrap(),
        vec!["-s 192.0.2.0/24 -j ACCEPT"]
    );
    // The kubelet's KUBE-FIREWALL and its jump, and the admin's rule, stay.
    let filter = chains(&ipt, false, "filter");
    assert!(filter.contains("KUBE-FIREWALL"), "{filter:?}");
    assert!(!filter.contains("KUBE-FORWARD") && !filter.contains("KUBE-PROXY-FIREWALL"));
    assert_eq!(
        ipt.rules(false, "filter", "INPUT").unwrap(),
        filter_before
            .into_iter()
            .filter(|r| !r.contains("KUBE-PROXY-FIREWALL"))
            .collect::<Vec<_>>()
    );
    let mangle = chains(&ipt, false, "mangle");
    assert!(!mangle.contains("KUBE-PROXY-CANARY") && mangle.contains("KUBE-IPTABLES-HINT"));

    // Upstream's node port on a node address goes; a node address outside
    // the node-port range and a foreign address stay.
    let left = services(&ipvs);
    let want: BTreeSet<SocketAddr> = ["192.168.1.10:8080", "203.0.113.7:443"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(left, want);
}

#[test]
fn a_node_without_ipvs_or_nft_or_leftovers_is_cleaned_quietly() {
    let ipt = FakeIptables::default();
    let ipvs = FakeIpvs::new();
    let mut k = Kernels {
        nft: None,
        iptables: vec![("iptables-fake".into(), Box::new(ipt.clone()))],
        ipvs: None,
        links: Box::new(FakeLinks(ipvs)),
        ipvs_record: None,
    };
    let report = cleanup(&mut k, Scope::BOTH);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    assert_eq!(ipt.restores(), 0, "nothing to remove, nothing restored");
}

#[test]
fn a_refused_step_is_reported_and_the_others_still_run() {
    let node = Node::dirty();
    let (nft, ipt, ipvs) = (&node.nft, &node.ipt, &node.ipvs);
    ipt.refuse("-X KWP-FORWARD");
    let report = cleanup(&mut kernels(nft, ipt, ipvs, None), Scope::KWP);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("filter"),
        "names the table: {}",
        report.errors[0]
    );
    // The refused table is as it was (all or nothing); the rest is clean.
    assert!(chains(&ipt, false, "filter").contains("KWP-FORWARD"));
    assert!(!chains(&ipt, false, "nat").contains("KWP-SERVICES"));
    assert!(!nft.dump().contains("kube-wasm-proxy"));
    assert!(ipvs.state().link.is_none());
}

#[test]
fn jump_targets_are_read_from_the_rule_not_from_comments() {
    assert_eq!(
        rule_target("-m comment --comment \"see -j X\" -j KWP-A"),
        Some("KWP-A")
    );
    assert_eq!(
        rule_target("-j MARK --set-xmark 0x4000/0x4000"),
        Some("MARK")
    );
    assert_eq!(rule_target("-p tcp -g KUBE-SVC-1"), Some("KUBE-SVC-1"));
    assert_eq!(rule_target("-p tcp -j ACCEPT"), Some("ACCEPT"));
    assert_eq!(rule_target("-p tcp"), None);
}

#[test]
fn kube_proxy_scope_alone_leaves_a_running_kwps_objects_be() {
    let node = Node::dirty();
    node.clean(Scope::KUBE_PROXY);
    let (nft, ipt, ipvs, record) = (&node.nft, &node.ipt, &node.ipvs, &node.record);
    let dump = nft.dump();
    assert!(!dump.contains("kube-proxy"), "{dump}");
    assert!(dump.contains("ip kube-wasm-proxy chain services"), "{dump}");
    assert!(dump.contains("ip kube-wasm-proxy-userspace chain services"));
    let nat = chains(&ipt, false, "nat");
    assert!(nat.contains("KWP-SERVICES") && nat.contains("KWP-SVC-WEB"));
    assert!(!nat.contains("KUBE-SERVICES") && !nat.contains("KUBE-SEP-123456"));
    assert_eq!(
        ipt.rules(false, "nat", "PREROUTING").unwrap(),
        vec!["-j KWP-SERVICES", "-j MY-CHAIN"]
    );
    // Only upstream's unrecorded node port goes; kube-ipvs0, its servers,
    // kwp's recorded node port and the record stay.
    let gone: SocketAddr = "192.168.1.10:31000".parse().unwrap();
    let left = services(&ipvs);
    assert!(!left.contains(&gone) && left.len() == 5, "{left:?}");
    assert!(ipvs.state().link.is_some());
    assert!(record.exists());
}
