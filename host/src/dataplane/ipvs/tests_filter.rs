//! The IPVS dataplane composed with the nftables dataplane for the
//! packet-filter items, against both in-memory kernels: apply, delta,
//! adoption, refusals keeping a Service's last good state on both sides,
//! foreign objects untouched.

use super::fake::FakeIpvs;
use super::tests::{key, name, reals, sa};
use super::*;
use crate::dataplane::nftables::NftDataplane;
use crate::dataplane::nftables::fake::FakeNft;
use crate::model::Protocol;
use crate::plan::{Item, NftFamily};

const T: &str = "kwp";

fn set(name: &str, declaration: &str) -> Item {
    Item::NftSet {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        declaration: declaration.into(),
    }
}

fn element(set: &str, element: &str) -> Item {
    Item::NftElement {
        family: NftFamily::Ip,
        table: T.into(),
        set: set.into(),
        element: element.into(),
    }
}

/// A cut-down IPVS-mode base: the cluster-IP set and the chain using it.
fn base() -> Fragment {
    Fragment {
        items: vec![
            set("cluster-ips", "type ipv4_addr . inet_proto . inet_service"),
            set("ipvs-ips", "type ipv4_addr"),
            Item::NftChain {
                family: NftFamily::Ip,
                table: T.into(),
                name: "services".into(),
                hook: Some("type nat hook prerouting priority dstnat".into()),
                rules: vec![
                    "ip daddr . meta l4proto . th dport @cluster-ips meta mark set 0x4000".into(),
                ],
            },
        ]
        .into(),
    }
}

/// Service on 10.0.0.`ip`:`port` with one real server of weight `w`: its
/// virtual server, real server and set elements.
fn service(ip: u8, port: u16, w: u32) -> Fragment {
    let vip = sa(&format!("10.0.0.{ip}:{port}"));
    Fragment {
        items: vec![
            Item::IpvsVirtualServer {
                address: vip,
                protocol: Protocol::Tcp,
                scheduler: "rr".into(),
                persistence_timeout: 0,
            },
            Item::IpvsRealServer {
                virtual_address: vip,
                protocol: Protocol::Tcp,
                address: sa(&format!("10.1.0.{ip}:8080")),
                weight: w,
            },
            element("cluster-ips", &format!("10.0.0.{ip} . tcp . {port}")),
            element("ipvs-ips", &format!("10.0.0.{ip}")),
        ]
        .into(),
    }
}

fn composed(ipvs: &FakeIpvs, nft: &FakeNft) -> IpvsDataplane {
    IpvsDataplane::with_kernel(Box::new(ipvs.clone()), None).with_filter(Box::new(
        NftDataplane::with_kernel(T, Box::new(nft.clone())),
    ))
}

fn sync(
    dp: &mut IpvsDataplane,
    base: Option<&Fragment>,
    changes: &[(&str, Option<&Fragment>)],
) -> Applied {
    let changed: Vec<_> = changes.iter().map(|(n, f)| (name(n), *f)).collect();
    dp.apply(base, &changed).expect("apply")
}

fn cluster_ips(nft: &FakeNft) -> Vec<String> {
    nft.elements("ip", T, "cluster-ips").unwrap_or_default()
}

#[test]
fn filter_items_apply_beside_ipvs_items_and_a_delta_sends_only_the_change() {
    let (ipvs, nft) = (FakeIpvs::new(), FakeNft::default());
    let mut dp = composed(&ipvs, &nft);
    let (a, b) = (service(1, 80, 1), service(2, 80, 1));
    let applied = sync(&mut dp, Some(&base()), &[("a", Some(&a)), ("b", Some(&b))]);
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    assert_eq!(
        cluster_ips(&nft),
        ["10.0.0.1 . tcp . 80", "10.0.0.2 . tcp . 80"]
    );
    assert_eq!(reals(&ipvs, "10.0.0.1:80"), vec![(sa("10.1.0.1:8080"), 1)]);
    let (runs, _) = nft.counts();

    // A weight change touches IPVS only: no nft transaction.
    ipvs.take_calls();
    assert!(
        sync(&mut dp, None, &[("a", Some(&service(1, 80, 3)))])
            .refused
            .is_empty()
    );
    assert_eq!(nft.counts().0, runs, "no filter change, no transaction");
    assert_eq!(ipvs.take_calls(), (1, 0));

    // A port change: one nft transaction; b's element is untouched.
    assert!(
        sync(&mut dp, None, &[("a", Some(&service(1, 81, 3)))])
            .refused
            .is_empty()
    );
    assert_eq!(nft.counts().0, runs + 1);
    assert_eq!(
        cluster_ips(&nft),
        ["10.0.0.1 . tcp . 81", "10.0.0.2 . tcp . 80"]
    );
    assert!(ipvs.state().services.contains_key(&key("10.0.0.1:81")));

    // A removal takes both halves away.
    assert!(sync(&mut dp, None, &[("a", None)]).refused.is_empty());
    assert_eq!(cluster_ips(&nft), ["10.0.0.2 . tcp . 80"]);
    assert_eq!(
        nft.elements("ip", T, "ipvs-ips").unwrap_or_default(),
        ["10.0.0.2"]
    );
    assert!(!ipvs.state().services.contains_key(&key("10.0.0.1:81")));
}

