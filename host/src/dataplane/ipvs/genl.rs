//! IPVS over generic netlink (linux/ip_vs.h): the family id is resolved
//! through the generic netlink controller, then services and
//! destinations are added, changed, deleted and dumped one request each.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};

use super::kernel::{RealServer, Timeouts, VirtualKey, VirtualServer};
use super::netlink::{
    Attrs, NLM_F_ACK, NLM_F_DUMP, Socket, attrs, family, get_be16, get_ip, get_str, get_u16,
    get_u32, ip_bytes,
};
use crate::model::Protocol;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const IPVS_GENL_VERSION: u8 = 1;
const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_SET_CONFIG: u8 = 12;
const CMD_GET_CONFIG: u8 = 13;

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// NAT: the only forwarding method kube-proxy uses.
const IP_VS_CONN_F_MASQ: u32 = 0;

pub struct IpvsSocket {
    sock: Socket,
    family: u16,
}

impl IpvsSocket {
    /// Opens a socket and resolves the "IPVS" family; loads `ip_vs` with
    /// modprobe once if the family is missing.
    pub fn open() -> Result<Self> {
        let mut sock = Socket::open(libc::NETLINK_GENERIC).context("generic netlink socket")?;
        let family = match resolve(&mut sock) {
            Ok(f) => f,
            Err(_) => {
                let loaded = std::process::Command::new("modprobe")
                    .arg("ip_vs")
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                tracing::info!(loaded, "IPVS family missing; tried modprobe ip_vs");
                resolve(&mut sock).context(
                    "the kernel has no IPVS (generic netlink family \"IPVS\"): load the ip_vs module \
                     (needs CAP_SYS_MODULE, or load it on the node)",
                )?
            }
        };
        Ok(Self { sock, family })
    }

