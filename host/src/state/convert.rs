//! Kubernetes objects -> the proxy's model, interpreted as upstream
//! kube-proxy does (pkg/proxy/serviceport.go, endpointslicecache.go).

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{
    Cidr, Endpoint, IpMode, NodeInfo, ObjectKey, Protocol, ServicePort, ServicePortName,
    TrafficPolicy,
};

// Here rather than in the model, which stays free of the API types (the
// IPVS VM probe compiles the model alone).
impl ObjectKey {
    /// The key of any object, from its metadata.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

/// Label that hands a Service to another proxy: kube-proxy ignores it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking a Service headless (set by the endpoints controller).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label tying an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// kwp's per-Service load-balancing policy and its configuration.
pub const ANNOTATION_LB_POLICY: &str = "kube-wasm-proxy.io/lb-policy";
pub const ANNOTATION_LB_POLICY_CONFIG: &str = "kube-wasm-proxy.io/lb-policy-config";
/// Upstream's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API server's bound on the ClientIP affinity timeout (1 day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Why a Service is not proxied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("headless (clusterIP None)")]
    Headless,
    #[error("type ExternalName")]
    ExternalName,
    #[error("no cluster IP")]
    NoClusterIp,
    #[error("labelled {0}")]
    Label(&'static str),
    /// What the API server would have refused (the file source has none);
    /// the last good version of the Service stays in force.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// A DNS-1123 label (RFC 1123), as the API server checks namespaces and
/// Service names: lowercase alphanumerics and '-', at most 63, alphanumeric
/// at both ends. Service names must also start with a letter (DNS-1035).
fn check_label(what: &str, value: &str, letter_first: bool) -> Result<(), Skip> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && (!letter_first || bytes[0].is_ascii_lowercase());
    if ok {
        Ok(())
    } else {
        Err(Skip::Invalid(format!(
            "{what} {value:?} is not a valid DNS label"
        )))
    }
}

/// A Service port name: a DNS-1123 label, as the API server checks it;
/// "" for a single unnamed port.
fn check_port_name(value: &str) -> Result<(), Skip> {
    if value.is_empty() {
        Ok(())
    } else {
        check_label("port name", value, false)
    }
}

/// The Service's ports, or why it is skipped. Invalid fields inside an
/// otherwise valid Service (a bad externalIP, a bad source range) are dropped
/// with a warning, as upstream does; `warn` receives them.
pub fn service_ports(
    svc: &Service,
    warn: &mut dyn FnMut(String),
) -> Result<Vec<ServicePort>, Skip> {
    let labels = svc.metadata.labels.as_ref();
    for label in [LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS] {
        if labels.is_some_and(|l| l.contains_key(label)) {
            return Err(Skip::Label(label));
        }
    }
    let ObjectKey { namespace, name } = ObjectKey::of(&svc.metadata);
    check_label("namespace", &namespace, false)?;
    check_label("name", &name, true)?;
    let Some(spec) = svc.spec.as_ref() else {
        return Err(Skip::NoClusterIp);
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Err(Skip::ExternalName);
    }
    match spec.cluster_ip.as_deref() {
        Some("None") => return Err(Skip::Headless),
        None | Some("") => return Err(Skip::NoClusterIp),
        _ => {}
    }
    let ips = |field: &str, values: &[String], warn: &mut dyn FnMut(String)| -> Vec<IpAddr> {
        values
            .iter()
            .filter_map(|s| match s.trim().parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    warn(format!(
                        "service {namespace}/{name}: ignoring invalid {field} {s:?}"
                    ));
                    None
                }
            })
            .collect()
    };
    let cluster_ips = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => ips("clusterIP", list, warn),
        _ => ips(
            "clusterIP",
            std::slice::from_ref(spec.cluster_ip.as_ref().expect("checked above")),
            warn,
        ),
    };
    if cluster_ips.is_empty() {
        return Err(Skip::NoClusterIp);
    }
    let external_ips = ips(
        "externalIP",
        spec.external_ips.as_deref().unwrap_or_default(),
        warn,
    );
    let is_lb = svc_type == "LoadBalancer";
    let external_capable = is_lb || svc_type == "NodePort";

    let load_balancer_ingress: Vec<(IpAddr, IpMode)> = if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        ingress
            .into_iter()
            .flatten()
            .filter_map(|i| {
                let ip = ips(
                    "loadBalancer ingress IP",
                    std::slice::from_ref(i.ip.as_ref()?),
                    warn,
                )
                .pop()?;
                let mode = if i.ip_mode.as_deref() == Some("Proxy") {
                    IpMode::Proxy
                } else {
                    IpMode::Vip
                };
                Some((ip, mode))
            })
            .collect()
    } else {
        Vec::new()
    };
    let source_ranges: Vec<Cidr> = if is_lb {
        spec.load_balancer_source_ranges
            .iter()
            .flatten()
            .filter_map(|r| match r.parse() {
                Ok(c) => Some(c),
                Err(e) => {
                    warn(format!(
                        "service {namespace}/{name}: ignoring loadBalancerSourceRange: {e}"
                    ));
                    None
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let wanted = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match wanted.map(u32::try_from) {
            None => DEFAULT_AFFINITY_TIMEOUT,
            Some(Ok(t)) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => t,
            Some(_) => {
                warn(format!(
                    "service {namespace}/{name}: sessionAffinityConfig timeoutSeconds {} is outside 1..={MAX_AFFINITY_TIMEOUT}; using the default {DEFAULT_AFFINITY_TIMEOUT}",
                    wanted.unwrap_or_default()
                ));
                DEFAULT_AFFINITY_TIMEOUT
            }
        }
    });
    let external_policy =
        if external_capable && spec.external_traffic_policy.as_deref() == Some("Local") {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
    let internal_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let health_check_node_port = (is_lb && external_policy == TrafficPolicy::Local)
        .then(|| {
            spec.health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
        })
        .flatten()
        .filter(|p| *p != 0);
    let annotations = svc.metadata.annotations.as_ref();
    let lb_policy = annotations
        .and_then(|a| a.get(ANNOTATION_LB_POLICY))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let lb_policy_config = annotations
        .and_then(|a| a.get(ANNOTATION_LB_POLICY_CONFIG))
        .cloned()
        .unwrap_or_default();

    // Shared by every port's name (and every copy of it).
    let (shared_namespace, shared_name): (Arc<str>, Arc<str>) =
        (namespace.as_str().into(), name.as_str().into());
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP").parse::<Protocol>() {
            Ok(proto) => proto,
            Err(e) => {
                warn(format!(
                    "service {namespace}/{name}: skipping port {:?}: {e}",
                    p.name
                ));
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            warn(format!(
                "service {namespace}/{name}: skipping port {}: outside 1-65535",
                p.port
            ));
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        check_port_name(&port_name)?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(_) if !external_capable => None,
            Some(n) => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    warn(format!(
                        "service {namespace}/{name}: ignoring nodePort {n} of port {port}: outside 1-65535"
                    ));
                    None
                }
            },
        };
        out.push(ServicePort {
            name: ServicePortName {
                namespace: shared_namespace.clone(),
                name: shared_name.clone(),
                port: port_name.into(),
                protocol,
            },
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ingress: load_balancer_ingress.clone(),
            source_ranges: source_ranges.clone(),
            affinity_timeout,
            external_policy,
            internal_policy,
            health_check_node_port,
            lb_policy: lb_policy.clone(),
            lb_policy_config: lb_policy_config.clone(),
        });
    }
    // Kept for as long as the Service is: a push's spare capacity (room
    // for 4 ports) was 3/4 of the state's ports at 10k one-port Services.
    out.shrink_to_fit();
    Ok(out)
}

