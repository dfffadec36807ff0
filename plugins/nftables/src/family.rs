//! The two IP families: every object is rendered once per family, into
//! the host's `ip` and `ip6` tables of the same name.

use kwp_sdk::mode::exports::kwp::proxy::mode::{DetectLocal, ModeConfig};
use kwp_sdk::mode::kwp::proxy::plan::{Item, NftChain, NftElement, NftFamily, NftSet};
use kwp_sdk::mode::kwp::proxy::types::IpAddress;

#[derive(Clone, Copy)]
pub struct Fam {
    pub family: NftFamily,
    /// The payload keyword: `ip` or `ip6`.
    pub l3: &'static str,
    /// The nft address type.
    pub addr: &'static str,
}

pub const V4: Fam = Fam {
    family: NftFamily::Ip,
    l3: "ip",
    addr: "ipv4_addr",
};
pub const V6: Fam = Fam {
    family: NftFamily::Ip6,
    l3: "ip6",
    addr: "ipv6_addr",
};

impl Fam {
    /// The address as nft writes it, if it is of this family.
    pub fn ip(&self, ip: &IpAddress) -> Option<String> {
        match (self.family, ip) {
            (NftFamily::Ip, IpAddress::V4(bits)) => {
                Some(std::net::Ipv4Addr::from(*bits).to_string())
            }
            (NftFamily::Ip6, IpAddress::V6((hi, lo))) => Some(
                std::net::Ipv6Addr::from((u128::from(*hi) << 64) | u128::from(*lo)).to_string(),
            ),
            _ => None,
        }
    }

    /// `addr:port` for `dnat to` (IPv6 in brackets).
    pub fn host_port(&self, ip: &str, port: u16) -> String {
        if self.family == NftFamily::Ip6 {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    }

    /// A match for "the source is not one of this node's pods", from the
    /// configured detect-local mode; `None` when nothing is detected.
    pub fn not_local(&self, cfg: &ModeConfig) -> Option<String> {
        match &cfg.detect_local {
            DetectLocal::None => None,
            DetectLocal::Cidrs(cidrs) => {
                let sep = if self.family == NftFamily::Ip6 {
                    ':'
                } else {
                    '.'
                };
                let mine: Vec<&str> = cidrs
                    .iter()
                    .map(String::as_str)
                    .filter(|c| c.contains(sep))
                    .collect();
                (!mine.is_empty())
                    .then(|| format!("{} saddr != {{ {} }}", self.l3, mine.join(", ")))
            }
            DetectLocal::BridgeInterface(name) => Some(format!("iifname != \"{name}\"")),
            DetectLocal::InterfacePrefix(prefix) => Some(format!("iifname != \"{prefix}*\"")),
        }
    }

    pub fn chain(
        &self,
        cfg: &ModeConfig,
        name: &str,
        hook: Option<&str>,
        rules: Vec<String>,
    ) -> Item {
        Item::NftChain(NftChain {
            family: self.family,
            table: cfg.table.clone(),
            name: name.into(),
            hook: hook.map(str::to_string),
            rules,
        })
    }

    pub fn element(&self, cfg: &ModeConfig, set: &str, element: String) -> Item {
        Item::NftElement(NftElement {
            family: self.family,
            table: cfg.table.clone(),
            set: set.into(),
            element,
        })
    }

    pub fn set(&self, cfg: &ModeConfig, name: &str, declaration: String) -> Item {
        Item::NftSet(NftSet {
            family: self.family,
            table: cfg.table.clone(),
            name: name.into(),
            declaration,
        })
    }
}
