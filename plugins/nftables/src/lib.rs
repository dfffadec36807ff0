//! The nftables proxy mode: renders upstream kube-proxy's nftables design
//! into plan fragments. The node-wide base holds the hook chains and the
//! dispatch maps; each service port contributes its own chains plus
//! elements in those maps, so one changed Service is one small delta.
//!
//! Chain layout (all in the host's own `ip` table):
//! - `nat-prerouting`/`nat-output` jump `services`, which looks up
//!   `service-ips` (ClusterIP, external IPs, load-balancer IPs) and
//!   `service-nodeports` (node ports on `nodeport-ips`).
//! - `svc-KEY` masquerades off-cluster sources, applies ClientIP affinity
//!   and spreads over `ep-KEY-N` chains by the policy's plan; `ep-KEY-N`
//!   marks hairpin traffic and DNATs.
//! - `ext-KEY` handles traffic from outside (node ports, external and LB
//!   IPs): masquerade under externalTrafficPolicy Cluster, local endpoints
//!   only under Local. `fw-KEY` enforces loadBalancerSourceRanges.
//! - `filter-*` chains reject (no endpoints) or drop (no local endpoints)
//!   through `no-endpoint-services` / `no-endpoint-nodeports`.
//! - `nat-postrouting` masquerades packets carrying mark 0x4000.

mod base;
mod family;
mod service;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use kwp_sdk::mode::Fragment;
use kwp_sdk::mode::ServicePort;
use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

thread_local! {
    static CONFIG: RefCell<Option<ModeConfig>> = const { RefCell::new(None) };
}

pub struct Nftables;

impl Guest for Nftables {
    fn configure(config: ModeConfig) -> Result<(), String> {
        if config.table.is_empty() {
            return Err("nftables: empty table name".into());
        }
        // Refuse a detect-local value that cannot be written safely now,
        // rather than at every render.
        for fam in [family::V4, family::V6] {
            fam.not_local(&config)?;
        }
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn render_base() -> Result<Fragment, String> {
        with_config(base::render)
    }

    fn render_service(
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        with_config(|cfg| service::render(cfg, &service, &endpoints))
    }
}

fn with_config<R>(f: impl FnOnce(&ModeConfig) -> Result<R, String>) -> Result<R, String> {
    CONFIG.with(|c| match c.borrow().as_ref() {
        Some(cfg) => f(cfg),
        None => Err("nftables: not configured".into()),
    })
}

#[cfg(target_arch = "wasm32")]
kwp_sdk::mode::bindings::export_mode_world!(Nftables with_types_in kwp_sdk::mode::bindings);
