//! The nftables dataplane: applies fragment deltas as one `nft -f`
//! transaction each (nft's text syntax, as upstream's knftables does; it
//! handles verdict maps that nft's JSON input does not).
//!
//! The first apply, any apply after a failure and every `resync` is a full
//! reconcile: the owned table is not flushed but every chain and map in
//! the plan is flushed and refilled, and objects no longer in the plan are
//! deleted, all in one transaction. So start-up adopts a previous run's
//! table with no gap in service, and a table someone edited is repaired.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::Dataplane;
use crate::model::ServicePortName;
use crate::plan::{Fragment, Item, NftFamily};

/// `None` is the base fragment.
type Key = Option<ServicePortName>;

/// One kernel object. Fragments may share objects (a class chain, a
/// hairpin element for a pod behind two Services): the dataplane counts
/// references and creates or deletes an object only on the first or last.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Obj {
    Set(Fam, String),
    Chain(Fam, String),
    Element(Fam, String, String),
}

/// Every object lives in our table of one family (`ip` or `ip6`).
type Fam = NftFamily;

pub struct NftDataplane {
    table: String,
    applied: BTreeMap<Key, Fragment>,
    refs: BTreeMap<Obj, usize>,
    needs_full: bool,
    /// Transactions applied and failed, for metrics.
    pub transactions: u64,
    pub failures: u64,
}

/// The plan's objects, flattened.
#[derive(Default)]
struct Objects {
    /// chain -> (hook, rules)
    chains: BTreeMap<(Fam, String), (Option<String>, Vec<String>)>,
    /// set -> declaration
    sets: BTreeMap<(Fam, String), String>,
    /// (set, element)
    elements: BTreeSet<(Fam, String, String)>,
}

impl Objects {
    fn of<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> Self {
        let mut o = Objects::default();
        for item in fragments.into_iter().flat_map(|f| f.items.iter()) {
            match item {
                Item::NftChain {
                    family,
                    name,
                    hook,
                    rules,
                    ..
                } => {
                    o.chains
                        .insert((*family, name.clone()), (hook.clone(), rules.clone()));
                }
                Item::NftSet {
                    family,
                    name,
                    declaration,
                    ..
                } => {
                    o.sets.insert((*family, name.clone()), declaration.clone());
                }
                Item::NftElement {
                    family,
                    set,
                    element,
                    ..
                } => {
                    o.elements.insert((*family, set.clone(), element.clone()));
                }
                _ => {}
            }
        }
        o
    }

    fn keys(&self) -> impl Iterator<Item = Obj> + '_ {
        let sets = self.sets.keys().map(|(f, n)| Obj::Set(*f, n.clone()));
        let chains = self.chains.keys().map(|(f, n)| Obj::Chain(*f, n.clone()));
        let elements = self
            .elements
            .iter()
            .map(|(f, s, e)| Obj::Element(*f, s.clone(), e.clone()));
        sets.chain(chains).chain(elements)
    }
}

impl NftDataplane {
    pub fn new(table: &str) -> Self {
        Self {
            table: table.into(),
            applied: BTreeMap::new(),
            refs: BTreeMap::new(),
            needs_full: true,
            transactions: 0,
            failures: 0,
        }
    }

    /// Re-applies everything (repairs edits made behind our back).
    pub fn resync(&mut self) -> Result<()> {
        let script = self.full_script(&self.applied)?;
        self.run(&script)
    }

    fn run(&mut self, script: &str) -> Result<()> {
        self.transactions += 1;
        match nft(script) {
            Ok(()) => {
                self.needs_full = false;
                Ok(())
            }
            // nft transactions are all or nothing: the kernel still holds
            // what `applied` says, so deltas can go on from there.
            Err(e) => {
                self.failures += 1;
                Err(e)
            }
        }
    }

    /// `FAMILY TABLE NAME`, as nft commands address an object.
    fn at(&self, (family, name): &(Fam, String)) -> String {
        format!("{family} {} {name}", self.table)
    }

    fn add_set(&self, out: &mut String, q: &(Fam, String), declaration: &str) {
        let kind = set_kind(declaration);
        let decl = declaration.trim().trim_end_matches(';');
        out.push_str(&format!("add {kind} {} {{ {decl}; }}\n", self.at(q)));
    }

