//! A full reconcile of a large plan in several restores per table.
//!
//! `iptables-nft-restore` (1.8.9) is quadratic in the chains one restore
//! declares: measured on this machine, nat with 1k Services x 5
//! endpoints (6k chains) in 1.0 s, 2k in 4.5 s, 4k in 17.6 s, and
//! upstream's single restore of 10k took 591 s; the same 10k in restores
//! of 500 Services each took 9.9 s (docs/iptables.md). So a table with
//! more than `CHUNK_CHAINS` chains is written in stages, each one
//! transaction:
//!
//! 1. the chains the plan shares or the base owns that the kernel lacks,
//!    created empty (so the Services' chains can jump to them; nothing
//!    jumps to them yet);
//! 2. the chains each owned by one Service, whole Services per restore
//!    (a Service's chains jump only to its own and to shared ones), at
//!    most `CHUNK_CHAINS` chains each; nothing new is reachable yet, and a
//!    chain a previous run left is rewritten in one transaction, so its
//!    Service keeps working throughout (adoption without a gap);
//! 3. the rest, as the single-restore reconcile writes it: the shared and
//!    base chains (the dispatch chains, which make the new chains
//!    reachable at once), our jumps in the built-in chains, the canary,
//!    and the deletion of chains no longer in the plan.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use super::{ChainKey, Contributions, PREFIX, Saved, TABLES, full_scripts_skipping, rules_of};

/// Chains one restore declares at most (about 500 Services of 5
/// endpoints), where iptables-nft-restore's per-chain cost is still flat.
pub const CHUNK_CHAINS: usize = 3000;

/// One restore of a staged reconcile: its text, or the chains it declares
/// and fills, rendered only when it is restored (at 10k Services the
/// texts of all stages together are ~25 MiB).
pub enum Stage<'a> {
    Text(String),
    Chains(Vec<&'a ChainKey>),
}

impl Stage<'_> {
    pub fn text(&self, table: &str, plan: &Contributions) -> Cow<'_, str> {
        match self {
            Stage::Text(text) => Cow::Borrowed(text),
            Stage::Chains(chains) => Cow::Owned(chain_script(table, chains, plan)),
        }
    }
}

/// Restores per (ipv6, table), in the order they must be committed.
pub type Staged<'a> = BTreeMap<(bool, String), Vec<Stage<'a>>>;

/// The full reconcile of `plan` against `saved`, split as the module
/// comment says when a table has more than `chunk` chains; one text per
/// table otherwise.
pub fn full_staged<'a>(plan: &'a Contributions, saved: &Saved, chunk: usize) -> Staged<'a> {
    // The chains written by stage 2: one Service their only contributor.
    let mut owned: BTreeSet<&ChainKey> = BTreeSet::new();
    let mut stages: Staged = BTreeMap::new();
    for (ipv6, table) in TABLES {
        let key = (*ipv6, table.to_string());
        let mine: Vec<(&ChainKey, _)> = plan
            .iter()
            .filter(|((v6, t, _), _)| v6 == ipv6 && t == table)
            .collect();
        if mine.len() <= chunk {
            continue;
        }
        let mut texts = Vec::new();
        let empty = BTreeMap::new();
        let kernel = saved.get(&key).unwrap_or(&empty);
        // By Service, so that a Service's chains share a restore.
        let mut by_service: BTreeMap<_, Vec<&ChainKey>> = BTreeMap::new();
        for (k, c) in &mine {
            if let (1, Some((Some(service), _))) = (c.len(), c.iter().next()) {
                by_service.entry(service).or_default().push(k);
            }
        }
        let staged: BTreeSet<&ChainKey> = by_service.values().flatten().copied().collect();
        let missing: Vec<&String> = mine
            .iter()
            .filter(|(k, _)| !staged.contains(k) && !kernel.contains_key(&k.2))
            .map(|(k, _)| &k.2)
            .collect();
        if !missing.is_empty() {
            let mut text = format!("*{table}\n");
            for name in missing {
                text.push_str(&format!(":{name} - [0:0]\n"));
            }
            text.push_str("COMMIT\n");
            texts.push(Stage::Text(text));
        }
        let mut batch: Vec<&ChainKey> = Vec::new();
        for chains in by_service.values() {
            if !batch.is_empty() && batch.len() + chains.len() > chunk {
                texts.push(Stage::Chains(std::mem::take(&mut batch)));
            }
            batch.extend(chains);
        }
        if !batch.is_empty() {
            texts.push(Stage::Chains(batch));
        }
        owned.extend(staged);
        stages.insert(key, texts);
    }
    // Stage 3, and every table small enough for one restore.
    for (key, text) in full_scripts_skipping(plan, saved, &owned) {
        stages.entry(key).or_default().push(Stage::Text(text));
    }
    stages
}

/// Declares (creating or flushing) and fills `chains`, one transaction.
fn chain_script(table: &str, chains: &[&ChainKey], plan: &Contributions) -> String {
    let mut text = format!("*{table}\n");
    for (_, _, name) in chains {
        text.push_str(&format!(":{name} - [0:0]\n"));
    }
    for key in chains {
        for rule in plan.get(*key).map(rules_of).unwrap_or_default() {
            text.push_str(&format!("-A {} {rule}\n", key.2));
        }
    }
    text.push_str("COMMIT\n");
    debug_assert!(chains.iter().all(|(_, _, n)| n.starts_with(PREFIX)));
    text
}
