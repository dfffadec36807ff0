//! `--cleanup`, as kube-proxy's: removes what kwp may have left in the
//! kernel in any mode, then exits. `--cleanup-kube-proxy` removes upstream
//! kube-proxy's leftovers (its `kube-proxy` nftables tables, its KUBE-*
//! iptables chains and their jumps, its IPVS node-port services), so a
//! node can switch from kube-proxy to kwp or back with no stale rules.
//! Alone it leaves kwp's rules be, so it may run beside a running kwp
//! (the node-by-node switch-over); with `--cleanup` it removes both.
//!
//! What is kwp's, in every mode:
//! - nftables: the `kube-wasm-proxy` tables (ip, ip6, inet) and the
//!   userspace mode's redirect table `kube-wasm-proxy-userspace`;
//! - iptables: every `KWP-` chain of filter, nat and mangle, in both
//!   families and both backends (nft and legacy), and every rule of another
//!   chain that jumps to one;
//! - IPVS: virtual servers on a `kube-ipvs0` address or in kwp's record of
//!   node-address servers, then `kube-ipvs0` itself (its addresses go with
//!   it) and the record. Userspace listeners are sockets: they die with the
//!   process and need no cleanup.
//!
//! Everything else survives untouched: other tables, other chains, other
//! rules in the built-in chains, other virtual servers. Each step runs even
//! when an earlier one failed; the report lists what was removed and what
//! failed, and any failure makes the exit status 1 (as upstream).

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::dataplane::iptables::kernel::{Backend, IptablesKernel, IptablesProcess, parse_save};
use crate::dataplane::ipvs::kernel::{IpvsKernel, LINK_NAME, NetlinkIpvs, VirtualKey, missing};
use crate::dataplane::nftables::kernel::{NftKernel, NftProcess};

/// Upstream's nftables table (both families).
const KUBE_PROXY_NFT_TABLE: &str = "kube-proxy";
/// kwp's iptables chains.
const KWP_PREFIX: &str = "KWP-";
/// The iptables tables either proxy writes (kube-proxy's canary is in mangle).
const IPTABLES_TABLES: &[&str] = &["filter", "nat", "mangle"];

/// Upstream's fixed chain names, per table, of the iptables mode and the
/// IPVS mode (old releases included), as their cleanups name them.
/// KUBE-FIREWALL in filter and KUBE-KUBELET-CANARY are the kubelet's: kept.
const KUBE_PROXY_NAT: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-PROXY-CANARY",
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-FIREWALL",
];
const KUBE_PROXY_FILTER: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-NODE-PORT",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];
/// Upstream's per-Service and per-endpoint nat chains (XLB: before 1.24).
const KUBE_PROXY_SERVICE_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];
/// kube-apiserver's default node-port range: upstream's IPVS node-port
/// servers sit on node addresses, within it.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Whose leftovers to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    /// kwp's own (every mode).
    pub kwp: bool,
    /// Upstream kube-proxy's.
    pub kube_proxy: bool,
}

impl Scope {
    pub const KWP: Scope = Scope {
        kwp: true,
        kube_proxy: false,
    };
    pub const KUBE_PROXY: Scope = Scope {
        kwp: false,
        kube_proxy: true,
    };
    pub const BOTH: Scope = Scope {
        kwp: true,
        kube_proxy: true,
    };
}

/// Deletes a network interface: `Ok(false)` when there is none.
pub trait LinkKernel: Send {
    fn delete_link(&mut self, name: &str) -> Result<bool>;
}

/// The kernel interfaces cleanup works through; `None` where the node has
/// no such thing (no `nft` binary, no IPVS in the kernel).
pub struct Kernels {
    pub nft: Option<Box<dyn NftKernel>>,
    /// One per iptables backend present ("iptables-nft", "iptables-legacy").
    pub iptables: Vec<(String, Box<dyn IptablesKernel>)>,
    pub ipvs: Option<Box<dyn IpvsKernel>>,
    pub links: Box<dyn LinkKernel>,
    /// kwp's record of node-address virtual servers (and where to delete it).
    pub ipvs_record: Option<PathBuf>,
}

/// What cleanup did, one line an object.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    fn fail(&mut self, what: &str, e: anyhow::Error) {
        tracing::error!(error = format!("{e:#}"), "cleanup: {what}");
        self.errors.push(format!("{what}: {e:#}"));
    }
}

