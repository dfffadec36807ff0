//! What a whole plan wants in the kernel, borrowed from its fragments: the
//! full reconcile and the drift check read every chain, set and element of
//! the plan, and at 50k Services an owned copy of them ([`Objects`]) was
//! the largest thing on the heap at the peak (17.9 MB at 10k).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};

use super::kernel::{Inventory, SetKind, Summary};
use super::script::{Obj, Objects, Qualified};
use crate::plan::{Fragment, Item, NftFamily};

type Fam = NftFamily;
/// `(family, name)` of a chain or set, borrowed.
pub type Name<'a> = (Fam, &'a str);

/// The objects of some fragments, flattened, as references into them.
#[derive(Clone, Default)]
pub struct Wanted<'a> {
    /// chain -> (hook, rules)
    pub(super) chains: BTreeMap<Name<'a>, (Option<&'a str>, &'a [String])>,
    /// set -> declaration
    pub(super) sets: BTreeMap<Name<'a>, &'a str>,
    /// set -> its elements, sorted, each once.
    pub(super) elements: BTreeMap<Name<'a>, Vec<&'a str>>,
}

/// `q` as a borrowed name, for lookups.
pub fn name(q: &Qualified) -> Name<'_> {
    (q.0, q.1.as_str())
}

pub fn owned((f, n): &Name<'_>) -> Qualified {
    (*f, n.to_string())
}

impl<'a> Wanted<'a> {
    /// Every item must be an nftables item of the `ip` or `ip6` family:
    /// anything else is for another dataplane and is refused, loudly. A
    /// chain or set declared twice keeps its last declaration.
    pub fn of(fragments: impl IntoIterator<Item = &'a Fragment>) -> Result<Self> {
        let mut w = Wanted::default();
        for item in fragments.into_iter().flat_map(|f| f.items.iter()) {
            let family = match item {
                Item::NftChain { family, .. }
                | Item::NftSet { family, .. }
                | Item::NftElement { family, .. } => *family,
                other => bail!(
                    "the nftables dataplane cannot apply {:?}",
                    other.to_string().trim()
                ),
            };
            if family == NftFamily::Inet {
                bail!("the nftables dataplane owns only ip and ip6 tables, not inet");
            }
            match item {
                Item::NftChain {
                    name, hook, rules, ..
                } => {
                    w.chains
                        .insert((family, name), (hook.as_deref(), rules.as_slice()));
                }
                Item::NftSet {
                    name, declaration, ..
                } => {
                    w.sets.insert((family, name), declaration);
                }
                Item::NftElement { set, element, .. } => {
                    w.elements.entry((family, set)).or_default().push(element);
                }
                _ => unreachable!("refused above"),
            }
        }
        for elements in w.elements.values_mut() {
            elements.sort_unstable();
            elements.dedup();
            elements.shrink_to_fit();
        }
        Ok(w)
    }

    /// An owned copy (the deltas' form: a few fragments at a time).
    pub fn to_objects(&self) -> Objects {
        let elements = self.elements.iter().flat_map(|((f, set), elements)| {
            (elements.iter()).map(move |e| (*f, set.to_string(), e.to_string()))
        });
        Objects {
            chains: (self.chains.iter())
                .map(|(q, (hook, rules))| (owned(q), (hook.map(String::from), rules.to_vec())))
                .collect(),
            sets: (self.sets.iter())
                .map(|(q, d)| (owned(q), d.to_string()))
                .collect(),
            elements: elements.collect(),
        }
    }

    /// How many elements of `set` are wanted.
    fn element_count(&self, set: &Name<'_>) -> usize {
        self.elements.get(set).map_or(0, Vec::len)
    }

