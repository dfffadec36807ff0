//! Graceful termination and the host-applied settings against the
//! in-memory kernel, with connection counts the tests set.

use std::time::Duration;

use super::fake::FakeIpvs;
use super::tests::{apply, dataplane, key, reals, sa, service};
use super::*;
use crate::model::Protocol;
use crate::plan::Item;

fn conns(fake: &FakeIpvs, vip: &str, real: &str, n: u32) {
    fake.state().connections.insert((key(vip), sa(real)), n);
}

const VIP: &str = "10.0.0.1:80";
const A: &str = "10.1.0.1:80";
const B: &str = "10.1.0.2:80";

#[test]
fn a_removed_tcp_real_server_drains_at_weight_zero_until_its_connections_end() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let both = service(VIP, "rr", &[(A, 1), (B, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&both))]).refused.is_empty());
    conns(&fake, VIP, B, 3);
    fake.take_calls();

    let only_a = service(VIP, "rr", &[(A, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&only_a))]).refused.is_empty());
    assert_eq!(
        reals(&fake, VIP),
        vec![(sa(A), 1), (sa(B), 0)],
        "B stays, with no new connections"
    );
    assert_eq!(
        fake.take_calls(),
        (1, 1),
        "one count dump, one weight change"
    );

    // Still connected: a resync keeps it (and does not restore weight 1).
    dp.resync().expect("resync");
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1), (sa(B), 0)]);

    conns(&fake, VIP, B, 0);
    dp.resync().expect("resync");
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1)], "deleted once drained");
    assert!(dp.draining.is_empty());
}

#[test]
fn a_server_without_connections_goes_at_once_and_udp_or_sctp_never_drain() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let tcp = service(VIP, "rr", &[(A, 1), (B, 1)]);
    let udp_vip = "10.0.0.2:53";
    let udp = Fragment {
        items: vec![
            Item::IpvsVirtualServer {
                address: sa(udp_vip),
                protocol: Protocol::Udp,
                scheduler: "rr".into(),
                persistence_timeout: 0,
            },
            Item::IpvsRealServer {
                virtual_address: sa(udp_vip),
                protocol: Protocol::Udp,
                address: sa(A),
                weight: 1,
            },
        ]
        .into(),
    };
    assert!(
        apply(&mut dp, &[("t", Some(&tcp)), ("u", Some(&udp))])
            .refused
            .is_empty()
    );
    let udp_key = VirtualKey {
        address: sa(udp_vip),
        protocol: Protocol::Udp,
    };
    fake.state().connections.insert((udp_key, sa(A)), 7);
    fake.take_calls();

    let tcp_a = service(VIP, "rr", &[(A, 1)]);
    let udp_none = Fragment {
        items: vec![udp.items[0].clone()].into(),
    };
    assert!(
        apply(&mut dp, &[("t", Some(&tcp_a)), ("u", Some(&udp_none))])
            .refused
            .is_empty()
    );
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1)], "no connections: gone");
    let s = fake.state();
    assert!(
        s.services[&udp_key].1.is_empty(),
        "UDP: gone despite 7 flows"
    );
    drop(s);
    assert_eq!(
        fake.take_calls(),
        (2, 1),
        "two deletes; only the TCP server's counts were read"
    );
    assert!(dp.draining.is_empty());
}

#[test]
fn a_draining_server_is_deleted_when_its_timeout_passes() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    dp.drain_timeout = Duration::ZERO;
    let both = service(VIP, "rr", &[(A, 1), (B, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&both))]).refused.is_empty());
    conns(&fake, VIP, B, 3);
    let only_a = service(VIP, "rr", &[(A, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&only_a))]).refused.is_empty());
    assert_eq!(reals(&fake, VIP).len(), 2, "drains first");
    dp.resync().expect("resync");
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1)], "timed out: deleted");
}

