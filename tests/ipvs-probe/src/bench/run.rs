//! One measured run, in a process of its own (so the peak RSS of its
//! children is this run's alone): a fresh kwp in one mode on N Services
//! from an empty kernel, the full sync, then one-endpoint changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};

use super::kernel::{Ipvs, Kernel, Nft};
use super::objects::{ENDPOINTS, endpoint_ip, file_name, file_of, files, yaml};

/// Under emulation a 10k full sync takes minutes.
const FULL_SYNC_TIMEOUT: Duration = Duration::from_secs(1800);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the kernel is read while waiting for a change: the reads are
/// a handful of netlink calls, so this is the resolution that matters.
const CHANGE_POLL: Duration = Duration::from_millis(5);
const FULL_POLL: Duration = Duration::from_millis(100);
/// Between changes, so the proxy is idle when the next one starts.
const PAUSE: Duration = Duration::from_secs(1);

/// What one run measured.
pub struct Row {
    pub full: Duration,
    pub changes: Vec<Duration>,
    /// kwp's own peak RSS (VmHWM), KiB.
    pub rss_kwp: u64,
    /// The largest peak RSS of kwp and its children (`nft`), KiB.
    pub rss_tree: u64,
    /// The slowest kernel read while waiting for the full sync.
    pub slowest_check: Duration,
    pub counts: Vec<(String, usize, usize)>,
}

impl Row {
    /// One line: `full_s change_ms,... rss_kwp rss_tree slowest_check_ms`.
    pub fn line(&self) -> String {
        let changes: Vec<String> = self
            .changes
            .iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect();
        format!(
            "{:.2} {} {} {} {:.0}",
            self.full.as_secs_f64(),
            changes.join(","),
            self.rss_kwp,
            self.rss_tree,
            ms(self.slowest_check)
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Kills the proxy if the run fails half way.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(kwp: &Path, mode: &str, n: usize, changes: usize) -> Result<Row> {
    let base = PathBuf::from("/tmp/kwp-bench");
    let dir = base.join(format!("objects-{mode}-{n}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut shifts: BTreeMap<usize, usize> = BTreeMap::new();
    for file in 0..files(n) {
        write_file(&dir, file, n, &shifts)?;
    }
    let mut kernel: Box<dyn Kernel> = match mode {
        "ipvs" => Box::new(Ipvs::new()?),
        "nftables" => Box::new(Nft::new()?),
        other => bail!("unknown mode {other}"),
    };
    let log_path = base.join(format!("kwp-{mode}-{n}.log"));
    let log = fs::File::create(&log_path).context("proxy log")?;
    let source = format!("file:{}", dir.display());
    let started = Instant::now();
    let child = Command::new(kwp)
        .args(["--proxy-mode", mode, "--source", &source])
        .args(["--hostname-override", "node-1"])
        // Every change syncs at once; no periodic resync during the run.
        .args(["--min-sync-period", "0", "--sync-period", "1h"])
        // Wasm under emulation runs tens of times slower than natively.
        .args(["--plugin-call-timeout", "120s"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", kwp.display()))?;
    let mut proxy = Proxy(child);
    let fail = |what: String| -> anyhow::Error {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!("{what}; the proxy's log ends:\n{}", tail.join("\n"))
    };

    let mut slowest_check = Duration::ZERO;
    loop {
        let t = Instant::now();
        let done = kernel.all_programmed(n)?;
        slowest_check = slowest_check.max(t.elapsed());
        if done {
            break;
        }
        if let Some(status) = proxy.0.try_wait()? {
            return Err(fail(format!("kwp exited ({status}) before the full sync")));
        }
        if started.elapsed() > FULL_SYNC_TIMEOUT {
            return Err(fail(format!("no full sync within {FULL_SYNC_TIMEOUT:?}")));
        }
        std::thread::sleep(FULL_POLL);
    }
    let full = started.elapsed();
    println!(
        "bench: {mode} {n}: full sync {:.2} s (slowest kernel read {:.0} ms)",
        full.as_secs_f64(),
        ms(slowest_check)
    );
    let counts = kernel.recount(n)?;
    for (what, found, wanted) in &counts {
        ensure!(
            found == wanted,
            "{what}: {found} in the kernel, {wanted} wanted"
        );
    }

    let mut timed = Vec::new();
    for i in 0..changes {
        std::thread::sleep(PAUSE);
        // Distinct Services spread over the files.
        let s = (i * 7919 + 13) % n;
        *shifts.entry(s).or_default() += 1;
        let want: BTreeSet<_> = (0..ENDPOINTS)
            .map(|e| endpoint_ip(s, e, if e == 0 { shifts[&s] } else { 0 }))
            .collect();
        let tmp = prepare(&dir, file_of(s), n, &shifts)?;
        let t0 = Instant::now();
        fs::rename(&tmp, dir.join(file_name(file_of(s))))?;
        loop {
            if kernel.endpoints(s)? == want {
                break;
            }
            if t0.elapsed() > CHANGE_TIMEOUT {
                let seen = kernel.endpoints(s)?;
                return Err(fail(format!(
                    "change {i} (service {s}) not in the kernel after {CHANGE_TIMEOUT:?}: {seen:?}, want {want:?}"
                )));
            }
            std::thread::sleep(CHANGE_POLL);
        }
        let took = t0.elapsed();
        println!(
            "bench: {mode} {n}: change {i} (service {s}) {:.1} ms",
            ms(took)
        );
        timed.push(took);
    }

    let rss_kwp = vm_hwm(proxy.0.id()).context("kwp's VmHWM")?;
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let _ = proxy.0.wait();
    Ok(Row {
        full,
        changes: timed,
        rss_kwp,
        rss_tree: children_max_rss(),
        slowest_check,
        counts,
    })
}

/// Writes file `file` beside its place and returns the temporary's path.
/// Its mtime is set a minute back: the file source reads a file only once
/// it has stopped changing (200 ms, or an older mtime), a guard for files
/// written in place; a file renamed into place whole needs no wait, and
/// the wait would be the same fixed cost in every mode.
fn prepare(dir: &Path, file: usize, n: usize, shifts: &BTreeMap<usize, usize>) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{}.tmp", file_name(file)));
    fs::write(
        &tmp,
        yaml(file, n, |s| shifts.get(&s).copied().unwrap_or(0)),
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    let past = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(past))
        .with_context(|| format!("setting the mtime of {}", tmp.display()))?;
    Ok(tmp)
}

fn write_file(dir: &Path, file: usize, n: usize, shifts: &BTreeMap<usize, usize>) -> Result<()> {
    let tmp = prepare(dir, file, n, shifts)?;
    fs::rename(tmp, dir.join(file_name(file)))?;
    Ok(())
}

fn vm_hwm(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM line")
}

/// The largest peak RSS among this process's waited-for descendants, KiB.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss.max(0) as u64
}