/// Removes everything of `scope` through `kernels`.
pub fn cleanup(kernels: &mut Kernels, scope: Scope) -> Report {
    let mut report = Report::default();
    match kernels.nft.as_mut() {
        Some(nft) => clean_nftables(nft.as_mut(), scope, &mut report),
        None => tracing::info!("no nft binary: no nftables rules to clean"),
    }
    for (label, ipt) in &mut kernels.iptables {
        for ipv6 in [false, true] {
            for table in IPTABLES_TABLES {
                clean_iptables_table(ipt.as_mut(), label, ipv6, table, scope, &mut report);
            }
        }
    }
    let record = kernels.ipvs_record.clone();
    match kernels.ipvs.as_mut() {
        Some(ipvs) => clean_ipvs(ipvs.as_mut(), record.as_ref(), scope, &mut report),
        None => tracing::info!("no IPVS in this kernel: no virtual servers to clean"),
    }
    // kube-ipvs0 and its servers are shared by name with upstream: a
    // running kwp in IPVS mode adopts the interface and deletes the
    // servers it does not want itself, so only --cleanup touches them.
    if !scope.kwp {
        return report;
    }
    match kernels.links.delete_link(LINK_NAME) {
        Ok(true) => report.removed.push(format!("interface {LINK_NAME}")),
        Ok(false) => {}
        Err(e) => report.fail(&format!("deleting interface {LINK_NAME}"), e),
    }
    if let Some(path) = record.filter(|_| scope.kwp) {
        match std::fs::remove_file(&path) {
            Ok(()) => report.removed.push(format!("file {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.fail(&format!("removing {}", path.display()), e.into()),
        }
    }
    report
}

/// The nftables tables of `scope`: (family, table).
fn nft_tables(scope: Scope) -> Vec<(&'static str, String)> {
    let ours = crate::plan::Rules::default().nft_table;
    let mut tables = Vec::new();
    if scope.kwp {
        tables.extend([
            ("ip", ours.clone()),
            ("ip6", ours.clone()),
            ("inet", ours),
            (
                "ip",
                crate::dataplane::userspace::REDIRECT_TABLE.to_string(),
            ),
        ]);
    }
    if scope.kube_proxy {
        tables.push(("ip", KUBE_PROXY_NFT_TABLE.into()));
        tables.push(("ip6", KUBE_PROXY_NFT_TABLE.into()));
    }
    tables
}

fn clean_nftables(nft: &mut dyn NftKernel, scope: Scope, report: &mut Report) {
    for (family, table) in nft_tables(scope) {
        // One delete, no listing first: "missing" is the common answer.
        match nft.run(&format!("delete table {family} {table}\n")) {
            Ok(()) => report
                .removed
                .push(format!("nftables table {family} {table}")),
            Err(e) if format!("{e:#}").contains("No such file or directory") => {}
            Err(e) => report.fail(&format!("deleting nftables table {family} {table}"), e),
        }
    }
}

/// Whether `chain` of `table` is one cleanup removes.
fn doomed_chain(table: &str, chain: &str, scope: Scope) -> bool {
    if chain.starts_with(KWP_PREFIX) {
        return scope.kwp;
    }
    if !scope.kube_proxy {
        return false;
    }
    match table {
        "nat" => {
            KUBE_PROXY_NAT.contains(&chain)
                || KUBE_PROXY_SERVICE_PREFIXES
                    .iter()
                    .any(|p| chain.starts_with(p))
        }
        "filter" => KUBE_PROXY_FILTER.contains(&chain),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// The chain a rule jumps or goes to (`-j X`, `-g X`): the last one, as
/// iptables-save prints the target after every match (comments included).
fn rule_target(rule: &str) -> Option<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .windows(2)
        .rev()
        .find(|w| matches!(w[0], "-j" | "-g" | "--jump" | "--goto"))
        .map(|w| w[1])
}

/// The restore text that removes the doomed chains of one table (flush,
/// unlink, delete, in one transaction), or `None` when there are none.
fn iptables_cleanup_script(
    table: &str,
    saved: &std::collections::BTreeMap<String, Vec<String>>,
    scope: Scope,
) -> Option<(String, Vec<String>)> {
    let doomed: BTreeSet<&String> = saved
        .keys()
        .filter(|c| doomed_chain(table, c, scope))
        .collect();
    let mut unlink = Vec::new();
    for (chain, rules) in saved.iter().filter(|(c, _)| !doomed.contains(c)) {
        for rule in rules {
            if rule_target(rule).is_some_and(|t| doomed.iter().any(|d| d.as_str() == t)) {
                unlink.push(format!("-D {chain} {rule}"));
            }
        }
    }
    if doomed.is_empty() && unlink.is_empty() {
        return None;
    }
    let mut text = format!("*{table}\n");
    for chain in &doomed {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for line in &unlink {
        text.push_str(line);
        text.push('\n');
    }
    for chain in &doomed {
        text.push_str(&format!("-X {chain}\n"));
    }
    text.push_str("COMMIT\n");
    Some((text, doomed.into_iter().cloned().collect()))
}

fn clean_iptables_table(
    ipt: &mut dyn IptablesKernel,
    label: &str,
    ipv6: bool,
    table: &str,
    scope: Scope,
    report: &mut Report,
) {
    let family = if ipv6 { "ipv6" } else { "ipv4" };
    let what = format!("{label} {family} table {table}");
    let saved = match ipt.save(ipv6, table) {
        Ok(text) => parse_save(&text),
        Err(e) => return report.fail(&format!("reading {what}"), e),
    };
    let Some((script, chains)) = iptables_cleanup_script(table, &saved, scope) else {
        return;
    };
    match ipt.restore(ipv6, table, &script) {
        Ok(()) => report
            .removed
            .extend(chains.iter().map(|c| format!("{what} chain {c}"))),
        Err(e) => report.fail(&format!("cleaning {what}"), e),
    }
}

/// kwp's record of node-address virtual servers (`tcp 10.0.0.1:30080`).
fn read_record(path: Option<&PathBuf>) -> BTreeSet<VirtualKey> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let (proto, addr) = l.split_once(' ')?;
            Some(VirtualKey {
                protocol: proto.to_uppercase().parse().ok()?,
                address: addr.parse().ok()?,
            })
        })
        .collect()
}

fn clean_ipvs(
    ipvs: &mut dyn IpvsKernel,
    record: Option<&PathBuf>,
    scope: Scope,
    report: &mut Report,
) {
    let recorded = read_record(record);
    let bound = if !scope.kwp {
        BTreeSet::new()
    } else {
        match ipvs.link_addresses() {
            Ok(b) => b,
            Err(e) => return report.fail(&format!("listing the addresses of {LINK_NAME}"), e),
        }
    };
    let node = if scope.kube_proxy {
        match ipvs.node_addresses() {
            Ok(n) => n,
            Err(e) => return report.fail("listing the node's addresses", e),
        }
    } else {
        BTreeSet::new()
    };
    let services = match ipvs.services() {
        Ok(s) => s,
        Err(e) => return report.fail("listing IPVS virtual servers", e),
    };
    for vs in services {
        let key = vs.key;
        let ip = key.address.ip();
        let kwps = bound.contains(&ip) || recorded.contains(&key);
        // Recorded node ports are a (maybe running) kwp's.
        let upstreams = !recorded.contains(&key)
            && node.contains(&ip)
            && NODE_PORTS.contains(&key.address.port());
        let ours = (scope.kwp && kwps) || (scope.kube_proxy && upstreams);
        if !ours {
            continue; // someone else's virtual server
        }
        match ipvs
            .delete_service(&key)
            .or_else(|e| if missing(&e) { Ok(()) } else { Err(e) })
        {
            Ok(()) => report.removed.push(format!("IPVS virtual server {key}")),
            Err(e) => report.fail(&format!("deleting IPVS virtual server {key}"), e),
        }
    }
}

/// rtnetlink RTM_DELLINK by name.
struct NetlinkLinks;

impl LinkKernel for NetlinkLinks {
    fn delete_link(&mut self, name: &str) -> Result<bool> {
        use crate::dataplane::ipvs::netlink::{Attrs, NLM_F_ACK, Socket};
        const RTM_DELLINK: u16 = 17;
        const IFLA_IFNAME: u16 = 3;
        let mut sock = Socket::open(libc::NETLINK_ROUTE).context("rtnetlink socket")?;
        let mut a = Attrs::default();
        a.str(IFLA_IFNAME, name);
        // struct ifinfomsg, all zero: the name selects the interface.
        let mut payload = vec![0u8; 16];
        payload.extend_from_slice(&a.0);
        match sock.request(RTM_DELLINK, NLM_F_ACK, &payload) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting interface {name}")),
        }
    }
}

