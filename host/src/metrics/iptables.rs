//! iptables mode's own series, named and labelled as upstream kube-proxy
//! v1.34 exports them from its iptables proxier (`ip_family` is `IPv4` or
//! `IPv6`), plus which backend kwp drives and how often the canary forced
//! a resync. The iptables dataplane writes them where each save and
//! restore happens.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::exposition::{put, put_family};
use super::{Histogram, lock};

/// Index 0 is IPv4, 1 IPv6.
type PerFamily<T> = [T; 2];

const FAMILIES: PerFamily<&str> = ["IPv4", "IPv6"];

/// (table, ipv6) -> rules
type RulesByTable = BTreeMap<(String, bool), u64>;

pub struct IptablesMetrics {
    /// `nft` or `legacy` (or `default`: plain `iptables-restore`).
    pub backend: String,
    /// Families the dataplane has worked on; only they get series.
    used: PerFamily<AtomicBool>,
    full_duration: PerFamily<Histogram>,
    partial_duration: PerFamily<Histogram>,
    /// (full, partial) syncs observed.
    syncs: PerFamily<(AtomicU64, AtomicU64)>,
    restore_failures: PerFamily<AtomicU64>,
    partial_restore_failures: PerFamily<AtomicU64>,
    /// Rules in our chains after the last successful sync.
    rules_total: Mutex<RulesByTable>,
    /// Rules written (`-A`) by the last successful sync.
    rules_last: Mutex<RulesByTable>,
    /// Full resyncs forced because a canary chain was flushed or deleted.
    pub canary_resyncs: AtomicU64,
}

/// Upstream's sync-duration buckets: 1 ms doubling, 15 of them.
fn sync_buckets() -> Histogram {
    Histogram::exponential(0.001, 2.0, 15)
}

impl IptablesMetrics {
    pub fn new(backend: &str) -> Self {
        Self {
            backend: backend.into(),
            used: Default::default(),
            full_duration: [sync_buckets(), sync_buckets()],
            partial_duration: [sync_buckets(), sync_buckets()],
            syncs: Default::default(),
            restore_failures: Default::default(),
            partial_restore_failures: Default::default(),
            rules_total: Mutex::default(),
            rules_last: Mutex::default(),
            canary_resyncs: AtomicU64::new(0),
        }
    }

