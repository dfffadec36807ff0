//! kwp against upstream kube-proxy, side by side, fed by one real etcd +
//! kube-apiserver (scripts/control-plane.sh builds kube-proxy v1.34 too).
//!
//! N Services, one EndpointSlice each, 3 to 7 endpoints (5 on average: the
//! Services span several backend slot counts), created through the API.
//! Then each proxy in turn, from an empty ruleset, same mode and flags:
//! - cold start: process start until all N Services are programmed
//!   (`kernel::programmed`); CPU seconds (its own and its children's:
//!   `nft`, `iptables-restore`) until then;
//! - one change: an EndpointSlice patched through the API, from the write
//!   returning until nf_tables announces a committed message carrying the
//!   new address (`events`); KWP_BENCH_CHANGES of them (12),
//!   KWP_BENCH_CHANGE_GAP_SECS apart (6), so they span several
//!   syncPeriods (30 s): p50, p99 and max;
//! - a Service created (its EndpointSlice first) and deleted, from the
//!   Service write returning until a message adding / deleting its cluster
//!   IP (KWP_BENCH_CREATES, 10);
//! - CPU seconds over KWP_BENCH_LOAD_SECS (60) of one change per second;
//! - peak RSS (VmHWM);
//! - API traffic: bytes and connections through a counting relay the
//!   proxy's kubeconfig points at, reads from the API server's audit log.
//! Modes (KWP_BENCH_MODE): nftables, iptables (Debian's default
//! iptables-nft). KWP_BENCH_COLD_DEADLINE_SECS bounds a cold start (900,
//! iptables 7200: upstream takes minutes). The table is printed after each
//! size; the plot is written to KWP_BENCH_SVG (docs/vs-kube-proxy-MODE.svg).
//! Two kwp builds against one API server (creating 50k Services takes
//! tens of minutes, so not once per build): KWP_BENCH_PROXIES=kwp-base,kwp
//! runs KWP_BENCH_BASE_BIN as `kwp-base` (KWP_BENCH_KWP_BIN overrides the
//! binary of `kwp`); KWP_BENCH_GO_FILE, if set, makes the bench wait after
//! creating the objects until that file exists (to finish a build first).
//! Run as root (everything lives in a private network namespace):
//!
//!     cargo bench -p kube-wasm-proxy --bench vs_kube_proxy
//!     KWP_BENCH_SIZES=1000,10000 KWP_BENCH_MODE=iptables cargo bench -p kube-wasm-proxy --bench vs_kube_proxy

// The suite's real control plane and the helpers it leans on.
#[path = "../../tests/common/api_client.rs"]
#[allow(dead_code)]
mod api_client;
#[path = "../../tests/common/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;
#[path = "../../tests/common/poll.rs"]
#[allow(dead_code)]
mod poll;
#[path = "../../tests/common/slots.rs"]
#[allow(dead_code)]
mod slots;