    fn call(&mut self, cmd: u8, flags: u16, a: Attrs) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .sock
            .request(self.family, flags, &genl_payload(cmd, a))?)
    }

    /// IPVS's connection timeouts (the reply's top-level attributes).
    pub fn timeouts(&mut self) -> Result<Timeouts> {
        let replies = self
            .call(CMD_GET_CONFIG, NLM_F_ACK, Attrs::default())
            .context("IPVS get config")?;
        let reply = replies.first().context("IPVS get config: no reply")?;
        Ok(parse_timeouts(reply.get(4..).unwrap_or_default()))
    }

    /// Sets the non-zero timeouts of `t`; the kernel leaves the others.
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<()> {
        self.call(CMD_SET_CONFIG, NLM_F_ACK, timeout_attrs(t))
            .with_context(|| format!("IPVS set timeouts {t:?}"))?;
        Ok(())
    }

    /// Active plus inactive connections per destination of `key`.
    pub fn connections(&mut self, key: &VirtualKey) -> Result<BTreeMap<SocketAddr, u32>> {
        let af = family(key.address.ip());
        Ok(self
            .dest_dump(key)?
            .iter()
            .filter_map(|r| nested(r, CMD_ATTR_DEST))
            .filter_map(|d| parse_dest_connections(af, d))
            .collect())
    }

    fn dest_dump(&mut self, key: &VirtualKey) -> Result<Vec<Vec<u8>>> {
        let mut a = Attrs::default();
        a.nested(CMD_ATTR_SERVICE, service_id(key));
        self.call(CMD_GET_DEST, NLM_F_DUMP, a)
            .with_context(|| format!("IPVS destination dump of {key}"))
    }

    pub fn services(&mut self) -> Result<Vec<VirtualServer>> {
        let replies = self
            .call(CMD_GET_SERVICE, NLM_F_DUMP, Attrs::default())
            .context("IPVS service dump")?;
        Ok(replies
            .iter()
            .filter_map(|r| nested(r, CMD_ATTR_SERVICE))
            .filter_map(parse_service)
            .collect())
    }

    /// `new` adds, otherwise changes an existing service.
    pub fn set_service(&mut self, vs: &VirtualServer, new: bool) -> Result<()> {
        let mut s = service_id(&vs.key);
        let flags = if vs.persistence_timeout > 0 {
            IP_VS_SVC_F_PERSISTENT
        } else {
            0
        };
        let mut fl = flags.to_ne_bytes().to_vec();
        fl.extend_from_slice(&u32::MAX.to_ne_bytes());
        let netmask = if vs.key.address.is_ipv4() {
            u32::MAX
        } else {
            128
        };
        s.str(SVC_ATTR_SCHED_NAME, &vs.scheduler)
            .put(SVC_ATTR_FLAGS, &fl)
            .u32(SVC_ATTR_TIMEOUT, vs.persistence_timeout)
            .u32(SVC_ATTR_NETMASK, netmask);
        let mut a = Attrs::default();
        a.nested(CMD_ATTR_SERVICE, s);
        let cmd = if new {
            CMD_NEW_SERVICE
        } else {
            CMD_SET_SERVICE
        };
        self.call(cmd, NLM_F_ACK, a)
            .with_context(|| format!("IPVS {} service {}", verb(new), vs.key))?;
        Ok(())
    }

    pub fn delete_service(&mut self, key: &VirtualKey) -> Result<()> {
        let mut a = Attrs::default();
        a.nested(CMD_ATTR_SERVICE, service_id(key));
        self.call(CMD_DEL_SERVICE, NLM_F_ACK, a)
            .with_context(|| format!("IPVS delete service {key}"))?;
        Ok(())
    }

    pub fn destinations(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>> {
        let replies = self.dest_dump(key)?;
        let af = family(key.address.ip());
        Ok(replies
            .iter()
            .filter_map(|r| nested(r, CMD_ATTR_DEST))
            .filter_map(|d| parse_dest(af, d))
            .collect())
    }

    pub fn set_destination(&mut self, key: &VirtualKey, rs: &RealServer, new: bool) -> Result<()> {
        let mut d = dest_id(rs.address);
        d.u32(DEST_ATTR_FWD_METHOD, IP_VS_CONN_F_MASQ)
            .u32(DEST_ATTR_WEIGHT, rs.weight)
            .u32(DEST_ATTR_U_THRESH, 0)
            .u32(DEST_ATTR_L_THRESH, 0);
        let mut a = Attrs::default();
        a.nested(CMD_ATTR_SERVICE, service_id(key))
            .nested(CMD_ATTR_DEST, d);
        let cmd = if new { CMD_NEW_DEST } else { CMD_SET_DEST };
        self.call(cmd, NLM_F_ACK, a)
            .with_context(|| format!("IPVS {} destination {} of {key}", verb(new), rs.address))?;
        Ok(())
    }

    pub fn delete_destination(&mut self, key: &VirtualKey, address: SocketAddr) -> Result<()> {
        let mut a = Attrs::default();
        a.nested(CMD_ATTR_SERVICE, service_id(key))
            .nested(CMD_ATTR_DEST, dest_id(address));
        self.call(CMD_DEL_DEST, NLM_F_ACK, a)
            .with_context(|| format!("IPVS delete destination {address} of {key}"))?;
        Ok(())
    }
}

/// A generic netlink payload: the genl header (command, version,
/// reserved) and the attributes.
fn genl_payload(cmd: u8, a: Attrs) -> Vec<u8> {
    let mut payload = vec![cmd, IPVS_GENL_VERSION, 0, 0];
    payload.extend_from_slice(&a.0);
    payload
}

