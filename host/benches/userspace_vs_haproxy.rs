//! Userspace-mode TCP throughput and latency of kube-wasm-proxy against
//! HAProxy (TCP mode, round robin) proxying to the same loopback backends,
//! with direct-to-backend as a baseline, in one run.
//!
//!     cargo bench -p kube-wasm-proxy --bench userspace_vs_haproxy
//!
//! Workloads, each for every target:
//!  * requests/s: C persistent connections doing fixed-size ping-pong
//!    (request -> response) for a fixed time; p50/p99 of each exchange;
//!  * connections/s: C loops of connect, one exchange, close: the backend
//!    closes after answering and the client waits for that close, so a
//!    connection counts only once it is fully torn down; p50/p99 of that.
//!
//! Targets run alternately (direct, kwp, haproxy, direct, kwp, ...) for
//! several rounds and the medians are reported, since the machine is noisy.
//! kwp runs in this process on its own tokio runtime (its own threads);
//! HAProxy is a child process with the same number of threads. The load
//! generator and the backends share a third runtime. Also reported: CPU
//! time the proxy itself used per request/connection, which does not depend
//! on how the cores were shared with the load generator.
//!
//! Knobs (environment):
//!   KWP_BENCH_SECS            measured seconds per run          (5)
//!   KWP_BENCH_WARMUP_SECS     unmeasured warm-up before each    (1)
//!   KWP_BENCH_CONC            concurrent connections / loops    (32)
//!   KWP_BENCH_ROUNDS          rounds over all targets           (5)
//!   KWP_BENCH_PROXY_THREADS   kwp runtime workers = haproxy nbthread (2)
//!   KWP_BENCH_LOAD_THREADS    load generator + backend workers  (2)
//!   KWP_BENCH_SIZE            request and response bytes        (64)
//!   KWP_BENCH_BACKENDS        backends                          (4)
//!   KWP_BENCH_TARGETS         comma list of direct,kwp,haproxy  (all)
//!   KWP_BENCH_HAPROXY         haproxy binary                    (haproxy)
//!   RUST_LOG                  kwp's tracing filter (off unless set)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// Per-worker cap on exchanges in one run, so loops are bounded in count
/// as well as in time.
const MAX_OPS_PER_WORKER: u64 = 20_000_000;
/// Per-worker cap on recorded latency samples (memory bound).
const MAX_SAMPLES_PER_WORKER: usize = 4_000_000;
/// Errors after which a connect-per-request worker gives up.
const MAX_ERRORS_PER_WORKER: u64 = 1_000;
/// First request byte asking the backend to close after its answer.
const CLOSE: u8 = b'C';
/// First request byte of a keep-alive request.
const KEEP: u8 = 0x5a;
/// Grace after the run's deadline before the run is declared hung.
const HANG_GRACE: Duration = Duration::from_secs(30);

struct Knobs {
    secs: Duration,
    warmup: Duration,
    conc: usize,
    rounds: usize,
    proxy_threads: usize,
    load_threads: usize,
    size: usize,
    backends: usize,
    targets: Vec<Target>,
    haproxy: String,
}

