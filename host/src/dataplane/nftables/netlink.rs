//! nf_tables over netlink: a read-only dump of what our table holds,
//! summarised per chain (rule count and digest) and per set (element count
//! and digest), for the periodic drift check; and the one write the host
//! makes without `nft`, a batch of set-element changes (`elements.rs`).
//!
//! Why not `nft list table`: at 10k Services (~170k elements) nft takes
//! 2–7 s to fetch, decode and print the table, and the resync would block
//! changes behind that. The kernel dumps the same objects in a fraction of
//! that; the digests hash the raw attributes, so nothing is decoded.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use super::abi::{NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFPROTO_IPV6, NFT_MSG_GETSETELEM};
use super::elements::ElementBatch;
use super::kernel::{Inventory, SetKind, Summary};
use crate::plan::NftFamily;

// iptables mode's reads (iptables-nft keeps its rules in nf_tables):
// beside this file to keep it short, a child so it shares the codec.
#[path = "netlink_iptables.rs"]
mod iptables_nft;
pub use iptables_nft::{chain_summaries, generation};

const NETLINK_NETFILTER: i32 = 12;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
// Attribute numbers of linux/netfilter/nf_tables.h.
const TABLE: u16 = 1; // NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE
const CHAIN_NAME: u16 = 3;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_ELEM_LIST_SET: u16 = 2;
const SET_ELEM_LIST_ELEMENTS: u16 = 3;
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const SET_ELEM_KEY: u16 = 1;
const SET_ELEM_DATA: u16 = 2;
const SET_ELEM_FLAGS: u16 = 3;
const SET_ELEM_KEY_END: u16 = 10;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_MAP: u32 = 0x8;
/// Expressions whose data changes with traffic: only their name counts.
const STATEFUL: [&[u8]; 5] = [b"counter", b"quota", b"limit", b"connlimit", b"last"];

/// What `table` holds in the `ip` and `ip6` families (nothing where absent).
pub fn inventory(table: &str) -> Result<Inventory> {
    let socket = Socket::open()?;
    let mut inventory = Inventory::default();
    for (family, proto) in [
        (NftFamily::Ip, NFPROTO_IPV4),
        (NftFamily::Ip6, NFPROTO_IPV6),
    ] {
        family_inventory(&socket, table, family, proto, &mut inventory)
            .with_context(|| format!("listing table {family} {table} over netlink"))?;
    }
    Ok(inventory)
}

/// How many elements set `set` of `ip` table `table` holds (0 if absent):
/// one dump, for benchmarks that wait until a proxy has programmed all.
pub fn element_count(table: &str, set: &str) -> Result<usize> {
    let socket = Socket::open()?;
    let mut request = attr(TABLE, &cstr(table));
    request.extend(attr(SET_ELEM_LIST_SET, &cstr(set)));
    let mut count = 0;
    for msg in socket.dump(NFT_MSG_GETSETELEM, NFPROTO_IPV4, &request)? {
        if let Some(list) = attrs(&msg).get(&SET_ELEM_LIST_ELEMENTS) {
            count += nested(list).filter(|(t, _)| *t == LIST_ELEM).count();
        }
    }
    Ok(count)
}

/// Sends `batch` as one nf_tables transaction: all of it or nothing. An
/// error names the set and elements of the message the kernel refused.
pub fn apply_elements(batch: &ElementBatch) -> Result<()> {
    let socket = Socket::open()?;
    socket.transact(batch)
}

/// The chain names of `table` in the `ip` (or `ip6`) family, empty when
/// the table is absent: iptables mode's survey on the nft backend, where
/// `iptables-save -t nat` of 10k Services takes 34 s and this one dump
/// milliseconds.
pub fn chain_names(table: &str, ipv6: bool) -> Result<Vec<String>> {
    chain_names_tries(table, ipv6, 5)
}

