//! nf_tables change notifications (the netlink group `nft monitor`
//! reads), searched raw. Not `nft monitor` itself: it reloads its cache of
//! the whole table for every event, seconds per event at 10k Services.
//!
//! The kernel sends them once a transaction has committed, one message
//! per object (rule, chain, set element) added or deleted, several
//! messages to a datagram. Every layout the bench meets carries an
//! address as its 4 bytes: a set element's key or data (nftables modes),
//! a rule's compared payload or its DNAT target (iptables-nft, both
//! proxies); upstream's nftables mode also names endpoint chains after
//! the address (`...__10.1.2.3/80`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{Result, bail};

/// Which messages count: additions (a rule, chain, element or set
/// appearing) or deletions.
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    New,
    Del,
}

fn kind_of(nlmsg_type: u16) -> Option<Kind> {
    if nlmsg_type >> 8 != 10 {
        return None; // not NFNL_SUBSYS_NFTABLES
    }
    // NFT_MSG_NEW{TABLE,CHAIN,RULE,SET,SETELEM}, then DEL*, and the
    // DESTROY* of newer kernels (delete without ENOENT).
    match nlmsg_type & 0xff {
        0 | 3 | 6 | 9 | 12 => Some(Kind::New),
        2 | 5 | 8 | 11 | 14 | 26..=30 => Some(Kind::Del),
        _ => None,
    }
}

pub struct Events {
    fd: OwnedFd,
}

impl Events {
    pub fn subscribe() -> Result<Self> {
        // SAFETY: socket(2), bind(2) and setsockopt(2) on a descriptor we
        // own, with values that live across each call.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 12);
            anyhow::ensure!(
                fd >= 0,
                "netlink socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            let raw = fd.as_raw_fd();
            let group: libc::c_int = 7; // NFNLGRP_NFTABLES
            // Without a bind (an address, not a group) no event arrives.
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
            anyhow::ensure!(
                libc::bind(raw, (&addr as *const libc::sockaddr_nl).cast(), len) == 0,
                "netlink bind: {}",
                std::io::Error::last_os_error()
            );
            // A full resync of upstream's iptables rules at 10k Services
            // is ~200k messages: room for them, so the change is not lost.
            let size: libc::c_int = 256 << 20;
            let opt = |level, name, value: &libc::c_int| {
                libc::setsockopt(raw, level, name, (value as *const libc::c_int).cast(), 4)
            };
            opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size);
            anyhow::ensure!(
                opt(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &group) == 0,
                "joining NFNLGRP_NFTABLES: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(Self { fd })
        }
    }

    /// One datagram, or `None` after the receive timeout (or a loss:
    /// ENOBUFS, which the caller's deadline then covers).
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: recv(2) into a buffer we own, within its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }

    /// Throws away what has arrived so far.
    pub fn drain(&self) {
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: non-blocking recv(2) into our buffer.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }

    /// When a message of `kind` naming `ip` arrived.
    pub fn wait_for(
        &self,
        ip: std::net::Ipv4Addr,
        kind: Kind,
        deadline: Instant,
    ) -> Result<Instant> {
        let bytes = ip.octets();
        let text = format!("__{ip}/");
        let mut buf = vec![0u8; 1 << 20];
        while Instant::now() < deadline {
            let Some(n) = self.recv(&mut buf) else {
                continue;
            };
            let at = Instant::now();
            if messages(&buf[..n]).any(|(k, body)| {
                let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
                k == Some(kind) && (has(&bytes) || has(text.as_bytes()))
            }) {
                return Ok(at);
            }
        }
        bail!(
            "no {} message naming {ip}",
            if kind == Kind::New { "new" } else { "delete" }
        )
    }
}

/// The netlink messages of a datagram: their kind and body.
fn messages(mut data: &[u8]) -> impl Iterator<Item = (Option<Kind>, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = kind_of(u16::from_ne_bytes([data[4], data[5]]));
        if len < 16 || len > data.len() {
            return None;
        }
        let body = &data[16..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, body))
    })
}
