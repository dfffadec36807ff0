//! What the kernel itself shows, per mode: the benchmark decides that a
//! sync is done from these reads, never from the proxy's logs.
//!
//! - IPVS mode: the virtual servers and their real servers over generic
//!   netlink (the host's own codec), the addresses of `kube-ipvs0` over
//!   rtnetlink; for upstream kube-proxy also its ipset KUBE-CLUSTER-IP
//!   and the nat rule matching it (`ipset`, `iptables`).
//! - nftables mode: elements of kwp's nf_tables maps over nfnetlink: a dump
//!   counts them, a keyed get reads one Service's backends. A fast-path
//!   Service is `service-ips` (frontend -> `goto class-5`) plus five
//!   `backends-5` elements (frontend . slot -> endpoint . port),
//!   docs/nftables.md.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::dataplane::ipvs::kernel::{IpvsKernel, NetlinkIpvs, VirtualKey};
use crate::dataplane::ipvs::netlink::{Attrs, NLM_F_DUMP, Socket, attrs};
use crate::model::Protocol;

use super::objects::{ENDPOINTS, PORT, cluster_ip};
use abi::{
    NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFT_MSG_GETSETELEM, NFTA_DATA_VALUE, NFTA_LIST_ELEM,
    NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
};

/// The host's nf_tables numbers, shared rather than declared again.
#[path = "../../../../host/src/dataplane/nftables/abi.rs"]
#[allow(dead_code)]
mod abi;

/// kwp's nf_tables table (both modes; IPVS mode keeps its packet-filter
/// helpers there).
const TABLE: &str = "kube-wasm-proxy";
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
    /// How many Services are programmed so far (for a run that did not
    /// finish its full sync).
    fn progress(&mut self, n: usize) -> Result<usize>;
}

