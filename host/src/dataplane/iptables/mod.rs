//! The iptables dataplane: applies fragment deltas to the host's own
//! `KWP-` chains with `iptables-restore --noflush` (and ip6tables), one
//! restore per table and family per sync.
//!
//! - A chain's rules are the rules every fragment gives for it, in
//!   fragment order (the base declares the shared dispatch chains empty;
//!   Services add their rules to them).
//! - The first apply is a full reconcile: every plan chain is rewritten,
//!   `KWP-` chains no longer in the plan are flushed and deleted, and the
//!   jumps from the built-in chains are made exactly one each, all in one
//!   restore per table, so a previous instance's chains are adopted with
//!   no gap in service.
//! - Every `resync` (syncPeriod) compares the kernel with what was
//!   learned after each write and rewrites only what drifted (`resync`).
//! - After that a delta rewrites only chains whose rules changed; in a
//!   shared chain it deletes and appends only the changed Services' rules.
//! - A refused delta falls back to a full reconcile; a refused full
//!   reconcile finds (by `--test` restores, halving) the largest set of
//!   changes the kernel takes and reports the rest by name.
//! - Every full reconcile also writes a canary chain into each table it
//!   programs; when one is found flushed or deleted (someone flushed
//!   iptables), everything is re-applied at once (`canary`).

mod accounting;
mod canary;
mod compare;
mod delta;
mod diff;
pub mod fake;
pub mod kernel;
mod resync;
mod scripts;
mod staged;
#[cfg(test)]
mod staged_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compare;
#[cfg(test)]
mod tests_missing;
#[cfg(test)]
mod tests_resync;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use accounting::Written;
pub use compare::CompareCost;
pub use diff::diff_against_kernel;
use kernel::{Backend, IptablesKernel, IptablesProcess, parse_save};
use scripts::{delta_scripts, full_scripts, full_scripts_skipping};
use staged::{Stage, Staged};

use super::tool::is_unavailable;
use super::{Applied, Change, Dataplane, FragmentKey, changes};
use crate::metrics::IptablesMetrics;
use crate::model::ServicePortName;
use crate::plan::{Fragment, Item};

/// (ipv6, table, chain)
type ChainKey = (bool, String, String);
/// Restore text per (ipv6, table).
type Scripts = BTreeMap<(bool, String), String>;
/// Each chain's rules, by the fragment that gives them.
type Contributions = BTreeMap<ChainKey, BTreeMap<FragmentKey, Vec<String>>>;
type Plan = BTreeMap<FragmentKey, Fragment>;
/// `iptables-save` of each (ipv6, table), parsed: chain -> rules.
type Saved = BTreeMap<(bool, String), BTreeMap<String, Vec<String>>>;

/// The jumps from built-in chains into ours, as upstream installs them
/// (table, built-in chain, match, our chain); each is installed when the
/// plan has the chain.
const JUMPS: &[(&str, &str, &str, &str)] = &[
    // The localnet guard, first (upstream's KUBE-FIREWALL).
    ("filter", "INPUT", "", LOCALNET_GUARD),
    ("filter", "OUTPUT", "", LOCALNET_GUARD),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "KWP-PROXY-FIREWALL",
    ),
    ("filter", "INPUT", "", "KWP-NODEPORTS"),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "KWP-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "KWP-PROXY-FIREWALL",
    ),
    ("filter", "FORWARD", "", "KWP-FORWARD"),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "KWP-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "KWP-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "KWP-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "KWP-SERVICES",
    ),
    ("nat", "PREROUTING", "", "KWP-SERVICES"),
    ("nat", "OUTPUT", "", "KWP-SERVICES"),
    ("nat", "POSTROUTING", "", "KWP-POSTROUTING"),
];

const TABLES: &[(bool, &str)] = &[
    (false, "filter"),
    (false, "nat"),
    (true, "filter"),
    (true, "nat"),
];

const PREFIX: &str = "KWP-";

/// The filter chain dropping martian traffic to 127.0.0.0/8, rendered
/// (IPv4) when node ports answer on localhost: its presence is what
/// turns `route_localnet` on.
const LOCALNET_GUARD: &str = "KWP-FIREWALL";

