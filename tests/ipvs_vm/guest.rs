//! The guest side: one namespace cluster and one kube-wasm-proxy in IPVS
//! mode in its node namespace, shared by the cases (a proxy start compiles
//! the Wasm plugins, which costs seconds under emulation). Each case
//! replaces the file source's objects and waits for the kernel to show them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::Logs;
use crate::common::netns::Netns;
use crate::common::node_proxy::CONFIG;
use crate::common::topology::Cluster;
use crate::common::write;

pub struct Guest {
    pub cluster: Cluster,
    objects: PathBuf,
    pub plugins: PathBuf,
    config: PathBuf,
    proxy: Mutex<Option<(Child, Logs)>>,
    line_servers: Mutex<Vec<String>>,
}

/// The port of `Guest::line_servers`.
pub const LINE_PORT: u16 = 9090;

/// A connection to a line server: one line asked, one answered, kept open.
pub struct LineConn(BufReader<TcpStream>);

impl LineConn {
    pub fn open(from: &Netns, to: SocketAddr) -> Self {
        let conn = from
            .run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Self(BufReader::new(conn))
    }

    /// The pod that answered.
    pub fn ask(&mut self) -> String {
        self.0.get_mut().write_all(b"who\n").expect("write");
        let mut line = String::new();
        self.0.read_line(&mut line).expect("an answer");
        line.trim().to_string()
    }
}

static GUEST: OnceLock<Guest> = OnceLock::new();

/// The shared cluster and proxy, made by the first case that asks.
pub fn guest() -> &'static Guest {
    GUEST.get_or_init(Guest::new)
}