/// The Service an EndpointSlice belongs to.
pub fn slice_service(slice: &EndpointSlice) -> Option<ObjectKey> {
    let svc = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(
        ObjectKey::of(&slice.metadata).namespace,
        svc,
    ))
}

/// The endpoints of one EndpointSlice per `(port name, protocol)`, one
/// list per slice port (a Service's merged list is that list itself when
/// one slice port is all it has). FQDN slices are ignored, as upstream
/// does; only the first address of each endpoint is used.
pub fn slice_endpoints(
    slice: &EndpointSlice,
    node_name: &str,
    names: &mut crate::model::Names,
) -> Vec<((std::sync::Arc<str>, Protocol), std::sync::Arc<[Endpoint]>)> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for port in slice.ports.iter().flatten() {
        let (Some(number), Ok(protocol)) = (
            port.port,
            port.protocol
                .as_deref()
                .unwrap_or("TCP")
                .parse::<Protocol>(),
        ) else {
            continue;
        };
        let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
            continue;
        };
        let port_name: std::sync::Arc<str> = port.name.as_deref().unwrap_or_default().into();
        let mut endpoints = Vec::new();
        for ep in &slice.endpoints {
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let hints = ep.hints.as_ref();
            endpoints.push(Endpoint {
                ip,
                port: number,
                ready,
                serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.as_deref().map(|n| names.get(n)),
                zone: ep.zone.as_deref().map(|z| names.get(z)),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
                is_local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            });
        }
        out.push(((port_name, protocol), endpoints.into()));
    }
    // Kept for as long as the slice is: no spare capacity.
    out.shrink_to_fit();
    out
}

/// This node's name, addresses (InternalIP first, then ExternalIP), zone and labels.
pub fn node_info(node: &Node) -> NodeInfo {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let mut addresses: Vec<(u8, IpAddr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            Some((rank, a.address.parse().ok()?))
        })
        .collect();
    addresses.sort_by_key(|(rank, _)| *rank);
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        addresses: addresses.into_iter().map(|(_, ip)| ip).collect(),
        // They reach rule text (detectLocalMode NodeCIDR): only what parses.
        pod_cidrs: node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidrs.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| match c.parse::<Cidr>() {
                Ok(cidr) => Some(cidr.to_string()),
                Err(e) => {
                    tracing::warn!(
                        node = node.metadata.name.as_deref().unwrap_or_default(),
                        error = e,
                        "ignoring invalid podCIDR"
                    );
                    None
                }
            })
            .collect(),
        zone: labels.get(ZONE_LABEL).cloned(),
        labels: labels.into_iter().collect(),
    }
}

/// When the change an EndpointSlice carries was triggered (set by the
/// EndpointSlice controller), for the network-programming latency metric.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger time annotation's RFC 3339 value, as a time.
pub fn parse_trigger_time(value: &str) -> Option<std::time::SystemTime> {
    value
        .parse::<jiff::Timestamp>()
        .ok()
        .map(std::time::SystemTime::from)
}

#[cfg(test)]
#[test]
fn trigger_times_are_rfc3339() {
    use std::time::{Duration, UNIX_EPOCH};
    assert_eq!(
        parse_trigger_time("2026-01-01T00:00:00Z"),
        Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    );
    assert_eq!(parse_trigger_time("yesterday"), None);
}