fn env<T: FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not valid")),
        _ => Ok(default),
    }
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let targets = match std::env::var("KWP_BENCH_TARGETS") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|t| match t.trim() {
                    "direct" => Ok(Target::Direct),
                    "kwp" => Ok(Target::Kwp),
                    "haproxy" => Ok(Target::Haproxy),
                    other => {
                        bail!("KWP_BENCH_TARGETS: unknown target {other:?} (direct, kwp, haproxy)")
                    }
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![Target::Direct, Target::Kwp, Target::Haproxy],
        };
        let k = Self {
            secs: Duration::from_secs_f64(env("KWP_BENCH_SECS", 5.0)?),
            warmup: Duration::from_secs_f64(env("KWP_BENCH_WARMUP_SECS", 1.0)?),
            conc: env("KWP_BENCH_CONC", 32)?,
            rounds: env("KWP_BENCH_ROUNDS", 5)?,
            proxy_threads: env("KWP_BENCH_PROXY_THREADS", 2)?,
            load_threads: env("KWP_BENCH_LOAD_THREADS", 2)?,
            size: env("KWP_BENCH_SIZE", 64)?,
            backends: env("KWP_BENCH_BACKENDS", 4)?,
            targets,
            haproxy: std::env::var("KWP_BENCH_HAPROXY").unwrap_or_else(|_| "haproxy".into()),
        };
        if k.conc == 0 || k.conc > 4000 {
            bail!("KWP_BENCH_CONC must be 1..=4000 (haproxy maxconn is 8000)");
        }
        if k.size == 0 || k.size > 1 << 20 {
            bail!("KWP_BENCH_SIZE must be 1..=1048576");
        }
        if k.backends == 0 || k.backends > 64 {
            bail!("KWP_BENCH_BACKENDS must be 1..=64");
        }
        if k.rounds == 0 || k.rounds > 100 || k.proxy_threads == 0 || k.load_threads == 0 {
            bail!("KWP_BENCH_ROUNDS must be 1..=100 and thread counts at least 1");
        }
        if k.secs.is_zero() || k.secs > Duration::from_secs(600) {
            bail!("KWP_BENCH_SECS must be in (0, 600]");
        }
        Ok(k)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Direct,
    Kwp,
    Haproxy,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Kwp => "kwp",
            Target::Haproxy => "haproxy",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Persistent connections, back-to-back exchanges.
    PingPong,
    /// Connect, one exchange, close.
    ConnPerRequest,
}

// ---------------------------------------------------------------- backends

/// Starts one backend: answers every `size`-byte request with `size` bytes,
/// as many times as the client asks on one connection.
async fn start_backend(size: usize, accepted: Arc<AtomicU64>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a backend")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve_backend(conn, size));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(addr)
}

async fn serve_backend(mut conn: TcpStream, size: usize) {
    let _ = conn.set_nodelay(true);
    let mut req = vec![0u8; size];
    let resp = vec![0xa5u8; size];
    // Ends at the client's EOF (or any error), or after answering a
    // request that starts with CLOSE: then the backend closes first, as an
    // HTTP/1.0 server would, so TIME_WAIT stays on the server side and the
    // load generator does not run out of ephemeral ports.
    while conn.read_exact(&mut req).await.is_ok() {
        if conn.write_all(&resp).await.is_err() {
            break;
        }
        if req[0] == CLOSE {
            let _ = conn.shutdown().await;
            break;
        }
    }
}

/// The Service and one EndpointSlice per backend, like `kwp::demo` writes them.
fn objects(backends: &[SocketAddr]) -> String {
    let target_port = backends.first().map_or(0, SocketAddr::port);
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bench\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  ports:\n  - name: tcp\n    protocol: TCP\n    port: 80\n    targetPort: {target_port}\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: bench-{i}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: bench\naddressType: IPv4\nports:\n- name: tcp\n  protocol: TCP\n  port: {port}\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: bench-node\n",
            port = addr.port(),
            ip = addr.ip(),
        ));
    }
    yaml
}

// ---------------------------------------------------------------- kwp

