//! The bounded-frequency sync loop (upstream's BoundedFrequencyRunner):
//! changes are batched, no two syncs run closer than minSyncPeriod, a full
//! resync runs at least every syncPeriod, and whatever failed is retried
//! after a backoff (1 s, doubling up to syncPeriod), not only at the next
//! change.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::proxier::Proxier;
use crate::source::SourceEvent;
use crate::state::ClusterState;

pub struct SyncLoop {
    pub state: ClusterState,
    pub proxier: Proxier,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// Checked plugin versions to swap in (hot reload).
    pub reloads: Option<mpsc::Receiver<crate::plugin::reload::Candidate>>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Kinds whose first listing is complete; nothing is written to the
    /// dataplane before Services and EndpointSlices both have one.
    pub synced: Vec<crate::source::Kind>,
}

/// The first retry after a failure; each further one waits twice as long.
const RETRY_INITIAL: Duration = Duration::from_secs(1);

impl SyncLoop {
    /// Runs until the source closes its channel; returns itself then.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) -> Self {
        let mut last_sync: Option<Instant> = None;
        // The periodic resync counts from the last resync (the first sync
        // is a full one), not from the last sync: under steady churn syncs
        // never pause for a syncPeriod, and drift must still be repaired.
        let mut last_resync: Option<Instant> = None;
        let mut pending = false;
        let mut retry_delay = RETRY_INITIAL;
        let mut retry_at: Option<Instant> = None;
        // The next drift check (iptables' canary), once something is synced.
        let mut drift_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let earliest = last_sync.map_or(now, |t| t + self.min_sync_period);
            let periodic = last_resync.map_or(now, |t| t + self.sync_period);
            let mut wake = if pending {
                earliest.min(periodic)
            } else {
                periodic
            };
            if let Some(retry) = retry_at {
                wake = wake.min(retry.max(earliest));
            }
            if drift_at.is_none() && last_sync.is_some() {
                drift_at = self.proxier.drift_check_interval().map(|d| now + d);
            }
            let ready = self.ready();
            let reload = async {
                match self.reloads.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(candidate) = reload => {
                    self.proxier.reload_policy(&candidate);
                    pending = true;
                }
                _ = tokio::time::sleep_until(drift_at.unwrap_or(now)), if drift_at.is_some() => {
                    drift_at = None;
                    self.proxier.repair_drift();
                }
                event = events.recv() => match event {
                    Some(event) => {
                        self.apply(event);
                        pending = true;
                    }
                    None => return self,
                },
                _ = tokio::time::sleep_until(wake), if ready && (last_sync.is_some() || pending) => {
                    let periodic_due = Instant::now() >= periodic && last_resync.is_some();
                    if retry_at.is_some_and(|r| Instant::now() >= r) {
                        self.metrics.sync_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.sync();
                    // A failed resync is logged by the proxier and leaves
                    // the last good rules; count it like a failed sync.
                    if periodic_due && self.proxier.resync().is_err() {
                        self.metrics.sync_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    last_sync = Some(Instant::now());
                    if periodic_due || last_resync.is_none() {
                        last_resync = last_sync;
                    }
                    pending = false;
                    retry_at = if self.proxier.needs_retry() {
                        let at = Instant::now() + retry_delay;
                        retry_delay = (retry_delay * 2).min(self.sync_period.max(RETRY_INITIAL));
                        Some(at)
                    } else {
                        retry_delay = RETRY_INITIAL;
                        None
                    };
                }
            }
        }
    }

