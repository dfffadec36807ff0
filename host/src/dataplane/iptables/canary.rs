//! Drift repair, as upstream's `KUBE-PROXY-CANARY`: a chain of ours that
//! nothing jumps to, written by every full reconcile into each table it
//! programs. When someone flushes iptables (an admin's `iptables -t nat
//! -F`, a firewall service restarting), the canary goes with our rules,
//! and the next check re-applies everything at once instead of waiting
//! for syncPeriod.
//!
//! Upstream's canary is an empty chain in mangle, nat and filter, and only
//! the mangle one is polled (every syncPeriod), so it notices a deleted
//! chain but not a flushed one, nor a flush of nat alone. Ours holds one
//! rule, so `-F` (rules flushed, chains kept) is noticed as well as `-X`,
//! and it lives in the tables our rules are in (nat and filter, per
//! family), each checked: the check is `iptables -t TABLE -S CANARY`,
//! which lists that one chain (measured 7 ms on iptables-nft with 40,000
//! rules in nat, 77 ms on iptables-legacy, which reads the whole table).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;

use super::FragmentKey;
use super::kernel::IptablesKernel;

pub const CANARY: &str = "KWP-PROXY-CANARY";
/// Never reached (nothing jumps here); its presence is the signal.
const CANARY_RULE: &str = "-j RETURN";

/// The shortest time between checks.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Checks may cost at most 1/COST_FACTOR of the time (2 % of a core).
const COST_FACTOR: u32 = 50;

/// The canary as a plan chain: its name and its one rule.
pub fn chain() -> (String, BTreeMap<FragmentKey, Vec<String>>) {
    (
        CANARY.to_string(),
        [(None, vec![CANARY_RULE.to_string()])].into(),
    )
}

/// Whether a restore line writes the canary's rule.
pub fn is_canary_line(line: &str) -> bool {
    line.strip_prefix("-A ")
        .is_some_and(|rest| rest.starts_with(CANARY) && rest[CANARY.len()..].starts_with(' '))
}

/// The tables whose canary is gone or no longer holds its rule. A check
/// the kernel cannot answer (the xtables lock held too long) is an error,
/// not drift.
pub fn missing(
    kernel: &mut dyn IptablesKernel,
    tables: &BTreeSet<(bool, String)>,
) -> Result<Vec<(bool, String)>> {
    let mut gone = Vec::new();
    for (ipv6, table) in tables {
        let rules = kernel.chain_rules(*ipv6, table, CANARY)?;
        if !rules.is_some_and(|r| r.iter().any(|r| r == CANARY_RULE)) {
            gone.push((*ipv6, table.clone()));
        }
    }
    Ok(gone)
}

/// When to check again after a check that took `took`.
pub fn interval(took: Duration) -> Duration {
    (took * COST_FACTOR).max(MIN_INTERVAL)
}
