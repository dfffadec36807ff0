//! The iptables dataplane against the in-memory fake: deltas, chain
//! deletion, adoption of a previous run, foreign chains left alone, a
//! refused restore.

use super::fake::FakeIptables;
use super::*;
use crate::model::Protocol;

pub(super) fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: n.into(),
        port: "p".into(),
        protocol: Protocol::Tcp,
    }
}

fn chain(table: &str, name: &str, rules: &[&str]) -> Item {
    Item::IptablesChain {
        ipv6: false,
        table: table.into(),
        name: name.into(),
        rules: rules.iter().map(|r| r.to_string()).collect(),
    }
}

fn base() -> Fragment {
    Fragment {
        items: vec![
            chain("nat", "KWP-SERVICES", &["-j KWP-SERVICE-IPS"]),
            chain("nat", "KWP-SERVICE-IPS", &[]),
            chain("nat", "KWP-POSTROUTING", &["-j MASQUERADE --random-fully"]),
            chain("filter", "KWP-SERVICES", &[]),
        ]
        .into(),
    }
}

fn service(n: &str, ip: u8, eps: &[u8]) -> Fragment {
    let svc = format!("KWP-SVC-{n}");
    let mut items = vec![chain(
        "nat",
        "KWP-SERVICE-IPS",
        &[&format!(
            "-d 10.96.0.{ip}/32 -p tcp -m tcp --dport 80 -j {svc}"
        )],
    )];
    let rules: Vec<String> = eps.iter().map(|e| format!("-j KWP-SEP-{n}{e}")).collect();
    items.push(chain(
        "nat",
        &svc,
        &rules.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    for e in eps {
        items.push(chain(
            "nat",
            &format!("KWP-SEP-{n}{e}"),
            &[&format!(
                "-p tcp -m tcp -j DNAT --to-destination 10.244.1.{e}:80"
            )],
        ));
    }
    Fragment {
        items: items.into(),
    }
}

fn dataplane() -> (IptablesDataplane, FakeIptables) {
    let fake = FakeIptables::default();
    (IptablesDataplane::with_kernel(Box::new(fake.clone())), fake)
}

fn nat(fake: &FakeIptables, chain: &str) -> Option<Vec<String>> {
    fake.rules(false, "nat", chain)
}

#[test]
fn first_sync_then_a_delta_touches_only_the_changed_chains() {
    let (mut dp, fake) = dataplane();
    let (a, b) = (service("A", 1, &[1, 2]), service("B", 2, &[3]));
    dp.apply(
        Some(&base()),
        &[(name("a"), Some(&a)), (name("b"), Some(&b))],
    )
    .unwrap();
    assert_eq!(nat(&fake, "KWP-SERVICE-IPS").unwrap().len(), 2);
    assert_eq!(
        nat(&fake, "PREROUTING").unwrap(),
        ["-j KWP-SERVICES"],
        "jump installed once"
    );
    assert_eq!(
        fake.rules(false, "filter", "OUTPUT").unwrap(),
        ["-m conntrack --ctstate NEW -j KWP-SERVICES"]
    );
    let full = fake.restores();
    // One endpoint of A goes: A's chains and its dispatch rule only.
    let a2 = service("A", 1, &[1]);
    dp.apply(None, &[(name("a"), Some(&a2))]).unwrap();
    assert_eq!(fake.restores(), full + 1, "one restore: the nat table");
    assert_eq!(nat(&fake, "KWP-SVC-A").unwrap(), ["-j KWP-SEP-A1"]);
    assert_eq!(
        nat(&fake, "KWP-SEP-A2"),
        None,
        "stale endpoint chain deleted"
    );
    assert_eq!(nat(&fake, "KWP-SEP-B3").unwrap().len(), 1);
    // B goes: its dispatch rule and chains, nothing else.
    dp.apply(None, &[(name("b"), None)]).unwrap();
    assert_eq!(
        nat(&fake, "KWP-SERVICE-IPS").unwrap(),
        ["-d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KWP-SVC-A"]
    );
    assert_eq!(nat(&fake, "KWP-SVC-B"), None);
    assert_eq!(nat(&fake, "KWP-SEP-B3"), None);
    assert_eq!(nat(&fake, "PREROUTING").unwrap(), ["-j KWP-SERVICES"]);
}

#[test]
fn the_delta_restore_holds_only_what_changed() {
    let old = contributions([
        (&None, &base()),
        (&Some(name("a")), &service("A", 1, &[1, 2])),
    ])
    .unwrap();
    let new =
        contributions([(&None, &base()), (&Some(name("a")), &service("A", 1, &[1]))]).unwrap();
    let scripts = delta_scripts(&old, &new);
    assert_eq!(scripts.len(), 1);
    assert_eq!(
        scripts[&(false, "nat".to_string())],
        "*nat\n:KWP-SEP-A2 - [0:0]\n:KWP-SVC-A - [0:0]\n-A KWP-SVC-A -j KWP-SEP-A1\n-X KWP-SEP-A2\nCOMMIT\n"
    );
    assert!(
        delta_scripts(&new, &new).is_empty(),
        "no change, no restore"
    );
}

#[test]
fn a_restart_adopts_the_previous_chains_and_foreign_ones_stay() {
    let fake = FakeIptables::default();
    // A previous run's chains and jump, a stale chain of ours, and another
    // program's chain and jump.
    fake.preload(
        false,
        "nat",
        "*nat\n:KWP-SERVICES - [0:0]\n:KWP-OLD - [0:0]\n:DOCKER - [0:0]\n-A KWP-SERVICES -j KWP-OLD\n-A KWP-OLD -j RETURN\n-A PREROUTING -j DOCKER\n-A PREROUTING -j KWP-SERVICES\n-A PREROUTING -j KWP-SERVICES\n-A DOCKER -j RETURN\nCOMMIT\n",
    );
    let mut dp = IptablesDataplane::with_kernel(Box::new(fake.clone()));
    dp.resync().unwrap();
    assert!(
        nat(&fake, "KWP-OLD").is_some(),
        "no resync before the first sync"
    );
    dp.apply(Some(&base()), &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    assert_eq!(nat(&fake, "KWP-OLD"), None, "stale chain deleted");
    assert_eq!(nat(&fake, "DOCKER").unwrap(), ["-j RETURN"]);
    assert_eq!(
        nat(&fake, "PREROUTING").unwrap(),
        ["-j KWP-SERVICES", "-j DOCKER"],
        "duplicate jump removed, foreign jump kept"
    );
    assert_eq!(nat(&fake, "KWP-SERVICES").unwrap(), ["-j KWP-SERVICE-IPS"]);
    // Someone deletes our chain's rules: the resync repairs them.
    fake.preload(false, "nat", "*nat\n:KWP-SVC-A - [0:0]\nCOMMIT\n");
    dp.resync().unwrap();
    assert_eq!(nat(&fake, "KWP-SVC-A").unwrap(), ["-j KWP-SEP-A1"]);
    assert_eq!(nat(&fake, "DOCKER").unwrap(), ["-j RETURN"]);
}

#[test]
fn a_refused_service_keeps_its_last_rules_and_the_others_sync() {
    let (mut dp, fake) = dataplane();
    dp.apply(Some(&base()), &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    fake.refuse("10.244.1.66");
    let applied = dp
        .apply(
            None,
            &[
                (name("a"), Some(&service("A", 1, &[66]))),
                (name("b"), Some(&service("B", 2, &[3]))),
            ],
        )
        .unwrap();
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(applied.refused[0].0, Some(name("a")));
    assert_eq!(
        nat(&fake, "KWP-SVC-A").unwrap(),
        ["-j KWP-SEP-A1"],
        "last good"
    );
    assert_eq!(nat(&fake, "KWP-SVC-B").unwrap(), ["-j KWP-SEP-B3"]);
    // All or nothing: nothing of a refused batch lands.
    assert!(
        dp.apply_all(None, &[(name("c"), Some(&service("C", 3, &[66])))])
            .is_err()
    );
    assert_eq!(nat(&fake, "KWP-SVC-C"), None);
    // A fragment for another dataplane is refused by name.
    let nft = Fragment {
        items: vec![Item::Listener(crate::plan::Listener {
            service: 1,
            protocol: Protocol::Tcp,
            frontends: vec![],
            udp_idle_timeout: std::time::Duration::from_secs(1),
        })]
        .into(),
    };
    let applied = dp.apply(None, &[(name("d"), Some(&nft))]).unwrap();
    assert_eq!(applied.refused[0].0, Some(name("d")));
}

#[test]
fn upstream_iptables_metrics_follow_each_sync_per_family() {
    let (mut dp, fake) = dataplane();
    let m = dp.metrics.clone();
    dp.apply(
        Some(&base()),
        &[(name("a"), Some(&service("A", 1, &[1, 2])))],
    )
    .unwrap();
    // nat: SERVICES 1, SERVICE-IPS 1, POSTROUTING 1, SVC-A 2, SEP-A1 1, SEP-A2 1.
    assert_eq!(m.rules_total("nat", false), 7);
    assert_eq!(m.rules_last("nat", false), 7, "a full sync writes them all");
    assert_eq!(m.rules_total("filter", false), 0);
    assert_eq!(m.sync_counts(false), (1, 0));
    assert_eq!(m.sync_counts(true), (1, 0), "IPv6 tables were read");
    // A delta: KWP-SVC-A rewritten with one rule, KWP-SEP-A2 deleted.
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    assert_eq!(m.rules_total("nat", false), 5);
    assert_eq!(m.rules_last("nat", false), 1);
    assert_eq!(m.sync_counts(false), (1, 1));
    assert_eq!(m.sync_counts(true), (1, 0), "no IPv6 work in the delta");
    assert_eq!(m.failures(false), (0, 0));
    // A refused delta counts a partial restore failure; its full fallback
    // is refused too, then the kernel takes what it can.
    fake.refuse("10.244.1.66");
    let applied = dp
        .apply(None, &[(name("a"), Some(&service("A", 1, &[66])))])
        .unwrap();
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(m.failures(false), (2, 1));
    assert_eq!(m.failures(true), (0, 0));
    assert_eq!(m.rules_total("nat", false), 5, "last good rules counted");
}

#[test]
fn a_flushed_or_deleted_canary_reapplies_everything_at_once() {
    use canary::CANARY;
    let (mut dp, fake) = dataplane();
    assert!(
        !dp.repair_drift().unwrap(),
        "nothing synced, nothing watched"
    );
    dp.apply(Some(&base()), &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    assert_eq!(nat(&fake, CANARY).unwrap(), ["-j RETURN"]);
    assert_eq!(fake.rules(false, "filter", CANARY).unwrap(), ["-j RETURN"]);
    assert_eq!(
        fake.rules(true, "nat", CANARY),
        None,
        "no canary where we have no rules"
    );
    let restores = fake.restores();
    assert!(!dp.repair_drift().unwrap());
    assert_eq!(
        fake.restores(),
        restores,
        "an intact canary costs no restore"
    );
    // `iptables -t nat -F; iptables -t nat -X`: every chain of ours gone.
    fake.wipe(false, "nat");
    assert!(dp.repair_drift().unwrap());
    assert_eq!(nat(&fake, "KWP-SVC-A").unwrap(), ["-j KWP-SEP-A1"]);
    assert_eq!(nat(&fake, "PREROUTING").unwrap(), ["-j KWP-SERVICES"]);
    assert_eq!(nat(&fake, CANARY).unwrap(), ["-j RETURN"]);
    // `iptables -F`: rules flushed, chains kept; only the canary's rule
    // tells.
    fake.preload(
        false,
        "filter",
        "*filter\n:KWP-PROXY-CANARY - [0:0]\n:KWP-SERVICES - [0:0]\nCOMMIT\n",
    );
    assert!(dp.repair_drift().unwrap());
    assert_eq!(fake.rules(false, "filter", CANARY).unwrap(), ["-j RETURN"]);
    assert!(!dp.repair_drift().unwrap(), "repaired: quiet again");
    assert_eq!(
        dp.metrics
            .canary_resyncs
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The check's pace: at least a second apart, 50 times its cost.
    assert_eq!(
        canary::interval(Duration::from_millis(7)),
        Duration::from_secs(1)
    );
    assert_eq!(
        canary::interval(Duration::from_millis(77)),
        Duration::from_millis(3850)
    );
}

#[test]
fn the_localnet_guard_turns_route_localnet_on_and_is_jumped_to_first() {
    let (mut dp, fake) = dataplane();
    dp.apply(Some(&base()), &[]).unwrap();
    assert!(!fake.route_localnet(), "no guard, no sysctl");
    let mut guarded = base();
    let mut items = guarded.items.to_vec();
    items.push(chain(
        "filter",
        LOCALNET_GUARD,
        &["-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"],
    ));
    guarded.items = items.into();
    dp.apply(Some(&guarded), &[]).unwrap();
    assert!(fake.route_localnet());
    for builtin in ["INPUT", "OUTPUT"] {
        assert_eq!(
            fake.rules(false, "filter", builtin).unwrap()[0],
            "-j KWP-FIREWALL",
            "{builtin}"
        );
    }
}

#[test]
fn all_or_nothing_leaves_every_table_untouched_when_one_is_refused() {
    let (mut dp, fake) = dataplane();
    dp.apply(Some(&base()), &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    // A change to both tables whose nat part the kernel refuses: filter
    // (restored first) must not be committed either.
    let mut both = service("B", 2, &[66]);
    let mut items = both.items.to_vec();
    items.push(chain(
        "filter",
        "KWP-SERVICES",
        &["-d 10.96.0.2/32 -j REJECT"],
    ));
    both.items = items.into();
    fake.refuse("10.244.1.66");
    let restores = fake.restores();
    assert!(dp.apply_all(None, &[(name("b"), Some(&both))]).is_err());
    assert_eq!(fake.restores(), restores, "nothing committed");
    assert_eq!(
        fake.rules(false, "filter", "KWP-SERVICES").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(nat(&fake, "KWP-SVC-B"), None);
}

/// A refused full reconcile keeps what the kernel takes, but never a new
/// base without the chains that kept Services still jump to: the kernel's
/// `--test` does not notice, the real restore then fails on deleting it.
#[test]
fn a_new_base_is_not_kept_without_the_chains_old_services_jump_to() {
    let (mut dp, fake) = dataplane();
    let marking = |ip: u8| {
        let mut f = service("A", 1, &[1]);
        let mut items = f.items.to_vec();
        items.push(chain(
            "nat",
            "KWP-SEP-A1",
            &[&format!("-s 10.244.1.{ip}/32 -j KWP-MARK-MASQ")],
        ));
        f.items = items.into();
        f
    };
    let mut old_base = base();
    let mut items = old_base.items.to_vec();
    items.push(chain("nat", "KWP-MARK-MASQ", &["-j MARK --or-mark 0x4000"]));
    old_base.items = items.into();
    dp.apply(Some(&old_base), &[(name("a"), Some(&marking(1)))])
        .unwrap();
    fake.lenient_check();
    fake.refuse("10.244.1.66");
    // The new base drops KWP-MARK-MASQ; A's new version would not need it,
    // but the kernel refuses it, so A keeps its old rules, which do.
    let applied = dp
        .apply(Some(&base()), &[(name("a"), Some(&marking(66)))])
        .unwrap();
    let refused: Vec<_> = applied.refused.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(refused, [None, Some(name("a"))]);
    assert_eq!(
        nat(&fake, "KWP-MARK-MASQ").unwrap(),
        ["-j MARK --or-mark 0x4000"]
    );
}
