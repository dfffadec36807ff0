//! Virtual servers, real servers and `kube-ipvs0` addresses: the full
//! reconcile against what the kernel lists, and the per-fragment delta
//! with calls for exactly what differs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};

use super::FragmentKey;
use super::IpvsDataplane;
use super::items::{Desired, Servers, describe, read_record};
use super::kernel::{RealServer, VirtualKey, VirtualServer, exists, missing};

impl IpvsDataplane {
    /// Brings the kernel to `plan`; returns the virtual servers whose calls
    /// failed (the rest are in force). `Err` when the kernel cannot even be
    /// listed.
    pub(super) fn reconcile(
        &mut self,
        plan: &BTreeMap<FragmentKey, Servers>,
    ) -> Result<Vec<(VirtualKey, anyhow::Error)>> {
        self.kernel.ensure_link().context("kube-ipvs0")?;
        self.apply_host_settings();
        let in_kernel: BTreeMap<VirtualKey, VirtualServer> = self
            .kernel
            .services()?
            .into_iter()
            .map(|v| (v.key, v))
            .collect();
        let bound = self.kernel.link_addresses()?;
        self.node_addresses = self.kernel.node_addresses()?;
        self.recorded = read_record(self.record.as_ref());
        let wanted: Servers = plan.values().flat_map(|s| s.clone()).collect();
        let mut failed = Vec::new();
        // Addresses first, so a new virtual server answers at once.
        let want_bound: BTreeSet<IpAddr> = wanted
            .keys()
            .map(|k| k.address.ip())
            .filter(|ip| !self.node_addresses.contains(ip))
            .collect();
        for ip in want_bound.difference(&bound) {
            if let Err(e) = self.kernel.bind(*ip).or_else(ok_if(exists)) {
                self.failures += 1;
                tracing::warn!(%ip, error = format!("{e:#}"), "binding a virtual address");
            }
        }
        for (vk, d) in &wanted {
            let current = in_kernel.get(vk);
            if let Err(e) = self.converge(d, current) {
                failed.push((*vk, e));
            }
        }
        for vk in in_kernel.keys().filter(|k| !wanted.contains_key(k)) {
            let ours = bound.contains(&vk.address.ip()) || self.recorded.contains(vk);
            // ipvs.excludeCIDRs: never cleaned up, as upstream.
            if !ours || self.settings.excluded(vk.address.ip()) {
                continue; // someone else's virtual server
            }
            self.calls += 1;
            match self.kernel.delete_service(vk).or_else(ok_if(missing)) {
                Ok(()) => {
                    self.draining.remove(vk);
                }
                Err(e) => failed.push((*vk, e)),
            }
        }
        for ip in bound.difference(&want_bound) {
            self.calls += 1;
            if let Err(e) = self.kernel.unbind(*ip).or_else(ok_if(missing)) {
                tracing::warn!(%ip, error = format!("{e:#}"), "unbinding a virtual address");
            }
        }
        self.write_record(&wanted);
        Ok(failed)
    }

    /// One virtual server to `d`, from what the kernel holds.
    fn converge(&mut self, d: &Desired, current: Option<&VirtualServer>) -> Result<()> {
        let reals = match current {
            None => {
                self.add_service(&d.vs)?;
                BTreeMap::new()
            }
            Some(cur) => {
                if *cur != d.vs {
                    self.update_service(&d.vs)?;
                }
                self.kernel
                    .destinations(&d.vs.key)?
                    .into_iter()
                    .map(|r| (r.address, r.weight))
                    .collect()
            }
        };
        // Draining servers the kernel no longer has are done.
        if let Some(list) = self.draining.get_mut(&d.vs.key) {
            list.retain(|a, _| reals.contains_key(a));
        }
        self.converge_reals(&d.vs.key, &reals, &d.reals)
    }

    /// Real servers of `vk` from `from` to `to`. Servers leaving go through
    /// graceful termination (`retire`); draining ones stay at weight 0 and
    /// come back at once if `to` wants them again.
    pub(super) fn converge_reals(
        &mut self,
        vk: &VirtualKey,
        from: &BTreeMap<SocketAddr, u32>,
        to: &BTreeMap<SocketAddr, u32>,
    ) -> Result<()> {
        let mut from = from.clone();
        let mut to = to.clone();
        if let Some(list) = self.draining.get_mut(vk) {
            for a in list.keys() {
                from.entry(*a).or_insert(0);
            }
            list.retain(|a, _| !to.contains_key(a));
            for a in list.keys() {
                to.insert(*a, 0);
            }
            if list.is_empty() {
                self.draining.remove(vk);
            }
        }
        for (address, weight) in &to {
            let rs = RealServer {
                address: *address,
                weight: *weight,
            };
            match from.get(address) {
                Some(w) if w == weight => {}
                Some(_) => self.update_dest(vk, &rs)?,
                None => self.add_dest(vk, &rs)?,
            }
        }
        let leaving: Vec<(SocketAddr, u32)> = from
            .iter()
            .filter(|(a, _)| !to.contains_key(a))
            .map(|(a, w)| (*a, *w))
            .collect();
        self.retire(vk, &leaving)
    }