    fn add_chain(&self, out: &mut String, q: &(Fam, String), hook: &Option<String>) {
        match hook {
            Some(h) => out.push_str(&format!(
                "add chain {} {{ {}; }}\n",
                self.at(q),
                h.trim_end_matches(';')
            )),
            None => out.push_str(&format!("add chain {}\n", self.at(q))),
        }
    }

    fn add_rules(&self, out: &mut String, q: &(Fam, String), rules: &[String]) {
        let at = self.at(q);
        for rule in rules {
            out.push_str(&format!("add rule {at} {rule}\n"));
        }
    }

    fn add_elements(&self, out: &mut String, elements: &BTreeSet<(Fam, String, String)>) {
        let mut by_set: BTreeMap<(Fam, String), Vec<&str>> = BTreeMap::new();
        for (f, set, e) in elements {
            by_set.entry((*f, set.clone())).or_default().push(e);
        }
        for (q, elems) in by_set {
            for chunk in elems.chunks(1000) {
                out.push_str(&format!(
                    "add element {} {{ {} }}\n",
                    self.at(&q),
                    chunk.join(", ")
                ));
            }
        }
    }

    /// Everything in `plan`, reconciled against what the kernel holds.
    fn full_script(&self, plan: &BTreeMap<Key, Fragment>) -> Result<String> {
        let kernel = list_tables(&self.table)?;
        Ok(self.full_script_over(plan, kernel))
    }

    fn full_script_over(&self, plan: &BTreeMap<Key, Fragment>, kernel: Kernel) -> String {
        let want = Objects::of(plan.values());
        let (kernel_chains, kernel_sets) = kernel;
        let t = &self.table;
        let families: BTreeSet<Fam> = want
            .chains
            .keys()
            .map(|(f, _)| *f)
            .chain(kernel_chains.iter().map(|(f, _)| *f))
            .collect();
        let mut s: String = families
            .iter()
            .map(|f| format!("add table {f} {t}\n"))
            .collect();
        for (q, decl) in &want.sets {
            self.add_set(&mut s, q, decl);
        }
        for (q, (hook, _)) in &want.chains {
            self.add_chain(&mut s, q, hook);
        }
        let flush_chains: BTreeSet<&(Fam, String)> =
            want.chains.keys().chain(kernel_chains.iter()).collect();
        for q in flush_chains {
            s.push_str(&format!("flush chain {}\n", self.at(q)));
        }
        // nft (1.0.x) cannot add a rule that uses a `typeof` map it has to
        // read back from the kernel ("conflicting protocols specified"), so
        // such maps are re-created here, unreferenced after the flushes;
        // the transaction is atomic, so no packet sees them missing.
        for (q, decl) in &want.sets {
            if decl.trim_start().starts_with("typeof") && kernel_sets.contains_key(q) {
                let kind = set_kind(decl);
                s.push_str(&format!("delete {kind} {}\n", self.at(q)));
                self.add_set(&mut s, q, decl);
            }
        }
        let mut flush_sets: BTreeMap<&(Fam, String), &str> =
            kernel_sets.iter().map(|(n, k)| (n, *k)).collect();
        flush_sets.extend(want.sets.iter().map(|(n, d)| (n, set_kind(d))));
        for (q, kind) in flush_sets {
            s.push_str(&format!("flush {kind} {}\n", self.at(q)));
        }
        for (q, (_, rules)) in &want.chains {
            self.add_rules(&mut s, q, rules);
        }
        self.add_elements(&mut s, &want.elements);
        for q in kernel_chains
            .iter()
            .filter(|c| !want.chains.contains_key(*c))
        {
            s.push_str(&format!("delete chain {}\n", self.at(q)));
        }
        for (q, kind) in kernel_sets
            .iter()
            .filter(|(n, _)| !want.sets.contains_key(*n))
        {
            s.push_str(&format!("delete {kind} {}\n", self.at(q)));
        }
        s
    }