/// The legacy backend, reading only tables the kernel already has: saving
/// a legacy table loads its module and registers it, a side effect
/// cleanup should not have; a table never registered holds no rules.
struct LegacyIfLoaded(IptablesProcess);

impl LegacyIfLoaded {
    fn loaded(ipv6: bool, table: &str) -> bool {
        let names = if ipv6 {
            "/proc/net/ip6_tables_names"
        } else {
            "/proc/net/ip_tables_names"
        };
        std::fs::read_to_string(names).is_ok_and(|t| t.lines().any(|l| l.trim() == table))
    }
}

impl IptablesKernel for LegacyIfLoaded {
    fn restore(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        self.0.restore(ipv6, table, text)
    }
    fn check(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        self.0.check(ipv6, table, text)
    }
    fn save(&mut self, ipv6: bool, table: &str) -> Result<String> {
        if !Self::loaded(ipv6, table) {
            return Ok(String::new());
        }
        self.0.save(ipv6, table)
    }
    fn chain_rules(&mut self, ipv6: bool, table: &str, chain: &str) -> Result<Option<Vec<String>>> {
        if !Self::loaded(ipv6, table) {
            return Ok(None);
        }
        self.0.chain_rules(ipv6, table, chain)
    }
    fn enable_route_localnet(&mut self) -> Result<()> {
        anyhow::bail!("cleanup removes rules; it never turns route_localnet on")
    }
}

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

