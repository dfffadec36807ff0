//! The IPVS-vs-nftables benchmark inside the VM (scripts/ipvs-vm-bench.sh):
//! for each size N and each mode, a fresh kwp on N Services x 5 endpoints
//! fed through the file source, from an empty kernel:
//! - full sync: process start until the kernel shows every Service
//!   (kernel.rs says how each mode is read);
//! - one change: one endpoint moved in a file (renamed into place) until
//!   the kernel sends that Service to the new address, median of several;
//! - peak RSS of kwp and of the largest process of its tree (`nft`).
//!
//! `/probe bench KWP SIZES CHANGES MODES [OPTION...]` runs every (N, mode)
//! as `/probe bench-one ...` in a child process, cleaning the kernel before
//! each, then prints the table and the ratios. Options:
//! - `api=KUBECONFIG,CONTROL_ADDR,KUBE_PROXY`: every proxy watches the API
//!   server on the host instead of reading files (api.rs); mode `upstream`
//!   is kube-proxy `--proxy-mode ipvs`, which needs it;
//! - `full-timeout=SECS` (1800): a full sync not done by then is reported
//!   as a lower bound and its changes are skipped.

mod api;
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
use api::Api;
use run::Opts;

const USAGE: &str = "usage: bench KWP SIZES(1000,10000) CHANGES(7) MODES(nftables,ipvs[,upstream]) [api=KUBECONFIG,CONTROL,KUBE_PROXY] [full-timeout=SECS]";

fn row_file(mode: &str, n: usize) -> String {
    format!("/tmp/kwp-bench/row-{mode}-{n}")
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut opts = Opts {
        api: None,
        full_timeout: Duration::from_secs(1800),
    };
    for a in args {
        match a.split_once('=') {
            Some(("api", spec)) => opts.api = Some(Api::parse(spec)?),
            Some(("full-timeout", secs)) => {
                opts.full_timeout = Duration::from_secs(secs.parse().context("full-timeout")?)
            }
            _ => bail!("unknown option {a:?}; {USAGE}"),
        }
    }
    Ok(opts)
}

fn opts_args(opts: &Opts) -> Vec<String> {
    let mut out = vec![format!("full-timeout={}", opts.full_timeout.as_secs())];
    out.extend(opts.api.as_ref().map(|a| format!("api={}", a.spec())));
    out
}

/// `bench-one KWP MODE N CHANGES [OPTION...]`: one run; its result goes to a file.
pub fn one(args: &[String]) -> Result<()> {
    let [kwp, mode, n, changes, rest @ ..] = args else {
        bail!("usage: bench-one KWP MODE N CHANGES [OPTION...]");
    };
    let opts = parse_opts(rest)?;
    let n: usize = n.parse().context("N")?;
    let changes = changes.parse().context("CHANGES")?;
    let row = run::run(Path::new(kwp), mode, n, changes, &opts)?;
    for (what, found, wanted) in &row.counts {
        println!("bench: {mode} {n}: {what}: {found} of {wanted}");
    }
    std::fs::write(row_file(mode, n), row.line()).context("writing the row")?;
    Ok(())
}

/// A run's row as read back: full sync (s), changes (ms), RSS (KiB).
struct Parsed {
    full: f64,
    /// false: `full` is a lower bound, `progress` Services were programmed.
    finished: bool,
    progress: usize,
    changes: Vec<f64>,
    /// The API writes' own share of `changes` (empty from files).
    writes: Vec<f64>,
    rss_kwp: u64,
    rss_tree: u64,
    check_ms: f64,
}