/// Builds the proxy on `rt` and waits for its listener.
fn start_kwp(rt: &tokio::runtime::Runtime, dir: &Path) -> Result<SocketAddr> {
    use clap::Parser;
    let mut flags = kwp::config::Cli::parse_from(["kube-wasm-proxy"]).flags;
    flags.source = Some(format!("file:{}", dir.display()));
    flags.proxy_mode = Some(kwp::config::ProxyMode::Userspace);
    flags.no_redirect = true;
    flags.healthz_bind_address = Some(String::new());
    flags.metrics_bind_address = Some(String::new());
    flags.hostname_override = Some("bench-node".into());
    let app = {
        let _guard = rt.enter();
        kwp::app::App::build(&flags).context("building kube-wasm-proxy")?
    };
    let mapping = app
        .mapping
        .clone()
        .context("no userspace mapping (dry run?)")?;
    rt.spawn(async move {
        if let Err(e) = app.run().await {
            eprintln!("kube-wasm-proxy stopped: {e:#}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_, (_, local))) = mapping.read().expect("mapping lock").iter().next() {
            return Ok(*local);
        }
        if Instant::now() > deadline {
            bail!("kube-wasm-proxy opened no listener within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- haproxy

/// HAProxy as a child process, killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Haproxy {
    fn start(bin: &str, backends: &[SocketAddr], threads: usize, dir: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cfg = format!(
            "global\n    nbthread {threads}\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 3s\n    timeout client 60s\n    timeout server 60s\n\nfrontend bench\n    bind {addr}\n    default_backend bench\n\nbackend bench\n    balance roundrobin\n"
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!("    server b{i} {b}\n"));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, &cfg)?;
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!("starting {bin} (apt-get install -y haproxy, or set KWP_BENCH_HAPROXY)")
            })?;
        let mut h = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = h.child.try_wait()? {
                bail!(
                    "haproxy exited with {status}: {}",
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy did not listen on {addr} within 10 s: {}",
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn version(bin: &str) -> String {
        Command::new(bin)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- CPU accounting

/// Nanoseconds on CPU of the threads of `pid` (all, or those whose name
/// starts with `prefix`), from /proc/<pid>/task/*/schedstat.
fn cpu_ns(pid: &str, prefix: Option<&str>) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        if let Some(prefix) = prefix {
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !comm.trim_end().starts_with(prefix) {
                continue;
            }
        }
        let Ok(stat) = std::fs::read_to_string(task.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

// ---------------------------------------------------------------- load

#[derive(Default)]
struct WorkerOut {
    ok: u64,
    errors: u64,
    lat_ns: Vec<u32>,
}

impl WorkerOut {
    fn record(&mut self, took: Duration) {
        self.ok += 1;
        if self.lat_ns.len() < MAX_SAMPLES_PER_WORKER {
            self.lat_ns
                .push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Run {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Proxy CPU per operation, µs (None for direct).
    cpu_us: Option<f64>,
}

async fn exchange(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(resp).await?;
    if resp[0] != 0xa5 {
        return Err(std::io::Error::other("unexpected response"));
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn worker(
    addr: SocketAddr,
    workload: Workload,
    size: usize,
    dur: Duration,
    start: Arc<Barrier>,
) -> WorkerOut {
    let mut out = WorkerOut {
        lat_ns: Vec::with_capacity(1 << 16),
        ..WorkerOut::default()
    };
    let mut req = vec![KEEP; size];
    let mut resp = vec![0u8; size];
    match workload {
        Workload::PingPong => {
            let conn = connect(addr).await;
            start.wait().await;
            let Ok(mut s) = conn else {
                out.errors += 1;
                return out;
            };
            let deadline = Instant::now() + dur;
            while out.ok < MAX_OPS_PER_WORKER {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                if exchange(&mut s, &req, &mut resp).await.is_err() {
                    out.errors += 1;
                    break;
                }
                out.record(t.elapsed());
            }
        }
        Workload::ConnPerRequest => {
            req[0] = CLOSE;
            start.wait().await;
            let deadline = Instant::now() + dur;
            while out.ok + out.errors < MAX_OPS_PER_WORKER && out.errors < MAX_ERRORS_PER_WORKER {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                let one = async {
                    let mut s = connect(addr).await?;
                    exchange(&mut s, &req, &mut resp).await?;
                    // The backend closes first; the connection is done
                    // when its FIN has come through.
                    match s.read(&mut resp).await? {
                        0 => Ok(()),
                        _ => Err(std::io::Error::other("data after the response")),
                    }
                };
                match one.await {
                    Ok(()) => out.record(t.elapsed()),
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
    }
    out
}

/// Runs `conc` workers against `addr` for `dur`; `cpu` samples the proxy's CPU time.
async fn load(
    addr: SocketAddr,
    workload: Workload,
    k: &Knobs,
    dur: Duration,
    cpu: &dyn Fn() -> Option<u64>,
) -> Result<Run> {
    let start = Arc::new(Barrier::new(k.conc + 1));
    let mut set = JoinSet::new();
    for _ in 0..k.conc {
        set.spawn(worker(addr, workload, k.size, dur, start.clone()));
    }
    start.wait().await;
    let cpu0 = cpu();
    let t0 = Instant::now();
    let mut outs = Vec::with_capacity(k.conc);
    let joined = tokio::time::timeout(dur + HANG_GRACE, async {
        while let Some(r) = set.join_next().await {
            outs.push(r.context("load worker panicked")?);
        }
        anyhow::Ok(())
    })
    .await;
    let elapsed = t0.elapsed();
    let cpu1 = cpu();
    match joined {
        Ok(r) => r?,
        Err(_) => {
            set.abort_all();
            bail!("load run against {addr} hung (no answer {HANG_GRACE:?} past its deadline)");
        }
    }
    let ok: u64 = outs.iter().map(|o| o.ok).sum();
    let errors: u64 = outs.iter().map(|o| o.errors).sum();
    let mut lat: Vec<u32> = outs.into_iter().flat_map(|o| o.lat_ns).collect();
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() - 1) as f64 * q).round() as usize;
        f64::from(lat[i]) / 1000.0
    };
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) if ok > 0 => Some(b.saturating_sub(a) as f64 / 1000.0 / ok as f64),
        _ => None,
    };
    Ok(Run {
        rate: ok as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
        cpu_us,
    })
}

// ---------------------------------------------------------------- report

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "{cores} cores, {cpu}, kernel {kernel}, loadavg {}",
        loadavg()
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------- main

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; there is nothing to filter, so arguments are ignored.
    let k = Knobs::from_env()?;
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    println!("userspace_vs_haproxy: {}", machine());
    println!(
        "  {} backends, {} B request / {} B response, concurrency {}, {:?} per run (+{:?} warm-up), {} rounds",
        k.backends, k.size, k.size, k.conc, k.secs, k.warmup, k.rounds
    );
    println!(
        "  kwp: userspace mode, round-robin policy, tokio runtime with {} workers; haproxy: {} with nbthread {}; load generator + backends: {} workers",
        k.proxy_threads,
        Haproxy::version(&k.haproxy),
        k.proxy_threads,
        k.load_threads
    );

    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(k.load_threads)
        .thread_name("bench-load")
        .enable_all()
        .build()?;
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(k.proxy_threads)
        .thread_name("kwp-proxy")
        .enable_all()
        .build()?;

    let accepted: Vec<Arc<AtomicU64>> = (0..k.backends).map(|_| Arc::default()).collect();
    let backends = load_rt.block_on(async {
        let mut v = Vec::new();
        for a in &accepted {
            v.push(start_backend(k.size, a.clone()).await?);
        }
        anyhow::Ok(v)
    })?;
    let dir = tempfile::Builder::new().prefix("kwp-bench-").tempdir()?;
    std::fs::write(dir.path().join("bench.yaml"), objects(&backends))?;

    let mut addrs: Vec<(Target, SocketAddr)> = Vec::new();
    let mut haproxy = None;
    for &t in &k.targets {
        let addr = match t {
            Target::Direct => backends[0],
            Target::Kwp => start_kwp(&proxy_rt, dir.path())?,
            Target::Haproxy => {
                let h = Haproxy::start(&k.haproxy, &backends, k.proxy_threads, dir.path())?;
                let a = h.addr;
                haproxy = Some(h);
                a
            }
        };
        println!("  {:<8} {addr}", t.name());
        addrs.push((t, addr));
    }
    let haproxy_pid = haproxy.as_ref().map(|h| h.child.id().to_string());

    // Sanity: one exchange through each target.
    load_rt.block_on(async {
        for &(t, addr) in &addrs {
            let mut s = connect(addr)
                .await
                .with_context(|| format!("connecting to {}", t.name()))?;
            let mut resp = vec![0u8; k.size];
            tokio::time::timeout(
                Duration::from_secs(5),
                exchange(&mut s, &vec![KEEP; k.size], &mut resp),
            )
            .await
            .with_context(|| format!("{} did not answer", t.name()))?
            .with_context(|| format!("{} answered wrongly", t.name()))?;
        }
        anyhow::Ok(())
    })?;

    let cpu_of = |t: Target| -> Box<dyn Fn() -> Option<u64>> {
        match t {
            Target::Direct => Box::new(|| None),
            Target::Kwp => Box::new(|| cpu_ns("self", Some("kwp-"))),
            Target::Haproxy => {
                let pid = haproxy_pid.clone().unwrap_or_default();
                Box::new(move || cpu_ns(&pid, None))
            }
        }
    };

    let workloads = [
        (Workload::PingPong, "requests/s"),
        (Workload::ConnPerRequest, "connections/s"),
    ];
    // results[workload][target] = runs
    let mut results: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); addrs.len()]; workloads.len()];
    let mut spread: Vec<Vec<u64>> = vec![vec![0; k.backends]; addrs.len()];
    for round in 1..=k.rounds {
        for (wi, &(workload, label)) in workloads.iter().enumerate() {
            for (ti, &(t, addr)) in addrs.iter().enumerate() {
                let cpu = cpu_of(t);
                let run = load_rt.block_on(async {
                    if !k.warmup.is_zero() {
                        load(addr, workload, &k, k.warmup, &|| None::<u64>).await?;
                    }
                    let before: Vec<u64> =
                        accepted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
                    let run = load(addr, workload, &k, k.secs, &*cpu).await?;
                    for (i, a) in accepted.iter().enumerate() {
                        spread[ti][i] += a.load(Ordering::Relaxed) - before[i];
                    }
                    anyhow::Ok(run)
                })?;
                println!(
                    "round {round} {label:<14} {:<8} {:>9}/s  p50 {:>7} us  p99 {:>7} us  proxy cpu {:>6} us/op  errors {}",
                    t.name(),
                    fmt(run.rate),
                    fmt(run.p50_us),
                    fmt(run.p99_us),
                    run.cpu_us.map_or("-".into(), fmt),
                    run.errors
                );
                results[wi][ti].push(run);
            }
        }
    }

    // The table of medians.
    let idx = |t: Target| addrs.iter().position(|&(x, _)| x == t);
    let (kwp_i, ha_i) = (idx(Target::Kwp), idx(Target::Haproxy));
    println!(
        "\nmedians of {} rounds ({:?} each, concurrency {}, {} B):\n",
        k.rounds, k.secs, k.conc, k.size
    );
    let mut header = format!("| {:<26} |", "metric");
    for &(t, _) in &addrs {
        header.push_str(&format!(" {:>9} |", t.name()));
    }
    header.push_str(" kwp/haproxy |");
    println!("{header}");
    println!(
        "|{}|",
        header[1..header.len() - 1]
            .split('|')
            .map(|c| "-".repeat(c.len()))
            .collect::<Vec<_>>()
            .join("|")
    );
    let rows: [(&str, usize, fn(&Run) -> f64); 8] = [
        ("requests/s", 0, |r| r.rate),
        ("request p50 latency (us)", 0, |r| r.p50_us),
        ("request p99 latency (us)", 0, |r| r.p99_us),
        ("proxy CPU per request (us)", 0, |r| {
            r.cpu_us.unwrap_or(f64::NAN)
        }),
        ("connections/s", 1, |r| r.rate),
        ("connection p50 (us)", 1, |r| r.p50_us),
        ("connection p99 (us)", 1, |r| r.p99_us),
        ("proxy CPU per conn (us)", 1, |r| {
            r.cpu_us.unwrap_or(f64::NAN)
        }),
    ];
    for (name, wi, f) in rows {
        let meds: Vec<f64> = (0..addrs.len())
            .map(|ti| median(results[wi][ti].iter().map(f).collect()))
            .collect();
        let mut line = format!("| {name:<26} |");
        for m in &meds {
            line.push_str(&format!(" {:>9} |", fmt(*m)));
        }
        let ratio = match (kwp_i, ha_i) {
            (Some(a), Some(b)) => format!("{:.2}", meds[a] / meds[b]),
            _ => "-".into(),
        };
        line.push_str(&format!(" {ratio:>11} |"));
        println!("{line}");
    }
    let total_errors: u64 = results.iter().flatten().flatten().map(|r| r.errors).sum();
    println!("\nerrors (all runs): {total_errors}");
    for (ti, &(t, _)) in addrs.iter().enumerate() {
        println!("backend connections via {:<8} {:?}", t.name(), spread[ti]);
    }
    println!("ratios: throughput >1 = kwp faster; latency and CPU >1 = kwp slower/costlier");
    println!("loadavg at the end: {}", loadavg());

    drop(haproxy);
    proxy_rt.shutdown_background();
    load_rt.shutdown_background();
    Ok(())
}
