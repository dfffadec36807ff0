//! What every frontend should reach, from the API objects, as upstream
//! kube-proxy documents it (Services, "Virtual IPs and Service Proxies",
//! traffic policies, terminating endpoints):
//!
//! - endpoints are an EndpointSlice's (first) address with the port named
//!   as the Service port; `ready` unset means ready, `serving` unset means
//!   `ready`, `terminating` unset means false;
//! - traffic under a Cluster policy goes to the ready endpoints, or, when
//!   none is ready, to those serving and terminating;
//! - traffic under a Local policy goes to this node's ready endpoints, or,
//!   when none of them is ready, to this node's serving-and-terminating;
//! - the cluster IP follows `internalTrafficPolicy`; node ports, external
//!   IPs and load-balancer VIPs follow `externalTrafficPolicy` (seen from
//!   outside the node, which is where the checker's client is);
//! - no endpoint usable: reject when the Service has no endpoint at all
//!   (ready or serving-terminating, anywhere), drop when it has some but
//!   a Local policy leaves none;
//! - a load-balancer VIP with `loadBalancerSourceRanges` of its family
//!   drops sources outside them; node ports listen on the node's primary
//!   address of each family (upstream's default `nodePortAddresses`).
//!
//! Topology hints are not modelled: the soak's slices carry none.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Api, Frontend, Kind, Outcome, Proto, Reach, Semantics, Viewpoint};

/// One endpoint of one Service port, in one family.
#[derive(Clone, Debug)]
pub struct Ep {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
}

/// One Service port in one family, with what decides its traffic.
pub struct PortModel {
    pub service: String,
    pub proto: Proto,
    pub internal_local: bool,
    pub external_local: bool,
    pub endpoints: Vec<Ep>,
    /// (kind, address, port, source ranges of the address's family)
    pub frontends: Vec<(Kind, IpAddr, u16, Vec<(IpAddr, u8)>)>,
}

impl PortModel {
    /// Ready endpoints passing `keep`, else serving-and-terminating ones.
    fn with_fallback(&self, keep: impl Fn(&Ep) -> bool) -> BTreeSet<SocketAddr> {
        let ready: BTreeSet<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|e| e.ready && keep(e))
            .map(|e| e.addr)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints
            .iter()
            .filter(|e| e.serving && e.terminating && keep(e))
            .map(|e| e.addr)
            .collect()
    }

    pub fn cluster_endpoints(&self) -> BTreeSet<SocketAddr> {
        self.with_fallback(|_| true)
    }

    pub fn local_endpoints(&self) -> BTreeSet<SocketAddr> {
        self.with_fallback(|e| e.local)
    }

    /// Whether the Service has any endpoint at all: without one, reject.
    pub fn has_any(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating))
    }

    /// The upstream outcome of traffic under a policy.
    pub fn reach(&self, local_policy: bool) -> Reach {
        let chosen = if local_policy {
            self.local_endpoints()
        } else {
            self.cluster_endpoints()
        };
        if !chosen.is_empty() {
            chosen.into_iter().map(Outcome::Endpoint).collect()
        } else if self.has_any() {
            Reach::from([Outcome::Drop])
        } else {
            Reach::from([Outcome::Reject])
        }
    }
}

