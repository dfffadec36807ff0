//! What the dataplane keeps account of around its kernel calls: time per
//! family for upstream's sync histograms, upstream's rule counts, and the
//! one sysctl localhost node ports need.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::Result;

use super::kernel::IptablesKernel;
use super::{Contributions, IptablesDataplane, LOCALNET_GUARD, canary};

impl IptablesDataplane {
    /// Runs one kernel call of a family, adding its time to the sync's.
    pub(super) fn timed<R>(
        &mut self,
        ipv6: bool,
        call: impl FnOnce(&mut dyn IptablesKernel) -> R,
    ) -> R {
        let start = Instant::now();
        let out = call(&mut *self.kernel);
        let spent = &mut self.spent[usize::from(ipv6)];
        *spent = (spent.0 + start.elapsed(), true);
        out
    }

    /// Observes the sync that just ended (full or partial) per family
    /// touched, as upstream's per-family proxiers each observe theirs.
    pub(super) fn observe(&mut self, full: bool) {
        for (i, (took, touched)) in std::mem::take(&mut self.spent).into_iter().enumerate() {
            if touched {
                self.metrics.observe_sync(i == 1, full, took);
            }
        }
    }

    /// Node ports on 127.0.0.1 need the kernel to route loopback
    /// destinations; the plan asks for it by holding the localnet guard,
    /// which lands in the same sync (filter is restored before nat).
    pub(super) fn ensure_route_localnet(&mut self, chains: &Contributions) -> Result<()> {
        let guard = (false, "filter".to_string(), LOCALNET_GUARD.to_string());
        if !self.route_localnet && chains.contains_key(&guard) {
            self.kernel.enable_route_localnet()?;
            self.route_localnet = true;
        }
        Ok(())
    }

    /// Upstream's rule counts after a successful sync: every rule in our
    /// chains per table, and the ones this sync wrote (`-A`, `written`).
    pub(super) fn count_rules(
        &self,
        chains: &Contributions,
        written: BTreeMap<(bool, String), u64>,
    ) {
        let mut total: BTreeMap<(String, bool), u64> = BTreeMap::new();
        for ((ipv6, table, _), c) in chains {
            let rules: usize = c.values().map(Vec::len).sum();
            *total.entry((table.clone(), *ipv6)).or_default() += rules as u64;
        }
        let mut last: BTreeMap<(String, bool), u64> =
            total.keys().map(|k| (k.clone(), 0)).collect();
        for ((ipv6, table), n) in written {
            *last.entry((table, ipv6)).or_default() += n;
        }
        self.metrics.set_rules(total, last);
    }
}

/// What a sync's restores wrote: rules per (ipv6, table) (`-A` lines, the
/// canary's aside) and the tables whose canary they wrote.
#[derive(Default)]
pub(super) struct Written {
    pub rules: BTreeMap<(bool, String), u64>,
    pub canaries: BTreeSet<(bool, String)>,
}

impl Written {
    pub fn add(&mut self, ipv6: bool, table: &str, text: &str) {
        let key = (ipv6, table.to_string());
        let mut rules = 0;
        for line in text.lines().filter(|l| l.starts_with("-A ")) {
            if canary::is_canary_line(line) {
                self.canaries.insert(key.clone());
            } else {
                rules += 1;
            }
        }
        *self.rules.entry(key).or_default() += rules;
    }
}