impl Kernels {
    /// This node's: every iptables backend installed (rules may sit in
    /// either, whichever one a previous run used), IPVS only where the
    /// kernel has it loaded (no IPVS module, no virtual servers).
    pub fn real() -> Self {
        let mut iptables: Vec<(String, Box<dyn IptablesKernel>)> = Vec::new();
        if installed("iptables-nft-save") {
            iptables.push((
                "iptables-nft".into(),
                Box::new(IptablesProcess {
                    backend: Backend::Nft,
                }),
            ));
        }
        if installed("iptables-legacy-save") {
            iptables.push((
                "iptables-legacy".into(),
                Box::new(LegacyIfLoaded(IptablesProcess {
                    backend: Backend::Legacy,
                })),
            ));
        }
        if iptables.is_empty() && installed("iptables-save") {
            iptables.push((
                "iptables".into(),
                Box::new(IptablesProcess {
                    backend: Backend::Default,
                }),
            ));
        }
        let ipvs: Option<Box<dyn IpvsKernel>> = std::path::Path::new("/proc/net/ip_vs")
            .exists()
            .then(|| Box::new(NetlinkIpvs::new()) as Box<dyn IpvsKernel>);
        Self {
            nft: installed("nft").then(|| Box::new(NftProcess) as Box<dyn NftKernel>),
            iptables,
            ipvs,
            links: Box::new(NetlinkLinks),
            ipvs_record: Some(crate::dataplane::ipvs::DEFAULT_RECORD.into()),
        }
    }
}

/// `kube-wasm-proxy --cleanup [--cleanup-kube-proxy]`: refuses while a kwp
/// programs this node (it would put its rules straight back), prints what
/// it removed, fails if anything could not be removed.
pub fn run(scope: Scope) -> Result<()> {
    // Only kube-proxy's leftovers: a running kwp may stay.
    let _lock = match scope.kwp {
        true => Some(
            crate::instance_lock::InstanceLock::acquire(crate::instance_lock::NODE_RULES_LOCK)
                .context("--cleanup")?,
        ),
        false => None,
    };
    let report = cleanup(&mut Kernels::real(), scope);
    for line in &report.removed {
        println!("removed {line}");
    }
    if report.removed.is_empty() {
        println!("nothing to remove");
    }
    if !report.errors.is_empty() {
        anyhow::bail!(
            "cleanup left {} thing(s) behind:\n  {}",
            report.errors.len(),
            report.errors.join("\n  ")
        );
    }
    Ok(())
}
