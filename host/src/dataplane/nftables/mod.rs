//! The nftables dataplane: applies fragment deltas to the host's own `ip`
//! and `ip6` tables, one atomic transaction each (`script` writes them,
//! `kernel` runs them).
//!
//! - The first apply is a full reconcile: the table is not flushed, but
//!   every chain and set in the plan or in the kernel is flushed and
//!   refilled, and objects no longer in the plan are deleted, in one
//!   transaction; so start-up adopts a previous run's table with no gap in
//!   service. Every `resync` (syncPeriod) does the same, repairing edits
//!   made behind our back.
//! - After that, each apply sends only what changed, with reference counts
//!   for objects that fragments share.
//! - A refused transaction never takes the others down: a refused delta
//!   is retried change by change, and a refused full reconcile finds, by
//!   checking (not committing) halves, the largest set of changes the
//!   kernel takes, applies those and reports the rest by name. An `nft`
//!   that is missing or hung refused nothing: the whole sync fails (and
//!   health follows, as upstream's), instead of every Service failing on
//!   its own while the sync counts as a success.
//! - A delta that only adds and deletes elements of existing sets (most
//!   changes of a plain Service) goes to the kernel as one nf_tables
//!   netlink batch instead of through `nft` (`elements`), unless
//!   `KWP_NFT_ELEMENTS_VIA_NFT=1`; what the encoder does not understand
//!   goes through nft text.

mod abi;
mod diff;
mod elements;
pub mod fake;
pub mod kernel;
mod netlink;
mod refs;
mod script;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_drift;
#[cfg(test)]
mod tests_elements;
mod wanted;

use std::collections::BTreeMap;

use anyhow::{Context, Result};

pub use diff::diff_against_kernel;
use elements::{ElementBatch, Layout};
use kernel::{Listing, NftKernel, NftProcess, Summary};
pub use netlink::{chain_names, chain_summaries, element_count, generation};
use refs::Refs;
use script::{Counts, Obj, Objects, Qualified, Script};
use wanted::Wanted;

use super::{Applied, Change, Dataplane, FragmentKey, changes};
use crate::dataplane::tool::is_unavailable;
use crate::model::ServicePortName;
use crate::plan::Fragment;

pub struct NftDataplane {
    table: String,
    kernel: Box<dyn NftKernel>,
    /// What is in force, fragment by fragment.
    applied: BTreeMap<FragmentKey, Fragment>,
    refs: Refs,
    /// No full reconcile has succeeded yet: `applied` says nothing about
    /// the kernel, which may hold a previous run's rules.
    needs_full: bool,
    /// Chain and set summaries seen at the last resync, for objects no
    /// delta has touched since: a later difference is drift.
    known: BTreeMap<Obj, Summary>,
    /// Periodic checks that found and repaired drift.
    pub repairs: u64,
    /// Transactions applied and failed, for metrics.
    pub transactions: u64,
    pub failures: u64,
    /// Of `transactions`, the element-only deltas sent as netlink batches.
    pub element_batches: u64,
    /// Every set's declaration, for encoding its elements: a changed
    /// fragment's elements are mostly in sets other fragments declare.
    declarations: BTreeMap<Qualified, String>,
    /// Element deltas through nft text too (`KWP_NFT_ELEMENTS_VIA_NFT=1`):
    /// the path before netlink, for comparison.
    elements_via_nft: bool,
}

/// A bigger element batch goes through nft: one netlink send must fit
/// the socket's send buffer (~208 KiB by default), and a transaction
/// cannot be split.
const MAX_ELEMENT_BATCH: usize = 128 << 10;

impl NftDataplane {
    /// Through the `nft` process.
    pub fn new(table: &str) -> Self {
        Self::with_kernel(table, Box::new(NftProcess))
    }

    pub fn with_kernel(table: &str, kernel: Box<dyn NftKernel>) -> Self {
        Self {
            table: table.into(),
            kernel,
            applied: BTreeMap::new(),
            refs: Refs::default(),
            needs_full: true,
            known: BTreeMap::new(),
            repairs: 0,
            transactions: 0,
            failures: 0,
            element_batches: 0,
            declarations: BTreeMap::new(),
            elements_via_nft: std::env::var("KWP_NFT_ELEMENTS_VIA_NFT").is_ok_and(|v| v == "1"),
        }
    }

    /// Sends element-only deltas through nft text (`true`) or netlink
    /// (`false`), whatever the environment says.
    pub fn elements_via_nft(mut self, via_nft: bool) -> Self {
        self.elements_via_nft = via_nft;
        self
    }

