//! The KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file.
//! Every field kwp uses is read into a typed value; a field of the wrong
//! type or out of range is an error naming it. Unknown fields are warned
//! about, never fatal, so a config written for kube-proxy works as it is.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use serde_yaml_ng::{Mapping, Value};

use super::ProxyMode;
use super::values::{self, Named};
use crate::model::Cidr;

/// Fields of KubeProxyConfiguration v1alpha1 (top level).
const KNOWN_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "mode",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack",
    "configSyncPeriod",
    "portRange",
    "logging",
    "syncPeriod",
    "minSyncPeriod",
    "windowsRunAsService",
];

const IPTABLES_FIELDS: &[&str] = &[
    "masqueradeBit",
    "masqueradeAll",
    "localhostNodePorts",
    "minSyncPeriod",
    "syncPeriod",
];

const CONNTRACK_FIELDS: &[&str] = &[
    "maxPerCore",
    "min",
    "tcpEstablishedTimeout",
    "tcpCloseWaitTimeout",
    "tcpBeLiberal",
    "udpTimeout",
    "udpStreamTimeout",
];

const IPVS_FIELDS: &[&str] = &[
    "scheduler",
    "excludeCIDRs",
    "strictARP",
    "tcpTimeout",
    "tcpFinTimeout",
    "udpTimeout",
    "minSyncPeriod",
    "syncPeriod",
];

