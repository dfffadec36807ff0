//! One measured run, in a process of its own (so the peak RSS of its
//! children is this run's alone): a fresh kwp in one mode on N Services
//! from an empty kernel, the full sync, then one-endpoint changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};

use super::api::{Api, IP_OFFSET};
use super::kernel::{Ipvs, Kernel, Nft};
use super::objects::{ENDPOINTS, endpoint_ip, file_name, file_of, files, yaml};

/// How a run is fed and bounded (the options after bench's arguments).
#[derive(Clone, Debug)]
pub struct Opts {
    /// Through an API server (KWP_IPVS_VM_NET=1); the file source if not.
    pub api: Option<Api>,
    /// A full sync not done by then is reported as "more than" (under
    /// emulation upstream's 10k full sync takes longer than a run can).
    pub full_timeout: Duration,
}
const CHANGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the kernel is read while waiting for a change: the reads are
/// a handful of netlink calls, so this is the resolution that matters.
const CHANGE_POLL: Duration = Duration::from_millis(5);
const FULL_POLL: Duration = Duration::from_millis(100);
/// Between changes, so the proxy is idle when the next one starts.
const PAUSE: Duration = Duration::from_secs(1);

/// What one run measured.
pub struct Row {
    /// The full sync; when `finished` is false, how long it ran without
    /// finishing (a lower bound) and `progress` Services were programmed.
    pub full: Duration,
    pub finished: bool,
    pub progress: usize,
    pub changes: Vec<Duration>,
    /// Through an API server: how long each change's write took, as the
    /// guest saw it (part of `changes`).
    pub writes: Vec<Duration>,
    /// kwp's own peak RSS (VmHWM), KiB.
    pub rss_kwp: u64,
    /// The largest peak RSS of kwp and its children (`nft`), KiB.
    pub rss_tree: u64,
    /// The slowest kernel read while waiting for the full sync.
    pub slowest_check: Duration,
    pub counts: Vec<(String, usize, usize)>,
}