/// Only the set (non-zero) timeouts: an absent attribute keeps the
/// kernel's value (ip_vs_genl_set_config starts from the current ones).
fn timeout_attrs(t: &Timeouts) -> Attrs {
    let mut a = Attrs::default();
    for (kind, v) in [
        (CMD_ATTR_TIMEOUT_TCP, t.tcp),
        (CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
        (CMD_ATTR_TIMEOUT_UDP, t.udp),
    ] {
        if v > 0 {
            a.u32(kind, v);
        }
    }
    a
}

fn parse_timeouts(b: &[u8]) -> Timeouts {
    let mut t = Timeouts::default();
    for (k, v) in attrs(b) {
        let slot = match k {
            CMD_ATTR_TIMEOUT_TCP => &mut t.tcp,
            CMD_ATTR_TIMEOUT_TCP_FIN => &mut t.tcp_fin,
            CMD_ATTR_TIMEOUT_UDP => &mut t.udp,
            _ => continue,
        };
        *slot = get_u32(v).unwrap_or(0);
    }
    t
}

/// A dumped destination's address and active + inactive connections.
fn parse_dest_connections(service_af: u16, b: &[u8]) -> Option<(SocketAddr, u32)> {
    let rs = parse_dest(service_af, b)?;
    let count = |kind| {
        attrs(b)
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| get_u32(v))
            .unwrap_or(0)
    };
    let total = count(DEST_ATTR_ACTIVE_CONNS).saturating_add(count(DEST_ATTR_INACT_CONNS));
    Some((rs.address, total))
}

fn verb(new: bool) -> &'static str {
    if new { "add" } else { "update" }
}

fn resolve(sock: &mut Socket) -> Result<u16> {
    let mut payload = vec![CTRL_CMD_GETFAMILY, 1, 0, 0];
    let mut a = Attrs::default();
    a.str(CTRL_ATTR_FAMILY_NAME, "IPVS");
    payload.extend_from_slice(&a.0);
    let replies = sock.request(GENL_ID_CTRL, NLM_F_ACK, &payload)?;
    replies
        .iter()
        .filter_map(|r| r.get(4..))
        .flat_map(attrs)
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| get_u16(v))
        .ok_or_else(|| anyhow!("no family id in the controller's reply"))
}

fn protocol_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u16,
        Protocol::Udp => libc::IPPROTO_UDP as u16,
        Protocol::Sctp => libc::IPPROTO_SCTP as u16,
    }
}

