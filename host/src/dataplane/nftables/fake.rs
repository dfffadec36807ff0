//! An in-memory nftables for tests, like upstream's `knftables.Fake`: it
//! parses the commands the dataplane writes, keeps tables, chains, rules,
//! sets and elements, and refuses what the kernel refuses (a missing
//! object, a map key added twice with another value, deleting a chain
//! that still has rules or is jumped to, a set still referenced). A
//! transaction is all or nothing. Clones share one ruleset, so a test can
//! hand one to the dataplane and inspect it through another.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};

use super::kernel::{Inventory, Listing, NftKernel, SetKind, Summary};
use crate::dataplane::tool::Unavailable;
use crate::plan::NftFamily;

#[derive(Clone, Debug, Default)]
struct Chain {
    rules: Vec<String>,
}

#[derive(Clone, Debug)]
struct Set {
    kind: SetKind,
    declaration: String,
    /// key -> the whole element (`key : value` for maps)
    elements: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default)]
struct Table {
    chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
}

type Tables = BTreeMap<(String, String), Table>;

#[derive(Default)]
struct State {
    tables: Tables,
    /// Transactions committed and checked.
    runs: usize,
    checks: usize,
    /// Commands (lines) committed, over all transactions.
    commands: usize,
    /// The last transaction committed.
    last: String,
    /// Any command containing one of these is refused (a test's way to
    /// make the kernel say no).
    refuse: Vec<String>,
    /// Every transaction and check fails as if `nft` were not installed.
    missing: bool,
    attempts: usize,
}

#[derive(Clone, Default)]
pub struct FakeNft(Arc<Mutex<State>>);

impl NftKernel for FakeNft {
    fn run(&mut self, script: &str) -> Result<()> {
        let mut state = self.lock();
        state.attempts += 1;
        if state.missing {
            return Err(Unavailable::new("running nft (is it installed?): not found").into());
        }
        let next = execute(&state.tables, &state.refuse, script)?;
        state.tables = next;
        state.runs += 1;
        state.commands += script.lines().filter(|l| !l.trim().is_empty()).count();
        state.last = script.to_string();
        Ok(())
    }

    fn check(&mut self, script: &str) -> Result<()> {
        let mut state = self.lock();
        state.attempts += 1;
        if state.missing {
            return Err(Unavailable::new("running nft (is it installed?): not found").into());
        }
        execute(&state.tables, &state.refuse, script)?;
        state.checks += 1;
        Ok(())
    }

    fn list(&mut self, table: &str) -> Result<Listing> {
        let state = self.lock();
        let mut listing = Listing::default();
        for family in [NftFamily::Ip, NftFamily::Ip6] {
            let Some(t) = state.tables.get(&(family.to_string(), table.to_string())) else {
                continue;
            };
            listing
                .chains
                .extend(t.chains.keys().map(|c| (family, c.clone())));
            listing
                .sets
                .extend(t.sets.iter().map(|(n, s)| ((family, n.clone()), s.kind)));
        }
        Ok(listing)
    }

    fn inventory(&mut self, table: &str) -> Result<Inventory> {
        use std::hash::{Hash, Hasher};
        let digest = |text: &str| {
            let mut h = std::hash::DefaultHasher::new();
            text.hash(&mut h);
            h.finish()
        };
        let state = self.lock();
        let mut inventory = Inventory::default();
        for family in [NftFamily::Ip, NftFamily::Ip6] {
            let Some(t) = state.tables.get(&(family.to_string(), table.to_string())) else {
                continue;
            };
            for (name, chain) in &t.chains {
                let summary = Summary {
                    count: chain.rules.len(),
                    digest: (chain.rules.iter())
                        .fold(0, |h: u64, r| h.wrapping_mul(31) ^ digest(r)),
                };
                inventory.chains.insert((family, name.clone()), summary);
            }
            for (name, set) in &t.sets {
                let summary = Summary {
                    count: set.elements.len(),
                    digest: (set.elements.values()).fold(0, |h: u64, e| h.wrapping_add(digest(e))),
                };
                inventory
                    .sets
                    .insert((family, name.clone()), (set.kind, summary));
            }
        }
        Ok(inventory)
    }
}

impl FakeNft {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding it has failed already.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuse every command containing `text` from now on.
    pub fn refuse(&self, text: &str) {
        self.lock().refuse.push(text.into());
    }

    /// `nft` gone (`true`) or back.
    pub fn missing(&self, missing: bool) {
        self.lock().missing = missing;
    }

    /// Transactions and checks tried, whether or not they ran.
    pub fn attempts(&self) -> usize {
        self.lock().attempts
    }