fn parse(line: &str) -> Option<Parsed> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let [
        full,
        changes,
        rss_kwp,
        rss_tree,
        check,
        finished,
        progress,
        writes,
    ] = w.as_slice()
    else {
        return None;
    };
    let list = |text: &str| -> Option<Vec<f64>> {
        match text {
            "-" => Some(Vec::new()),
            list => list.split(',').map(|c| c.parse().ok()).collect(),
        }
    };
    let (changes, writes) = (list(changes)?, list(writes)?);
    Some(Parsed {
        full: full.parse().ok()?,
        finished: *finished == "1",
        progress: progress.parse().ok()?,
        changes,
        writes,
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
    // Upstream's ipsets (the flush above removed the iptables-nft rules
    // that referenced them); no ipset binary: none to destroy.
    let _ = Command::new("ipset")
        .arg("destroy")
        .stderr(std::process::Stdio::null())
        .status();
    // Let the kernel finish freeing what the flush released.
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

pub fn main(args: &[String]) -> Result<()> {
    let [kwp, sizes, changes, modes, rest @ ..] = args else {
        bail!("{USAGE}");
    };
    let opts = parse_opts(rest)?;
    let sizes: Vec<usize> = sizes
        .split(',')
        .map(|s| s.parse().context("SIZES"))
        .collect::<Result<_>>()?;
    let modes: Vec<&str> = modes.split(',').collect();
    std::fs::create_dir_all("/tmp/kwp-bench")?;
    let me = std::env::current_exe().context("own path")?;
    let mut rows: BTreeMap<(usize, String), Parsed> = BTreeMap::new();
    for &n in &sizes {
        if let Some(api) = &opts.api {
            let t = std::time::Instant::now();
            let said = api
                .grow(n)
                .with_context(|| format!("creating {n} Services"))?;
            println!(
                "bench: API server: {said} ({:.1} s from the guest)",
                t.elapsed().as_secs_f64()
            );
        }
        for &mode in &modes {
            clean()?;
            println!("bench: {mode} {n}: start");
            let status = Command::new(&me)
                .args(["bench-one", kwp, mode, &n.to_string(), changes])
                .args(opts_args(&opts))
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

/// The median in ms, `-` when nothing was measured.
fn ms_or_dash(v: &[f64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        format!("{:.0}", median(v))
    }
}

/// `12.3`, or `> 900` for a full sync that did not finish.
fn full_sync(r: &Parsed) -> String {
    if r.finished {
        format!("{:.1}", r.full)
    } else {
        format!("> {:.0} ({} done)", r.full, r.progress)
    }
}

fn print_tables(sizes: &[usize], modes: &[&str], rows: &BTreeMap<(usize, String), Parsed>) {
    println!("KWP-BENCH-TABLE-BEGIN");
    println!(
        "| Services | mode | full sync (s) | one change, write to kernel (ms, median) | changes (ms) | the API write alone (ms, median) | peak RSS proxy (MiB) | largest process incl. children (MiB) | slowest poll (ms) |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|---:|---:|");
    for &n in sizes {
        for &mode in modes {
            let Some(r) = rows.get(&(n, mode.to_string())) else {
                continue;
            };
            let list: Vec<String> = r.changes.iter().map(|c| format!("{c:.0}")).collect();
            println!(
                "| {n} | {mode} | {} | {} | {} | {} | {} | {} | {:.0} |",
                full_sync(r),
                ms_or_dash(&r.changes),
                list.join(", "),
                ms_or_dash(&r.writes),
                r.rss_kwp / 1024,
                r.rss_tree / 1024,
                r.check_ms
            );
        }
    }
    // Each pair present in the run: full sync, one change, peak RSS.
    for (a, b) in [
        ("ipvs", "nftables"),
        ("upstream", "ipvs"),
        ("upstream", "nftables"),
    ] {
        let pairs: Vec<(usize, &Parsed, &Parsed)> = sizes
            .iter()
            .filter_map(|&n| Some((n, rows.get(&(n, a.into()))?, rows.get(&(n, b.into()))?)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        println!();
        println!("| Services | full sync {a} / {b} | one change {a} / {b} | peak RSS {a} / {b} |");
        println!("|---:|---:|---:|---:|");
        for (n, x, y) in pairs {
            // An unfinished full sync makes its ratio a bound.
            let bound = match (x.finished, y.finished) {
                (true, true) => "",
                (false, true) => "> ",
                (true, false) => "< ",
                (false, false) => "? ",
            };
            println!(
                "| {n} | {bound}{:.2} | {:.2} | {:.2} |",
                x.full / y.full,
                median(&x.changes) / median(&y.changes),
                x.rss_kwp as f64 / y.rss_kwp as f64
            );
        }
    }
    println!("KWP-BENCH-TABLE-END");
}
