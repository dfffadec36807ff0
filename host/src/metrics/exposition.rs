//! `/metrics` in the Prometheus text format 0.0.4, as upstream kube-proxy
//! serves it, encoded by prometheus-client (which escapes label values and
//! help text, and formats `le` bounds as Go does).
//!
//! Counters are named without `_total`: the encoder appends it, so the
//! exposed names are upstream's. Help texts go through
//! `encode_descriptor` as they are (a registered metric would get a full
//! stop appended).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{Metrics, lock};
use crate::plugin::PluginStats;

/// The `Content-Type` of the Prometheus text format 0.0.4, as upstream.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A histogram of durations, in seconds.
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    /// `n` buckets from `start` seconds, each `factor` times the previous
    /// (upstream's sync durations: 1 ms doubling).
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        Self(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(start, factor, n),
        ))
    }

    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }

    pub(super) fn inner(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.0
    }
}

impl Metrics {
    /// The text Prometheus scrapes.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            // Only the writer can fail, and a String does not.
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

/// One scrape: every series is read from `Metrics` as it is encoded.
struct Scrape(Arc<Metrics>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

type PluginCounter = fn(&PluginStats) -> &AtomicU64;

/// kwp's per-plugin counters, each labelled `plugin="name[config]"`.
const PLUGIN_COUNTERS: [(&str, &str, PluginCounter); 5] = [
    ("kwp_plugin_calls", "Calls into the plugin", |s| &s.calls),
    (
        "kwp_plugin_traps",
        "Calls that trapped (the instance was discarded)",
        |s| &s.traps,
    ),
    (
        "kwp_plugin_deadline_hits",
        "Calls stopped by the deadline",
        |s| &s.deadline_hits,
    ),
    (
        "kwp_plugin_memory_hits",
        "Calls stopped by the memory cap",
        |s| &s.memory_hits,
    ),
    ("kwp_plugin_instantiations", "Instances created", |s| {
        &s.instantiations
    }),
];

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &*self.0;
        let e = &mut encoder;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counter = |a: &AtomicU64| ConstCounter::new(load(a));
        let gauge = |a: &AtomicU64| ConstGauge::new(load(a));
        let timestamp = |t: &std::sync::Mutex<Option<SystemTime>>| {
            ConstGauge::new(lock(t).map_or(0.0, |t| {
                t.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            }))
        };

        // Upstream kube-proxy's series.
        put(
            e,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &m.sync_duration.0,
        )?;
        put(
            e,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &m.network_programming.0,
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            &timestamp(&m.last_sync),
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            &timestamp(&m.last_queued),
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            &counter(&m.service_changes.0),
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            &gauge(&m.service_changes.1),
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            &counter(&m.endpoint_changes.0),
        )?;
        put(
            e,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            &gauge(&m.endpoint_changes.1),
        )?;
        // A gauge whose name ends in `_total`, as upstream names it.
        put_family(
            e,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            [
                ("internal", gauge(&m.no_local_endpoints.0)),
                ("external", gauge(&m.no_local_endpoints.1)),
            ]
            .map(|(policy, value)| ([("traffic_policy", policy)], value)),
        )?;
        put(
            e,
            "kubeproxy_proxy_healthz",
            "Cumulative proxy health checks by HTTP status",
            &m.healthz,
        )?;
        put(
            e,
            "kubeproxy_proxy_livez",
            "Cumulative proxy health checks by HTTP status",
            &m.livez,
        )?;

        if let Some(iptables) = &m.iptables {
            iptables.encode(e)?;
        }

        // kwp's own.
        put(
            e,
            "kwp_sync_proxy_rules_errors",
            "Syncs that failed to apply (the node-wide rules or the whole transaction)",
            &counter(&m.sync_errors),
        )?;
        put(
            e,
            "kwp_sync_proxy_rules_retries",
            "Syncs run early to retry what failed",
            &counter(&m.sync_retries),
        )?;
        put(
            e,
            "kwp_sync_service_errors",
            "Service ports whose rules could not be rendered or applied (their last good rules stay)",
            &counter(&m.service_errors),
        )?;
        put(
            e,
            "kwp_frontend_conflicts",
            "Frontends (IP:port or node port) a Service asks for while an older Service owns them",
            &gauge(&m.frontend_conflicts),
        )?;
        put(
            e,
            "kwp_source_errors",
            "Errors reading cluster state (API watch failures, unreadable source files and directories)",
            &counter(&m.source_errors),
        )?;
        put(
            e,
            "kwp_source_files_read",
            "Files the file source has read (a file is read when it changed and settled)",
            &counter(&m.source_files_read),
        )?;
        if let Some(runtime) = &m.runtime {
            let reloads = &runtime.reloads;
            put(
                e,
                "kwp_plugin_reloads",
                "Plugin versions swapped in",
                &counter(&reloads.reloads),
            )?;
            put(
                e,
                "kwp_plugin_reload_rejections",
                "Plugin versions refused at reload",
                &counter(&reloads.rejections),
            )?;
            put(
                e,
                "kwp_plugin_rollbacks",
                "Reloaded plugin versions rolled back",
                &counter(&reloads.rollbacks),
            )?;
        }
        let plugins = lock(&m.plugins);
        for (name, help, value) in PLUGIN_COUNTERS {
            put_family(
                e,
                name,
                help,
                plugins
                    .iter()
                    .map(|(plugin, stats)| ([("plugin", plugin.as_str())], counter(value(stats)))),
            )?;
        }
        Ok(())
    }
}

