//! Configuration: kube-proxy-compatible flags and a KubeProxyConfiguration
//! (kubeproxy.config.k8s.io/v1alpha1) file. Flags given on the command line
//! override the file; unknown fields in the file are warned about, never
//! fatal, so a config written for kube-proxy works as it is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_yaml::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Userspace,
    Nftables,
    Iptables,
    Ipvs,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Userspace => "userspace",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
        }
    }
}

/// kube-wasm-proxy: a kube-proxy whose proxy modes and load-balancing
/// policies are WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "kube-wasm-proxy", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bundled example cluster in userspace mode: writes its
    /// Services and EndpointSlices to a directory, starts their backends on
    /// loopback and proxies to them. No cluster or root needed.
    Demo {
        /// Where to write the example objects (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Exit after this long (default: run until interrupted).
        #[arg(long, value_parser = parse_duration)]
        run_for: Option<Duration>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// Path to a KubeProxyConfiguration (v1alpha1) file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Which proxy mode to run.
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// The node name to use instead of the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Address of the /healthz and /livez server (kube-proxy default 0.0.0.0:10256).
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// Address of the /metrics server (kube-proxy default 127.0.0.1:10249).
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// Least time between two syncs, e.g. 1s, 500ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub min_sync_period: Option<Duration>,
    /// Longest time between two full syncs, e.g. 30s, 1m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub sync_period: Option<Duration>,
    /// Path to a kubeconfig for --source kubernetes (default: clientConnection.kubeconfig, then in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Where cluster state comes from: `kubernetes` (the API server, the default) or `file:DIR` (Kubernetes YAML in a directory).
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
    /// Directory holding plugin components (`<name>.wasm`); default: `plugins/` beside the binary, then the bundled ones.
    #[arg(long, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Default load-balancing policy (plugin name or path); a Service may choose another with the kube-wasm-proxy.io/lb-policy annotation.
    #[arg(long, value_name = "POLICY")]
    pub lb_policy: Option<String>,
    /// Userspace mode: address its listeners bind to when it cannot redirect cluster IPs (no CAP_NET_ADMIN).
    #[arg(long, value_name = "IP")]
    pub userspace_bind_address: Option<std::net::IpAddr>,
    /// Userspace mode: never install nftables redirects, even with CAP_NET_ADMIN; only open listeners.
    #[arg(long)]
    pub no_redirect: bool,
    /// Addresses node ports answer on: "primary" (the Node's addresses, the default) or CIDRs (local addresses within them), comma-separated.
    #[arg(long, value_name = "CIDRS")]
    pub nodeport_addresses: Option<String>,
    /// How to tell local pod traffic: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// The cluster's pod CIDRs (comma-separated), for --detect-local-mode ClusterCIDR.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// The pods' bridge, for --detect-local-mode BridgeInterface.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// The pods' interface name prefix, for --detect-local-mode InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// Print the plan and exit, applying nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub mode: ProxyMode,
    pub hostname: String,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub source: String,
    pub kubeconfig: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
    pub lb_policy: String,
    pub userspace_bind_address: std::net::IpAddr,
    pub masquerade_all: bool,
    pub cluster_cidrs: Vec<String>,
    pub detect_local: DetectLocal,
    /// nodePortAddresses; empty means "primary" (the Node's addresses).
    pub node_port_addresses: Vec<crate::model::Cidr>,
    pub dry_run: bool,
}

/// detectLocalMode, as upstream: which sources count as this node's pods.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DetectLocal {
    #[default]
    None,
    ClusterCidr(Vec<String>),
    /// The Node's spec.podCIDRs, known once the Node object is.
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}

/// Fields of KubeProxyConfiguration v1alpha1 (top level); anything else is
/// warned about.
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

