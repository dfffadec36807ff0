//! The IPVS proxy mode: renders upstream kube-proxy's IPVS design into
//! `ipvs-virtual-server` / `ipvs-real-server` items; the host binds the
//! virtual addresses to `kube-ipvs0` and programs IPVS over netlink.
//!
//! - A virtual server per ClusterIP, external IP, load-balancer ingress IP
//!   (ipMode VIP) and node port on each node address, per port and
//!   protocol, each of the Service's IP family.
//! - Real servers: the ready endpoints (or, when none is ready, the
//!   serving terminating ones, as upstream), weighted by the policy's plan;
//!   other terminating endpoints stay at weight 0 so their connections
//!   drain (upstream's graceful termination) until they leave the slice.
//!   Cluster IPs get the host's internal endpoint set, external addresses
//!   and node ports its external set (local endpoints only under
//!   externalTrafficPolicy Local, with their own terminating fallback).
//!   The short-circuit set (`cluster`) is not used: upstream's IPVS mode
//!   has no short-circuit, a virtual server has one set of real servers
//!   whoever the client is (docs/ipvs.md).
//! - The scheduler follows the Service's policy (weighted -> wrr, maglev ->
//!   mh, least-connections -> lc, round-robin -> the configured scheduler,
//!   rr by default); ClientIP affinity is persistence with its timeout.
//! - The packet-filter helpers upstream builds with ipset + iptables, as
//!   nftables sets and chains in the host's own table: the base
//!   (`base.rs`) holds the chains and sets, each Service its elements
//!   (`filter.rs`); the host applies them with its nftables dataplane.

mod base;
mod config;
mod filter;
// The nftables mode's family helpers (addresses, detect-local), shared by path.
#[allow(dead_code)] // `host_port` is for DNAT, which IPVS does itself.
#[path = "../../nftables/src/family.rs"]
mod family;

use kwp_sdk::mode::{Endpoint, IpAddress, IpMode, ServicePort, SessionAffinity};
use kwp_sdk::mode::{EndpointSet, Mode, ModeConfig, ServiceEndpoints};
use kwp_sdk::mode::{Fragment, IpvsRealServer, IpvsVirtualServer, Item};

pub use config::{IpvsConfig, SCHEDULERS};

/// The mode: its configuration and the parsed `ipvs` section, set by `configure`.
#[derive(Default)]
pub struct Ipvs {
    config: Option<(ModeConfig, IpvsConfig)>,
}

impl Mode for Ipvs {
    fn configure(&mut self, config: ModeConfig) -> Result<(), String> {
        let ipvs = IpvsConfig::parse(&config.extra)?;
        self.config = Some((config, ipvs));
        Ok(())
    }

    fn render_base(&mut self) -> Result<Fragment, String> {
        let (mode, _) = self.config()?;
        base::render(mode)
    }

    fn render_service(
        &mut self,
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        let (mode, ipvs) = self.config()?;
        render(mode, ipvs, &service, &endpoints)
    }
}

impl Ipvs {
    fn config(&self) -> Result<(&ModeConfig, &IpvsConfig), String> {
        match &self.config {
            Some((mode, ipvs)) => Ok((mode, ipvs)),
            None => Err("ipvs: not configured".into()),
        }
    }
}

/// The IPVS scheduler for a Service's policy.
pub fn scheduler(policy: &str, configured: &str) -> String {
    match policy {
        "weighted" => "wrr",
        "maglev" => "mh",
        "least-connections" => "lc",
        _ => configured,
    }
    .into()
}

fn same_family(a: &IpAddress, b: &IpAddress) -> bool {
    matches!(
        (a, b),
        (IpAddress::V4(_), IpAddress::V4(_)) | (IpAddress::V6(_), IpAddress::V6(_))
    )
}

