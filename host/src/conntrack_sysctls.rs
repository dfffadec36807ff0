//! Conntrack tuning from KubeProxyConfiguration's `conntrack` section,
//! applied as upstream kube-proxy applies it, but only for the fields the
//! configuration sets (kwp's least-privilege default changes nothing), and
//! a sysctl the process may not write is a warning that names it, not a
//! failed start:
//!
//! - `maxPerCore` > 0: nf_conntrack_max becomes maxPerCore x the node's
//!   CPUs (capped at 1,048,576), or `min` when that is larger; it is only
//!   ever raised. The module's hashsize is raised to a quarter of it when
//!   smaller. Both are node-wide: only a process in the node's network
//!   namespace with CAP_NET_ADMIN (and /sys mounted read-write) may write
//!   them.
//! - `tcpEstablishedTimeout`, `tcpCloseWaitTimeout`, `udpTimeout`,
//!   `udpStreamTimeout` (whole seconds, when > 0) and `tcpBeLiberal`
//!   (when true): written when they differ. They are per network namespace.

use std::time::Duration;

use anyhow::{Context, Result};

const NETFILTER: &str = "/proc/sys/net/netfilter/";
const MAX: &str = "nf_conntrack_max";
const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
/// Upstream's cap on the scaled maximum (memory on many-core nodes).
const MAX_LIMIT: u64 = 1_048_576;

/// KubeProxyConfiguration's `conntrack`; `None` is "not set".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackConfig {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

impl ConntrackConfig {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Reads and writes integer sysctls (full paths), and counts the node's CPUs.
pub trait SysctlWriter {
    fn get(&mut self, path: &str) -> Result<u64>;
    fn set(&mut self, path: &str, value: u64) -> Result<()>;
    fn cpus(&self) -> usize;
}

/// /proc/sys and /sys.
pub struct ProcSysctls;

impl SysctlWriter for ProcSysctls {
    fn get(&mut self, path: &str) -> Result<u64> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("{path}: not a number: {text:?}"))
    }

    fn set(&mut self, path: &str, value: u64) -> Result<()> {
        std::fs::write(path, value.to_string()).with_context(|| format!("writing {path}"))
    }

    /// The node's online CPUs (/sys), not this process's cpuset: the limit
    /// is node-wide, as upstream counts it.
    fn cpus(&self) -> usize {
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|t| count_cpu_list(t.trim()))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// `0-3,8-11` -> 8.
fn count_cpu_list(list: &str) -> Option<usize> {
    list.split(',').try_fold(0, |n, part| {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
        Some(n + b.checked_sub(a)? + 1)
    })
}

/// nf_conntrack_max as upstream computes it; `None` when not to be set.
pub fn conntrack_max(config: &ConntrackConfig, cpus: usize) -> Option<u64> {
    let per_core = u64::from(config.max_per_core.filter(|m| *m > 0)?);
    let floor = u64::from(config.min.unwrap_or(0));
    let scaled = per_core.saturating_mul(cpus as u64);
    let max = if scaled > MAX_LIMIT {
        MAX_LIMIT
    } else {
        scaled.max(floor)
    };
    (max > 0).then_some(max)
}

/// What was written, and what could not be.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub set: Vec<(String, u64)>,
    pub refused: Vec<String>,
}

/// Applies `config` through `sys`; see the module comment.
pub fn apply(config: &ConntrackConfig, sys: &mut dyn SysctlWriter) -> Outcome {
    let mut out = Outcome::default();
    if let Some(max) = conntrack_max(config, sys.cpus()) {
        let path = format!("{NETFILTER}{MAX}");
        // Only ever raised, as upstream: a larger table set by the admin stays.
        if sys.get(&path).map_or(true, |cur| cur < max) {
            write(sys, &path, max, &mut out);
        }
        match sys.get(HASHSIZE) {
            Ok(size) if size < max / 4 => write(sys, HASHSIZE, max / 4, &mut out),
            Ok(_) => {}
            Err(e) => refuse(&mut out, HASHSIZE, max / 4, &e),
        }
    }
    let seconds = [
        (
            "nf_conntrack_tcp_timeout_established",
            config.tcp_established_timeout,
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            config.tcp_close_wait_timeout,
        ),
        ("nf_conntrack_udp_timeout", config.udp_timeout),
        ("nf_conntrack_udp_timeout_stream", config.udp_stream_timeout),
    ];
    let mut wanted: Vec<(&str, u64)> = seconds
        .iter()
        .filter_map(|(name, d)| Some((*name, (*d)?.as_secs())))
        .filter(|(_, s)| *s > 0)
        .collect();
    if config.tcp_be_liberal {
        wanted.push(("nf_conntrack_tcp_be_liberal", 1));
    }
    for (name, value) in wanted {
        let path = format!("{NETFILTER}{name}");
        if sys.get(&path).ok() != Some(value) {
            write(sys, &path, value, &mut out);
        }
    }
    tracing::info!(
        set = out.set.len(),
        refused = out.refused.len(),
        "conntrack settings applied"
    );
    out
}

