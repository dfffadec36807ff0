//! `kube-wasm-proxy demo`: the embedded example cluster. Starts a few
//! backends on loopback, writes Services and EndpointSlices pointing at them
//! into a directory, and proxies them in userspace mode, so a newcomer sees
//! traffic flow without a cluster or root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::app::App;
use crate::config::{Flags, ProxyMode};

/// One example Service: name, protocol, cluster IP, port, backend count,
/// extra metadata (annotations, affinity).
struct Example {
    name: &'static str,
    udp: bool,
    cluster_ip: &'static str,
    port: u16,
    backends: usize,
    annotations: &'static str,
    spec_extra: &'static str,
}

const EXAMPLES: &[Example] = &[
    Example {
        name: "web",
        udp: false,
        cluster_ip: "10.96.0.10",
        port: 80,
        backends: 3,
        annotations: "",
        spec_extra: "",
    },
    Example {
        name: "api",
        udp: false,
        cluster_ip: "10.96.0.11",
        port: 8080,
        backends: 2,
        annotations: "    kube-wasm-proxy.io/lb-policy: random\n",
        spec_extra: "",
    },
    Example {
        name: "sticky",
        udp: false,
        cluster_ip: "10.96.0.12",
        port: 80,
        backends: 2,
        annotations: "",
        spec_extra: "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n",
    },
    Example {
        name: "echo",
        udp: true,
        cluster_ip: "10.96.0.53",
        port: 53,
        backends: 2,
        annotations: "",
        spec_extra: "",
    },
];

pub async fn run(mut flags: Flags, dir: Option<PathBuf>, run_for: Option<Duration>) -> Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new()
                .prefix("kwp-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for ex in EXAMPLES {
        let mut addrs = Vec::new();
        for i in 1..=ex.backends {
            let who = format!("{}-{i}", ex.name);
            addrs.push(if ex.udp {
                start_udp_backend(who).await?
            } else {
                start_http_backend(who).await?
            });
        }
        let path = dir.join(format!("{}.yaml", ex.name));
        std::fs::write(&path, objects(ex, &addrs))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    flags.source = Some(format!("file:{}", dir.display()));
    flags.proxy_mode = Some(ProxyMode::Userspace);
    // The demo never touches the machine's nftables, even as root.
    flags.no_redirect = true;
    // The demo's objects name no node; a fixed valid Node name keeps it
    // independent of the machine's hostname (which may not be one).
    flags
        .hostname_override
        .get_or_insert_with(|| "kwp-demo".into());
    flags.healthz_bind_address.get_or_insert_with(String::new);
    flags.metrics_bind_address.get_or_insert_with(String::new);
    let app = App::build(&flags)?;
    let mapping = app
        .mapping
        .clone()
        .context("the demo needs the userspace dataplane (drop --dry-run)")?;
    let running = tokio::spawn(app.run());

    // Wait for the first sync to open every listener, then say how to reach them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mapping.read().expect("mapping lock").len() < EXAMPLES.len()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "kube-wasm-proxy demo: example cluster in {} (edit the files; changes apply live)\n",
        dir.display()
    );
    for (name, (listener, local)) in mapping.read().expect("mapping lock").iter() {
        let how = if listener.protocol == crate::model::Protocol::Udp {
            format!("echo hello | nc -u -w1 {} {}", local.ip(), local.port())
        } else {
            format!("curl http://{local}/")
        };
        let front = listener
            .frontends
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        println!("  {name:<28} {front:<18} ->  {how}");
    }
    println!("\nPress Ctrl-C to stop.");
    let stop = async {
        match run_for {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                crate::app::shutdown_signal().await;
            }
        }
    };
    tokio::select! {
        r = running => r.context("proxy task")??,
        _ = stop => {}
    }
    Ok(())
}

/// The Service and EndpointSlice of one example, as `kubectl get -o yaml` would show them.
fn objects(ex: &Example, backends: &[SocketAddr]) -> String {
    let proto = if ex.udp { "UDP" } else { "TCP" };
    let port_name = if ex.udp { "dns" } else { "http" };
    let backend_port = backends.first().map_or(0, |a| a.port());
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n{extra}  ports:\n  - name: {port_name}\n    protocol: {proto}\n    port: {port}\n    targetPort: {backend_port}\n",
        name = ex.name,
        ann = if ex.annotations.is_empty() {
            String::new()
        } else {
            format!("  annotations:\n{}", ex.annotations)
        },
        ip = ex.cluster_ip,
        extra = ex.spec_extra,
        port = ex.port,
    );
    // Loopback backends share an IP, so each gets its own slice with its own port.
    for (i, addr) in backends.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: {port_name}\n  protocol: {proto}\n  port: {port}\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: demo-node\n",
            name = ex.name,
            port = addr.port(),
            ip = addr.ip(),
        ));
    }
    yaml
}

/// A tiny HTTP server answering every request with its name.
async fn start_http_backend(who: String) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a demo backend")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let who = who.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                // One response per connection: read the request head, answer, close.
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {who}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A UDP server echoing each datagram prefixed with its name.
async fn start_udp_backend(who: String) -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .context("binding a demo backend")?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let reply = [format!("{who}: ").as_bytes(), &buf[..n]].concat();
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    Ok(addr)
}
