//! The staged full reconcile against the in-memory fake: the same rules
//! as one restore, and a previous run's Services served between stages.

use super::fake::FakeIptables;
use super::tests::{base, name, service};
use super::*;

/// Services `a`.. with two endpoints each: 3 Service-owned chains apiece.
fn plan(services: &[(&str, u8, &[u8])]) -> Vec<(ServicePortName, Fragment)> {
    services
        .iter()
        .map(|(n, ip, eps)| (name(n), service(&n.to_uppercase(), *ip, eps)))
        .collect()
}

fn apply(dp: &mut IptablesDataplane, services: &[(ServicePortName, Fragment)]) {
    let changed: Vec<_> = services.iter().map(|(n, f)| (n.clone(), Some(f))).collect();
    dp.apply(Some(&base()), &changed).unwrap();
}

fn with_chunk(chunk: usize) -> (IptablesDataplane, FakeIptables) {
    let fake = FakeIptables::default();
    let mut dp = IptablesDataplane::with_kernel(Box::new(fake.clone()));
    dp.chunk_chains = chunk;
    (dp, fake)
}

fn every_table(fake: &FakeIptables) -> String {
    let mut kernel = fake.clone();
    TABLES
        .iter()
        .map(|(v6, t)| kernel.save(*v6, t).unwrap())
        .collect()
}

#[test]
fn a_large_table_is_written_in_stages_with_the_same_result() {
    let services = plan(&[
        ("a", 1, &[1, 2]),
        ("b", 2, &[3, 4]),
        ("c", 3, &[5, 6]),
        ("d", 4, &[7, 8]),
        ("e", 5, &[9, 10]),
    ]);
    let (mut one, one_fake) = with_chunk(usize::MAX);
    apply(&mut one, &services);
    let (mut staged, staged_fake) = with_chunk(6);
    apply(&mut staged, &services);
    assert_eq!(every_table(&staged_fake), every_table(&one_fake));
    // filter: one restore; nat: the shared chains created, 3 restores of
    // two Services (6 chains) at most, then the rest.
    assert_eq!(one_fake.restores(), 2);
    assert_eq!(staged_fake.restores(), 1 + 1 + 3 + 1);
    // A full reconcile again (a restart, the canary) finds every chain in
    // place: no creation stage.
    let plan = staged.applied.clone();
    staged.full(plan).unwrap();
    assert_eq!(staged_fake.restores(), 6 + 1 + 3 + 1);
    assert_eq!(every_table(&staged_fake), every_table(&one_fake));
}

/// In every nat table a restore leaves, the Services served before and
/// after (`kept`, by cluster IP) are dispatched, and each jump to a
/// Service or endpoint chain finds rules there (the fake already refuses
/// a jump to a missing chain).
fn no_gap(history: &[((bool, String), BTreeMap<String, Vec<String>>)], kept: &[&str]) {
    for (n, ((_, table), chains)) in history.iter().enumerate() {
        if table != "nat" {
            continue;
        }
        let dispatch = chains.get("KWP-SERVICE-IPS").cloned().unwrap_or_default();
        for ip in kept {
            assert!(
                dispatch.iter().any(|r| r.contains(&format!("-d {ip}/32 "))),
                "restore {n}: {ip} not dispatched: {dispatch:?}"
            );
        }
        for (chain, rules) in chains {
            for rule in rules {
                if let Some(target) = rule.split(" -j ").nth(1).and_then(|t| t.split(' ').next())
                    && (target.starts_with("KWP-SVC-") || target.starts_with("KWP-SEP-"))
                    && chains.get(target).is_none_or(Vec::is_empty)
                {
                    panic!("restore {n} ({table}): {chain} jumps to empty {target}: {rule}");
                }
            }
        }
    }
}

#[test]
fn a_restart_in_stages_keeps_every_service_answering() {
    let (mut old, fake) = with_chunk(usize::MAX);
    apply(
        &mut old,
        &plan(&[("a", 1, &[1, 2]), ("b", 2, &[3, 4]), ("c", 3, &[5, 6])]),
    );
    fake.record();
    // The next run: a's endpoints moved, b gone, d and e new.
    let mut next = IptablesDataplane::with_kernel(Box::new(fake.clone()));
    next.chunk_chains = 3;
    let services = plan(&[
        ("a", 1, &[11, 12]),
        ("c", 3, &[5, 6]),
        ("d", 4, &[7, 8]),
        ("e", 5, &[9, 10]),
    ]);
    apply(&mut next, &services);
    let history = fake.history();
    assert!(history.len() > 3, "staged: {} restores", history.len());
    no_gap(&history, &["10.96.0.1", "10.96.0.3"]);
    let (mut fresh, fresh_fake) = with_chunk(usize::MAX);
    apply(&mut fresh, &services);
    assert_eq!(every_table(&fake), every_table(&fresh_fake));
}

#[test]
fn deltas_keep_the_kernel_equal_to_a_fresh_reconcile() {
    let (mut dp, fake) = with_chunk(usize::MAX);
    apply(&mut dp, &plan(&[("a", 1, &[1, 2]), ("b", 2, &[3])]));
    let full = fake.restores();
    // Each a delta: an endpoint moves, a Service comes, one goes (its
    // rule leaves the shared dispatch chain), one comes back.
    let steps: [(&str, Option<Fragment>); 4] = [
        ("a", Some(service("A", 1, &[1, 4]))),
        ("c", Some(service("C", 3, &[5]))),
        ("b", None),
        ("b", Some(service("B", 2, &[6]))),
    ];
    for (n, f) in &steps {
        dp.apply(None, &[(name(n), f.as_ref())]).unwrap();
    }
    assert_eq!(fake.restores(), full + steps.len(), "one restore each");
    let (mut fresh, fresh_fake) = with_chunk(usize::MAX);
    apply(
        &mut fresh,
        &plan(&[("a", 1, &[1, 4]), ("b", 2, &[6]), ("c", 3, &[5])]),
    );
    // The same rules; in the dispatch chain a delta appends, so only the
    // order of Services differs (it carries no meaning there).
    let sorted = |f: &FakeIptables| {
        let mut lines: Vec<String> = every_table(f).lines().map(String::from).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(&fake), sorted(&fresh_fake));
    assert_eq!(nat(&fake, "KWP-SEP-A2"), None);
}

fn nat(fake: &FakeIptables, chain: &str) -> Option<Vec<String>> {
    fake.rules(false, "nat", chain)
}
