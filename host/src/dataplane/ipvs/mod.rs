//! The IPVS dataplane: applies `ipvs-virtual-server` / `ipvs-real-server`
//! items as IPVS services and destinations over generic netlink
//! (`genl`), binds the virtual addresses to the dummy interface
//! `kube-ipvs0` over rtnetlink (`link`), and hands the fragments'
//! nftables items (the packet-filter helpers upstream builds with ipset
//! and iptables) to a composed nftables dataplane (`filter`).
//!
//! - The first apply, and every `resync` (syncPeriod), is a full
//!   reconcile: the kernel's services, destinations and addresses are
//!   listed and brought to the plan with the fewest calls; nothing is
//!   flushed, so a previous instance's virtual servers are adopted with no
//!   gap in service. The host settings (sysctls, strictARP, timeouts) are
//!   applied there too (`settings`).
//! - After that each apply costs calls proportional to what changed: one
//!   call per added, changed or removed service, destination or address.
//! - A real server leaving a TCP virtual server drains at weight 0 until
//!   its connections end (`graceful`).
//! - Ownership: only our own virtual servers are ever deleted. Ours are
//!   those on an address bound to `kube-ipvs0` (the interface is ours) and
//!   those on node addresses (node ports) that we recorded in a file under
//!   /run, which lives exactly as long as the kernel's IPVS tables. Any
//!   other virtual server, and any in `ipvs.excludeCIDRs`, is left alone.
//! - A fragment whose calls fail is refused on its own, its last good
//!   state (IPVS and packet filter) kept as the record; the calls are
//!   idempotent (add of an existing object updates it, delete of a missing
//!   one is done), so the proxier's retry converges, and the next resync
//!   repairs the rest.

pub mod fake;
mod filter;
mod genl;
mod graceful;
mod items;
pub mod kernel;
mod link;
pub(crate) mod netlink;
mod servers;
mod settings;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_filter;
#[cfg(test)]
mod tests_graceful;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::{Applied, Change, Dataplane, FragmentKey, changes};
use crate::model::ServicePortName;
use crate::plan::Fragment;
use filter::Filter;
pub use filter::filter_plan;
pub use graceful::DEFAULT_DRAIN_TIMEOUT;
use graceful::Draining;
use items::{Servers, claimed_twice, describe, owners, parse};
pub use kernel::{IpvsKernel, NetlinkIpvs, RealServer, Timeouts, VirtualKey, VirtualServer};
pub use settings::IpvsSettings;

/// Where node-address virtual servers are recorded as ours.
pub const DEFAULT_RECORD: &str = "/run/kube-wasm-proxy/ipvs-virtual-servers";

pub struct IpvsDataplane {
    kernel: Box<dyn IpvsKernel>,
    /// What is in force, fragment by fragment, parsed.
    applied: BTreeMap<FragmentKey, Servers>,
    /// Which fragment each virtual server belongs to.
    owner: BTreeMap<VirtualKey, FragmentKey>,
    /// Node addresses (not bound to kube-ipvs0), as of the last reconcile.
    node_addresses: BTreeSet<IpAddr>,
    record: Option<PathBuf>,
    recorded: BTreeSet<VirtualKey>,
    needs_full: bool,
    settings: IpvsSettings,
    draining: Draining,
    drain_timeout: Duration,
    /// The packet filter; without one, fragments with nftables items are
    /// refused.
    filter: Option<Filter>,
    /// Netlink changes made and failed, for metrics.
    pub calls: u64,
    pub failures: u64,
}

impl IpvsDataplane {
    /// The real kernel, with the ownership record in /run.
    pub fn new() -> Self {
        Self::with_kernel(Box::new(NetlinkIpvs::new()), Some(DEFAULT_RECORD.into()))
    }

    pub fn with_kernel(kernel: Box<dyn IpvsKernel>, record: Option<PathBuf>) -> Self {
        Self {
            kernel,
            applied: BTreeMap::new(),
            owner: BTreeMap::new(),
            node_addresses: BTreeSet::new(),
            record,
            recorded: BTreeSet::new(),
            needs_full: true,
            settings: IpvsSettings::default(),
            draining: Draining::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            filter: None,
            calls: 0,
            failures: 0,
        }
    }

