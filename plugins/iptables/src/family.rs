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

    pub fn chain(&self, table: &str, name: &str, rules: Vec<String>) -> Item {
        Item::IptablesChain(IptablesChain {
            ipv6: self.ipv6,
            table: table.into(),
            name: name.into(),
            rules,
        })
    }
}
