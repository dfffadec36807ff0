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
//! - `ext-KEY` handles traffic to node ports, external and LB IPs:
//!   masquerade under externalTrafficPolicy Cluster; under Local, local
//!   endpoints only for clients outside, while this node's pods and the
//!   node itself are short-circuited to the cluster-wide set (`svc-KEY`
//!   when it is the internal one, else `cluster-KEY`). `fw-KEY` enforces
//!   loadBalancerSourceRanges.
//! - `filter-*-post-dnat` chains reject (no endpoints) or drop (no local
//!   endpoints) through `no-endpoint-services` / `no-endpoint-nodeports`,
//!   after DNAT, so short-circuited packets pass.
//! - `nat-postrouting` masquerades packets carrying mark 0x4000.

mod base;
mod family;
mod service;
#[cfg(test)]
mod tests;

use kwp_sdk::mode::Fragment;
use kwp_sdk::mode::ServicePort;
use kwp_sdk::mode::{Mode, ModeConfig, ServiceEndpoints};

#[derive(Default)]
pub struct Nftables {
    config: Option<ModeConfig>,
}

impl Mode for Nftables {
    fn configure(&mut self, config: ModeConfig) -> Result<(), String> {
        if config.table.is_empty() {
            return Err("nftables: empty table name".into());
        }
        // Refuse a detect-local value that cannot be written safely now,
        // rather than at every render.
        for fam in [family::V4, family::V6] {
            fam.not_local(&config)?;
        }
        self.config = Some(config);
        Ok(())
    }

    fn render_base(&mut self) -> Result<Fragment, String> {
        base::render(self.config()?)
    }

    fn render_service(
        &mut self,
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        service::render(self.config()?, &service, &endpoints)
    }
}

impl Nftables {
    fn config(&self) -> Result<&ModeConfig, String> {
        self.config
            .as_ref()
            .ok_or_else(|| "nftables: not configured".into())
    }
}

kwp_sdk::export_mode!(Nftables);