fn write(sys: &mut dyn SysctlWriter, path: &str, value: u64, out: &mut Outcome) {
    match sys.set(path, value) {
        Ok(()) => {
            tracing::info!(sysctl = path, value, "set conntrack sysctl");
            out.set.push((path.to_string(), value));
        }
        Err(e) => refuse(out, path, value, &e),
    }
}

fn refuse(out: &mut Outcome, path: &str, value: u64, e: &anyhow::Error) {
    let node_wide = path == HASHSIZE || path.ends_with(MAX);
    let needs = if node_wide {
        "it is node-wide: only a process in the node's network namespace with CAP_NET_ADMIN \
         (and /sys mounted read-write) may set it"
    } else {
        "it needs CAP_NET_ADMIN in the proxy's network namespace"
    };
    tracing::warn!(
        sysctl = path,
        value,
        error = format!("{e:#}"),
        "cannot apply conntrack setting; the kernel's value stays ({needs})"
    );
    out.refused.push(path.to_string());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Sysctls in memory; paths in `read_only` refuse writes.
    struct FakeSysctls {
        values: BTreeMap<String, u64>,
        read_only: Vec<String>,
        cpus: usize,
        writes: Vec<(String, u64)>,
    }

    impl FakeSysctls {
        fn node(cpus: usize) -> Self {
            let values = [
                (format!("{NETFILTER}{MAX}"), 262_144),
                (HASHSIZE.to_string(), 65_536),
                (
                    format!("{NETFILTER}nf_conntrack_tcp_timeout_established"),
                    432_000,
                ),
                (
                    format!("{NETFILTER}nf_conntrack_tcp_timeout_close_wait"),
                    60,
                ),
                (format!("{NETFILTER}nf_conntrack_udp_timeout"), 30),
                (format!("{NETFILTER}nf_conntrack_udp_timeout_stream"), 120),
                (format!("{NETFILTER}nf_conntrack_tcp_be_liberal"), 0),
            ];
            Self {
                values: values.into_iter().collect(),
                read_only: Vec::new(),
                cpus,
                writes: Vec::new(),
            }
        }
    }

    impl SysctlWriter for FakeSysctls {
        fn get(&mut self, path: &str) -> Result<u64> {
            self.values.get(path).copied().context("no such sysctl")
        }
        fn set(&mut self, path: &str, value: u64) -> Result<()> {
            if self.read_only.iter().any(|p| p == path) {
                anyhow::bail!("Permission denied (os error 13)");
            }
            self.values.insert(path.into(), value);
            self.writes.push((path.into(), value));
            Ok(())
        }
        fn cpus(&self) -> usize {
            self.cpus
        }
    }

    fn per_core(max_per_core: u32, min: u32) -> ConntrackConfig {
        ConntrackConfig {
            max_per_core: Some(max_per_core),
            min: Some(min),
            ..ConntrackConfig::default()
        }
    }

    #[test]
    fn the_maximum_is_per_core_times_cpus_or_min_capped_as_upstream() {
        assert_eq!(conntrack_max(&per_core(32_768, 131_072), 16), Some(524_288));
        assert_eq!(conntrack_max(&per_core(32_768, 131_072), 2), Some(131_072));
        assert_eq!(conntrack_max(&per_core(32_768, 0), 64), Some(MAX_LIMIT));
        assert_eq!(conntrack_max(&per_core(0, 131_072), 16), None, "0 disables");
        assert_eq!(conntrack_max(&ConntrackConfig::default(), 16), None);
    }

    #[test]
    fn nothing_set_changes_nothing() {
        let mut sys = FakeSysctls::node(8);
        assert_eq!(
            apply(&ConntrackConfig::default(), &mut sys),
            Outcome::default()
        );
        assert!(sys.writes.is_empty());
    }

    #[test]
    fn max_is_only_raised_and_hashsize_follows_at_a_quarter() {
        let mut sys = FakeSysctls::node(16);
        let out = apply(&per_core(32_768, 131_072), &mut sys);
        assert_eq!(
            sys.writes,
            vec![
                (format!("{NETFILTER}{MAX}"), 524_288),
                (HASHSIZE.into(), 131_072)
            ]
        );
        assert!(out.refused.is_empty());
        // An admin's larger table and hashsize stay.
        let mut sys = FakeSysctls::node(2);
        sys.values.insert(format!("{NETFILTER}{MAX}"), 1_000_000);
        sys.values.insert(HASHSIZE.into(), 250_000);
        apply(&per_core(32_768, 131_072), &mut sys);
        assert!(sys.writes.is_empty(), "{:?}", sys.writes);
    }

    #[test]
    fn timeouts_are_written_in_seconds_only_when_they_differ() {
        let mut sys = FakeSysctls::node(4);
        let config = ConntrackConfig {
            tcp_established_timeout: Some(Duration::from_secs(86_400)),
            tcp_close_wait_timeout: Some(Duration::from_secs(60)), // already 60
            udp_timeout: Some(Duration::from_millis(45_900)),      // 45 s
            udp_stream_timeout: Some(Duration::ZERO),              // 0: not set
            tcp_be_liberal: true,
            ..ConntrackConfig::default()
        };
        apply(&config, &mut sys);
        assert_eq!(
            sys.writes,
            vec![
                (
                    format!("{NETFILTER}nf_conntrack_tcp_timeout_established"),
                    86_400
                ),
                (format!("{NETFILTER}nf_conntrack_udp_timeout"), 45),
                (format!("{NETFILTER}nf_conntrack_tcp_be_liberal"), 1),
            ]
        );
    }

    #[test]
    fn a_sysctl_the_process_may_not_write_is_reported_and_the_rest_applied() {
        let mut sys = FakeSysctls::node(16);
        // As in a pod's own network namespace: node-wide values read-only.
        sys.read_only = vec![format!("{NETFILTER}{MAX}"), HASHSIZE.into()];
        let config = ConntrackConfig {
            udp_timeout: Some(Duration::from_secs(10)),
            ..per_core(32_768, 0)
        };
        let out = apply(&config, &mut sys);
        assert_eq!(
            out.refused,
            vec![format!("{NETFILTER}{MAX}"), HASHSIZE.into()]
        );
        assert_eq!(
            out.set,
            vec![(format!("{NETFILTER}nf_conntrack_udp_timeout"), 10)]
        );
        assert_eq!(sys.values[&format!("{NETFILTER}{MAX}")], 262_144);
    }

    #[test]
    fn the_section_is_read_from_a_kube_proxy_configuration() {
        use crate::config::file::FileConfig;
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let parse = |body: &str| FileConfig::parse(&format!("{head}{body}"))?.conntrack();
        let c = parse(
            "conntrack:\n  maxPerCore: 32768\n  min: 131072\n  tcpEstablishedTimeout: 24h0m0s\n  \
             tcpCloseWaitTimeout: 1h\n  udpTimeout: 30s\n  udpStreamTimeout: 2m\n  tcpBeLiberal: true\n",
        )
        .unwrap();
        assert_eq!(
            c,
            ConntrackConfig {
                max_per_core: Some(32_768),
                min: Some(131_072),
                tcp_established_timeout: Some(Duration::from_secs(86_400)),
                tcp_close_wait_timeout: Some(Duration::from_secs(3_600)),
                tcp_be_liberal: true,
                udp_timeout: Some(Duration::from_secs(30)),
                udp_stream_timeout: Some(Duration::from_secs(120)),
            }
        );
        assert!(parse("").unwrap().is_empty(), "no section: nothing set");
        let e = parse("conntrack:\n  maxPerCore: -1\n").unwrap_err();
        assert!(format!("{e:#}").contains("conntrack.maxPerCore"), "{e:#}");
        let e = parse("conntrack:\n  udpTimeout: 30\n").unwrap_err();
        assert!(format!("{e:#}").contains("conntrack.udpTimeout"), "{e:#}");
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("x"), None);
    }
}