/// Every frontend with its expected reach.
pub fn frontends(api: &Api, view: &Viewpoint, semantics: Semantics) -> Vec<(Frontend, Reach)> {
    let mut out = Vec::new();
    for port in ports(api, view) {
        for (kind, ip, number, ranges) in &port.frontends {
            let frontend = |source| Frontend {
                service: port.service.clone(),
                kind: *kind,
                ip: *ip,
                proto: port.proto,
                port: *number,
                source,
            };
            let reach = match kind {
                Kind::ClusterIp => port.reach(port.internal_local),
                _ => port.reach(port.external_local),
            };
            let client = view.client(*ip);
            if ranges.is_empty() {
                out.push((frontend(client), reach));
                continue;
            }
            // Firewalled VIP: one source inside the ranges, and the client
            // when it is outside them.
            let (net, _) = ranges[0];
            out.push((frontend(first_host(net)), reach));
            if !ranges.iter().any(|(n, l)| in_prefix(client, *n, *l)) {
                let outsider = if semantics == Semantics::Iptables && !port.has_any() {
                    Outcome::Reject
                } else {
                    Outcome::Drop
                };
                out.push((frontend(client), Reach::from([outsider])));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn first_host(net: IpAddr) -> IpAddr {
    match net {
        IpAddr::V4(v4) => IpAddr::V4((v4.to_bits() | 1).into()),
        IpAddr::V6(v6) => IpAddr::V6((v6.to_bits() | 1).into()),
    }
}

pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            a.to_bits() & mask == n.to_bits() & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            a.to_bits() & mask == n.to_bits() & mask
        }
        _ => false,
    }
}

/// Every Service port the proxy handles, once per family of its cluster IPs.
pub fn ports(api: &Api, view: &Viewpoint) -> Vec<PortModel> {
    let node_ips = node_primary_ips(api);
    let mut out = Vec::new();
    for svc in &api.services {
        let (Some(spec), Some(ns), Some(name)) = (
            svc.spec.as_ref(),
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") || proxied_elsewhere(svc) {
            continue;
        }
        let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|i| i.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
        };
        let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let lb = spec.type_.as_deref() == Some("LoadBalancer");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let vips: Vec<IpAddr> = if lb {
            svc.status
                .iter()
                .filter_map(|s| s.load_balancer.as_ref())
                .flat_map(|l| l.ingress.iter().flatten())
                .filter(|i| matches!(i.ip_mode.as_deref(), None | Some("VIP")))
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        } else {
            Vec::new()
        };
        let ranges: Vec<(IpAddr, u8)> = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .filter_map(|c| parse_cidr(c))
            .collect();
        let external_ips: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|i| i.parse().ok())
            .collect();
        for p in spec.ports.iter().flatten() {
            let Some(proto) = parse_proto(p.protocol.as_deref()) else {
                continue;
            };
            let Ok(number) = u16::try_from(p.port) else {
                continue;
            };
            let port_name = p.name.clone().unwrap_or_default();
            for &cip in &cluster_ips {
                let same = |ip: &IpAddr| ip.is_ipv4() == cip.is_ipv4();
                let mut frontends = vec![(Kind::ClusterIp, cip, number, vec![])];
                frontends.extend(
                    external_ips
                        .iter()
                        .filter(|i| same(i))
                        .map(|i| (Kind::ExternalIp, *i, number, vec![])),
                );
                let family_ranges: Vec<_> = ranges.iter().copied().filter(|r| same(&r.0)).collect();
                frontends.extend(
                    vips.iter()
                        .filter(|i| same(i))
                        .map(|i| (Kind::LoadBalancer, *i, number, family_ranges.clone())),
                );
                if let Some(np) = node_port(p, node_port_type) {
                    frontends.extend(
                        node_ips
                            .iter()
                            .filter(|i| same(i))
                            .map(|i| (Kind::NodePort, *i, np, vec![])),
                    );
                }
                out.push(PortModel {
                    service: format!("{ns}/{name}:{port_name}"),
                    proto,
                    internal_local,
                    external_local: external_local && frontends.len() > 1,
                    endpoints: endpoints(api, view, ns, name, &port_name, proto, cip.is_ipv4()),
                    frontends,
                });
            }
        }
    }
    out
}

/// Services labelled for another proxy, or headless, are not ours.
fn proxied_elsewhere(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    let has = |k: &str| labels.is_some_and(|l| l.contains_key(k));
    let headless = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_none_or(|ip| ip == "None" || ip.is_empty());
    has("service.kubernetes.io/service-proxy-name") || headless
}

fn node_port(p: &ServicePort, node_port_type: bool) -> Option<u16> {
    if !node_port_type {
        return None;
    }
    u16::try_from(p.node_port?).ok().filter(|n| *n > 0)
}

fn parse_proto(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.trim().split_once('/')?;
    Some((addr.parse().ok()?, len.parse().ok()?))
}

/// Upstream's default node-port addresses: the node's primary IP of each
/// family (its first InternalIP, else its first ExternalIP).
fn node_primary_ips(api: &Api) -> Vec<IpAddr> {
    let addresses: Vec<(String, IpAddr)> = api
        .node
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| Some((a.type_.clone(), a.address.parse().ok()?)))
        .collect();
    let mut out = Vec::new();
    for v4 in [true, false] {
        let pick = |kind: &str| {
            addresses
                .iter()
                .find(|(t, ip)| t == kind && ip.is_ipv4() == v4)
                .map(|(_, ip)| *ip)
        };
        out.extend(pick("InternalIP").or_else(|| pick("ExternalIP")));
    }
    out
}

fn endpoints(
    api: &Api,
    view: &Viewpoint,
    ns: &str,
    service: &str,
    port_name: &str,
    proto: Proto,
    v4: bool,
) -> Vec<Ep> {
    let mut out: Vec<Ep> = Vec::new();
    for slice in api.slices.iter().filter(|s| belongs(s, ns, service)) {
        let family = if v4 { "IPv4" } else { "IPv6" };
        if slice.address_type != family {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && parse_proto(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(number) = port.port.and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        for e in &slice.endpoints {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let ep = Ep {
                addr: SocketAddr::new(ip, number),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: e.node_name.as_deref() == Some(view.node_name.as_str()),
            };
            // The same address in two slices (a move between slices): one
            // endpoint.
            if !out.iter().any(|o| o.addr == ep.addr) {
                out.push(ep);
            }
        }
    }
    out
}

fn belongs(slice: &EndpointSlice, ns: &str, service: &str) -> bool {
    let labels = slice.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    slice.metadata.namespace.as_deref() == Some(ns)
        && label("kubernetes.io/service-name") == Some(service)
        && label("service.kubernetes.io/service-proxy-name").is_none()
        && label("service.kubernetes.io/headless").is_none()
}