impl Row {
    /// One line: `full_s change_ms,...|- rss_kwp rss_tree slowest_check_ms
    /// finished(0|1) progress write_ms,...|-`.
    pub fn line(&self) -> String {
        let list = |v: &[Duration]| {
            if v.is_empty() {
                return "-".to_string();
            }
            let v: Vec<String> = v.iter().map(|d| format!("{:.1}", ms(*d))).collect();
            v.join(",")
        };
        format!(
            "{:.2} {} {} {} {:.0} {} {} {}",
            self.full.as_secs_f64(),
            list(&self.changes),
            self.rss_kwp,
            self.rss_tree,
            ms(self.slowest_check),
            u8::from(self.finished),
            self.progress,
            list(&self.writes)
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

pub fn run(kwp: &Path, mode: &str, n: usize, changes: usize, opts: &Opts) -> Result<Row> {
    let base = PathBuf::from("/tmp/kwp-bench");
    let dir = base.join(format!("objects-{mode}-{n}"));
    // The API server keeps its objects from run to run, so do their moves.
    let mut shifts = if opts.api.is_some() {
        load_shifts()?
    } else {
        BTreeMap::new()
    };
    if opts.api.is_none() {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in 0..files(n) {
            write_file(&dir, file, n, &shifts)?;
        }
    }
    let offset = if opts.api.is_some() { IP_OFFSET } else { 0 };
    let mut kernel: Box<dyn Kernel> = match mode {
        "ipvs" => Box::new(Ipvs::new(true, offset)?),
        "upstream" => Box::new(Ipvs::new(false, offset)?),
        "nftables" => Box::new(Nft::new(offset)?),
        other => bail!("unknown mode {other}"),
    };
    let log_path = base.join(format!("proxy-{mode}-{n}.log"));
    let log = fs::File::create(&log_path).context("proxy log")?;
    let mut cmd = proxy_command(kwp, mode, &dir, opts.api.as_ref())?;
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the {mode} proxy"))?;
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
            return Err(fail(format!(
                "the proxy exited ({status}) before the full sync"
            )));
        }
        if started.elapsed() > opts.full_timeout {
            // A lower bound, with how far it got; no changes measured.
            let full = started.elapsed();
            let progress = kernel.progress(n)?;
            println!(
                "bench: {mode} {n}: full sync NOT done after {:.0} s: {progress} of {n} Services programmed",
                full.as_secs_f64()
            );
            let rss_kwp = vm_hwm(proxy.0.id()).context("the proxy's VmHWM")?;
            stop(&mut proxy);
            return Ok(Row {
                full,
                finished: false,
                progress,
                changes: Vec::new(),
                writes: Vec::new(),
                rss_kwp,
                rss_tree: children_max_rss(),
                slowest_check,
                counts: Vec::new(),
            });
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
    let mut writes = Vec::new();
    for i in 0..changes {
        std::thread::sleep(PAUSE);
        // Distinct Services spread over the files.
        let s = (i * 7919 + 13) % n;
        *shifts.entry(s).or_default() += 1;
        let want: BTreeSet<_> = (0..ENDPOINTS)
            .map(|e| endpoint_ip(s, e, if e == 0 { shifts[&s] } else { 0 }))
            .collect();
        // Timed from the API write's request, or from the rename (writing
        // the file beside its place is not the proxy's work).
        let t0 = if let Some(api) = &opts.api {
            let t0 = Instant::now();
            api.shift(s, endpoint_ip(s, 0, shifts[&s]))
                .with_context(|| format!("change {i}"))?;
            save_shifts(&shifts)?;
            writes.push(t0.elapsed());
            println!(
                "bench: {mode} {n}: change {i}: the API write took {:.1} ms",
                ms(t0.elapsed())
            );
            t0
        } else {
            let tmp = prepare(&dir, file_of(s), n, &shifts)?;
            let t0 = Instant::now();
            fs::rename(&tmp, dir.join(file_name(file_of(s))))?;
            t0
        };
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

    let rss_kwp = vm_hwm(proxy.0.id()).context("the proxy's VmHWM")?;
    stop(&mut proxy);
    Ok(Row {
        full,
        finished: true,
        progress: n,
        changes: timed,
        writes,
        rss_kwp,
        rss_tree: children_max_rss(),
        slowest_check,
        counts,
    })
}

const SHIFTS: &str = "/tmp/kwp-bench/api-shifts";

/// How far each Service's first endpoint has moved in the API server so
/// far (`s shift` lines).
fn load_shifts() -> Result<BTreeMap<usize, usize>> {
    let text = match fs::read_to_string(SHIFTS) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        r => r.context(SHIFTS)?,
    };
    text.lines()
        .map(|l| {
            let (s, shift) = l.split_once(' ').context("a line `s shift`")?;
            Ok((s.parse()?, shift.parse()?))
        })
        .collect::<Result<_>>()
        .with_context(|| format!("reading {SHIFTS}"))
}

fn save_shifts(shifts: &BTreeMap<usize, usize>) -> Result<()> {
    let text: String = shifts.iter().map(|(s, k)| format!("{s} {k}\n")).collect();
    fs::write(SHIFTS, text).with_context(|| format!("writing {SHIFTS}"))
}

/// SIGTERM, so the proxy ends as it would on a node; waited for, so its
/// children count in `children_max_rss`.
fn stop(proxy: &mut Proxy) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let _ = proxy.0.wait();
}

/// The proxy of `mode`: kwp from the files in `dir` or from the API
/// server, or upstream kube-proxy in IPVS mode from the API server. Both
/// sync every change at once and do no periodic resync during the run.
fn proxy_command(kwp: &Path, mode: &str, dir: &Path, api: Option<&Api>) -> Result<Command> {
    if mode == "upstream" {
        let api = api.context("upstream kube-proxy needs the API server (KWP_IPVS_VM_NET=1)")?;
        let mut cmd = Command::new(&api.kube_proxy);
        cmd.args(["--proxy-mode", "ipvs", "--kubeconfig", &api.kubeconfig])
            .args(["--hostname-override", "node-1"])
            .args(["--ipvs-min-sync-period", "0s", "--ipvs-sync-period", "1h"])
            // Leave the conntrack table's size alone, as kwp does.
            .args(["--conntrack-max-per-core", "0"]);
        return Ok(cmd);
    }
    let mut cmd = Command::new(kwp);
    cmd.args(["--proxy-mode", mode]);
    match api {
        Some(api) => cmd.args(["--source", "kubernetes", "--kubeconfig", &api.kubeconfig]),
        None => cmd.arg("--source").arg(format!("file:{}", dir.display())),
    };
    cmd.args(["--hostname-override", "node-1"])
        .args(["--min-sync-period", "0", "--sync-period", "1h"])
        // Wasm under emulation runs tens of times slower than natively.
        .args(["--plugin-call-timeout", "120s"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""]);
    Ok(cmd)
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
