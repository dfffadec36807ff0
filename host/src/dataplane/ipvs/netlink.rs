//! A minimal netlink socket and attribute codec, shared by the IPVS
//! (generic netlink) and kube-ipvs0 (rtnetlink) code. Our own instead of
//! the `netlink-*` crates: IPVS needs a dozen attributes and rtnetlink four
//! messages, which is less code than adapting the crates' async, generic
//! stacks, and it adds nothing to the workspace's dependency tree.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
const NLM_F_MULTI: u16 = 0x2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER: usize = 16;

/// One netlink socket of one protocol (NETLINK_GENERIC, NETLINK_ROUTE).
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is "let the kernel pick the port id".
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 1 })
    }

    /// Sends one request and returns the payloads of every data message of
    /// the reply (one for a get, many for a dump, none for an acked
    /// change). A netlink error comes back as the `io::Error` of its errno.
    pub fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(HEADER + payload.len());
        msg.extend_from_slice(&((HEADER + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: msg is a valid buffer of the length given.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buf is a valid, writable buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            let mut finished = false;
            while rest.len() >= HEADER {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                if len < HEADER || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink length",
                    ));
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let mflags = u16::from_ne_bytes([rest[6], rest[7]]);
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                let body = &rest[HEADER..len];
                rest = &rest[align(len).min(rest.len())..];
                if mseq != seq {
                    continue; // a late reply to an earlier request
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                            .unwrap_or(-libc::EIO);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        finished = true;
                    }
                    NLMSG_DONE => finished = true,
                    _ => {
                        out.push(body.to_vec());
                        if !dump && mflags & NLM_F_MULTI == 0 && flags & NLM_F_ACK == 0 {
                            finished = true;
                        }
                    }
                }
            }
            if finished {
                return Ok(out);
            }
        }
    }
}

pub fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds a run of attributes.
#[derive(Default)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    pub fn put(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(align(self.0.len()), 0);
        self
    }
    pub fn u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }
    /// A port, in network byte order as IPVS wants it.
    pub fn be16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }
    pub fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }
    pub fn nested(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// The attributes in `buf`, as (type, payload); stops at a malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, data))
    })
}

pub fn get_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?))
}

pub fn get_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(0..4)?.try_into().ok()?))
}

pub fn get_be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(0..2)?.try_into().ok()?))
}

pub fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An address of family `af` from the first bytes of `b` (IPVS sends a
/// 16-byte union for both families).
pub fn get_ip(af: u16, b: &[u8]) -> Option<std::net::IpAddr> {
    match af as i32 {
        libc::AF_INET => Some(<[u8; 4]>::try_from(b.get(0..4)?).ok()?.into()),
        libc::AF_INET6 => Some(<[u8; 16]>::try_from(b.get(0..16)?).ok()?.into()),
        _ => None,
    }
}

pub fn ip_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn family(ip: std::net::IpAddr) -> u16 {
    if ip.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut inner = Attrs::default();
        inner.u16(1, 2).str(6, "rr").be16(4, 80);
        let mut a = Attrs::default();
        a.nested(1, inner).u32(4, 900);
        assert_eq!(a.0.len() % 4, 0);
        let top: Vec<_> = attrs(&a.0).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, 1, "the nested flag is masked off");
        assert_eq!(get_u32(top[1].1), Some(900));
        let inner: Vec<_> = attrs(top[0].1).collect();
        assert_eq!(get_u16(inner[0].1), Some(2));
        assert_eq!(get_str(inner[1].1), "rr");
        assert_eq!(get_be16(inner[2].1), Some(80));
        assert_eq!(inner[2].1, [0, 80], "ports go in network byte order");
    }
}
