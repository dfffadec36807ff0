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

use kwp_sdk::mode::Fragment;
use kwp_sdk::mode::ServicePort;
use kwp_sdk::mode::{Mode, ModeConfig, ServiceEndpoints};

pub use settings::Settings;

/// The mode: its configuration and the parsed `iptables` section, set by `configure`.
#[derive(Default)]
pub struct Iptables {
    config: Option<(ModeConfig, Settings)>,
}

impl Mode for Iptables {
    fn configure(&mut self, config: ModeConfig) -> Result<(), String> {
        let settings = Settings::parse(&config.extra)?;
        self.config = Some((config, settings));
        Ok(())
    }

    fn render_base(&mut self) -> Result<Fragment, String> {
        let (cfg, s) = self.config()?;
        base::render(cfg, s)
    }

    fn render_service(
        &mut self,
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        let (cfg, s) = self.config()?;
        service::render(cfg, s, &service, &endpoints)
    }
}

impl Iptables {
    fn config(&self) -> Result<(&ModeConfig, &Settings), String> {
        match &self.config {
            Some((cfg, s)) => Ok((cfg, s)),
            None => Err("iptables: not configured".into()),
        }
    }
}

kwp_sdk::export_mode!(Iptables);
