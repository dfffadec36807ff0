//! The IPVS dataplane's reconcile, delta, ownership and refusal logic
//! against the in-memory kernel (no root, milliseconds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::fake::FakeIpvs;
use super::*;
use crate::model::Protocol;
use crate::plan::Item;

pub(super) fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: n.into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

pub(super) fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub(super) fn key(s: &str) -> VirtualKey {
    VirtualKey {
        address: sa(s),
        protocol: Protocol::Tcp,
    }
}

/// A virtual server on `vip` with `scheduler` and real servers (address, weight).
pub(super) fn service(vip: &str, scheduler: &str, reals: &[(&str, u32)]) -> Fragment {
    let mut items = vec![Item::IpvsVirtualServer {
        address: sa(vip),
        protocol: Protocol::Tcp,
        scheduler: scheduler.into(),
        persistence_timeout: 0,
    }];
    items.extend(reals.iter().map(|(a, w)| Item::IpvsRealServer {
        virtual_address: sa(vip),
        protocol: Protocol::Tcp,
        address: sa(a),
        weight: *w,
    }));
    Fragment {
        items: items.into(),
    }
}

pub(super) fn dataplane(fake: &FakeIpvs, record: Option<PathBuf>) -> IpvsDataplane {
    IpvsDataplane::with_kernel(Box::new(fake.clone()), record)
}

pub(super) fn reals(fake: &FakeIpvs, vip: &str) -> Vec<(SocketAddr, u32)> {
    let s = fake.state();
    s.services
        .get(&key(vip))
        .map(|(_, d)| d.iter().map(|(a, w)| (*a, *w)).collect())
        .unwrap_or_default()
}

pub(super) fn apply(dp: &mut IpvsDataplane, changes: &[(&str, Option<&Fragment>)]) -> Applied {
    let changed: Vec<_> = changes.iter().map(|(n, f)| (name(n), *f)).collect();
    dp.apply(None, &changed).expect("apply")
}

#[test]
fn a_new_instance_adopts_the_previous_state_with_no_gap_and_spares_foreign_servers() {
    let fake = FakeIpvs::new();
    let a = service(
        "10.0.0.1:80",
        "rr",
        &[("10.1.0.1:8080", 1), ("10.1.0.2:8080", 1)],
    );
    let mut first = dataplane(&fake, None);
    assert!(apply(&mut first, &[("a", Some(&a))]).refused.is_empty());
    // Someone else's virtual server, and a stale one of ours.
    fake.state().services.insert(
        key("192.0.2.1:443"),
        (
            VirtualServer {
                key: key("192.0.2.1:443"),
                scheduler: "wlc".into(),
                persistence_timeout: 0,
            },
            BTreeMap::new(),
        ),
    );
    let stale = service("10.0.0.9:80", "rr", &[("10.1.0.9:80", 1)]);
    assert!(
        apply(&mut first, &[("stale", Some(&stale))])
            .refused
            .is_empty()
    );
    drop(first);

    let mut second = dataplane(&fake, None);
    fake.take_calls();
    assert!(apply(&mut second, &[("a", Some(&a))]).refused.is_empty());
    let (changes, _) = fake.take_calls();
    // Only the stale server and its address go; `a` is untouched.
    assert_eq!(changes, 2, "delete stale service + unbind its address");
    assert_eq!(reals(&fake, "10.0.0.1:80").len(), 2);
    let s = fake.state();
    assert!(
        s.services.contains_key(&key("192.0.2.1:443")),
        "foreign server kept"
    );
    assert!(!s.services.contains_key(&key("10.0.0.9:80")));
    assert_eq!(
        s.link.clone().unwrap_or_default(),
        BTreeSet::from([sa("10.0.0.1:80").ip()])
    );
}

