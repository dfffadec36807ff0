//! Where a new connection goes in IPVS mode, read from the kernel's own
//! text: the IPVS table as `/proc/net/ip_vs` prints it, the addresses of
//! `kube-ipvs0` and of the node (`ip -o addr show`), and kwp's nftables
//! helper table (walked by `kernel.rs`).
//!
//! The path of the first packet, as the kernel takes it: the nat
//! prerouting chains (kwp's only mark for masquerade there); then routing:
//! an address that is not local (not on `kube-ipvs0`, not the node's) is
//! forwarded and IPVS never sees it; a local one passes the filter input
//! chains (priority -110: source ranges, reject and drop for Services
//! without usable endpoints) and then IPVS at LOCAL_IN (priority 98). A
//! virtual server sends new connections to its real servers of weight > 0
//! (weight 0 is quiesced: draining); with none, IPVS answers ICMP port
//! unreachable itself. No virtual server: the node's own stack, not ours.
//!
//! Nothing here shares code with the host's IPVS dataplane (it never reads
//! netlink): the point is a second reading of what the kernel holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};

use super::{Frontend, Kernel, Kind, Outcome, Proto, Reach, Viewpoint, show};

/// One node's IPVS table, its addresses and kwp's packet filter.
#[derive(Default, Debug)]
pub struct Ipvs {
    filter: Kernel,
    /// The node's addresses outside `kube-ipvs0` (node ports live there).
    node_addresses: BTreeSet<IpAddr>,
    /// The addresses bound on `kube-ipvs0`.
    bound: BTreeSet<IpAddr>,
    services: BTreeMap<(Proto, SocketAddr), VirtualServer>,
}

#[derive(Debug, Default)]
struct VirtualServer {
    scheduler: String,
    dests: Vec<RealServer>,
}

#[derive(Debug)]
struct RealServer {
    addr: SocketAddr,
    weight: i64,
}