    pub(super) fn add_service(&mut self, vs: &VirtualServer) -> Result<()> {
        self.calls += 1;
        match self.kernel.add_service(vs) {
            Err(e) if exists(&e) => self.update_service(vs),
            r => r,
        }
    }

    fn update_service(&mut self, vs: &VirtualServer) -> Result<()> {
        self.calls += 1;
        match self.kernel.update_service(vs) {
            Err(e) if missing(&e) => self.add_service(vs),
            r => r,
        }
    }

    fn add_dest(&mut self, vk: &VirtualKey, rs: &RealServer) -> Result<()> {
        self.calls += 1;
        match self.kernel.add_destination(vk, rs) {
            Err(e) if exists(&e) => {
                self.calls += 1;
                self.kernel.update_destination(vk, rs)
            }
            r => r,
        }
    }

    pub(super) fn update_dest(&mut self, vk: &VirtualKey, rs: &RealServer) -> Result<()> {
        self.calls += 1;
        match self.kernel.update_destination(vk, rs) {
            Err(e) if missing(&e) => {
                self.calls += 1;
                self.kernel.add_destination(vk, rs)
            }
            r => r,
        }
    }

    /// One fragment's change, with calls for exactly what differs.
    pub(super) fn delta(&mut self, key: &FragmentKey, servers: Option<Servers>) -> Result<()> {
        let new = servers.unwrap_or_default();
        for vk in new.keys() {
            if let Some(other) = self.owner.get(vk).filter(|o| *o != key) {
                bail!(
                    "virtual server {vk} is already programmed for {}",
                    describe(other)
                );
            }
        }
        let old = self.applied.get(key).cloned().unwrap_or_default();
        // Virtual servers on `ip`: keys order by address, so they are one range.
        let users = |me: &Self, ip: IpAddr| {
            let first = VirtualKey {
                address: SocketAddr::new(ip, 0),
                protocol: crate::model::Protocol::Tcp,
            };
            me.owner
                .range(first..)
                .take_while(|(k, _)| k.address.ip() == ip)
                .count()
        };
        for (vk, d) in &new {
            let ip = vk.address.ip();
            if users(self, ip) == 0 && !self.node_addresses.contains(&ip) {
                self.calls += 1;
                self.kernel.bind(ip).or_else(ok_if(exists))?;
            }
            match old.get(vk) {
                None => {
                    self.add_service(&d.vs)?;
                    self.converge_reals(vk, &BTreeMap::new(), &d.reals)?;
                }
                Some(o) => {
                    if o.vs != d.vs {
                        self.update_service(&d.vs)?;
                    }
                    self.converge_reals(vk, &o.reals, &d.reals)?;
                }
            }
            self.owner.insert(*vk, key.clone());
        }
        for vk in old.keys().filter(|k| !new.contains_key(k)) {
            self.calls += 1;
            self.kernel.delete_service(vk).or_else(ok_if(missing))?;
            self.draining.remove(vk);
            self.owner.remove(vk);
            let ip = vk.address.ip();
            if users(self, ip) == 0 && !self.node_addresses.contains(&ip) {
                self.calls += 1;
                self.kernel.unbind(ip).or_else(ok_if(missing))?;
            }
        }
        let on_node = |s: &Servers| {
            s.keys()
                .any(|k| self.node_addresses.contains(&k.address.ip()))
        };
        let record_changed = on_node(&old) || on_node(&new);
        if new.is_empty() {
            self.applied.remove(key);
        } else {
            self.applied.insert(key.clone(), new);
        }
        if record_changed {
            let wanted: Servers = self.applied.values().flat_map(|s| s.clone()).collect();
            self.write_record(&wanted);
        }
        Ok(())
    }

    /// Records the virtual servers on node addresses as ours.
    fn write_record(&mut self, wanted: &Servers) {
        let Some(path) = &self.record else { return };
        let keys: BTreeSet<VirtualKey> = wanted
            .keys()
            .filter(|k| self.node_addresses.contains(&k.address.ip()))
            .copied()
            .collect();
        if keys == self.recorded {
            return;
        }
        let text: String = keys
            .iter()
            .map(|k| format!("{} {}\n", k.protocol, k.address))
            .collect();
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, text));
        match written {
            Ok(()) => self.recorded = keys,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "writing the IPVS ownership record")
            }
        }
    }
}

pub(super) fn ok_if(pred: fn(&anyhow::Error) -> bool) -> impl Fn(anyhow::Error) -> Result<()> {
    move |e| if pred(&e) { Ok(()) } else { Err(e) }
}
