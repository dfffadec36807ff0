//! What the IPVS dataplane needs from the kernel, as a trait: the real
//! one speaks netlink (`NetlinkIpvs`), the fake (`fake::FakeIpvs`) keeps
//! tables in memory for unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};

use super::{genl::IpvsSocket, link::Link};
use crate::model::Protocol;

/// The dummy interface that holds the virtual addresses, as upstream.
pub const LINK_NAME: &str = "kube-ipvs0";

/// A virtual server's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualKey {
    pub address: SocketAddr,
    pub protocol: Protocol,
}

impl fmt::Display for VirtualKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol, self.address)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub key: VirtualKey,
    pub scheduler: String,
    /// Seconds; 0 is not persistent.
    pub persistence_timeout: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RealServer {
    pub address: SocketAddr,
    pub weight: u32,
}

/// IPVS's connection timeouts in seconds (`ipvsadm --set`); 0 means
/// "leave the kernel's value", as upstream's `ipvs.tcpTimeout` etc.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

impl Timeouts {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// `current` with the set (non-zero) values of `self` in place: what the
    /// kernel holds after `set_timeouts(self)`.
    pub fn over(&self, current: Timeouts) -> Timeouts {
        let pick = |mine: u32, theirs: u32| if mine == 0 { theirs } else { mine };
        Timeouts {
            tcp: pick(self.tcp, current.tcp),
            tcp_fin: pick(self.tcp_fin, current.tcp_fin),
            udp: pick(self.udp, current.udp),
        }
    }
}

/// The kernel calls the dataplane makes. Every call is one netlink
/// request (or one dump); errors keep their errno as an `io::Error` in the
/// chain, so callers can tell "exists" and "missing" apart.
pub trait IpvsKernel: Send {
    fn services(&mut self) -> Result<Vec<VirtualServer>>;
    fn add_service(&mut self, vs: &VirtualServer) -> Result<()>;
    fn update_service(&mut self, vs: &VirtualServer) -> Result<()>;
    fn delete_service(&mut self, key: &VirtualKey) -> Result<()>;
    fn destinations(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>>;
    fn add_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()>;
    fn update_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()>;
    fn delete_destination(&mut self, key: &VirtualKey, address: SocketAddr) -> Result<()>;
    /// Active plus inactive connections of each destination of `key` (the
    /// counts upstream's graceful termination waits on).
    fn connections(&mut self, key: &VirtualKey) -> Result<BTreeMap<SocketAddr, u32>>;
    /// IPVS's connection timeouts (IPVS_CMD_GET_CONFIG).
    fn timeouts(&mut self) -> Result<Timeouts>;
    /// Sets the non-zero timeouts of `t`, leaving the others
    /// (IPVS_CMD_SET_CONFIG).
    fn set_timeouts(&mut self, t: &Timeouts) -> Result<()>;
    /// Creates the dummy interface if it is missing.
    fn ensure_link(&mut self) -> Result<()>;
    /// Addresses bound on the dummy interface (none when it is missing).
    fn link_addresses(&mut self) -> Result<BTreeSet<IpAddr>>;
    /// Addresses of every other interface (the node's own).
    fn node_addresses(&mut self) -> Result<BTreeSet<IpAddr>>;
    fn bind(&mut self, ip: IpAddr) -> Result<()>;
    fn unbind(&mut self, ip: IpAddr) -> Result<()>;
    /// Reads a sysctl ("net/ipv4/vs/conntrack"), trimmed.
    fn sysctl(&mut self, name: &str) -> Result<String>;
    fn set_sysctl(&mut self, name: &str, value: &str) -> Result<()>;
}

/// The errno in `e`'s chain, if it came from the kernel.
pub fn errno(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error)
}

pub fn exists(e: &anyhow::Error) -> bool {
    errno(e) == Some(libc::EEXIST)
}

/// IPVS says ESRCH for a missing service, ENOENT for a missing destination,
/// EADDRNOTAVAIL for a missing address.
pub fn missing(e: &anyhow::Error) -> bool {
    matches!(
        errno(e),
        Some(libc::ESRCH | libc::ENOENT | libc::EADDRNOTAVAIL | libc::ENODEV)
    )
}

/// The real kernel, over generic netlink and rtnetlink.
pub struct NetlinkIpvs {
    ipvs: Option<IpvsSocket>,
    link: Option<Link>,
}

impl NetlinkIpvs {
    /// Sockets open lazily, so a proxy started before `ip_vs` is loaded
    /// says what is missing at its first sync, and retries.
    pub fn new() -> Self {
        Self {
            ipvs: None,
            link: None,
        }
    }

    fn ipvs(&mut self) -> Result<&mut IpvsSocket> {
        if self.ipvs.is_none() {
            self.ipvs = Some(IpvsSocket::open()?);
        }
        self.ipvs.as_mut().context("IPVS socket")
    }

    fn link(&mut self) -> Result<&mut Link> {
        if self.link.is_none() {
            self.link = Some(Link::open(LINK_NAME).context("rtnetlink socket")?);
        }
        self.link.as_mut().context("rtnetlink socket")
    }
}

impl Default for NetlinkIpvs {
    fn default() -> Self {
        Self::new()
    }
}

impl IpvsKernel for NetlinkIpvs {
    fn services(&mut self) -> Result<Vec<VirtualServer>> {
        self.ipvs()?.services()
    }
    fn add_service(&mut self, vs: &VirtualServer) -> Result<()> {
        self.ipvs()?.set_service(vs, true)
    }
    fn update_service(&mut self, vs: &VirtualServer) -> Result<()> {
        self.ipvs()?.set_service(vs, false)
    }
    fn delete_service(&mut self, key: &VirtualKey) -> Result<()> {
        self.ipvs()?.delete_service(key)
    }
    fn destinations(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>> {
        self.ipvs()?.destinations(key)
    }
    fn add_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()> {
        self.ipvs()?.set_destination(key, rs, true)
    }
    fn update_destination(&mut self, key: &VirtualKey, rs: &RealServer) -> Result<()> {
        self.ipvs()?.set_destination(key, rs, false)
    }
    fn delete_destination(&mut self, key: &VirtualKey, address: SocketAddr) -> Result<()> {
        self.ipvs()?.delete_destination(key, address)
    }
    fn connections(&mut self, key: &VirtualKey) -> Result<BTreeMap<SocketAddr, u32>> {
        self.ipvs()?.connections(key)
    }
    fn timeouts(&mut self) -> Result<Timeouts> {
        self.ipvs()?.timeouts()
    }
    fn set_timeouts(&mut self, t: &Timeouts) -> Result<()> {
        self.ipvs()?.set_timeouts(t)
    }
    fn ensure_link(&mut self) -> Result<()> {
        self.link()?.ensure()
    }
    fn link_addresses(&mut self) -> Result<BTreeSet<IpAddr>> {
        Ok(self.link()?.addresses()?.0)
    }
    fn node_addresses(&mut self) -> Result<BTreeSet<IpAddr>> {
        Ok(self.link()?.addresses()?.1)
    }
    fn bind(&mut self, ip: IpAddr) -> Result<()> {
        self.link()?.bind(ip)
    }
    fn unbind(&mut self, ip: IpAddr) -> Result<()> {
        self.link()?.unbind(ip)
    }
    fn sysctl(&mut self, name: &str) -> Result<String> {
        let path = format!("/proc/sys/{name}");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string())
    }
    fn set_sysctl(&mut self, name: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{name}");
        std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
    }
}
