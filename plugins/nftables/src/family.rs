//! The two IP families: every object is rendered once per family, into
//! the host's `ip` and `ip6` tables of the same name.

use kwp_sdk::mode::IpAddress;
use kwp_sdk::mode::{DetectLocal, ModeConfig};
use kwp_sdk::mode::{Item, NftChain, NftElement, NftFamily, NftSet};

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
    /// configured detect-local mode; `None` when nothing is detected. The
    /// host checked these values; they are checked again here because they
    /// go into rule text: CIDRs are parsed and written back from the parsed
    /// value, interface names must be plain names inside double quotes.
    pub fn not_local(&self, cfg: &ModeConfig) -> Result<Option<String>, String> {
        self.detect_local(cfg, "!= ")
    }

    /// The opposite match: "the source is one of this node's pods" (the
    /// short-circuit of external frontends under externalTrafficPolicy
    /// Local).
    pub fn is_local(&self, cfg: &ModeConfig) -> Result<Option<String>, String> {
        self.detect_local(cfg, "")
    }

    fn detect_local(&self, cfg: &ModeConfig, op: &str) -> Result<Option<String>, String> {
        Ok(match &cfg.detect_local {
            DetectLocal::None => None,
            DetectLocal::Cidrs(cidrs) => {
                let mut mine = Vec::new();
                for text in cidrs {
                    if let Some(cidr) = self.cidr(text)? {
                        mine.push(cidr);
                    }
                }
                (!mine.is_empty())
                    .then(|| format!("{} saddr {op}{{ {} }}", self.l3, mine.join(", ")))
            }
            DetectLocal::BridgeInterface(name) => {
                Some(format!("iifname {op}\"{}\"", interface(name, 15)?))
            }
            DetectLocal::InterfacePrefix(prefix) => {
                Some(format!("iifname {op}\"{}*\"", interface(prefix, 14)?))
            }
        })
    }

    /// `text` as a CIDR of this family, host bits cleared; `None` if it is
    /// of the other family.
    fn cidr(&self, text: &str) -> Result<Option<String>, String> {
        let bad = || format!("nftables: detect-local CIDR {text:?} is not a CIDR");
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let len: u32 = len.parse().map_err(|_| bad())?;
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        Ok(match (self.family, ip) {
            (NftFamily::Ip, std::net::IpAddr::V4(v4)) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                Some(format!(
                    "{}/{len}",
                    std::net::Ipv4Addr::from(v4.to_bits() & mask)
                ))
            }
            (NftFamily::Ip6, std::net::IpAddr::V6(v6)) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                Some(format!(
                    "{}/{len}",
                    std::net::Ipv6Addr::from(v6.to_bits() & mask)
                ))
            }
            (NftFamily::Ip, std::net::IpAddr::V6(_))
            | (NftFamily::Ip6, std::net::IpAddr::V4(_)) => None,
            _ => return Err(bad()),
        })
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

/// An interface name (or prefix) that can sit inside double quotes in a
/// rule: 1..=`max` printable ASCII bytes with nothing nft would read as a
/// quote, an escape or a wildcard.
fn interface(name: &str, max: usize) -> Result<&str, String> {
    let plain = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '\'' | '*' | '/' | ':');
    if name.is_empty() || name.len() > max || !name.chars().all(plain) {
        return Err(format!(
            "nftables: detect-local interface {name:?} is not a valid interface name"
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::mode::NodeInfo;

    fn cfg(detect_local: DetectLocal) -> ModeConfig {
        ModeConfig {
            node: NodeInfo {
                name: "n".into(),
                addresses: vec![],
                zone: None,
                labels: vec![],
            },
            table: "t".into(),
            masquerade_all: false,
            detect_local,
            extra: "{}".into(),
        }
    }

    #[test]
    fn detect_local_values_are_rendered_from_parsed_values() {
        let c = cfg(DetectLocal::Cidrs(vec![
            "10.244.1.0/16".into(),
            "fd00::1/64".into(),
        ]));
        assert_eq!(
            V4.not_local(&c),
            Ok(Some("ip saddr != { 10.244.0.0/16 }".into()))
        );
        assert_eq!(
            V6.not_local(&c),
            Ok(Some("ip6 saddr != { fd00::/64 }".into()))
        );
        for bad in [
            "10.244.0.0/16 } accept #",
            "10.244.0.0/33",
            "not-a-cidr",
            "10.0.0.0/+8",
        ] {
            let c = cfg(DetectLocal::Cidrs(vec![bad.into()]));
            assert!(V4.not_local(&c).is_err(), "{bad}");
        }
        let c = cfg(DetectLocal::BridgeInterface("cni0".into()));
        assert_eq!(V4.not_local(&c), Ok(Some("iifname != \"cni0\"".into())));
        assert_eq!(V4.is_local(&c), Ok(Some("iifname \"cni0\"".into())));
        let c = cfg(DetectLocal::InterfacePrefix("veth".into()));
        assert_eq!(V4.not_local(&c), Ok(Some("iifname != \"veth*\"".into())));
        assert_eq!(V4.is_local(&c), Ok(Some("iifname \"veth*\"".into())));
        let c = cfg(DetectLocal::Cidrs(vec!["10.244.0.0/16".into()]));
        assert_eq!(
            V4.is_local(&c),
            Ok(Some("ip saddr { 10.244.0.0/16 }".into()))
        );
        for bad in ["br0\" accept #", "", "a\\b", "sixteen-chars-xx", "br*"] {
            let c = cfg(DetectLocal::BridgeInterface(bad.into()));
            assert!(V4.not_local(&c).is_err(), "{bad:?}");
        }
    }
}
