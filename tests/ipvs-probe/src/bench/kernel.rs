//! What the kernel itself shows, per mode: the benchmark decides that a
//! sync is done from these reads, never from the proxy's logs.
//!
//! - IPVS mode: the virtual servers and their real servers over generic
//!   netlink (the host's own codec), the addresses of `kube-ipvs0` over
//!   rtnetlink.
//! - nftables mode: elements of kwp's nf_tables maps over nfnetlink: a dump
//!   counts them, a keyed get reads one Service's backends. A fast-path
//!   Service is `service-ips` (frontend -> `goto class-5`) plus five
//!   `backends-5` elements (frontend . slot -> endpoint . port),
//!   docs/nftables.md.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};

use crate::dataplane::ipvs::kernel::{IpvsKernel, NetlinkIpvs, VirtualKey};
use crate::dataplane::ipvs::netlink::{Attrs, NLM_F_DUMP, Socket, attrs};
use crate::model::Protocol;

use super::objects::{ENDPOINTS, PORT, cluster_ip};

/// kwp's nf_tables table (both modes; IPVS mode keeps its packet-filter
/// helpers there).
const TABLE: &str = "kube-wasm-proxy";
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFPROTO_IPV4: u8 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const IPPROTO_TCP: u8 = 6;

/// One mode's view of the kernel.
pub trait Kernel {
    /// Whether every one of the `n` Services is programmed. Called in a
    /// loop while the proxy syncs, so it rechecks only what it has not
    /// seen complete yet.
    fn all_programmed(&mut self, n: usize) -> Result<bool>;
    /// The endpoint addresses the kernel sends Service `s` to.
    fn endpoints(&mut self, s: usize) -> Result<BTreeSet<Ipv4Addr>>;
    /// A complete recount, after the timed part: (what, found, wanted).
    fn recount(&mut self, n: usize) -> Result<Vec<(String, usize, usize)>>;
}

fn key(s: usize) -> VirtualKey {
    VirtualKey {
        address: SocketAddr::new(cluster_ip(s).into(), PORT),
        protocol: Protocol::Tcp,
    }
}

fn v4(a: SocketAddr) -> Option<Ipv4Addr> {
    match a.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    }
}

pub struct Ipvs {
    k: NetlinkIpvs,
    /// Services not yet seen with all their real servers.
    pending: Option<BTreeSet<usize>>,
    filter: Nft,
}

impl Ipvs {
    pub fn new() -> Result<Self> {
        Ok(Self {
            k: NetlinkIpvs::new(),
            pending: None,
            filter: Nft::new()?,
        })
    }
}

impl Kernel for Ipvs {
    fn all_programmed(&mut self, n: usize) -> Result<bool> {
        let pending = self.pending.get_or_insert_with(|| (0..n).collect());
        if !pending.is_empty() {
            let listed: BTreeSet<VirtualKey> =
                self.k.services()?.into_iter().map(|v| v.key).collect();
            let present: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|s| listed.contains(&key(*s)))
                .collect();
            for s in present {
                // Destinations once their service is listed; a server is
                // done when all its real servers are there (it only grows
                // during the full sync).
                if self.k.destinations(&key(s))?.len() == ENDPOINTS {
                    pending.remove(&s);
                }
            }
        }
        if !pending.is_empty() {
            return Ok(false);
        }
        // Without its address on kube-ipvs0 a virtual server gets no
        // packet from the node; kwp binds addresses first, so this is
        // normally true at the first look.
        let bound = self.k.link_addresses()?;
        Ok((0..n).all(|s| bound.contains(&cluster_ip(s).into())))
    }

    fn endpoints(&mut self, s: usize) -> Result<BTreeSet<Ipv4Addr>> {
        Ok(self
            .k
            .destinations(&key(s))?
            .into_iter()
            .filter(|r| r.weight > 0)
            .filter_map(|r| v4(r.address))
            .collect())
    }

    fn recount(&mut self, n: usize) -> Result<Vec<(String, usize, usize)>> {
        let services = self.k.services()?;
        let mut reals = 0;
        for v in &services {
            reals += self.k.destinations(&v.key)?.len();
        }
        Ok(vec![
            ("IPVS virtual servers".into(), services.len(), n),
            ("IPVS real servers".into(), reals, n * ENDPOINTS),
            (
                "kube-ipvs0 addresses".into(),
                self.k.link_addresses()?.len(),
                n,
            ),
            (
                "nft set cluster-ips (packet filter)".into(),
                self.filter.count("cluster-ips")?,
                n,
            ),
        ])
    }
}

