//! The restore texts of a full reconcile and of a delta, per table.

use std::collections::{BTreeMap, BTreeSet};

use super::{ChainKey, Contributions, JUMPS, PREFIX, Saved, Scripts, TABLES, canary, rules_of};

/// A full reconcile per table: see the module comment.
pub(super) fn full_scripts(plan: &Contributions, saved: &Saved) -> Scripts {
    full_scripts_skipping(plan, saved, &BTreeSet::new())
}

/// The same, leaving out the declaration and rules of the chains in
/// `written` (an earlier stage wrote them; they still count as ours).
pub(super) fn full_scripts_skipping(
    plan: &Contributions,
    saved: &Saved,
    written: &BTreeSet<&ChainKey>,
) -> Scripts {
    let mut out = BTreeMap::new();
    let (canary_name, canary_rules) = canary::chain();
    for (ipv6, table) in TABLES {
        let empty = BTreeMap::new();
        let kernel = saved.get(&(*ipv6, table.to_string())).unwrap_or(&empty);
        let mut mine: BTreeMap<&String, _> = plan
            .iter()
            .filter(|((v6, t, _), _)| v6 == ipv6 && t == table)
            .map(|((_, _, name), c)| (name, c))
            .collect();
        // Every table we program carries the canary.
        if !mine.is_empty() {
            mine.insert(&canary_name, &canary_rules);
        }
        let stale: Vec<&String> = kernel
            .keys()
            .filter(|n| n.starts_with(PREFIX) && !mine.contains_key(n))
            .collect();
        if mine.is_empty() && stale.is_empty() {
            continue;
        }
        let rewritten =
            |name: &&&String| !written.contains(&(*ipv6, table.to_string(), name.to_string()));
        let mut text = format!("*{table}\n");
        for name in mine.keys().filter(rewritten).chain(&stale) {
            text.push_str(&format!(":{name} - [0:0]\n"));
        }
        for (name, c) in mine.iter().filter(|(n, _)| rewritten(n)) {
            for rule in rules_of(c) {
                text.push_str(&format!("-A {name} {rule}\n"));
            }
        }
        let has = |chain: &str| mine.contains_key(&chain.to_string());
        for line in jump_lines(table, has, kernel, |_| false) {
            text.push_str(&line);
            text.push('\n');
        }
        for name in &stale {
            text.push_str(&format!("-X {name}\n"));
        }
        text.push_str("COMMIT\n");
        out.insert((*ipv6, table.to_string()), text);
    }
    out
}

/// The restore lines that make our jumps in `table`'s built-in chains
/// exactly the wanted ones (those to chains we `has`), once each, given
/// the built-in chains' rules in `kernel` (a built-in chain absent there
/// is created by the insertions). Chains `trusted` are known to hold
/// exactly the wanted jumps already, and are left alone.
pub(super) fn jump_lines(
    table: &str,
    has: impl Fn(&str) -> bool,
    kernel: &BTreeMap<String, Vec<String>>,
    trusted: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut wanted: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (t, builtin, matches, target) in JUMPS {
        if *t == table && has(target) {
            wanted
                .entry(builtin)
                .or_default()
                .push(format!("{matches}-j {target}"));
        }
    }
    for (builtin, rules) in kernel.iter().filter(|(n, _)| !n.starts_with(PREFIX)) {
        let want = wanted.remove(builtin.as_str()).unwrap_or_default();
        if trusted(builtin) {
            continue;
        }
        let ours: Vec<&String> = rules
            .iter()
            .filter(|r| r.contains(&format!("-j {PREFIX}")))
            .collect();
        let exact = ours.len() == want.len() && want.iter().all(|w| ours.contains(&w));
        if exact {
            continue;
        }
        lines.extend(ours.iter().map(|r| format!("-D {builtin} {r}")));
        lines.extend(want.iter().rev().map(|w| format!("-I {builtin} 1 {w}")));
    }
    for (builtin, want) in wanted {
        lines.extend(want.iter().rev().map(|w| format!("-I {builtin} 1 {w}")));
    }
    lines
}

/// The delta from `old` to `new` per table: only chains whose rules
/// changed; a chain several fragments share is edited rule by rule.
pub(super) fn delta_scripts(old: &Contributions, new: &Contributions) -> Scripts {
    #[derive(Default)]
    struct Parts {
        declare: Vec<String>,
        delete: Vec<String>,
        append: Vec<String>,
        remove: Vec<String>,
    }
    let mut parts: BTreeMap<(bool, String), Parts> = BTreeMap::new();
    let empty = BTreeMap::new();
    let keys: BTreeSet<&ChainKey> = old.keys().chain(new.keys()).collect();
    for key in keys {
        let (ipv6, table, name) = key;
        let before = old.get(key).unwrap_or(&empty);
        let after = new.get(key).unwrap_or(&empty);
        if rules_of(before) == rules_of(after) && old.contains_key(key) == new.contains_key(key) {
            continue;
        }
        let p = parts.entry((*ipv6, table.clone())).or_default();
        if !new.contains_key(key) {
            p.declare.push(name.clone());
            p.remove.push(name.clone());
        } else if !old.contains_key(key) || (before.len() <= 1 && after.len() <= 1) {
            // A chain of one fragment: rewritten whole.
            p.declare.push(name.clone());
            p.append
                .extend(rules_of(after).iter().map(|r| format!("-A {name} {r}")));
        } else {
            // A shared chain: only the changed fragments' rules move.
            for frag in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
                let (b, a) = (before.get(frag), after.get(frag));
                if b == a {
                    continue;
                }
                p.delete
                    .extend(b.into_iter().flatten().map(|r| format!("-D {name} {r}")));
                p.append
                    .extend(a.into_iter().flatten().map(|r| format!("-A {name} {r}")));
            }
        }
    }
    parts
        .into_iter()
        .map(|(key, p)| {
            let mut text = format!("*{}\n", key.1);
            for name in &p.declare {
                text.push_str(&format!(":{name} - [0:0]\n"));
            }
            for line in p.delete.iter().chain(&p.append) {
                text.push_str(line);
                text.push('\n');
            }
            for name in &p.remove {
                text.push_str(&format!("-X {name}\n"));
            }
            text.push_str("COMMIT\n");
            (key, text)
        })
        .collect()
}