#[test]
fn changes_cost_calls_proportional_to_the_change() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let many: Vec<Fragment> = (0..50)
        .map(|i| {
            service(
                &format!("10.0.1.{i}:80"),
                "rr",
                &[(&format!("10.2.0.{i}:80"), 1)],
            )
        })
        .collect();
    let names: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let changes: Vec<_> = names
        .iter()
        .zip(&many)
        .map(|(n, f)| (n.as_str(), Some(f)))
        .collect();
    assert!(apply(&mut dp, &changes).refused.is_empty());
    fake.take_calls();

    // One endpoint added to one of 50 Services: one call, no listing.
    let grown = service(
        "10.0.1.7:80",
        "rr",
        &[("10.2.0.7:80", 1), ("10.2.0.77:80", 1)],
    );
    assert!(apply(&mut dp, &[("s7", Some(&grown))]).refused.is_empty());
    assert_eq!(fake.take_calls(), (1, 0));
    // A weight and a scheduler change: one call each.
    let reweighted = service(
        "10.0.1.7:80",
        "wrr",
        &[("10.2.0.7:80", 3), ("10.2.0.77:80", 1)],
    );
    assert!(
        apply(&mut dp, &[("s7", Some(&reweighted))])
            .refused
            .is_empty()
    );
    assert_eq!(fake.take_calls(), (2, 0));
    assert_eq!(
        reals(&fake, "10.0.1.7:80"),
        vec![(sa("10.2.0.7:80"), 3), (sa("10.2.0.77:80"), 1)]
    );
    // A new Service with two endpoints: bind, add service, two destinations.
    let new = service(
        "10.0.9.1:80",
        "rr",
        &[("10.3.0.1:80", 1), ("10.3.0.2:80", 1)],
    );
    assert!(apply(&mut dp, &[("new", Some(&new))]).refused.is_empty());
    assert_eq!(fake.take_calls(), (4, 0));
    // Its removal: delete service, unbind.
    assert!(apply(&mut dp, &[("new", None)]).refused.is_empty());
    assert_eq!(fake.take_calls(), (2, 0));
    assert!(!fake.state().services.contains_key(&key("10.0.9.1:80")));
    assert!(
        !fake
            .state()
            .link
            .clone()
            .unwrap_or_default()
            .contains(&sa("10.0.9.1:80").ip())
    );
}

#[test]
fn a_failing_service_is_refused_alone_keeps_its_last_good_state_and_converges_on_retry() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let a1 = service("10.0.0.1:80", "rr", &[("10.1.0.1:80", 1)]);
    let b = service("10.0.0.2:80", "rr", &[("10.1.0.2:80", 1)]);
    assert!(
        apply(&mut dp, &[("a", Some(&a1)), ("b", Some(&b))])
            .refused
            .is_empty()
    );

    fake.state().fail_on = Some(key("10.0.0.1:80"));
    let a2 = service(
        "10.0.0.1:80",
        "rr",
        &[("10.1.0.1:80", 1), ("10.1.0.3:80", 1)],
    );
    let b2 = service(
        "10.0.0.2:80",
        "rr",
        &[("10.1.0.2:80", 1), ("10.1.0.4:80", 1)],
    );
    let applied = apply(&mut dp, &[("a", Some(&a2)), ("b", Some(&b2))]);
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(applied.refused[0].0, Some(name("a")));
    assert!(format!("{:#}", applied.refused[0].1).contains("Invalid argument"));
    assert_eq!(reals(&fake, "10.0.0.2:80").len(), 2, "b applied");
    assert_eq!(
        reals(&fake, "10.0.0.1:80").len(),
        1,
        "a keeps its last good state"
    );
    assert_eq!(dp.failures, 1);

    fake.state().fail_on = None;
    assert!(apply(&mut dp, &[("a", Some(&a2))]).refused.is_empty());
    assert_eq!(reals(&fake, "10.0.0.1:80").len(), 2, "the retry converges");
}

