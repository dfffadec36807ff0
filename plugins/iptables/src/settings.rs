//! The KubeProxyConfiguration `iptables` section, as JSON in the mode
//! config's `extra` (upstream's camelCase field names). Absent or empty
//! means upstream's defaults.

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// iptables.masqueradeBit: the packet mark bit meaning "masquerade me".
    pub masquerade_bit: u32,
    /// iptables.localhostNodePorts: node ports answer on 127.0.0.1 too.
    pub localhost_node_ports: bool,
    /// nodePortAddresses as given (the host adds it): empty when unset,
    /// `["primary"]`, or CIDRs.
    pub node_port_addresses: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            masquerade_bit: 14,
            localhost_node_ports: true,
            node_port_addresses: Vec::new(),
        }
    }
}

impl Settings {
    pub fn parse(extra: &str) -> Result<Self, String> {
        let mut s = Settings::default();
        let text = extra.trim();
        if text.is_empty() || text == "null" {
            return Ok(s);
        }
        if !text.starts_with('{') {
            return Err(format!(
                "iptables: the iptables section is not a JSON object: {text:?}"
            ));
        }
        if let Some(v) = field(text, "masqueradeBit")
            && v != "null"
        {
            s.masquerade_bit = v.parse::<u32>().ok().filter(|b| *b <= 31).ok_or(format!(
                "iptables.masqueradeBit {v:?} is not a bit number 0-31"
            ))?;
        }
        if let Some(v) = field(text, "localhostNodePorts") {
            s.localhost_node_ports = match v {
                "true" | "null" => true,
                "false" => false,
                other => {
                    return Err(format!(
                        "iptables.localhostNodePorts {other:?} is not a boolean"
                    ));
                }
            };
        }
        if let Some(list) = string_list(text, "nodePortAddresses") {
            s.node_port_addresses = list;
        }
        Ok(s)
    }

    /// The nodePortAddresses CIDRs of one family; `"primary"` is none.
    pub fn node_port_cidrs(&self, ipv6: bool) -> Vec<&str> {
        self.node_port_addresses
            .iter()
            .map(String::as_str)
            .filter(|c| *c != "primary" && c.contains(':') == ipv6)
            .collect()
    }

    /// Upstream's effective localhostNodePorts: on only when asked for and
    /// when node ports may be on IPv4 loopback at all (nodePortAddresses
    /// unset, or holding a CIDR that covers 127.0.0.0). `primary` becomes
    /// the node's IPv4 address (never loopback); upstream turns it into no
    /// IPv4 CIDR at all on a node without one (`primary_ipv4` false),
    /// which then means every address, loopback included.
    pub fn localhost_node_ports_in_effect(&self, primary_ipv4: bool) -> bool {
        let v4 = self.node_port_cidrs(false);
        let primary = self.node_port_addresses.iter().any(|c| c == "primary");
        self.localhost_node_ports
            && if v4.is_empty() {
                !(primary && primary_ipv4)
            } else {
                v4.iter().any(|c| covers_ipv4_loopback(c))
            }
    }

    /// The mark as iptables writes it, e.g. `0x4000`.
    pub fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
}

/// Whether an IPv4 CIDR holds 127.0.0.0 (so the loopback range).
fn covers_ipv4_loopback(cidr: &str) -> bool {
    let (ip, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(ip), Ok(len)) = (ip.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
    ip.is_loopback()
        || u32::from(ip) & mask == u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) & mask
}

/// A top-level `"key": ["a", "b"]` of plain strings.
fn string_list(json: &str, key: &str) -> Option<Vec<String>> {
    let quoted = format!("\"{key}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let inner = &rest.strip_prefix('[')?[..rest[1..].find(']')?];
    Some(
        inner
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

/// The raw scalar value of a top-level `"key": value` (numbers, booleans,
/// null): enough for this section's scalar fields without a JSON crate in
/// the guest.
fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_fields() {
        assert_eq!(Settings::parse("").unwrap(), Settings::default());
        assert_eq!(Settings::parse("{}").unwrap().mark(), "0x4000");
        let s = Settings::parse(
            r#"{"masqueradeBit": 15, "localhostNodePorts": false, "syncPeriod": "30s"}"#,
        )
        .unwrap();
        assert_eq!(s.mark(), "0x8000");
        assert!(!s.localhost_node_ports);
        assert!(Settings::parse(r#"{"masqueradeBit": 40}"#).is_err());
        assert!(Settings::parse(r#"{"localhostNodePorts": "yes"}"#).is_err());
        assert!(Settings::parse("[1]").is_err());
    }

    #[test]
    fn localhost_node_ports_follow_node_port_addresses_as_upstream() {
        let with = |list: &str, localhost: bool| {
            Settings::parse(&format!(
                r#"{{"localhostNodePorts":{localhost},"nodePortAddresses":{list},"syncPeriod":"30s"}}"#
            ))
            .unwrap()
        };
        assert!(
            with("[]", true).localhost_node_ports_in_effect(true),
            "unset: all addresses"
        );
        assert!(!with("[]", false).localhost_node_ports_in_effect(true));
        assert!(!with(r#"["primary"]"#, true).localhost_node_ports_in_effect(true));
        assert!(
            with(r#"["primary"]"#, true).localhost_node_ports_in_effect(false),
            "primary on a node without IPv4: every address, as unset"
        );
        assert!(!with(r#"["primary"]"#, false).localhost_node_ports_in_effect(false));
        assert!(!with(r#"["203.0.113.0/24"]"#, true).localhost_node_ports_in_effect(true));
        assert!(
            with(r#"["127.0.0.0/8","203.0.113.0/24"]"#, true).localhost_node_ports_in_effect(true)
        );
        assert!(with(r#"["0.0.0.0/0"]"#, true).localhost_node_ports_in_effect(true));
        assert!(with(r#"["127.0.0.1/32"]"#, true).localhost_node_ports_in_effect(true));
        assert!(
            with(r#"["fd00::/64"]"#, true).localhost_node_ports_in_effect(true),
            "no IPv4 CIDR: IPv4 matches every address"
        );
        let s = with(r#"["10.0.0.0/8","fd00::/64"]"#, true);
        assert_eq!(s.node_port_cidrs(false), ["10.0.0.0/8"]);
        assert_eq!(s.node_port_cidrs(true), ["fd00::/64"]);
    }
}
