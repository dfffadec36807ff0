//! How the nftables dataplane talks to the kernel: three calls, one real
//! implementation (the `nft` process) and an in-memory fake for tests.
//!
//! Why the `nft` process for most transactions: nft's text syntax handles
//! verdict maps and `typeof` declarations (and the rules using them) that
//! the JSON input and the netlink crates do not. A delta that only adds
//! and deletes elements of existing sets skips the process (~11 ms at 10k
//! Services, mostly nft loading its cache) and goes over netlink
//! (`elements.rs`); docs/performance.md has the measurements.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

use super::elements::ElementBatch;
use crate::plan::NftFamily;

/// Chains, and sets/maps with their kind, in our tables of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub chains: BTreeSet<(NftFamily, String)>,
    pub sets: BTreeMap<(NftFamily, String), SetKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    Set,
    Map,
}

impl SetKind {
    /// A declaration with a value type (`... : verdict`) is a map.
    pub fn of(declaration: &str) -> Self {
        if declaration.contains(" : ") {
            SetKind::Map
        } else {
            SetKind::Set
        }
    }
}

impl std::fmt::Display for SetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetKind::Set => "set",
            SetKind::Map => "map",
        })
    }
}

/// A chain's rules or a set's elements, summarised: how many, and an
/// order-aware (rules) or order-free (elements) digest of their kernel
/// form. Digests are comparable only with the same kernel's earlier ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub digest: u64,
}

/// Every chain and named set in our tables of both families, summarised:
/// what the periodic drift check compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub chains: BTreeMap<(NftFamily, String), Summary>,
    pub sets: BTreeMap<(NftFamily, String), (SetKind, Summary)>,
}

impl Inventory {
    /// The names only.
    pub fn listing(&self) -> Listing {
        Listing {
            chains: self.chains.keys().cloned().collect(),
            sets: self
                .sets
                .iter()
                .map(|(q, (k, _))| (q.clone(), *k))
                .collect(),
        }
    }
}

/// The kernel's nftables, as the dataplane needs it.
pub trait NftKernel: Send {
    /// Runs one transaction (nft's text syntax): all of it or nothing.
    fn run(&mut self, script: &str) -> Result<()>;
    /// [`NftKernel::run`], taking the script over (a full reconcile's text
    /// is large: the `nft` process's writer then needs no copy).
    fn run_owned(&mut self, script: String) -> Result<()> {
        self.run(&script)
    }
    /// Checks a transaction against the kernel without committing it
    /// (`nft --check`): the same errors as `run`, no effect.
    fn check(&mut self, script: &str) -> Result<()>;
    /// Runs a transaction that only adds and deletes set elements:
    /// `batch` is `script` encoded for nf_tables netlink. A kernel that
    /// speaks only nft text runs the script.
    fn run_elements(&mut self, script: &str, batch: &ElementBatch) -> Result<()> {
        let _ = batch;
        self.run(script)
    }
    /// What `table` holds in the `ip` and `ip6` families (empty where absent).
    fn list(&mut self, table: &str) -> Result<Listing>;
    /// What `table` holds, summarised per chain and set (the drift check).
    fn inventory(&mut self, table: &str) -> Result<Inventory> {
        bail!("this kernel cannot summarise table {table}")
    }
}

/// The `nft` binary. Every nftables transaction of the host goes through
/// [`nft`], the one place that spawns it.
#[derive(Debug, Default)]
pub struct NftProcess;

impl NftKernel for NftProcess {
    fn run(&mut self, script: &str) -> Result<()> {
        nft(&["-f", "-"], script)
    }

    fn run_owned(&mut self, script: String) -> Result<()> {
        nft_owned(
            &["-f", "-"],
            script.into_bytes(),
            crate::dataplane::tool::DEADLINE,
        )
    }

    fn check(&mut self, script: &str) -> Result<()> {
        nft(&["--check", "-f", "-"], script)
    }

    fn run_elements(&mut self, _script: &str, batch: &ElementBatch) -> Result<()> {
        super::netlink::apply_elements(batch)
    }

    fn list(&mut self, table: &str) -> Result<Listing> {
        // Names only, over netlink: `nft -j list table` would fetch and
        // print every element (seconds at 10k Services).
        Ok(self.inventory(table)?.listing())
    }

    fn inventory(&mut self, table: &str) -> Result<Inventory> {
        super::netlink::inventory(table)
    }
}

/// Runs `nft ARGS` with `script` on its standard input, killed if it
/// takes longer than its deadline ([`crate::dataplane::tool::DEADLINE`]:
/// the configured one, scaled with the script).
pub fn nft(args: &[&str], script: &str) -> Result<()> {
    nft_program("nft", args, script, crate::dataplane::tool::DEADLINE)
}

/// [`nft`] with the program and deadline given (tests use a wrapper).
pub fn nft_program(
    program: &str,
    args: &[&str],
    script: &str,
    deadline: impl Into<crate::dataplane::tool::Deadline>,
) -> Result<()> {
    finished(crate::dataplane::tool::run(
        program,
        args,
        Some(script.as_bytes()),
        deadline,
    ))
}

/// [`nft`] with its script handed over.
fn nft_owned(
    args: &[&str],
    script: Vec<u8>,
    deadline: impl Into<crate::dataplane::tool::Deadline>,
) -> Result<()> {
    finished(crate::dataplane::tool::run_owned(
        "nft",
        args,
        Some(script),
        deadline,
    ))
}

fn finished(out: Result<crate::dataplane::tool::Finished>) -> Result<()> {
    let out = out.context("running nft (is the nftables package installed?)")?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