    /// Only what the changed fragments add or remove, given reference
    /// counts: `old` and `new` are the changed keys' fragments before and
    /// after; `diff` is each object's change in references.
    fn delta_script(&self, old: &Objects, new: &Objects, diff: &BTreeMap<Obj, i64>) -> String {
        let before = |o: &Obj| self.refs.get(o).copied().unwrap_or(0) as i64;
        let added = |o: &Obj| before(o) == 0 && before(o) + diff.get(o).copied().unwrap_or(0) > 0;
        let removed = |o: &Obj| before(o) > 0 && before(o) + diff.get(o).copied().unwrap_or(0) == 0;
        let chain = |(f, n): &(Fam, String)| Obj::Chain(*f, n.clone());
        let set = |(f, n): &(Fam, String)| Obj::Set(*f, n.clone());
        let mut s = String::new();
        for (f, name, e) in &old.elements {
            if removed(&Obj::Element(*f, name.clone(), e.clone())) {
                // Map elements are deleted by key alone.
                let key = e.split(" : ").next().unwrap_or(e);
                s.push_str(&format!(
                    "delete element {} {{ {key} }}\n",
                    self.at(&(*f, name.clone()))
                ));
            }
        }
        let changed_chains: Vec<&(Fam, String)> = new
            .chains
            .iter()
            .filter(|(q, c)| !added(&chain(q)) && old.chains.get(*q).is_some_and(|o| o != *c))
            .map(|(q, _)| q)
            .collect();
        let removed_chains: Vec<&(Fam, String)> =
            old.chains.keys().filter(|q| removed(&chain(q))).collect();
        for q in changed_chains.iter().chain(&removed_chains) {
            s.push_str(&format!("flush chain {}\n", self.at(q)));
        }
        let changed_sets: Vec<&(Fam, String)> = new
            .sets
            .iter()
            .filter(|(q, d)| !added(&set(q)) && old.sets.get(*q).is_some_and(|o| o != *d))
            .map(|(q, _)| q)
            .collect();
        for q in old
            .sets
            .keys()
            .filter(|q| removed(&set(q)))
            .chain(changed_sets.iter().copied())
        {
            s.push_str(&format!(
                "delete {} {}\n",
                set_kind(&old.sets[q]),
                self.at(q)
            ));
        }
        for (q, decl) in &new.sets {
            if added(&set(q)) || changed_sets.contains(&q) {
                self.add_set(&mut s, q, decl);
            }
        }
        for (q, (hook, _)) in &new.chains {
            if added(&chain(q)) {
                self.add_chain(&mut s, q, hook);
            }
        }
        for (q, (_, rules)) in &new.chains {
            if added(&chain(q)) || changed_chains.contains(&q) {
                self.add_rules(&mut s, q, rules);
            }
        }
        // An element whose set was re-created must be added again too.
        let added_elements: BTreeSet<(Fam, String, String)> = new
            .elements
            .iter()
            .filter(|(f, name, e)| {
                added(&Obj::Element(*f, name.clone(), e.clone()))
                    || changed_sets.contains(&&(*f, name.clone()))
            })
            .cloned()
            .collect();
        self.add_elements(&mut s, &added_elements);
        for q in removed_chains {
            s.push_str(&format!("delete chain {}\n", self.at(q)));
        }
        s
    }
}

impl Dataplane for NftDataplane {
    fn apply(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<()> {
        self.apply_changes(base, changed, true)
    }

    fn apply_all(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<()> {
        self.apply_changes(base, changed, false)
    }

    fn resync(&mut self) -> Result<()> {
        NftDataplane::resync(self)
    }
}

impl NftDataplane {
    /// One transaction for all changes; if nft refuses it and `one_by_one`,
    /// each change is tried on its own so one bad fragment cannot hold back
    /// the others.
    fn apply_changes(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
        one_by_one: bool,
    ) -> Result<()> {
        let mut changes: Vec<(Key, Option<&Fragment>)> = Vec::new();
        if let Some(base) = base {
            changes.push((None, Some(base)));
        }
        changes.extend(changed.iter().map(|(n, f)| (Some(n.clone()), *f)));

        let script = if self.needs_full {
            let mut next = self.applied.clone();
            for (key, fragment) in &changes {
                match fragment {
                    Some(f) => next.insert(key.clone(), (*f).clone()),
                    None => next.remove(key),
                };
            }
            self.full_script(&next)?
        } else {
            return match self.apply_delta(&changes) {
                Ok(()) => Ok(()),
                Err(e) if one_by_one && changes.len() > 1 => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "batch refused; applying changes one by one"
                    );
                    let failed: Vec<String> = changes
                        .iter()
                        .filter_map(|c| {
                            self.apply_delta(std::slice::from_ref(c)).err().map(|e| {
                                let name =
                                    c.0.as_ref().map_or("base".to_string(), ToString::to_string);
                                format!("{name}: {e:#}")
                            })
                        })
                        .collect();
                    if failed.is_empty() {
                        Ok(())
                    } else {
                        bail!("{}", failed.join("; "))
                    }
                }
                Err(e) => Err(e),
            };
        };
        self.run(&script).context("nftables transaction")?;
        for (key, fragment) in changes {
            match fragment {
                Some(f) => self.applied.insert(key, f.clone()),
                None => self.applied.remove(&key),
            };
        }
        self.recount();
        Ok(())
    }