impl Ipvs {
    /// Reads `/proc/net/ip_vs`: service lines `TCP  0A60000A:0050 rr ...`
    /// (IPv6 as `[fd00:0000:...]:0050`), destinations
    /// `  -> 0AF4010B:1F90      Masq    1      0          0`.
    pub fn add_proc(&mut self, text: &str) -> Result<()> {
        let mut current: Option<(Proto, SocketAddr)> = None;
        for (n, line) in text.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = || format!("/proc/net/ip_vs line {}: {line:?}", n + 1);
            match words.as_slice() {
                [] | ["IP", "Virtual", ..] | ["Prot", ..] | ["->", "RemoteAddress:Port", ..] => {}
                ["FWM", ..] => bail!("{}: kwp writes no firewall-mark services", at()),
                [proto, addr, scheduler, ..] if !proto.starts_with("->") => {
                    let proto = match *proto {
                        "TCP" => Proto::Tcp,
                        "UDP" => Proto::Udp,
                        "SCTP" => Proto::Sctp,
                        other => bail!("{}: protocol {other}", at()),
                    };
                    let key = (proto, hex_socket(addr).with_context(at)?);
                    let vs = VirtualServer {
                        scheduler: scheduler.to_string(),
                        dests: Vec::new(),
                    };
                    if self.services.insert(key, vs).is_some() {
                        bail!("{}: the same virtual server twice", at());
                    }
                    current = Some(key);
                }
                ["->", addr, forward, weight, ..] => {
                    let key = current.with_context(|| format!("{}: before any service", at()))?;
                    // Masq is NAT; Local is a real server on the node itself.
                    if !matches!(*forward, "Masq" | "Local") {
                        bail!("{}: forwarding method {forward}, kwp uses NAT", at());
                    }
                    let dest = RealServer {
                        addr: hex_socket(addr).with_context(at)?,
                        weight: weight.parse().with_context(at)?,
                    };
                    self.services.entry(key).or_default().dests.push(dest);
                }
                _ => bail!("{}: not a line of the IPVS table", at()),
            }
        }
        Ok(())
    }

    /// Reads `ip -o addr show` of the node: `kube-ipvs0`'s addresses are
    /// the bound virtual addresses, every other one is the node's.
    pub fn add_addresses(&mut self, text: &str) -> Result<()> {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(family) = words.iter().position(|w| *w == "inet" || *w == "inet6") else {
                continue; // a link line (`ip -o link`)
            };
            let (Some(device), Some(cidr)) = (words.get(1), words.get(family + 1)) else {
                bail!("ip -o addr: no device or address in {line:?}");
            };
            let ip: IpAddr = cidr
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("ip -o addr: address in {line:?}"))?;
            if *device == "kube-ipvs0" {
                self.bound.insert(ip);
            } else {
                self.node_addresses.insert(ip);
            }
        }
        self.filter.local_addresses = self.local().into_iter().collect();
        Ok(())
    }

    /// Adds one of kwp's nftables tables (`nft -j list table ...`).
    pub fn add_filter_json(&mut self, json: &str) -> Result<()> {
        self.filter.add_json(json)
    }

    fn local(&self) -> BTreeSet<IpAddr> {
        self.node_addresses.union(&self.bound).copied().collect()
    }

    /// Everything a new connection to `f` from `f.source` can end in.
    pub fn reach(&self, f: &Frontend, view: &Viewpoint) -> Result<Reach> {
        let local = self.local().contains(&f.ip);
        let mut reach = Reach::new();
        for outcome in self.filter.reach(f, view)? {
            match outcome {
                // Passed the filter to a local address: IPVS decides.
                Outcome::NotCaptured if local => reach.extend(self.schedule(f)),
                other => {
                    reach.insert(other);
                }
            }
        }
        Ok(reach)
    }

    /// What IPVS does with a new connection to a local `f`.
    fn schedule(&self, f: &Frontend) -> Reach {
        let key = (f.proto, SocketAddr::new(f.ip, f.port));
        let Some(vs) = self.services.get(&key) else {
            return Reach::from([Outcome::NotCaptured]);
        };
        let reach: Reach = vs
            .dests
            .iter()
            .filter(|d| d.weight > 0)
            .map(|d| Outcome::Endpoint(d.addr))
            .collect();
        if reach.is_empty() {
            // No schedulable destination: ICMP port unreachable.
            return Reach::from([Outcome::Reject]);
        }
        reach
    }

    /// What the kernel holds that no frontend of `expected` explains: a
    /// virtual server or a `kube-ipvs0` address of no Service. A node port
    /// on another node address than the primary one (kwp listens on
    /// every node address, upstream's IPVS default) must reach what the
    /// primary one should.
    pub fn leftovers(
        &self,
        expected: &[(Frontend, Reach)],
        view: &Viewpoint,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for ((proto, addr), vs) in &self.services {
            let at = |f: &Frontend| f.proto == *proto && f.port == addr.port();
            if expected.iter().any(|(f, _)| at(f) && f.ip == addr.ip()) {
                continue;
            }
            let node_port = expected.iter().find(|(f, _)| {
                at(f) && f.kind == Kind::NodePort && f.ip.is_ipv4() == addr.is_ipv4()
            });
            match node_port {
                Some((f, want)) if self.node_addresses.contains(&addr.ip()) => {
                    let other = Frontend {
                        ip: addr.ip(),
                        source: view.client(addr.ip()),
                        ..f.clone()
                    };
                    let got = self.reach(&other, view)?;
                    if &got != want {
                        out.push(format!(
                            "{other}: expected {}, the kernel reaches {}",
                            show(want),
                            show(&got)
                        ));
                    }
                }
                _ => out.push(format!(
                    "virtual server {addr}/{} ({}, {} real servers) belongs to no Service",
                    format!("{proto:?}").to_lowercase(),
                    vs.scheduler,
                    vs.dests.len()
                )),
            }
        }
        let vips: BTreeSet<IpAddr> = expected
            .iter()
            .filter(|(f, _)| f.kind != Kind::NodePort)
            .map(|(f, _)| f.ip)
            .collect();
        for ip in self.bound.difference(&vips) {
            out.push(format!("kube-ipvs0 holds {ip}, which no Service has"));
        }
        Ok(out)
    }
}

/// A consistent `/proc/net/ip_vs` from `read`: the kernel prints it a page
/// at a time, not atomically, so a read while a sync changes the table can
/// show a virtual server twice or miss one (the IPVS soak's 32nd check
/// read one twice). Two reads in a row that agree (connection counts
/// aside) are one state of the table; after `tries` reads, the last.
pub fn consistent_proc(tries: usize, mut read: impl FnMut() -> String) -> String {
    let servers = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let mut last = read();
    for _ in 1..tries {
        let next = read();
        if servers(&next) == servers(&last) {
            return next;
        }
        last = next;
    }
    last
}

/// `0A60000A:0050` or `[fd00:0000:...:0010]:01BB`: address and port in hex.
fn hex_socket(text: &str) -> Result<SocketAddr> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("no port in {text}"))?;
    let port = u16::from_str_radix(port, 16).with_context(|| format!("port in {text}"))?;
    let ip: IpAddr = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse().with_context(|| format!("address in {text}"))?),
        None => IpAddr::V4(
            u32::from_str_radix(host, 16)
                .with_context(|| format!("address in {text}"))?
                .into(),
        ),
    };
    Ok(SocketAddr::new(ip, port))
}