#[path = "vs_kube_proxy/cluster.rs"]
mod cluster;
#[path = "vs_kube_proxy/events.rs"]
mod events;
#[path = "vs_kube_proxy/kernel.rs"]
mod kernel;
#[path = "vs_kube_proxy/relay.rs"]
mod relay;
#[path = "vs_kube_proxy/report.rs"]
mod report;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use events::{Events, Kind};
use kernel::{cpu_seconds, loadavg, peak_rss_kib};
use report::Row;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Audit only what the proxies do: one line per finished request, not
/// the API server's own loopback calls.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\n\
omitStages: [RequestReceived, ResponseStarted]\nrules:\n\
- level: None\n  users: [\"system:apiserver\"]\n\
- level: None\n  verbs: [create, update, patch, delete]\n- level: Metadata\n";

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("KWP_BENCH_SIZES")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mode: String = env_or("KWP_BENCH_MODE", "nftables".to_string());
    let cold_default = if mode == "iptables" { 7200 } else { 900 };
    let settings = Settings {
        changes: env_or("KWP_BENCH_CHANGES", 12),
        gap: Duration::from_secs(env_or("KWP_BENCH_CHANGE_GAP_SECS", 6)),
        creates: env_or("KWP_BENCH_CREATES", 10),
        load_secs: env_or("KWP_BENCH_LOAD_SECS", 60),
        cold_deadline: Duration::from_secs(env_or("KWP_BENCH_COLD_DEADLINE_SECS", cold_default)),
    };
    let proxies: Vec<String> = env_or("KWP_BENCH_PROXIES", "kube-proxy,kwp".to_string())
        .split(',')
        .map(str::to_string)
        .collect();
    let svg_path = std::env::var("KWP_BENCH_SVG").map_or_else(
        |_| apiserver::repo_root().join(format!("docs/vs-kube-proxy-{mode}.svg")),
        PathBuf::from,
    );
    // SAFETY: unshare(2) of this process's own network namespace.
    anyhow::ensure!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
        "unshare(CLONE_NEWNET) failed: run as root"
    );
    kernel::sh("ip link set lo up")?;
    let dir = std::env::temp_dir().join(format!("kwp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY)?;
    let audit = dir.join("audit.log");
    let cp = apiserver::ControlPlane::start_with(&[
        &format!("--audit-policy-file={}", policy.display()),
        &format!("--audit-log-path={}", audit.display()),
    ]);
    let kubeconfig = dir.join("kubeconfig");
    cp.write_kubeconfig(&kubeconfig, &cp.admin_token);
    // The proxies reach the API server through the counting relay.
    let (relay_addr, counts) = relay::start(([127, 0, 0, 1], cp.port()).into())?;
    let proxy_kubeconfig = dir.join("kubeconfig-relayed");
    std::fs::write(
        &proxy_kubeconfig,
        std::fs::read_to_string(&kubeconfig)?.replace(&cp.url, &format!("https://{relay_addr}")),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster::client(&kubeconfig))?;
    rt.block_on(cluster::setup(&client))?;
    println!(
        "machine: {} cores, {}, kernel {}; mode {mode}; {settings:?}; logs in {}; load at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        dir.display(),
        loadavg()
    );
    let mut created = 0;
    let mut round = 0;
    let mut table = report::Table::new();
    for n in sizes {
        let started = Instant::now();
        rt.block_on(cluster::create(&client, created, n))?;
        created = created.max(n);
        println!(
            "created {n} Services in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if let Ok(go) = std::env::var("KWP_BENCH_GO_FILE") {
            println!("waiting for {go} to exist");
            while !Path::new(&go).exists() {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        let mut rows = Vec::new();
        for proxy in &proxies {
            round += 1;
            let run = Run {
                proxy,
                mode: &mode,
                n,
                round,
                settings: &settings,
                kubeconfig: &proxy_kubeconfig,
                logs: &dir,
                audit: &audit,
                counts: counts.clone(),
            };
            let load = loadavg();
            let row = run.measure(&rt, &client)?;
            println!(
                "{proxy} at {n}: {row:?} (load before {load}, after {})",
                loadavg()
            );
            rows.push((proxy.clone(), row));
        }
        table.push((n, rows));
        report::print_table(&table);
        let title = format!(
            "kwp vs kube-proxy {}, {mode} mode",
            apiserver::kube_version()
        );
        std::fs::write(&svg_path, report::svg(&table, &title))
            .with_context(|| format!("writing {}", svg_path.display()))?;
        println!("plot: {}", svg_path.display());
    }
    Ok(())
}

#[derive(Debug)]
struct Settings {
    changes: usize,
    gap: Duration,
    creates: usize,
    load_secs: usize,
    cold_deadline: Duration,
}

struct Run<'a> {
    proxy: &'a str,
    mode: &'a str,
    n: usize,
    round: usize,
    settings: &'a Settings,
    kubeconfig: &'a Path,
    logs: &'a Path,
    audit: &'a Path,
    counts: Arc<relay::Counts>,
}

/// The proxy under test, stopped (SIGTERM, then reaped) however the run ends.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        // SAFETY: a signal to the child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Run<'_> {
    fn measure(&self, rt: &tokio::runtime::Runtime, client: &kube::Client) -> Result<Row> {
        kernel::reset()?;
        let audit_from = std::fs::metadata(self.audit).map_or(0, |m| m.len());
        self.counts.take();
        let mut child = Proxy(self.spawn()?);
        let started = Instant::now();
        let pid = child.0.id();
        let mut row = Row {
            cold_start: self.cold_start(&mut child.0, started)?,
            cold_cpu: cpu_seconds(pid),
            ..Row::default()
        };
        let events = Events::subscribe()?;
        std::thread::sleep(Duration::from_secs(2));
        for k in 0..self.settings.changes {
            let service = (k * 7919 + self.round * 31) % self.n;
            let ip = Ipv4Addr::new(
                10,
                200 + (self.round % 50) as u8,
                (k / 250) as u8,
                (k % 250 + 1) as u8,
            );
            events.drain();
            rt.block_on(cluster::move_endpoint(client, service, &ip.to_string()))?;
            let ms = self
                .seen(&events, ip, Kind::New, Instant::now())
                .with_context(|| format!("change {k}"))?;
            row.changes.push(ms);
            std::thread::sleep(self.settings.gap);
        }
        for k in 0..self.settings.creates {
            // Beyond the N Services, a name no other round uses.
            let s = 1_000_000 + self.round * 1000 + k;
            events.drain();
            let ip = rt.block_on(cluster::add_service(client, s))?;
            let ms = self.seen(&events, ip, Kind::New, Instant::now());
            row.creates
                .push(ms.with_context(|| format!("Service s{s} created"))?);
            std::thread::sleep(Duration::from_secs(1));
            events.drain();
            rt.block_on(cluster::delete_service(client, s))?;
            let ms = self.seen(&events, ip, Kind::Del, Instant::now());
            row.deletes
                .push(ms.with_context(|| format!("Service s{s} deleted"))?);
            rt.block_on(cluster::delete_slice(client, s))?;
            std::thread::sleep(Duration::from_secs(1));
        }
        if self.settings.load_secs > 0 {
            let (cpu, secs) = self.steady_load(rt, client, &events, pid)?;
            (row.load_cpu, row.load_secs) = (cpu, secs);
        }
        row.peak_rss_mib = peak_rss_kib(pid) / 1024.0;
        drop(child);
        // Watches end with the connection; the API server then logs them.
        std::thread::sleep(Duration::from_secs(2));
        let (sent, received, connections) = self.counts.take();
        row.api_sent_mib = sent as f64 / (1 << 20) as f64;
        row.api_received_mib = received as f64 / (1 << 20) as f64;
        row.api_connections = connections as f64;
        row.api_reads = audit_reads(self.audit, audit_from)? as f64;
        for v in [&mut row.changes, &mut row.creates, &mut row.deletes] {
            v.sort_by(f64::total_cmp);
        }
        Ok(row)
    }

    /// Seconds from `started` until all N Services are programmed. Polls
    /// no more than 1/20 of the time (a dump of 10k rules takes
    /// milliseconds, but the machine is shared).
    fn cold_start(&self, child: &mut Child, started: Instant) -> Result<f64> {
        let deadline = started + self.settings.cold_deadline;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during cold start: {status}", self.proxy);
            }
            let polled = Instant::now();
            let have = kernel::programmed(self.mode, self.proxy).unwrap_or(0);
            if have >= self.n {
                return Ok(started.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: only {have} of {} Services after {:?}",
                    self.proxy,
                    self.n,
                    self.settings.cold_deadline
                );
            }
            std::thread::sleep((polled.elapsed() * 20).max(Duration::from_millis(50)));
        }
    }

    /// Milliseconds from `written` until a `kind` message naming `ip`.
    fn seen(&self, events: &Events, ip: Ipv4Addr, kind: Kind, written: Instant) -> Result<f64> {
        let seen = events
            .wait_for(ip, kind, written + Duration::from_secs(600))
            .with_context(|| format!("{}: not seen in 600 s", self.proxy))?;
        Ok(seen.saturating_duration_since(written).as_secs_f64() * 1000.0)
    }

    /// One endpoint change per second for `load_secs`, without waiting
    /// for each; then until the last is in the kernel. The process's CPU
    /// seconds over that, and how long it took.
    fn steady_load(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &kube::Client,
        events: &Events,
        pid: u32,
    ) -> Result<(f64, f64)> {
        let (cpu, started) = (cpu_seconds(pid), Instant::now());
        let mut last = Ipv4Addr::UNSPECIFIED;
        for i in 0..self.settings.load_secs {
            let service = (i * 104_729 + self.round * 17) % self.n;
            last = Ipv4Addr::new(
                10,
                150 + (self.round % 50) as u8,
                (i / 250) as u8,
                (i % 250 + 1) as u8,
            );
            if i + 1 == self.settings.load_secs {
                events.drain();
            }
            rt.block_on(cluster::move_endpoint(client, service, &last.to_string()))?;
            let next = started + Duration::from_secs(i as u64 + 1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        self.seen(events, last, Kind::New, Instant::now())
            .context("the last change of the steady load")?;
        Ok((cpu_seconds(pid) - cpu, started.elapsed().as_secs_f64()))
    }

    fn spawn(&self) -> Result<Child> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}.log", self.proxy, self.round)))?;
        let mut cmd = match self.proxy {
            "kwp" | "kwp-base" => {
                let binary = match self.proxy {
                    "kwp" => std::env::var("KWP_BENCH_KWP_BIN")
                        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kube-wasm-proxy").into()),
                    _ => std::env::var("KWP_BENCH_BASE_BIN")
                        .context("kwp-base needs KWP_BENCH_BASE_BIN (another build's binary)")?,
                };
                let mut c = Command::new(binary);
                c.args(["--source", "kubernetes"]);
                c
            }
            "kube-proxy" => {
                let mut c = Command::new(&apiserver::binaries().kube_proxy);
                // No conntrack sysctls: they are not per namespace.
                c.args([
                    "--conntrack-max-per-core=0",
                    "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0",
                ]);
                c
            }
            other => bail!("unknown proxy {other}"),
        };
        cmd.args(["--proxy-mode", self.mode, "--kubeconfig", &kubeconfig])
            .args(["--hostname-override", cluster::NODE])
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
            .with_context(|| format!("starting {}", self.proxy))
    }
}

/// Reads (get, list, watch) the audit log holds after byte `from`: the
/// bench itself only writes, so these are the proxy's.
fn audit_reads(audit: &Path, from: u64) -> Result<usize> {
    let text = std::fs::read(audit).with_context(|| format!("reading {}", audit.display()))?;
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| matches!(e["verb"].as_str(), Some("get" | "list" | "watch")))
        .count())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}