    /// One delta transaction for `changes`; on success the host's view
    /// (fragments and reference counts) moves with the kernel.
    fn apply_delta(&mut self, changes: &[(Key, Option<&Fragment>)]) -> Result<()> {
        let old = Objects::of(changes.iter().filter_map(|(k, _)| self.applied.get(k)));
        let new = Objects::of(changes.iter().filter_map(|(_, f)| *f));
        let mut diff: BTreeMap<Obj, i64> = BTreeMap::new();
        for (key, fragment) in changes {
            for o in self
                .applied
                .get(key)
                .map(|f| Objects::of([f]))
                .iter()
                .flat_map(Objects::keys)
            {
                *diff.entry(o).or_default() -= 1;
            }
            for o in fragment
                .map(|f| Objects::of([f]))
                .iter()
                .flat_map(Objects::keys)
            {
                *diff.entry(o).or_default() += 1;
            }
        }
        diff.retain(|_, d| *d != 0);
        let script = self.delta_script(&old, &new, &diff);
        if !script.is_empty() {
            self.run(&script).context("nftables transaction")?;
        }
        for (o, d) in diff {
            let r = self.refs.entry(o.clone()).or_default();
            *r = (*r as i64 + d).max(0) as usize;
            if *r == 0 {
                self.refs.remove(&o);
            }
        }
        for (key, fragment) in changes {
            match fragment {
                Some(f) => self.applied.insert(key.clone(), (*f).clone()),
                None => self.applied.remove(key),
            };
        }
        Ok(())
    }

    /// Reference counts from scratch (after a full reconcile).
    fn recount(&mut self) {
        self.refs.clear();
        for f in self.applied.values() {
            for o in Objects::of([f]).keys() {
                *self.refs.entry(o).or_default() += 1;
            }
        }
    }
}

