//! The proxier: turns state changes into plan fragments through the mode
//! and policy plugins, validates them, and hands the delta to a dataplane.
//!
//! A fragment that fails (plugin error, invalid plan) keeps the last good
//! fragment of that service in force and is retried on the next sync.

mod policies;
mod sets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::dataplane::userspace::backends::{Affinity, Backends, ServiceBackends};
use crate::dataplane::{Applied, Dataplane, conntrack};
use crate::model::{Endpoint, NodeInfo, ObjectKey, ServicePortName, TrafficPolicy};
use crate::plan::{Fragment, Plan, Rules};
use crate::plugin::mode::{Mode, ModeSettings};
use crate::plugin::{Catalog, Runtime};
use crate::state::topology::{Categorized, categorize_shared};
use crate::state::{Changes, ClusterState, ServiceState};
pub use policies::{Policies, PolicyKey};

/// Counters of one proxier, exported as metrics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncStats {
    pub syncs: u64,
    pub failed_services: u64,
    pub apply_errors: u64,
    /// Periodic resyncs run (syncPeriod).
    pub resyncs: u64,
    pub last_duration: Duration,
    /// CPU time of the last sync on its thread, the kernel's share of its
    /// netlink transactions included (`nft` processes not): unlike
    /// `last_duration`, what it costs does not grow with the machine's load.
    pub last_cpu: Duration,
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writing into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

pub struct Proxier {
    runtime: Arc<Runtime>,
    mode: Mode,
    mode_settings: ModeSettings,
    policies: Policies,
    rules: Rules,
    ids: HashMap<ServicePortName, u32>,
    next_id: u32,
    plan: Plan,
    base_dirty: bool,
    /// Service ports to render again next sync: the last render failed,
    /// or their policy was reloaded.
    failed: BTreeSet<ServicePortName>,
    /// Service ports with a Local (internal, external) policy and no local endpoint.
    no_local: HashMap<ServicePortName, (bool, bool)>,
    /// How many of `no_local` are (true, _) and (_, true): kept as it
    /// changes, since the metric is published after every sync.
    no_local_totals: (u64, u64),
    /// `health_wanted` changed since the health servers last saw it.
    health_changed: bool,
    /// Userspace mode's per-connection table; `None` in kernel modes.
    backends: Option<Arc<Backends>>,
    dataplane: Box<dyn Dataplane>,
    node: NodeInfo,
    /// Health-check node ports: service -> (port, local endpoints).
    health_wanted: BTreeMap<ObjectKey, (u16, usize)>,
    health: Option<crate::healthcheck::HealthServers>,
    /// Kernel modes: flush stale UDP conntrack entries after changes.
    conntrack: Option<conntrack::ConntrackCleaner>,
    /// Endpoints rendered per service port in this sync (both sets), for the cleaner.
    rendered: Vec<(crate::model::ServicePort, Vec<Endpoint>)>,
    /// Keep `plan.context` (`--dry-run` prints it; nothing else reads it,
    /// and at 50k Services it is ~12 MiB of text).
    explain: bool,
    /// Failures in this sync that are the proxy mode's (judged after a reload).
    mode_failures: u32,
    pub stats: SyncStats,
    /// What `inspect` shows, per Service port.
    pub inspect: crate::inspect::Registry,
}

