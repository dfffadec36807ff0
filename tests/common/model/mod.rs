//! An independent model checker for the kernel modes.
//!
//! `expected` derives, from the API objects alone (Services,
//! EndpointSlices, the Node), what every frontend should reach under
//! upstream kube-proxy's documented semantics: the set of endpoints, a
//! reject (no endpoints at all) or a drop (a Local policy with no local
//! endpoint, a source outside `loadBalancerSourceRanges`). `kernel`
//! follows the chains and maps kwp wrote (`nft -j list table`) for a
//! packet to each frontend and collects where it can go; `iptables` does
//! the same over `iptables-save`, and `ipvs` over the IPVS table
//! (`/proc/net/ip_vs`) with kwp's helper table. `check` compares
//! the two and names the Service and frontend of every difference.
//!
//! Nothing here uses the host's code (state, topology, proxier): the
//! point is a second, separate reading of the semantics. What the current
//! build is known to get wrong is in `divergences.rs`, in one place.

mod divergences;
mod expected;
#[cfg(test)]
mod fixtures;
mod iptables;
mod ipvs;
mod kernel;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_iptables;
#[cfg(test)]
mod tests_ipvs;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use iptables::Iptables;
pub use ipvs::{Ipvs, consistent_proc};
pub use kernel::Kernel;

/// The one place upstream's kernel modes differ in what a frontend
/// reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    /// A source outside `loadBalancerSourceRanges` is dropped, whatever
    /// the endpoints (the firewall check comes before everything).
    Nftables,
    /// The firewall chain exists only while the Service has endpoints
    /// (upstream's `usesFWChain := hasEndpoints && ...`), so without any
    /// an outsider is rejected like everyone else.
    Iptables,
}

/// A reading of the rules a kernel mode wrote: where a new connection to a
/// frontend can end.
pub trait KernelRules {
    fn reach(&self, f: &Frontend, view: &Viewpoint) -> anyhow::Result<Reach>;
    /// Whose documented semantics these rules are checked against.
    fn semantics(&self) -> Semantics;
}

impl KernelRules for Kernel {
    fn reach(&self, f: &Frontend, view: &Viewpoint) -> anyhow::Result<Reach> {
        Kernel::reach(self, f, view)
    }
    fn semantics(&self) -> Semantics {
        Semantics::Nftables
    }
}

impl KernelRules for Ipvs {
    fn reach(&self, f: &Frontend, view: &Viewpoint) -> anyhow::Result<Reach> {
        Ipvs::reach(self, f, view)
    }
    /// kwp's filter checks source ranges before endpoints, as nftables
    /// mode does (docs/ipvs.md).
    fn semantics(&self) -> Semantics {
        Semantics::Nftables
    }
}

impl KernelRules for Iptables {
    fn reach(&self, f: &Frontend, view: &Viewpoint) -> anyhow::Result<Reach> {
        Iptables::reach(self, f, view)
    }
    fn semantics(&self) -> Semantics {
        Semantics::Iptables
    }
}

/// The chain a jump names, refusing loops (deeper than 16) and dangling
/// jumps; both walkers follow jumps through it.
fn jump_target<'a, C>(
    chains: &'a std::collections::BTreeMap<String, C>,
    name: &str,
    depth: usize,
) -> anyhow::Result<&'a C> {
    use anyhow::Context;
    anyhow::ensure!(depth <= 16, "chain {name}: jumps nested deeper than 16");
    chains
        .get(name)
        .with_context(|| format!("jump to a chain that does not exist: {name}"))
}

/// The API objects the checker reads.
#[derive(Default, Clone)]
pub struct Api {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub node: Option<Node>,
}

/// Where the checker's packets come from: an address outside the
/// cluster, on an interface that is not a pod's.
#[derive(Clone, Debug)]
pub struct Viewpoint {
    pub node_name: String,
    pub client_v4: IpAddr,
    pub client_v6: IpAddr,
    pub in_interface: String,
}

impl Viewpoint {
    fn client(&self, ip: IpAddr) -> IpAddr {
        if ip.is_ipv4() {
            self.client_v4
        } else {
            self.client_v6
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u64 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// One address a client can send to, from one source address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    /// `namespace/name:port-name`
    pub service: String,
    pub kind: Kind,
    pub ip: IpAddr,
    pub proto: Proto,
    pub port: u16,
    pub source: IpAddr,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = format!("{:?}", self.proto).to_lowercase();
        write!(
            f,
            "{} {:?} {}/{proto} from {}",
            self.service,
            self.kind,
            SocketAddr::new(self.ip, self.port),
            self.source
        )
    }
}

/// What a new connection to a frontend can end in. A frontend reaches a
/// set of these: several endpoints, or (wrongly) an endpoint and a drop.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Endpoint(SocketAddr),
    /// ICMP unreachable: a Service with no endpoints.
    Reject,
    Drop,
    /// Accepted or passed untouched: kwp does not handle the frontend.
    NotCaptured,
}

pub type Reach = BTreeSet<Outcome>;

pub fn show(reach: &Reach) -> String {
    let items: Vec<String> = reach
        .iter()
        .map(|o| match o {
            Outcome::Endpoint(a) => a.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// A frontend whose kernel state differs from the model.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub frontend: Frontend,
    pub expected: Reach,
    pub kernel: Reach,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, the kernel reaches {}",
            self.frontend,
            show(&self.expected),
            show(&self.kernel)
        )
    }
}

/// The result of one comparison.
#[derive(Debug, Default)]
pub struct Report {
    pub frontends: usize,
    pub mismatches: Vec<Mismatch>,
    /// Differences that are exactly what a `KNOWN_DIVERGENCES` defect
    /// predicts: reported, not counted as failures.
    pub known: Vec<(Mismatch, &'static str)>,
}

impl Report {
    pub fn summary(&self, limit: usize) -> String {
        let mut out = format!(
            "{} frontends, {} mismatches, {} known divergences",
            self.frontends,
            self.mismatches.len(),
            self.known.len()
        );
        for m in self.mismatches.iter().take(limit) {
            out.push_str(&format!("\n  MISMATCH {m}"));
        }
        for (m, why) in self.known.iter().take(limit) {
            out.push_str(&format!("\n  known ({why}) {m}"));
        }
        out
    }
}

/// Compares the model's expectation for every frontend of `api` with what
/// `kernel` does. Errors when the kernel holds something the walker does
/// not understand (the checker must never pass by not looking).
pub fn check(api: &Api, view: &Viewpoint, kernel: &dyn KernelRules) -> anyhow::Result<Report> {
    let mut report = Report::default();
    for (frontend, expected) in expected::frontends(api, view, kernel.semantics()) {
        report.frontends += 1;
        let actual = kernel
            .reach(&frontend, view)
            .map_err(|e| e.context(format!("walking the kernel's rules for {frontend}")))?;
        if actual == expected {
            continue;
        }
        let mismatch = Mismatch {
            frontend: frontend.clone(),
            expected,
            kernel: actual,
        };
        match divergences::explains(api, view, &frontend, &mismatch.kernel) {
            Some(why) => report.known.push((mismatch, why)),
            None => report.mismatches.push(mismatch),
        }
    }
    Ok(report)
}

/// Every frontend of `api` with what it should reach (for probing).
pub fn expected_frontends(
    api: &Api,
    view: &Viewpoint,
    semantics: Semantics,
) -> Vec<(Frontend, Reach)> {
    expected::frontends(api, view, semantics)
}
