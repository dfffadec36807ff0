//! The dataplane's delta, reference-count, reconcile and fallback logic
//! against the in-memory kernel (no root, milliseconds).

use super::fake::FakeNft;
use super::*;
use crate::model::Protocol;
use crate::plan::{Item, NftFamily};

const T: &str = "kwp";

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: n.into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn chain(name: &str, rules: &[&str]) -> Item {
    Item::NftChain {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        hook: None,
        rules: rules.iter().map(|r| r.to_string()).collect(),
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

/// The dispatch chain and map, and the shared masquerade chain.
fn base() -> Fragment {
    Fragment {
        items: vec![
            Item::NftSet {
                family: NftFamily::Ip,
                table: T.into(),
                name: "service-ips".into(),
                declaration: "type ipv4_addr . inet_proto . inet_service : verdict".into(),
            },
            chain(
                "services",
                &["ip daddr . meta l4proto . th dport vmap @service-ips"],
            ),
            chain("mark-for-masquerade", &["meta mark set 0x4000"]),
        ]
        .into(),
    }
}

/// Service `n` on cluster IP 10.0.0.`ip`, its chain and map element, and
/// (if `hairpin`) a chain it shares with other Services.
fn service(n: &str, ip: u8, hairpin: bool) -> Fragment {
    let mut items = vec![
        chain(
            &format!("svc-{n}"),
            &["jump mark-for-masquerade", "dnat to 10.1.0.1:80"],
        ),
        element(
            "service-ips",
            &format!("10.0.0.{ip} . tcp . 80 : goto svc-{n}"),
        ),
    ];
    if hairpin {
        items.push(chain("shared-hairpin", &["jump mark-for-masquerade"]));
    }
    Fragment {
        items: items.into(),
    }
}

fn dataplane() -> (NftDataplane, FakeNft) {
    let fake = FakeNft::default();
    (NftDataplane::with_kernel(T, Box::new(fake.clone())), fake)
}

fn dispatch(fake: &FakeNft) -> Vec<String> {
    fake.elements("ip", T, "service-ips").unwrap_or_default()
}

#[test]
fn first_sync_then_one_change_then_removal() {
    let (mut dp, fake) = dataplane();
    let (a, b) = (service("a", 1, false), service("b", 2, false));
    let applied = dp
        .apply(
            Some(&base()),
            &[(name("a"), Some(&a)), (name("b"), Some(&b))],
        )
        .unwrap();
    assert!(applied.refused.is_empty());
    assert_eq!(dispatch(&fake).len(), 2);
    assert_eq!(fake.counts(), (1, 0), "the first sync is one transaction");

    // One change: a delta that touches only that Service.
    let a2 = Fragment {
        items: vec![
            chain("svc-a", &["dnat to 10.1.0.9:80"]),
            element("service-ips", "10.0.0.1 . tcp . 80 : goto svc-a"),
        ]
        .into(),
    };
    dp.apply(None, &[(name("a"), Some(&a2))]).unwrap();
    assert_eq!(
        fake.rules("ip", T, "svc-a").unwrap(),
        ["dnat to 10.1.0.9:80"]
    );
    assert_eq!(
        fake.rules("ip", T, "svc-b").unwrap().len(),
        2,
        "b untouched"
    );

    // Removal: its chain and element go, the rest stays.
    dp.apply(None, &[(name("a"), None)]).unwrap();
    assert_eq!(fake.rules("ip", T, "svc-a"), None);
    assert_eq!(dispatch(&fake), ["10.0.0.2 . tcp . 80 : goto svc-b"]);
    assert_eq!(fake.counts(), (3, 0));
}

#[test]
fn a_shared_object_lives_until_its_last_user_goes() {
    let (mut dp, fake) = dataplane();
    let (a, b) = (service("a", 1, true), service("b", 2, true));
    dp.apply(Some(&base()), &[(name("a"), Some(&a))]).unwrap();
    dp.apply(None, &[(name("b"), Some(&b))]).unwrap();
    dp.apply(None, &[(name("a"), None)]).unwrap();
    assert!(
        fake.rules("ip", T, "shared-hairpin").is_some(),
        "b still uses it"
    );
    dp.apply(None, &[(name("b"), None)]).unwrap();
    assert_eq!(fake.rules("ip", T, "shared-hairpin"), None);
    assert!(
        dp.refs
            .tables()
            .all(|o| !matches!(o, Obj::Chain(_, n) if n == "shared-hairpin"))
    );
    // Shared by two in one batch, then both removed in one batch.
    dp.apply(None, &[(name("a"), Some(&a)), (name("b"), Some(&b))])
        .unwrap();
    dp.apply(None, &[(name("a"), None), (name("b"), None)])
        .unwrap();
    assert_eq!(fake.rules("ip", T, "shared-hairpin"), None);
    assert!(dispatch(&fake).is_empty());
}

#[test]
fn a_refused_delta_is_retried_change_by_change() {
    let (mut dp, fake) = dataplane();
    dp.apply(Some(&base()), &[]).unwrap();
    fake.refuse("svc-bad");
    let (good, bad) = (service("good", 1, false), service("bad", 2, false));
    let applied = dp
        .apply(
            None,
            &[(name("bad"), Some(&bad)), (name("good"), Some(&good))],
        )
        .unwrap();
    let refused: Vec<_> = applied.refused.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(refused, [Some(name("bad"))]);
    assert_eq!(dispatch(&fake), ["10.0.0.1 . tcp . 80 : goto svc-good"]);
    assert!(
        !dp.applied.contains_key(&Some(name("bad"))),
        "the record follows the kernel"
    );
    // All or nothing (a mode on trial) refuses the whole batch.
    let other = service("other", 3, false);
    assert!(
        dp.apply_all(
            None,
            &[(name("other"), Some(&other)), (name("bad"), Some(&bad))]
        )
        .is_err()
    );
    assert_eq!(fake.rules("ip", T, "svc-other"), None);
    // Once the kernel takes it, the retry lands.
    fake.accept_all();
    dp.apply(None, &[(name("bad"), Some(&bad))]).unwrap();
    assert_eq!(dispatch(&fake).len(), 2);
}

/// `nft` missing refuses no Service: a batch fails as a whole (the sync
/// fails and health follows), at once, not once per change.
#[test]
fn a_missing_nft_fails_the_batch_not_each_service() {
    let (mut dp, fake) = dataplane();
    dp.apply(Some(&base()), &[]).unwrap();
    fake.missing(true);
    let (a, b) = (service("a", 1, false), service("b", 2, false));
    let tried = fake.attempts();
    let err = dp
        .apply(None, &[(name("a"), Some(&a)), (name("b"), Some(&b))])
        .unwrap_err();
    assert!(crate::dataplane::tool::is_unavailable(&err), "{err:#}");
    assert_eq!(
        fake.attempts() - tried,
        1,
        "tried once, not change by change"
    );
    assert!(dp.applied.len() == 1, "nothing recorded as applied");
    fake.missing(false);
    dp.apply(None, &[(name("a"), Some(&a)), (name("b"), Some(&b))])
        .unwrap();
    assert_eq!(dispatch(&fake).len(), 2);
}

#[test]
fn a_fresh_start_with_one_bad_service_programs_all_the_others() {
    let fake = FakeNft::default();
    // A previous run's rules are in the kernel.
    fake.preload(&format!(
        "add table ip {T}\nadd chain ip {T} svc-old\nadd rule ip {T} svc-old dnat to 10.9.9.9:80\n"
    ));
    fake.refuse("svc-s7 ");
    let mut dp = NftDataplane::with_kernel(T, Box::new(fake.clone()));
    let fragments: Vec<(ServicePortName, Fragment)> = (1..=20)
        .map(|i| {
            (
                name(&format!("s{i}")),
                service(&format!("s{i}"), i, i % 3 == 0),
            )
        })
        .collect();
    let changed: Vec<(ServicePortName, Option<&Fragment>)> = fragments
        .iter()
        .map(|(n, f)| (n.clone(), Some(f)))
        .collect();
    let applied = dp.apply(Some(&base()), &changed).unwrap();
    let refused: Vec<_> = applied.refused.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(refused, [Some(name("s7"))]);
    let e = format!("{:#}", applied.refused[0].1);
    assert!(
        e.contains("svc-s7"),
        "the error names what was refused: {e}"
    );
    assert_eq!(dispatch(&fake).len(), 19);
    assert_eq!(
        fake.rules("ip", T, "svc-old"),
        None,
        "the reconcile still cleans up"
    );
    let (runs, checks) = fake.counts();
    assert_eq!(
        runs, 2,
        "one refused full transaction is not counted; two commits"
    );
    assert!(
        checks <= 12,
        "found by halving, not one by one: {checks} checks"
    );
    // After that, deltas.
    fake.accept_all();
    dp.apply(None, &[(name("s7"), Some(&fragments[6].1))])
        .unwrap();
    assert_eq!(dispatch(&fake).len(), 20);
}

#[test]
fn reconcile_removes_leftovers_in_our_tables_only() {
    let fake = FakeNft::default();
    fake.preload(&format!(
        "add table ip {T}\nadd chain ip {T} from-an-older-layout\nadd set ip {T} old-set {{ type ipv4_addr; }}\n\
         add table ip6 {T}\nadd chain ip6 {T} v6-leftover\n\
         add table ip filter\nadd chain ip filter input\nadd table ip other-{T}\nadd chain ip other-{T} keep\n"
    ));
    let mut dp = NftDataplane::with_kernel(T, Box::new(fake.clone()));
    dp.apply(Some(&base()), &[(name("a"), Some(&service("a", 1, false)))])
        .unwrap();
    let chains = fake.chains();
    let has = |f: &str, t: &str, c: &str| chains.contains(&(f.into(), t.into(), c.into()));
    assert!(!has("ip", T, "from-an-older-layout"));
    assert!(!has("ip6", T, "v6-leftover"));
    assert!(fake.elements("ip", T, "old-set").is_none());
    assert!(has("ip", "filter", "input") && has("ip", &format!("other-{T}"), "keep"));
    assert!(has("ip", T, "svc-a"));
}

#[test]
fn adopting_a_previous_run_keeps_its_rules_until_the_first_reconcile() {
    // A previous run left a complete table.
    let previous = FakeNft::default();
    let mut old = NftDataplane::with_kernel(T, Box::new(previous.clone()));
    old.apply(Some(&base()), &[(name("a"), Some(&service("a", 1, false)))])
        .unwrap();
    // The new run's first full sync fails (say, the base renders badly):
    // the periodic resync must not reconcile to "nothing".
    let mut dp = NftDataplane::with_kernel(T, Box::new(previous.clone()));
    previous.refuse("add table");
    assert!(dp.apply(Some(&base()), &[]).is_err());
    dp.resync().unwrap();
    assert_eq!(
        dispatch(&previous).len(),
        1,
        "the previous run's rules stay"
    );
    // Then it succeeds, adopting the table in place.
    previous.accept_all();
    dp.apply(Some(&base()), &[(name("a"), Some(&service("a", 1, false)))])
        .unwrap();
    assert_eq!(dispatch(&previous), ["10.0.0.1 . tcp . 80 : goto svc-a"]);
    // A later resync repairs an edit made behind our back.
    previous.preload(&format!(
        "flush chain ip {T} svc-a\nadd chain ip {T} intruder\n"
    ));
    dp.resync().unwrap();
    assert_eq!(previous.rules("ip", T, "svc-a").unwrap().len(), 2);
    assert_eq!(previous.rules("ip", T, "intruder"), None);
}

#[test]
fn items_for_another_dataplane_are_refused_loudly() {
    let (mut dp, fake) = dataplane();
    let ipvs = Fragment {
        items: vec![Item::IpvsVirtualServer {
            address: "10.0.0.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            scheduler: "rr".into(),
            persistence_timeout: 0,
        }]
        .into(),
    };
    let applied = dp
        .apply(Some(&base()), &[(name("v"), Some(&ipvs))])
        .unwrap();
    let e = format!("{:#}", applied.refused[0].1);
    assert!(e.contains("cannot apply") && e.contains("ipvs"), "{e}");
    assert!(
        fake.rules("ip", T, "services").is_some(),
        "the base went in"
    );
    let inet = Fragment {
        items: vec![Item::NftChain {
            family: NftFamily::Inet,
            table: T.into(),
            name: "x".into(),
            hook: None,
            rules: vec![],
        }]
        .into(),
    };
    assert!(dp.apply_all(None, &[(name("i"), Some(&inet))]).is_err());
    let applied = dp.apply(None, &[(name("i"), Some(&inet))]).unwrap();
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(fake.counts(), (1, 0));
}