    /// Stop refusing anything.
    pub fn accept_all(&self) {
        self.lock().refuse.clear();
    }

    /// (transactions committed, transactions checked)
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.runs, s.checks)
    }

    /// Commands committed so far, over all transactions: how much the
    /// dataplane wrote.
    pub fn commands(&self) -> usize {
        self.lock().commands
    }

    /// The last transaction committed.
    pub fn last_script(&self) -> String {
        self.lock().last.clone()
    }

    /// Runs `script` as someone else would (a previous run, an admin).
    pub fn preload(&self, script: &str) {
        let mut copy = self.clone();
        if let Err(e) = copy.run(script) {
            panic!("preload refused: {e:#}");
        }
    }

    /// The rules of a chain, `None` if it does not exist.
    pub fn rules(&self, family: &str, table: &str, chain: &str) -> Option<Vec<String>> {
        let s = self.lock();
        let t = s.tables.get(&(family.into(), table.into()))?;
        Some(t.chains.get(chain)?.rules.clone())
    }

    /// The elements of a set or map, `None` if it does not exist.
    pub fn elements(&self, family: &str, table: &str, set: &str) -> Option<Vec<String>> {
        let s = self.lock();
        let t = s.tables.get(&(family.into(), table.into()))?;
        Some(t.sets.get(set)?.elements.values().cloned().collect())
    }

    /// Everything, one object a line (for assertions on what is anywhere).
    pub fn dump(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        for ((f, t), table) in &s.tables {
            for (name, chain) in &table.chains {
                out.push_str(&format!(
                    "{f} {t} chain {name}: {}\n",
                    chain.rules.join("; ")
                ));
            }
            for (name, set) in &table.sets {
                let elements: Vec<&str> = set.elements.values().map(String::as_str).collect();
                out.push_str(&format!(
                    "{f} {t} {} {name}: {}\n",
                    set.kind,
                    elements.join(", ")
                ));
            }
        }
        out
    }

    /// Every (family, table, chain) there is.
    pub fn chains(&self) -> Vec<(String, String, String)> {
        let s = self.lock();
        s.tables
            .iter()
            .flat_map(|((f, t), table)| {
                table
                    .chains
                    .keys()
                    .map(move |c| (f.clone(), t.clone(), c.clone()))
            })
            .collect()
    }
}

/// `tables` after `script`, or the first error (as nft reports it).
fn execute(tables: &Tables, refuse: &[String], script: &str) -> Result<Tables> {
    let mut next = tables.clone();
    for (n, line) in script.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(text) = refuse.iter().find(|t| line.contains(t.as_str())) {
            bail!(
                "line {}: {line}: refused (the test refuses {text:?})",
                n + 1
            );
        }
        command(&mut next, line).with_context(|| format!("line {}: {line}", n + 1))?;
    }
    Ok(next)
}

/// `VERB KIND FAMILY TABLE [NAME] [REST]`
fn command(tables: &mut Tables, line: &str) -> Result<()> {
    let mut words = line.splitn(5, ' ');
    let mut next = || words.next().ok_or_else(|| anyhow!("incomplete command"));
    let (verb, kind, family, table) = (next()?, next()?, next()?, next()?);
    let key = (family.to_string(), table.to_string());
    if kind == "table" {
        return match verb {
            "add" => {
                tables.entry(key).or_default();
                Ok(())
            }
            "delete" => tables
                .remove(&key)
                .map(drop)
                .context("No such file or directory"),
            _ => bail!("unsupported: {verb} table"),
        };
    }
    let rest = next()?;
    let (name, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let t = tables
        .get_mut(&key)
        .context("No such file or directory (table)")?;
    match (verb, kind) {
        ("add", "chain") => {
            t.chains.entry(name.into()).or_default();
        }
        ("flush", "chain") => chain(t, name)?.rules.clear(),
        ("delete", "chain") => {
            if !chain(t, name)?.rules.is_empty() || jumped_to(t, name) {
                bail!("Device or resource busy (chain {name} is not empty or in use)");
            }
            t.chains.remove(name);
        }
        ("add", "rule") => {
            check_references(t, body)?;
            chain(t, name)?.rules.push(body.to_string());
        }
        ("add", "set" | "map") => {
            let declaration = braced(body).context("set without declaration")?.to_string();
            match t.sets.get(name) {
                Some(s) if s.declaration != declaration => {
                    bail!("File exists (set {name} has another declaration)")
                }
                Some(_) => {}
                None => {
                    t.sets.insert(
                        name.into(),
                        Set {
                            kind: SetKind::of(&declaration),
                            declaration,
                            elements: BTreeMap::new(),
                        },
                    );
                }
            }
        }
        ("flush", "set" | "map") => set(t, name)?.elements.clear(),
        ("delete", "set" | "map") => {
            set(t, name)?;
            let at = format!("@{name}");
            let used = t.chains.values().flat_map(|c| &c.rules).any(|r| {
                r.split(|c: char| c.is_whitespace() || c == '}')
                    .any(|w| w == at)
            });
            if used {
                bail!("Device or resource busy (set {name} is in use)");
            }
            t.sets.remove(name);
        }
        ("add", "element") => {
            let elements = braced(body).context("element list")?;
            for e in elements.split(", ").map(str::trim) {
                check_references(t, e)?;
                let key = e.split(" : ").next().unwrap_or(e).to_string();
                let s = set(t, name)?;
                match s.elements.get(&key) {
                    Some(existing) if existing != e => bail!("File exists ({key})"),
                    _ => {
                        s.elements.insert(key, e.to_string());
                    }
                }
            }
        }
        ("delete", "element") => {
            let keys = braced(body).context("element list")?;
            for k in keys.split(", ").map(str::trim) {
                let s = set(t, name)?;
                s.elements
                    .remove(k)
                    .with_context(|| format!("No such file or directory (element {k})"))?;
            }
        }
        _ => bail!("unsupported command"),
    }
    Ok(())
}

/// The text between the outer braces of `body`.
fn braced(body: &str) -> Option<&str> {
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    Some(body[start + 1..end].trim())
}

fn chain<'a>(t: &'a mut Table, name: &str) -> Result<&'a mut Chain> {
    t.chains
        .get_mut(name)
        .with_context(|| format!("No such file or directory (chain {name})"))
}