/// The last lines the proxy logged (for a failed case), if it started.
pub fn log_tail() -> String {
    let Some(g) = GUEST.get() else {
        return String::new();
    };
    let text = g.logs();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits up to three minutes (a proxy start compiles its plugins, slowly
/// under emulation) for `check`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Guest {
    fn new() -> Self {
        let started = Instant::now();
        let cluster = Cluster::new("vm");
        let base = PathBuf::from("/tmp/kwp-ipvs-vm");
        let (objects, plugins) = (base.join("objects"), base.join("plugins"));
        std::fs::create_dir_all(&objects).expect("objects dir");
        std::fs::create_dir_all(&plugins).expect("plugins dir");
        write(&objects, "node.yaml", &Cluster::node_yaml());
        write(&objects, "objects.yaml", "");
        let config = base.join("config.conf");
        std::fs::write(&config, CONFIG).expect("config");
        // The mode from a file, so a case can swap it (hot reload).
        std::fs::write(plugins.join("ipvs.wasm"), ipvs_plugin()).expect("ipvs.wasm");
        println!(
            "guest: cluster built in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let guest = Guest {
            cluster,
            objects,
            plugins,
            config,
            proxy: Mutex::new(None),
            line_servers: Mutex::default(),
        };
        guest.start_proxy();
        guest
    }

    /// Starts (or restarts) the proxy; returns when it programmed the kernel.
    pub fn start_proxy(&self) -> Duration {
        let started = Instant::now();
        let source = format!("file:{}", self.objects.display());
        let (config, plugins) = (self.config.display(), self.plugins.display());
        let (config, plugins) = (config.to_string(), plugins.to_string());
        let args = [
            "--proxy-mode",
            "ipvs",
            "--source",
            &source,
            "--config",
            &config,
            "--plugin-dir",
            &plugins,
            "--hostname-override",
            "node-1",
            "--min-sync-period",
            "50ms",
            "--sync-period",
            "10s",
            // Wasm under emulation runs tens of times slower than natively.
            "--plugin-call-timeout",
            "5s",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ];
        let mut child = self
            .cluster
            .node
            .spawn(env!("CARGO_BIN_EXE_kube-wasm-proxy"), &args);
        let logs = Logs::capture(&mut child);
        *self.proxy.lock().expect("proxy lock") = Some((child, logs));
        eventually("the proxy's mode and its kube-ipvs0", || {
            self.logs().contains("loaded proxy mode") && self.addresses().contains("kube-ipvs0")
        });
        let took = started.elapsed();
        println!("guest: proxy started in {:.1} s", took.as_secs_f64());
        took
    }

    /// Starts, once per pod, a server on `LINE_PORT` that answers every line
    /// with the pod's name and keeps the connection until the client closes.
    pub fn line_servers(&self, names: &[&'static str]) {
        let mut started = self.line_servers.lock().expect("line servers");
        for &name in names {
            if started.iter().any(|n| n == name) {
                continue;
            }
            let listener = self
                .cluster
                .pod(name)
                .ns
                .run_in(|| TcpListener::bind(("0.0.0.0", LINE_PORT)))
                .expect("line server bind");
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut out = conn.try_clone().expect("clone");
                        for _ in BufReader::new(conn).lines().map_while(Result::ok) {
                            if out.write_all(format!("{name}\n").as_bytes()).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            started.push(name.to_string());
        }
    }

    /// Kills the proxy (as a crash or an upgrade would); the kernel keeps
    /// its IPVS tables.
    pub fn kill_proxy(&self) {
        if let Some((mut child, _)) = self.proxy.lock().expect("proxy lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        self.proxy
            .lock()
            .expect("proxy lock")
            .as_ref()
            .map(|(_, l)| l.text())
            .unwrap_or_default()
    }

    /// Replaces every Service and EndpointSlice of the file source with
    /// `objects`, then waits until the kernel's table satisfies `ready`.
    pub fn apply(&self, objects: &str, ready: impl Fn(&str) -> bool) {
        write(&self.objects, "objects.yaml", objects);
        let mut last = String::new();
        // A policy's first use compiles it: tens of seconds on a loaded host.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready(&last) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the IPVS table for this case; it is:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(200));
            last = self.ipvs();
        }
        // Virtual servers come before their addresses on kube-ipvs0 and the
        // last real servers: a moment for the rest of the sync.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The node's IPVS table, readable (see `render`).
    pub fn ipvs(&self) -> String {
        render(&self.cluster.node.sh("cat /proc/net/ip_vs"))
    }

    /// The node's interfaces and addresses, one a line.
    pub fn addresses(&self) -> String {
        self.cluster.node.sh("ip -o link show; ip -o addr show")
    }
}

/// The bundled IPVS mode plugin's bytes.
pub fn ipvs_plugin() -> Vec<u8> {
    kwp_plugins_bundle::bundled()
        .find(|(n, _)| n == "ipvs")
        .expect("the bundle has the ipvs mode")
        .1
        .to_vec()
}

/// /proc/net/ip_vs with addresses and ports in decimal:
/// `TCP 10.96.0.10:80 rr` (flags follow), `  -> 10.244.1.11:8080 Masq 1`.
pub fn render(proc_text: &str) -> String {
    let mut out = String::new();
    for line in proc_text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [proto @ ("TCP" | "UDP" | "SCTP"), addr, rest @ ..] => {
                out += &format!("{proto} {} {}\n", decode(addr), rest.join(" "));
            }
            ["->", addr, fwd, weight, ..] if *addr != "RemoteAddress:Port" => {
                out += &format!("  -> {} {fwd} {weight}\n", decode(addr));
            }
            _ => {}
        }
    }
    out
}

/// `0A60000A:0050` -> `10.96.0.10:80`; `[fd00:...:0010]:01BB` -> `[fd00::10]:443`.
fn decode(addr: &str) -> String {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return addr.to_string();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: std::net::Ipv6Addr = v6.parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED);
        return format!("[{ip}]:{port}");
    }
    let ip = u32::from_str_radix(host, 16).unwrap_or(0);
    format!("{}:{port}", std::net::Ipv4Addr::from(ip))
}

#[test]
fn proc_net_ip_vs_is_rendered_in_decimal() {
    let text = "IP Virtual Server version 1.2.1 (size=4096)\n\
        Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
        TCP  0A60000A:0050 wrr persistent 10800\n  -> 0AF4010B:1F90      Masq    3      0          0\n\
        TCP  [fd00:0000:0000:0000:0000:0000:0000:0010]:01BB mh\n";
    assert_eq!(
        render(text),
        "TCP 10.96.0.10:80 wrr persistent 10800\n  -> 10.244.1.11:8080 Masq 3\nTCP [fd00::10]:443 mh\n"
    );
}