fn key(s: usize, offset: usize) -> VirtualKey {
    VirtualKey {
        address: SocketAddr::new(cluster_ip(s + offset).into(), PORT),
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
    /// kwp's packet filter; `None` for upstream kube-proxy (ipset and
    /// iptables instead).
    filter: Option<Nft>,
    /// Service s's ClusterIP is cluster_ip(s + offset) (api.rs).
    offset: usize,
    /// Upstream: when its ipset and iptables were last read.
    last_exec: Option<Instant>,
    /// When this reader was made (just before the proxy starts), and
    /// whether the IPVS part was seen complete: upstream's ipset comes
    /// after it, so the moment is worth printing.
    created: Instant,
    ipvs_complete: bool,
}

impl Ipvs {
    pub fn new(kwp: bool, offset: usize) -> Result<Self> {
        Ok(Self {
            k: NetlinkIpvs::new(),
            pending: None,
            filter: if kwp { Some(Nft::new(offset)?) } else { None },
            offset,
            last_exec: None,
            created: Instant::now(),
            ipvs_complete: false,
        })
    }

    /// Upstream's packet filter for the n Services: how many of their
    /// `ip,tcp:80` entries ipset KUBE-CLUSTER-IP holds, and whether nat
    /// KUBE-SERVICES matches that set. Upstream programs IPVS first and its
    /// ipsets (one `ipset add` process per entry) and iptables after, in
    /// the same sync; kwp's IPVS mode applies its filter before IPVS. So
    /// upstream is done when this is too.
    fn upstream_filter(&self, n: usize) -> Result<(usize, bool)> {
        let out = Command::new("ipset")
            .args(["list", "KUBE-CLUSTER-IP"])
            .stderr(Stdio::null())
            .output()
            .context("running ipset")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ours: BTreeSet<String> = (0..n)
            .map(|s| format!("{},tcp:{PORT}", cluster_ip(s + self.offset)))
            .collect();
        let members = text
            .lines()
            .skip_while(|l| !l.starts_with("Members:"))
            .filter(|l| ours.contains(l.trim()))
            .count();
        let rules = Command::new("iptables")
            .args(["-t", "nat", "-S", "KUBE-SERVICES"])
            .stderr(Stdio::null())
            .output()
            .context("running iptables")?;
        let matched = String::from_utf8_lossy(&rules.stdout).contains("KUBE-CLUSTER-IP");
        Ok((members, matched))
    }

    /// Services seen complete so far.
    pub fn done(&self, n: usize) -> usize {
        n - self.pending.as_ref().map_or(n, BTreeSet::len)
    }
}

impl Kernel for Ipvs {
    fn all_programmed(&mut self, n: usize) -> Result<bool> {
        let offset = self.offset;
        let pending = self.pending.get_or_insert_with(|| (0..n).collect());
        if !pending.is_empty() {
            let listed: BTreeSet<VirtualKey> =
                self.k.services()?.into_iter().map(|v| v.key).collect();
            let present: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|s| listed.contains(&key(*s, offset)))
                .collect();
            for s in present {
                // Destinations once their service is listed; a server is
                // done when all its real servers are there (it only grows
                // during the full sync).
                if self.k.destinations(&key(s, offset))?.len() == ENDPOINTS {
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
        if !(0..n).all(|s| bound.contains(&cluster_ip(s + offset).into())) {
            return Ok(false);
        }
        if self.filter.is_some() {
            return Ok(true);
        }
        if !self.ipvs_complete {
            self.ipvs_complete = true;
            println!(
                "bench: upstream {n}: IPVS part complete {:.1} s after start; waiting for its ipset",
                self.created.elapsed().as_secs_f64()
            );
        }
        // Two processes per read: at most once a second.
        if self
            .last_exec
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(false);
        }
        self.last_exec = Some(Instant::now());
        let (members, matched) = self.upstream_filter(n)?;
        Ok(members == n && matched)
    }

    fn endpoints(&mut self, s: usize) -> Result<BTreeSet<Ipv4Addr>> {
        Ok(self
            .k
            .destinations(&key(s, self.offset))?
            .into_iter()
            .filter(|r| r.weight > 0)
            .filter_map(|r| v4(r.address))
            .collect())
    }

    fn recount(&mut self, n: usize) -> Result<Vec<(String, usize, usize)>> {
        // Only the benchmark's Services: through an API server there is
        // also `default/kubernetes` (10.96.0.1:443, no endpoints).
        let ours: BTreeSet<VirtualKey> = (0..n).map(|s| key(s, self.offset)).collect();
        let services: Vec<_> = self
            .k
            .services()?
            .into_iter()
            .filter(|v| ours.contains(&v.key))
            .collect();
        let mut reals = 0;
        for v in &services {
            reals += self.k.destinations(&v.key)?.len();
        }
        let bound = self.k.link_addresses()?;
        let addresses = ours
            .iter()
            .filter(|k| bound.contains(&k.address.ip()))
            .count();
        let mut counts = vec![
            ("IPVS virtual servers".into(), services.len(), n),
            ("IPVS real servers".into(), reals, n * ENDPOINTS),
            ("kube-ipvs0 addresses".into(), addresses, n),
        ];
        if let Some(filter) = self.filter.as_mut() {
            // `default/kubernetes` is one more element through an API server.
            let extra = usize::from(self.offset > 0);
            counts.push((
                "nft set cluster-ips (packet filter)".into(),
                filter.count("cluster-ips")?,
                n + extra,
            ));
        } else {
            let (members, matched) = self.upstream_filter(n)?;
            counts.push(("ipset KUBE-CLUSTER-IP (packet filter)".into(), members, n));
            counts.push((
                "nat KUBE-SERVICES matching it".into(),
                usize::from(matched),
                1,
            ));
        }
        Ok(counts)
    }

    fn progress(&mut self, n: usize) -> Result<usize> {
        let done = self.done(n);
        if self.filter.is_some() || done < n {
            return Ok(done);
        }
        // Upstream with its IPVS part complete: how far its ipset got.
        let (members, matched) = self.upstream_filter(n)?;
        println!(
            "bench: upstream {n}: IPVS complete; ipset KUBE-CLUSTER-IP holds {members} of {n}, nat rule {}",
            if matched { "present" } else { "absent" }
        );
        Ok(members)
    }
}

pub struct Nft {
    sock: Socket,
    /// Service s's ClusterIP is cluster_ip(s + offset) (api.rs).
    offset: usize,
}

impl Nft {
    pub fn new(offset: usize) -> Result<Self> {
        Ok(Self {
            sock: Socket::open(libc::NETLINK_NETFILTER).context("nfnetlink socket")?,
            offset,
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
        let mut k = cluster_ip(s + self.offset).octets().to_vec();
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

    fn progress(&mut self, _n: usize) -> Result<usize> {
        // One transaction: all or nothing.
        self.count("service-ips")
    }
}