#[test]
fn resync_repairs_edits_behind_our_back() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let a = service(
        "10.0.0.1:80",
        "rr",
        &[("10.1.0.1:80", 2), ("10.1.0.2:80", 1)],
    );
    assert!(apply(&mut dp, &[("a", Some(&a))]).refused.is_empty());
    {
        let mut s = fake.state();
        let (vs, d) = s.services.get_mut(&key("10.0.0.1:80")).expect("present");
        vs.scheduler = "lc".into();
        d.remove(&sa("10.1.0.2:80"));
        d.insert(sa("10.1.0.1:80"), 9);
        d.insert(sa("10.9.9.9:80"), 1);
        s.link = Some(BTreeSet::new());
    }
    dp.resync().expect("resync");
    let s = fake.state();
    assert_eq!(s.services[&key("10.0.0.1:80")].0.scheduler, "rr");
    drop(s);
    assert_eq!(
        reals(&fake, "10.0.0.1:80"),
        vec![(sa("10.1.0.1:80"), 2), (sa("10.1.0.2:80"), 1)]
    );
    assert!(
        fake.state()
            .link
            .clone()
            .unwrap_or_default()
            .contains(&sa("10.0.0.1:80").ip())
    );
}

#[test]
fn two_services_claiming_one_virtual_server_and_bad_items_are_refused_by_name() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let a = service("10.0.0.1:80", "rr", &[("10.1.0.1:80", 1)]);
    assert!(apply(&mut dp, &[("a", Some(&a))]).refused.is_empty());
    let clash = service("10.0.0.1:80", "rr", &[("10.1.0.5:80", 1)]);
    let applied = apply(&mut dp, &[("clash", Some(&clash))]);
    let msg = format!("{:#}", applied.refused[0].1);
    assert!(msg.contains("t/a") && msg.contains("10.0.0.1:80"), "{msg}");
    assert_eq!(reals(&fake, "10.0.0.1:80"), vec![(sa("10.1.0.1:80"), 1)]);

    let orphan = Fragment {
        items: vec![Item::IpvsRealServer {
            virtual_address: sa("10.0.0.3:80"),
            protocol: Protocol::Tcp,
            address: sa("10.1.0.1:80"),
            weight: 1,
        }]
        .into(),
    };
    let good = service("10.0.0.4:80", "rr", &[]);
    let applied = apply(&mut dp, &[("orphan", Some(&orphan)), ("good", Some(&good))]);
    assert_eq!(applied.refused.len(), 1);
    assert!(format!("{:#}", applied.refused[0].1).contains("unknown virtual server"));
    assert!(fake.state().services.contains_key(&key("10.0.0.4:80")));
}

#[test]
fn node_port_servers_are_not_bound_and_are_recognised_as_ours_by_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("owned");
    let fake = FakeIpvs::new();
    fake.state().node_addresses = BTreeSet::from([sa("192.168.1.5:0").ip()]);
    // Someone else's server on a node address: never ours.
    let foreign = key("192.168.1.5:9999");
    fake.state().services.insert(
        foreign,
        (
            VirtualServer {
                key: foreign,
                scheduler: "rr".into(),
                persistence_timeout: 0,
            },
            BTreeMap::new(),
        ),
    );
    let np = service("192.168.1.5:30080", "rr", &[("10.1.0.1:80", 1)]);
    let mut dp = dataplane(&fake, Some(record.clone()));
    assert!(apply(&mut dp, &[("np", Some(&np))]).refused.is_empty());
    assert!(
        fake.state().link.clone().unwrap_or_default().is_empty(),
        "node address not bound"
    );
    let text = std::fs::read_to_string(&record).expect("record written");
    assert_eq!(text, "tcp 192.168.1.5:30080\n");
    drop(dp);

    // A later instance no longer wants it: deleted as ours; the foreign stays.
    let mut next = dataplane(&fake, Some(record));
    assert!(
        apply(
            &mut next,
            &[("other", Some(&service("10.0.0.1:80", "rr", &[])))]
        )
        .refused
        .is_empty()
    );
    let s = fake.state();
    assert!(!s.services.contains_key(&key("192.168.1.5:30080")));
    assert!(s.services.contains_key(&foreign));
}