/// `chain_names`, the dump tried up to `tries` times while interrupted.
fn chain_names_tries(table: &str, ipv6: bool, tries: usize) -> Result<Vec<String>> {
    let socket = Socket::open()?;
    let proto = if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    let names = std::cell::RefCell::new(Vec::new());
    socket.dump_each_tries(
        tries,
        NFT_MSG_GETCHAIN,
        proto,
        &attr(TABLE, &cstr(table)),
        || names.borrow_mut().clear(),
        |msg| {
            let attrs = attrs(msg);
            if text(&attrs, TABLE) == Some(table)
                && let Some(name) = text(&attrs, CHAIN_NAME)
            {
                names.borrow_mut().push(name.to_string());
            }
        },
    )?;
    Ok(names.into_inner())
}

fn family_inventory(
    socket: &Socket,
    table: &str,
    family: NftFamily,
    proto: u8,
    inventory: &mut Inventory,
) -> Result<()> {
    let filter = attr(TABLE, &cstr(table));
    for msg in socket.dump(NFT_MSG_GETCHAIN, proto, &filter)? {
        let attrs = attrs(&msg);
        if text(&attrs, TABLE) == Some(table)
            && let Some(name) = text(&attrs, CHAIN_NAME)
        {
            inventory
                .chains
                .insert((family, name.to_string()), Summary::default());
        }
    }
    for msg in socket.dump(NFT_MSG_GETRULE, proto, &filter)? {
        let attrs = attrs(&msg);
        if text(&attrs, TABLE) != Some(table) {
            continue;
        }
        let Some(chain) = text(&attrs, RULE_CHAIN) else {
            continue;
        };
        let digest = attrs
            .get(&RULE_EXPRESSIONS)
            .map_or(0, |e| expressions_digest(e));
        let summary = inventory
            .chains
            .entry((family, chain.to_string()))
            .or_default();
        // Rules are ordered: fold, do not sum.
        summary.count += 1;
        summary.digest = summary.digest.wrapping_mul(0x100_0000_01b3) ^ digest;
    }
    let mut sets = Vec::new();
    for msg in socket.dump(NFT_MSG_GETSET, proto, &filter)? {
        let attrs = attrs(&msg);
        let flags = attrs
            .get(&SET_FLAGS)
            .and_then(|f| f.get(..4))
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if text(&attrs, TABLE) != Some(table) || flags & NFT_SET_ANONYMOUS != 0 {
            continue;
        }
        if let Some(name) = text(&attrs, SET_NAME) {
            let kind = if flags & NFT_SET_MAP != 0 {
                SetKind::Map
            } else {
                SetKind::Set
            };
            sets.push((name.to_string(), kind));
        }
    }
    for (name, kind) in sets {
        let mut request = filter.clone();
        request.extend(attr(SET_ELEM_LIST_SET, &cstr(&name)));
        let mut summary = Summary::default();
        for msg in socket.dump(NFT_MSG_GETSETELEM, proto, &request)? {
            let attrs = attrs(&msg);
            let Some(list) = attrs.get(&SET_ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for (_, element) in nested(list).filter(|(t, _)| *t == LIST_ELEM) {
                let fields: BTreeMap<u16, &[u8]> = nested(element).collect();
                let mut h = Fnv::default();
                for t in [
                    SET_ELEM_KEY,
                    SET_ELEM_KEY_END,
                    SET_ELEM_DATA,
                    SET_ELEM_FLAGS,
                ] {
                    h.write(&t.to_ne_bytes());
                    h.write(fields.get(&t).copied().unwrap_or_default());
                }
                // Elements are unordered: sum.
                summary.count += 1;
                summary.digest = summary.digest.wrapping_add(h.0);
            }
        }
        inventory.sets.insert((family, name), (kind, summary));
    }
    Ok(())
}

/// A digest of a rule's expressions; stateful ones count by name only.
fn expressions_digest(list: &[u8]) -> u64 {
    let mut h = Fnv::default();
    for (_, expr) in nested(list) {
        let fields: BTreeMap<u16, &[u8]> = nested(expr).collect();
        let name = fields.get(&EXPR_NAME).copied().unwrap_or_default();
        let name_only = STATEFUL
            .iter()
            .any(|s| name.strip_suffix(b"\0").unwrap_or(name) == *s);
        if name_only {
            h.write(name);
        } else {
            h.write(expr);
        }
    }
    h.0
}

/// FNV-1a, 64 bits: stable across runs, no dependency.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Appends one netlink message: header, nfgenmsg, attributes.
fn header(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, nfgen: &[u8; 4], attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    out.extend((len as u32).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes()); // port id: the kernel's
    out.extend(nfgen);
    out.extend(attrs);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut v = Vec::with_capacity(len.next_multiple_of(4));
    v.extend((len as u16).to_ne_bytes());
    v.extend(kind.to_ne_bytes());
    v.extend(payload);
    v.resize(len.next_multiple_of(4), 0);
    v
}

/// The attributes in `data`, by type (nested flag masked off).
fn nested(data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, payload))
    })
}

