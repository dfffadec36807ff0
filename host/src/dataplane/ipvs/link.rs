//! The dummy interface `kube-ipvs0` and its addresses, over rtnetlink.
//! As upstream, the interface stays down: the kernel still adds a local
//! route for each address (so IPVS sees the packets), but the node never
//! answers ARP for them on a real link.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context, Result};

use super::netlink::{
    Attrs, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, Socket, attrs, family, get_ip, get_u32,
    ip_bytes,
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// IPv6 addresses skip duplicate detection, or they would stay tentative
/// on a down interface.
const IFA_F_NODAD: u8 = 0x02;

pub struct Link {
    sock: Socket,
    name: String,
    index: Option<u32>,
}

impl Link {
    pub fn open(name: &str) -> Result<Self> {
        Ok(Self {
            sock: Socket::open(libc::NETLINK_ROUTE)?,
            name: name.into(),
            index: None,
        })
    }

    /// The interface's index, `None` when it does not exist.
    fn lookup(&mut self) -> Result<Option<u32>> {
        let mut a = Attrs::default();
        a.str(IFLA_IFNAME, &self.name);
        let mut payload = ifinfomsg();
        payload.extend_from_slice(&a.0);
        match self.sock.request(RTM_GETLINK, NLM_F_ACK, &payload) {
            Ok(replies) => Ok(replies
                .first()
                .and_then(|r| r.get(4..8))
                .and_then(get_u32)
                .filter(|i| *i > 0)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up {}", self.name)),
        }
    }

    pub fn ensure(&mut self) -> Result<()> {
        if let Some(i) = self.lookup()? {
            self.index = Some(i);
            return Ok(());
        }
        let mut kind = Attrs::default();
        kind.str(IFLA_INFO_KIND, "dummy");
        let mut a = Attrs::default();
        a.str(IFLA_IFNAME, &self.name).nested(IFLA_LINKINFO, kind);
        let mut payload = ifinfomsg();
        payload.extend_from_slice(&a.0);
        match self
            .sock
            .request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &payload)
        {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "creating dummy interface {} (is the dummy module available?)",
                        self.name
                    )
                });
            }
        }
        tracing::info!(link = %self.name, "created the IPVS dummy interface");
        self.index = self.lookup()?;
        self.index
            .map(drop)
            .with_context(|| format!("{} missing right after its creation", self.name))
    }

    /// (addresses on this interface, addresses on every other one).
    pub fn addresses(&mut self) -> Result<(BTreeSet<IpAddr>, BTreeSet<IpAddr>)> {
        self.index = self.lookup()?;
        let replies = self
            .sock
            .request(RTM_GETADDR, NLM_F_DUMP, &[0u8; 8])
            .context("address dump")?;
        let (mut own, mut others) = (BTreeSet::new(), BTreeSet::new());
        for r in &replies {
            let Some(index) = r.get(4..8).and_then(get_u32) else {
                continue;
            };
            let af = r[0] as u16;
            let mut addr = None;
            for (k, v) in attrs(r.get(8..).unwrap_or_default()) {
                // IFA_LOCAL is the address itself where both are present.
                if k == IFA_LOCAL || (k == IFA_ADDRESS && addr.is_none()) {
                    addr = get_ip(af, v);
                }
            }
            if let Some(ip) = addr {
                if Some(index) == self.index {
                    own.insert(ip);
                } else {
                    others.insert(ip);
                }
            }
        }
        Ok((own, others))
    }

    fn address_request(&mut self, kind: u16, flags: u16, ip: IpAddr) -> Result<()> {
        let index = match self.index {
            Some(i) => i,
            None => self
                .lookup()?
                .with_context(|| format!("{} does not exist", self.name))?,
        };
        self.index = Some(index);
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let fl = if ip.is_ipv4() { 0 } else { IFA_F_NODAD };
        let mut payload = vec![family(ip) as u8, prefix, fl, 0];
        payload.extend_from_slice(&index.to_ne_bytes());
        let mut a = Attrs::default();
        a.put(IFA_LOCAL, &ip_bytes(ip))
            .put(IFA_ADDRESS, &ip_bytes(ip));
        payload.extend_from_slice(&a.0);
        let r = self.sock.request(kind, flags, &payload);
        if r.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENODEV))
        {
            self.index = None;
        }
        r.map(drop).map_err(Into::into)
    }

    pub fn bind(&mut self, ip: IpAddr) -> Result<()> {
        self.address_request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, ip)
            .with_context(|| format!("binding {ip} to {}", self.name))
    }

    pub fn unbind(&mut self, ip: IpAddr) -> Result<()> {
        self.address_request(RTM_DELADDR, NLM_F_ACK, ip)
            .with_context(|| format!("unbinding {ip} from {}", self.name))
    }
}

/// An empty `struct ifinfomsg` (AF_UNSPEC, any index).
fn ifinfomsg() -> Vec<u8> {
    vec![0u8; 16]
}
