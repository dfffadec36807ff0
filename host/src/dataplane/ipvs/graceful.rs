//! Graceful termination, as upstream's graceful_termination.go: a real
//! server leaving a TCP virtual server is deleted at once only if it has
//! no connections; otherwise it is set to weight 0 (no new connections)
//! and deleted once its active + inactive connection count, read over
//! netlink, reaches 0, or its drain timeout passes. UDP and SCTP real
//! servers are deleted at once (upstream's IsRsGracefulTerminationNeeded;
//! with expire_nodest_conn their flows expire on the next packet).
//!
//! Draining servers are checked at every apply and resync (the sync loop
//! runs one at least every syncPeriod; upstream checks once a minute).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::IpvsDataplane;
use super::kernel::{RealServer, VirtualKey, missing};
use super::servers::ok_if;
use crate::model::Protocol;

/// How long a draining real server may keep connections: IPVS's own
/// default for an established TCP connection (900 s), after which IPVS
/// would expire an idle one anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// Real servers at weight 0 waiting for their connections to end, with
/// the time each must be gone by.
pub(super) type Draining = BTreeMap<VirtualKey, BTreeMap<SocketAddr, Instant>>;

fn graceful(protocol: Protocol) -> bool {
    !matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

impl IpvsDataplane {
    /// Real servers `(address, current weight)` leaving `vk`: deleted now,
    /// or drained first.
    pub(super) fn retire(&mut self, vk: &VirtualKey, leaving: &[(SocketAddr, u32)]) -> Result<()> {
        if leaving.is_empty() {
            return Ok(());
        }
        let counts = if graceful(vk.protocol) {
            self.kernel.connections(vk)?
        } else {
            BTreeMap::new()
        };
        for (address, weight) in leaving {
            let conns = counts.get(address).copied().unwrap_or(0);
            if conns == 0 {
                self.calls += 1;
                self.kernel
                    .delete_destination(vk, *address)
                    .or_else(ok_if(missing))?;
                continue;
            }
            if *weight != 0 {
                let rs = RealServer {
                    address: *address,
                    weight: 0,
                };
                self.update_dest(vk, &rs)?;
            }
            tracing::debug!(virtual_server = %vk, real_server = %address, conns, "draining");
            let deadline = Instant::now() + self.drain_timeout;
            self.draining
                .entry(*vk)
                .or_default()
                .entry(*address)
                .or_insert(deadline);
        }
        Ok(())
    }

    /// Deletes the draining real servers whose connections have ended or
    /// whose timeout has passed. Failures are logged and retried next time.
    pub(super) fn drain(&mut self) {
        let now = Instant::now();
        for (vk, list) in std::mem::take(&mut self.draining) {
            let counts = match self.kernel.connections(&vk) {
                Ok(c) => c,
                Err(e) if missing(&e) => continue, // the virtual server is gone
                Err(e) => {
                    tracing::warn!(virtual_server = %vk, error = format!("{e:#}"), "reading connection counts");
                    self.draining.insert(vk, list);
                    continue;
                }
            };
            let mut keep = BTreeMap::new();
            for (address, deadline) in list {
                let Some(conns) = counts.get(&address) else {
                    continue; // deleted by someone else
                };
                if *conns > 0 && now < deadline {
                    keep.insert(address, deadline);
                    continue;
                }
                self.calls += 1;
                if let Err(e) = self
                    .kernel
                    .delete_destination(&vk, address)
                    .or_else(ok_if(missing))
                {
                    self.failures += 1;
                    tracing::warn!(virtual_server = %vk, real_server = %address, error = format!("{e:#}"), "deleting a drained real server");
                    keep.insert(address, deadline);
                }
            }
            if !keep.is_empty() {
                self.draining.insert(vk, keep);
            }
        }
    }
}