fn protocol_of(n: u16) -> Option<Protocol> {
    match n as i32 {
        libc::IPPROTO_TCP => Some(Protocol::Tcp),
        libc::IPPROTO_UDP => Some(Protocol::Udp),
        libc::IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The attributes naming a service (family, protocol, address, port).
fn service_id(key: &VirtualKey) -> Attrs {
    let mut s = Attrs::default();
    s.u16(SVC_ATTR_AF, family(key.address.ip()))
        .u16(SVC_ATTR_PROTOCOL, protocol_number(key.protocol))
        .put(SVC_ATTR_ADDR, &ip_bytes(key.address.ip()))
        .be16(SVC_ATTR_PORT, key.address.port());
    s
}

fn dest_id(address: SocketAddr) -> Attrs {
    let mut d = Attrs::default();
    d.put(DEST_ATTR_ADDR, &ip_bytes(address.ip()))
        .be16(DEST_ATTR_PORT, address.port())
        .u16(DEST_ATTR_ADDR_FAMILY, family(address.ip()));
    d
}

/// The payload of top-level attribute `kind` in a genl reply.
fn nested(reply: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(reply.get(4..)?)
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v)
}

/// A dumped service; fwmark services (no address) are skipped.
fn parse_service(b: &[u8]) -> Option<VirtualServer> {
    let (mut af, mut proto, mut addr, mut port) = (None, None, None, None);
    let (mut sched, mut timeout) = (String::new(), 0);
    for (k, v) in attrs(b) {
        match k {
            SVC_ATTR_AF => af = get_u16(v),
            SVC_ATTR_PROTOCOL => proto = get_u16(v).and_then(protocol_of),
            SVC_ATTR_ADDR => addr = Some(v),
            SVC_ATTR_PORT => port = get_be16(v),
            SVC_ATTR_SCHED_NAME => sched = get_str(v),
            SVC_ATTR_TIMEOUT => timeout = get_u32(v).unwrap_or(0),
            _ => {}
        }
    }
    let ip = get_ip(af?, addr?)?;
    let flags_persistent = timeout > 0;
    Some(VirtualServer {
        key: VirtualKey {
            address: SocketAddr::new(ip, port?),
            protocol: proto?,
        },
        scheduler: sched,
        persistence_timeout: if flags_persistent { timeout } else { 0 },
    })
}

fn parse_dest(service_af: u16, b: &[u8]) -> Option<RealServer> {
    let (mut af, mut addr, mut port, mut weight) = (service_af, None, None, 0);
    for (k, v) in attrs(b) {
        match k {
            DEST_ATTR_ADDR => addr = Some(v),
            DEST_ATTR_PORT => port = get_be16(v),
            DEST_ATTR_WEIGHT => weight = get_u32(v).unwrap_or(0),
            DEST_ATTR_ADDR_FAMILY => af = get_u16(v).unwrap_or(service_af),
            _ => {}
        }
    }
    Some(RealServer {
        address: SocketAddr::new(get_ip(af, addr?)?, port?),
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_request_parses_back_as_the_kernel_would_send_it() {
        let key = VirtualKey {
            address: "10.96.0.10:53".parse().unwrap_or_else(|_| unreachable!()),
            protocol: Protocol::Udp,
        };
        let mut s = service_id(&key);
        s.str(SVC_ATTR_SCHED_NAME, "wrr")
            .u32(SVC_ATTR_TIMEOUT, 10800);
        let vs = parse_service(&s.0).expect("parses");
        assert_eq!(vs.key, key);
        assert_eq!(vs.scheduler, "wrr");
        assert_eq!(vs.persistence_timeout, 10800);
        let d = dest_id("[fd00::5]:8080".parse().unwrap_or_else(|_| unreachable!()));
        let mut d2 = Attrs(d.0);
        d2.u32(DEST_ATTR_WEIGHT, 3);
        let rs = parse_dest(libc::AF_INET as u16, &d2.0).expect("parses");
        assert_eq!(rs.address.to_string(), "[fd00::5]:8080");
        assert_eq!(rs.weight, 3);
    }

    /// The bytes the kernel's ip_vs_genl_set_config expects (linux
    /// include/uapi/linux/ip_vs.h; moby/ipvs uses the same numbers):
    /// genl header {cmd 12, version 1, reserved 0}, then one 8-byte
    /// attribute per set timeout {len 8, type 4/5/6, u32 seconds}.
    #[test]
    fn set_config_is_laid_out_as_the_kernel_reads_it() {
        let t = Timeouts {
            tcp: 900,
            tcp_fin: 0,
            udp: 300,
        };
        let bytes = genl_payload(CMD_SET_CONFIG, timeout_attrs(&t));
        let mut want = vec![12u8, 1, 0, 0];
        for (kind, secs) in [(4u16, 900u32), (6, 300)] {
            want.extend_from_slice(&8u16.to_ne_bytes());
            want.extend_from_slice(&kind.to_ne_bytes());
            want.extend_from_slice(&secs.to_ne_bytes());
        }
        assert_eq!(bytes, want, "tcpFinTimeout 0 is left out, not sent as 0");
        assert_eq!(
            genl_payload(CMD_GET_CONFIG, Attrs::default()),
            [13, 1, 0, 0]
        );
        // A GET_CONFIG reply parses back (all three attributes present).
        let mut reply = Attrs::default();
        reply.u32(4, 900).u32(5, 120).u32(6, 300);
        assert_eq!(
            parse_timeouts(&reply.0),
            Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            }
        );
    }

    #[test]
    fn a_dumped_destination_reports_active_plus_inactive_connections() {
        let mut d = dest_id("10.1.0.1:8080".parse().unwrap_or_else(|_| unreachable!()));
        // IPVS_DEST_ATTR_WEIGHT 4, _ACTIVE_CONNS 7, _INACT_CONNS 8,
        // _PERSIST_CONNS 9 (not counted, as upstream).
        d.u32(4, 0).u32(7, 3).u32(8, 2).u32(9, 40);
        let (addr, conns) = parse_dest_connections(libc::AF_INET as u16, &d.0).expect("parses");
        assert_eq!(addr.to_string(), "10.1.0.1:8080");
        assert_eq!(conns, 5);
    }
}