    /// Whether Services and EndpointSlices have both been listed once.
    pub fn ready(&self) -> bool {
        use crate::source::Kind;
        self.synced.contains(&Kind::Service) && self.synced.contains(&Kind::EndpointSlice)
    }

    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Batch { deleted, applied } => {
                for (kind, key) in deleted {
                    self.delete(kind, key);
                }
                for object in applied {
                    self.upsert(object);
                }
            }
            SourceEvent::Apply(object) => self.upsert(object),
            SourceEvent::Delete(kind, key) => self.delete(kind, key),
            SourceEvent::Synced(kind) => {
                if !self.synced.contains(&kind) {
                    tracing::info!(?kind, "initial listing complete");
                    self.synced.push(kind);
                }
            }
        }
        if self.state.pending() > 0 {
            self.metrics.queued();
        }
        self.publish_change_counts();
    }

    fn upsert(&mut self, object: crate::source::Object) {
        use crate::source::Object;
        match object {
            Object::Service(s) => {
                self.state.upsert_service(&s);
            }
            Object::Slice(s) => self.state.upsert_slice(&s),
            Object::Node(n) => {
                self.metrics.node_deleting.store(
                    n.metadata.deletion_timestamp.is_some(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.state.set_node(&n);
            }
        }
    }

    fn delete(&mut self, kind: crate::source::Kind, key: crate::model::ObjectKey) {
        use crate::source::Kind;
        match kind {
            Kind::Service => self.state.delete_service(&key),
            Kind::EndpointSlice => self.state.delete_slice(&key),
            Kind::Node => {
                // Upstream forgets the node's labels and resyncs.
                self.metrics
                    .node_deleting
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                self.state.clear_node();
            }
        }
    }

    fn publish_change_counts(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.metrics;
        m.service_changes
            .0
            .store(self.state.service_changes.0, Relaxed);
        m.service_changes
            .1
            .store(self.state.service_changes.1, Relaxed);
        m.endpoint_changes
            .0
            .store(self.state.endpoint_changes.0, Relaxed);
        m.endpoint_changes
            .1
            .store(self.state.endpoint_changes.1, Relaxed);
    }

    /// One sync: whatever changed (possibly nothing; the proxier then only
    /// retries earlier failures).
    pub fn sync(&mut self) {
        let mut changes = self.state.take_changes();
        let triggers = std::mem::take(&mut changes.triggers);
        let (updated, removed) = (changes.updated.len(), changes.removed.len());
        let result = self.proxier.sync(changes, &self.state);
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "sync failed; will retry");
        }
        // Health follows whether the proxy syncs, not whether every object
        // is valid (upstream's semantics): a Service whose rules cannot be
        // rendered or applied is an error of its own, logged by name,
        // counted and retried, and leaves the sync successful.
        let ok = result.is_ok();
        self.metrics.synced(self.proxier.stats.last_duration, ok);
        if ok {
            let now = std::time::SystemTime::now();
            for t in triggers {
                self.metrics
                    .network_programming
                    .observe(now.duration_since(t).unwrap_or_default());
            }
        }
        self.publish_change_counts();
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics
            .service_errors
            .store(self.proxier.stats.failed_services, Relaxed);
        self.metrics
            .frontend_conflicts
            .store(self.state.frontend_conflicts() as u64, Relaxed);
        let (internal, external) = self.proxier.no_local_endpoints();
        self.metrics
            .no_local_endpoints
            .0
            .store(internal, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .no_local_endpoints
            .1
            .store(external, std::sync::atomic::Ordering::Relaxed);
        *self.metrics.plugins.lock().expect("metrics lock") =
            self.proxier.plugin_stats().into_iter().collect();
        if updated + removed > 0 {
            tracing::debug!(updated, removed, took = ?self.proxier.stats.last_duration, "synced");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    fn event(version: usize) -> SourceEvent {
        let svc = format!(
            "metadata: {{name: s, namespace: t}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: {}}}]}}\n",
            1000 + version
        );
        SourceEvent::Batch {
            deleted: vec![],
            applied: vec![crate::source::Object::Service(
                serde_yaml_ng::from_str(&svc).unwrap(),
            )],
        }
    }

    /// A userspace-mode app on an empty file source, node `n1`.
    fn app(dir: &std::path::Path) -> crate::app::App {
        app_with_periods(dir, "300ms", "1h")
    }

    fn app_with_periods(dir: &std::path::Path, min: &str, period: &str) -> crate::app::App {
        let source = format!("file:{}", dir.display());
        let flags = crate::config::Cli::parse_from([
            "kube-wasm-proxy",
            "--proxy-mode",
            "userspace",
            "--no-redirect",
            "--source",
            &source,
            "--hostname-override",
            "n1",
            "--min-sync-period",
            min,
            "--sync-period",
            period,
        ])
        .flags;
        crate::app::App::build(&flags).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_node_is_forgotten() {
        use crate::source::{Kind, Object};
        let dir = tempfile::tempdir().unwrap();
        let mut sync = app(dir.path()).sync;
        let node = || {
            serde_yaml_ng::from_str::<k8s_openapi::api::core::v1::Node>(
                "metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}",
            )
            .unwrap()
        };
        // The kubernetes source: the Node is deleted.
        sync.apply(SourceEvent::Apply(Object::Node(node())));
        assert_eq!(sync.state.node().zone.as_deref(), Some("z1"));
        sync.state.take_changes();
        sync.apply(SourceEvent::Delete(
            Kind::Node,
            crate::model::ObjectKey::new("", "n1"),
        ));
        assert_eq!(sync.state.node().zone, None);
        assert_eq!(sync.state.node().name, "n1");
        assert!(sync.state.take_changes().node_changed);
    }

    /// Runs the app's sync loop with Services and EndpointSlices listed;
    /// dropping the sender ends it.
    async fn run_listed(
        app: crate::app::App,
    ) -> (mpsc::Sender<SourceEvent>, tokio::task::JoinHandle<SyncLoop>) {
        let (tx, rx) = mpsc::channel(4);
        let running = tokio::spawn(app.sync.run(rx));
        for kind in [
            crate::source::Kind::Service,
            crate::source::Kind::EndpointSlice,
        ] {
            tx.send(SourceEvent::Synced(kind)).await.unwrap();
        }
        (tx, running)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_are_batched_by_min_sync_period() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let (tx, running) = run_listed(app).await;
        // 50 changes over ~1 s: a sync per change would be 50.
        let started = std::time::Instant::now();
        for v in 0..50 {
            tx.send(event(v)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(400)).await; // the last batch syncs
        drop(tx);
        let sync = running.await.unwrap();
        let most = (elapsed.as_millis() / 300) as u64 + 2;
        let syncs = sync.proxier.stats.syncs;
        assert!(
            (2..=most).contains(&syncs),
            "{syncs} syncs for 50 changes in {elapsed:?}"
        );
        // The last change was applied.
        let port = sync.state.snapshot().next().map(|s| s.port.port);
        assert_eq!(port, Some(1049));
    }

    /// Changes every 20 ms keep syncs closer than syncPeriod for 1.5 s; a
    /// syncPeriod of 400 ms still resyncs about every 400 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steady_churn_does_not_postpone_the_periodic_resync() {
        let dir = tempfile::tempdir().unwrap();
        let app = app_with_periods(dir.path(), "50ms", "400ms");
        let (tx, running) = run_listed(app).await;
        for v in 0..75 {
            tx.send(event(v)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(tx);
        let sync = running.await.unwrap();
        let (syncs, resyncs) = (sync.proxier.stats.syncs, sync.proxier.stats.resyncs);
        assert!(syncs >= 6, "{syncs} syncs");
        assert!(resyncs >= 2, "{resyncs} resyncs in {syncs} syncs");
    }
}
