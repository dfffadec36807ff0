//! A delta: only the chains the changed fragments give (before or after)
//! are looked at, so one change costs work proportional to the chains it
//! touches, not to the plan (at 10k Services, recomputing every chain's
//! rules twice per change cost more than the restore of a small table).

use std::collections::BTreeSet;

use anyhow::Result;

use super::{
    ChainKey, Contributions, IptablesDataplane, Stage, contributions, delta_scripts, jumped,
};
use crate::dataplane::Change;

impl IptablesDataplane {
    /// Applies `changes` as a delta restore. `Ok(false)`: nothing done, a
    /// chain the built-in chains jump to would come or go (only the full
    /// reconcile makes those jumps).
    pub(super) fn delta(&mut self, changes: &[Change<'_>]) -> Result<bool> {
        let old = contributions(
            changes
                .iter()
                .filter_map(|(k, _)| self.applied.get_key_value(k)),
        )?;
        let new = contributions(changes.iter().filter_map(|(k, f)| f.map(|f| (k, f))))?;
        let affected: BTreeSet<&ChainKey> = old.keys().chain(new.keys()).collect();
        // Those chains whole (every fragment's rules), before and after.
        let (mut before, mut after) = (Contributions::new(), Contributions::new());
        for key in &affected {
            let mut chain = self.applied_chains.get(*key).cloned().unwrap_or_default();
            if !chain.is_empty() {
                before.insert((*key).clone(), chain.clone());
            }
            for (fragment, _) in changes {
                chain.remove(fragment);
            }
            if let Some(rules) = new.get(*key) {
                chain.extend(rules.iter().map(|(k, r)| (k.clone(), r.clone())));
            }
            if !chain.is_empty() {
                after.insert((*key).clone(), chain);
            }
        }
        if jumped(&before) != jumped(&after) {
            return Ok(false);
        }
        // What the restore rewrites: chains that come or go, or whose
        // changed fragments give other rules (the rest of a shared chain
        // stays, so the whole chain need not be compared).
        let rewritten: BTreeSet<ChainKey> = affected
            .iter()
            .filter(|k| {
                before.contains_key(**k) != after.contains_key(**k) || old.get(**k) != new.get(**k)
            })
            .map(|k| (*k).clone())
            .collect();
        self.ensure_route_localnet(&after)?;
        let scripts = delta_scripts(&before, &after);
        let staged = scripts
            .into_iter()
            .map(|(k, text)| (k, vec![Stage::Text(text)]))
            .collect();
        let (before_generation, restores) = (self.generation(), self.restores);
        let restored = self.restore_staged(&staged, &Contributions::new(), true);
        // A compare under way leaves these chains alone (learned here).
        self.touched(rewritten.iter().cloned(), true);
        if restored.is_ok() {
            let (kept, gone): (BTreeSet<ChainKey>, _) =
                rewritten.into_iter().partition(|k| after.contains_key(k));
            for key in &gone {
                self.digests.remove(key);
            }
            let learned = self.learn_chains(&kept);
            self.touched([], learned);
            // Still all there is only if nobody else wrote since it was.
            let unchanged =
                before_generation.is_some() && before_generation == self.learned_generation;
            self.learned_generation = self
                .generation_moved(before_generation, self.restores - restores)
                .filter(|_| learned && unchanged);
        }
        self.observe(false);
        let written = restored?;
        for key in affected {
            match after.remove(key) {
                Some(chain) => self.applied_chains.insert(key.clone(), chain),
                None => self.applied_chains.remove(key),
            };
        }
        for (key, fragment) in changes {
            match fragment {
                Some(f) => self.applied.insert(key.clone(), (*f).clone()),
                None => self.applied.remove(key),
            };
        }
        self.count_rules(&self.applied_chains, written.rules);
        Ok(true)
    }
}