    /// What differs between these (wanted) objects and the kernel's
    /// `inventory`: a missing or extra chain or set, a rule or element
    /// count that differs, or a digest that differs from the one `known`
    /// recorded for an object untouched since. Closed over nft 1.0.x's
    /// `typeof` limit: a `typeof` map is re-created, so the chains using
    /// it are refilled too, and a refilled chain re-creates the `typeof`
    /// maps it uses.
    pub fn drift(&self, inventory: &Inventory, known: &BTreeMap<Obj, Summary>) -> Drift {
        let mut drift = Drift::default();
        let differs = |obj: Obj, kernel: &Summary, count: usize| {
            kernel.count != count || known.get(&obj).is_some_and(|k| k != kernel)
        };
        for (q, (_, rules)) in &self.chains {
            let q = owned(q);
            let bad = inventory
                .chains
                .get(&q)
                .is_none_or(|k| differs(Obj::Chain(q.0, q.1.clone()), k, rules.len()));
            if bad {
                drift.chains.insert(q);
            }
        }
        for (n, decl) in &self.sets {
            let q = owned(n);
            let bad = match inventory.sets.get(&q) {
                None => true,
                Some((kind, _)) if *kind != SetKind::of(decl) => true,
                Some(_) if filled_by_packets(decl) => false,
                Some((_, k)) => differs(Obj::Set(q.0, q.1.clone()), k, self.element_count(n)),
            };
            if bad {
                drift.sets.insert(q);
            }
        }
        let extra_chains =
            (inventory.chains.keys()).filter(|q| !self.chains.contains_key(&name(q)));
        drift.chains.extend(extra_chains.cloned());
        let extra_sets = (inventory.sets.keys()).filter(|q| !self.sets.contains_key(&name(q)));
        drift.sets.extend(extra_sets.cloned());
        let is_typeof = |d: &str| d.trim_start().starts_with("typeof");
        let recreated = |q: &Qualified, drift: &Drift| {
            drift.sets.contains(q)
                && inventory.sets.contains_key(q)
                && self.sets.get(&name(q)).is_some_and(|d| is_typeof(d))
        };
        loop {
            let before = (drift.chains.len(), drift.sets.len());
            for (c, (_, rules)) in &self.chains {
                let uses = |set: &Name<'_>| {
                    set.0 == c.0 && rules.iter().any(|r| r.contains(&format!("@{}", set.1)))
                };
                let typeof_sets: Vec<Qualified> = (self.sets.iter())
                    .filter(|(s, d)| uses(s) && is_typeof(d))
                    .map(|(s, _)| owned(s))
                    .collect();
                let q = owned(c);
                if drift.chains.contains(&q) {
                    drift.sets.extend(typeof_sets);
                } else if typeof_sets.iter().any(|s| recreated(s, &drift)) {
                    drift.chains.insert(q);
                }
            }
            if (drift.chains.len(), drift.sets.len()) == before {
                return drift;
            }
        }
    }

    /// Only the chains and sets in `drift` (sets with their elements).
    pub fn only(&self, drift: &Drift) -> Wanted<'a> {
        let chain_drifted = |q: &Name<'_>| drift.chains.contains(&owned(q));
        let set_drifted = |q: &Name<'_>| drift.sets.contains(&owned(q));
        Wanted {
            chains: (self.chains.iter())
                .filter(|(q, _)| chain_drifted(q))
                .map(|(q, c)| (*q, *c))
                .collect(),
            sets: (self.sets.iter())
                .filter(|(q, _)| set_drifted(q))
                .map(|(q, d)| (*q, *d))
                .collect(),
            elements: (self.elements.iter())
                .filter(|(q, _)| set_drifted(q))
                .map(|(q, e)| (*q, e.clone()))
                .collect(),
        }
    }
}

/// Chains and sets whose kernel contents differ from what we wrote (or
/// that should not be there, or are missing): the periodic check repairs
/// only these.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drift {
    pub chains: BTreeSet<Qualified>,
    pub sets: BTreeSet<Qualified>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty()
    }
}

/// Whether the kernel, not us, fills a set (ClientIP affinity): its
/// elements are never compared.
fn filled_by_packets(declaration: &str) -> bool {
    declaration.contains("dynamic") || declaration.contains("timeout")
}