    /// Compares the kernel with everything in force and repairs only
    /// what drifted (edits made behind our back). Before the first full
    /// reconcile has succeeded there is nothing known to be in force, and
    /// reconciling to that would delete a previous run's rules: the next
    /// apply reconciles instead.
    pub fn resync(&mut self) -> Result<()> {
        if self.needs_full {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let inventory = self.kernel.inventory(&self.table)?;
        let want = Wanted::of(self.applied.values())?;
        let drift = want.drift(&inventory, &self.known);
        tracing::debug!(
            took = ?started.elapsed(),
            chains = inventory.chains.len(),
            sets = inventory.sets.len(),
            drifted = drift.chains.len() + drift.sets.len(),
            "compared the kernel with the rules in force"
        );
        let chains = inventory
            .chains
            .iter()
            .map(|((f, n), s)| (Obj::Chain(*f, n.clone()), *s));
        let sets = inventory
            .sets
            .iter()
            .map(|((f, n), (_, s))| (Obj::Set(*f, n.clone()), *s));
        self.known = chains.chain(sets).collect();
        if drift.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            chains = ?drift.chains.iter().map(|(f, n)| format!("{f} {n}")).collect::<Vec<_>>(),
            sets = ?drift.sets.iter().map(|(f, n)| format!("{f} {n}")).collect::<Vec<_>>(),
            "nftables state drifted from what kube-wasm-proxy wrote; repairing those objects"
        );
        for (f, n) in &drift.chains {
            self.known.remove(&Obj::Chain(*f, n.clone()));
        }
        for (f, n) in &drift.sets {
            self.known.remove(&Obj::Set(*f, n.clone()));
        }
        let script = Script::new(&self.table).repair(&want, &inventory.listing(), &drift);
        self.run(&script)?;
        self.repairs += 1;
        Ok(())
    }

    fn run(&mut self, script: &str) -> Result<()> {
        self.transactions += 1;
        // nft transactions are all or nothing: on failure the kernel still
        // holds what `applied` says, so deltas can go on from there.
        self.kernel
            .run(script)
            .inspect_err(|_| self.failures += 1)
            .context("nftables transaction")
    }

    /// `run`, handing the script over (a full reconcile's).
    fn run_owned(&mut self, script: String) -> Result<()> {
        self.transactions += 1;
        self.kernel
            .run_owned(script)
            .inspect_err(|_| self.failures += 1)
            .context("nftables transaction")
    }

    /// An element-only delta as netlink batch, or `None` when the delta
    /// changes more than elements, an element's set layout is not one
    /// the encoder knows, or the batch is too big for one send.
    fn element_batch(
        &self,
        old: &Objects,
        new: &Objects,
        counts: &Counts<'_>,
    ) -> Option<ElementBatch> {
        if self.elements_via_nft {
            return None;
        }
        let (deleted, added) = elements::element_only_delta(old, new, counts)?;
        let layout_of = |q: &Qualified| {
            let declaration = (new.sets.get(q))
                .or_else(|| old.sets.get(q))
                .or_else(|| self.declarations.get(q));
            declaration.and_then(|d| Layout::of(d))
        };
        let batch = ElementBatch::encode(&self.table, &deleted, &added, layout_of)?;
        (!batch.is_empty() && batch.size() <= MAX_ELEMENT_BATCH).then_some(batch)
    }

    fn run_elements(&mut self, script: &str, batch: &ElementBatch) -> Result<()> {
        self.transactions += 1;
        self.element_batches += 1;
        self.kernel
            .run_elements(script, batch)
            .inspect_err(|_| self.failures += 1)
            .context("nftables element batch")
    }

    /// Applies `changes`: see the module comment. `one_by_one` false makes
    /// it all or nothing.
    fn apply_changes(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        // A fragment this dataplane cannot apply is refused on its own.
        let mut unusable = Vec::new();
        let changes: Vec<Change<'_>> = changes
            .into_iter()
            .filter(|(key, fragment)| match fragment.map(|f| Wanted::of([f])) {
                Some(Err(e)) => {
                    unusable.push((key.clone(), e));
                    false
                }
                _ => true,
            })
            .collect();
        if let Some((_, e)) = unusable.first()
            && !one_by_one
        {
            anyhow::bail!("{e:#}");
        }
        let mut applied = self.apply_usable(changes, one_by_one)?;
        applied.refused.extend(unusable);
        Ok(applied)
    }