pub struct IptablesDataplane {
    kernel: Box<dyn IptablesKernel>,
    applied: Plan,
    /// `contributions(applied)`, kept up to date so that a delta looks
    /// only at the chains it changes.
    applied_chains: Contributions,
    /// No full reconcile has succeeded yet (or a restore failed): what is
    /// in the kernel is not known to be `applied`.
    needs_full: bool,
    /// Restores committed and refused.
    pub restores: u64,
    pub failures: u64,
    /// Upstream's iptables series, written here as restores happen.
    pub metrics: Arc<IptablesMetrics>,
    /// Kernel time per family (IPv4, IPv6) in the sync under way, and
    /// whether the family was touched at all.
    spent: [(Duration, bool); 2],
    /// The (ipv6, table)s whose canary the last full reconcile wrote.
    canaries: BTreeSet<(bool, String)>,
    /// How long the last canary check took (the next waits 50 times that).
    canary_check_took: Duration,
    /// `route_localnet` is on (set once, never reset).
    route_localnet: bool,
    /// The apply under way is all or nothing (a reloaded mode on trial).
    all_or_nothing: bool,
    /// A table with more chains is fully reconciled in stages (`staged`).
    chunk_chains: usize,
    /// What the kernel held in each chain of ours and each built-in chain
    /// when we last wrote or checked it (`resync`); absent: not known.
    digests: BTreeMap<ChainKey, kernel::Summary>,
    /// The backend's generation when `digests` were last known to be all
    /// there is (nothing written since by anyone): a resync that finds it
    /// unchanged compares nothing.
    learned_generation: Option<u64>,
    /// Periodic resyncs that read and compared the tables.
    pub compares: u64,
    /// Periodic resyncs that found drift and repaired it (a restore each
    /// drifted table).
    pub repairs: u64,
    /// Every resync a full reconcile, learning nothing, as before
    /// compare-and-repair (`KWP_IPTABLES_FULL_RESYNC=1`): for A/B benches.
    full_resyncs: bool,
    /// The compare under way, its reads off the loop (`compare`).
    compare: Option<compare::Pending>,
    /// Whether a compare's reads run on a thread of their own (the real
    /// kernel); tests of the fake interleave them by hand.
    background_compare: bool,
    /// What the last finished compare cost.
    pub last_compare: CompareCost,
}

impl IptablesDataplane {
    /// Through the binaries of the backend the node already uses.
    pub fn new() -> Self {
        let backend = Backend::detect();
        tracing::info!(backend = backend.as_str(), "iptables backend");
        let mut dp = Self::with_kernel(Box::new(IptablesProcess { backend }));
        dp.background_compare = true;
        dp.metrics = Arc::new(IptablesMetrics::new(backend.as_str()));
        // iptables-legacy-restore replaces a whole table per commit: stages
        // would each pay that (not measured), so legacy keeps one restore.
        if backend != Backend::Nft {
            dp.chunk_chains = usize::MAX;
        }
        // For tests: stage every reconcile on a small cluster (the e2e
        // suite runs once with it, so staging is proven on the kernel).
        if std::env::var("KWP_IPTABLES_FULL_RESYNC").is_ok_and(|v| v == "1") {
            tracing::info!("iptables resync: a full reconcile every syncPeriod (as before)");
            dp.full_resyncs = true;
        }
        if let Some(n) = std::env::var("KWP_IPTABLES_CHUNK_CHAINS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            tracing::info!(chains = n, "iptables reconcile staged every {n} chains");
            dp.chunk_chains = n.max(1);
        }
        dp
    }

    pub fn with_kernel(kernel: Box<dyn IptablesKernel>) -> Self {
        Self {
            kernel,
            applied: Plan::new(),
            applied_chains: Contributions::new(),
            needs_full: true,
            restores: 0,
            failures: 0,
            metrics: Arc::new(IptablesMetrics::new("test")),
            spent: Default::default(),
            canaries: BTreeSet::new(),
            canary_check_took: Duration::ZERO,
            route_localnet: false,
            all_or_nothing: false,
            chunk_chains: staged::CHUNK_CHAINS,
            digests: BTreeMap::new(),
            learned_generation: None,
            compares: 0,
            repairs: 0,
            full_resyncs: false,
            compare: None,
            background_compare: false,
            last_compare: CompareCost::default(),
        }
    }

    /// Each table's restores in order, table after table; what they wrote.
    fn restore_staged(
        &mut self,
        staged: &Staged,
        plan: &Contributions,
        partial: bool,
    ) -> Result<Written> {
        if self.all_or_nothing && staged.values().map(Vec::len).sum::<usize>() > 1 {
            // Each restore commits its table alone: check every table
            // before committing any, so a refusal leaves all untouched.
            for ((ipv6, table), stages) in staged {
                for stage in stages {
                    let text = stage.text(table, plan);
                    self.timed(*ipv6, |k| k.check(*ipv6, table, &text))?;
                }
            }
        }
        let mut written = Written::default();
        for ((ipv6, table), stages) in staged {
            for stage in stages {
                let text = stage.text(table, plan);
                self.restores += 1;
                if let Err(e) = self.timed(*ipv6, |k| k.restore(*ipv6, table, &text)) {
                    self.failures += 1;
                    self.metrics.restore_failed(*ipv6, partial);
                    self.needs_full = true;
                    return Err(e);
                }
                written.add(*ipv6, table, &text);
            }
        }
        Ok(written)
    }