    /// The host-applied `ipvs` settings (strictARP, timeouts, excludeCIDRs).
    pub fn with_settings(mut self, settings: IpvsSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The dataplane that applies the fragments' nftables items (an
    /// `NftDataplane` on kwp's own table).
    pub fn with_filter(mut self, filter: Box<dyn Dataplane>) -> Self {
        self.filter = Some(Filter::new(filter));
        self
    }

    /// Full reconcile to what is in force (repairs edits behind our back).
    /// Before the first reconcile nothing is known to be in force, and
    /// reconciling to nothing would delete a previous run's state.
    pub fn resync(&mut self) -> Result<()> {
        if self.needs_full {
            return Ok(());
        }
        self.drain();
        let filtered = self.filter.as_mut().map_or(Ok(()), Filter::resync);
        let plan = self.applied.clone();
        let failed = self.reconcile(&plan)?;
        if let Some((vk, e)) = failed.into_iter().next() {
            return Err(e.context(format!("resync of virtual server {vk}")));
        }
        filtered
    }

    fn apply_changes(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        self.drain();
        let mut refused = Vec::new();
        let mut parsed = Vec::new();
        let mut filter_parts = Vec::new();
        for (key, fragment) in changes {
            let (ipvs, nft) = match (fragment, &self.filter) {
                (Some(f), Some(_)) => {
                    let (ipvs, nft) = filter::split(f);
                    (Some(ipvs), Some(nft))
                }
                (f, _) => (f.cloned(), None),
            };
            match ipvs.as_ref().map(parse).transpose() {
                Ok(servers) => {
                    parsed.push((key.clone(), servers));
                    filter_parts.push((key, nft));
                }
                Err(e) if one_by_one => refused.push((key, e)),
                Err(e) => return Err(e.context(describe(&key))),
            }
        }
        // The filter first: a new Service's source ranges and masquerade
        // marks are in place before its virtual servers answer.
        let before = self.filter.as_ref().map(|f| f.applied.clone());
        if let Some(filter) = &mut self.filter {
            for (key, e) in filter.apply(&filter_parts, one_by_one)? {
                parsed.retain(|(k, _)| *k != key);
                refused.push((key, e.context("packet filter")));
            }
        }
        let keys: Vec<FragmentKey> = parsed.iter().map(|(k, _)| k.clone()).collect();
        let ipvs_refused = if !one_by_one {
            self.apply_whole(parsed).map(|()| Vec::new())
        } else if self.needs_full {
            self.full(parsed)
        } else {
            Ok(self.deltas(parsed))
        };
        // A Service whose IPVS part failed gets its filter part back too.
        let undo: Vec<FragmentKey> = match &ipvs_refused {
            Ok(r) => r.iter().map(|(k, _)| k.clone()).collect(),
            Err(_) => keys,
        };
        if let (Some(filter), Some(before)) = (&mut self.filter, &before) {
            filter.restore(&undo, before);
        }
        refused.extend(ipvs_refused?);
        Ok(Applied { refused })
    }

    /// One delta per fragment; a failed one is refused alone.
    fn deltas(
        &mut self,
        parsed: Vec<(FragmentKey, Option<Servers>)>,
    ) -> Vec<(FragmentKey, anyhow::Error)> {
        let mut refused = Vec::new();
        for (key, servers) in parsed {
            if let Err(e) = self.delta(&key, servers) {
                self.failures += 1;
                // The record stays the last good state.
                self.owner = owners(&self.applied).unwrap_or_default();
                refused.push((key, e));
            }
        }
        refused
    }

    /// All or nothing: on any failure the previous state is reconciled back.
    fn apply_whole(&mut self, parsed: Vec<(FragmentKey, Option<Servers>)>) -> Result<()> {
        let before = self.applied.clone();
        let mut next = before.clone();
        for (key, servers) in parsed {
            match servers {
                Some(s) => next.insert(key, s),
                None => next.remove(&key),
            };
        }
        let owners = owners(&next)?;
        let failed = self.reconcile(&next)?;
        if let Some((vk, e)) = failed.into_iter().next() {
            self.failures += 1;
            let _ = self.reconcile(&before);
            return Err(e.context(format!(
                "virtual server {vk}; the previous state was restored"
            )));
        }
        self.applied = next;
        self.owner = owners;
        self.needs_full = false;
        Ok(())
    }

    /// The first apply: a full reconcile of the plan with these changes;
    /// fragments whose virtual servers fail are refused.
    fn full(
        &mut self,
        parsed: Vec<(FragmentKey, Option<Servers>)>,
    ) -> Result<Vec<(FragmentKey, anyhow::Error)>> {
        let mut next = self.applied.clone();
        let mut owner = owners(&next)?;
        let mut refused = Vec::new();
        // Ownership is kept up to date fragment by fragment (a trial copy of
        // the whole plan per fragment made the first sync quadratic: 27 s
        // for 4,000 Services against the in-memory kernel).
        for (key, servers) in parsed {
            if let Some(old) = next.get(&key) {
                for vk in old.keys() {
                    owner.remove(vk);
                }
            }
            let claimed = servers.as_ref().and_then(|s| {
                s.keys()
                    .find_map(|vk| owner.get(vk).map(|other| (*vk, other.clone())))
            });
            if let Some((vk, other)) = claimed {
                // Refused: the fragment's previous servers stay its own.
                if let Some(old) = next.get(&key) {
                    owner.extend(old.keys().map(|vk| (*vk, key.clone())));
                }
                refused.push((key.clone(), claimed_twice(&vk, &other, &key)));
                continue;
            }
            match servers {
                Some(s) => {
                    owner.extend(s.keys().map(|vk| (*vk, key.clone())));
                    next.insert(key, s);
                }
                None => {
                    next.remove(&key);
                }
            }
        }
        let failed = self.reconcile(&next)?;
        for (vk, e) in failed {
            self.failures += 1;
            let Some(key) = owner.get(&vk).cloned() else {
                continue;
            };
            if refused.iter().any(|(k, _)| *k == key) {
                continue;
            }
            // Its last good state stays the record; resync repairs the rest.
            match self.applied.get(&key) {
                Some(old) => next.insert(key.clone(), old.clone()),
                None => next.remove(&key),
            };
            refused.push((key, e));
        }
        self.owner = owners(&next).unwrap_or(owner);
        self.applied = next;
        self.needs_full = false;
        Ok(refused)
    }
}

impl Default for IpvsDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl Dataplane for IpvsDataplane {
    fn apply(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<Applied> {
        self.apply_changes(changes(base, changed), true)
    }

    fn apply_all(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<()> {
        self.apply_changes(changes(base, changed), false).map(drop)
    }

    fn resync(&mut self) -> Result<()> {
        IpvsDataplane::resync(self)
    }
}
