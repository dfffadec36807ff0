//! The KubeProxyConfiguration `ipvs` section (config `extra`, JSON, the
//! upstream camelCase names), with upstream's defaults for absent or
//! empty fields.

/// Schedulers IPVS ships (the host validates the same list).
pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

#[derive(Clone, Debug, PartialEq)]
pub struct IpvsConfig {
    /// Upstream: "" means rr.
    pub scheduler: String,
    pub exclude_cidrs: Vec<String>,
    pub strict_arp: bool,
    /// Seconds; 0 leaves the kernel's value.
    pub tcp_timeout: u64,
    pub tcp_fin_timeout: u64,
    pub udp_timeout: u64,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        Self {
            scheduler: "rr".into(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: 0,
            tcp_fin_timeout: 0,
            udp_timeout: 0,
        }
    }
}

impl IpvsConfig {
    pub fn parse(extra: &str) -> Result<Self, String> {
        let mut c = Self::default();
        if extra.trim().is_empty() {
            return Ok(c);
        }
        let v: serde_json::Value =
            serde_json::from_str(extra).map_err(|e| format!("ipvs config: {e}"))?;
        let field = |name: &str| v.get(name).filter(|x| !x.is_null());
        if let Some(s) = field("scheduler") {
            let s = s.as_str().ok_or("ipvs config: scheduler is not a string")?;
            if !s.is_empty() {
                if !SCHEDULERS.contains(&s) {
                    return Err(format!("ipvs config: unknown scheduler {s:?}"));
                }
                c.scheduler = s.into();
            }
        }
        if let Some(list) = field("excludeCIDRs") {
            let list = list
                .as_array()
                .ok_or("ipvs config: excludeCIDRs is not a list")?;
            for x in list {
                let s = x
                    .as_str()
                    .ok_or("ipvs config: excludeCIDRs holds a non-string")?;
                c.exclude_cidrs.push(s.into());
            }
        }
        if let Some(b) = field("strictARP") {
            c.strict_arp = b
                .as_bool()
                .ok_or("ipvs config: strictARP is not a boolean")?;
        }
        for (name, slot) in [
            ("tcpTimeout", &mut c.tcp_timeout),
            ("tcpFinTimeout", &mut c.tcp_fin_timeout),
            ("udpTimeout", &mut c.udp_timeout),
        ] {
            if let Some(d) = field(name) {
                let d = d
                    .as_str()
                    .ok_or(format!("ipvs config: {name} is not a duration"))?;
                *slot = seconds(d).ok_or(format!("ipvs config: {name} {d:?} is not a duration"))?;
            }
        }
        Ok(c)
    }
}

/// A metav1.Duration as Go prints it ("900s", "15m0s", "1h2m3s", "0s").
fn seconds(d: &str) -> Option<u64> {
    if d.is_empty() || d == "0" {
        return Some(0);
    }
    let (mut total, mut num) = (0f64, String::new());
    let mut chars = d.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let unit = match (ch, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return None,
        };
        total += num.parse::<f64>().ok()? * unit;
        num.clear();
    }
    num.is_empty().then_some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_empty_fields_take_upstream_defaults() {
        assert_eq!(IpvsConfig::parse("").unwrap(), IpvsConfig::default());
        assert_eq!(
            IpvsConfig::parse(r#"{"scheduler":""}"#).unwrap().scheduler,
            "rr"
        );
        let c = IpvsConfig::parse(
            r#"{"scheduler":"wlc","excludeCIDRs":["10.9.0.0/16"],"strictARP":true,
               "tcpTimeout":"15m0s","tcpFinTimeout":"30s","udpTimeout":"1h2m3s"}"#,
        )
        .unwrap();
        assert_eq!(c.scheduler, "wlc");
        assert_eq!(c.exclude_cidrs, ["10.9.0.0/16"]);
        assert!(c.strict_arp);
        assert_eq!(
            (c.tcp_timeout, c.tcp_fin_timeout, c.udp_timeout),
            (900, 30, 3723)
        );
        assert!(
            IpvsConfig::parse(r#"{"scheduler":"fastest"}"#)
                .unwrap_err()
                .contains("fastest")
        );
        assert!(IpvsConfig::parse(r#"{"tcpTimeout":"soon"}"#).is_err());
    }
}
