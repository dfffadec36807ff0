//! The two IP families: every chain is rendered once per family, for
//! iptables and ip6tables.

use kwp_sdk::mode::{Cidr, IpAddress};
use kwp_sdk::mode::{DetectLocal, ModeConfig};
use kwp_sdk::mode::{IptablesChain, Item};

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fam {
    pub ipv6: bool,
}

pub const V4: Fam = Fam { ipv6: false };
pub const V6: Fam = Fam { ipv6: true };

/// `KWP-SERVICE-IPS` sends a packet by the low six bits of its
/// destination to one of 64 shard chains. A Service added or removed then
/// edits one short chain (iptables-nft reads the rules of the chain a
/// `-D` names), and a new connection passes at most 64 + N/64 dispatch
/// rules where upstream's single chain makes it pass N.
pub const DISPATCH_SHARDS: u8 = 64;
const SHARD_DISPATCH: &str = "KWP-SERVICE-IPS";

impl Fam {
    /// The address as iptables writes it, if it is of this family.
    pub fn ip(&self, ip: &IpAddress) -> Option<String> {
        match (self.ipv6, ip) {
            (false, IpAddress::V4(bits)) => Some(std::net::Ipv4Addr::from(*bits).to_string()),
            (true, IpAddress::V6((hi, lo))) => Some(
                std::net::Ipv6Addr::from((u128::from(*hi) << 64) | u128::from(*lo)).to_string(),
            ),
            _ => None,
        }
    }

    /// One address as a host CIDR (`/32`, `/128`): iptables-save's form.
    pub fn host(&self, ip: &str) -> String {
        format!("{ip}/{}", if self.ipv6 { 128 } else { 32 })
    }

    pub fn cidr(&self, c: &Cidr) -> Option<String> {
        self.ip(&c.address).map(|a| format!("{a}/{}", c.prefix_len))
    }

    /// `addr:port` for `--to-destination` (IPv6 in brackets).
    pub fn host_port(&self, ip: &str, port: u16) -> String {
        if self.ipv6 {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    }

    /// The match for "the source is one of this node's pods" (`local`
    /// true) or "is not" (false), from the detect-local mode; `None` when
    /// nothing is detected. iptables negates one CIDR only, so a mode with
    /// several CIDRs of a family uses the first, as upstream does.
    pub fn detect_local(&self, cfg: &ModeConfig, local: bool) -> Option<String> {
        let not = if local { "" } else { "! " };
        match &cfg.detect_local {
            DetectLocal::None => None,
            DetectLocal::Cidrs(cidrs) => {
                let sep = if self.ipv6 { ':' } else { '.' };
                cidrs
                    .iter()
                    .find(|c| c.contains(sep))
                    .map(|c| format!("{not}-s {c}"))
            }
            DetectLocal::BridgeInterface(name) => Some(format!("{not}-i {name}")),
            DetectLocal::InterfacePrefix(prefix) => Some(format!("{not}-i {prefix}+")),
        }
    }

    /// The dispatch shard chain of a destination, as `ip()` wrote it.
    pub fn shard_chain(&self, ip: &str) -> String {
        let low = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => a.octets()[3],
            Ok(std::net::IpAddr::V6(a)) => a.octets()[15],
            // `ip()` writes only what parses; a rule here would be unreachable.
            Err(_) => unreachable!("{ip:?} was not written by Fam::ip"),
        };
        shard(low % DISPATCH_SHARDS)
    }

    /// `KWP-SERVICE-IPS` itself: one goto per shard, by destination
    /// (iptables-save's form of a non-contiguous mask). A goto, so that a
    /// packet no Service claims returns straight to `KWP-SERVICES`.
    pub fn shard_dispatch(&self) -> Vec<String> {
        (0..DISPATCH_SHARDS)
            .map(|k| {
                let dst = if self.ipv6 {
                    format!("{}/::3f", std::net::Ipv6Addr::from(u128::from(k)))
                } else {
                    format!("0.0.0.{k}/0.0.0.{}", DISPATCH_SHARDS - 1)
                };
                format!("-d {dst} -g {}", shard(k))
            })
            .collect()
    }

    pub fn chain(&self, table: &str, name: &str, rules: Vec<String>) -> Item {
        Item::IptablesChain(IptablesChain {
            ipv6: self.ipv6,
            table: table.into(),
            name: name.into(),
            rules,
        })
    }
}

/// The name of dispatch shard `k`.
pub fn shard(k: u8) -> String {
    format!("{SHARD_DISPATCH}-{k}")
}
