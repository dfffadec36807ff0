//! What the bench reads from and does to the kernel of its network
//! namespace: how many Services a proxy has programmed, a clean slate
//! between runs, and a process's CPU and peak memory.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use anyhow::{Context, Result, bail};

const NETLINK_NETFILTER: i32 = 12;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const SUBSYS_NFTABLES: u16 = 10 << 8;
const NFPROTO_IPV4: u8 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;

/// How many Services `proxy` has programmed in `mode`: elements of the
/// `service-ips` map (nftables, both proxies), or rules of the nat dispatch
/// chain that jump to a per-Service chain (iptables on the nft backend:
/// `KUBE-SERVICES` → `KUBE-SVC-*`, `KWP-SERVICE-IPS` → `KWP-SVC-*`). A
/// restore commits a table at once, so the dispatch rules are there only
/// with the chains they jump to.
pub fn programmed(mode: &str, proxy: &str) -> Result<usize> {
    match (mode, proxy) {
        ("nftables", "kwp" | "kwp-base") => {
            kwp::dataplane::nftables::element_count("kube-wasm-proxy", "service-ips")
        }
        ("nftables", _) => kwp::dataplane::nftables::element_count("kube-proxy", "service-ips"),
        ("iptables", "kwp" | "kwp-base") => rule_count("nat", "KWP-SERVICE-IPS", b"KWP-SVC-"),
        ("iptables", _) => rule_count("nat", "KUBE-SERVICES", b"KUBE-SVC-"),
        (other, _) => bail!("mode {other} not benchmarked"),
    }
}

fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// Rules of `ip` table `table`, chain `chain`, whose attributes hold
/// `needle` (a jump's target chain travels as its name): one netlink dump
/// of that chain alone, milliseconds at 10k rules, where `iptables-save`
/// of the table takes seconds. 0 while the table or chain is absent.
pub fn rule_count(table: &str, chain: &str, needle: &[u8]) -> Result<usize> {
    // SAFETY: socket(2) for a descriptor we then own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "netlink socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else holds.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cstr = |s: &str| [s.as_bytes(), &[0]].concat();
    let mut body = vec![NFPROTO_IPV4, 0, 0, 0]; // nfgenmsg: family, version, res_id
    body.extend(attr(1, &cstr(table))); // NFTA_RULE_TABLE
    body.extend(attr(2, &cstr(chain))); // NFTA_RULE_CHAIN
    let mut msg = Vec::new();
    msg.extend(((16 + body.len()) as u32).to_ne_bytes());
    msg.extend((SUBSYS_NFTABLES | NFT_MSG_GETRULE).to_ne_bytes());
    msg.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes()); // seq
    msg.extend(0u32.to_ne_bytes()); // pid: the kernel's
    msg.extend(body);
    // SAFETY: send(2) of a buffer we own, within its length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    anyhow::ensure!(
        sent >= 0,
        "netlink send: {}",
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut count = 0;
    loop {
        // SAFETY: recv(2) into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        anyhow::ensure!(n >= 0, "netlink recv: {}", std::io::Error::last_os_error());
        let mut data = &buf[..n as usize];
        while data.len() >= 16 {
            let len = u32::from_ne_bytes(data[0..4].try_into()?) as usize;
            let kind = u16::from_ne_bytes(data[4..6].try_into()?);
            let flags = u16::from_ne_bytes(data[6..8].try_into()?);
            if len < 16 || len > data.len() {
                bail!("netlink message of {len} bytes in {}", data.len());
            }
            match kind {
                NLMSG_DONE => return Ok(count),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(data[16..20].try_into()?);
                    // No such table or chain yet: nothing programmed.
                    if errno == -libc::ENOENT {
                        return Ok(0);
                    }
                    bail!("dumping {table} {chain}: errno {}", -errno);
                }
                _ if kind == SUBSYS_NFTABLES | NFT_MSG_NEWRULE => {
                    // A dump a commit interrupted may miss or repeat rules.
                    if flags & NLM_F_DUMP_INTR != 0 {
                        return Ok(0);
                    }
                    if data[16..len].windows(needle.len()).any(|w| w == needle) {
                        count += 1;
                    }
                }
                _ => {}
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
}

/// Leaves the namespace as a fresh one: no nf_tables table (the nftables
/// modes' and iptables-nft's `ip nat`/`ip filter`/...), no rule or chain
/// in a legacy x_tables table.
pub fn reset() -> Result<()> {
    sh("nft flush ruleset")?;
    for (names, tool) in [
        ("/proc/net/ip_tables_names", "iptables-legacy"),
        ("/proc/net/ip6_tables_names", "ip6tables-legacy"),
    ] {
        let tables = std::fs::read_to_string(names).unwrap_or_default();
        for table in tables.split_whitespace() {
            sh(&format!(
                "{tool} -w -t {table} -F && {tool} -w -t {table} -X"
            ))?;
        }
    }
    let left = Command::new("nft").args(["list", "tables"]).output()?;
    anyhow::ensure!(
        left.stdout.is_empty(),
        "tables left after the reset: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    Ok(())
}

pub fn sh(script: &str) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .with_context(|| format!("running {script}"))?;
    anyhow::ensure!(status.success(), "{script}: {status}");
    Ok(())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// utime + stime of the process and its reaped children (`nft`,
/// `iptables-restore`), seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // Fields 14..17 of stat(5), counted after the command name.
    let ticks: f64 = fields.get(11..15).map_or(0.0, |f| f.iter().sum());
    // SAFETY: sysconf(3) reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

pub fn peak_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
        })
        .unwrap_or(0.0)
}
