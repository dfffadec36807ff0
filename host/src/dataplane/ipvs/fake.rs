//! An in-memory IPVS kernel for unit tests: services, destinations and
//! interface addresses, the kernel's errnos for duplicates and missing
//! objects, a count of every call, and injected failures. Shared through
//! an `Arc` so a test can look inside while the dataplane owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Result, bail};

use super::kernel::{IpvsKernel, RealServer, Timeouts, VirtualKey, VirtualServer};

#[derive(Debug, Default)]
pub struct FakeState {
    pub services: BTreeMap<VirtualKey, (VirtualServer, BTreeMap<SocketAddr, u32>)>,
    pub link: Option<BTreeSet<IpAddr>>,
    pub node_addresses: BTreeSet<IpAddr>,
    /// Calls that change something, and dumps.
    pub changes: usize,
    pub dumps: usize,
    /// Any change touching this virtual server fails with EINVAL.
    pub fail_on: Option<VirtualKey>,
    pub sysctls: BTreeMap<String, String>,
    /// Schedulers the "kernel" has modules for.
    pub schedulers: BTreeSet<String>,
    /// Active + inactive connections of a destination (0 when absent).
    pub connections: BTreeMap<(VirtualKey, SocketAddr), u32>,
    pub timeouts: Timeouts,
}

#[derive(Clone, Default)]
pub struct FakeIpvs(pub Arc<Mutex<FakeState>>);

impl FakeIpvs {
    pub fn new() -> Self {
        let f = Self::default();
        let mut s = f.state();
        s.schedulers = ["rr", "wrr", "lc", "mh", "sh"]
            .into_iter()
            .map(String::from)
            .collect();
        // The kernel's defaults (ipvsadm -l --timeout: 900 120 300).
        s.timeouts = Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        };
        drop(s);
        f
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh counter for "how many calls did this step cost".
    pub fn take_calls(&self) -> (usize, usize) {
        let mut s = self.state();
        let r = (s.changes, s.dumps);
        s.changes = 0;
        s.dumps = 0;
        r
    }
}

fn err(code: i32) -> anyhow::Error {
    io::Error::from_raw_os_error(code).into()
}

impl FakeState {
    fn change(&mut self, key: &VirtualKey) -> Result<()> {
        self.changes += 1;
        if self.fail_on.as_ref() == Some(key) {
            return Err(err(libc::EINVAL));
        }
        Ok(())
    }

    fn check_scheduler(&self, vs: &VirtualServer) -> Result<()> {
        if !self.schedulers.contains(&vs.scheduler) {
            bail!(err(libc::ENOENT));
        }
        Ok(())
    }

    fn dests(&mut self, key: &VirtualKey) -> Result<&mut BTreeMap<SocketAddr, u32>> {
        match self.services.get_mut(key) {
            Some((_, d)) => Ok(d),
            None => Err(err(libc::ESRCH)),
        }
    }
}

impl IpvsKernel for FakeIpvs {
    fn services(&mut self) -> Result<Vec<VirtualServer>> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.services.values().map(|(v, _)| v.clone()).collect())
    }

    fn add_service(&mut self, vs: &VirtualServer) -> Result<()> {
        let mut s = self.state();
        s.change(&vs.key)?;
        s.check_scheduler(vs)?;
        if s.services.contains_key(&vs.key) {
            return Err(err(libc::EEXIST));
        }
        s.services.insert(vs.key, (vs.clone(), BTreeMap::new()));
        Ok(())
    }

    fn update_service(&mut self, vs: &VirtualServer) -> Result<()> {
        let mut s = self.state();
        s.change(&vs.key)?;
        s.check_scheduler(vs)?;
        match s.services.get_mut(&vs.key) {
            Some((v, _)) => *v = vs.clone(),
            None => return Err(err(libc::ESRCH)),
        }
        Ok(())
    }

    fn delete_service(&mut self, key: &VirtualKey) -> Result<()> {
        let mut s = self.state();
        s.change(key)?;
        s.services
            .remove(key)
            .map(drop)
            .ok_or_else(|| err(libc::ESRCH))
    }

    fn destinations(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.dests(key)?
            .iter()
            .map(|(a, w)| RealServer {
                address: *a,
                weight: *w,
            })
            .collect())
    }

    fn add_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()> {
        let mut s = self.state();
        s.change(key)?;
        let d = s.dests(key)?;
        if d.contains_key(&rs.address) {
            return Err(err(libc::EEXIST));
        }
        d.insert(rs.address, rs.weight);
        Ok(())
    }

    fn update_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()> {
        let mut s = self.state();
        s.change(key)?;
        match s.dests(key)?.get_mut(&rs.address) {
            Some(w) => *w = rs.weight,
            None => return Err(err(libc::ENOENT)),
        }
        Ok(())
    }

    fn delete_destination(&mut self, key: &VirtualKey, address: SocketAddr) -> Result<()> {
        let mut s = self.state();
        s.change(key)?;
        s.dests(key)?
            .remove(&address)
            .map(drop)
            .ok_or_else(|| err(libc::ENOENT))
    }

    fn connections(&mut self, key: &VirtualKey) -> Result<BTreeMap<SocketAddr, u32>> {
        let mut s = self.state();
        s.dumps += 1;
        let addresses: Vec<SocketAddr> = s.dests(key)?.keys().copied().collect();
        Ok(addresses
            .into_iter()
            .map(|a| (a, s.connections.get(&(*key, a)).copied().unwrap_or(0)))
            .collect())
    }

    fn timeouts(&mut self) -> Result<Timeouts> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.timeouts)
    }

    fn set_timeouts(&mut self, t: &Timeouts) -> Result<()> {
        let mut s = self.state();
        s.changes += 1;
        s.timeouts = t.over(s.timeouts);
        Ok(())
    }

    fn ensure_link(&mut self) -> Result<()> {
        let mut s = self.state();
        if s.link.is_none() {
            s.changes += 1;
            s.link = Some(BTreeSet::new());
        }
        Ok(())
    }

    fn link_addresses(&mut self) -> Result<BTreeSet<IpAddr>> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.link.clone().unwrap_or_default())
    }

    fn node_addresses(&mut self) -> Result<BTreeSet<IpAddr>> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.node_addresses.clone())
    }

    fn bind(&mut self, ip: IpAddr) -> Result<()> {
        let mut s = self.state();
        s.changes += 1;
        let Some(link) = s.link.as_mut() else {
            return Err(err(libc::ENODEV));
        };
        if !link.insert(ip) {
            return Err(err(libc::EEXIST));
        }
        Ok(())
    }

    fn sysctl(&mut self, name: &str) -> Result<String> {
        self.state()
            .sysctls
            .get(name)
            .cloned()
            .ok_or_else(|| err(libc::ENOENT))
    }

    fn set_sysctl(&mut self, name: &str, value: &str) -> Result<()> {
        self.state().sysctls.insert(name.into(), value.into());
        Ok(())
    }

    fn unbind(&mut self, ip: IpAddr) -> Result<()> {
        let mut s = self.state();
        s.changes += 1;
        let Some(link) = s.link.as_mut() else {
            return Err(err(libc::ENODEV));
        };
        if !link.remove(&ip) {
            return Err(err(libc::EADDRNOTAVAIL));
        }
        Ok(())
    }
}
