//! The periodic resync as compare-and-repair: the kernel is read, and
//! only what drifted from what we wrote is rewritten.
//!
//! After every write the dataplane learns what the kernel holds in each
//! chain it wrote (a count and a digest of the kernel's own form: nf_tables
//! rule expressions on the nft backend, `iptables-save` text on legacy),
//! and after a full reconcile in every chain of ours and every built-in
//! chain. The resync reads each table's summaries once and rewrites, in
//! one restore per table, only: chains whose summary differs from the one
//! learned (or whose count differs from the plan's, or that were never
//! learned), chains of ours that are missing, `KWP-` chains the plan does
//! not have (deleted), and our jumps in built-in chains whose summary
//! changed (checked rule by rule, as the full reconcile does). With no
//! drift it writes nothing. Before, every resync rewrote every chain: at
//! 10k Services ~10 s of work every syncPeriod, with changes waiting
//! behind it. The reads run off the sync loop (`compare`); chains our
//! deltas touched while they were out are left to those deltas.
//!
//! On legacy a single chain cannot be read for less than its whole table,
//! so deltas learn nothing: the chains they wrote are rewritten by the
//! next resync (and learned then, from the table read after it).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};

use super::compare::{CompareCost, Read, Reads};
use super::kernel::{Summaries, Summary};
use super::scripts::jump_lines;
use super::{ChainKey, IptablesDataplane, PREFIX, TABLES, canary, rules_of};

/// One chain's rules, by the fragment that gives them.
type Contribution = BTreeMap<crate::dataplane::FragmentKey, Vec<String>>;

/// The built-in chains of the nat and filter tables.
const BUILTINS: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// One table's drift and the restore text that repairs it.
struct Repair {
    /// Chains of ours missing or not as learned.
    drifted: Vec<String>,
    /// Chains of ours never learned (written by a delta on legacy).
    unlearned: Vec<String>,
    /// `KWP-` chains the plan lacks.
    stray: Vec<String>,
    /// Restore lines fixing our jumps in built-in chains.
    jumps: usize,
    text: Option<String>,
}

impl Repair {
    fn drift(&self) -> usize {
        self.drifted.len() + self.stray.len() + self.jumps
    }
}

impl IptablesDataplane {
    /// Compares every table with what was learned and repairs the drift:
    /// starts the compare (its reads off the loop, `compare`), or
    /// finishes the one under way if its reads are in.
    pub(super) fn compare_and_repair(&mut self) -> Result<()> {
        if self.compare.is_some() {
            return self.poll_compare();
        }
        let generation = self.generation();
        if generation.is_some() && generation == self.learned_generation {
            // Nothing written by anyone since everything was learned.
            return Ok(());
        }
        self.compares += 1;
        self.begin_compare(generation);
        match self.compare.as_ref().map(|p| &p.reads) {
            // Finished by a later poll (a drift check or the next resync).
            Some(Reads::Thread(_)) => Ok(()),
            _ => self.await_compare(),
        }
    }