/// One metric family with its help text.
pub(super) fn put(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One metric family whose series are told apart by labels.
pub(super) fn put_family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(
            "userspace",
            Duration::from_secs(30),
            "{}".into(),
        ))
    }

    /// A weighted policy's config is part of its plugin label, and may hold
    /// any character: `\`, `"` and newlines must be escaped, or one label
    /// breaks the whole scrape.
    #[test]
    fn label_values_are_escaped() {
        let m = metrics();
        let plugin = "weighted[{\"w\": \"a\\b\"\n}]";
        let stats = Arc::new(PluginStats::default());
        stats.calls.store(7, Ordering::Relaxed);
        lock(&m.plugins).insert(plugin.into(), stats);
        let text = m.render();
        assert!(
            text.contains(r#"kwp_plugin_calls_total{plugin="weighted[{\"w\": \"a\\b\"\n}]"} 7"#),
            "{text}"
        );
        let names = type_lines(&text)
            .map(|line| line.split(' ').nth(2).unwrap_or_default().to_string())
            .collect::<Vec<_>>();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                names.iter().any(|name| line.starts_with(name.as_str())),
                "a sample line of no metric: {line:?} in\n{text}"
            );
        }
    }

    fn type_lines(text: &str) -> impl Iterator<Item = &str> {
        text.lines().filter(|l| l.starts_with("# TYPE "))
    }

    /// The names, types and help texts served before prometheus-client, so
    /// dashboards and alerts keep working.
    #[test]
    fn names_types_and_help_are_unchanged() {
        let m = metrics();
        m.synced(Duration::from_millis(3), true);
        let text = m.render();
        let expected = [
            (
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "histogram",
                "SyncProxyRules latency in seconds",
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
                "In Cluster Network Programming Latency in seconds",
            ),
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "gauge",
                "The last time proxy rules were successfully synced",
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
                "The last time a sync of proxy rules was queued",
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
                "Cumulative proxy rules Service changes",
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "gauge",
                "Pending proxy rules Service changes",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
                "Cumulative proxy rules Endpoint changes",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "gauge",
                "Pending proxy rules Endpoint changes",
            ),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
                "Number of services with a Local traffic policy and no endpoints",
            ),
            (
                "kubeproxy_proxy_healthz_total",
                "counter",
                "Cumulative proxy health checks by HTTP status",
            ),
            (
                "kubeproxy_proxy_livez_total",
                "counter",
                "Cumulative proxy health checks by HTTP status",
            ),
            (
                "kwp_sync_proxy_rules_errors_total",
                "counter",
                "Syncs that failed to apply (the node-wide rules or the whole transaction)",
            ),
            (
                "kwp_sync_proxy_rules_retries_total",
                "counter",
                "Syncs run early to retry what failed",
            ),
            (
                "kwp_sync_service_errors_total",
                "counter",
                "Service ports whose rules could not be rendered or applied (their last good rules stay)",
            ),
            (
                "kwp_frontend_conflicts",
                "gauge",
                "Frontends (IP:port or node port) a Service asks for while an older Service owns them",
            ),
            (
                "kwp_source_errors_total",
                "counter",
                "Errors reading cluster state (API watch failures, unreadable source files and directories)",
            ),
            (
                "kwp_source_files_read_total",
                "counter",
                "Files the file source has read (a file is read when it changed and settled)",
            ),
            ("kwp_plugin_calls_total", "counter", "Calls into the plugin"),
            (
                "kwp_plugin_traps_total",
                "counter",
                "Calls that trapped (the instance was discarded)",
            ),
            (
                "kwp_plugin_deadline_hits_total",
                "counter",
                "Calls stopped by the deadline",
            ),
            (
                "kwp_plugin_memory_hits_total",
                "counter",
                "Calls stopped by the memory cap",
            ),
            (
                "kwp_plugin_instantiations_total",
                "counter",
                "Instances created",
            ),
        ];
        let described: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with('#'))
            .map(String::from)
            .collect();
        let wanted: Vec<String> = expected
            .iter()
            .flat_map(|(name, kind, help)| {
                [
                    format!("# HELP {name} {help}"),
                    format!("# TYPE {name} {kind}"),
                ]
            })
            .collect();
        assert_eq!(described, wanted, "{text}");
        for sample in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_sum 0.003",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "missing {sample} in\n{text}"
            );
        }
    }
}
