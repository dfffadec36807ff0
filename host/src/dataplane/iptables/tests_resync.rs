//! The periodic resync as compare-and-repair, against the in-memory fake:
//! nothing written without drift, and only the drifted chains, missing
//! ones, stray ones and our jumps rewritten with it.

use super::fake::FakeIptables;
use super::tests::{base, name, service};
use super::*;

pub(super) fn programmed(fake: &FakeIptables) -> IptablesDataplane {
    let mut dp = IptablesDataplane::with_kernel(Box::new(fake.clone()));
    let (a, b) = (service("A", 1, &[1, 2]), service("B", 2, &[3]));
    dp.apply(
        Some(&base()),
        &[(name("a"), Some(&a)), (name("b"), Some(&b))],
    )
    .unwrap();
    dp
}

pub(super) fn every_table(fake: &FakeIptables) -> Vec<String> {
    TABLES
        .iter()
        .map(|(v6, t)| fake.clone().save(*v6, t).unwrap())
        .collect()
}

#[test]
fn a_resync_without_drift_restores_nothing() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    let restores = fake.restores();
    dp.resync().unwrap();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores, "a clean resync restored");
    // A delta learns what it wrote: the resync after it is clean too.
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    dp.apply(None, &[(name("c"), Some(&service("C", 3, &[4])))])
        .unwrap();
    let restores = fake.restores();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores, "a resync after deltas restored");
    // Nobody else wrote: nothing was even read.
    assert_eq!(dp.compares, 0);
    // Another program writes elsewhere: the tables are compared, and
    // nothing of ours is written.
    fake.preload(
        false,
        "filter",
        "*filter\n:OTHER - [0:0]\n-A OTHER -j RETURN\nCOMMIT\n",
    );
    let restores = fake.restores();
    dp.resync().unwrap();
    dp.resync().unwrap();
    assert_eq!((fake.restores(), dp.compares), (restores, 1));
    assert_eq!(dp.repairs, 0);
}

#[test]
fn one_chain_altered_is_the_only_chain_rewritten() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    let intact = every_table(&fake);
    // Same count, other rule: only the digest tells.
    fake.preload(
        false,
        "nat",
        "*nat\n-D KWP-SEP-A1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.1:80\n-A KWP-SEP-A1 -p tcp -m tcp -j DNAT --to-destination 192.0.2.1:80\nCOMMIT\n",
    );
    let restores = fake.restores();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores + 1, "one restore: nat");
    assert_eq!(
        fake.last_restore(),
        "*nat\n:KWP-SEP-A1 - [0:0]\n-A KWP-SEP-A1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.1:80\nCOMMIT\n"
    );
    assert_eq!(every_table(&fake), intact);
    assert_eq!(dp.repairs, 1);
    // Repaired and learned: clean again.
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores + 1);
}

#[test]
fn missing_stray_and_jump_drift_is_repaired_and_foreign_rules_stay() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    let restores = fake.restores();
    // Another program's chain and rules in a built-in chain, after ours.
    fake.preload(
        false,
        "nat",
        "*nat\n:DOCKER - [0:0]\n-A DOCKER -j RETURN\n-A PREROUTING -j DOCKER\nCOMMIT\n",
    );
    dp.resync().unwrap();
    assert_eq!(
        fake.restores(),
        restores + 1,
        "foreign edits alone: nothing"
    );
    let intact = every_table(&fake);
    // A rule of a Service chain deleted, a stray chain of ours added, an
    // endpoint chain deleted (its Service chain flushed first), our jump
    // deleted.
    fake.preload(
        false,
        "nat",
        "*nat\n:KWP-STRAY - [0:0]\n-A KWP-STRAY -j RETURN\n:KWP-SVC-A - [0:0]\n-X KWP-SEP-A2\n-D PREROUTING -j KWP-SERVICES\n-D KWP-SVC-B -j KWP-SEP-B3\nCOMMIT\n",
    );
    let restores = fake.restores();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores + 1);
    let repair = fake.last_restore();
    for untouched in [
        "KWP-SERVICE-IPS",
        "KWP-SEP-A1 ",
        "KWP-SEP-B3 -",
        "DOCKER -j",
    ] {
        assert!(!repair.contains(untouched), "{untouched}:\n{repair}");
    }
    assert_eq!(every_table(&fake), intact, "repaired:\n{repair}");
    assert_eq!(
        fake.rules(false, "nat", "PREROUTING").unwrap(),
        ["-j KWP-SERVICES", "-j DOCKER"]
    );
}

#[test]
fn where_chains_are_read_only_by_table_a_resync_rewrites_what_deltas_wrote() {
    let fake = FakeIptables::default();
    fake.whole_table_reads();
    let mut dp = programmed(&fake);
    dp.resync().unwrap();
    let restores = fake.restores();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores, "learned from the full reconcile");
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    let intact = every_table(&fake);
    dp.resync().unwrap();
    assert_eq!(
        fake.last_restore(),
        "*nat\n:KWP-SVC-A - [0:0]\n-A KWP-SVC-A -j KWP-SEP-A1\nCOMMIT\n",
        "only the chain the delta wrote"
    );
    assert_eq!(every_table(&fake), intact);
    let restores = fake.restores();
    dp.resync().unwrap();
    assert_eq!(fake.restores(), restores, "learned by the repair");
}
