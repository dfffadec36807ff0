//! nft transactions from fragments: a full reconcile of a whole plan
//! against what the kernel holds, or the delta of some changed fragments
//! given the reference counts of shared objects. Pure text generation.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use super::kernel::{Listing, SetKind};
use super::wanted::{Drift, Name, Wanted, name, owned};
use crate::plan::{Fragment, NftFamily};

type Fam = NftFamily;
/// `(family, name)` of a chain or set in our table.
pub type Qualified = (Fam, String);

/// One kernel object. Fragments may share objects (a class chain, a
/// hairpin element for a pod behind two Services): the dataplane counts
/// references and creates or deletes an object only on the first or last.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Obj {
    Set(Fam, String),
    Chain(Fam, String),
    Element(Fam, String, String),
}

/// The objects of some fragments, flattened.
#[derive(Default)]
pub struct Objects {
    /// chain -> (hook, rules)
    pub(super) chains: BTreeMap<Qualified, (Option<String>, Vec<String>)>,
    /// set -> declaration
    pub(super) sets: BTreeMap<Qualified, String>,
    /// (set, element)
    pub(super) elements: BTreeSet<(Fam, String, String)>,
}

impl Objects {
    /// Every item must be an nftables item of the `ip` or `ip6` family:
    /// anything else is for another dataplane and is refused, loudly.
    pub fn of<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> Result<Self> {
        Ok(Wanted::of(fragments)?.to_objects())
    }

    pub fn keys(&self) -> impl Iterator<Item = Obj> + '_ {
        let sets = self.sets.keys().map(|(f, n)| Obj::Set(*f, n.clone()));
        let chains = self.chains.keys().map(|(f, n)| Obj::Chain(*f, n.clone()));
        let elements = self
            .elements
            .iter()
            .map(|(f, s, e)| Obj::Element(*f, s.clone(), e.clone()));
        sets.chain(chains).chain(elements)
    }
}

impl Objects {
    /// The chains and sets these objects name.
    pub fn tables(&self) -> impl Iterator<Item = Obj> + '_ {
        let sets = self.sets.keys().map(|(f, n)| Obj::Set(*f, n.clone()));
        sets.chain(self.chains.keys().map(|(f, n)| Obj::Chain(*f, n.clone())))
    }
}

/// Reference counts before a delta and their change: whether the delta
/// creates or deletes an object (the first or last reference).
pub struct Counts<'a> {
    pub refs: &'a super::refs::Refs,
    pub diff: &'a BTreeMap<Obj, i64>,
}

impl Counts<'_> {
    fn before(&self, o: &Obj) -> i64 {
        self.refs.get(o) as i64
    }

    fn after(&self, o: &Obj) -> i64 {
        self.before(o) + self.diff.get(o).copied().unwrap_or(0)
    }

    pub fn added(&self, o: &Obj) -> bool {
        self.before(o) == 0 && self.after(o) > 0
    }

    pub fn removed(&self, o: &Obj) -> bool {
        self.before(o) > 0 && self.after(o) == 0
    }
}

/// Writes commands addressing objects of one table name.
pub struct Script<'a> {
    table: &'a str,
    out: String,
}

