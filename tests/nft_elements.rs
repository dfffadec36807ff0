//! Element-only deltas over nf_tables netlink leave the kernel exactly as
//! the same deltas through `nft` do: the same series of changes runs in two
//! private network namespaces, one per path, and `nft list table` must be
//! byte-identical after every step, for every set and map kind the
//! nftables plugin declares (plugins/nftables/src/base.rs, service.rs), in
//! IPv4 and IPv6. A refused batch leaves nothing behind and names the set.
//! Needs root.

use std::process::Command;

use kwp::dataplane::Dataplane;
use kwp::dataplane::nftables::NftDataplane;
use kwp::model::{Protocol, ServicePortName};
use kwp::plan::{Fragment, Item, NftFamily};

const T: &str = "kwp-elements";

struct Fam {
    family: NftFamily,
    l3: &'static str,
    addr: &'static str,
    /// Address `n` of block `b` in this family.
    ip: fn(u8, u8) -> String,
}

const V4: Fam = Fam {
    family: NftFamily::Ip,
    l3: "ip",
    addr: "ipv4_addr",
    ip: |b, n| format!("10.{b}.0.{n}"),
};
const V6: Fam = Fam {
    family: NftFamily::Ip6,
    l3: "ip6",
    addr: "ipv6_addr",
    ip: |b, n| format!("fd00:{b}::{n}"),
};

impl Fam {
    fn set(&self, name: &str, declaration: String) -> Item {
        Item::NftSet {
            family: self.family,
            table: T.into(),
            name: name.into(),
            declaration,
        }
    }
    fn chain(&self, name: &str, rules: &[String]) -> Item {
        Item::NftChain {
            family: self.family,
            table: T.into(),
            name: name.into(),
            hook: None,
            rules: rules.to_vec(),
        }
    }
    fn element(&self, set: &str, element: String) -> Item {
        Item::NftElement {
            family: self.family,
            table: T.into(),
            set: set.into(),
            element,
        }
    }
}

/// The plugin's sets and maps, with the chains their verdicts name.
fn base() -> Fragment {
    let mut items = Vec::new();
    for f in [V4, V6] {
        let (l3, addr) = (f.l3, f.addr);
        let frontend = format!("{addr} . inet_proto . inet_service");
        for (name, declaration) in [
            ("service-ips", format!("type {frontend} : verdict")),
            ("no-endpoint-services", format!("type {frontend} : verdict")),
            (
                "service-nodeports",
                "type inet_proto . inet_service : verdict".into(),
            ),
            (
                "no-endpoint-nodeports",
                "type inet_proto . inet_service : verdict".into(),
            ),
            ("nodeport-ips", format!("type {addr}")),
            ("masq-services", format!("type {frontend}")),
            ("cluster-ips", format!("type {frontend}")),
            ("masq-nodeports", "type inet_proto . inet_service".into()),
            ("hairpin", format!("type {addr} . {addr}")),
            // IPVS mode's filter half: keys of one field are not padded.
            ("health-check-node-ports", "type inet_service".into()),
        ] {
            items.push(f.set(name, declaration));
        }
        for (prefix, key) in [
            ("", format!("{l3} daddr . meta l4proto . th dport")),
            ("np-", "meta l4proto . th dport".to_string()),
        ] {
            items.push(f.set(
                &format!("{prefix}backends-3"),
                format!("typeof {key} . numgen random mod 3 : {l3} daddr . th dport"),
            ));
            items.push(f.chain(
                &format!("{prefix}class-3"),
                &[format!("meta l4proto {{ tcp, udp, sctp }} dnat {l3} to {key} . numgen random mod 3 map @{prefix}backends-3")],
            ));
        }
        items.push(f.chain("reject-chain", &["reject".into()]));
        items.push(f.chain("svc-x", &["drop".into()]));
    }
    Fragment {
        items: items.into(),
    }
}

