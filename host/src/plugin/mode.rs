//! Host side of the `proxy-mode` world.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::convert::{
    endpoint_to_wit, ip_from_wit, node_to_wit, plan_to_wit, protocol_from_wit, service_to_wit,
};
use super::probation::Probation;
use super::sandbox::{PluginError, Sandbox};
use super::{PluginStats, Runtime};
use crate::model::{BackendPlan, EndpointSet, ServiceEndpoints};
use crate::model::{Endpoint, NodeInfo, ServicePort};
use crate::plan::{Fragment, Item, Listener, NftFamily};

use super::bindings::mode as bindings;
use bindings::exports::kwp::mode::mode as wit_mode;
use bindings::kwp::mode::plan as wit_plan;

/// Node-wide settings handed to the mode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModeSettings {
    pub node: NodeInfo,
    /// nodePortAddresses: when set, node ports answer on this node's local
    /// addresses within these CIDRs instead of the Node's addresses.
    pub node_port_addresses: Vec<crate::model::Cidr>,
    pub table: String,
    pub masquerade_all: bool,
    pub detect_local: crate::model::DetectLocal,
    /// The mode's KubeProxyConfiguration section as JSON: upstream's
    /// camelCase names, defaults filled in, durations as Go writes them
    /// (`30s`, `1m0s`); `{}` for modes without one. iptables:
    /// masqueradeBit, masqueradeAll, localhostNodePorts, syncPeriod,
    /// minSyncPeriod. ipvs: scheduler, excludeCIDRs, strictARP, tcpTimeout,
    /// tcpFinTimeout, udpTimeout, syncPeriod, minSyncPeriod. Built and
    /// checked by `crate::config::file::mode_extra`.
    pub extra: String,
}

pub struct Mode {
    runtime: Arc<Runtime>,
    sandbox: Sandbox<bindings::ProxyMode>,
    component: Component,
    settings: ModeSettings,
    /// Set after a hot reload: the version to go back to if the new one fails.
    probation: Option<Probation>,
    /// A reloaded version's first sync (everything rendered again) has not
    /// yet succeeded.
    on_trial: bool,
}

impl Mode {
    pub fn new(
        runtime: Arc<Runtime>,
        name: &str,
        component: &Component,
        settings: ModeSettings,
    ) -> Result<Self> {
        let sandbox = Self::sandbox(&runtime, name, component)?;
        let mut mode = Self {
            runtime,
            sandbox,
            component: component.clone(),
            settings,
            probation: None,
            on_trial: false,
        };
        mode.ensure()?;
        Ok(mode)
    }

