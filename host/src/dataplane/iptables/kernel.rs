//! How the iptables dataplane talks to the kernel: restore one table's
//! text, check it without committing, and save a table. The real one runs
//! `iptables-restore` / `ip6tables-restore` and `iptables-save`, holding
//! the xtables lock (`-w`) as upstream does.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub use crate::dataplane::nftables::kernel::Summary;

/// Chain name -> what it holds, summarised.
pub type Summaries = BTreeMap<String, Summary>;

/// The kernel's iptables, as the dataplane needs it.
pub trait IptablesKernel: Send {
    /// `iptables-restore --noflush` of one table's text (`*table` ...
    /// `COMMIT`): all of that table's changes or none.
    fn restore(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()>;
    /// The same, parsed and built but not committed (`--test`).
    fn check(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()>;
    /// `iptables-save -t table`.
    fn save(&mut self, ipv6: bool, table: &str) -> Result<String>;
    /// What a full reconcile needs of a table, in `iptables-save` form:
    /// every chain declared, and the rules of the built-in ones (where our
    /// jumps are). `save` by default.
    fn survey(&mut self, ipv6: bool, table: &str) -> Result<String> {
        self.save(ipv6, table)
    }
    /// The rules of one chain (`iptables -t table -S chain`, each without
    /// the leading `-A CHAIN `), `None` when the chain does not exist.
    fn chain_rules(&mut self, ipv6: bool, table: &str, chain: &str) -> Result<Option<Vec<String>>>;
    /// Every chain of a table with its rules summarised (count, and an
    /// order-aware digest of the kernel's form, comparable only with this
    /// kernel's earlier answers): the periodic compare-and-repair. From
    /// `save` by default.
    fn summaries(&mut self, ipv6: bool, table: &str) -> Result<Summaries> {
        Ok(text_summaries(&parse_save(&self.save(ipv6, table)?)))
    }
    /// The same for the named chains only (each named, absent or empty
    /// ones as empty), or `None` where that costs a whole table's read
    /// (legacy): what is learned after a delta wrote them.
    fn chain_summaries(
        &mut self,
        ipv6: bool,
        table: &str,
        chains: &[&str],
    ) -> Result<Option<Summaries>> {
        let _ = (ipv6, table, chains);
        Ok(None)
    }
    /// A second handle on the same kernel, for reads on another thread
    /// (the compare's); `None`: the compare reads on the loop.
    fn reader(&self) -> Option<Box<dyn IptablesKernel>> {
        None
    }
    /// A number every committed change to the backend's rules moves (the
    /// nf_tables generation), `None` where there is none (legacy).
    fn generation(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// `net.ipv4.conf.all.route_localnet=1`: the kernel routes packets to
    /// 127.0.0.0/8 that arrive from or are DNATed off the host (node ports
    /// on localhost). Never turned back off, as upstream.
    fn enable_route_localnet(&mut self) -> Result<()>;
}

/// Which kernel interface the iptables binaries drive. Both may be present
/// (Debian ships `iptables-nft` and `iptables-legacy`); rules must go where
/// the rest of the node's rules are, or they would be evaluated apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// Only plain `iptables-restore` (no per-backend binaries installed).
    Default,
}

impl Backend {
    /// As upstream's iptables wrapper decides: the backend already holding
    /// more rules (legacy only when it holds more than nft), nft otherwise.
    pub fn detect() -> Self {
        let rules = |suffix: &str| -> Option<usize> {
            let mut n = 0;
            for family in ["iptables", "ip6tables"] {
                let out = Command::new(format!("{family}-{suffix}-save"))
                    .output()
                    .ok()?;
                n += String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count();
            }
            Some(n)
        };
        match (rules("nft"), rules("legacy")) {
            (Some(nft), Some(legacy)) if legacy > nft => Backend::Legacy,
            (Some(_), _) => Backend::Nft,
            (None, Some(_)) => Backend::Legacy,
            (None, None) => Backend::Default,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Default => "default",
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-save`, `iptables-restore`...
    fn binary(self, ipv6: bool, tool: &str) -> String {
        format!("{}-{tool}", self.command(ipv6))
    }

    /// `iptables-nft`, `ip6tables-legacy`, `iptables`...
    fn command(self, ipv6: bool) -> String {
        let family = if ipv6 { "ip6tables" } else { "iptables" };
        match self {
            Backend::Default => family.to_string(),
            b => format!("{family}-{}", b.as_str()),
        }
    }
}

/// The `iptables-restore` / `iptables-save` binaries of one backend.
#[derive(Debug)]
pub struct IptablesProcess {
    pub backend: Backend,
}

impl IptablesKernel for IptablesProcess {
    fn restore(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        let tool = self.backend.binary(ipv6, "restore");
        restore(&tool, &["--noflush", "-w", "5"], text)
            .with_context(|| format!("restoring table {table}"))
    }

    fn check(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        let tool = self.backend.binary(ipv6, "restore");
        restore(&tool, &["--test", "--noflush", "-w", "5"], text)
            .with_context(|| format!("checking table {table}"))
    }

    fn save(&mut self, ipv6: bool, table: &str) -> Result<String> {
        let tool = self.backend.binary(ipv6, "save");
        let out = crate::dataplane::tool::run(
            &tool,
            &["-t", table],
            None,
            crate::dataplane::tool::DEADLINE,
        )
        .with_context(|| format!("running {tool} (is the iptables package installed?)"))?;
        if !out.status.success() {
            bail!(
                "{tool} -t {table} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).with_context(|| format!("{tool} output"))
    }

    /// On the nft backend: the chain names over netlink and `-S` of each
    /// built-in chain, since `iptables-nft-save` prints every rule (34 s
    /// for nat at 10k Services, measured), which a reconcile does not need.
    fn survey(&mut self, ipv6: bool, table: &str) -> Result<String> {
        if self.backend != Backend::Nft {
            return self.save(ipv6, table);
        }
        let names = crate::dataplane::nftables::chain_names(table, ipv6)
            .with_context(|| format!("listing the chains of table {table}"))?;
        let mut out = format!("*{table}\n");
        for name in &names {
            out.push_str(&format!(":{name} - [0:0]\n"));
        }
        for name in names.iter().filter(|n| BUILTINS.contains(&n.as_str())) {
            for rule in self.chain_rules(ipv6, table, name)?.unwrap_or_default() {
                out.push_str(&format!("-A {name} {rule}\n"));
            }
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }

    /// On nft, over netlink (one chain dump and one rule dump, nothing
    /// printed); on legacy, `iptables-legacy-save` of the table, which
    /// reads the whole table from the kernel whatever is asked.
    fn summaries(&mut self, ipv6: bool, table: &str) -> Result<Summaries> {
        if self.backend == Backend::Nft {
            return crate::dataplane::nftables::chain_summaries(table, ipv6, None)
                .with_context(|| format!("summarising the chains of table {table}"));
        }
        Ok(text_summaries(&parse_save(&self.save(ipv6, table)?)))
    }

    fn chain_summaries(
        &mut self,
        ipv6: bool,
        table: &str,
        chains: &[&str],
    ) -> Result<Option<Summaries>> {
        if self.backend != Backend::Nft {
            return Ok(None);
        }
        crate::dataplane::nftables::chain_summaries(table, ipv6, Some(chains))
            .with_context(|| format!("summarising chains of table {table}"))
            .map(Some)
    }

    fn reader(&self) -> Option<Box<dyn IptablesKernel>> {
        Some(Box::new(IptablesProcess {
            backend: self.backend,
        }))
    }

    fn generation(&mut self) -> Result<Option<u64>> {
        if self.backend != Backend::Nft {
            return Ok(None);
        }
        let id =
            crate::dataplane::nftables::generation().context("reading the nf_tables generation")?;
        Ok(Some(u64::from(id)))
    }

    fn enable_route_localnet(&mut self) -> Result<()> {
        let now = std::fs::read_to_string(ROUTE_LOCALNET)
            .with_context(|| format!("reading {ROUTE_LOCALNET}"))?;
        if now.trim() != "1" {
            tracing::info!(
                "setting route_localnet=1 so node ports answer on 127.0.0.1; iptables.localhostNodePorts false, or nodePortAddresses without loopback, avoids it"
            );
            std::fs::write(ROUTE_LOCALNET, "1")
                .with_context(|| format!("writing 1 to {ROUTE_LOCALNET}"))?;
        }
        Ok(())
    }

    fn chain_rules(&mut self, ipv6: bool, table: &str, chain: &str) -> Result<Option<Vec<String>>> {
        let tool = self.backend.command(ipv6);
        let out = crate::dataplane::tool::run(
            &tool,
            &["-w", "5", "-t", table, "-S", chain],
            None,
            crate::dataplane::tool::DEADLINE,
        )
        .with_context(|| format!("running {tool} (is the iptables package installed?)"))?;
        // Exit status 1: no such chain (or table); others (4: the lock
        // was not free in time) say nothing about the chain.
        match out.status.code() {
            Some(0) => {}
            Some(1) => return Ok(None),
            _ => bail!(
                "{tool} -t {table} -S {chain} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
        let prefix = format!("-A {chain} ");
        Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix).map(String::from))
                .collect(),
        ))
    }
}

/// The built-in chains of the nat and filter tables.
const BUILTINS: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

fn restore(tool: &str, args: &[&str], text: &str) -> Result<()> {
    let out = crate::dataplane::tool::run(
        tool,
        args,
        Some(text.as_bytes()),
        crate::dataplane::tool::DEADLINE,
    )
    .with_context(|| format!("running {tool} (is the iptables package installed?)"))?;
    if !out.status.success() {
        bail!(
            "{tool} refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One table as `iptables-save` prints it: every chain (built-in or not)
/// with its rules, each rule without the leading `-A CHAIN `.
pub fn parse_save(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            chains
                .entry(chain.to_string())
                .or_default()
                .push(rest.to_string());
        }
    }
    chains
}

/// Summaries of chains in `iptables-save` form (its rule text is the
/// kernel's, normalised), as `summaries` gives them.
pub fn text_summaries(chains: &BTreeMap<String, Vec<String>>) -> Summaries {
    use std::hash::{Hash, Hasher};
    chains
        .iter()
        .map(|(name, rules)| {
            // Fixed keys: equal text, equal digest, within and across runs.
            let mut h = std::hash::DefaultHasher::new();
            rules.hash(&mut h);
            let summary = Summary {
                count: rules.len(),
                digest: h.finish(),
            };
            (name.clone(), summary)
        })
        .collect()
}
