//! The proxy's view of the cluster: upstream kube-proxy's ServicePort and
//! Endpoint, in native types. Converted to the WIT types at the plugin
//! boundary (see `plugin::convert`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

/// Which object: namespace and name, as upstream's NamespacedName (an
/// object without a namespace is in `default`, as the API server puts it).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which Service port: namespace/name, port name and protocol, as
/// upstream's ServicePortName. Ordered so that plans print stably.
///
/// The key of a dozen maps (state, frontends, policies, plan, dataplane,
/// inspect): its strings are shared, so a copy is three reference counts,
/// not three allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl ServicePortName {
    /// The Service this port belongs to.
    pub fn service(&self) -> ObjectKey {
        ObjectKey::new(&*self.namespace, &*self.name)
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IpMode {
    #[default]
    Vip,
    Proxy,
}

/// An address prefix such as 10.0.0.0/8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR"))?;
        let address: IpAddr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix_len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Cidr {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                net.to_bits().into(),
                ip.to_bits().into(),
                32,
                self.prefix_len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), 128, self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u32, len: u8) -> bool {
    let shift = bits - u32::from(len);
    shift >= bits || (a >> shift) == (b >> shift)
}

/// One port of one Service (upstream's ServicePort interface).
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ingress: Vec<(IpAddr, IpMode)>,
    pub source_ranges: Vec<Cidr>,
    /// ClientIP affinity timeout in seconds; `None` for no affinity.
    pub affinity_timeout: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    /// `kube-wasm-proxy.io/lb-policy`, if set.
    pub lb_policy: Option<String>,
    /// `kube-wasm-proxy.io/lb-policy-config`, "" if unset.
    pub lb_policy_config: String,
}

impl ServicePort {
    /// Whether traffic can arrive from outside the cluster network (a node
    /// port, an external IP or a load-balancer IP), as upstream's
    /// ExternallyAccessible: only then does the external policy matter.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ingress.is_empty()
    }
}

/// One endpoint of a service port, merged from the Service's EndpointSlices.
///
/// Held several times per endpoint (its slice, the merged list, the sets
/// pushed to a policy), so kept small: node and zone names are shared
/// ([`Names`]), hints (rare) take no room when absent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Box<[String]>,
    pub node_hints: Box<[String]>,
    pub is_local: bool,
}

/// Node and zone names, each held once however many endpoints name it.
#[derive(Default)]
pub struct Names {
    names: std::collections::HashSet<Arc<str>>,
    /// How many names there were after the last pruning.
    kept: usize,
}

impl Names {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        // Names no endpoint uses any more (nodes gone) go when the set has
        // doubled since the last pruning: it stays proportional to the
        // names in use.
        if self.names.len() >= 2 * self.kept.max(64) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.names.len();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }
}

impl Endpoint {
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        (self.ip, self.port).into()
    }

    /// A ready, local endpoint (probes of reload candidates).
    pub fn sample(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            zone_hints: Box::default(),
            node_hints: Box::default(),
            is_local: true,
        }
    }
}

/// This node, as far as the proxy cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// spec.podCIDRs, for detectLocalMode NodeCIDR.
    pub pod_cidrs: Vec<String>,
    pub zone: Option<String>,
    pub labels: Vec<(String, String)>,
}

/// Every address on this host's interfaces (in this network namespace).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(u32::from_be(a.sin_addr.s_addr).into()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(a.sin6_addr.s6_addr.into()));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_include_loopback() {
        assert!(local_addresses().contains(&IpAddr::V4([127, 0, 0, 1].into())));
    }

    #[test]
    fn cidr_parses_and_matches() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6: Cidr = "fd00::/64".parse().unwrap();
        assert!(v6.contains("fd00::5".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }
}

/// How a policy tells a kernel mode to spread new connections over a
/// Service's endpoints: a weight per endpoint, or a lookup table of
/// endpoint indexes (consistent hashing, e.g. Maglev).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendPlan {
    Weights(Vec<u32>),
    Slots(Vec<u32>),
}

/// The endpoints one kind of traffic may reach and the policy's plan over
/// them (WIT `endpoint-set`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    pub backends: BackendPlan,
}

impl EndpointSet {
    /// No endpoint, an empty plan.
    pub fn empty() -> Self {
        Self {
            endpoints: Vec::new(),
            backends: BackendPlan::Weights(Vec::new()),
        }
    }
}

/// What a proxy mode renders a service port from (WIT `service-endpoints`):
/// the set for cluster-IP traffic, the set for node-port, external-IP and
/// load-balancer traffic, the cluster-wide set that pods and the node reach
/// those frontends through under externalTrafficPolicy Local (empty
/// otherwise), and whether any endpoint exists on any node (drop rather
/// than reject when a set is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEndpoints {
    pub internal: EndpointSet,
    pub external: EndpointSet,
    pub cluster: EndpointSet,
    pub has_any: bool,
}

/// detectLocalMode, as upstream: which sources count as this node's pods.
/// Interface names are checked (`config::values::interface_name`) before
/// they get here.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DetectLocal {
    #[default]
    None,
    ClusterCidr(Vec<Cidr>),
    /// The Node's spec.podCIDRs, known once the Node object is.
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}
