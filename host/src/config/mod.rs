//! Configuration: kube-proxy-compatible flags and a KubeProxyConfiguration
//! (kubeproxy.config.k8s.io/v1alpha1) file. Flags given on the command line
//! override the file; unknown fields in the file are warned about, never
//! fatal, so a config written for kube-proxy works as it is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_yaml_ng::Value;

use crate::model::Cidr;
pub(crate) use file::FileConfig;
use values::Named;
pub use values::parse_duration;

pub mod file;
#[cfg(test)]
mod tests;
pub mod values;

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
#[command(name = "kube-wasm-proxy", about, long_about = None, disable_version_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the version, the WIT contract version and the bundled plugins' digests.
    #[arg(long, short = 'V')]
    pub version: bool,
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
    /// List the Services a running proxy handles: policy, plugin and
    /// digest, endpoints, rules, last sync result (read from its metrics
    /// server's /inspect).
    Inspect {
        /// The proxy's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// With --source file: the node-port range the objects must keep to, as
    /// kube-apiserver's flag of that name enforces it for the API
    /// (default 30000-32767). Node ports outside it are not programmed.
    #[arg(long, value_name = "FIRST-LAST")]
    pub service_node_port_range: Option<String>,
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
    /// Addresses node ports answer on: "primary" (the Node's addresses; the default, except in iptables mode, where it is every local address) or CIDRs (local addresses within them), comma-separated.
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
    /// iptables mode: node ports answer on 127.0.0.1 too (sets route_localnet=1), as kube-proxy's flag; overrides iptables.localhostNodePorts (default true).
    #[arg(long, value_name = "BOOL")]
    pub iptables_localhost_nodeports: Option<bool>,
    /// Print the plan and exit, applying nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wall-clock budget of one call into a plugin (default 100ms); raise it only on a very slow
    /// machine (an emulated CPU runs Wasm tens of times slower), never to let a bad plugin run.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub plugin_call_timeout: Option<Duration>,
    /// Deadline of one call of a kernel tool (nft, iptables-restore, iptables-save, conntrack)
    /// before its allowance per line of input (default 30s). A tool past its deadline is killed,
    /// the sync fails and is retried, and that tool's next call gets twice as long (up to 8x).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub kernel_tool_timeout: Option<Duration>,
    /// What each line of a kernel tool's input adds to its deadline (default 250us).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub kernel_tool_timeout_per_line: Option<Duration>,
    /// Remove every table, chain, jump, virtual server and interface kwp
    /// may have created in any mode, then exit (as kube-proxy's --cleanup).
    #[arg(long)]
    pub cleanup: bool,
    /// Remove upstream kube-proxy's leftovers (its `kube-proxy` nftables
    /// tables, KUBE-* iptables chains and jumps, IPVS node-port services),
    /// then exit; kwp's own rules stay unless --cleanup is given too, so it
    /// may run while kwp programs the node (switch-over).
    #[arg(long)]
    pub cleanup_kube_proxy: bool,
    /// Log verbosity, as kube-proxy's (klog) --v: up to 3 info, 4 debug, 5 and more trace.
    #[arg(long = "v", value_name = "N")]
    pub verbosity: Option<u8>,
    /// Log format, as kube-proxy's --logging-format: text or json.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub logging_format: Option<crate::logging::LoggingFormat>,
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
    /// Node ports objects may use: the file source has no API server to
    /// enforce it; `None` for the kubernetes source, whose API server did.
    pub node_port_range: Option<std::ops::RangeInclusive<u16>>,
    pub kubeconfig: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
    pub lb_policy: String,
    pub userspace_bind_address: std::net::IpAddr,
    pub masquerade_all: bool,
    pub cluster_cidrs: Vec<Cidr>,
    pub detect_local: DetectLocal,
    /// nodePortAddresses; empty means "primary" (the Node's addresses).
    pub node_port_addresses: Vec<Cidr>,
    /// The chosen mode's KubeProxyConfiguration section as JSON, for the
    /// mode plugin (see `file::mode_extra`).
    pub mode_extra: String,
    /// The `ipvs` section, typed, in IPVS mode (the host applies part of it).
    pub ipvs: Option<file::IpvsSection>,
    pub dry_run: bool,
    /// KubeProxyConfiguration's `conntrack`: what it sets, nothing more.
    pub conntrack: crate::conntrack_sysctls::ConntrackConfig,
}

