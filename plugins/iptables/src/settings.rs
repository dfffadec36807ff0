//! The KubeProxyConfiguration `iptables` section, as JSON in the mode
//! config's `extra` (upstream's camelCase field names). Absent or empty
//! means upstream's defaults.

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// iptables.masqueradeBit: the packet mark bit meaning "masquerade me".
    pub masquerade_bit: u32,
    /// iptables.localhostNodePorts: node ports answer on 127.0.0.1 too.
    pub localhost_node_ports: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            masquerade_bit: 14,
            localhost_node_ports: true,
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
        Ok(s)
    }

    /// The mark as iptables writes it, e.g. `0x4000`.
    pub fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
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
}
