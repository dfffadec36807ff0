//! Host side of the `policy-plugin` world.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::convert::{endpoint_to_wit, ip_to_wit};
use super::sandbox::{PluginError, Sandbox};
use super::{PluginStats, Runtime};
use crate::model::Endpoint;

pub(crate) mod bindings {
    wasmtime::component::bindgen!({ world: "policy-plugin", path: "../wit", additional_derives: [PartialEq] });
}

use bindings::kwp::proxy::types as wit;

/// A policy's kernel-mode selection plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendPlan {
    Weights(Vec<u32>),
    Slots(Vec<u32>),
}

impl From<wit::BackendPlan> for BackendPlan {
    fn from(p: wit::BackendPlan) -> Self {
        match p {
            wit::BackendPlan::Weights(w) => BackendPlan::Weights(w),
            wit::BackendPlan::Slots(s) => BackendPlan::Slots(s),
        }
    }
}

/// One loaded policy plugin. The host keeps every endpoint set it pushed,
/// so a fresh instance (after a trap) is brought back to the same state.
pub struct Policy {
    sandbox: Sandbox<bindings::PolicyPlugin>,
    config: String,
    pushed: BTreeMap<u32, Vec<wit::Endpoint>>,
}

impl Policy {
    /// Instantiates and configures the policy; a `configure` error is fatal
    /// here, so a bad plugin or config is refused before it is used.
    pub fn new(runtime: Arc<Runtime>, name: &str, component: &Component, config: &str) -> Result<Self> {
        let pre = runtime
            .linker
            .instantiate_pre(component)
            .and_then(bindings::PolicyPluginPre::new)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {name} does not implement the kwp:proxy/policy world"))?;
        let sandbox = Sandbox::new(name, runtime, Box::new(move |store| pre.instantiate(store)));
        let mut policy = Self { sandbox, config: config.into(), pushed: BTreeMap::new() };
        policy.ensure()?;
        Ok(policy)
    }

    pub fn name(&self) -> &str {
        &self.sandbox.name
    }

    pub fn stats(&self) -> Arc<PluginStats> {
        self.sandbox.stats.clone()
    }

    /// Re-creates the instance if needed and replays config and endpoints.
    fn ensure(&mut self) -> Result<(), PluginError> {
        if !self.sandbox.ensure()? {
            return Ok(());
        }
        let config = self.config.clone();
        let configured = self.sandbox.call("configure", |s, b| b.kwp_proxy_policy().call_configure(s, &config))?;
        if let Err(message) = configured {
            return Err(PluginError::Rejected { plugin: self.sandbox.name.clone(), call: "configure", message });
        }
        for (service, endpoints) in &self.pushed {
            self.sandbox.call("set-endpoints", |s, b| b.kwp_proxy_policy().call_set_endpoints(s, *service, endpoints))?;
        }
        Ok(())
    }

    pub fn set_endpoints(&mut self, service: u32, endpoints: &[Endpoint]) -> Result<(), PluginError> {
        let eps: Vec<wit::Endpoint> = endpoints.iter().map(endpoint_to_wit).collect();
        self.ensure()?;
        let result = self.sandbox.call("set-endpoints", |s, b| b.kwp_proxy_policy().call_set_endpoints(s, service, &eps));
        // Remember it even if the call trapped: the replay retries it.
        self.pushed.insert(service, eps);
        result
    }

    pub fn remove_service(&mut self, service: u32) -> Result<(), PluginError> {
        self.pushed.remove(&service);
        self.ensure()?;
        self.sandbox.call("remove-service", |s, b| b.kwp_proxy_policy().call_remove_service(s, service))
    }

    /// The endpoint index for a new connection, `None` if there is none.
    /// An index outside the pushed list is treated as an error.
    pub fn pick(&mut self, service: u32, client: IpAddr, client_port: u16) -> Result<Option<u32>, PluginError> {
        self.ensure()?;
        let ip = ip_to_wit(client);
        let pick = self.sandbox.call("pick", |s, b| b.kwp_proxy_policy().call_pick(s, service, ip, client_port))?;
        let n = self.pushed.get(&service).map_or(0, Vec::len);
        match pick {
            Some(i) if i as usize >= n => Err(PluginError::Rejected {
                plugin: self.sandbox.name.clone(),
                call: "pick",
                message: format!("picked endpoint {i} of {n}"),
            }),
            other => Ok(other),
        }
    }

    pub fn connection_closed(&mut self, service: u32, endpoint: u32) -> Result<(), PluginError> {
        self.ensure()?;
        self.sandbox.call("connection-closed", |s, b| b.kwp_proxy_policy().call_connection_closed(s, service, endpoint))
    }

    pub fn plan(&mut self, service: u32) -> Result<BackendPlan, PluginError> {
        self.ensure()?;
        Ok(self.sandbox.call("plan", |s, b| b.kwp_proxy_policy().call_plan(s, service))?.into())
    }
}