pub use crate::model::DetectLocal;

impl Settings {
    pub fn resolve(flags: &Flags) -> Result<Self> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --config {}", path.display()))?;
                FileConfig::parse(&text).with_context(|| format!("--config {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Self::resolve_file(flags, file)
    }

    /// The settings from the flags and an already parsed `--config` file.
    pub(crate) fn resolve_file(flags: &Flags, file: FileConfig) -> Result<Self> {
        let in_file = |e: anyhow::Error| match &flags.config {
            Some(path) => e.context(format!("--config {}", path.display())),
            None => e,
        };
        let mode = flags
            .proxy_mode
            .or(file.mode)
            .unwrap_or(ProxyMode::Userspace);
        check_mode_flags(flags, mode)?;
        // Upstream validates the iptables section whatever the mode.
        file.iptables().map_err(in_file)?;
        let duration = |flag: Option<Duration>, flag_name, key, default| -> Result<_> {
            Ok(match flag {
                Some(value) => Named {
                    value,
                    name: flag_name,
                },
                None => file
                    .sync_duration(key, mode)
                    .map_err(in_file)?
                    .unwrap_or(Named {
                        value: default,
                        name: key,
                    }),
            })
        };
        let sync = duration(
            flags.sync_period,
            "--sync-period",
            "syncPeriod",
            Duration::from_secs(30),
        )?;
        let min_sync = duration(
            flags.min_sync_period,
            "--min-sync-period",
            "minSyncPeriod",
            Duration::from_secs(1),
        )?;
        values::check_sync_periods(sync, min_sync)?;
        let addr = |flag: &Option<String>, flag_name: &str, key, default: &str| {
            match flag {
                Some(text) => values::bind_address(text, flag_name),
                None => match file.string(key)? {
                    Some(text) => values::bind_address(text, key),
                    None => values::bind_address(default, key),
                },
            }
            .map_err(in_file)
        };
        let cluster_cidrs = cluster_cidrs(flags, &file).map_err(in_file)?;
        Ok(Settings {
            mode,
            hostname: node_name(flags, &file).map_err(in_file)?,
            healthz_bind_address: addr(
                &flags.healthz_bind_address,
                "--healthz-bind-address",
                "healthzBindAddress",
                "0.0.0.0:10256",
            )?,
            metrics_bind_address: addr(
                &flags.metrics_bind_address,
                "--metrics-bind-address",
                "metricsBindAddress",
                "127.0.0.1:10249",
            )?,
            min_sync_period: min_sync.value,
            sync_period: sync.value,
            source: flags.source.clone().unwrap_or_else(|| "kubernetes".into()),
            node_port_range: node_port_range(flags)?,
            kubeconfig: match &flags.kubeconfig {
                Some(path) => Some(path.clone()),
                None => kubeconfig_field(&file).map_err(in_file)?,
            },
            plugin_dir: flags.plugin_dir.clone(),
            lb_policy: flags
                .lb_policy
                .clone()
                .unwrap_or_else(|| "round-robin".into()),
            userspace_bind_address: flags
                .userspace_bind_address
                .unwrap_or([127, 0, 0, 1].into()),
            masquerade_all: file.masquerade_all(mode).map_err(in_file)?,
            detect_local: detect_local(flags, &file, &cluster_cidrs).map_err(in_file)?,
            cluster_cidrs,
            node_port_addresses: node_port_addresses(flags, &file).map_err(in_file)?,
            mode_extra: with_node_port_addresses(
                mode,
                file::mode_extra(mode, &file, sync.value, min_sync.value).map_err(in_file)?,
                flags,
                &file,
            )
            .map_err(in_file)?,
            ipvs: match mode {
                ProxyMode::Ipvs => Some(file.ipvs().map_err(in_file)?),
                _ => None,
            },
            dry_run: flags.dry_run,
            conntrack: file.conntrack().map_err(in_file)?,
        })
    }
}

/// Flags that only mean something in one mode are errors elsewhere, not
/// silently ignored.
fn check_mode_flags(flags: &Flags, mode: ProxyMode) -> Result<()> {
    if flags.iptables_localhost_nodeports.is_some() && mode != ProxyMode::Iptables {
        bail!(
            "--iptables-localhost-nodeports applies to --proxy-mode iptables only (the mode is {})",
            mode.as_str()
        );
    }
    if mode != ProxyMode::Userspace {
        if flags.no_redirect {
            bail!(
                "--no-redirect applies to --proxy-mode userspace only (the mode is {})",
                mode.as_str()
            );
        }
        if flags.userspace_bind_address.is_some() {
            bail!(
                "--userspace-bind-address applies to --proxy-mode userspace only (the mode is {})",
                mode.as_str()
            );
        }
    }
    Ok(())
}

/// `--service-node-port-range`, for the file source only: the API server
/// enforces its own range on what the kubernetes source reads.
fn node_port_range(flags: &Flags) -> Result<Option<std::ops::RangeInclusive<u16>>> {
    let from_files = flags
        .source
        .as_deref()
        .is_some_and(|s| s.starts_with("file:"));
    match (&flags.service_node_port_range, from_files) {
        (None, false) => Ok(None),
        (Some(_), false) => bail!(
            "--service-node-port-range applies to --source file: only (the API server enforces its own)"
        ),
        (None, true) => Ok(Some(30000..=32767)),
        (Some(text), true) => values::port_range(text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--service-node-port-range: {e}")),
    }
}

/// The node name: --hostname-override, hostnameOverride, else the
/// machine's hostname; trimmed and lowercased as upstream does, and it must
/// be a valid Node name (a DNS-1123 subdomain).
fn node_name(flags: &Flags, file: &FileConfig) -> Result<String> {
    let (text, name) = match (&flags.hostname_override, file.string("hostnameOverride")?) {
        (Some(h), _) if !h.trim().is_empty() => (h.clone(), "--hostname-override"),
        (_, Some(h)) if !h.trim().is_empty() => (h.to_string(), "hostnameOverride"),
        _ => (
            hostname(),
            "the machine's hostname (set --hostname-override to the Node's name)",
        ),
    };
    let node = text.trim().to_lowercase();
    values::dns1123_subdomain(&node).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(node)
}

fn kubeconfig_field(file: &FileConfig) -> Result<Option<PathBuf>> {
    let Some(client) = file.section("clientConnection")? else {
        return Ok(None);
    };
    match client.get("kubeconfig") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(k)) if k.is_empty() => Ok(None),
        Some(Value::String(k)) => Ok(Some(PathBuf::from(k))),
        Some(other) => bail!("clientConnection.kubeconfig: expected a path, got {other:?}"),
    }
}