    fn apply_usable(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        if !self.needs_full {
            return match self.apply_delta(&changes) {
                Ok(()) => Ok(Applied::all()),
                Err(e) if one_by_one && changes.len() > 1 && !is_unavailable(&e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "batch refused; applying changes one by one"
                    );
                    let mut applied = Applied::all();
                    for change in &changes {
                        if let Err(e) = self.apply_delta(std::slice::from_ref(change)) {
                            applied.refused.push((change.0.clone(), e));
                        }
                    }
                    Ok(applied)
                }
                Err(e) => Err(e),
            };
        }
        let next = with_changes(&self.applied, &changes);
        let kernel = self.kernel.list(&self.table)?;
        // The whole table as text (tens of MiB at 50k Services): handed
        // over, and gone before the reference counts are built.
        let script = full_over(&self.table, &next, &kernel)?;
        match self.run_owned(script) {
            Ok(()) => {
                self.reconciled(next);
                Ok(Applied::all())
            }
            Err(e) if one_by_one && changes.len() > 1 && !is_unavailable(&e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "full reconcile refused; finding the changes the kernel takes"
                );
                self.reconcile_what_passes(changes)
            }
            Err(e) => Err(e),
        }
    }

    /// A full reconcile of the largest set of `changes` that the kernel
    /// takes (found with `nft --check`, halving the refused sets), and the
    /// rest reported as refused.
    fn reconcile_what_passes(&mut self, changes: Vec<Change<'_>>) -> Result<Applied> {
        let kernel = self.kernel.list(&self.table)?;
        let mut good = self.applied.clone();
        let mut refused = Vec::new();
        self.grow(&mut good, &changes, &kernel, &mut refused);
        let script = full_over(&self.table, &good, &kernel)?;
        self.run(&script)?;
        self.reconciled(good);
        Ok(Applied { refused })
    }

    /// Adds to `good` every change in `candidates` that the kernel takes
    /// together with `good`; checks all at once, then halves.
    fn grow(
        &mut self,
        good: &mut BTreeMap<FragmentKey, Fragment>,
        candidates: &[Change<'_>],
        kernel: &Listing,
        refused: &mut Vec<(FragmentKey, anyhow::Error)>,
    ) {
        if candidates.is_empty() {
            return;
        }
        let trial = with_changes(good, candidates);
        let checked =
            full_over(&self.table, &trial, kernel).and_then(|script| self.kernel.check(&script));
        match checked {
            Ok(()) => *good = trial,
            Err(e) if candidates.len() == 1 => refused.push((candidates[0].0.clone(), e)),
            Err(_) => {
                let (a, b) = candidates.split_at(candidates.len() / 2);
                self.grow(good, a, kernel, refused);
                self.grow(good, b, kernel, refused);
            }
        }
    }

    /// A full reconcile to `plan` succeeded.
    fn reconciled(&mut self, plan: BTreeMap<FragmentKey, Fragment>) {
        self.applied = plan;
        self.needs_full = false;
        self.known.clear();
        self.refs.clear();
        self.declarations.clear();
        for f in self.applied.values() {
            // Every applied fragment passed `Objects::of` in the script.
            let Ok(objects) = Objects::of([f]) else {
                continue;
            };
            for o in objects.keys() {
                self.refs.add(&o, 1);
            }
            self.declarations.extend(objects.sets);
        }
    }

    /// One delta transaction for `changes`; on success the host's view
    /// (fragments and reference counts) moves with the kernel.
    fn apply_delta(&mut self, changes: &[Change<'_>]) -> Result<()> {
        let old = Objects::of(changes.iter().filter_map(|(k, _)| self.applied.get(k)))?;
        let new = Objects::of(changes.iter().filter_map(|(_, f)| *f))?;
        let mut diff: BTreeMap<Obj, i64> = BTreeMap::new();
        for (key, fragment) in changes {
            if let Some(before) = self.applied.get(key) {
                for o in Objects::of([before])?.keys() {
                    *diff.entry(o).or_default() -= 1;
                }
            }
            if let Some(after) = fragment {
                for o in Objects::of([*after])?.keys() {
                    *diff.entry(o).or_default() += 1;
                }
            }
        }
        diff.retain(|_, d| *d != 0);
        let script = Script::new(&self.table).delta(&old, &new, &self.refs, &diff);
        if !script.is_empty() {
            let counts = Counts {
                refs: &self.refs,
                diff: &diff,
            };
            match self.element_batch(&old, &new, &counts) {
                Some(batch) => self.run_elements(&script, &batch)?,
                None => self.run(&script)?,
            }
        }
        // What the delta touched has a new summary: the next check
        // compares only its counts, then records it.
        for o in old.tables().chain(new.tables()) {
            self.known.remove(&o);
        }
        for o in diff.keys() {
            if let Obj::Element(f, set, _) = o {
                self.known.remove(&Obj::Set(*f, set.clone()));
            }
        }
        for (o, d) in diff {
            if self.refs.add(&o, d) == 0
                && let Obj::Set(f, name) = o
            {
                self.declarations.remove(&(f, name));
            }
        }
        self.declarations.extend(new.sets.clone());
        for (key, fragment) in changes {
            match fragment {
                Some(f) => self.applied.insert(key.clone(), (*f).clone()),
                None => self.applied.remove(key),
            };
        }
        Ok(())
    }
}

/// `plan` with `changes` made.
fn with_changes(
    plan: &BTreeMap<FragmentKey, Fragment>,
    changes: &[Change<'_>],
) -> BTreeMap<FragmentKey, Fragment> {
    let mut next = plan.clone();
    for (key, fragment) in changes {
        match fragment {
            Some(f) => next.insert(key.clone(), (*f).clone()),
            None => next.remove(key),
        };
    }
    next
}

/// The full reconcile of `plan` over `kernel`.
fn full_over(
    table: &str,
    plan: &BTreeMap<FragmentKey, Fragment>,
    kernel: &Listing,
) -> Result<String> {
    Ok(Script::new(table).full(&Wanted::of(plan.values())?, kernel))
}

impl Dataplane for NftDataplane {
    fn apply(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<Applied> {
        self.apply_changes(changes(base, changed), true)
    }

    fn apply_all(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<()> {
        self.apply_changes(changes(base, changed), false).map(drop)
    }

    fn resync(&mut self) -> Result<()> {
        NftDataplane::resync(self)
    }
}
