//! Health-check node ports (externalTrafficPolicy Local): one HTTP server
//! per Service's `healthCheckNodePort`, answering as upstream kube-proxy
//! does, so cloud load balancers send traffic only to nodes with local
//! endpoints: 200 with `localEndpoints > 0`, else 503, and the count in
//! `X-Load-Balancing-Endpoint-Weight` for weighted load balancing.
//!
//! A port that cannot be bound (still held, fds exhausted) is retried
//! every 5 s, and a server never stops on a failed accept (see
//! `metrics::http`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use hyper::header::HeaderValue;
use tokio::task::JoinHandle;

use crate::metrics::http;
use crate::metrics::lock;

use crate::model::ObjectKey as ServiceName;

/// Service -> local endpoint count, shared with the servers.
type Counts = Arc<Mutex<BTreeMap<ServiceName, usize>>>;

#[derive(Default)]
pub struct HealthServers {
    counts: Counts,
    /// port -> (service, server task)
    servers: BTreeMap<u16, (ServiceName, JoinHandle<()>)>,
}

impl HealthServers {
    /// Sets the wanted servers: service -> (port, local endpoints).
    /// Servers for ports no longer wanted are stopped.
    pub fn sync(&mut self, wanted: &BTreeMap<ServiceName, (u16, usize)>) {
        *lock(&self.counts) = wanted.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
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
            let what = format!("health check of {svc}");
            let (name, counts) = (svc.clone(), self.counts.clone());
            let handler: http::Handler = Arc::new(move |_| answer(&name, &counts));
            let task = tokio::spawn(http::serve(addr, what, handler));
            self.servers.insert(*port, (svc.clone(), task));
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        self.servers.values().for_each(|(_, t)| t.abort());
    }
}

/// Upstream's answer, whatever the path: the Service and its local
/// endpoint count.
fn answer(svc: &ServiceName, counts: &Counts) -> hyper::Response<http::Body> {
    let local_endpoints = lock(counts).get(svc).copied().unwrap_or(0);
    let body = Answer {
        service: Service {
            namespace: &svc.namespace,
            name: &svc.name,
        },
        local_endpoints,
        service_proxy_healthy: true,
    };
    let status = if local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&body).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode a health-check answer");
        String::new()
    });
    let mut response = http::reply(status, "application/json", body);
    response.headers_mut().insert(
        "x-load-balancing-endpoint-weight",
        HeaderValue::from(local_endpoints),
    );
    response
}

/// The JSON body, fields in upstream's order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    service: Service<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct Service<'a> {
    namespace: &'a str,
    name: &'a str,
}
