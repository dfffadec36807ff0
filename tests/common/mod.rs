//! Shared pieces of the end-to-end tests: backends that say who they are,
//! YAML for Services and EndpointSlices, and a proxy running in-process on
//! a file source.

#![allow(dead_code)]

pub mod api_client;
pub mod apiserver;
pub mod daemonset;
pub mod fault_relay;
pub mod faulty_nft;
pub mod fixtures;
pub mod kube_node;
pub mod model;
pub mod netns;
pub mod node_proxy;
pub mod plugins;
pub mod poll;
pub mod resync;
pub mod scenarios;
pub mod slots;
pub mod topology;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use kwp::config::Cli;
use kwp::dataplane::userspace::Mapping;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP backend: reads until a newline or EOF, answers with its name, closes.
pub async fn tcp_backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if buf[..n].contains(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
                let _ = conn.write_all(name.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP backend: answers each datagram with its name.
pub async fn udp_backend(name: &str) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(name.as_bytes(), peer).await;
        }
    });
    addr
}

/// A Service with one port named `p`.
pub fn service(name: &str, ip: &str, proto: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: e2e\nspec:\n  clusterIP: {ip}\n{extra_spec}  ports:\n  - name: p\n    protocol: {proto}\n    port: 80\n"
    )
}

/// One EndpointSlice per backend (they share 127.0.0.1, so ports differ).
pub fn slices(service: &str, proto: &str, backends: &[SocketAddr]) -> String {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{i}\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: p, protocol: {proto}, port: {}}}]\nendpoints:\n- addresses: ['{}']\n",
                b.port(),
                b.ip()
            )
        })
        .collect()
}

/// Writes a file atomically (rename into place), as a careful tool would.
pub fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Starts the proxy in userspace mode on `dir`; returns its listener map.
pub async fn start_proxy(dir: &Path, extra: &[&str]) -> Mapping {
    start_proxy_with_runtime(dir, extra).await.0
}

/// Like `start_proxy`, also returning the plugin runtime (reload counters).
pub async fn start_proxy_with_runtime(
    dir: &Path,
    extra: &[&str],
) -> (Mapping, std::sync::Arc<kwp::plugin::Runtime>) {
    let source = format!("file:{}", dir.display());
    let mut args = vec![
        "kube-wasm-proxy",
        "--proxy-mode",
        "userspace",
        "--no-redirect",
        "--source",
        &source,
    ];
    // Defaults the caller may override: fast syncs, no health/metrics ports.
    let defaults = [
        ("--min-sync-period", "50ms"),
        ("--hostname-override", "e2e-node"),
        ("--healthz-bind-address", ""),
        ("--metrics-bind-address", ""),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let flags = Cli::parse_from(args).flags;
    let app = kwp::app::App::build(&flags).expect("proxy builds");
    let mapping = app.mapping.clone().expect("userspace mapping");
    let runtime = app.runtime();
    tokio::spawn(app.run());
    (mapping, runtime)
}

/// The local listener of `e2e/<service>:p`, waiting for it to appear.
pub async fn listener(mapping: &Mapping, service: &str) -> SocketAddr {
    let mut found = None;
    poll::eventually_async(
        &format!("a listener for {service}"),
        Duration::from_secs(10),
        async || {
            found = mapping
                .read()
                .unwrap()
                .iter()
                .find(|(n, _)| &*n.name == service)
                .map(|(_, (_, a))| *a);
            found.is_some()
        },
    )
    .await;
    found.expect("found")
}

/// One TCP request through `addr`: the name of the backend that answered,
/// or `None` if the connection was refused or reset without an answer.
pub async fn ask(addr: SocketAddr) -> Option<String> {
    let mut conn = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    conn.write_all(b"who\n").await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    (!out.is_empty()).then_some(out)
}

/// One UDP exchange through `addr` from a new client socket (a new flow).
pub async fn ask_udp(addr: SocketAddr) -> Option<String> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.send_to(b"who", addr).await.ok()?;
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Everything a child process writes to stderr, collected as it comes (and
/// stdout drained), so a chatty child never blocks on a full pipe.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<String>>);

impl Logs {
    pub fn capture(child: &mut std::process::Child) -> Self {
        use std::io::BufRead;
        let logs = Logs::default();
        if let Some(stderr) = child.stderr.take() {
            let sink = logs.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut l = sink.0.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        if let Some(mut stdout) = child.stdout.take() {
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        }
        logs
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}