impl<'a> Script<'a> {
    pub fn new(table: &'a str) -> Self {
        Self {
            table,
            out: String::new(),
        }
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// `FAMILY TABLE NAME`, as nft commands address an object.
    fn at(&self, (family, name): Name<'_>) -> String {
        format!("{family} {} {name}", self.table)
    }

    fn line(&mut self, line: String) {
        self.out.push_str(&line);
        self.out.push('\n');
    }

    fn add_set(&mut self, q: Name<'_>, declaration: &str) {
        let kind = SetKind::of(declaration);
        let decl = declaration.trim().trim_end_matches(';');
        let at = self.at(q);
        self.line(format!("add {kind} {at} {{ {decl}; }}"));
    }

    fn add_chain(&mut self, q: Name<'_>, hook: Option<&str>) {
        let at = self.at(q);
        match hook {
            Some(h) => self.line(format!("add chain {at} {{ {}; }}", h.trim_end_matches(';'))),
            None => self.line(format!("add chain {at}")),
        }
    }

    fn add_rules(&mut self, q: Name<'_>, rules: &[String]) {
        let at = self.at(q);
        for rule in rules {
            self.line(format!("add rule {at} {rule}"));
        }
    }

    fn add_elements(&mut self, elements: &BTreeSet<(Fam, String, String)>) {
        let mut by_set: BTreeMap<Name<'_>, Vec<&str>> = BTreeMap::new();
        for (f, set, e) in elements {
            by_set.entry((*f, set)).or_default().push(e);
        }
        for (q, elems) in by_set {
            self.add_elements_of(q, &elems);
        }
    }

    fn add_elements_of(&mut self, q: Name<'_>, elements: &[&str]) {
        let at = self.at(q);
        for chunk in elements.chunks(1000) {
            self.line(format!("add element {at} {{ {} }}", chunk.join(", ")));
        }
    }

    /// Everything in `want`, reconciled against what the kernel holds: the
    /// table is not flushed, but every chain and set of either side is
    /// flushed and refilled, and kernel objects no longer wanted are
    /// deleted, in one transaction (no gap in service, edits repaired).
    pub fn full(mut self, want: &Wanted<'_>, kernel: &Listing) -> String {
        let families: BTreeSet<Fam> = (want.chains.keys().map(|(f, _)| *f))
            .chain(kernel.chains.iter().map(|(f, _)| *f))
            .collect();
        for f in families {
            let t = self.table;
            self.line(format!("add table {f} {t}"));
        }
        for (q, decl) in &want.sets {
            self.add_set(*q, decl);
        }
        for (q, (hook, _)) in &want.chains {
            self.add_chain(*q, *hook);
        }
        let flush_chains: BTreeSet<Name<'_>> = (want.chains.keys().copied())
            .chain(kernel.chains.iter().map(name))
            .collect();
        for q in flush_chains {
            let at = self.at(q);
            self.line(format!("flush chain {at}"));
        }
        // nft (1.0.x) cannot add a rule that uses a `typeof` map it has to
        // read back from the kernel ("conflicting protocols specified"), so
        // such maps are re-created here, unreferenced after the flushes;
        // the transaction is atomic, so no packet sees them missing.
        for (q, decl) in &want.sets {
            if decl.trim_start().starts_with("typeof") && kernel.sets.contains_key(&owned(q)) {
                let at = self.at(*q);
                self.line(format!("delete {} {at}", SetKind::of(decl)));
                self.add_set(*q, decl);
            }
        }
        let mut flush_sets: BTreeMap<Name<'_>, SetKind> =
            kernel.sets.iter().map(|(n, k)| (name(n), *k)).collect();
        flush_sets.extend(want.sets.iter().map(|(n, d)| (*n, SetKind::of(d))));
        for (q, kind) in flush_sets {
            let at = self.at(q);
            self.line(format!("flush {kind} {at}"));
        }
        for (q, (_, rules)) in &want.chains {
            self.add_rules(*q, rules);
        }
        for (q, elements) in &want.elements {
            self.add_elements_of(*q, elements);
        }
        for q in (kernel.chains.iter()).filter(|c| !want.chains.contains_key(&name(c))) {
            let at = self.at(name(q));
            self.line(format!("delete chain {at}"));
        }
        for (q, kind) in (kernel.sets.iter()).filter(|(n, _)| !want.sets.contains_key(&name(n))) {
            let at = self.at(name(q));
            self.line(format!("delete {kind} {at}"));
        }
        self.finish()
    }

    /// Repairs `drift` only: a full reconcile restricted to the drifted
    /// chains and sets (and the kernel's objects of those names).
    pub fn repair(self, want: &Wanted<'_>, kernel: &Listing, drift: &Drift) -> String {
        let kernel = Listing {
            chains: (kernel.chains.iter())
                .filter(|q| drift.chains.contains(*q))
                .cloned()
                .collect(),
            sets: (kernel.sets.iter())
                .filter(|(q, _)| drift.sets.contains(*q))
                .map(|(q, k)| (q.clone(), *k))
                .collect(),
        };
        self.full(&want.only(drift), &kernel)
    }

    /// Only what the changed fragments add or remove: `old` and `new` are
    /// the changed keys' objects before and after; `refs` counts each
    /// object's references before, `diff` their change.
    pub fn delta(
        mut self,
        old: &Objects,
        new: &Objects,
        refs: &super::refs::Refs,
        diff: &BTreeMap<Obj, i64>,
    ) -> String {
        let counts = Counts { refs, diff };
        let added = |o: &Obj| counts.added(o);
        let removed = |o: &Obj| counts.removed(o);
        let chain = |(f, n): &Qualified| Obj::Chain(*f, n.clone());
        let set = |(f, n): &Qualified| Obj::Set(*f, n.clone());
        for (f, name, e) in &old.elements {
            if removed(&Obj::Element(*f, name.clone(), e.clone())) {
                // Map elements are deleted by key alone.
                let key = e.split(" : ").next().unwrap_or(e);
                let at = self.at((*f, name));
                self.line(format!("delete element {at} {{ {key} }}"));
            }
        }
        let changed_chains: Vec<&Qualified> = new
            .chains
            .iter()
            .filter(|(q, c)| !added(&chain(q)) && old.chains.get(*q).is_some_and(|o| o != *c))
            .map(|(q, _)| q)
            .collect();
        let removed_chains: Vec<&Qualified> =
            old.chains.keys().filter(|q| removed(&chain(q))).collect();
        for q in changed_chains.iter().chain(&removed_chains) {
            let at = self.at(name(q));
            self.line(format!("flush chain {at}"));
        }
        let changed_sets: Vec<&Qualified> = new
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
            let at = self.at(name(q));
            self.line(format!("delete {} {at}", SetKind::of(&old.sets[q])));
        }
        for (q, decl) in &new.sets {
            if added(&set(q)) || changed_sets.contains(&q) {
                self.add_set(name(q), decl);
            }
        }
        for (q, (hook, _)) in &new.chains {
            if added(&chain(q)) {
                self.add_chain(name(q), hook.as_deref());
            }
        }
        for (q, (_, rules)) in &new.chains {
            if added(&chain(q)) || changed_chains.contains(&q) {
                self.add_rules(name(q), rules);
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
        self.add_elements(&added_elements);
        for q in removed_chains {
            let at = self.at(name(q));
            self.line(format!("delete chain {at}"));
        }
        self.finish()
    }
}