/// `--dry-run`: what applying `plan` would change in the kernel. The plan is
/// applied to a scratch network namespace so that both sides are printed by
/// nft itself, then the listings are compared line by line within each
/// chain, set and map.
pub fn diff_against_kernel(table: &str, plan: &crate::plan::Plan) -> Result<String> {
    let mut fragments: BTreeMap<Key, Fragment> = plan
        .services
        .iter()
        .map(|(k, f)| (Some(k.clone()), f.clone()))
        .collect();
    fragments.insert(None, plan.base.clone());
    let dp = NftDataplane::new(table);
    let script = dp.full_script_over(&fragments, Default::default());
    let scratch = format!("kwp-dry-run-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .context("running ip (iproute2)")
    };
    let out = run(&["netns", "add", &scratch])?;
    if !out.status.success() {
        bail!(
            "cannot create a scratch network namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wanted = (|| -> Result<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &scratch, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft refused the plan: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut listing = String::new();
        for family in ["ip", "ip6"] {
            listing.push_str(&String::from_utf8_lossy(
                &run(&[
                    "netns", "exec", &scratch, "nft", "list", "table", family, table,
                ])?
                .stdout,
            ));
        }
        Ok(listing)
    })();
    let _ = run(&["netns", "delete", &scratch]);
    let wanted = wanted?;
    let mut current = String::new();
    for family in ["ip", "ip6"] {
        let out = Command::new("nft")
            .args(["list", "table", family, table])
            .output()
            .context("running nft")?;
        if out.status.success() {
            current.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(diff_listings(&current, &wanted))
}

/// Lines (with the block they belong to) only in `old` (-) or only in `new` (+).
fn diff_listings(old: &str, new: &str) -> String {
    fn lines(text: &str) -> Vec<(String, String)> {
        let mut table = String::new();
        let mut block = String::new();
        let mut out = Vec::new();
        let mut in_elements = false;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "}")
        {
            // Set and map elements print as `elements = { a, b,` over
            // several lines: one diff line per element.
            if let Some(rest) = line.strip_prefix("elements = {") {
                in_elements = true;
                out.extend(split_elements(rest).map(|e| (block.clone(), e)));
            } else if in_elements {
                out.extend(split_elements(line).map(|e| (block.clone(), e)));
            } else {
                if let Some(t) = line.strip_prefix("table ") {
                    table = t.trim_end_matches('{').trim().to_string();
                } else if line.ends_with('{') {
                    block = format!("{table}: {}", line.trim_end_matches('{').trim());
                }
                out.push((block.clone(), line.to_string()));
            }
            if in_elements && line.ends_with('}') {
                in_elements = false;
            }
        }
        out
    }
    let (old, new) = (lines(old), lines(new));
    let old_set: BTreeSet<&(String, String)> = old.iter().collect();
    let new_set: BTreeSet<&(String, String)> = new.iter().collect();
    let mut by_block: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for l in old.iter().filter(|l| !new_set.contains(l)) {
        by_block
            .entry(&l.0)
            .or_default()
            .push(format!("-   {}", l.1));
    }
    for l in new.iter().filter(|l| !old_set.contains(l)) {
        by_block
            .entry(&l.0)
            .or_default()
            .push(format!("+   {}", l.1));
    }
    if by_block.is_empty() {
        return "# no changes: the kernel already holds this plan\n".into();
    }
    let (adds, dels) = by_block.values().flatten().fold((0, 0), |(a, d), l| {
        if l.starts_with('+') {
            (a + 1, d)
        } else {
            (a, d + 1)
        }
    });
    let mut out = format!("# {adds} lines to add, {dels} to remove\n");
    for (block, lines) in by_block {
        out.push_str(&format!("{block}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

fn split_elements(text: &str) -> impl Iterator<Item = String> + '_ {
    text.trim_end_matches('}')
        .split(", ")
        .map(|e| e.trim().trim_end_matches(',').trim().to_string())
        .filter(|e| !e.is_empty())
}

/// A declaration with a value type (`... : verdict`) is a map.
fn set_kind(declaration: &str) -> &'static str {
    if declaration.contains(" : ") {
        "map"
    } else {
        "set"
    }
}

/// Runs one nft transaction.
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Chains, and sets/maps with their kind, in our tables of both families.
type Kernel = (
    BTreeSet<(Fam, String)>,
    BTreeMap<(Fam, String), &'static str>,
);

/// What our tables hold now (empty where a table is absent).
fn list_tables(table: &str) -> Result<Kernel> {
    let mut kernel = Kernel::default();
    for family in [NftFamily::Ip, NftFamily::Ip6] {
        let out = Command::new("nft")
            .args(["-j", "list", "table", &family.to_string(), table])
            .output()
            .context("running nft")?;
        if !out.status.success() {
            continue; // no such table yet
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing nft -j output")?;
        for obj in json
            .get("nftables")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(name) = obj
                .get("chain")
                .and_then(|c| c.get("name"))
                .and_then(|n| n.as_str())
            {
                kernel.0.insert((family, name.to_string()));
            }
            for kind in ["set", "map"] {
                if let Some(name) = obj
                    .get(kind)
                    .and_then(|c| c.get("name"))
                    .and_then(|n| n.as_str())
                {
                    kernel.1.insert((family, name.to_string()), kind);
                }
            }
        }
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    #[test]
    fn listing_diffs_are_per_block() {
        let old = "table ip t {\n\tchain a {\n\t\tjump b\n\t}\n\tchain c {\n\t\taccept\n\t}\n\tmap m {\n\t\telements = { 1 : goto a,\n\t\t\t     2 : goto c }\n\t}\n}\n";
        let new = "table ip t {\n\tchain a {\n\t\tjump b\n\t\tdrop\n\t}\n\tmap m {\n\t\telements = { 1 : goto a }\n\t}\n}\n";
        let d = super::diff_listings(old, new);
        assert!(d.contains("ip t: chain a\n+   drop"), "{d}");
        assert!(
            d.contains("ip t: chain c\n-   chain c {\n-   accept"),
            "{d}"
        );
        assert!(
            d.contains("ip t: map m\n-   2 : goto c"),
            "one line per element: {d}"
        );
        assert_eq!(
            super::diff_listings(new, new),
            "# no changes: the kernel already holds this plan\n"
        );
    }
}