    fn saved(&mut self) -> Result<Saved> {
        let mut out = BTreeMap::new();
        for (ipv6, table) in TABLES {
            let text = self.timed(*ipv6, |k| k.survey(*ipv6, table))?;
            out.insert((*ipv6, table.to_string()), parse_save(&text));
        }
        Ok(out)
    }

    fn full(&mut self, plan: Plan) -> Result<()> {
        // What is in the kernel is not known to be `applied` until this
        // succeeds; and the old chains' rules are not kept alongside the
        // new ones (at 10k Services each copy is tens of MiB).
        self.needs_full = true;
        self.applied_chains = Contributions::new();
        // A compare under way would judge by what this replaces.
        self.compare = None;
        self.digests.clear();
        self.learned_generation = None;
        let result = self.full_restore(&plan);
        if result.is_ok() && !self.full_resyncs {
            let before = self.generation();
            let learned = TABLES
                .iter()
                .all(|(ipv6, table)| self.learn_table(*ipv6, table));
            self.learned_generation = self.generation_moved(before, 0).filter(|_| learned);
        }
        self.observe(true);
        let (chains, written) = result?;
        self.canaries = written.canaries;
        self.count_rules(&chains, written.rules);
        self.applied = plan;
        self.applied_chains = chains;
        self.needs_full = false;
        Ok(())
    }

    fn full_restore(&mut self, plan: &Plan) -> Result<(Contributions, Written)> {
        let saved = self.saved()?;
        let chains = contributions(plan)?;
        self.ensure_route_localnet(&chains)?;
        // All or nothing checks each text before committing any, which
        // needs every table in one text (a stage's --test would miss the
        // chains an earlier, uncommitted stage creates).
        let chunk = if self.all_or_nothing {
            usize::MAX
        } else {
            self.chunk_chains
        };
        let staged = staged::full_staged(&chains, &saved, chunk);
        let written = self.restore_staged(&staged, &chains, false)?;
        drop(staged);
        Ok((chains, written))
    }

    fn apply_changes(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        self.all_or_nothing = !one_by_one;
        let applied = self.apply_changes_now(changes, one_by_one);
        self.all_or_nothing = false;
        applied
    }

    fn apply_changes_now(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        // A fragment this dataplane cannot apply is refused on its own.
        let mut refused = Vec::new();
        let changes: Vec<Change<'_>> = changes
            .into_iter()
            .filter(|(key, f)| match f.map(|f| contributions([(key, f)])) {
                Some(Err(e)) => {
                    refused.push((key.clone(), e));
                    false
                }
                _ => true,
            })
            .collect();
        if let Some((_, e)) = refused.first()
            && !one_by_one
        {
            bail!("{e:#}");
        }
        if !self.needs_full {
            match self.delta(&changes) {
                Ok(true) => return Ok(Applied { refused }),
                // A chain built-in chains jump to came or went: the jumps
                // are made by the full reconcile only.
                Ok(false) => {}
                // A missing or hung tool: a full reconcile cannot do better.
                Err(e) if is_unavailable(&e) => return Err(e),
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "iptables delta refused; reconciling in full"
                ),
            }
        }
        let next = with_changes(&self.applied, &changes);
        match self.full(next) {
            Ok(()) => Ok(Applied { refused }),
            // A missing or hung tool refuses no Service: the batch fails
            // as a whole (the sync fails, health follows), as in nftables mode.
            Err(e) if one_by_one && !changes.is_empty() && !is_unavailable(&e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "full reconcile refused; finding the changes the kernel takes"
                );
                let saved = self.saved()?;
                let mut good = self.applied.clone();
                self.grow(&mut good, &changes, &saved, &mut refused);
                self.full(good)?;
                Ok(Applied { refused })
            }
            Err(e) => Err(e),
        }
    }

    /// Adds to `good` every change the kernel takes together with it
    /// (`--test` restores); checks all at once, then halves.
    fn grow(
        &mut self,
        good: &mut Plan,
        candidates: &[Change<'_>],
        saved: &Saved,
        refused: &mut Vec<(FragmentKey, anyhow::Error)>,
    ) {
        if candidates.is_empty() {
            return;
        }
        let trial = with_changes(good, candidates);
        let checked = contributions(&trial).and_then(|c| {
            dangling_jump(&c)?;
            full_scripts(&c, saved)
                .iter()
                .try_for_each(|((v6, t), text)| self.kernel.check(*v6, t, text))
        });
        match checked {
            Ok(()) => *good = trial,
            Err(e) if candidates.len() == 1 => refused.push((candidates[0].0.clone(), e)),
            Err(_) => {
                let (a, b) = candidates.split_at(candidates.len() / 2);
                self.grow(good, a, saved, refused);
                self.grow(good, b, saved, refused);
            }
        }
    }
}

