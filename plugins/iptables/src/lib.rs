//! The iptables proxy mode: upstream kube-proxy's iptables layout and
//! meaning, in kwp's own `KWP-` chains (docs/iptables.md).
//!
//! - nat: `KWP-SERVICES` (jumped from PREROUTING and OUTPUT) sends
//!   service IPs through `KWP-SERVICE-IPS` and node ports through
//!   `KWP-NODEPORTS`; `KWP-SVC-H` picks an endpoint (`-m statistic` by the
//!   policy's weights, `-m recent` for ClientIP affinity) and `KWP-SEP-H`
//!   marks hairpin traffic and DNATs; `KWP-EXT-H` handles traffic from
//!   outside; `KWP-POSTROUTING` masquerades packets marked by
//!   `KWP-MARK-MASQ`.
//! - filter: `KWP-SERVICES` / `KWP-EXTERNAL-SERVICES` reject (no
//!   endpoints) or drop (no local endpoints), `KWP-PROXY-FIREWALL` sends
//!   LB traffic through `KWP-FW-H` (loadBalancerSourceRanges),
//!   `KWP-NODEPORTS` accepts health-check node ports, `KWP-FORWARD`
//!   accepts marked and established traffic and drops invalid state.
//!
//! Chains that several Services add rules to (the dispatch chains) are
//! declared by the base with no rules; the host merges every fragment's
//! rules for a chain of the same name.

mod base;
mod family;
mod service;
mod settings;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use kwp_sdk::mode::Fragment;
use kwp_sdk::mode::ServicePort;
use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

pub use settings::Settings;

thread_local! {
    static CONFIG: RefCell<Option<(ModeConfig, Settings)>> = const { RefCell::new(None) };
}

pub struct Iptables;

impl Guest for Iptables {
    fn configure(config: ModeConfig) -> Result<(), String> {
        let settings = Settings::parse(&config.extra)?;
        CONFIG.with(|c| *c.borrow_mut() = Some((config, settings)));
        Ok(())
    }

    fn render_base() -> Result<Fragment, String> {
        with_config(base::render)
    }

    fn render_service(
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        with_config(|cfg, s| service::render(cfg, s, &service, &endpoints))
    }
}

fn with_config<R>(
    f: impl FnOnce(&ModeConfig, &Settings) -> Result<R, String>,
) -> Result<R, String> {
    CONFIG.with(|c| match c.borrow().as_ref() {
        Some((cfg, s)) => f(cfg, s),
        None => Err("iptables: not configured".into()),
    })
}

#[cfg(target_arch = "wasm32")]
kwp_sdk::mode::bindings::export_mode_world!(Iptables with_types_in kwp_sdk::mode::bindings);
