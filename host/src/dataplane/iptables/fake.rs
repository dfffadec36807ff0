//! An in-memory iptables for tests, like upstream's fake iptables: it
//! executes the restore text the dataplane writes (`:CHAIN`, `-A`, `-I`,
//! `-D`, `-X`, `COMMIT`), table by table and all or nothing, refuses what
//! the kernel refuses (a rule in a missing chain, a jump to a missing
//! chain, deleting a missing rule or a chain still jumped to) and answers
//! `save` in `iptables-save` form. Clones share one state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};

use super::kernel::{IptablesKernel, Summaries, text_summaries};

type Chains = BTreeMap<String, Vec<String>>;

#[derive(Default)]
struct State {
    tables: BTreeMap<(bool, String), Chains>,
    restores: usize,
    /// Any restore containing one of these is refused.
    refuse: Vec<String>,
    route_localnet: bool,
    /// `check` misses what iptables-nft-restore `--test` misses: a chain
    /// deleted while still jumped to, a jump to a missing chain.
    lenient_check: bool,
    /// Reading one chain costs a whole table (legacy): `chain_summaries`
    /// answers `None`.
    whole_table_reads: bool,
    /// The text of the last committed restore.
    last: String,
    /// Moved by every commit and wipe, as nf_tables' generation.
    generation: u64,
    /// Every table after each committed restore, when recording.
    history: Option<Vec<((bool, String), Chains)>>,
    /// `summaries` waits while set (a compare's reads taking long).
    reads_held: bool,
    /// A held read gave up waiting (nobody released it in time).
    reads_waited_out: bool,
}

/// How long a held read waits before giving up.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Clone, Default)]
pub struct FakeIptables(Arc<Mutex<State>>);

fn builtins(table: &str) -> &'static [&'static str] {
    match table {
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        _ => &[],
    }
}

const TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
];

impl FakeIptables {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn refuse(&self, text: &str) {
        self.lock().refuse.push(text.into());
    }

    pub fn accept_all(&self) {
        self.lock().refuse.clear();
    }

    /// The text of the last committed restore.
    pub fn last_restore(&self) -> String {
        self.lock().last.clone()
    }

    /// Reads like iptables-legacy: no cheap read of single chains.
    pub fn whole_table_reads(&self) {
        self.lock().whole_table_reads = true;
    }

    /// Table reads (`summaries`) wait until `release_reads`, or give up
    /// after a few seconds (`reads_waited_out` then says so).
    pub fn hold_reads(&self) {
        self.lock().reads_held = true;
    }

    pub fn release_reads(&self) {
        self.lock().reads_held = false;
    }

    pub fn reads_waited_out(&self) -> bool {
        self.lock().reads_waited_out
    }

    pub fn lenient_check(&self) {
        self.lock().lenient_check = true;
    }

    /// From now on, keeps each table as every restore leaves it.
    pub fn record(&self) {
        self.lock().history = Some(Vec::new());
    }

    /// Each (ipv6, table) and its chains after every restore since
    /// `record`, in order.
    pub fn history(&self) -> Vec<((bool, String), BTreeMap<String, Vec<String>>)> {
        self.lock().history.clone().unwrap_or_default()
    }

    /// Whether `route_localnet` was turned on.
    pub fn route_localnet(&self) -> bool {
        self.lock().route_localnet
    }

    /// Restores committed.
    pub fn restores(&self) -> usize {
        self.lock().restores
    }

    /// The rules of a chain, `None` if it does not exist.
    pub fn rules(&self, ipv6: bool, table: &str, chain: &str) -> Option<Vec<String>> {
        self.lock()
            .tables
            .get(&(ipv6, table.to_string()))?
            .get(chain)
            .cloned()
    }

    fn rules_of_table(&self, ipv6: bool, table: &str) -> Chains {
        let state = self.lock();
        let chains = state.tables.get(&(ipv6, table.to_string()));
        chains.cloned().unwrap_or_default()
    }

    /// Every chain of a table gone but the built-in ones, which are
    /// emptied: `iptables -t table -F; iptables -t table -X`, or a
    /// firewall service restarting.
    pub fn wipe(&self, ipv6: bool, table: &str) {
        let builtins = builtins(table)
            .iter()
            .map(|b| (b.to_string(), Vec::new()))
            .collect();
        let mut state = self.lock();
        state.tables.insert((ipv6, table.to_string()), builtins);
        state.generation += 1;
    }

    /// Restores `text` as someone else would (a previous run, an admin).
    pub fn preload(&self, ipv6: bool, table: &str, text: &str) {
        let mut copy = self.clone();
        if let Err(e) = copy.restore(ipv6, table, text) {
            panic!("preload refused: {e:#}");
        }
    }