/// A parsed file: its top-level mapping and its proxy mode.
#[derive(Debug, Default)]
pub struct FileConfig {
    pub top: Mapping,
    pub mode: Option<ProxyMode>,
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let value: Value = serde_yaml_ng::from_str(text).context("not YAML")?;
        let Value::Mapping(top) = value else {
            bail!("not a mapping")
        };
        let kind = top.get("kind").and_then(Value::as_str);
        if kind != Some("KubeProxyConfiguration") {
            bail!("kind is {kind:?}, expected KubeProxyConfiguration");
        }
        if let Some(api) = top
            .get("apiVersion")
            .and_then(Value::as_str)
            .filter(|a| *a != "kubeproxy.config.k8s.io/v1alpha1")
        {
            tracing::warn!(
                api,
                "unexpected apiVersion; reading it as kubeproxy.config.k8s.io/v1alpha1"
            );
        }
        warn_unknown(&top, KNOWN_FIELDS, "");
        let file = FileConfig { top, mode: None };
        let mode = match file.string("mode")?.unwrap_or("") {
            "" => None,
            m => Some(
                ProxyMode::from_str(m, true)
                    .map_err(|_| anyhow!("mode: unknown proxy mode {m:?}"))?,
            ),
        };
        Ok(FileConfig { mode, ..file })
    }

    /// A top-level string field; another type is an error naming it.
    pub fn string(&self, key: &'static str) -> Result<Option<&str>> {
        string(&self.top, key, "")
    }

    /// A top-level section (`detectLocal`, `iptables`, ...), if present.
    pub fn section(&self, key: &'static str) -> Result<Option<&Mapping>> {
        match self.top.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Mapping(m)) => Ok(Some(m)),
            Some(_) => bail!("{key}: expected a mapping"),
        }
    }

    /// A top-level list of strings (`nodePortAddresses`).
    pub fn strings(&self, key: &'static str) -> Result<Option<Vec<String>>> {
        strings(&self.top, key, "")
    }

    /// A duration from the top level, else from the chosen mode's section
    /// (where older configs keep syncPeriod and minSyncPeriod).
    pub fn sync_duration(
        &self,
        key: &'static str,
        mode: ProxyMode,
    ) -> Result<Option<Named<Duration>>> {
        if let Some(value) = duration(&self.top, key, "")? {
            return Ok(Some(Named { value, name: key }));
        }
        let Some(section) = self.section(mode_section_name(mode))? else {
            return Ok(None);
        };
        let name: &'static str = match (mode, key) {
            (ProxyMode::Iptables, "syncPeriod") => "iptables.syncPeriod",
            (ProxyMode::Iptables, _) => "iptables.minSyncPeriod",
            (ProxyMode::Ipvs, "syncPeriod") => "ipvs.syncPeriod",
            (ProxyMode::Ipvs, _) => "ipvs.minSyncPeriod",
            (ProxyMode::Nftables, "syncPeriod") => "nftables.syncPeriod",
            (ProxyMode::Nftables, _) => "nftables.minSyncPeriod",
            (ProxyMode::Userspace, "syncPeriod") => "userspace.syncPeriod",
            (ProxyMode::Userspace, _) => "userspace.minSyncPeriod",
        };
        let prefix = mode_section_name(mode);
        Ok(duration(section, key, prefix)?.map(|value| Named { value, name }))
    }

    /// masqueradeAll of the chosen mode's section.
    pub fn masquerade_all(&self, mode: ProxyMode) -> Result<bool> {
        let prefix = mode_section_name(mode);
        Ok(match self.section(prefix)? {
            Some(s) => boolean(s, "masqueradeAll", prefix)?.unwrap_or(false),
            None => false,
        })
    }

    /// The iptables section, typed, with upstream's defaults (read in
    /// every mode, as upstream validates it in every mode).
    pub fn iptables(&self) -> Result<IptablesSection> {
        let empty = Mapping::new();
        let s = self.section("iptables")?.unwrap_or(&empty);
        warn_unknown(s, IPTABLES_FIELDS, "iptables.");
        let p = "iptables";
        let masquerade_bit = match integer(s, "masqueradeBit", p)? {
            None => 14,
            Some(bit @ 0..=31) => bit as u8,
            Some(bit) => bail!("iptables.masqueradeBit: {bit} must be within 0..=31"),
        };
        Ok(IptablesSection {
            masquerade_bit,
            masquerade_all: boolean(s, "masqueradeAll", p)?.unwrap_or(false),
            localhost_node_ports: boolean(s, "localhostNodePorts", p)?.unwrap_or(true),
        })
    }

    /// The ipvs section, typed, with upstream's defaults.
    pub fn ipvs(&self) -> Result<IpvsSection> {
        let empty = Mapping::new();
        let s = self.section("ipvs")?.unwrap_or(&empty);
        warn_unknown(s, IPVS_FIELDS, "ipvs.");
        let p = "ipvs";
        let exclude_cidrs = strings(s, "excludeCIDRs", p)?
            .unwrap_or_default()
            .iter()
            .map(|c| values::cidr(c, "ipvs.excludeCIDRs"))
            .collect::<Result<_>>()?;
        let timeout = |key: &'static str| -> Result<Duration> {
            Ok(duration(s, key, p)?.unwrap_or(Duration::ZERO))
        };
        Ok(IpvsSection {
            scheduler: values::ipvs_scheduler(
                string(s, "scheduler", p)?.unwrap_or(""),
                "ipvs.scheduler",
            )?,
            exclude_cidrs,
            strict_arp: boolean(s, "strictARP", p)?.unwrap_or(false),
            tcp_timeout: timeout("tcpTimeout")?,
            tcp_fin_timeout: timeout("tcpFinTimeout")?,
            udp_timeout: timeout("udpTimeout")?,
        })
    }
}

/// KubeProxyConfiguration `iptables`, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct IptablesSection {
    pub masquerade_bit: u8,
    pub masquerade_all: bool,
    pub localhost_node_ports: bool,
}

/// KubeProxyConfiguration `ipvs`, defaults filled in (scheduler `rr`,
/// timeouts 0: leave the kernel's).
#[derive(Clone, Debug, PartialEq)]
pub struct IpvsSection {
    pub scheduler: String,
    pub exclude_cidrs: Vec<Cidr>,
    pub strict_arp: bool,
    pub tcp_timeout: Duration,
    pub tcp_fin_timeout: Duration,
    pub udp_timeout: Duration,
}