#[test]
fn a_new_instance_adopts_the_filter_and_removes_only_its_own_stale_objects() {
    let (ipvs, nft) = (FakeIpvs::new(), FakeNft::default());
    nft.preload("add table ip other\nadd chain ip other keep\nadd rule ip other keep accept\n");
    let mut first = composed(&ipvs, &nft);
    let (a, b) = (service(1, 80, 1), service(2, 80, 1));
    assert!(
        sync(
            &mut first,
            Some(&base()),
            &[("a", Some(&a)), ("b", Some(&b))]
        )
        .refused
        .is_empty()
    );
    drop(first);

    // The next instance no longer has b: its first sync reconciles both
    // kernels in place (one nft transaction, no flush of the table).
    let mut second = composed(&ipvs, &nft);
    let (runs, _) = nft.counts();
    ipvs.take_calls();
    assert!(
        sync(&mut second, Some(&base()), &[("a", Some(&a))])
            .refused
            .is_empty()
    );
    assert_eq!(nft.counts().0, runs + 1);
    assert_eq!(cluster_ips(&nft), ["10.0.0.1 . tcp . 80"]);
    assert_eq!(
        ipvs.take_calls().0,
        2,
        "IPVS: delete b's server, unbind its address"
    );
    assert_eq!(
        nft.rules("ip", "other", "keep"),
        Some(vec!["accept".to_string()]),
        "a foreign table is untouched"
    );
}

#[test]
fn an_ipvs_failure_puts_the_services_filter_part_back() {
    let (ipvs, nft) = (FakeIpvs::new(), FakeNft::default());
    let mut dp = composed(&ipvs, &nft);
    let (a, b) = (service(1, 80, 1), service(2, 80, 1));
    assert!(
        sync(&mut dp, Some(&base()), &[("a", Some(&a)), ("b", Some(&b))])
            .refused
            .is_empty()
    );

    ipvs.state().fail_on = Some(key("10.0.0.1:81"));
    let applied = sync(
        &mut dp,
        None,
        &[
            ("a", Some(&service(1, 81, 1))),
            ("b", Some(&service(2, 81, 1))),
        ],
    );
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(applied.refused[0].0, Some(name("a")));
    assert_eq!(
        cluster_ips(&nft),
        ["10.0.0.1 . tcp . 80", "10.0.0.2 . tcp . 81"],
        "a's filter part is back to its last good state; b's change is in"
    );
    assert!(ipvs.state().services.contains_key(&key("10.0.0.2:81")));

    ipvs.state().fail_on = None;
    assert!(
        sync(&mut dp, None, &[("a", Some(&service(1, 81, 1)))])
            .refused
            .is_empty()
    );
    assert_eq!(
        cluster_ips(&nft),
        ["10.0.0.1 . tcp . 81", "10.0.0.2 . tcp . 81"]
    );
}

#[test]
fn a_refused_filter_part_keeps_the_services_ipvs_state() {
    let (ipvs, nft) = (FakeIpvs::new(), FakeNft::default());
    let mut dp = composed(&ipvs, &nft);
    let (a, b) = (service(1, 80, 1), service(2, 80, 1));
    assert!(
        sync(&mut dp, Some(&base()), &[("a", Some(&a)), ("b", Some(&b))])
            .refused
            .is_empty()
    );

    nft.refuse("10.0.0.1 . tcp . 81");
    let applied = sync(
        &mut dp,
        None,
        &[
            ("a", Some(&service(1, 81, 1))),
            ("b", Some(&service(2, 81, 1))),
        ],
    );
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(applied.refused[0].0, Some(name("a")));
    assert!(format!("{:#}", applied.refused[0].1).contains("packet filter"));
    let s = ipvs.state();
    assert!(
        s.services.contains_key(&key("10.0.0.1:80")),
        "a's IPVS state kept"
    );
    assert!(!s.services.contains_key(&key("10.0.0.1:81")));
    assert!(s.services.contains_key(&key("10.0.0.2:81")), "b applied");
    drop(s);
    assert_eq!(
        cluster_ips(&nft),
        ["10.0.0.1 . tcp . 80", "10.0.0.2 . tcp . 81"]
    );

    // All or nothing (a reloaded mode's first sync): nothing lands.
    let err = dp
        .apply_all(None, &[(name("a"), Some(&service(1, 81, 1)))])
        .expect_err("refused whole");
    assert!(
        format!("{err:#}").contains("10.0.0.1 . tcp . 81"),
        "{err:#}"
    );
    assert!(!ipvs.state().services.contains_key(&key("10.0.0.1:81")));
}

#[test]
fn without_a_filter_nft_items_are_refused_by_name() {
    let ipvs = FakeIpvs::new();
    let mut dp = IpvsDataplane::with_kernel(Box::new(ipvs.clone()), None);
    let applied = sync(&mut dp, None, &[("a", Some(&service(1, 80, 1)))]);
    assert_eq!(applied.refused.len(), 1);
    assert!(format!("{:#}", applied.refused[0].1).contains("cannot apply"));
    assert!(ipvs.state().services.is_empty());
}