#[test]
fn a_draining_server_that_comes_back_is_reweighted_in_one_call() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let both = service(VIP, "rr", &[(A, 1), (B, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&both))]).refused.is_empty());
    conns(&fake, VIP, B, 3);
    let only_a = service(VIP, "rr", &[(A, 1)]);
    assert!(apply(&mut dp, &[("a", Some(&only_a))]).refused.is_empty());
    fake.take_calls();
    assert!(apply(&mut dp, &[("a", Some(&both))]).refused.is_empty());
    // The drain check reads B's counts (one dump); B goes back to 1.
    assert_eq!(fake.take_calls(), (1, 1));
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1), (sa(B), 1)]);
    assert!(dp.draining.is_empty());
    conns(&fake, VIP, B, 0);
    dp.resync().expect("resync");
    assert_eq!(reals(&fake, VIP).len(), 2, "no longer draining: kept");
}

#[test]
fn a_restart_drains_what_the_new_plan_no_longer_has() {
    let fake = FakeIpvs::new();
    let both = service(VIP, "rr", &[(A, 1), (B, 1)]);
    let mut first = dataplane(&fake, None);
    assert!(apply(&mut first, &[("a", Some(&both))]).refused.is_empty());
    drop(first);
    conns(&fake, VIP, B, 2);
    let mut second = dataplane(&fake, None);
    let only_a = service(VIP, "rr", &[(A, 1)]);
    assert!(
        apply(&mut second, &[("a", Some(&only_a))])
            .refused
            .is_empty()
    );
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1), (sa(B), 0)]);
    conns(&fake, VIP, B, 0);
    second.resync().expect("resync");
    assert_eq!(reals(&fake, VIP), vec![(sa(A), 1)]);
}

#[test]
fn strict_arp_and_timeouts_are_set_at_reconcile_only_when_they_differ() {
    let fake = FakeIpvs::new();
    let settings = IpvsSettings {
        strict_arp: true,
        timeouts: Timeouts {
            tcp: 1000,
            tcp_fin: 0,
            udp: 30,
        },
        exclude_cidrs: Vec::new(),
    };
    let mut dp = dataplane(&fake, None).with_settings(settings);
    fake.take_calls();
    assert!(apply(&mut dp, &[]).refused.is_empty());
    let (changes, _) = fake.take_calls();
    assert_eq!(changes, 2, "kube-ipvs0 created, timeouts set");
    {
        let s = fake.state();
        assert_eq!(
            s.timeouts,
            Timeouts {
                tcp: 1000,
                tcp_fin: 120,
                udp: 30
            },
            "tcpFinTimeout 0 leaves the kernel's 120 s"
        );
        for (name, value) in [
            ("net/ipv4/conf/all/arp_ignore", "1"),
            ("net/ipv4/conf/all/arp_announce", "2"),
        ] {
            assert_eq!(s.sysctls.get(name).map(String::as_str), Some(value));
        }
    }
    dp.resync().expect("resync");
    assert_eq!(fake.take_calls().0, 0, "nothing differs: nothing written");

    // Without strictARP, the ARP sysctls are not touched.
    let plain = FakeIpvs::new();
    let mut dp = dataplane(&plain, None);
    assert!(apply(&mut dp, &[]).refused.is_empty());
    assert!(
        !plain
            .state()
            .sysctls
            .contains_key("net/ipv4/conf/all/arp_ignore")
    );
    assert_eq!(plain.state().timeouts.tcp, 900, "timeouts left alone");
}

#[test]
fn exclude_cidrs_keep_stale_virtual_servers_of_ours_in_place() {
    let fake = FakeIpvs::new();
    let kept = service("10.9.0.1:80", "rr", &[(A, 1)]);
    let stale = service("10.0.0.9:80", "rr", &[(A, 1)]);
    let mut first = dataplane(&fake, None);
    assert!(
        apply(&mut first, &[("k", Some(&kept)), ("s", Some(&stale))])
            .refused
            .is_empty()
    );
    drop(first);
    let settings = IpvsSettings {
        exclude_cidrs: vec!["10.9.0.0/16".parse().expect("cidr")],
        ..IpvsSettings::default()
    };
    let mut second = dataplane(&fake, None).with_settings(settings);
    let other = service(VIP, "rr", &[(A, 1)]);
    assert!(
        apply(&mut second, &[("o", Some(&other))])
            .refused
            .is_empty()
    );
    let s = fake.state();
    assert!(
        s.services.contains_key(&key("10.9.0.1:80")),
        "excluded: kept"
    );
    assert!(
        !s.services.contains_key(&key("10.0.0.9:80")),
        "ours: cleaned"
    );
}