    /// Compares the tables as `read` found them with what was learned,
    /// leaving out the chains our deltas touched since the reads began,
    /// and repairs the drift. Nothing if no compare is under way (a full
    /// reconcile came in between).
    pub(super) fn finish_compare(&mut self, read: Read) -> Result<()> {
        let Some(pending) = self.compare.take() else {
            return Ok(());
        };
        let finishing = std::time::Instant::now();
        if self.needs_full {
            // A write failed meanwhile: the retry reconciles in full.
            return Ok(());
        }
        let mut learned = pending.learned;
        let mut written = super::accounting::Written::default();
        let mut drifted_total = 0;
        for ((ipv6, table), kernel) in read.tables {
            let kernel = kernel.with_context(|| format!("reading table {table} (ipv6: {ipv6})"))?;
            let repair = self.repair_of(ipv6, &table, &kernel, &pending.touched)?;
            if repair.jumps == 0 {
                // Built-in chains whose jumps were found right: known
                // again (deltas never write them).
                for (name, summary) in kernel
                    .iter()
                    .filter(|(n, _)| BUILTINS.contains(&n.as_str()))
                {
                    let key = (ipv6, table.clone(), name.clone());
                    self.digests.insert(key, *summary);
                }
            }
            if repair.drift() + repair.unlearned.len() > self.chunk_chains {
                // Most of a table gone: the staged reconcile writes it.
                tracing::warn!(
                    table,
                    ipv6,
                    chains = repair.drift() + repair.unlearned.len(),
                    "most iptables chains drifted; reconciling in full"
                );
                self.observe(false);
                let plan = self.applied.clone();
                return self.full(plan);
            }
            let Some(text) = repair.text.as_deref() else {
                continue;
            };
            if repair.drift() > 0 {
                drifted_total += repair.drift();
                tracing::warn!(
                    table,
                    ipv6,
                    chains = ?repair.drifted,
                    stray = ?repair.stray,
                    jump_lines = repair.jumps,
                    "iptables rules drifted from what kube-wasm-proxy wrote; repairing those"
                );
            }
            if !repair.unlearned.is_empty() {
                tracing::debug!(
                    table,
                    chains = repair.unlearned.len(),
                    "rewriting the chains deltas wrote (not read back on this backend)"
                );
            }
            self.restores += 1;
            if let Err(e) = self.timed(ipv6, |k| k.restore(ipv6, &table, text)) {
                self.failures += 1;
                self.metrics.restore_failed(ipv6, true);
                self.observe(false);
                tracing::warn!(
                    error = format!("{e:#}"),
                    "iptables repair refused; reconciling in full"
                );
                let plan = self.applied.clone();
                return self.full(plan);
            }
            if repair.drift() > 0 {
                self.repairs += 1;
            }
            written.add(ipv6, &table, text);
            // What the repair left is what the next compare expects.
            learned &= self.learn_repaired(ipv6, &table, &repair, &kernel);
        }
        self.learned_generation = self
            .generation_moved(pending.generation, self.restores - pending.restores)
            .filter(|_| learned);
        self.observe(false);
        self.last_compare = CompareCost {
            wall: pending.started.elapsed(),
            on_the_loop: finishing.elapsed(),
            read_wall: read.took.0,
            read_cpu: read.took.1,
        };
        tracing::debug!(
            took = ?pending.started.elapsed(),
            reads = ?read.took,
            left_to_deltas = pending.touched.len(),
            repaired = drifted_total,
            "compared iptables with the rules in force"
        );
        if !written.rules.is_empty() {
            self.count_rules(&self.applied_chains, written.rules);
        }
        Ok(())
    }