pub struct Nft {
    sock: Socket,
}

impl Nft {
    pub fn new() -> Result<Self> {
        Ok(Self {
            sock: Socket::open(libc::NETLINK_NETFILTER).context("nfnetlink socket")?,
        })
    }

    fn request(&mut self, flags: u16, a: Attrs) -> io::Result<Vec<Vec<u8>>> {
        // nfgenmsg: family, version 0, resource id 0.
        let mut payload = vec![NFPROTO_IPV4, 0, 0, 0];
        payload.extend_from_slice(&a.0);
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM;
        self.sock.request(kind, flags, &payload)
    }

    /// Elements of set or map `set` (0 while it does not exist).
    pub fn count(&mut self, set: &str) -> Result<usize> {
        let mut a = Attrs::default();
        a.str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
            .str(NFTA_SET_ELEM_LIST_SET, set);
        let replies = match self.request(NLM_F_DUMP, a) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
            r => r.with_context(|| format!("dumping {set}"))?,
        };
        Ok(replies
            .iter()
            .flat_map(|r| attrs(r.get(4..).unwrap_or_default()))
            .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
            .map(|(_, list)| attrs(list).filter(|(k, _)| *k == NFTA_LIST_ELEM).count())
            .sum())
    }

    /// The value `backends-5` maps `frontend . slot` to (`None`: no such
    /// element).
    fn backend(&mut self, s: usize, slot: u32) -> Result<Option<Ipv4Addr>> {
        let mut k = cluster_ip(s).octets().to_vec();
        // Each field of a concatenation fills whole 4-byte registers:
        // protocol (1 byte), port (2 bytes, network order), then the
        // numgen slot in host order.
        k.extend_from_slice(&[IPPROTO_TCP, 0, 0, 0]);
        k.extend_from_slice(&PORT.to_be_bytes());
        k.extend_from_slice(&[0, 0]);
        k.extend_from_slice(&slot.to_ne_bytes());
        let mut value = Attrs::default();
        value.put(NFTA_DATA_VALUE, &k);
        let mut elem = Attrs::default();
        elem.nested(NFTA_SET_ELEM_KEY, value);
        let mut list = Attrs::default();
        list.nested(NFTA_LIST_ELEM, elem);
        let mut a = Attrs::default();
        a.str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
            .str(NFTA_SET_ELEM_LIST_SET, &format!("backends-{ENDPOINTS}"))
            .nested(NFTA_SET_ELEM_LIST_ELEMENTS, list);
        let replies = match self.request(0, a) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            r => r.with_context(|| format!("getting backend {slot} of service {s}"))?,
        };
        let data = replies
            .iter()
            .flat_map(|r| attrs(r.get(4..).unwrap_or_default()))
            .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
            .flat_map(|(_, list)| attrs(list))
            .flat_map(|(_, elem)| attrs(elem))
            .filter(|(k, _)| *k == NFTA_SET_ELEM_DATA)
            .flat_map(|(_, data)| attrs(data))
            .find(|(k, _)| *k == NFTA_DATA_VALUE)
            .and_then(|(_, v)| <[u8; 4]>::try_from(v.get(0..4)?).ok());
        Ok(data.map(Ipv4Addr::from))
    }
}

impl Kernel for Nft {
    fn all_programmed(&mut self, n: usize) -> Result<bool> {
        // The full sync is one nft transaction, so the frontends are
        // counted first (the smaller map) and the backends only then.
        Ok(self.count("service-ips")? == n
            && self.count(&format!("backends-{ENDPOINTS}"))? == n * ENDPOINTS)
    }

    fn endpoints(&mut self, s: usize) -> Result<BTreeSet<Ipv4Addr>> {
        let mut out = BTreeSet::new();
        for slot in 0..ENDPOINTS as u32 {
            out.extend(self.backend(s, slot)?);
        }
        Ok(out)
    }

    fn recount(&mut self, n: usize) -> Result<Vec<(String, usize, usize)>> {
        Ok(vec![
            ("nft map service-ips".into(), self.count("service-ips")?, n),
            (
                format!("nft map backends-{ENDPOINTS}"),
                self.count(&format!("backends-{ENDPOINTS}"))?,
                n * ENDPOINTS,
            ),
        ])
    }
}