/// `--cluster-cidr` or clusterCIDR: one CIDR, or two of different
/// families (dual stack), as upstream.
fn cluster_cidrs(flags: &Flags, file: &FileConfig) -> Result<Vec<Cidr>> {
    let (text, name) = match &flags.cluster_cidr {
        Some(s) => (s.as_str(), "--cluster-cidr"),
        None => match file.string("clusterCIDR")? {
            Some(s) => (s, "clusterCIDR"),
            None => return Ok(Vec::new()),
        },
    };
    let cidrs = values::cidr_list(text, name)?;
    match cidrs.as_slice() {
        [a, b] if a.address.is_ipv4() == b.address.is_ipv4() => {
            bail!("{name}: {text:?}: two CIDRs must be one IPv4 and one IPv6 (dual stack)")
        }
        [_, _, _, ..] => bail!("{name}: {text:?}: at most two CIDRs (one per IP family)"),
        _ => Ok(cidrs),
    }
}

/// iptables mode tells "unset" (upstream: every local address) from
/// "primary" (the node's IPs), which `node_port_addresses` folds
/// together, so its plugin gets the list as given; and
/// `--iptables-localhost-nodeports` overrides the file.
fn with_node_port_addresses(
    mode: ProxyMode,
    extra: String,
    flags: &Flags,
    file: &FileConfig,
) -> Result<String> {
    if mode != ProxyMode::Iptables {
        return Ok(extra);
    }
    let mut json: serde_json::Value = serde_json::from_str(&extra).context("mode section")?;
    json["nodePortAddresses"] = given_node_port_addresses(flags, file)?.0.into();
    if let Some(on) = flags.iptables_localhost_nodeports {
        json["localhostNodePorts"] = on.into();
    }
    Ok(json.to_string())
}

