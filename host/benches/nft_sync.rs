//! nftables sync at scale: N Services x 5 endpoints fed through the file
//! source into a real kernel table (in a private network namespace).
//!
//! Measures (a) the full sync from empty, (b) one endpoint change to the
//! rule being in the kernel, (c) peak RSS, and (on stderr) the plugins'
//! Wasm linear memory after the full sync. Run as root:
//!
//!     cargo bench -p kube-wasm-proxy --bench nft_sync
//!     KWP_BENCH_SIZES=1000,10000 cargo bench -p kube-wasm-proxy --bench nft_sync
//!
//! KWP_BENCH_CHANGES sets the number of changes per size (7); a line on
//! stderr marks the end of each full sync (to attach a profiler to the
//! changes alone).

// The objects, shared with the IPVS VM benchmark (tests/ipvs-probe).
#[path = "shared/sync_objects.rs"]
mod sync_objects;

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;

use sync_objects::{ENDPOINTS, PER_FILE, cluster_ip, file_name, files, yaml};

fn main() -> anyhow::Result<()> {
    let changes: usize = std::env::var("KWP_BENCH_CHANGES").map_or(Ok(7), |v| v.parse())?;
    // Bench harness flags (`--bench`) are not ours.
    let sizes: Vec<usize> = std::env::var("KWP_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000,50000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
        "unshare(CLONE_NEWNET) failed: run as root"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    println!(
        "| services | endpoints | full sync (s) | one change, kernel only (ms, median of {changes}) | its CPU time (ms, median) | one change, file to kernel (ms, median) | peak RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let dir = tempfile::tempdir()?;
        generate(dir.path(), n)?;
        let flags = kwp::config::Cli::parse_from([
            "kube-wasm-proxy",
            "--proxy-mode",
            "nftables",
            "--source",
            &format!("file:{}", dir.path().display()),
            "--hostname-override",
            "node-1",
        ])
        .flags;
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "ip", "kube-wasm-proxy"])
            .stderr(std::process::Stdio::null())
            .status();
        let mut app = kwp::app::App::build(&flags)?;
        let started = Instant::now();
        app.scan_and_sync()?;
        let full = started.elapsed();
        anyhow::ensure!(app.sync.proxier.stats.apply_errors == 0, "full sync failed");
        // Plugins' linear memory: part of RSS that heap profiles miss.
        let wasm: Vec<String> = (app.sync.proxier.plugin_stats().iter())
            .map(|(name, s)| {
                let bytes = s.memory_bytes.load(std::sync::atomic::Ordering::Relaxed);
                format!("{name} {:.1} MiB", bytes as f64 / f64::from(1 << 20))
            })
            .collect();
        eprintln!(
            "{n} Services: Wasm linear memory after the full sync: {}",
            wasm.join(", ")
        );
        eprintln!("full sync of {n} done in {full:?}; changes follow");

        let (mut kernel, mut cpu, mut end_to_end) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..changes {
            // Move one endpoint of one Service: rewrite its file.
            let svc = (i * 7919) % n;
            let file = svc / PER_FILE;
            write_file(dir.path(), file, n, Some((svc, i + 1)))?;
            let t = Instant::now();
            app.scan_and_sync()?;
            end_to_end.push(t.elapsed());
            kernel.push(app.sync.proxier.stats.last_duration);
            cpu.push(app.sync.proxier.stats.last_cpu);
            anyhow::ensure!(
                app.sync.proxier.stats.apply_errors == 0,
                "incremental sync failed"
            );
        }
        // Read line by line: the listing (tens of MB at 50k) held whole
        // would count in the peak RSS measured below.
        let wanted = format!("{} . tcp . 80", cluster_ip(n - 1));
        let mut listing = std::process::Command::new("nft")
            .args(["list", "table", "ip", "kube-wasm-proxy"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = listing.stdout.take().expect("piped");
        let mut found = false;
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            found |= line?.contains(&wanted);
        }
        listing.wait()?;
        anyhow::ensure!(found, "last service missing from the kernel");
        println!(
            "| {n} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {} |",
            n * ENDPOINTS,
            full.as_secs_f64(),
            ms(median(&mut kernel)),
            ms(median(&mut cpu)),
            ms(median(&mut end_to_end)),
            peak_rss_mib()
        );
    }
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", "kube-wasm-proxy"])
        .status();
    Ok(())
}

fn generate(dir: &Path, n: usize) -> anyhow::Result<()> {
    for file in 0..files(n) {
        write_file(dir, file, n, None)?;
    }
    Ok(())
}

/// File `file`; `bump` = (service, k) shifts that service's first endpoint
/// address by k.
fn write_file(
    dir: &Path,
    file: usize,
    n: usize,
    bump: Option<(usize, usize)>,
) -> anyhow::Result<()> {
    let y = yaml(file, n, |s| match bump {
        Some((b, k)) if b == s => k,
        _ => 0,
    });
    let path = dir.join(file_name(file));
    let tmp = dir.join(format!(".{}.tmp", file_name(file)));
    std::fs::write(&tmp, y)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("VmHWM:")
                        .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
                })
                .flatten()
        })
        .map_or(0, |kb| kb / 1024)
}