    fn sandbox(
        runtime: &Arc<Runtime>,
        name: &str,
        component: &Component,
    ) -> Result<Sandbox<bindings::ProxyMode>> {
        let pre = runtime
            .linker
            .instantiate_pre(component)
            .and_then(bindings::ProxyModePre::new)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                super::contract::refusal(
                    name,
                    super::PluginKind::Mode,
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

    /// Swaps in a new version: it must configure with the current settings
    /// first, or the current version stays. It is then on probation (see
    /// `judge`).
    pub fn reload(&mut self, component: &Component, digest: super::PluginDigest) -> Result<()> {
        self.swap(component)?;
        let previous = std::mem::replace(&mut self.component, component.clone());
        self.probation = Some(Probation::new(previous, digest));
        self.on_trial = true;
        Ok(())
    }

    fn swap(&mut self, component: &Component) -> Result<()> {
        let sandbox = Self::sandbox(&self.runtime, &self.sandbox.name.clone(), component)?;
        let previous = std::mem::replace(&mut self.sandbox, sandbox);
        if let Err(e) = self.ensure() {
            self.sandbox = previous;
            return Err(e).context("the new version failed to start");
        }
        Ok(())
    }

    /// A reloaded version whose first sync has not yet succeeded.
    pub fn on_trial(&self) -> bool {
        self.probation.is_some() && self.on_trial
    }

    /// Called after every sync with how many of its failures are the mode's
    /// (failed or invalid renders, the kernel refusing its rules). A
    /// reloaded version that fails in its first sync, or
    /// `PROBATION_FAILURES` times within `PROBATION`, is rolled back to the
    /// previous version and quarantined. Returns true when it was rolled
    /// back: everything must then be rendered again.
    pub fn judge(&mut self, failures: u32) -> bool {
        let Some(p) = self.probation.as_mut() else {
            return false;
        };
        let first_sync = std::mem::take(&mut self.on_trial);
        if p.is_over() {
            self.probation = None;
            return false;
        }
        if failures == 0 || !(p.fail(failures) || first_sync) {
            return false;
        }
        let Some(p) = self.probation.take() else {
            return false;
        };
        match self.swap(&p.previous) {
            Ok(()) => {
                p.rolled_back(&self.runtime, &self.sandbox.name, first_sync);
                self.component = p.previous;
                true
            }
            Err(e) => {
                tracing::error!(
                    mode = self.sandbox.name,
                    error = format!("{e:#}"),
                    "cannot roll back the proxy mode"
                );
                false
            }
        }
    }

    /// Renders the base and a sample Service under the deadline and checks
    /// the fragments against the host's rules.
    pub fn probe(&mut self, rules: &crate::plan::Rules) -> Result<()> {
        self.render_base()?
            .validate(rules)
            .context("probe: base fragment")?;
        let svc = ServicePort {
            name: crate::model::ServicePortName {
                namespace: "kwp-probe".into(),
                name: "probe".into(),
                port: "p".into(),
                protocol: crate::model::Protocol::Tcp,
            },
            cluster_ips: vec![[10, 255, 255, 1].into()],
            port: 80,
            node_port: Some(30999),
            external_ips: Vec::new(),
            load_balancer_ingress: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout: None,
            external_policy: crate::model::TrafficPolicy::Cluster,
            internal_policy: crate::model::TrafficPolicy::Cluster,
            health_check_node_port: None,
            lb_policy: None,
            lb_policy_config: String::new(),
        };
        let eps: Vec<Endpoint> = (1..=2u8)
            .map(|i| Endpoint::sample([10, 255, 254, i].into(), 8080))
            .collect();
        let set = EndpointSet {
            endpoints: eps,
            backends: BackendPlan::Weights(vec![1, 1]),
        };
        let endpoints = ServiceEndpoints {
            internal: set.clone(),
            external: set,
            cluster: EndpointSet::empty(),
            has_any: true,
        };
        self.render_service(u32::MAX, &svc, "round-robin", &endpoints)?
            .validate(rules)
            .context("probe: service fragment")?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.sandbox.name
    }

    pub fn stats(&self) -> Arc<PluginStats> {
        self.sandbox.stats.clone()
    }

    /// Changes node-wide settings (re-configures the instance).
    pub fn reconfigure(&mut self, settings: ModeSettings) -> Result<(), PluginError> {
        self.settings = settings;
        self.configure()
    }

    fn ensure(&mut self) -> Result<(), PluginError> {
        if self.sandbox.ensure()? {
            self.configure()
        } else {
            Ok(())
        }
    }

    fn configure(&mut self) -> Result<(), PluginError> {
        let s = &self.settings;
        let mut node = s.node.clone();
        if !s.node_port_addresses.is_empty() {
            node.addresses = crate::model::local_addresses()
                .into_iter()
                .filter(|ip| s.node_port_addresses.iter().any(|c| c.contains(*ip)))
                .collect();
        }
        let config = wit_mode::ModeConfig {
            node: node_to_wit(&node),
            table: s.table.clone(),
            masquerade_all: s.masquerade_all,
            detect_local: detect_local_to_wit(&s.detect_local, &s.node),
            extra: s.extra.clone(),
        };
        let result = self.sandbox.call("configure", 0, async |st, b| {
            b.kwp_mode_mode().call_configure(st, &config).await
        })?;
        result.map_err(|message| PluginError::Rejected {
            plugin: self.sandbox.name.clone(),
            call: "configure",
            message,
        })
    }

    pub fn render_base(&mut self) -> Result<Fragment, PluginError> {
        self.ensure()?;
        let result = self.sandbox.call("render-base", 0, async |st, b| {
            b.kwp_mode_mode().call_render_base(st).await
        })?;
        self.fragment("render-base", result)
    }

    pub fn render_service(
        &mut self,
        id: u32,
        svc: &ServicePort,
        lb_policy: &str,
        endpoints: &ServiceEndpoints,
    ) -> Result<Fragment, PluginError> {
        self.ensure()?;
        let svc = service_to_wit(id, svc, lb_policy);
        let set = |s: &EndpointSet| wit_mode::EndpointSet {
            endpoints: s.endpoints.iter().map(endpoint_to_wit).collect(),
            backends: plan_to_wit(&s.backends),
        };
        let handed = wit_mode::ServiceEndpoints {
            internal: set(&endpoints.internal),
            external: set(&endpoints.external),
            cluster: set(&endpoints.cluster),
            has_any_endpoints: endpoints.has_any,
        };
        let elements = handed.internal.endpoints.len()
            + handed.external.endpoints.len()
            + handed.cluster.endpoints.len();
        let result = self
            .sandbox
            .call("render-service", elements, async |st, b| {
                b.kwp_mode_mode()
                    .call_render_service(st, &svc, &handed)
                    .await
            })?;
        self.fragment("render-service", result)
    }

    fn fragment(
        &self,
        call: &'static str,
        result: Result<wit_plan::Fragment, String>,
    ) -> Result<Fragment, PluginError> {
        let fragment = result.map_err(|message| PluginError::Rejected {
            plugin: self.sandbox.name.clone(),
            call,
            message,
        })?;
        Ok(Fragment {
            items: fragment.items.into_iter().map(item_from_wit).collect(),
        })
    }
}

/// NodeCIDR resolves to the Node's podCIDRs (no detection until known).
fn detect_local_to_wit(d: &crate::model::DetectLocal, node: &NodeInfo) -> wit_mode::DetectLocal {
    use crate::model::DetectLocal as D;
    match d {
        D::None => wit_mode::DetectLocal::None,
        D::ClusterCidr(c) => {
            wit_mode::DetectLocal::Cidrs(c.iter().map(ToString::to_string).collect())
        }
        D::NodeCidr => {
            // The Node object's podCIDRs come from the cluster: only parsed
            // CIDRs, re-rendered, reach the mode's rule text.
            let cidrs: Vec<String> = node
                .pod_cidrs
                .iter()
                .filter_map(|c| match c.parse::<crate::model::Cidr>() {
                    Ok(cidr) => Some(cidr.to_string()),
                    Err(e) => {
                        tracing::warn!(error = e, "Node spec.podCIDRs entry ignored");
                        None
                    }
                })
                .collect();
            if cidrs.is_empty() {
                wit_mode::DetectLocal::None
            } else {
                wit_mode::DetectLocal::Cidrs(cidrs)
            }
        }
        D::BridgeInterface(b) => wit_mode::DetectLocal::BridgeInterface(b.clone()),
        D::InterfaceNamePrefix(p) => wit_mode::DetectLocal::InterfacePrefix(p.clone()),
    }
}

fn family(f: wit_plan::NftFamily) -> NftFamily {
    match f {
        wit_plan::NftFamily::Ip => NftFamily::Ip,
        wit_plan::NftFamily::Ip6 => NftFamily::Ip6,
        wit_plan::NftFamily::Inet => NftFamily::Inet,
    }
}

fn item_from_wit(item: wit_plan::Item) -> Item {
    use wit_plan::Item as W;
    match item {
        W::NftChain(c) => Item::NftChain {
            family: family(c.family),
            table: c.table,
            name: c.name,
            hook: c.hook,
            rules: c.rules,
        },
        W::NftSet(s) => Item::NftSet {
            family: family(s.family),
            table: s.table,
            name: s.name,
            declaration: s.declaration,
        },
        W::NftElement(e) => Item::NftElement {
            family: family(e.family),
            table: e.table,
            set: e.set,
            element: e.element,
        },
        W::IptablesChain(c) => Item::IptablesChain {
            ipv6: c.ipv6,
            table: c.table,
            name: c.name,
            rules: c.rules,
        },
        W::IpvsVirtualServer(v) => Item::IpvsVirtualServer {
            address: SocketAddr::new(ip_from_wit(v.address), v.port),
            protocol: protocol_from_wit(v.protocol),
            scheduler: v.scheduler,
            persistence_timeout: v.persistence_timeout,
        },
        W::IpvsRealServer(r) => Item::IpvsRealServer {
            virtual_address: SocketAddr::new(ip_from_wit(r.virtual_address), r.virtual_port),
            protocol: protocol_from_wit(r.protocol),
            address: SocketAddr::new(ip_from_wit(r.address), r.port),
            weight: r.weight,
        },
        W::Listener(l) => Item::Listener(Listener {
            service: l.service,
            protocol: protocol_from_wit(l.protocol),
            frontends: l
                .frontends
                .into_iter()
                .map(|(ip, port)| SocketAddr::new(ip_from_wit(ip), port))
                .collect(),
            udp_idle_timeout: Duration::from_millis(u64::from(l.udp_idle_timeout_ms)),
        }),
    }
}
