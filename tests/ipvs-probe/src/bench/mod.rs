//! The IPVS-vs-nftables benchmark inside the VM (scripts/ipvs-vm-bench.sh):
//! for each size N and each mode, a fresh kwp on N Services x 5 endpoints
//! fed through the file source, from an empty kernel:
//! - full sync: process start until the kernel shows every Service
//!   (kernel.rs says how each mode is read);
//! - one change: one endpoint moved in a file (renamed into place) until
//!   the kernel sends that Service to the new address, median of several;
//! - peak RSS of kwp and of the largest process of its tree (`nft`).
//!
//! `/probe bench KWP SIZES CHANGES MODES` runs every (N, mode) as
//! `/probe bench-one ...` in a child process, cleaning the kernel before
//! each, then prints the table and the IPVS / nftables ratios.

mod kernel;
#[allow(dead_code)]
#[path = "../../../../host/benches/shared/sync_objects.rs"]
mod objects;
mod run;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::dataplane::ipvs::kernel::{IpvsKernel, NetlinkIpvs};

const USAGE: &str = "usage: bench KWP SIZES(1000,10000) CHANGES(7) MODES(nftables,ipvs)";

fn row_file(mode: &str, n: usize) -> String {
    format!("/tmp/kwp-bench/row-{mode}-{n}")
}

/// `bench-one KWP MODE N CHANGES`: one run; its result goes to a file.
pub fn one(args: &[String]) -> Result<()> {
    let [kwp, mode, n, changes] = args else {
        bail!("usage: bench-one KWP MODE N CHANGES");
    };
    let n: usize = n.parse().context("N")?;
    let row = run::run(Path::new(kwp), mode, n, changes.parse().context("CHANGES")?)?;
    for (what, found, wanted) in &row.counts {
        println!("bench: {mode} {n}: {what}: {found} of {wanted}");
    }
    std::fs::write(row_file(mode, n), row.line()).context("writing the row")?;
    Ok(())
}

/// A run's row as read back: full sync (s), changes (ms), RSS (KiB).
struct Parsed {
    full: f64,
    changes: Vec<f64>,
    rss_kwp: u64,
    rss_tree: u64,
    check_ms: f64,
}

fn parse(line: &str) -> Option<Parsed> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let [full, changes, rss_kwp, rss_tree, check] = w.as_slice() else {
        return None;
    };
    Some(Parsed {
        full: full.parse().ok()?,
        changes: changes
            .split(',')
            .map(|c| c.parse().ok())
            .collect::<Option<_>>()?,
        rss_kwp: rss_kwp.parse().ok()?,
        rss_tree: rss_tree.parse().ok()?,
        check_ms: check.parse().ok()?,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Back to an empty kernel: no nftables, no IPVS services, no kube-ipvs0,
/// and none of kwp's records in /run (the guest is ours alone).
fn clean() -> Result<()> {
    let nft = Command::new("nft").args(["flush", "ruleset"]).status()?;
    ensure!(nft.success(), "nft flush ruleset: {nft}");
    let mut k = NetlinkIpvs::new();
    for v in k.services()? {
        k.delete_service(&v.key)?;
    }
    let _ = Command::new("ip")
        .args(["link", "del", "kube-ipvs0"])
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all("/run/kube-wasm-proxy");
    // Let the kernel finish freeing what the flush released.
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

pub fn main(args: &[String]) -> Result<()> {
    let [kwp, sizes, changes, modes] = args else {
        bail!("{USAGE}");
    };
    let sizes: Vec<usize> = sizes
        .split(',')
        .map(|s| s.parse().context("SIZES"))
        .collect::<Result<_>>()?;
    let modes: Vec<&str> = modes.split(',').collect();
    std::fs::create_dir_all("/tmp/kwp-bench")?;
    let me = std::env::current_exe().context("own path")?;
    let mut rows: BTreeMap<(usize, String), Parsed> = BTreeMap::new();
    for &n in &sizes {
        for &mode in &modes {
            clean()?;
            println!("bench: {mode} {n}: start");
            let status = Command::new(&me)
                .args(["bench-one", kwp, mode, &n.to_string(), changes])
                .status()?;
            ensure!(status.success(), "the {mode} run at {n} failed ({status})");
            let line = std::fs::read_to_string(row_file(mode, n))?;
            let row = parse(&line).with_context(|| format!("bad row {line:?}"))?;
            rows.insert((n, mode.to_string()), row);
        }
    }
    clean()?;
    print_tables(&sizes, &modes, &rows);
    Ok(())
}

fn print_tables(sizes: &[usize], modes: &[&str], rows: &BTreeMap<(usize, String), Parsed>) {
    println!("KWP-BENCH-TABLE-BEGIN");
    println!(
        "| Services | mode | full sync (s) | one change, file to kernel (ms, median) | changes (ms) | peak RSS kwp (MiB) | largest process incl. nft (MiB) | slowest poll (ms) |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|---:|");
    for &n in sizes {
        for &mode in modes {
            let Some(r) = rows.get(&(n, mode.to_string())) else {
                continue;
            };
            let list: Vec<String> = r.changes.iter().map(|c| format!("{c:.0}")).collect();
            println!(
                "| {n} | {mode} | {:.1} | {:.0} | {} | {} | {} | {:.0} |",
                r.full,
                median(&r.changes),
                list.join(", "),
                r.rss_kwp / 1024,
                r.rss_tree / 1024,
                r.check_ms
            );
        }
    }
    println!();
    println!(
        "| Services | full sync ipvs / nftables | one change ipvs / nftables | peak RSS kwp ipvs / nftables |"
    );
    println!("|---:|---:|---:|---:|");
    for &n in sizes {
        let (Some(i), Some(f)) = (
            rows.get(&(n, "ipvs".to_string())),
            rows.get(&(n, "nftables".to_string())),
        ) else {
            continue;
        };
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} |",
            i.full / f.full,
            median(&i.changes) / median(&f.changes),
            i.rss_kwp as f64 / f.rss_kwp as f64
        );
    }
    println!("KWP-BENCH-TABLE-END");
}
