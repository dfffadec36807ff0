//! A compare's reads off the sync loop, against the in-memory fake: a
//! change arriving meanwhile is applied without waiting for them; chains
//! a delta wrote, created or deleted while they were out are not taken
//! for drift, whichever came first; drift elsewhere is still repaired;
//! a full reconcile in between makes the reads moot.

use super::compare::read_tables;
use super::fake::FakeIptables;
use super::tests::{name, service};
use super::tests_resync::{every_table, programmed};
use super::*;

/// Another program writes elsewhere: the next resync compares.
fn foreign_write(fake: &FakeIptables, n: usize) {
    let text = format!("*filter\n:OTHER-{n} - [0:0]\n-A OTHER-{n} -j RETURN\nCOMMIT\n");
    fake.preload(false, "filter", &text);
}

/// A's endpoints change (a chain rewritten, one deleted), C comes, B goes.
fn deltas(dp: &mut IptablesDataplane) {
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    dp.apply(None, &[(name("c"), Some(&service("C", 3, &[4, 5])))])
        .unwrap();
    dp.apply(None, &[(name("b"), None)]).unwrap();
}

/// The tables a dataplane that made those deltas first would hold.
fn after_deltas() -> Vec<String> {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    foreign_write(&fake, 1);
    deltas(&mut dp);
    every_table(&fake)
}

#[test]
fn a_change_during_a_compare_is_applied_without_waiting_for_its_reads() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    dp.background_compare = true;
    foreign_write(&fake, 1);
    fake.hold_reads();
    dp.resync().unwrap();
    assert!(dp.comparing(), "the compare's reads are out");
    let restores = fake.restores();
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    assert_eq!(
        fake.rules(false, "nat", "KWP-SVC-A").unwrap(),
        ["-j KWP-SEP-A1"]
    );
    // The change went in while the reads were held: it did not wait.
    fake.release_reads();
    dp.await_compare().unwrap();
    assert!(!fake.reads_waited_out(), "the change waited for the reads");
    assert_eq!((fake.restores(), dp.repairs), (restores + 1, 0));
    // What the compare and the delta learned is all there is.
    dp.resync().unwrap();
    assert_eq!((dp.compares, dp.comparing()), (1, false));
}

#[test]
fn chains_a_delta_wrote_while_the_reads_were_out_are_not_drift() {
    let want = after_deltas();
    // The reads before the deltas, and after them.
    for reads_first in [true, false] {
        let fake = FakeIptables::default();
        let mut dp = programmed(&fake);
        foreign_write(&fake, 1);
        let generation = dp.generation();
        dp.begin_compare(generation);
        let read = reads_first.then(|| read_tables(&mut fake.clone(), 1));
        deltas(&mut dp);
        let read = read.unwrap_or_else(|| read_tables(&mut fake.clone(), 1));
        let restores = fake.restores();
        dp.finish_compare(read).unwrap();
        let case = if reads_first {
            "read first"
        } else {
            "deltas first"
        };
        assert_eq!(fake.restores(), restores, "{case}: {}", fake.last_restore());
        assert_eq!(every_table(&fake), want, "{case}");
        // The deltas were learned: known to be all there is.
        dp.resync().unwrap();
        assert_eq!((dp.compares, fake.restores()), (0, restores), "{case}");
    }
}

#[test]
fn drift_found_by_a_compare_is_repaired_though_deltas_came_meanwhile() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    fake.preload(
        false,
        "nat",
        "*nat\n-D KWP-SEP-B3 -p tcp -m tcp -j DNAT --to-destination 10.244.1.3:80\n-A KWP-SEP-B3 -p tcp -m tcp -j DNAT --to-destination 192.0.2.1:80\nCOMMIT\n",
    );
    let generation = dp.generation();
    dp.begin_compare(generation);
    let read = read_tables(&mut fake.clone(), 1);
    dp.apply(None, &[(name("a"), Some(&service("A", 1, &[1])))])
        .unwrap();
    let restores = fake.restores();
    dp.finish_compare(read).unwrap();
    assert_eq!(fake.restores(), restores + 1);
    assert_eq!(
        fake.last_restore(),
        "*nat\n:KWP-SEP-B3 - [0:0]\n-A KWP-SEP-B3 -p tcp -m tcp -j DNAT --to-destination 10.244.1.3:80\nCOMMIT\n"
    );
    assert_eq!(dp.repairs, 1);
    // Repaired and learned: nothing more to read.
    dp.resync().unwrap();
    assert_eq!((dp.compares, fake.restores()), (0, restores + 1));
}

#[test]
fn a_full_reconcile_while_the_reads_are_out_makes_them_moot() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    let intact = every_table(&fake);
    fake.wipe(false, "nat");
    let generation = dp.generation();
    dp.begin_compare(generation);
    let read = read_tables(&mut fake.clone(), 1);
    // The canary finds nat flushed: everything is re-applied.
    assert!(dp.repair_drift().unwrap());
    assert_eq!(every_table(&fake), intact);
    let restores = fake.restores();
    dp.finish_compare(read).unwrap();
    assert_eq!(fake.restores(), restores, "a stale read was acted on");
    assert!(!dp.comparing());
}

#[test]
fn most_of_a_table_drifted_falls_back_to_a_full_reconcile_from_the_thread() {
    let fake = FakeIptables::default();
    let mut dp = programmed(&fake);
    dp.background_compare = true;
    dp.chunk_chains = 2;
    let intact = every_table(&fake);
    // The canary survives; most of our nat chains do not.
    fake.preload(
        false,
        "nat",
        "*nat\n:KWP-SVC-A - [0:0]\n:KWP-SVC-B - [0:0]\n-X KWP-SEP-A1\n-X KWP-SEP-A2\n-X KWP-SEP-B3\nCOMMIT\n",
    );
    dp.resync().unwrap();
    dp.await_compare().unwrap();
    assert_eq!(every_table(&fake), intact);
    assert_eq!(dp.repairs, 0, "repaired by the full reconcile");
}