#[test]
fn apply_all_restores_the_previous_state_when_any_service_fails() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let a = service("10.0.0.1:80", "rr", &[("10.1.0.1:80", 1)]);
    assert!(apply(&mut dp, &[("a", Some(&a))]).refused.is_empty());
    let a2 = service("10.0.0.1:80", "rr", &[("10.1.0.2:80", 1)]);
    let bad = service("10.0.0.2:80", "no-such-scheduler", &[]);
    let changed = vec![(name("a"), Some(&a2)), (name("bad"), Some(&bad))];
    let err = dp.apply_all(None, &changed).expect_err("refused whole");
    assert!(format!("{err:#}").contains("10.0.0.2:80"), "{err:#}");
    assert_eq!(reals(&fake, "10.0.0.1:80"), vec![(sa("10.1.0.1:80"), 1)]);
    assert!(!fake.state().services.contains_key(&key("10.0.0.2:80")));
}

#[test]
fn the_first_reconcile_sets_upstreams_sysctls_and_conn_reuse_mode_only_on_old_kernels() {
    for (release, reuse) in [
        ("6.1.0-57-cloud-amd64", None),
        ("5.4.0-1", Some("0")),
        // Before 4.1 the sysctl does not exist: left alone, as upstream.
        ("3.10.0-1160.el7.x86_64", None),
    ] {
        let fake = FakeIpvs::new();
        fake.state()
            .sysctls
            .insert("kernel/osrelease".into(), release.into());
        let mut dp = dataplane(&fake, None);
        assert!(apply(&mut dp, &[]).refused.is_empty());
        let s = fake.state();
        for name in [
            "net/ipv4/vs/expire_nodest_conn",
            "net/ipv4/vs/expire_quiescent_template",
            "net/ipv4/vs/conntrack",
            "net/ipv4/ip_forward",
        ] {
            assert_eq!(
                s.sysctls.get(name).map(String::as_str),
                Some("1"),
                "{name} on {release}"
            );
        }
        assert_eq!(
            s.sysctls
                .get("net/ipv4/vs/conn_reuse_mode")
                .map(String::as_str),
            reuse,
            "{release}"
        );
    }
}

#[test]
fn the_first_apply_refuses_a_second_claim_on_a_virtual_server_and_programs_the_rest() {
    let fake = FakeIpvs::new();
    let mut dp = dataplane(&fake, None);
    let a = service("10.0.0.1:80", "rr", &[("10.1.0.1:80", 1)]);
    let b = service("10.0.0.1:80", "rr", &[("10.1.0.2:80", 1)]);
    let c = service("10.0.0.3:80", "rr", &[("10.1.0.3:80", 1)]);
    let applied = apply(
        &mut dp,
        &[("a", Some(&a)), ("b", Some(&b)), ("c", Some(&c))],
    );
    let refused: Vec<_> = applied
        .refused
        .iter()
        .map(|(k, e)| (k.clone(), format!("{e:#}")))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, Some(name("b")));
    assert!(refused[0].1.contains("claimed by both"), "{refused:?}");
    assert_eq!(reals(&fake, "10.0.0.1:80"), vec![(sa("10.1.0.1:80"), 1)]);
    assert_eq!(reals(&fake, "10.0.0.3:80"), vec![(sa("10.1.0.3:80"), 1)]);

    // A new instance where only `b` claims the address takes over what the
    // kernel holds for it.
    let mut dp = dataplane(&fake, None);
    let applied = apply(&mut dp, &[("a", None), ("b", Some(&b)), ("c", Some(&c))]);
    assert!(applied.refused.is_empty());
    assert_eq!(reals(&fake, "10.0.0.1:80"), vec![(sa("10.1.0.2:80"), 1)]);
}
