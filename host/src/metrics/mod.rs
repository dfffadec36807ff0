//! kube-proxy's health and metrics endpoints, with upstream's names and
//! semantics where they apply, plus kwp's own plugin counters.
//!
//! - healthz address (default 0.0.0.0:10256): `/healthz` and `/livez`.
//!   Unhealthy (503) when a queued change has not been programmed within
//!   2 x syncPeriod; `/healthz` is also 503 while the Node is being deleted.
//! - metrics address (default 127.0.0.1:10249): `/metrics` (Prometheus
//!   text), `/proxyMode`, `/configz`.
//!
//! `exposition` encodes `/metrics` with prometheus-client; `http` serves
//! these and the health-check node ports on hyper, and keeps every server
//! up through failed binds, failed accepts and misbehaving clients.

mod exposition;
pub(crate) mod http;
mod iptables;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use hyper::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use exposition::Histogram;
pub use iptables::IptablesMetrics;

use crate::plugin::{PluginStats, Runtime};

/// Health checks counted by HTTP status: `code="200"`.
type ByStatus = Family<[(&'static str, String); 1], Counter>;

/// Everything the servers report; the sync loop writes it.
pub struct Metrics {
    pub mode: String,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    last_sync: Mutex<Option<SystemTime>>,
    last_queued: Mutex<Option<SystemTime>>,
    /// The oldest change queued and not yet programmed.
    oldest_unsynced: Mutex<Option<SystemTime>>,
    pub service_changes: (AtomicU64, AtomicU64),
    pub endpoint_changes: (AtomicU64, AtomicU64),
    /// traffic_policy internal / external
    pub no_local_endpoints: (AtomicU64, AtomicU64),
    pub sync_errors: AtomicU64,
    /// Syncs run early to retry something that failed.
    pub sync_retries: AtomicU64,
    /// Service ports whose rules could not be rendered or applied (each
    /// named in the log; their last good rules stay).
    pub service_errors: AtomicU64,
    /// Frontends asked for by a Service while an older one owns them.
    pub frontend_conflicts: AtomicU64,
    /// Source errors (API watch failures, files the file source refused).
    pub source_errors: Arc<AtomicU64>,
    /// Files the file source has read (its idle scans read none).
    pub source_files_read: Arc<AtomicU64>,
    pub node_deleting: AtomicBool,
    health_timeout: Duration,
    healthz: ByStatus,
    livez: ByStatus,
    pub runtime: Option<Arc<Runtime>>,
    pub plugins: Mutex<BTreeMap<String, Arc<PluginStats>>>,
    pub configz: String,
    /// iptables mode's own series (its dataplane writes them).
    pub iptables: Option<Arc<IptablesMetrics>>,
    /// The proxier's per-Service record, served at `/inspect`.
    pub inspect: crate::inspect::Registry,
}

impl Metrics {
    pub fn new(mode: &str, sync_period: Duration, configz: String) -> Self {
        Self {
            mode: mode.into(),
            sync_duration: Histogram::exponential(0.001, 2.0, 15),
            network_programming: Histogram::exponential(0.001, 2.0, 20),
            last_sync: Mutex::default(),
            last_queued: Mutex::default(),
            oldest_unsynced: Mutex::default(),
            service_changes: Default::default(),
            endpoint_changes: Default::default(),
            no_local_endpoints: Default::default(),
            sync_errors: AtomicU64::new(0),
            sync_retries: AtomicU64::new(0),
            service_errors: AtomicU64::new(0),
            frontend_conflicts: AtomicU64::new(0),
            source_errors: Arc::default(),
            source_files_read: Arc::default(),
            node_deleting: AtomicBool::new(false),
            health_timeout: sync_period * 2,
            healthz: ByStatus::default(),
            livez: ByStatus::default(),
            runtime: None,
            plugins: Mutex::default(),
            configz,
            iptables: None,
            inspect: crate::inspect::Registry::default(),
        }
    }

    /// A change arrived from the source.
    pub fn queued(&self) {
        let now = SystemTime::now();
        *lock(&self.last_queued) = Some(now);
        lock(&self.oldest_unsynced).get_or_insert(now);
    }

    /// A sync completed (successfully or not).
    pub fn synced(&self, took: Duration, ok: bool) {
        self.sync_duration.observe(took);
        *lock(&self.last_sync) = Some(SystemTime::now());
        if ok {
            *lock(&self.oldest_unsynced) = None;
        } else {
            self.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Healthy unless a change has waited longer than 2 x syncPeriod.
    pub fn healthy(&self) -> bool {
        match *lock(&self.oldest_unsynced) {
            Some(t) => {
                SystemTime::now().duration_since(t).unwrap_or_default() <= self.health_timeout
            }
            None => true,
        }
    }

    fn health_body(&self, node_eligible: Option<bool>) -> String {
        let last = lock(&self.last_sync).map(rfc3339).unwrap_or_default();
        let mut body = format!(
            "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\"",
            rfc3339(SystemTime::now())
        );
        if let Some(eligible) = node_eligible {
            let _ = write!(body, ",\"nodeEligible\": {eligible}");
        }
        body.push('}');
        body
    }

    /// The response for one request path: status, content type, body.
    fn respond(
        self: &Arc<Self>,
        path: &str,
        healthz_server: bool,
    ) -> (StatusCode, &'static str, String) {
        let count = |by_status: &ByStatus, code: StatusCode| {
            by_status
                .get_or_create(&[("code", code.as_u16().to_string())])
                .inc();
        };
        let status = |healthy: bool| {
            if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        match (healthz_server, path) {
            (true, "/healthz") => {
                let eligible = !self.node_deleting.load(Ordering::Relaxed);
                let code = status(self.healthy() && eligible);
                count(&self.healthz, code);
                (code, "application/json", self.health_body(Some(eligible)))
            }
            (true, "/livez") => {
                let code = status(self.healthy());
                count(&self.livez, code);
                (code, "application/json", self.health_body(None))
            }
            (false, "/metrics") => (StatusCode::OK, exposition::CONTENT_TYPE, self.render()),
            (false, "/proxyMode") => (StatusCode::OK, "text/plain", self.mode.clone()),
            (false, "/configz") => (StatusCode::OK, "application/json", self.configz.clone()),
            (false, "/inspect") => (StatusCode::OK, "application/json", self.inspect.json()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "404 page not found\n".into(),
            ),
        }
    }
}

/// Serves `metrics` on `addr` (`/healthz` and `/livez`, or `/metrics`,
/// `/proxyMode` and `/configz`) until the task is dropped. It does not
/// return: a bind that fails is retried, a failed accept is logged.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    healthz_server: bool,
) -> anyhow::Result<()> {
    let what = if healthz_server { "healthz" } else { "metrics" };
    let handler: http::Handler = Arc::new(move |request| {
        let (status, content_type, body) = metrics.respond(request.uri().path(), healthz_server);
        http::reply(status, content_type, body)
    });
    http::serve(addr, what.into(), handler).await;
    Ok(())
}

/// The data behind a lock, even if a thread panicked while holding it:
/// counters and timestamps stay meaningful, and a scrape must not panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// RFC 3339 in UTC, as Go's time.Time marshals.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723)),
            "2000-02-29T01:02:03Z"
        );
    }

    #[test]
    fn health_follows_queued_changes() {
        let m = Arc::new(Metrics::new(
            "nftables",
            Duration::from_millis(10),
            "{}".into(),
        ));
        assert!(m.healthy(), "nothing queued");
        m.queued();
        assert!(m.healthy(), "queued just now");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!m.healthy(), "queued for longer than 2 x syncPeriod");
        assert_eq!(m.respond("/healthz", true).0, 503);
        m.synced(Duration::from_millis(3), true);
        assert!(m.healthy());
        assert_eq!(m.respond("/livez", true).0, 200);
        m.node_deleting.store(true, Ordering::Relaxed);
        assert_eq!(
            m.respond("/healthz", true).0,
            503,
            "the Node is being deleted"
        );
        assert_eq!(m.respond("/livez", true).0, 200, "livez ignores the Node");
        let text = m.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 2",
            "kubeproxy_proxy_livez_total{code=\"200\"} 2",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(
            m.respond("/proxyMode", false),
            (StatusCode::OK, "text/plain", "nftables".into())
        );
        assert_eq!(m.respond("/nope", false).0, 404);
    }
}
