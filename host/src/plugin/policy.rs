//! Host side of the `policy-plugin` world.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::convert::{endpoint_to_wit, ip_to_wit, plan_from_wit};
use super::probation::Probation;
use super::sandbox::{PluginError, Sandbox};
use super::{PluginStats, Runtime};
use crate::model::Endpoint;

use super::bindings::policy as bindings;
use super::bindings::types as wit;
pub use crate::model::BackendPlan;

/// One loaded policy plugin. The host keeps every endpoint set it pushed,
/// so a fresh instance (after a trap or a reload) is brought back to the
/// same state, one Service at a time as each is next used: a Service whose
/// endpoints make the instance trap fails alone, not every Service after it.
pub struct Policy {
    runtime: Arc<Runtime>,
    name: String,
    sandbox: Sandbox<bindings::PolicyPlugin>,
    component: Component,
    config: String,
    /// Shared with the state's merged endpoints whenever the set is all of
    /// them (most Services): one copy of each endpoint, converted to WIT
    /// only for the call.
    pushed: BTreeMap<u32, Arc<[Endpoint]>>,
    /// The Services of `pushed` the live instance has been given.
    in_instance: BTreeSet<u32>,
    /// Set after a hot reload: the version to go back to if the new one fails.
    probation: Option<Probation>,
}

/// The service id used by the probe run on a candidate before a reload.
pub const PROBE_SERVICE: u32 = u32::MAX;

impl Policy {
    /// Instantiates and configures the policy; a `configure` error is fatal
    /// here, so a bad plugin or config is refused before it is used.
    pub fn new(
        runtime: Arc<Runtime>,
        name: &str,
        component: &Component,
        config: &str,
    ) -> Result<Self> {
        let sandbox = Self::sandbox(&runtime, name, component)?;
        let mut policy = Self {
            runtime,
            name: name.into(),
            sandbox,
            component: component.clone(),
            config: config.into(),
            pushed: BTreeMap::new(),
            in_instance: BTreeSet::new(),
            probation: None,
        };
        policy.ensure()?;
        Ok(policy)
    }

