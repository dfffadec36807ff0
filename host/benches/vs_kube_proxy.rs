//! kwp against upstream kube-proxy, side by side, fed by one real etcd +
//! kube-apiserver (scripts/control-plane.sh builds kube-proxy v1.34 too).
//!
//! N Services, one EndpointSlice each, 3 to 7 endpoints (5 on average: the
//! Services span several backend slot counts), created through the API.
//! Then each proxy in turn, from an empty ruleset, same mode and flags:
//! - cold start: process start until `service-ips` holds all N frontends;
//!   CPU seconds (its own and its `nft` children's) until then;
//! - one change: an EndpointSlice patched through the API, from the write
//!   returning until nf_tables announces a commit carrying the new address
//!   (the event group `nft monitor` reads); at least 10,
//!   spaced so that they span several syncPeriods (30 s);
//! - peak RSS (VmHWM).
//! Run as root (everything lives in a private network namespace):
//!
//!     cargo bench -p kube-wasm-proxy --bench vs_kube_proxy
//!     KWP_BENCH_SIZES=1000,10000 cargo bench -p kube-wasm-proxy --bench vs_kube_proxy

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

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const NAMESPACE: &str = "bench";
const NODE: &str = "node-1";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("KWP_BENCH_SIZES")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let changes: usize = env_or("KWP_BENCH_CHANGES", 12);
    let gap = Duration::from_secs(env_or("KWP_BENCH_CHANGE_GAP_SECS", 6));
    let mode: String = env_or("KWP_BENCH_MODE", "nftables".to_string());
    let proxies: Vec<String> = env_or("KWP_BENCH_PROXIES", "kube-proxy,kwp".to_string())
        .split(',')
        .map(str::to_string)
        .collect();
    anyhow::ensure!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
        "unshare(CLONE_NEWNET) failed: run as root"
    );
    sh("ip link set lo up")?;
    let cp = apiserver::ControlPlane::start();
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    cp.write_kubeconfig(&kubeconfig, &cp.admin_token);
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(client(&kubeconfig))?;
    rt.block_on(setup(&client))?;
    println!(
        "machine: {} cores; mode {mode}; {changes} changes {gap:?} apart; load at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let mut created = 0;
    let mut round = 0;
    let mut table = Vec::new();
    for n in sizes {
        let started = Instant::now();
        rt.block_on(create(&client, created, n))?;
        created = created.max(n);
        println!(
            "created {n} Services in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let mut rows = Vec::new();
        for proxy in &proxies {
            round += 1;
            let run = Run {
                proxy,
                mode: &mode,
                n,
                round,
                changes,
                gap,
                kubeconfig: &kubeconfig,
                logs: dir.path(),
            };
            let row = run.measure(&rt, &client)?;
            println!("{proxy} at {n}: {row:?} (load {})", loadavg());
            rows.push((proxy.clone(), row));
        }
        table.push((n, rows));
    }
    print_table(&table);
    Ok(())
}

#[derive(Debug, Clone)]
struct Row {
    cold_start: f64,
    cold_cpu: f64,
    /// One-change latencies, ms, sorted.
    changes: Vec<f64>,
    peak_rss_mib: f64,
}

impl Row {
    fn pct(&self, p: f64) -> f64 {
        let i = ((self.changes.len() as f64 - 1.0) * p).round() as usize;
        self.changes[i]
    }
}

fn print_table(table: &[(usize, Vec<(String, Row)>)]) {
    println!();
    println!("| Services | metric | kwp | kube-proxy | kwp/kube-proxy |");
    println!("|---:|---|---:|---:|---:|");
    for (n, rows) in table {
        let get = |name: &str| rows.iter().find(|(p, _)| p == name).map(|(_, r)| r);
        let (Some(k), Some(u)) = (get("kwp"), get("kube-proxy")) else {
            for (p, r) in rows {
                println!("| {n} | {p} | {r:?} | | |");
            }
            continue;
        };
        let metrics: [(&str, fn(&Row) -> f64); 7] = [
            ("cold start (s)", |r| r.cold_start),
            ("cold start CPU (s)", |r| r.cold_cpu),
            ("one change p50 (ms)", |r| r.pct(0.5)),
            ("one change p99 (ms)", |r| r.pct(0.99)),
            ("one change max (ms)", |r| r.pct(1.0)),
            ("changes measured", |r| r.changes.len() as f64),
            ("peak RSS (MiB)", |r| r.peak_rss_mib),
        ];
        for (name, f) in metrics {
            let (a, b) = (f(k), f(u));
            let ratio = if b > 0.0 { a / b } else { f64::NAN };
            println!("| {n} | {name} | {a:.2} | {b:.2} | {ratio:.3} |");
        }
    }
}

struct Run<'a> {
    proxy: &'a str,
    mode: &'a str,
    n: usize,
    round: usize,
    changes: usize,
    gap: Duration,
    kubeconfig: &'a std::path::Path,
    logs: &'a std::path::Path,
}

