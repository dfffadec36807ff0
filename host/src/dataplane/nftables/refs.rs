//! How many applied fragments use each kernel object (a class chain, a
//! hairpin element for a pod behind two Services): an object is created
//! with its first user and deleted with its last.
//!
//! Elements are nearly all of them (several per endpoint), so they are
//! kept by set, each element's text once: an [`Obj::Element`] per entry
//! spelled its set's name out again beside the element (~19 MB of heap
//! at 10k Services, docs/performance.md).

use std::collections::{BTreeMap, HashMap};

use super::script::Obj;
use crate::plan::NftFamily;

#[derive(Default)]
pub struct Refs {
    /// Chains and sets: a few per Service with chains of its own.
    tables: BTreeMap<Obj, usize>,
    /// family -> set -> element -> users.
    elements: HashMap<NftFamily, HashMap<String, HashMap<Box<str>, usize>>>,
}

impl Refs {
    /// How many fragments use `o` (0: not in force).
    pub fn get(&self, o: &Obj) -> usize {
        match o {
            Obj::Element(f, set, e) => (self.elements.get(f))
                .and_then(|sets| sets.get(set.as_str()))
                .and_then(|elements| elements.get(e.as_str()))
                .copied()
                .unwrap_or(0),
            other => self.tables.get(other).copied().unwrap_or(0),
        }
    }

    /// Adds `by` users to `o` (negative: removes), never below 0; the
    /// count after.
    pub fn add(&mut self, o: &Obj, by: i64) -> usize {
        let moved = |count: usize| (count as i64 + by).max(0) as usize;
        match o {
            Obj::Element(f, set, e) => {
                let sets = self.elements.entry(*f).or_default();
                let Some(elements) = sets.get_mut(set.as_str()) else {
                    let after = moved(0);
                    if after > 0 {
                        let elements = sets.entry(set.clone()).or_default();
                        elements.insert(e.as_str().into(), after);
                    }
                    return after;
                };
                let after = moved(elements.get(e.as_str()).copied().unwrap_or(0));
                if after == 0 {
                    elements.remove(e.as_str());
                    if elements.is_empty() {
                        sets.remove(set.as_str());
                    }
                } else if let Some(count) = elements.get_mut(e.as_str()) {
                    *count = after;
                } else {
                    elements.insert(e.as_str().into(), after);
                }
                after
            }
            other => {
                let after = moved(self.tables.get(other).copied().unwrap_or(0));
                if after == 0 {
                    self.tables.remove(other);
                } else {
                    self.tables.insert(other.clone(), after);
                }
                after
            }
        }
    }

    pub fn clear(&mut self) {
        self.tables.clear();
        self.elements.clear();
    }

    /// The chains and sets in use.
    #[cfg(test)]
    pub fn tables(&self) -> impl Iterator<Item = &Obj> {
        self.tables.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_up_and_down_to_nothing() {
        let mut refs = Refs::default();
        let e = Obj::Element(NftFamily::Ip, "s".into(), "1.2.3.4".into());
        let c = Obj::Chain(NftFamily::Ip, "c".into());
        assert_eq!(refs.add(&e, 2), 2);
        assert_eq!(refs.add(&c, 1), 1);
        assert_eq!(refs.get(&e), 2);
        assert_eq!(
            refs.get(&Obj::Element(NftFamily::Ip6, "s".into(), "1.2.3.4".into())),
            0
        );
        assert_eq!(refs.add(&e, -1), 1);
        assert_eq!(refs.add(&e, -5), 0);
        assert_eq!(refs.add(&c, -1), 0);
        assert_eq!(refs.get(&e), 0);
        assert!(refs.elements[&NftFamily::Ip].is_empty() && refs.tables.is_empty());
    }
}