/// Service `n` with node port, its three slots starting at endpoint
/// `first`, in every set and map of both families.
fn service(n: u8, first: u8) -> Fragment {
    let mut items = Vec::new();
    for f in [V4, V6] {
        let frontend = format!("{} . tcp . 80", (f.ip)(96, n));
        let np = 30000 + u16::from(n);
        let eps: Vec<String> = (first..first + 3).map(|e| (f.ip)(244, e)).collect();
        items.push(f.element("service-ips", format!("{frontend} : goto class-3")));
        items.push(f.element(
            "service-ips",
            format!("{} . udp . 53 : goto svc-x", (f.ip)(96, n)),
        ));
        items.push(f.element(
            "no-endpoint-services",
            format!("{} . sctp . 80 : drop", (f.ip)(97, n)),
        ));
        items.push(f.element(
            "no-endpoint-services",
            format!("{} . tcp . 81 : goto reject-chain", (f.ip)(97, n)),
        ));
        items.push(f.element("service-nodeports", format!("tcp . {np} : goto np-class-3")));
        items.push(f.element(
            "no-endpoint-nodeports",
            format!("udp . {np} : goto reject-chain"),
        ));
        items.push(f.element("nodeport-ips", (f.ip)(1, n)));
        items.push(f.element("masq-services", frontend.clone()));
        items.push(f.element("cluster-ips", format!("{} . udp . 53", (f.ip)(96, n))));
        items.push(f.element("masq-nodeports", format!("tcp . {np}")));
        items.push(f.element("health-check-node-ports", format!("{}", np + 2000)));
        for (j, ep) in eps.iter().enumerate() {
            let port = 8080 + u16::from(first);
            items.push(f.element("backends-3", format!("{frontend} . {j} : {ep} . {port}")));
            items.push(f.element("np-backends-3", format!("tcp . {np} . {j} : {ep} . {port}")));
            items.push(f.element("hairpin", format!("{ep} . {ep}")));
        }
    }
    Fragment {
        items: items.into(),
    }
}

fn name(n: u8) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: format!("s{n}").into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn listing() -> String {
    let mut all = String::new();
    for family in ["ip", "ip6"] {
        let out = Command::new("nft")
            .args(["list", "table", family, T])
            .output()
            .expect("nft runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all
}

/// What one path leaves in a fresh namespace after each step, the refused
/// batch's error, and how many element batches went over netlink.
fn run(via_nft: bool) -> (Vec<String>, String, u64) {
    std::thread::spawn(move || {
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let mut dp = NftDataplane::new(T).elements_via_nft(via_nft);
        let mut steps = Vec::new();
        let (a, a_moved, b) = (service(1, 1), service(1, 2), service(2, 7));
        dp.apply(Some(&base()), &[(name(1), Some(&a))])
            .expect("first sync");
        steps.push(listing());
        for change in [
            (name(1), Some(&a_moved)), // slots move: deletes and adds
            (name(2), Some(&b)),       // a Service appears
            (name(1), None),           // and one goes
        ] {
            dp.apply(None, &[change]).expect("element delta");
            steps.push(listing());
        }
        // An element for a chain that does not exist, beside good ones.
        let mut bad: Vec<Item> = service(3, 20).items.to_vec();
        bad.push(V4.element(
            "service-ips",
            "10.96.0.3 . tcp . 443 : goto missing-chain".into(),
        ));
        let bad = Fragment { items: bad.into() };
        let error = dp
            .apply(None, &[(name(3), Some(&bad))])
            .expect_err("refused");
        steps.push(listing());
        (steps, format!("{error:#}"), dp.element_batches)
    })
    .join()
    .expect("the test thread")
}

#[test]
fn netlink_and_nft_leave_identical_kernel_state() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (a private network namespace and nft)"
    );
    let (netlink, netlink_error, batches) = run(false);
    let (nft, nft_error, none) = run(true);
    assert_eq!(
        (batches, none),
        (4, 0),
        "netlink path used for every delta, nft path never"
    );
    for (i, (n, t)) in netlink.iter().zip(&nft).enumerate() {
        assert_eq!(n, t, "step {i}: netlink and nft left different tables");
    }
    // Sanity: the steps did change something, and the v6 slots are there.
    assert_ne!(netlink[0], netlink[1]);
    assert!(
        netlink[1].contains("fd00:96::1 . tcp . 80 . 2 : fd00:244::4 . 8082"),
        "{}",
        netlink[1]
    );
    // The refused batch left the table as it was and says why, and where.
    assert_eq!(
        netlink[3], netlink[4],
        "a refused batch left something behind"
    );
    assert!(
        netlink_error.contains("service-ips")
            && netlink_error.contains("No such file or directory"),
        "{netlink_error}"
    );
    assert!(
        netlink_error.contains("nothing was applied"),
        "{netlink_error}"
    );
    eprintln!("netlink: {netlink_error}\nnft: {nft_error}");
}