    fn sandbox(
        runtime: &Arc<Runtime>,
        name: &str,
        component: &Component,
    ) -> Result<Sandbox<bindings::PolicyPlugin>> {
        let pre = runtime
            .linker
            .instantiate_pre(component)
            .and_then(bindings::PolicyPluginPre::new)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                super::contract::refusal(
                    name,
                    super::PluginKind::Policy,
                    &runtime.exports_of(component),
                )
            })?;
        Ok(Sandbox::new(
            name,
            runtime.clone(),
            Box::new(move |store| {
                let pre = pre.clone();
                Box::pin(async move { pre.instantiate_async(store).await })
            }),
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> Arc<PluginStats> {
        self.sandbox.stats.clone()
    }

    /// Swaps in a new version of the plugin: a fresh instance is configured
    /// before it replaces the current one, so a failure leaves the current
    /// version serving (endpoint sets follow as each Service is used). Calls already running
    /// finish on the old instance (the caller holds the policy's lock).
    pub fn reload(&mut self, component: &Component, digest: super::PluginDigest) -> Result<()> {
        let sandbox = Self::sandbox(&self.runtime, &self.name, component)?;
        let previous = std::mem::replace(&mut self.sandbox, sandbox);
        let previous_component = std::mem::replace(&mut self.component, component.clone());
        if let Err(e) = self.ensure() {
            self.sandbox = previous;
            self.component = previous_component;
            return Err(e).context("the new version failed to start");
        }
        self.probation = Some(Probation::new(previous_component, digest));
        Ok(())
    }

    /// Counts a failed call against a reloaded version and rolls it back
    /// once it has failed too often in its probation.
    fn observe<R>(&mut self, result: Result<R, PluginError>) -> Result<R, PluginError> {
        if result.is_err()
            && let Some(p) = self.probation.as_mut()
        {
            if p.is_over() {
                self.probation = None;
            } else if p.fail(1) {
                self.roll_back();
            }
        }
        result
    }

    fn roll_back(&mut self) {
        let Some(p) = self.probation.take() else {
            return;
        };
        match Self::sandbox(&self.runtime, &self.name, &p.previous) {
            Ok(sandbox) => {
                p.rolled_back(&self.runtime, &self.name, false);
                self.sandbox = sandbox;
                self.component = p.previous;
                if let Err(e) = self.ensure() {
                    tracing::error!(policy = self.name, error = %e, "the restored version failed to start; retried on its next call");
                }
            }
            Err(e) => tracing::error!(
                policy = self.name,
                error = format!("{e:#}"),
                "cannot roll back"
            ),
        }
    }

    /// Exercises a candidate with sample endpoints under the deadline:
    /// every call must return, and picks must name a pushed endpoint.
    pub fn probe(&mut self) -> Result<(), PluginError> {
        let sample: Vec<Endpoint> = (1..=3u8)
            .map(|i| Endpoint::sample([10, 255, 255, i].into(), 8080))
            .collect();
        self.set_endpoints(PROBE_SERVICE, &sample)?;
        for i in 0..16u8 {
            let picked = self.pick(PROBE_SERVICE, [192, 0, 2, i].into(), 40_000 + u16::from(i))?;
            if let Some(ep) = picked {
                self.connection_closed(PROBE_SERVICE, ep)?;
            }
        }
        self.plan(PROBE_SERVICE)?;
        self.remove_service(PROBE_SERVICE)
    }

    /// Re-creates the instance if needed and configures it.
    fn ensure(&mut self) -> Result<(), PluginError> {
        if !self.sandbox.ensure()? {
            return Ok(());
        }
        self.in_instance.clear();
        let config = self.config.clone();
        let configured = self.sandbox.call("configure", 0, async |s, b| {
            b.kwp_policy_policy().call_configure(s, &config).await
        })?;
        configured.map_err(|message| PluginError::Rejected {
            plugin: self.name.clone(),
            call: "configure",
            message,
        })
    }

    /// `ensure`, with `service`'s endpoints replayed into a fresh instance.
    fn ensure_service(&mut self, service: u32) -> Result<(), PluginError> {
        self.ensure()?;
        if self.in_instance.contains(&service) {
            return Ok(());
        }
        if let Some(endpoints) = self.pushed.get(&service) {
            let endpoints: Vec<wit::Endpoint> = endpoints.iter().map(endpoint_to_wit).collect();
            self.sandbox
                .call("set-endpoints", endpoints.len(), async |s, b| {
                    b.kwp_policy_policy()
                        .call_set_endpoints(s, service, &endpoints)
                        .await
                })?;
            self.in_instance.insert(service);
        }
        Ok(())
    }

    pub fn set_endpoints(
        &mut self,
        service: u32,
        endpoints: &[Endpoint],
    ) -> Result<(), PluginError> {
        self.set_shared_endpoints(service, endpoints.into())
    }

    /// `set_endpoints`, keeping `endpoints` itself (no copy) for replays.
    pub fn set_shared_endpoints(
        &mut self,
        service: u32,
        endpoints: Arc<[Endpoint]>,
    ) -> Result<(), PluginError> {
        // Remembered even if the call traps: the replay retries it.
        self.pushed.insert(service, endpoints);
        self.in_instance.remove(&service);
        let result = self.ensure_service(service);
        self.observe(result)
    }

    /// The service ids it holds an endpoint set for.
    #[cfg(test)]
    pub fn services(&self) -> Vec<u32> {
        self.pushed.keys().copied().collect()
    }

    pub fn remove_service(&mut self, service: u32) -> Result<(), PluginError> {
        self.pushed.remove(&service);
        let result = self.ensure().and_then(|()| {
            if !self.in_instance.remove(&service) {
                return Ok(()); // this instance never had it
            }
            self.sandbox.call("remove-service", 0, async |s, b| {
                b.kwp_policy_policy().call_remove_service(s, service).await
            })
        });
        self.observe(result)
    }

    /// The endpoint index for a new connection, `None` if there is none.
    /// An index outside the pushed list is treated as an error.
    pub fn pick(
        &mut self,
        service: u32,
        client: IpAddr,
        client_port: u16,
    ) -> Result<Option<u32>, PluginError> {
        let ip = ip_to_wit(client);
        let n = self.pushed.get(&service).map_or(0, |e| e.len());
        let result = self
            .ensure_service(service)
            .and_then(|()| {
                self.sandbox.call("pick", 0, async |s, b| {
                    b.kwp_policy_policy()
                        .call_pick(s, service, ip, client_port)
                        .await
                })
            })
            .and_then(|pick| match pick {
                Some(i) if i as usize >= n => Err(PluginError::Rejected {
                    plugin: self.name.clone(),
                    call: "pick",
                    message: format!("picked endpoint {i} of {n}"),
                }),
                other => Ok(other),
            });
        self.observe(result)
    }

    pub fn connection_closed(&mut self, service: u32, endpoint: u32) -> Result<(), PluginError> {
        let result = self.ensure_service(service).and_then(|()| {
            self.sandbox.call("connection-closed", 0, async |s, b| {
                b.kwp_policy_policy()
                    .call_connection_closed(s, service, endpoint)
                    .await
            })
        });
        self.observe(result)
    }

    pub fn plan(&mut self, service: u32) -> Result<BackendPlan, PluginError> {
        // The plan grows with the Service's endpoints, like its deadline.
        let n = self.pushed.get(&service).map_or(0, |e| e.len());
        let result = self.ensure_service(service).and_then(|()| {
            self.sandbox.call("plan", n, async |s, b| {
                b.kwp_policy_policy().call_plan(s, service).await
            })
        });
        self.observe(result).map(plan_from_wit)
    }
}
