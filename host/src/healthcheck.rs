//! Health-check node ports (externalTrafficPolicy Local): one HTTP server
//! per Service's `healthCheckNodePort`, answering as upstream kube-proxy
//! does, so cloud load balancers send traffic only to nodes with local
//! endpoints: 200 with `localEndpoints > 0`, else 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// `(namespace, name)` -> local endpoint count, shared with the servers.
type Counts = Arc<Mutex<BTreeMap<(String, String), usize>>>;

#[derive(Default)]
pub struct HealthServers {
    counts: Counts,
    /// port -> (service, server task)
    servers: BTreeMap<u16, ((String, String), JoinHandle<()>)>,
}

impl HealthServers {
    /// Sets the wanted servers: service -> (port, local endpoints).
    /// Servers for ports no longer wanted are stopped.
    pub fn sync(&mut self, wanted: &BTreeMap<(String, String), (u16, usize)>) {
        *self.counts.lock().expect("counts lock") =
            wanted.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
        self.servers.retain(|port, (svc, task)| {
            let keep = wanted.get(svc).is_some_and(|(p, _)| p == port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (svc, (port, _)) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from(([0, 0, 0, 0], *port));
            match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }) {
                Ok(listener) => {
                    let task = tokio::spawn(serve(listener, svc.clone(), self.counts.clone()));
                    self.servers.insert(*port, (svc.clone(), task));
                }
                Err(e) => {
                    tracing::error!(service = format!("{}/{}", svc.0, svc.1), port, error = %e, "cannot open the health-check node port")
                }
            }
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        self.servers.values().for_each(|(_, t)| t.abort());
    }
}

async fn serve(listener: TcpListener, svc: (String, String), counts: Counts) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let count = counts
            .lock()
            .expect("counts lock")
            .get(&svc)
            .copied()
            .unwrap_or(0);
        let body = format!(
            "{{\"service\":{{\"namespace\":{:?},\"name\":{:?}}},\"localEndpoints\":{count},\"serviceProxyHealthy\":true}}",
            svc.0, svc.1
        );
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
            let status = if count > 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {count}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