fn set<'a>(t: &'a mut Table, name: &str) -> Result<&'a mut Set> {
    t.sets
        .get_mut(name)
        .with_context(|| format!("No such file or directory (set {name})"))
}

/// Chains and sets a rule or element names must exist.
fn check_references(t: &Table, text: &str) -> Result<()> {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '}' || c == '{' || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    for pair in words.windows(2) {
        if matches!(pair[0], "jump" | "goto") && !t.chains.contains_key(pair[1]) {
            bail!("No such file or directory (chain {})", pair[1]);
        }
    }
    for w in &words {
        if let Some(set) = w.strip_prefix('@')
            && !t.sets.contains_key(set)
        {
            bail!("No such file or directory (set {set})");
        }
    }
    Ok(())
}

/// Whether any rule or map element jumps to `chain`.
fn jumped_to(t: &Table, chain: &str) -> bool {
    let names = |text: &str| {
        let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        words.windows(2).any(|p| {
            matches!(p[0].as_str(), "jump" | "goto") && p[1].trim_end_matches(['}', ',']) == chain
        })
    };
    t.chains.values().flat_map(|c| &c.rules).any(|r| names(r))
        || t.sets
            .values()
            .flat_map(|s| s.elements.values())
            .any(|e| names(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_the_kernel_refuses_and_commits_all_or_nothing() {
        let mut nft = FakeNft::default();
        nft.run("add table ip t\nadd chain ip t a\nadd map ip t m { type ipv4_addr : verdict; }\nadd element ip t m { 10.0.0.1 : goto a }\n")
            .unwrap();
        // The same element again is fine; another value for its key is not.
        nft.run("add element ip t m { 10.0.0.1 : goto a }").unwrap();
        let e = nft
            .run("add chain ip t b\nadd element ip t m { 10.0.0.1 : goto b }")
            .unwrap_err();
        assert!(format!("{e:#}").contains("File exists"), "{e:#}");
        assert_eq!(
            nft.rules("ip", "t", "b"),
            None,
            "a refused transaction leaves nothing"
        );
        // A chain still jumped to cannot go; a missing one cannot be flushed.
        assert!(nft.run("delete chain ip t a").is_err());
        assert!(nft.run("flush chain ip t nope").is_err());
        assert!(nft.run("delete element ip t m { 10.0.0.9 }").is_err());
        nft.run("delete element ip t m { 10.0.0.1 }\ndelete chain ip t a")
            .unwrap();
        // check() validates without committing.
        nft.check("add chain ip t c").unwrap();
        assert_eq!(nft.rules("ip", "t", "c"), None);
        assert_eq!(nft.counts(), (3, 1));
        nft.refuse("chain ip t d");
        assert!(nft.run("add chain ip t d").is_err());
        let listing = nft.list("t").unwrap();
        assert!(listing.chains.is_empty());
        assert_eq!(listing.sets.len(), 1);
    }
}
