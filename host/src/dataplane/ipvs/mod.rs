//! The IPVS dataplane: applies `ipvs-virtual-server` / `ipvs-real-server`
//! items as IPVS services and destinations over generic netlink
//! (`genl`), and binds the virtual addresses to the dummy interface
//! `kube-ipvs0` over rtnetlink (`link`).
//!
//! - The first apply, and every `resync` (syncPeriod), is a full
//!   reconcile: the kernel's services, destinations and addresses are
//!   listed and brought to the plan with the fewest calls; nothing is
//!   flushed, so a previous instance's virtual servers are adopted with no
//!   gap in service.
//! - After that each apply costs calls proportional to what changed: one
//!   call per added, changed or removed service, destination or address.
//! - Ownership: only our own virtual servers are ever deleted. Ours are
//!   those on an address bound to `kube-ipvs0` (the interface is ours) and
//!   those on node addresses (node ports) that we recorded in a file under
//!   /run, which lives exactly as long as the kernel's IPVS tables. Any
//!   other virtual server is left alone.
//! - A fragment whose calls fail is refused on its own, its last good
//!   state kept as the record; the calls are idempotent (add of an
//!   existing object updates it, delete of a missing one is done), so the
//!   proxier's retry converges, and the next resync repairs the rest.

pub mod fake;
mod genl;
pub mod kernel;
mod link;
pub(crate) mod netlink;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};

use super::{Applied, Change, Dataplane, FragmentKey, changes};
use crate::model::ServicePortName;
use crate::plan::{Fragment, Item};
pub use kernel::{IpvsKernel, NetlinkIpvs, RealServer, VirtualKey, VirtualServer};
use kernel::{exists, missing};

/// Where node-address virtual servers are recorded as ours.
pub const DEFAULT_RECORD: &str = "/run/kube-wasm-proxy/ipvs-virtual-servers";

/// One virtual server as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Desired {
    vs: VirtualServer,
    reals: BTreeMap<SocketAddr, u32>,
}

