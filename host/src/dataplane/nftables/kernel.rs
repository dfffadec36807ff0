//! How the nftables dataplane talks to the kernel: three calls, one real
//! implementation (the `nft` process) and an in-memory fake for tests.
//!
//! Why the `nft` process and not netlink: nft's text syntax handles
//! verdict maps and `typeof` declarations that the JSON input and the
//! netlink crates here do not, and the process costs ~4 ms per
//! transaction (docs/nftables.md has the measurements).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

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

/// The kernel's nftables, as the dataplane needs it.
pub trait NftKernel: Send {
    /// Runs one transaction (nft's text syntax): all of it or nothing.
    fn run(&mut self, script: &str) -> Result<()>;
    /// Checks a transaction against the kernel without committing it
    /// (`nft --check`): the same errors as `run`, no effect.
    fn check(&mut self, script: &str) -> Result<()>;
    /// What `table` holds in the `ip` and `ip6` families (empty where absent).
    fn list(&mut self, table: &str) -> Result<Listing>;
}

/// The `nft` binary. Every nftables transaction of the host goes through
/// [`nft`], the one place that spawns it.
#[derive(Debug, Default)]
pub struct NftProcess;

impl NftKernel for NftProcess {
    fn run(&mut self, script: &str) -> Result<()> {
        nft(&["-f", "-"], script)
    }

    fn check(&mut self, script: &str) -> Result<()> {
        nft(&["--check", "-f", "-"], script)
    }

    fn list(&mut self, table: &str) -> Result<Listing> {
        let mut listing = Listing::default();
        for family in [NftFamily::Ip, NftFamily::Ip6] {
            let out = Command::new("nft")
                .args(["-j", "list", "table", &family.to_string(), table])
                .output()
                .context("running nft (is the nftables package installed?)")?;
            if !out.status.success() {
                continue; // no such table yet
            }
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("parsing nft -j output")?;
            let objects = json.get("nftables").and_then(|v| v.as_array());
            for obj in objects.into_iter().flatten() {
                let name_of = |kind: &str| obj.get(kind)?.get("name")?.as_str().map(str::to_string);
                if let Some(name) = name_of("chain") {
                    listing.chains.insert((family, name));
                }
                for (kind, set_kind) in [("set", SetKind::Set), ("map", SetKind::Map)] {
                    if let Some(name) = name_of(kind) {
                        listing.sets.insert((family, name), set_kind);
                    }
                }
            }
        }
        Ok(listing)
    }
}

/// Runs `nft ARGS` with `script` on its standard input.
pub fn nft(args: &[&str], script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