    /// One sync's time in one family's tables, full or partial.
    pub fn observe_sync(&self, ipv6: bool, full: bool, took: Duration) {
        let i = usize::from(ipv6);
        self.used[i].store(true, Ordering::Relaxed);
        let (histogram, count) = if full {
            (&self.full_duration[i], &self.syncs[i].0)
        } else {
            (&self.partial_duration[i], &self.syncs[i].1)
        };
        histogram.observe(took);
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// A restore the kernel refused; `partial` when it was a delta.
    pub fn restore_failed(&self, ipv6: bool, partial: bool) {
        let i = usize::from(ipv6);
        self.used[i].store(true, Ordering::Relaxed);
        self.restore_failures[i].fetch_add(1, Ordering::Relaxed);
        if partial {
            self.partial_restore_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// After a successful sync: the rules in our chains per (table,
    /// ipv6), and how many of them this sync wrote.
    pub fn set_rules(&self, total: RulesByTable, last: RulesByTable) {
        *lock(&self.rules_total) = total;
        *lock(&self.rules_last) = last;
    }

    pub fn rules_total(&self, table: &str, ipv6: bool) -> u64 {
        rules_of(&lock(&self.rules_total), table, ipv6)
    }

    pub fn rules_last(&self, table: &str, ipv6: bool) -> u64 {
        rules_of(&lock(&self.rules_last), table, ipv6)
    }

    /// (full, partial) syncs observed for one family.
    pub fn sync_counts(&self, ipv6: bool) -> (u64, u64) {
        let (full, partial) = &self.syncs[usize::from(ipv6)];
        (
            full.load(Ordering::Relaxed),
            partial.load(Ordering::Relaxed),
        )
    }

    /// (restore failures, partial restore failures) of one family.
    pub fn failures(&self, ipv6: bool) -> (u64, u64) {
        let i = usize::from(ipv6);
        (
            self.restore_failures[i].load(Ordering::Relaxed),
            self.partial_restore_failures[i].load(Ordering::Relaxed),
        )
    }

    pub(super) fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let families: Vec<usize> = (0..2)
            .filter(|i| self.used[*i].load(Ordering::Relaxed))
            .collect();
        let label = |i: usize| [("ip_family", FAMILIES[i])];
        let counter = |a: &AtomicU64| ConstCounter::new(a.load(Ordering::Relaxed));
        put_family(
            e,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            families
                .iter()
                .map(|i| (label(*i), self.full_duration[*i].inner().clone())),
        )?;
        put_family(
            e,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            families
                .iter()
                .map(|i| (label(*i), self.partial_duration[*i].inner().clone())),
        )?;
        put_family(
            e,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            families
                .iter()
                .map(|i| (label(*i), counter(&self.restore_failures[*i]))),
        )?;
        put_family(
            e,
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            families
                .iter()
                .map(|i| (label(*i), counter(&self.partial_restore_failures[*i]))),
        )?;
        // Gauges whose names end in `_total`, as upstream names them.
        for (name, help, rules) in [
            (
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                &self.rules_total,
            ),
            (
                "kubeproxy_sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
                &self.rules_last,
            ),
        ] {
            let rules = lock(rules);
            put_family(
                e,
                name,
                help,
                rules.iter().map(|((table, ipv6), n)| {
                    (
                        [
                            ("table", table.as_str()),
                            ("ip_family", FAMILIES[usize::from(*ipv6)]),
                        ],
                        ConstGauge::new(*n as i64),
                    )
                }),
            )?;
        }
        put(
            e,
            "kwp_iptables_backend_info",
            "The iptables backend kwp programs (nft or legacy), chosen as upstream's iptables wrapper chooses",
            &ConstGaugeWithLabel(&self.backend),
        )?;
        put(
            e,
            "kwp_iptables_canary_resyncs",
            "Full resyncs forced at once because a canary chain was flushed or deleted behind the proxy's back",
            &counter(&self.canary_resyncs),
        )
    }
}

fn rules_of(rules: &RulesByTable, table: &str, ipv6: bool) -> u64 {
    rules.get(&(table.to_string(), ipv6)).copied().unwrap_or(0)
}

/// An info gauge: value 1, the information in a label.
struct ConstGaugeWithLabel<'a>(&'a str);

impl prometheus_client::encoding::EncodeMetric for ConstGaugeWithLabel<'_> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        ConstGauge::new(1i64).encode(encoder.encode_family(&[("backend", self.0)])?)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Gauge
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn upstream_names_help_and_labels() {
        let mut m = Metrics::new("iptables", Duration::from_secs(30), "{}".into());
        let ipt = Arc::new(IptablesMetrics::new("nft"));
        m.iptables = Some(ipt.clone());
        let m = Arc::new(m);
        ipt.observe_sync(false, true, Duration::from_millis(3));
        ipt.observe_sync(false, false, Duration::from_micros(500));
        ipt.restore_failed(false, true);
        ipt.set_rules(
            [(("nat".into(), false), 7), (("filter".into(), false), 2)].into(),
            [(("nat".into(), false), 1), (("filter".into(), false), 0)].into(),
        );
        ipt.canary_resyncs.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "# HELP kubeproxy_sync_full_proxy_rules_duration_seconds SyncProxyRules latency in seconds for full resyncs",
            "# TYPE kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.002\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"} 1",
            "# HELP kubeproxy_sync_partial_proxy_rules_duration_seconds SyncProxyRules latency in seconds for partial resyncs",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"} 1",
            "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
            "# HELP kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total Cumulative proxy iptables partial restore failures",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1",
            "# HELP kubeproxy_sync_proxy_rules_iptables_total Total number of iptables rules owned by kube-proxy",
            "# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"} 7",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\",ip_family=\"IPv4\"} 2",
            "kubeproxy_sync_proxy_rules_iptables_last{table=\"nat\",ip_family=\"IPv4\"} 1",
            "kwp_iptables_backend_info{backend=\"nft\"} 1",
            "kwp_iptables_canary_resyncs_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("IPv6"),
            "a family never worked on has no series:\n{text}"
        );
        assert!(
            !text.contains(
                "full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"32.768\"}"
            ),
            "15 buckets, as upstream:\n{text}"
        );
    }
}