impl Settings {
    pub fn resolve(flags: &Flags) -> Result<Self> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --config {}", path.display()))?;
                parse_config(&text)
                    .with_context(|| format!("parsing --config {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mode = flags
            .proxy_mode
            .or(file.mode)
            .unwrap_or(ProxyMode::Userspace);
        let mode_section = |field: &str| {
            file.mode_sections
                .get(mode.as_str())
                .and_then(|s| s.get(field))
        };
        let duration_field = |field: &str| -> Result<Option<Duration>> {
            file.top
                .get(field)
                .or(mode_section(field))
                .and_then(Value::as_str)
                .map(parse_duration)
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        let hostname = flags
            .hostname_override
            .clone()
            .or(file
                .top
                .get("hostnameOverride")
                .and_then(Value::as_str)
                .map(str::to_string))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(hostname)
            .to_lowercase();
        let addr =
            |flag: &Option<String>, field: &str, default: &str| -> Result<Option<SocketAddr>> {
                let s = flag
                    .clone()
                    .or(file
                        .top
                        .get(field)
                        .and_then(Value::as_str)
                        .map(str::to_string))
                    .unwrap_or(default.into());
                parse_bind_address(&s).with_context(|| format!("{field} {s:?}"))
            };
        let settings = Settings {
            mode,
            hostname,
            healthz_bind_address: addr(
                &flags.healthz_bind_address,
                "healthzBindAddress",
                "0.0.0.0:10256",
            )?,
            metrics_bind_address: addr(
                &flags.metrics_bind_address,
                "metricsBindAddress",
                "127.0.0.1:10249",
            )?,
            min_sync_period: flags
                .min_sync_period
                .or(duration_field("minSyncPeriod")?)
                .unwrap_or(Duration::from_secs(1)),
            sync_period: flags
                .sync_period
                .or(duration_field("syncPeriod")?)
                .unwrap_or(Duration::from_secs(30)),
            source: flags.source.clone().unwrap_or_else(|| "kubernetes".into()),
            kubeconfig: flags.kubeconfig.clone().or_else(|| {
                file.top
                    .get("clientConnection")
                    .and_then(|c| c.get("kubeconfig"))
                    .and_then(Value::as_str)
                    .filter(|k| !k.is_empty())
                    .map(PathBuf::from)
            }),
            plugin_dir: flags.plugin_dir.clone(),
            lb_policy: flags
                .lb_policy
                .clone()
                .unwrap_or_else(|| "round-robin".into()),
            userspace_bind_address: flags
                .userspace_bind_address
                .unwrap_or([127, 0, 0, 1].into()),
            masquerade_all: mode_section("masqueradeAll")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            cluster_cidrs: flags
                .cluster_cidr
                .clone()
                .or(file
                    .top
                    .get("clusterCIDR")
                    .and_then(Value::as_str)
                    .map(str::to_string))
                .map(|s| {
                    s.split(',')
                        .map(|c| c.trim().to_string())
                        .filter(|c| !c.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            detect_local: DetectLocal::None,
            node_port_addresses: node_port_addresses(flags, &file)?,
            dry_run: flags.dry_run,
        };
        let mut settings = settings;
        settings.detect_local = detect_local(flags, &file, &settings.cluster_cidrs)?;
        if settings.min_sync_period > settings.sync_period {
            bail!(
                "minSyncPeriod ({:?}) is longer than syncPeriod ({:?})",
                settings.min_sync_period,
                settings.sync_period
            );
        }
        Ok(settings)
    }
}

/// `--nodeport-addresses` or `nodePortAddresses`: CIDRs, or "primary".
fn node_port_addresses(flags: &Flags, file: &FileConfig) -> Result<Vec<crate::model::Cidr>> {
    let list: Vec<String> = match &flags.nodeport_addresses {
        Some(s) => s
            .split(',')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
        None => file
            .top
            .get("nodePortAddresses")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
    };
    if list.iter().any(|c| c == "primary") {
        if list.len() > 1 {
            bail!("nodePortAddresses: \"primary\" cannot be combined with CIDRs");
        }
        return Ok(Vec::new());
    }
    list.iter()
        .map(|c| {
            c.parse()
                .map_err(|e: String| anyhow::anyhow!("nodePortAddresses: {e}"))
        })
        .collect()
}

/// Upstream's rules: the mode defaults to ClusterCIDR when a cluster CIDR
/// is known, else to no detection; each mode needs its parameter.
fn detect_local(flags: &Flags, file: &FileConfig, cluster_cidrs: &[String]) -> Result<DetectLocal> {
    let section = file.top.get("detectLocal").and_then(Value::as_mapping);
    let field = |flag: &Option<String>, key: &str| {
        flag.clone()
            .or_else(|| {
                section
                    .and_then(|m| m.get(key))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .filter(|s| !s.is_empty())
    };
    let mode = flags
        .detect_local_mode
        .clone()
        .or(file
            .top
            .get("detectLocalMode")
            .and_then(Value::as_str)
            .map(str::to_string))
        .unwrap_or_default();
    Ok(match mode.as_str() {
        "" | "ClusterCIDR" if cluster_cidrs.is_empty() => DetectLocal::None,
        "" | "ClusterCIDR" => DetectLocal::ClusterCidr(cluster_cidrs.to_vec()),
        "NodeCIDR" => DetectLocal::NodeCidr,
        "BridgeInterface" => DetectLocal::BridgeInterface(
            field(&flags.pod_bridge_interface, "bridgeInterface")
                .context("detectLocalMode BridgeInterface needs detectLocal.bridgeInterface")?,
        ),
        "InterfaceNamePrefix" => DetectLocal::InterfaceNamePrefix(
            field(&flags.pod_interface_name_prefix, "interfaceNamePrefix").context(
                "detectLocalMode InterfaceNamePrefix needs detectLocal.interfaceNamePrefix",
            )?,
        ),
        other => bail!(
            "unknown detectLocalMode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix)"
        ),
    })
}

#[derive(Debug, Default)]
struct FileConfig {
    top: serde_yaml::Mapping,
    mode: Option<ProxyMode>,
    mode_sections: std::collections::BTreeMap<String, serde_yaml::Mapping>,
}

fn parse_config(text: &str) -> Result<FileConfig> {
    let value: Value = serde_yaml::from_str(text).context("not YAML")?;
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
    for key in top.keys().filter_map(Value::as_str) {
        if !KNOWN_FIELDS.contains(&key) {
            tracing::warn!(field = key, "unknown KubeProxyConfiguration field ignored");
        }
    }
    let mode = match top.get("mode").and_then(Value::as_str).unwrap_or("") {
        "" => None,
        m => Some(ProxyMode::from_str(m, true).map_err(|_| anyhow::anyhow!("unknown mode {m:?}"))?),
    };
    let mode_sections = ["iptables", "ipvs", "nftables", "userspace"]
        .into_iter()
        .filter_map(|m| Some((m.to_string(), top.get(m)?.as_mapping()?.clone())))
        .collect();
    Ok(FileConfig {
        top,
        mode,
        mode_sections,
    })
}

/// `0.0.0.0:10256`, `:10256`, a bare IP (default port kept by the caller)
/// or "" (disabled).
fn parse_bind_address(s: &str) -> Result<Option<SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    let s = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    Ok(Some(s.parse().context("expected IP:port")?))
}

/// Go-style durations as kube-proxy takes them: `1s`, `500ms`, `1m30s`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(total);
    }
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(format!("{s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(digits);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?}: bad number {num:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
        };
        total += Duration::from_secs_f64(value * scale);
        rest = tail;
    }
    Ok(total)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Cli::parse_from(std::iter::once("kube-wasm-proxy").chain(args.iter().copied())).flags
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn config_file_is_read_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
             hostnameOverride: Node-A\nclusterCIDR: 10.244.0.0/16,fd00::/64\nmetricsBindAddress: 127.0.0.1:19249\n\
             nftables:\n  masqueradeAll: true\n  syncPeriod: 45s\n  minSyncPeriod: 2s\nsomethingNew: 1\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let s = Settings::resolve(&flags(&["--config", config])).unwrap();
        assert_eq!(s.mode, ProxyMode::Nftables);
        assert_eq!(s.hostname, "node-a");
        assert!(s.masquerade_all);
        assert_eq!(s.sync_period, Duration::from_secs(45));
        assert_eq!(s.min_sync_period, Duration::from_secs(2));
        assert_eq!(s.cluster_cidrs, ["10.244.0.0/16", "fd00::/64"]);
        assert_eq!(
            s.detect_local,
            DetectLocal::ClusterCidr(vec!["10.244.0.0/16".into(), "fd00::/64".into()])
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("127.0.0.1:19249".parse().unwrap())
        );
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );

        let s = Settings::resolve(&flags(&[
            "--config",
            config,
            "--proxy-mode",
            "userspace",
            "--sync-period",
            "10s",
        ]))
        .unwrap();
        assert_eq!(s.mode, ProxyMode::Userspace);
        assert_eq!(s.sync_period, Duration::from_secs(10));
    }

    #[test]
    fn detect_local_modes_follow_upstream() {
        let s = Settings::resolve(&flags(&[])).unwrap();
        assert_eq!(
            s.detect_local,
            DetectLocal::None,
            "no cluster CIDR, no detection"
        );
        let s = Settings::resolve(&flags(&[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "cni0",
        ]))
        .unwrap();
        assert_eq!(s.detect_local, DetectLocal::BridgeInterface("cni0".into()));
        let s = Settings::resolve(&flags(&["--detect-local-mode", "NodeCIDR"])).unwrap();
        assert_eq!(s.detect_local, DetectLocal::NodeCidr);
        assert!(
            Settings::resolve(&flags(&["--detect-local-mode", "InterfaceNamePrefix"])).is_err(),
            "prefix required"
        );
        assert!(Settings::resolve(&flags(&["--detect-local-mode", "Bogus"])).is_err());
        let s = Settings::resolve(&flags(&[
            "--nodeport-addresses",
            "10.0.0.0/8, 192.0.2.0/24",
        ]))
        .unwrap();
        assert_eq!(s.node_port_addresses.len(), 2);
        assert!(
            Settings::resolve(&flags(&["--nodeport-addresses", "primary"]))
                .unwrap()
                .node_port_addresses
                .is_empty()
        );
        assert!(
            Settings::resolve(&flags(&["--nodeport-addresses", "primary,10.0.0.0/8"])).is_err()
        );
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "kind: Pod\n").unwrap();
        let err = Settings::resolve(&flags(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(
            format!("{err:#}").contains("expected KubeProxyConfiguration"),
            "{err:#}"
        );
        let err = Settings::resolve(&flags(&["--min-sync-period", "1m", "--sync-period", "1s"]))
            .unwrap_err();
        assert!(err.to_string().contains("longer than syncPeriod"));
    }
}