impl Proxier {
    pub fn new(
        runtime: Arc<Runtime>,
        catalog: Catalog,
        mode: Mode,
        mode_settings: ModeSettings,
        default_policy: &str,
        backends: Option<Arc<Backends>>,
        dataplane: Box<dyn Dataplane>,
    ) -> Result<Self> {
        Ok(Self {
            policies: Policies::new(runtime.clone(), catalog, default_policy)?,
            runtime,
            mode,
            mode_settings,
            rules: Rules::default(),
            ids: HashMap::new(),
            next_id: 1,
            plan: Plan::default(),
            base_dirty: true,
            failed: BTreeSet::new(),
            no_local: HashMap::new(),
            no_local_totals: (0, 0),
            health_changed: false,
            backends,
            dataplane,
            node: NodeInfo::default(),
            health_wanted: BTreeMap::new(),
            health: None,
            conntrack: None,
            rendered: Vec::new(),
            explain: false,
            mode_failures: 0,
            stats: SyncStats::default(),
            inspect: crate::inspect::Registry::default(),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether something failed and waits for a retry.
    pub fn needs_retry(&self) -> bool {
        !self.failed.is_empty() || self.base_dirty
    }

    /// (internal, external): service ports with a Local traffic policy and
    /// no local endpoint (kubeproxy_sync_proxy_rules_no_local_endpoints_total).
    pub fn no_local_endpoints(&self) -> (u64, u64) {
        self.no_local_totals
    }

    /// Records `name`'s no-local-endpoints flags (`None`: it is gone),
    /// keeping the totals.
    fn set_no_local(&mut self, name: &ServicePortName, flags: Option<(bool, bool)>) {
        let old = match flags {
            Some(flags) => self.no_local.insert(name.clone(), flags),
            None => self.no_local.remove(name),
        };
        let (i, e) = &mut self.no_local_totals;
        if let Some((oi, oe)) = old {
            *i -= u64::from(oi);
            *e -= u64::from(oe);
        }
        if let Some((ni, ne)) = flags {
            *i += u64::from(ni);
            *e += u64::from(ne);
        }
    }

    /// Per-plugin counters, by plugin name (policies with a config by `name[config]`).
    pub fn plugin_stats(&self) -> Vec<(String, Arc<crate::plugin::PluginStats>)> {
        let mut out = vec![(self.mode.name().to_string(), self.mode.stats())];
        out.extend(self.policies.stats());
        out
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    pub fn catalog(&self) -> &Catalog {
        self.policies.catalog()
    }

    /// Swaps a checked new version of a policy into every instance of it;
    /// the services using it are rendered again on the next sync, since
    /// their kernel plans may differ.
    pub fn reload_policy(&mut self, candidate: &crate::plugin::reload::Candidate) {
        if candidate.kind == crate::plugin::PluginKind::Mode {
            return self.reload_mode(candidate);
        }
        let using = self.policies.reload(candidate);
        self.failed.extend(using);
    }

    /// Flush stale UDP conntrack entries (kernel modes).
    pub fn enable_conntrack_cleanup(&mut self) {
        self.conntrack = Some(conntrack::ConntrackCleaner::default());
    }

    /// Note in the plan why each fragment looks as it does (`--dry-run`).
    pub fn explain_plan(&mut self) {
        self.explain = true;
    }

    /// Serve health-check node ports (not in `--dry-run`).
    pub fn enable_health_checks(&mut self) {
        self.health = Some(crate::healthcheck::HealthServers::default());
    }

    /// Applies one batch of changes.
    pub fn sync(&mut self, changes: Changes, state: &ClusterState) -> Result<()> {
        let started = std::time::Instant::now();
        let cpu_started = thread_cpu_time();
        self.stats.syncs += 1;
        let node = state.node().clone();
        let mut todo: BTreeMap<ServicePortName, Arc<ServiceState>> = BTreeMap::new();
        if changes.node_changed || node != self.node {
            self.node = node;
            self.base_dirty = true;
            // Topology and node addresses feed every service.
            todo.extend(state.snapshot().map(|s| (s.port.name.clone(), s.clone())));
        }
        // What failed last time, looked up by name: a scan of every
        // service port here cost ~1 ms per sync at 50k.
        for name in std::mem::take(&mut self.failed) {
            if let Some(s) = state.service_port(&name) {
                todo.insert(name, s.clone());
            }
        }
        todo.extend(
            changes
                .updated
                .into_iter()
                .map(|s| (s.port.name.clone(), s)),
        );

        self.mode_failures = 0;
        // A base that fails to render keeps the last good one in the kernel
        // and is retried; the Services still sync.
        let mut base_error = None;
        let base = if std::mem::take(&mut self.base_dirty) {
            match self.render_base() {
                Ok(base) => Some(base),
                Err(e) => {
                    self.base_dirty = true;
                    tracing::error!(
                        error = format!("{e:#}"),
                        "cannot render the node-wide rules; keeping the last good ones"
                    );
                    base_error = Some(e);
                    None
                }
            }
        } else {
            None
        };
        let mut delta: Vec<(ServicePortName, Option<Fragment>)> = Vec::new();
        // The plan as it was for every changed service, to put back if the
        // dataplane refuses the change (the plan must match the kernel).
        let mut undo: Vec<(ServicePortName, Option<Fragment>)> = Vec::new();
        for name in changes.removed {
            self.health_changed |= self.health_wanted.remove(&name.service()).is_some();
            self.policies.release(&name);
            self.set_no_local(&name, None);
            if let (Some(id), Some(backends)) = (self.ids.remove(&name), &self.backends) {
                backends.remove(id);
            }
            self.plan.context.remove(&name);
            self.inspect.removed(&name);
            if let Some(old) = self.plan.services.remove(&name) {
                undo.push((name.clone(), Some(old)));
                delta.push((name, None));
            }
        }
        for (name, svc) in todo {
            match self.render_service(&svc) {
                Ok(fragment) => {
                    if self.plan.services.get(&name) != Some(&fragment) {
                        let old = self.plan.services.insert(name.clone(), fragment.clone());
                        undo.push((name.clone(), old));
                        delta.push((name, Some(fragment)));
                    }
                }
                Err(e) => {
                    self.stats.failed_services += 1;
                    tracing::error!(service = %name, error = format!("{e:#}"), "cannot render service; keeping its last good rules");
                    self.inspect.failed(&name, &e);
                    self.failed.insert(name);
                }
            }
        }
        if let Some(health) = &mut self.health
            && std::mem::take(&mut self.health_changed)
        {
            health.sync(&self.health_wanted);
        }
        let changed: Vec<(ServicePortName, Option<&Fragment>)> =
            delta.iter().map(|(n, f)| (n.clone(), f.as_ref())).collect();
        let result = if self.mode.on_trial() {
            let all = self.dataplane.apply_all(base.as_ref(), &changed);
            all.map(|()| Applied::all())
        } else {
            self.dataplane.apply(base.as_ref(), &changed)
        };
        let mut rendered = std::mem::take(&mut self.rendered);
        let mut undo: HashMap<ServicePortName, Option<Fragment>> = undo.into_iter().collect();
        let result = match result {
            Ok(applied) => {
                let mut refused_base = None;
                for (key, e) in applied.refused {
                    let Some(name) = key else {
                        self.base_dirty = true;
                        refused_base = Some(e.context("the dataplane refused the node-wide rules"));
                        continue;
                    };
                    // The dataplane kept this service's last good rules:
                    // the plan must say so too, and it is retried.
                    self.stats.failed_services += 1;
                    self.mode_failures += 1;
                    tracing::error!(service = %name, error = format!("{e:#}"), "the dataplane refused the service's rules; keeping its last good ones");
                    self.inspect.failed(&name, &e);
                    match undo.remove(&name).flatten() {
                        Some(f) => self.plan.services.insert(name.clone(), f),
                        None => self.plan.services.remove(&name),
                    };
                    rendered.retain(|(svc, _)| svc.name != name);
                    delta.retain(|(n, _)| *n != name);
                    self.failed.insert(name);
                }
                if let Some(cleaner) = &mut self.conntrack {
                    // Only once the new rules are in: new packets then take them.
                    for (name, fragment) in &delta {
                        if fragment.is_none() {
                            cleaner.removed(name);
                        }
                    }
                    for (svc, eps) in &rendered {
                        cleaner.updated(svc, eps);
                    }
                }
                refused_base.map_or(Ok(()), Err)
            }
            Err(e) => {
                self.stats.apply_errors += 1;
                for (name, old) in undo {
                    match old {
                        Some(f) => self.plan.services.insert(name, f),
                        None => self.plan.services.remove(&name),
                    };
                }
                // Everything in this batch is retried: the dataplane kept its old state.
                for (name, _) in &delta {
                    self.inspect.failed(name, &e);
                }
                self.failed.extend(delta.into_iter().map(|(n, _)| n));
                self.base_dirty |= base.is_some();
                tracing::error!(
                    error = format!("{e:#}"),
                    "applying the plan failed; previous rules stay in force"
                );
                Err(e)
            }
        };
        self.policies.drop_unused();
        self.stats.last_duration = started.elapsed();
        self.stats.last_cpu = thread_cpu_time().saturating_sub(cpu_started);
        if self
            .mode
            .judge(self.mode_failures + u32::from(result.is_err()))
        {
            return self.sync_after_rollback(state);
        }
        match base_error {
            Some(e) if result.is_ok() => Err(e),
            _ => result,
        }
    }

    /// The proxy mode was rolled back: render everything with the previous
    /// version (the kernel holds the last good rules of what failed).
    fn sync_after_rollback(&mut self, state: &ClusterState) -> Result<()> {
        self.base_dirty = true;
        self.failed
            .extend(state.snapshot().map(|s| s.port.name.clone()));
        self.sync(Changes::default(), state)
    }

    /// Swaps in a new version of the running proxy mode and renders
    /// everything again with it; the dataplane applies only what changed.
    fn reload_mode(&mut self, candidate: &crate::plugin::reload::Candidate) {
        if candidate.name != self.mode.name() {
            return; // another mode's file: not in use
        }
        match self.mode.reload(&candidate.component, candidate.digest) {
            Ok(()) => {
                self.runtime
                    .reloads
                    .reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(mode = candidate.name, "reloaded proxy mode");
                self.base_dirty = true;
                self.failed.extend(self.plan.services.keys().cloned());
            }
            Err(e) => {
                self.runtime
                    .reloads
                    .rejections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    mode = candidate.name,
                    error = format!("{e:#}"),
                    "mode reload failed; the current version stays"
                );
            }
        }
    }

    /// The periodic full resync (syncPeriod).
    pub fn resync(&mut self) -> Result<()> {
        self.stats.resyncs += 1;
        let result = self.dataplane.resync();
        if let Err(e) = &result {
            self.stats.apply_errors += 1;
            tracing::error!(
                error = format!("{e:#}"),
                "periodic resync failed; will retry"
            );
        }
        result
    }

    /// See `Dataplane::drift_check_interval`.
    pub fn drift_check_interval(&self) -> Option<std::time::Duration> {
        self.dataplane.drift_check_interval()
    }

    /// Drift repair between syncs (iptables' canary); errors are logged
    /// and counted like a failed resync. `true` when it re-applied.
    pub fn repair_drift(&mut self) -> bool {
        match self.dataplane.repair_drift() {
            Ok(repaired) => repaired,
            Err(e) => {
                self.stats.apply_errors += 1;
                tracing::error!(error = format!("{e:#}"), "drift repair failed; will retry");
                false
            }
        }
    }

    fn render_base(&mut self) -> Result<Fragment> {
        let settings = ModeSettings {
            node: self.node.clone(),
            table: self.rules.nft_table.clone(),
            ..self.mode_settings.clone()
        };
        let base = self
            .mode
            .reconfigure(settings)
            .and_then(|()| self.mode.render_base())
            .map_err(anyhow::Error::from)
            .and_then(|base| {
                base.validate(&self.rules).context("base fragment")?;
                Ok(base)
            })
            .inspect_err(|_| self.mode_failures += 1)?;
        self.plan.base = base.clone();
        Ok(base)
    }

    fn render_service(&mut self, svc: &ServiceState) -> Result<Fragment> {
        let name = &svc.port.name;
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => {
                let id = self.next_id;
                anyhow::ensure!(policies::valid_id(id), "no service port id left for {name}");
                self.next_id += 1;
                self.ids.insert(name.clone(), id);
                id
            }
        };
        let (policy_key, policy) = self.policies.for_service(&svc.port, id);
        let policy_label = policy_key.label();
        let policy_name = policy_key.name;
        let categorized = categorize_shared(&svc.port, &svc.endpoints, &self.node);
        self.note_local_endpoints(svc, &categorized);
        let own = sets::own_sets(&svc.port, &categorized);
        // Recorded first, so that a set whose push fails is still released.
        self.policies.use_sets(name, own);
        let endpoints = sets::planned(&policy, id, &svc.port, &categorized, own)?;
        let fragment = self
            .mode
            .render_service(id, &svc.port, &policy_name, &endpoints)
            .map_err(anyhow::Error::from)
            .and_then(|f| {
                f.validate(&self.rules)?;
                Ok(f)
            })
            .inspect_err(|_| self.mode_failures += 1)?;
        let reachable = sets::reachable(&endpoints);
        if self.explain {
            self.plan
                .context
                .insert(name.clone(), sets::render_context(&policy_name, &endpoints));
        }
        let (plugin, digest) = self.policies.origin(&policy_name).unwrap_or_default();
        self.inspect.synced(
            name,
            crate::inspect::Record {
                policy: policy_label,
                plugin,
                digest,
                endpoints: reachable.len(),
                rules: crate::inspect::rule_count(&fragment),
            },
        );
        // The cleaner flushes UDP flows only: no copy of the others (a
        // full sync would hold every service port and endpoint twice).
        if self.conntrack.is_some() && svc.port.name.protocol == crate::model::Protocol::Udp {
            self.rendered.push(((*svc.port).clone(), reachable));
        }
        let Some(table) = &self.backends else {
            return Ok(fragment);
        };
        // Per-connection picks come from the internal set: the userspace
        // listener cannot tell a node-port client from a cluster-IP one.
        table.set(ServiceBackends {
            id,
            name: name.clone(),
            endpoints: endpoints
                .internal
                .endpoints
                .iter()
                .map(|e| e.socket_addr())
                .collect(),
            policy,
            affinity: svc
                .port
                .affinity_timeout
                .map(|t| Affinity::new(Duration::from_secs(t.into()))),
        });
        Ok(fragment)
    }

    /// Health-check node ports and the no-local-endpoints counters, as
    /// upstream: a Local policy with no endpoint here counts only while the
    /// Service has endpoints elsewhere (with none at all it rejects).
    fn note_local_endpoints(&mut self, svc: &ServiceState, categorized: &Categorized) {
        let name = &svc.port.name;
        let no_local = categorized.has_any && categorized.local.is_empty();
        let accessible = svc.port.externally_accessible();
        self.set_no_local(
            name,
            Some((
                svc.port.internal_policy == TrafficPolicy::Local && no_local,
                accessible && svc.port.external_policy == TrafficPolicy::Local && no_local,
            )),
        );
        let svc_key = name.service();
        let changed = match svc.port.health_check_node_port {
            Some(port) => {
                // Upstream's health check counts ready local endpoints: a
                // node whose local endpoints are all terminating still
                // forwards to them but asks the load balancer to go elsewhere.
                let ready = categorized.local.iter().filter(|e| e.ready).count();
                self.health_wanted.insert(svc_key, (port, ready)) != Some((port, ready))
            }
            None => self.health_wanted.remove(&svc_key).is_some(),
        };
        self.health_changed |= changed;
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_large;
#[cfg(test)]
mod tests_per_change;
#[cfg(test)]
mod tests_sets;