/// The chosen mode's section as the mode plugin receives it in
/// `mode-config.extra`: JSON with upstream's camelCase names, durations in
/// Go's form (`30s`, `1m0s`), defaults filled in; `{}` for modes without a
/// section of their own here (userspace, nftables).
pub fn mode_extra(
    mode: ProxyMode,
    file: &FileConfig,
    sync: Duration,
    min_sync: Duration,
) -> Result<String> {
    let periods = |mut v: serde_json::Value| {
        v["syncPeriod"] = values::go_duration(sync).into();
        v["minSyncPeriod"] = values::go_duration(min_sync).into();
        v
    };
    let json = match mode {
        ProxyMode::Iptables => {
            let s = file.iptables()?;
            periods(serde_json::json!({
                "masqueradeBit": s.masquerade_bit,
                "masqueradeAll": s.masquerade_all,
                "localhostNodePorts": s.localhost_node_ports,
            }))
        }
        ProxyMode::Ipvs => {
            let s = file.ipvs()?;
            periods(serde_json::json!({
                "scheduler": s.scheduler,
                "excludeCIDRs": s.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "strictARP": s.strict_arp,
                "tcpTimeout": values::go_duration(s.tcp_timeout),
                "tcpFinTimeout": values::go_duration(s.tcp_fin_timeout),
                "udpTimeout": values::go_duration(s.udp_timeout),
            }))
        }
        ProxyMode::Userspace | ProxyMode::Nftables => serde_json::json!({}),
    };
    Ok(json.to_string())
}

impl FileConfig {
    /// The `conntrack` section: only what it sets (kwp's default is to
    /// leave the kernel's values alone); counts must be 0 or more.
    pub fn conntrack(&self) -> Result<crate::conntrack_sysctls::ConntrackConfig> {
        let Some(s) = self.section("conntrack")? else {
            return Ok(Default::default());
        };
        warn_unknown(s, CONNTRACK_FIELDS, "conntrack.");
        let count = |key: &str| -> Result<Option<u32>> {
            integer(s, key, "conntrack")?
                .map(|n| {
                    u32::try_from(n).map_err(|_| {
                        anyhow!("conntrack.{key}: {n} must be between 0 and {}", u32::MAX)
                    })
                })
                .transpose()
        };
        Ok(crate::conntrack_sysctls::ConntrackConfig {
            max_per_core: count("maxPerCore")?,
            min: count("min")?,
            tcp_established_timeout: duration(s, "tcpEstablishedTimeout", "conntrack")?,
            tcp_close_wait_timeout: duration(s, "tcpCloseWaitTimeout", "conntrack")?,
            tcp_be_liberal: boolean(s, "tcpBeLiberal", "conntrack")?.unwrap_or(false),
            udp_timeout: duration(s, "udpTimeout", "conntrack")?,
            udp_stream_timeout: duration(s, "udpStreamTimeout", "conntrack")?,
        })
    }
}

fn mode_section_name(mode: ProxyMode) -> &'static str {
    mode.as_str()
}

fn warn_unknown(section: &Mapping, known: &[&str], prefix: &str) {
    for key in section.keys().filter_map(Value::as_str) {
        if !known.contains(&key) {
            tracing::warn!(
                field = format!("{prefix}{key}"),
                "unknown KubeProxyConfiguration field ignored"
            );
        }
    }
}

/// `prefix.key` as an error names it.
fn path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn string<'a>(m: &'a Mapping, key: &str, prefix: &str) -> Result<Option<&'a str>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => bail!("{}: expected a string, got {other:?}", path(prefix, key)),
    }
}

fn boolean(m: &Mapping, key: &str, prefix: &str) -> Result<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!(
            "{}: expected true or false, got {other:?}",
            path(prefix, key)
        ),
    }
}

fn integer(m: &Mapping, key: &str, prefix: &str) -> Result<Option<i64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| anyhow!("{}: expected an integer, got {n}", path(prefix, key))),
        Some(other) => bail!("{}: expected an integer, got {other:?}", path(prefix, key)),
    }
}

fn strings(m: &Mapping, key: &str, prefix: &str) -> Result<Option<Vec<String>>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    anyhow!(
                        "{}: expected a list of strings, got {v:?}",
                        path(prefix, key)
                    )
                })
            })
            .collect::<Result<_>>()
            .map(Some),
        Some(other) => bail!(
            "{}: expected a list of strings, got {other:?}",
            path(prefix, key)
        ),
    }
}

/// A Go duration string (`30s`); an integer is refused, as upstream's
/// decoder refuses it, so a forgotten unit is not read as nanoseconds.
fn duration(m: &Mapping, key: &str, prefix: &str) -> Result<Option<Duration>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => values::parse_duration(s)
            .map(Some)
            .map_err(|e| anyhow!("{}: {e}", path(prefix, key))),
        Some(other) => bail!(
            "{}: expected a duration such as \"30s\", got {other:?}",
            path(prefix, key)
        ),
    }
}