impl Default for IptablesDataplane {
    fn default() -> Self {
        Self::new()
    }
}

/// Every chain the fragments give, with each fragment's rules.
fn contributions<'a>(
    fragments: impl IntoIterator<Item = (&'a FragmentKey, &'a Fragment)>,
) -> Result<Contributions> {
    let mut out = Contributions::new();
    for (key, fragment) in fragments {
        for item in fragment.items.iter() {
            let Item::IptablesChain {
                ipv6,
                table,
                name,
                rules,
            } = item
            else {
                bail!("the iptables dataplane cannot apply {item}");
            };
            out.entry((*ipv6, table.clone(), name.clone()))
                .or_default()
                .entry(key.clone())
                .or_default()
                .extend(rules.iter().cloned());
        }
    }
    Ok(out)
}

/// Refuses a plan holding a jump to one of our chains it lacks: the
/// restore would fail deleting that chain, and `iptables-nft-restore
/// --test` does not notice (seen when a new base alone was tried while the
/// Services still jumping to its old chains were refused).
fn dangling_jump(plan: &Contributions) -> Result<()> {
    for ((ipv6, table, chain), c) in plan {
        for rule in rules_of(c) {
            let mut words = rule.split_whitespace();
            while let Some(word) = words.next() {
                if (word == "-j" || word == "-g")
                    && let Some(target) = words.next()
                    && target.starts_with(PREFIX)
                    && !plan.contains_key(&(*ipv6, table.clone(), target.to_string()))
                {
                    bail!("{chain} jumps to {target}, which the plan no longer has");
                }
            }
        }
    }
    Ok(())
}

/// The chains of `plan` that built-in chains jump to.
fn jumped(plan: &Contributions) -> BTreeSet<(bool, &str, &str)> {
    plan.keys()
        .filter(|(_, table, name)| JUMPS.iter().any(|(t, _, _, c)| t == table && c == name))
        .map(|(ipv6, table, name)| (*ipv6, table.as_str(), name.as_str()))
        .collect()
}

fn rules_of(c: &BTreeMap<FragmentKey, Vec<String>>) -> Vec<&String> {
    c.values().flatten().collect()
}

/// `plan` with `changes` made.
fn with_changes(plan: &Plan, changes: &[Change<'_>]) -> Plan {
    let mut next = plan.clone();
    for (key, fragment) in changes {
        match fragment {
            Some(f) => next.insert(key.clone(), (*f).clone()),
            None => next.remove(key),
        };
    }
    next
}

/// The base first, then the services.
impl Dataplane for IptablesDataplane {
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

    /// Compares the kernel with what is in force and rewrites only what
    /// drifted (`resync`); a full reconcile only when the last write
    /// failed; nothing before the first reconcile (that would delete a
    /// previous run's chains before ours are known).
    fn resync(&mut self) -> Result<()> {
        if self.needs_full && self.applied.is_empty() {
            return Ok(());
        }
        if self.needs_full || self.full_resyncs {
            let plan = self.applied.clone();
            return self.full(plan);
        }
        self.compare_and_repair()
    }

    /// As often as 50 times one check's cost allows, at most once a second.
    fn drift_check_interval(&self) -> Option<Duration> {
        Some(canary::interval(self.canary_check_took))
    }

    /// Upstream's canary, checked in every table we program (not only the
    /// first): a canary chain gone or emptied means someone flushed
    /// iptables, so everything is re-applied now, not at the next resync.
    fn repair_drift(&mut self) -> Result<bool> {
        // A compare whose reads are in is finished here, not left for
        // the next syncPeriod.
        self.poll_compare()?;
        if self.needs_full || self.canaries.is_empty() {
            // Nothing known to be in place; the retry or resync does it.
            return Ok(false);
        }
        let start = Instant::now();
        let gone = canary::missing(&mut *self.kernel, &self.canaries);
        self.canary_check_took = start.elapsed();
        let gone = gone?;
        if gone.is_empty() {
            return Ok(false);
        }
        tracing::warn!(
            tables = ?gone,
            "iptables canary flushed or deleted behind our back; re-applying every rule now"
        );
        self.metrics
            .canary_resyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let plan = self.applied.clone();
        self.full(plan)?;
        Ok(true)
    }
}