type Servers = BTreeMap<VirtualKey, Desired>;

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
            calls: 0,
            failures: 0,
        }
    }

    /// Full reconcile to what is in force (repairs edits behind our back).
    /// Before the first reconcile nothing is known to be in force, and
    /// reconciling to nothing would delete a previous run's state.
    pub fn resync(&mut self) -> Result<()> {
        if self.needs_full {
            return Ok(());
        }
        let plan = self.applied.clone();
        let failed = self.reconcile(&plan)?;
        match failed.into_iter().next() {
            Some((vk, e)) => Err(e.context(format!("resync of virtual server {vk}"))),
            None => Ok(()),
        }
    }

    fn apply_changes(&mut self, changes: Vec<Change<'_>>, one_by_one: bool) -> Result<Applied> {
        let mut refused = Vec::new();
        let mut parsed = Vec::new();
        for (key, fragment) in changes {
            match fragment.map(parse).transpose() {
                Ok(servers) => parsed.push((key, servers)),
                Err(e) if one_by_one => refused.push((key, e)),
                Err(e) => return Err(e.context(describe(&key))),
            }
        }
        if !one_by_one {
            return self.apply_whole(parsed).map(|()| Applied::all());
        }
        if self.needs_full {
            refused.extend(self.full(parsed)?);
        } else {
            for (key, servers) in parsed {
                if let Err(e) = self.delta(&key, servers) {
                    self.failures += 1;
                    // The record stays the last good state.
                    self.owner = owners(&self.applied).unwrap_or_default();
                    refused.push((key, e));
                }
            }
        }
        Ok(Applied { refused })
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
        let mut refused = Vec::new();
        for (key, servers) in parsed {
            let mut trial = next.clone();
            match servers {
                Some(s) => trial.insert(key.clone(), s),
                None => trial.remove(&key),
            };
            match owners(&trial) {
                Ok(_) => next = trial,
                Err(e) => refused.push((key, e)),
            }
        }
        let failed = self.reconcile(&next)?;
        let owner = owners(&next)?;
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

    /// Brings the kernel to `plan`; returns the virtual servers whose calls
    /// failed (the rest are in force). `Err` when the kernel cannot even be
    /// listed.
    fn reconcile(
        &mut self,
        plan: &BTreeMap<FragmentKey, Servers>,
    ) -> Result<Vec<(VirtualKey, anyhow::Error)>> {
        self.kernel.ensure_link().context("kube-ipvs0")?;
        self.set_sysctls();
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
            if !ours {
                continue; // someone else's virtual server
            }
            self.calls += 1;
            if let Err(e) = self.kernel.delete_service(vk).or_else(ok_if(missing)) {
                failed.push((*vk, e));
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

    /// The sysctls upstream's IPVS mode sets; a failure is logged, not
    /// fatal (a read-only /proc/sys in a test, say), and retried at the
    /// next reconcile.
    fn set_sysctls(&mut self) {
        let mut wanted = vec![
            // Connections of a removed real server are dropped, not kept.
            ("net/ipv4/vs/expire_nodest_conn", "1"),
            // Persistence templates of a weight-0 server expire.
            ("net/ipv4/vs/expire_quiescent_template", "1"),
            // IPVS connections are visible to conntrack (masquerade).
            ("net/ipv4/vs/conntrack", "1"),
            ("net/ipv4/ip_forward", "1"),
        ];
        // Before 5.9 a reused source port skipped the scheduler for 1 s.
        let release = self.kernel.sysctl("kernel/osrelease").unwrap_or_default();
        if kernel_before(&release, (5, 9)) {
            wanted.push(("net/ipv4/vs/conn_reuse_mode", "0"));
        }
        for (name, value) in wanted {
            if self.kernel.sysctl(name).ok().as_deref() == Some(value) {
                continue;
            }
            if let Err(e) = self.kernel.set_sysctl(name, value) {
                tracing::warn!(
                    sysctl = name,
                    error = format!("{e:#}"),
                    "setting an IPVS sysctl"
                );
            }
        }
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
        self.converge_reals(&d.vs.key, &reals, &d.reals)
    }

    fn converge_reals(
        &mut self,
        vk: &VirtualKey,
        from: &BTreeMap<SocketAddr, u32>,
        to: &BTreeMap<SocketAddr, u32>,
    ) -> Result<()> {
        for (address, weight) in to {
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
        for address in from.keys().filter(|a| !to.contains_key(a)) {
            self.calls += 1;
            self.kernel
                .delete_destination(vk, *address)
                .or_else(ok_if(missing))?;
        }
        Ok(())
    }

    fn add_service(&mut self, vs: &VirtualServer) -> Result<()> {
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

    fn update_dest(&mut self, vk: &VirtualKey, rs: &RealServer) -> Result<()> {
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
    fn delta(&mut self, key: &FragmentKey, servers: Option<Servers>) -> Result<()> {
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
        let users =
            |me: &Self, ip: IpAddr| me.owner.keys().filter(|k| k.address.ip() == ip).count();
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

impl Default for IpvsDataplane {
    fn default() -> Self {
        Self::new()
    }
}

fn ok_if(pred: fn(&anyhow::Error) -> bool) -> impl Fn(anyhow::Error) -> Result<()> {
    move |e| if pred(&e) { Ok(()) } else { Err(e) }
}

/// `release` ("6.1.0-57-cloud-amd64") is older than `(major, minor)`;
/// unparsable counts as new.
fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let m = parts.next().and_then(|p| p.parse::<u32>().ok());
    let n = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (m, n) {
        (Some(m), Some(n)) => (m, n) < (major, minor),
        _ => false,
    }
}

fn read_record(path: Option<&PathBuf>) -> BTreeSet<VirtualKey> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let (proto, addr) = l.split_once(' ')?;
            Some(VirtualKey {
                protocol: proto.to_uppercase().parse().ok()?,
                address: addr.parse().ok()?,
            })
        })
        .collect()
}

fn describe(key: &FragmentKey) -> String {
    match key {
        Some(name) => format!("service {name}"),
        None => "the node-wide base".into(),
    }
}

/// Which fragment owns each virtual server; two fragments claiming one
/// virtual server is an error naming both.
fn owners(plan: &BTreeMap<FragmentKey, Servers>) -> Result<BTreeMap<VirtualKey, FragmentKey>> {
    let mut owner = BTreeMap::new();
    for (key, servers) in plan {
        for vk in servers.keys() {
            if let Some(other) = owner.insert(*vk, key.clone()) {
                bail!(
                    "virtual server {vk} is claimed by both {} and {}",
                    describe(&other),
                    describe(key)
                );
            }
        }
    }
    Ok(owner)
}

/// The IPVS items of a fragment as virtual servers with their reals.
fn parse(fragment: &Fragment) -> Result<Servers> {
    let mut servers = Servers::new();
    for item in fragment.items.iter() {
        if let Item::IpvsVirtualServer {
            address,
            protocol,
            scheduler,
            persistence_timeout,
        } = item
        {
            let key = VirtualKey {
                address: *address,
                protocol: *protocol,
            };
            let vs = VirtualServer {
                key,
                scheduler: scheduler.clone(),
                persistence_timeout: *persistence_timeout,
            };
            let reals = BTreeMap::new();
            if servers.insert(key, Desired { vs, reals }).is_some() {
                bail!("virtual server {key} appears twice");
            }
        }
    }
    for item in fragment.items.iter() {
        match item {
            Item::IpvsVirtualServer { .. } => {}
            Item::IpvsRealServer {
                virtual_address,
                protocol,
                address,
                weight,
            } => {
                let key = VirtualKey {
                    address: *virtual_address,
                    protocol: *protocol,
                };
                let d = servers.get_mut(&key).ok_or_else(|| {
                    anyhow!("real server {address} names unknown virtual server {key}")
                })?;
                if address.is_ipv4() != virtual_address.is_ipv4() {
                    bail!("real server {address} is not of {key}'s family");
                }
                d.reals.insert(*address, *weight);
            }
            other => bail!(
                "the IPVS dataplane cannot apply {}",
                other.to_string().trim()
            ),
        }
    }
    Ok(servers)
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
