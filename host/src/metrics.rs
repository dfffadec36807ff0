//! kube-proxy's health and metrics endpoints, with upstream's names and
//! semantics where they apply, plus kwp's own plugin counters.
//!
//! - healthz address (default 0.0.0.0:10256): `/healthz` and `/livez`.
//!   Unhealthy (503) when a queued change has not been programmed within
//!   2 x syncPeriod; `/healthz` is also 503 while the Node is being deleted.
//! - metrics address (default 127.0.0.1:10249): `/metrics` (Prometheus
//!   text), `/proxyMode`, `/configz`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::plugin::{PluginStats, Runtime};

/// A Prometheus histogram with fixed buckets.
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Upstream's sync-duration buckets: 1 ms doubling, 15 of them.
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        let bounds: Vec<f64> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            bounds,
            counts,
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

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
    /// Source errors (API watch failures).
    pub source_errors: Arc<AtomicU64>,
    pub node_deleting: AtomicBool,
    health_timeout: Duration,
    healthz: Mutex<BTreeMap<u16, u64>>,
    livez: Mutex<BTreeMap<u16, u64>>,
    pub runtime: Option<Arc<Runtime>>,
    pub plugins: Mutex<BTreeMap<String, Arc<PluginStats>>>,
    pub configz: String,
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
            node_deleting: AtomicBool::new(false),
            health_timeout: sync_period * 2,
            healthz: Mutex::default(),
            livez: Mutex::default(),
            runtime: None,
            plugins: Mutex::default(),
            configz,
        }
    }

    /// A change arrived from the source.
    pub fn queued(&self) {
        let now = SystemTime::now();
        *self.last_queued.lock().expect("metrics lock") = Some(now);
        self.oldest_unsynced
            .lock()
            .expect("metrics lock")
            .get_or_insert(now);
    }

    /// A sync completed (successfully or not).
    pub fn synced(&self, took: Duration, ok: bool) {
        self.sync_duration.observe(took);
        *self.last_sync.lock().expect("metrics lock") = Some(SystemTime::now());
        if ok {
            *self.oldest_unsynced.lock().expect("metrics lock") = None;
        } else {
            self.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Healthy unless a change has waited longer than 2 x syncPeriod.
    pub fn healthy(&self) -> bool {
        match *self.oldest_unsynced.lock().expect("metrics lock") {
            Some(t) => {
                SystemTime::now().duration_since(t).unwrap_or_default() <= self.health_timeout
            }
            None => true,
        }
    }

    fn health_body(&self, node_eligible: Option<bool>) -> String {
        let last = self
            .last_sync
            .lock()
            .expect("metrics lock")
            .map(rfc3339)
            .unwrap_or_default();
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

    pub fn render(&self) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        self.sync_duration.render(
            &mut o,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        );
        self.network_programming.render(
            &mut o,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        let ts = |t: &Mutex<Option<SystemTime>>| {
            t.lock().expect("metrics lock").map_or(0.0, |t| {
                t.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            })
        };
        gauge(
            &mut o,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            ts(&self.last_sync),
        );
        gauge(
            &mut o,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            ts(&self.last_queued),
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut o,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            load(&self.service_changes.0),
        );
        gauge(
            &mut o,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            load(&self.service_changes.1) as f64,
        );
        counter(
            &mut o,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            load(&self.endpoint_changes.0),
        );
        gauge(
            &mut o,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            load(&self.endpoint_changes.1) as f64,
        );
        let _ = writeln!(
            o,
            "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total Number of services with a Local traffic policy and no endpoints\n# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge\n\
             kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"internal\"}} {}\nkubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"external\"}} {}",
            load(&self.no_local_endpoints.0),
            load(&self.no_local_endpoints.1)
        );
        for (name, codes) in [
            ("kubeproxy_proxy_healthz_total", &self.healthz),
            ("kubeproxy_proxy_livez_total", &self.livez),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} Cumulative proxy health checks by HTTP status\n# TYPE {name} counter"
            );
            for (code, n) in codes.lock().expect("metrics lock").iter() {
                let _ = writeln!(o, "{name}{{code=\"{code}\"}} {n}");
            }
        }
        counter(
            &mut o,
            "kwp_sync_proxy_rules_errors_total",
            "Syncs that failed to apply (the node-wide rules or the whole transaction)",
            load(&self.sync_errors),
        );
        counter(
            &mut o,
            "kwp_sync_proxy_rules_retries_total",
            "Syncs run early to retry what failed",
            load(&self.sync_retries),
        );
        counter(
            &mut o,
            "kwp_sync_service_errors_total",
            "Service ports whose rules could not be rendered or applied (their last good rules stay)",
            load(&self.service_errors),
        );
        gauge(
            &mut o,
            "kwp_frontend_conflicts",
            "Frontends (IP:port or node port) a Service asks for while an older Service owns them",
            load(&self.frontend_conflicts) as f64,
        );
        counter(
            &mut o,
            "kwp_source_errors_total",
            "Errors reading cluster state (API watch failures)",
            load(&self.source_errors),
        );
        if let Some(rt) = &self.runtime {
            counter(
                &mut o,
                "kwp_plugin_reloads_total",
                "Plugin versions swapped in",
                load(&rt.reloads.reloads),
            );
            counter(
                &mut o,
                "kwp_plugin_reload_rejections_total",
                "Plugin versions refused at reload",
                load(&rt.reloads.rejections),
            );
            counter(
                &mut o,
                "kwp_plugin_rollbacks_total",
                "Reloaded plugin versions rolled back",
                load(&rt.reloads.rollbacks),
            );
        }
        let plugins = self.plugins.lock().expect("metrics lock");
        for (metric, help, get) in [
            (
                "kwp_plugin_calls_total",
                "Calls into the plugin",
                (|s: &PluginStats| &s.calls) as fn(&PluginStats) -> &AtomicU64,
            ),
            (
                "kwp_plugin_traps_total",
                "Calls that trapped (the instance was discarded)",
                |s| &s.traps,
            ),
            (
                "kwp_plugin_deadline_hits_total",
                "Calls stopped by the deadline",
                |s| &s.deadline_hits,
            ),
            (
                "kwp_plugin_memory_hits_total",
                "Calls stopped by the memory cap",
                |s| &s.memory_hits,
            ),
            (
                "kwp_plugin_instantiations_total",
                "Instances created",
                |s| &s.instantiations,
            ),
        ] {
            let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (name, stats) in plugins.iter() {
                let _ = writeln!(o, "{metric}{{plugin=\"{name}\"}} {}", load(get(stats)));
            }
        }
        o
    }

    /// The response for one request path.
    fn respond(&self, path: &str, healthz_server: bool) -> (u16, &'static str, String) {
        let count = |m: &Mutex<BTreeMap<u16, u64>>, code: u16| {
            *m.lock().expect("metrics lock").entry(code).or_default() += 1
        };
        match (healthz_server, path) {
            (true, "/healthz") => {
                let eligible = !self.node_deleting.load(Ordering::Relaxed);
                let code = if self.healthy() && eligible { 200 } else { 503 };
                count(&self.healthz, code);
                (code, "application/json", self.health_body(Some(eligible)))
            }
            (true, "/livez") => {
                let code = if self.healthy() { 200 } else { 503 };
                count(&self.livez, code);
                (code, "application/json", self.health_body(None))
            }
            (false, "/metrics") => (200, "text/plain; version=0.0.4", self.render()),
            (false, "/proxyMode") => (200, "text/plain", self.mode.clone()),
            (false, "/configz") => (200, "application/json", self.configz.clone()),
            _ => (404, "text/plain", "404 page not found\n".into()),
        }
    }
}

/// Serves `metrics` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    healthz_server: bool,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!(%addr, what = if healthz_server { "healthz" } else { "metrics" }, "serving");
    loop {
        let (mut conn, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await
            else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .split('?')
                .next()
                .unwrap_or("/")
                .to_string();
            let (code, ctype, body) = metrics.respond(&path, healthz_server);
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// RFC 3339 in UTC, as Go's time.Time marshals.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// `endpoints.kubernetes.io/last-change-trigger-time`, as a time.
pub fn parse_trigger_time(value: &str) -> Option<SystemTime> {
    value.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            parse_trigger_time("2026-01-01T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
        );
    }

    #[test]
    fn health_follows_queued_changes() {
        let m = Metrics::new("nftables", Duration::from_millis(10), "{}".into());
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
            (200, "text/plain", "nftables".into())
        );
        assert_eq!(m.respond("/nope", false).0, 404);
    }
}
