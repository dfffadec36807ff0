//! With CAP_NET_ADMIN, send each listener's frontends (cluster IP:port,
//! node port, ...) to the listener with nftables, in a table of our own
//! that is replaced atomically on every change.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::model::{Protocol, ServicePortName};
use crate::plan::Listener;

pub const TABLE: &str = "kube-wasm-proxy-userspace";

pub struct Redirector {
    last: Option<String>,
}

impl Redirector {
    /// `Some` when this process may program nftables (CAP_NET_ADMIN and an
    /// `nft` binary).
    pub fn detect() -> Option<Self> {
        let caps = std::fs::read_to_string("/proc/self/status").ok()?;
        let eff = caps
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim()
            .to_string();
        let eff = u64::from_str_radix(&eff, 16).ok()?;
        const CAP_NET_ADMIN: u64 = 1 << 12;
        let nft = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        (eff & CAP_NET_ADMIN != 0 && nft.is_ok_and(|s| s.success())).then_some(Self { last: None })
    }

    pub fn apply(
        &mut self,
        mapping: &BTreeMap<ServicePortName, (Listener, SocketAddr)>,
    ) -> Result<()> {
        let script = render(mapping);
        if self.last.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        crate::dataplane::nftables::kernel::nft(&["-f", "-"], &script)
            .context("installing the redirect rules")?;
        self.last = Some(script);
        Ok(())
    }
}

impl Drop for Redirector {
    /// The listeners die with the process: take the redirects with them,
    /// or cluster IPs would point at closed ports.
    fn drop(&mut self) {
        if self.last.is_some() {
            let delete = format!("delete table ip {TABLE}\n");
            let _ = crate::dataplane::nftables::kernel::nft(&["-f", "-"], &delete);
        }
    }
}

/// One nft transaction: (re)create the table with a prerouting chain (for
/// traffic from pods and outside) and an output chain (for the node itself).
pub fn render(mapping: &BTreeMap<ServicePortName, (Listener, SocketAddr)>) -> String {
    let mut rules = String::new();
    for (name, (listener, local)) in mapping {
        let proto = match listener.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => continue,
        };
        for front in &listener.frontends {
            let IpAddr::V4(ip) = front.ip() else { continue };
            rules.push_str(&format!(
                "add rule ip {TABLE} services ip daddr {ip} {proto} dport {} redirect to :{} comment \"{name}\"\n",
                front.port(),
                local.port()
            ));
        }
    }
    format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n\
         \tchain services {{}}\n\
         \tchain prerouting {{ type nat hook prerouting priority dstnat; jump services; }}\n\
         \tchain output {{ type nat hook output priority -100; jump services; }}\n}}\n{rules}"
    )
}