    /// Learns what a repair rewrote (and the built-in chains, if it
    /// wrote our jumps), and forgets the stray chains it deleted: only
    /// those chains where single chains are cheap to read, the table
    /// otherwise (legacy). Whether it could.
    fn learn_repaired(
        &mut self,
        ipv6: bool,
        table: &str,
        repair: &Repair,
        kernel: &Summaries,
    ) -> bool {
        for name in &repair.stray {
            self.digests
                .remove(&(ipv6, table.to_string(), name.clone()));
        }
        let mut chains: BTreeSet<ChainKey> = (repair.drifted.iter())
            .chain(&repair.unlearned)
            .map(|n| (ipv6, table.to_string(), n.clone()))
            .collect();
        if repair.jumps > 0 {
            chains.extend(
                (kernel.keys())
                    .filter(|n| BUILTINS.contains(&n.as_str()))
                    .map(|n| (ipv6, table.to_string(), n.clone())),
            );
        }
        let names: Vec<&str> = chains.iter().map(|(_, _, n)| n.as_str()).collect();
        match self.timed(ipv6, |k| k.chain_summaries(ipv6, table, &names)) {
            Ok(Some(summaries)) => {
                for (key, summary) in chains.into_iter().map(|k| {
                    let s = summaries.get(&k.2).copied();
                    (k, s)
                }) {
                    match summary {
                        Some(s) => self.digests.insert(key, s),
                        None => self.digests.remove(&key),
                    };
                }
                true
            }
            Ok(None) => self.learn_table(ipv6, table),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    table,
                    "could not read back the chains just repaired; the next resync rewrites them"
                );
                for key in &chains {
                    self.digests.remove(key);
                }
                false
            }
        }
    }

    /// What must be rewritten in one table, given its summaries.
    fn repair_of(
        &mut self,
        ipv6: bool,
        table: &str,
        kernel: &Summaries,
        touched: &BTreeSet<ChainKey>,
    ) -> Result<Repair> {
        let key = |name: &str| (ipv6, table.to_string(), name.to_string());
        // Built-in chains unchanged since learned hold our jumps as we
        // left them; the others are read rule by rule.
        let mut trusted = BTreeSet::new();
        let mut builtins = BTreeMap::new();
        for (name, summary) in kernel
            .iter()
            .filter(|(n, _)| BUILTINS.contains(&n.as_str()))
        {
            let rules = if self.digests.get(&key(name)) == Some(summary) {
                trusted.insert(name.as_str());
                Vec::new()
            } else {
                let rules = self.timed(ipv6, |k| k.chain_rules(ipv6, table, name))?;
                rules.unwrap_or_default()
            };
            builtins.insert(name.clone(), rules);
        }
        let (canary_name, canary_rules) = canary::chain();
        // Our chains of this table with what was learned of each, the two
        // maps walked together in their shared order: no lookup key is
        // built per chain (at 10k Services, ~60k chains, those made the
        // compare's end hold the loop 1-2 s in a debug build, measured).
        let from = (ipv6, table.to_string(), String::new());
        let here = |(v6, t, _): &ChainKey| *v6 == ipv6 && t == table;
        let mut learned_of = (self.digests.range(from.clone()..))
            .take_while(|(k, _)| here(k))
            .map(|((_, _, n), s)| (n.as_str(), s))
            .peekable();
        let mut mine: Vec<(&String, &Contribution, Option<&Summary>)> = Vec::new();
        for ((_, _, name), c) in (self.applied_chains.range(from..)).take_while(|(k, _)| here(k)) {
            while learned_of.next_if(|(n, _)| *n < name.as_str()).is_some() {}
            let learned = learned_of.next_if(|(n, _)| *n == name).map(|(_, s)| s);
            mine.push((name, c, learned));
        }
        let wanted: Vec<&str> = mine.iter().map(|(n, _, _)| n.as_str()).collect();
        if !mine.is_empty() {
            let learned = self.digests.get(&key(&canary_name));
            mine.push((&canary_name, &canary_rules, learned));
        }
        // Rewritten: chains that drifted (missing, or not as learned) and
        // chains never learned (written where single chains are not read).
        let mut unlearned = Vec::new();
        let mut rewrite: Vec<(&String, Vec<&String>)> = Vec::new();
        let mut drifted = Vec::new();
        // Written or deleted by a delta since the reads began: as read,
        // they may be from before or after it.
        let touched: BTreeSet<&str> = (touched.iter())
            .filter(|k| here(k))
            .map(|(_, _, n)| n.as_str())
            .collect();
        for (name, c, learned) in mine {
            if touched.contains(name.as_str()) {
                continue;
            }
            let count: usize = c.values().map(Vec::len).sum();
            match kernel.get(name) {
                Some(_) if learned.is_none() => unlearned.push(name.clone()),
                Some(k) if learned == Some(k) && k.count == count => continue,
                _ => drifted.push(name.clone()),
            }
            rewrite.push((name, rules_of(c)));
        }
        let wanted = |chain: &str| wanted.binary_search(&chain).is_ok() || chain == canary_name;
        let stray: Vec<String> = kernel
            .keys()
            .filter(|n| n.starts_with(PREFIX) && !wanted(n) && !touched.contains(n.as_str()))
            .cloned()
            .collect();
        let jumps = jump_lines(table, wanted, &builtins, |n| trusted.contains(n));
        let mut repair = Repair {
            drifted,
            unlearned,
            stray,
            jumps: jumps.len(),
            text: None,
        };
        if rewrite.is_empty() && repair.stray.is_empty() && jumps.is_empty() {
            return Ok(repair);
        }
        let mut text = format!("*{table}\n");
        for name in rewrite.iter().map(|(n, _)| *n).chain(&repair.stray) {
            text.push_str(&format!(":{name} - [0:0]\n"));
        }
        for (name, rules) in &rewrite {
            for rule in rules {
                text.push_str(&format!("-A {name} {rule}\n"));
            }
        }
        for line in jumps.iter() {
            text.push_str(line);
            text.push('\n');
        }
        for name in &repair.stray {
            text.push_str(&format!("-X {name}\n"));
        }
        text.push_str("COMMIT\n");
        repair.text = Some(text);
        Ok(repair)
    }

    /// The backend's generation, `None` where it has none or it cannot be
    /// read (then every resync compares).
    pub(super) fn generation(&mut self) -> Option<u64> {
        self.kernel.generation().unwrap_or_else(|e| {
            tracing::debug!(error = format!("{e:#}"), "no nf_tables generation");
            None
        })
    }

    /// The generation now, if it is `before` moved by exactly our own
    /// `commits` (nobody else wrote meanwhile).
    pub(super) fn generation_moved(&mut self, before: Option<u64>, commits: u64) -> Option<u64> {
        let now = self.generation()?;
        (before? + commits == now).then_some(now)
    }

    /// Learns every chain of ours and every built-in chain of a table as
    /// the kernel holds it now; forgets the table on error (its chains are
    /// then rewritten by the next resync). Whether it could.
    pub(super) fn learn_table(&mut self, ipv6: bool, table: &str) -> bool {
        self.digests
            .retain(|(v6, t, _), _| !(*v6 == ipv6 && t == table));
        match self.timed(ipv6, |k| k.summaries(ipv6, table)) {
            Ok(summaries) => {
                for (name, summary) in summaries {
                    if name.starts_with(PREFIX) || BUILTINS.contains(&name.as_str()) {
                        self.digests
                            .insert((ipv6, table.to_string(), name), summary);
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    table,
                    ipv6,
                    "could not read back the table just written; the next resync rewrites it"
                );
                false
            }
        }
    }

    /// Learns the chains a delta wrote (where single chains are cheap to
    /// read), forgets them otherwise.
    /// Whether every one was learned.
    pub(super) fn learn_chains(&mut self, written: &BTreeSet<ChainKey>) -> bool {
        let mut all = true;
        for (ipv6, table) in TABLES {
            let names: Vec<&str> = written
                .iter()
                .filter(|(v6, t, _)| v6 == ipv6 && t == table)
                .map(|(_, _, n)| n.as_str())
                .collect();
            if names.is_empty() {
                continue;
            }
            let learned = self.timed(*ipv6, |k| k.chain_summaries(*ipv6, table, &names));
            let learned = learned.unwrap_or_else(|e| {
                tracing::warn!(
                    error = format!("{e:#}"),
                    table = *table,
                    "could not read back the chains just written; the next resync rewrites them"
                );
                None
            });
            for name in names {
                let key = (*ipv6, table.to_string(), name.to_string());
                match learned.as_ref().and_then(|l| l.get(name)) {
                    Some(summary) => self.digests.insert(key, *summary),
                    None => {
                        all = false;
                        self.digests.remove(&key)
                    }
                };
            }
        }
        all
    }
}