    fn execute(&self, ipv6: bool, table: &str, text: &str, checking: bool) -> Result<Chains> {
        let state = self.lock();
        let lenient = checking && state.lenient_check;
        if let Some(r) = state.refuse.iter().find(|r| text.contains(r.as_str())) {
            bail!("fake iptables refuses {r:?}");
        }
        let mut chains = state
            .tables
            .get(&(ipv6, table.to_string()))
            .cloned()
            .unwrap_or_else(|| {
                builtins(table)
                    .iter()
                    .map(|b| (b.to_string(), Vec::new()))
                    .collect()
            });
        drop(state);
        let mut committed = false;
        for (n, line) in text.lines().enumerate() {
            let err = |m: String| anyhow!("line {}: {m}: {line}", n + 1);
            let words: Vec<&str> = line.splitn(3, ' ').collect();
            match words.as_slice() {
                [t] if t.starts_with('*') => {
                    if &t[1..] != table {
                        return Err(err("wrong table".into()));
                    }
                }
                ["COMMIT"] => committed = true,
                [decl, ..] if decl.starts_with(':') => {
                    let name = &decl[1..];
                    if !builtins(table).contains(&name) {
                        chains.insert(name.to_string(), Vec::new());
                    }
                }
                ["-A", chain, rule] => chains
                    .get_mut(*chain)
                    .ok_or_else(|| err("no such chain".into()))?
                    .push(rule.to_string()),
                ["-I", chain, rest] => {
                    let rule = rest.strip_prefix("1 ").unwrap_or(rest);
                    chains
                        .get_mut(*chain)
                        .ok_or_else(|| err("no such chain".into()))?
                        .insert(0, rule.to_string());
                }
                ["-D", chain, rule] => {
                    let rules = chains
                        .get_mut(*chain)
                        .ok_or_else(|| err("no such chain".into()))?;
                    let at = rules
                        .iter()
                        .position(|r| r == rule)
                        .ok_or_else(|| err("no such rule".into()))?;
                    rules.remove(at);
                }
                ["-X", chain] => {
                    let jump = format!("-j {chain}");
                    if !lenient
                        && chains
                            .values()
                            .flatten()
                            .any(|r| r.ends_with(&jump) || r.contains(&format!("{jump} ")))
                    {
                        return Err(err("chain is still jumped to".into()));
                    }
                    chains
                        .remove(*chain)
                        .ok_or_else(|| err("no such chain".into()))?;
                }
                [""] => {}
                _ => return Err(err("unknown command".into())),
            }
        }
        if !committed {
            bail!("no COMMIT");
        }
        for rule in chains.values().flatten().filter(|_| !lenient) {
            if let Some(target) = rule.split(" -j ").nth(1).and_then(|t| t.split(' ').next())
                && !TARGETS.contains(&target)
                && !chains.contains_key(target)
            {
                bail!("jump to missing chain {target}: {rule}");
            }
        }
        Ok(chains)
    }
}

impl IptablesKernel for FakeIptables {
    fn restore(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        let chains = self.execute(ipv6, table, text, false)?;
        let mut state = self.lock();
        if let Some(history) = &mut state.history {
            history.push(((ipv6, table.to_string()), chains.clone()));
        }
        state.tables.insert((ipv6, table.to_string()), chains);
        state.restores += 1;
        state.generation += 1;
        state.last = text.to_string();
        Ok(())
    }

    fn check(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        self.execute(ipv6, table, text, true).map(drop)
    }

    fn chain_rules(&mut self, ipv6: bool, table: &str, chain: &str) -> Result<Option<Vec<String>>> {
        Ok(self.rules(ipv6, table, chain))
    }

    fn summaries(&mut self, ipv6: bool, table: &str) -> Result<Summaries> {
        let started = std::time::Instant::now();
        while self.lock().reads_held {
            if started.elapsed() > HOLD_LIMIT {
                self.lock().reads_waited_out = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(text_summaries(&self.rules_of_table(ipv6, table)))
    }

    fn reader(&self) -> Option<Box<dyn IptablesKernel>> {
        Some(Box::new(self.clone()))
    }

    fn chain_summaries(
        &mut self,
        ipv6: bool,
        table: &str,
        chains: &[&str],
    ) -> Result<Option<Summaries>> {
        if self.lock().whole_table_reads {
            return Ok(None);
        }
        let all = text_summaries(&self.rules_of_table(ipv6, table));
        let one = |c: &&str| (c.to_string(), all.get(*c).copied().unwrap_or_default());
        Ok(Some(chains.iter().map(one).collect()))
    }

    fn generation(&mut self) -> Result<Option<u64>> {
        let state = self.lock();
        Ok((!state.whole_table_reads).then_some(state.generation))
    }

    fn enable_route_localnet(&mut self) -> Result<()> {
        self.lock().route_localnet = true;
        Ok(())
    }

    fn save(&mut self, ipv6: bool, table: &str) -> Result<String> {
        let state = self.lock();
        let mut out = format!("*{table}\n");
        let Some(chains) = state.tables.get(&(ipv6, table.to_string())) else {
            return Ok(String::new());
        };
        for name in chains.keys() {
            let policy = if builtins(table).contains(&name.as_str()) {
                "ACCEPT"
            } else {
                "-"
            };
            out.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (name, rules) in chains {
            for r in rules {
                out.push_str(&format!("-A {name} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }
}