/// Cluster IPs take the internal set; external IPs, load-balancer IPs and
/// node ports the external set (upstream's syncEndpoint with its
/// node-local flag per frontend).
pub fn render(
    mode: &ModeConfig,
    ipvs: &IpvsConfig,
    svc: &ServicePort,
    sets: &ServiceEndpoints,
) -> Result<Fragment, String> {
    let named = |e: String| format!("{}/{}:{}: {e}", svc.namespace, svc.name, svc.port_name);
    let internal = Reals::of(&sets.internal).map_err(|e| named(format!("internal set: {e}")))?;
    let external = Reals::of(&sets.external).map_err(|e| named(format!("external set: {e}")))?;
    let sched = scheduler(&svc.lb_policy, &ipvs.scheduler);
    let persistence = match svc.session_affinity {
        SessionAffinity::ClientIp(t) => t.max(1),
        SessionAffinity::None => 0,
    };
    let mut frontends: Vec<(IpAddress, u16, bool)> = Vec::new();
    for ip in &svc.cluster_ips {
        frontends.push((*ip, svc.port, false));
    }
    for ip in &svc.external_ips {
        frontends.push((*ip, svc.port, true));
    }
    for lb in &svc.load_balancer_ingress {
        if lb.ip_mode == IpMode::Vip {
            frontends.push((lb.ip, svc.port, true));
        }
    }
    if let Some(np) = svc.node_port {
        for ip in &mode.node.addresses {
            if svc.cluster_ips.iter().any(|c| same_family(c, ip)) {
                frontends.push((*ip, np, true));
            }
        }
    }
    let usable = filter::Usable {
        internal: internal.takes_new(),
        external: external.takes_new(),
        has_any: sets.has_any_endpoints,
    };
    // Hairpin entries for every endpoint either set reaches, once.
    let merged = kwp_sdk::sets::MergedSets::new(sets).map_err(named)?;
    let mut items = filter::render(mode, svc, &merged.endpoints, &usable);
    for (address, port, is_external) in frontends {
        items.push(Item::IpvsVirtualServer(IpvsVirtualServer {
            address,
            port,
            protocol: svc.protocol,
            scheduler: sched.clone(),
            persistence_timeout: persistence,
        }));
        let reals = if is_external { &external } else { &internal };
        for (ep, weight) in &reals.servers {
            if same_family(&ep.address, &address) {
                items.push(Item::IpvsRealServer(IpvsRealServer {
                    virtual_address: address,
                    virtual_port: port,
                    protocol: svc.protocol,
                    address: ep.address,
                    port: ep.port,
                    weight: *weight,
                }));
            }
        }
    }
    Ok(Fragment { items })
}

/// One set's real servers with their weights.
struct Reals<'a> {
    servers: Vec<(&'a Endpoint, u32)>,
}

impl<'a> Reals<'a> {
    /// The ready endpoints (or, when none is ready, the serving terminating
    /// ones, as upstream), weighted by the plan; other terminating
    /// endpoints at weight 0 so their connections drain.
    fn of(set: &'a EndpointSet) -> Result<Self, String> {
        let endpoints = &set.endpoints;
        let plan = kwp_sdk::mode_weights(&set.backends, endpoints.len())?;
        let any_ready = endpoints.iter().any(|e| e.ready);
        let all_zero = plan.iter().all(|w| *w == 0);
        let servers = endpoints
            .iter()
            .zip(&plan)
            .filter_map(|(e, w)| {
                let usable = if any_ready {
                    e.ready
                } else {
                    e.serving && e.terminating
                };
                if usable {
                    Some((e, (*w).max(u32::from(all_zero))))
                } else if e.terminating {
                    Some((e, 0))
                } else {
                    None
                }
            })
            .collect();
        Ok(Self { servers })
    }

    fn takes_new(&self) -> bool {
        self.servers.iter().any(|(_, w)| *w > 0)
    }
}

kwp_sdk::export_mode!(Ipvs);

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_filter;
#[cfg(test)]
mod tests_sets;