/// `--nodeport-addresses` or `nodePortAddresses` as given, and its name.
fn given_node_port_addresses(
    flags: &Flags,
    file: &FileConfig,
) -> Result<(Vec<String>, &'static str)> {
    Ok(match &flags.nodeport_addresses {
        Some(s) => (
            s.split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            "--nodeport-addresses",
        ),
        None => (
            file.strings("nodePortAddresses")?.unwrap_or_default(),
            "nodePortAddresses",
        ),
    })
}

/// `--nodeport-addresses` or `nodePortAddresses`: CIDRs, or "primary".
fn node_port_addresses(flags: &Flags, file: &FileConfig) -> Result<Vec<Cidr>> {
    let (list, name) = given_node_port_addresses(flags, file)?;
    if list.iter().any(|c| c == "primary") {
        if list.len() > 1 {
            bail!("{name}: \"primary\" cannot be combined with CIDRs");
        }
        return Ok(Vec::new());
    }
    list.iter().map(|c| values::cidr(c, name)).collect()
}

/// Upstream's rules: the mode defaults to ClusterCIDR when a cluster CIDR
/// is known, else to no detection; each mode needs its parameter, and a
/// parameter given on the command line for another mode is an error.
fn detect_local(flags: &Flags, file: &FileConfig, cluster_cidrs: &[Cidr]) -> Result<DetectLocal> {
    let section = file.section("detectLocal")?;
    let field = |key: &'static str| -> Result<Option<String>> {
        match section.and_then(|m| m.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("detectLocal.{key}: expected a string, got {other:?}"),
        }
    };
    let bridge = match (&flags.pod_bridge_interface, field("bridgeInterface")?) {
        (Some(b), _) => Some(values::interface_name(b, "--pod-bridge-interface")?),
        (None, Some(b)) => Some(values::interface_name(&b, "detectLocal.bridgeInterface")?),
        (None, None) => None,
    };
    let prefix = match (
        &flags.pod_interface_name_prefix,
        field("interfaceNamePrefix")?,
    ) {
        (Some(p), _) => Some(values::interface_prefix(p, "--pod-interface-name-prefix")?),
        (None, Some(p)) => Some(values::interface_prefix(
            &p,
            "detectLocal.interfaceNamePrefix",
        )?),
        (None, None) => None,
    };
    let mode = match &flags.detect_local_mode {
        Some(m) => m.clone(),
        None => file.string("detectLocalMode")?.unwrap_or("").to_string(),
    };
    if flags.pod_bridge_interface.is_some() && mode != "BridgeInterface" {
        bail!("--pod-bridge-interface applies to --detect-local-mode BridgeInterface only");
    }
    if flags.pod_interface_name_prefix.is_some() && mode != "InterfaceNamePrefix" {
        bail!(
            "--pod-interface-name-prefix applies to --detect-local-mode InterfaceNamePrefix only"
        );
    }
    Ok(match mode.as_str() {
        "" | "ClusterCIDR" if cluster_cidrs.is_empty() => DetectLocal::None,
        "" | "ClusterCIDR" => DetectLocal::ClusterCidr(cluster_cidrs.to_vec()),
        "NodeCIDR" => DetectLocal::NodeCidr,
        "BridgeInterface" => DetectLocal::BridgeInterface(bridge.context(
            "detectLocalMode BridgeInterface needs --pod-bridge-interface or detectLocal.bridgeInterface",
        )?),
        "InterfaceNamePrefix" => DetectLocal::InterfaceNamePrefix(prefix.context(
            "detectLocalMode InterfaceNamePrefix needs --pod-interface-name-prefix or detectLocal.interfaceNamePrefix",
        )?),
        other => bail!(
            "detectLocalMode: unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix)"
        ),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
