//! The packet-filter half of IPVS mode: the nftables items a fragment
//! carries beside its IPVS items (masquerade marks, hairpin, source
//! ranges, reject/drop for no endpoints; see docs/ipvs.md) go to a
//! composed nftables dataplane, which applies them incrementally in kwp's
//! own table, adopts a previous instance's table at its first apply and
//! deletes only its own objects. The IPVS dataplane keeps the record of
//! which filter part of each fragment is in force, so a fragment whose
//! IPVS calls fail has its filter part put back too: the whole Service
//! keeps its last good state.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::{Dataplane, FragmentKey};
use crate::model::ServicePortName;
use crate::plan::{Fragment, Item, Plan};

pub(super) struct Filter {
    dataplane: Box<dyn Dataplane>,
    /// The filter part of each fragment in force (absent: none).
    pub applied: BTreeMap<FragmentKey, Fragment>,
}

/// A fragment's IPVS items (and anything else, which the IPVS parser
/// refuses by name) and its nftables items.
pub(super) fn split(fragment: &Fragment) -> (Fragment, Fragment) {
    let (nft, ipvs): (Vec<Item>, Vec<Item>) = fragment.items.iter().cloned().partition(|i| {
        matches!(
            i,
            Item::NftChain { .. } | Item::NftSet { .. } | Item::NftElement { .. }
        )
    });
    (
        Fragment { items: ipvs.into() },
        Fragment { items: nft.into() },
    )
}

/// The packet-filter part of a plan (its nftables items), for
/// `--dry-run`'s diff against the kernel.
pub fn filter_plan(plan: &Plan) -> Plan {
    Plan {
        base: split(&plan.base).1,
        services: plan
            .services
            .iter()
            .map(|(k, f)| (k.clone(), split(f).1))
            .collect(),
        context: BTreeMap::new(),
    }
}

impl Filter {
    pub fn new(dataplane: Box<dyn Dataplane>) -> Self {
        Self {
            dataplane,
            applied: BTreeMap::new(),
        }
    }

    /// Applies the filter parts that differ from what is in force; returns
    /// the refused ones (all or nothing when `!one_by_one`: then `Err`).
    pub fn apply(
        &mut self,
        parts: &[(FragmentKey, Option<Fragment>)],
        one_by_one: bool,
    ) -> Result<Vec<(FragmentKey, anyhow::Error)>> {
        let changed: Vec<(FragmentKey, Option<Fragment>)> = parts
            .iter()
            .map(|(k, f)| (k.clone(), f.clone().filter(|f| !f.items.is_empty())))
            .filter(|(k, f)| self.applied.get(k) != f.as_ref())
            .collect();
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let refused = self.send(&changed, one_by_one)?;
        for (key, fragment) in changed {
            if refused.iter().any(|(k, _)| *k == key) {
                continue;
            }
            match fragment {
                Some(f) => self.applied.insert(key, f),
                None => self.applied.remove(&key),
            };
        }
        Ok(refused)
    }

    /// Puts the filter parts of `keys` back to `before` (their IPVS part
    /// was refused). A failure is logged; the next resync repairs it.
    pub fn restore(&mut self, keys: &[FragmentKey], before: &BTreeMap<FragmentKey, Fragment>) {
        let back: Vec<(FragmentKey, Option<Fragment>)> = keys
            .iter()
            .map(|k| (k.clone(), before.get(k).cloned()))
            .filter(|(k, f)| self.applied.get(k) != f.as_ref())
            .collect();
        if back.is_empty() {
            return;
        }
        match self.send(&back, true) {
            Ok(refused) if refused.is_empty() => {}
            Ok(refused) => {
                for (key, e) in refused {
                    tracing::warn!(
                        ?key,
                        error = format!("{e:#}"),
                        "restoring a packet filter part"
                    );
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "restoring packet filter parts"),
        }
        for (key, fragment) in back {
            match fragment {
                Some(f) => self.applied.insert(key, f),
                None => self.applied.remove(&key),
            };
        }
    }

    pub fn resync(&mut self) -> Result<()> {
        self.dataplane.resync().context("IPVS packet filter")
    }

    fn send(
        &mut self,
        changes: &[(FragmentKey, Option<Fragment>)],
        one_by_one: bool,
    ) -> Result<Vec<(FragmentKey, anyhow::Error)>> {
        let empty = Fragment::default();
        let mut base = None;
        let mut services: Vec<(ServicePortName, Option<&Fragment>)> = Vec::new();
        for (key, fragment) in changes {
            match key {
                // The base is never removed, only emptied.
                None => base = Some(fragment.as_ref().unwrap_or(&empty)),
                Some(name) => services.push((name.clone(), fragment.as_ref())),
            }
        }
        if one_by_one {
            Ok(self.dataplane.apply(base, &services)?.refused)
        } else {
            self.dataplane.apply_all(base, &services)?;
            Ok(Vec::new())
        }
    }
}
