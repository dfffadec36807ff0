//! What the host applies besides virtual servers, from the
//! KubeProxyConfiguration `ipvs` section and upstream's fixed choices:
//! sysctls, `strictARP`, IPVS's connection timeouts, `excludeCIDRs`.
//! Applied at every full reconcile (start and syncPeriod), writing only
//! values that differ; a failure is logged and retried next time.

use super::IpvsDataplane;
use super::kernel::Timeouts;
use crate::model::Cidr;

/// The host-applied part of the `ipvs` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsSettings {
    /// `ipvs.strictARP`: arp_ignore=1, arp_announce=2 on all interfaces,
    /// so the node answers ARP only for addresses of the asking interface
    /// (not for the kube-ipvs0 addresses; MetalLB's L2 mode needs it).
    pub strict_arp: bool,
    /// `ipvs.tcpTimeout`, `tcpFinTimeout`, `udpTimeout` in seconds; 0
    /// leaves the kernel's value.
    pub timeouts: Timeouts,
    /// `ipvs.excludeCIDRs`: virtual servers on these addresses are never
    /// deleted, even on an address of ours.
    pub exclude_cidrs: Vec<Cidr>,
}

impl IpvsSettings {
    pub fn excluded(&self, ip: std::net::IpAddr) -> bool {
        self.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    /// The sysctls to hold, for a kernel of `release`.
    fn sysctls(&self, release: &str) -> Vec<(&'static str, &'static str)> {
        let mut wanted = vec![
            // IPVS connections are visible to conntrack (masquerade).
            ("net/ipv4/vs/conntrack", "1"),
            // Connections of a removed real server are dropped, not kept.
            ("net/ipv4/vs/expire_nodest_conn", "1"),
            // Persistence templates of a weight-0 server expire.
            ("net/ipv4/vs/expire_quiescent_template", "1"),
            ("net/ipv4/ip_forward", "1"),
        ];
        // From 4.1 (where it exists) to before 5.9, a reused source port
        // skipped the scheduler; 5.9 fixed it and upstream leaves it as is.
        if !kernel_before(release, (4, 1)) && kernel_before(release, (5, 9)) {
            wanted.push(("net/ipv4/vs/conn_reuse_mode", "0"));
        }
        if self.strict_arp {
            wanted.push(("net/ipv4/conf/all/arp_ignore", "1"));
            wanted.push(("net/ipv4/conf/all/arp_announce", "2"));
        }
        wanted
    }
}

impl IpvsDataplane {
    /// Sysctls and timeouts; see the module comment.
    pub(super) fn apply_host_settings(&mut self) {
        let release = self.kernel.sysctl("kernel/osrelease").unwrap_or_default();
        for (name, value) in self.settings.sysctls(&release) {
            if self.kernel.sysctl(name).ok().as_deref() == Some(value) {
                continue;
            }
            if let Err(e) = self.kernel.set_sysctl(name, value) {
                tracing::warn!(
                    sysctl = name,
                    error = format!("{e:#}"),
                    "setting an IPVS sysctl"
                );
            }
        }
        let wanted = self.settings.timeouts;
        if wanted.is_unset() {
            return;
        }
        let result = self.kernel.timeouts().and_then(|current| {
            if wanted.over(current) == current {
                return Ok(());
            }
            self.calls += 1;
            self.kernel.set_timeouts(&wanted)
        });
        if let Err(e) = result {
            self.failures += 1;
            tracing::warn!(timeouts = ?wanted, error = format!("{e:#}"), "setting IPVS timeouts");
        }
    }
}

/// `release` ("6.1.0-57-cloud-amd64") is older than `(major, minor)`;
/// unparsable counts as new.
fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let m = parts.next().and_then(|p| p.parse::<u32>().ok());
    let n = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (m, n) {
        (Some(m), Some(n)) => (m, n) < (major, minor),
        _ => false,
    }
}