/// The top-level attributes of an nf_tables message (after nfgenmsg).
fn attrs(msg: &[u8]) -> BTreeMap<u16, &[u8]> {
    nested(msg.get(4..).unwrap_or_default()).collect()
}

/// A NUL-terminated string attribute.
fn text<'a>(attrs: &BTreeMap<u16, &'a [u8]>, kind: u16) -> Option<&'a str> {
    let bytes = attrs.get(&kind)?;
    std::str::from_utf8(bytes.strip_suffix(b"\0").unwrap_or(bytes)).ok()
}

struct Socket {
    fd: OwnedFd,
    /// The receive buffer, reused by every dump on this socket (iptables
    /// mode dumps tens of thousands of chains one by one).
    buf: std::cell::RefCell<Vec<u8>>,
}

impl Socket {
    fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            buf: std::cell::RefCell::new(vec![0u8; 1 << 18]),
        })
    }

    /// One batch: BEGIN, a message per set (each acked), END. The kernel
    /// answers every message with an ack or an error once the whole batch
    /// is committed or aborted, or with one error if the commit failed.
    fn transact(&self, batch: &ElementBatch) -> Result<()> {
        let mut out = Vec::with_capacity(batch.size() + 64);
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        // nfgenmsg of BEGIN/END: family unspecified, res_id the subsystem.
        let control = [0, 0, subsys[0], subsys[1]];
        header(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            &control,
            &[],
        );
        for (i, m) in batch.messages.iter().enumerate() {
            let kind = (NFNL_SUBSYS_NFTABLES << 8) | m.kind;
            let flags = NLM_F_REQUEST | NLM_F_ACK | if m.add { NLM_F_CREATE } else { 0 };
            let nfgen = [m.nfproto(), 0, 0, 0];
            header(&mut out, kind, flags, i as u32 + 1, &nfgen, &m.attrs);
        }
        let end_seq = batch.messages.len() as u32 + 1;
        header(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end_seq,
            &control,
            &[],
        );
        let fd = self.fd.as_raw_fd();
        // The kernel answers at once; a receive that waits for long means
        // something is wrong, and must not hang the proxier.
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: setsockopt(2) with a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        // SAFETY: send(2) of an initialised buffer on our descriptor.
        let sent = unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error())
                .context("netlink send of an element batch");
        }
        let mut acked = 0;
        let mut buf = vec![0u8; 1 << 16];
        while acked < batch.messages.len() {
            // SAFETY: recv(2) into a buffer we own, within its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("netlink recv of an element batch's acks");
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                // An error echoes the refused message, which may be cut
                // off at the buffer's end; its first 4 bytes are enough.
                let payload = &rest[16.min(rest.len())..len.min(rest.len())];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if kind != NLMSG_ERROR {
                    continue;
                }
                let code = payload
                    .get(..4)
                    .map_or(-libc::EIO, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if code == 0 {
                    acked += 1;
                    continue;
                }
                let what = (seq as usize)
                    .checked_sub(1)
                    .and_then(|i| batch.messages.get(i))
                    .map_or_else(
                        || format!("the element batch of table {}", batch.table),
                        |m| m.describe(&batch.table),
                    );
                return Err(std::io::Error::from_raw_os_error(-code))
                    .with_context(|| format!("nf_tables refused {what}; nothing was applied"));
            }
        }
        Ok(())
    }

    /// The payloads (nfgenmsg onwards) of one dump; a dump the kernel
    /// marks interrupted (the ruleset changed meanwhile) is redone.
    fn dump(&self, msg: u16, family: u8, request: &[u8]) -> Result<Vec<Vec<u8>>> {
        let messages = std::cell::RefCell::new(Vec::new());
        self.dump_each(
            msg,
            family,
            request,
            || messages.borrow_mut().clear(),
            |m| messages.borrow_mut().push(m.to_vec()),
        )?;
        Ok(messages.into_inner())
    }

    /// `dump`, handing each payload to `each` as it arrives rather than
    /// keeping them all (iptables-nft's nat table at 10k Services is
    /// ~170k rules); `restart` resets the caller's fold before each try.
    fn dump_each(
        &self,
        msg: u16,
        family: u8,
        request: &[u8],
        restart: impl FnMut(),
        each: impl FnMut(&[u8]),
    ) -> Result<()> {
        self.dump_each_tries(5, msg, family, request, restart, each)
    }

    /// `dump_each`, tried up to `tries` times while interrupted.
    fn dump_each_tries(
        &self,
        tries: usize,
        msg: u16,
        family: u8,
        request: &[u8],
        mut restart: impl FnMut(),
        mut each: impl FnMut(&[u8]),
    ) -> Result<()> {
        for _ in 0..tries {
            restart();
            match self.dump_once(msg, NLM_F_DUMP, family, request, &mut each)? {
                DumpEnd::Done => return Ok(()),
                DumpEnd::Absent => {
                    restart();
                    return Ok(());
                }
                DumpEnd::Interrupted => {}
            }
        }
        bail!("nf_tables dump interrupted {tries} times: the ruleset keeps changing")
    }

    /// One request (`NLM_F_DUMP`, or `NLM_F_ACK` for a single answer);
    /// each answer's payload to `each`.
    fn dump_once(
        &self,
        msg: u16,
        flags: u16,
        family: u8,
        request: &[u8],
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<DumpEnd> {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        let mut out = Vec::with_capacity(16 + 4 + request.len());
        // nfgenmsg: family, version, res_id
        header(
            &mut out,
            kind,
            NLM_F_REQUEST | flags,
            1,
            &[family, 0, 0, 0],
            request,
        );
        let fd = self.fd.as_raw_fd();
        // SAFETY: send(2) of an initialised buffer on our descriptor.
        let sent = unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink send");
        }
        let mut buf = self.buf.borrow_mut();
        let mut interrupted = false;
        let end = |interrupted| {
            if interrupted {
                DumpEnd::Interrupted
            } else {
                DumpEnd::Done
            }
        };
        loop {
            // SAFETY: recv(2) into a buffer we own, within its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("netlink recv");
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                if len < 16 || len > rest.len() {
                    bail!("malformed netlink message");
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                let payload = &rest[16..len];
                match kind {
                    NLMSG_DONE => return Ok(end(interrupted)),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if code == 0 {
                            return Ok(end(interrupted));
                        }
                        if -code == libc::ENOENT {
                            // No such table (or set): it holds nothing.
                            return Ok(DumpEnd::Absent);
                        }
                        return Err(std::io::Error::from_raw_os_error(-code))
                            .context("nf_tables dump refused");
                    }
                    _ => each(payload),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}

/// How one try of a dump ended.
enum DumpEnd {
    Done,
    /// The ruleset changed meanwhile: what was handed over is inconsistent.
    Interrupted,
    /// No such table (or set): it holds nothing.
    Absent,
}
