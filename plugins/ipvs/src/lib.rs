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
//!   Traffic to external addresses under externalTrafficPolicy Local goes
//!   to local endpoints only.
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

use std::cell::RefCell;

use kwp_sdk::mode::exports::kwp::proxy::mode::{Guest, ModeConfig};
use kwp_sdk::mode::kwp::proxy::plan::{Fragment, IpvsRealServer, IpvsVirtualServer, Item};
use kwp_sdk::mode::kwp::proxy::types::{
    BackendPlan, Endpoint, IpAddress, IpMode, ServicePort, SessionAffinity, TrafficPolicy,
};

pub use config::{IpvsConfig, SCHEDULERS};

thread_local! {
    static CONFIG: RefCell<Option<(ModeConfig, IpvsConfig)>> = const { RefCell::new(None) };
}

pub struct Ipvs;

impl Guest for Ipvs {
    fn configure(config: ModeConfig) -> Result<(), String> {
        let ipvs = IpvsConfig::parse(&config.extra)?;
        CONFIG.with(|c| *c.borrow_mut() = Some((config, ipvs)));
        Ok(())
    }

    fn render_base() -> Result<Fragment, String> {
        CONFIG.with(|c| match c.borrow().as_ref() {
            Some((mode, _)) => base::render(mode),
            None => Err("ipvs: not configured".into()),
        })
    }

    fn render_service(
        service: ServicePort,
        endpoints: Vec<Endpoint>,
        backends: BackendPlan,
    ) -> Result<Fragment, String> {
        CONFIG.with(|c| match c.borrow().as_ref() {
            Some((mode, ipvs)) => render(mode, ipvs, &service, &endpoints, &backends),
            None => Err("ipvs: not configured".into()),
        })
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

pub fn render(
    mode: &ModeConfig,
    ipvs: &IpvsConfig,
    svc: &ServicePort,
    endpoints: &[Endpoint],
    backends: &BackendPlan,
) -> Result<Fragment, String> {
    let named = |e: String| format!("{}/{}:{}: {e}", svc.namespace, svc.name, svc.port_name);
    let plan = kwp_sdk::mode_weights(backends, endpoints.len()).map_err(named)?;
    let sched = scheduler(&svc.lb_policy, &ipvs.scheduler);
    let persistence = match svc.session_affinity {
        SessionAffinity::ClientIp(t) => t.max(1),
        SessionAffinity::None => 0,
    };
    let any_ready = endpoints.iter().any(|e| e.ready);
    // (endpoint index, weight) for every real server, all addresses.
    let reals = |local_only: bool| -> Vec<(usize, u32)> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| !local_only || e.is_local)
            .filter_map(|(i, e)| {
                let usable = if any_ready {
                    e.ready
                } else {
                    e.serving && e.terminating
                };
                if usable {
                    Some((i, plan[i].max(u32::from(plan.iter().all(|w| *w == 0)))))
                } else if e.terminating {
                    Some((i, 0))
                } else {
                    None
                }
            })
            .collect()
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
    let local = svc.external_traffic_policy == TrafficPolicy::Local;
    let takes_new = |local_only: bool| reals(local_only).iter().any(|(_, w)| *w > 0);
    let usable = filter::Usable {
        internal: takes_new(false),
        external: takes_new(local),
    };
    let mut items = filter::render(mode, svc, endpoints, &usable);
    for (address, port, external) in frontends {
        items.push(Item::IpvsVirtualServer(IpvsVirtualServer {
            address,
            port,
            protocol: svc.protocol,
            scheduler: sched.clone(),
            persistence_timeout: persistence,
        }));
        for (i, weight) in reals(external && local) {
            let ep = &endpoints[i];
            if same_family(&ep.address, &address) {
                items.push(Item::IpvsRealServer(IpvsRealServer {
                    virtual_address: address,
                    virtual_port: port,
                    protocol: svc.protocol,
                    address: ep.address,
                    port: ep.port,
                    weight,
                }));
            }
        }
    }
    Ok(Fragment { items })
}

#[cfg(target_arch = "wasm32")]
kwp_sdk::mode::export_mode_world!(Ipvs with_types_in kwp_sdk::mode);

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_filter;