impl Run<'_> {
    fn measure(&self, rt: &tokio::runtime::Runtime, client: &kube::Client) -> Result<Row> {
        sh("nft flush ruleset")?;
        let table = match self.proxy {
            "kwp" => "kube-wasm-proxy",
            _ => "kube-proxy",
        };
        let mut child = self.spawn()?;
        let started = Instant::now();
        let pid = child.id();
        // Cold start: every frontend in the dispatch map.
        let deadline = started + Duration::from_secs(900);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during cold start: {status}", self.proxy);
            }
            let have = kwp::dataplane::nftables::element_count(table, "service-ips").unwrap_or(0);
            if have >= self.n {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: only {have} of {} Services after 900 s",
                    self.proxy,
                    self.n
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let cold_start = started.elapsed().as_secs_f64();
        let cold_cpu = cpu_seconds(pid);
        // One change at a time, seen on nf_tables' event group. Not
        // `nft monitor`: it reloads its cache of the whole table for every
        // event, seconds per event at 10k Services.
        let events = Events::subscribe()?;
        std::thread::sleep(Duration::from_secs(2));
        let mut latencies = Vec::new();
        for k in 0..self.changes {
            events.drain();
            let service = (k * 7919 + self.round * 31) % self.n;
            let ip = format!("10.{}.{}.{}", 200 + self.round % 50, k / 250, k % 250 + 1);
            rt.block_on(move_endpoint(client, service, &ip))?;
            let written = Instant::now();
            let seen = events
                .wait_for(&ip, written + Duration::from_secs(300))
                .with_context(|| format!("{}: change {k} not seen in 300 s", self.proxy))?;
            latencies.push(seen.saturating_duration_since(written).as_secs_f64() * 1000.0);
            std::thread::sleep(self.gap);
        }
        let peak_rss_mib = peak_rss_kib(pid) / 1024.0;
        // SAFETY: a signal to the child we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = child.wait();
        latencies.sort_by(f64::total_cmp);
        Ok(Row {
            cold_start,
            cold_cpu,
            changes: latencies,
            peak_rss_mib,
        })
    }

    fn spawn(&self) -> Result<Child> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}.log", self.proxy, self.round)))?;
        let mut cmd = match self.proxy {
            "kwp" => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_kube-wasm-proxy"));
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
            .args(["--hostname-override", NODE])
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
            .with_context(|| format!("starting {}", self.proxy))
    }
}

/// nf_tables change notifications (the netlink group `nft monitor`
/// reads), searched raw: a change is visible once a committed message
/// carries the new address, as 4 bytes (a rule's or element's data) or as
/// text (upstream names endpoint chains after the address).
struct Events {
    fd: std::os::fd::OwnedFd,
}

impl Events {
    fn subscribe() -> Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) and setsockopt(2) on a descriptor we own.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 12);
            anyhow::ensure!(
                fd >= 0,
                "netlink socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let group: libc::c_int = 7; // NFNLGRP_NFTABLES
            // Without a bind (an address, not a group) no event arrives.
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
            anyhow::ensure!(
                libc::bind(raw, (&addr as *const libc::sockaddr_nl).cast(), len) == 0,
                "netlink bind: {}",
                std::io::Error::last_os_error()
            );
            let size: libc::c_int = 64 << 20;
            let opt = |level, name, value: &libc::c_int| {
                libc::setsockopt(raw, level, name, (value as *const libc::c_int).cast(), 4)
            };
            opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size);
            anyhow::ensure!(
                opt(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &group) == 0,
                "joining NFNLGRP_NFTABLES: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(Self { fd })
        }
    }

    /// One datagram, or `None` after the receive timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        // SAFETY: recv(2) into a buffer we own, within its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }

    fn drain(&self) {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: non-blocking recv(2) into our buffer.
        while unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) } > 0
        {
        }
    }

    /// When a message naming `ip` arrived.
    fn wait_for(&self, ip: &str, deadline: Instant) -> Result<Instant> {
        let bytes: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap_or(0)).collect();
        let text = format!("__{ip}/");
        let mut buf = vec![0u8; 1 << 20];
        while Instant::now() < deadline {
            let Some(n) = self.recv(&mut buf) else {
                continue;
            };
            let at = Instant::now();
            let data = &buf[..n];
            let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
            if has(&bytes) || has(text.as_bytes()) {
                return Ok(at);
            }
        }
        bail!("not seen")
    }
}

async fn client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn setup(client: &kube::Client) -> Result<()> {
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&pp, &ns)
        .await?;
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
    }))?;
    Api::<Node>::all(client.clone()).create(&pp, &node).await?;
    Ok(())
}

/// Endpoints of Service `s`: 3 to 7, so Services span several slot counts.
fn endpoints(s: usize, first: Option<&str>) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..3 + s % 5)
        .map(|e| {
            let idx = s * 8 + e;
            let ip = match first {
                Some(ip) if e == 0 => ip.to_string(),
                _ => format!(
                    "172.{}.{}.{}",
                    16 + (idx >> 16) % 16,
                    (idx >> 8) % 256,
                    idx % 256
                ),
            };
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE})
        })
        .collect();
    serde_json::Value::Array(eps)
}

/// Services `from..to`, each with its EndpointSlice, 16 requests at a time.
async fn create(client: &kube::Client, from: usize, to: usize) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let results: Vec<Result<()>> = futures::stream::iter(from..to)
        .map(|s| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let pp = PostParams::default();
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{s}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                }))?;
                services.create(&pp, &svc).await.with_context(|| format!("Service s{s}"))?;
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{s}-1"), "labels": {"kubernetes.io/service-name": format!("s{s}")}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints(s, None),
                }))?;
                slices.create(&pp, &slice).await.with_context(|| format!("EndpointSlice s{s}-1"))?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Moves endpoint 0 of Service `s` to `ip`.
async fn move_endpoint(client: &kube::Client, s: usize, ip: &str) -> Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"endpoints": endpoints(s, Some(ip))});
    slices
        .patch(
            &format!("s{s}-1"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("patching EndpointSlice s{s}-1"))?;
    Ok(())
}

fn sh(script: &str) -> Result<()> {
    let status = Command::new("sh").args(["-c", script]).status()?;
    anyhow::ensure!(status.success(), "{script}: {status}");
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// utime + stime of the process and its reaped children (`nft`), seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // Fields 14..17 of stat(5), counted after the command name.
    let ticks: f64 = fields.get(11..15).map_or(0.0, |f| f.iter().sum());
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn peak_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
        })
        .unwrap_or(0.0)
}
