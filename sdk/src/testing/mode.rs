//! Unit-testing a proxy mode natively: a [`Harness`] that drives a
//! [`Mode`] as the host does, and fixtures for the values the host hands
//! `configure` and `render-service`, small and predictable.

use crate::mode::{
    BackendPlan, DetectLocal, Endpoint, EndpointSet, Fragment, IpAddress, Item, Mode, ModeConfig,
    NodeInfo, Protocol, ServiceEndpoints, ServicePort, SessionAffinity, TrafficPolicy,
};

/// Drives one mode instance: configured first, as the host does.
pub struct Harness<M: Mode> {
    pub mode: M,
}

impl<M: Mode> Harness<M> {
    /// A fresh mode, configured with `config` (e.g. [`config()`]).
    pub fn new(config: ModeConfig) -> Result<Self, String> {
        let mut mode = M::default();
        mode.configure(config)?;
        Ok(Self { mode })
    }

    /// A full sync, as after the host starts: the base, then every
    /// service-port's fragment; every item, in that order.
    pub fn sync(
        &mut self,
        services: &[(ServicePort, ServiceEndpoints)],
    ) -> Result<Vec<Item>, String> {
        let mut items = self.mode.render_base()?.items;
        for (service, endpoints) in services {
            let Fragment { items: more } = self
                .mode
                .render_service(service.clone(), endpoints.clone())?;
            items.extend(more);
        }
        Ok(items)
    }
}

/// The rules of the nftables chain `name` among `items`, if there is one.
pub fn nft_rules<'a>(items: &'a [Item], name: &str) -> Option<&'a [String]> {
    items.iter().find_map(|item| match item {
        Item::NftChain(c) if c.name == name => Some(c.rules.as_slice()),
        _ => None,
    })
}

/// The elements of the nftables set or map `set` among `items`.
pub fn nft_elements<'a>(items: &'a [Item], set: &str) -> Vec<&'a str> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::NftElement(e) if e.set == set => Some(e.element.as_str()),
            _ => None,
        })
        .collect()
}

/// An IPv4 address as the contract carries it.
pub fn v4(a: [u8; 4]) -> IpAddress {
    IpAddress::V4(u32::from_be_bytes(a))
}

/// Node `n1` at 192.168.1.5, table `kube-wasm-proxy`, no detect-local.
pub fn config() -> ModeConfig {
    ModeConfig {
        node: NodeInfo {
            name: "n1".into(),
            addresses: vec![v4([192, 168, 1, 5])],
            zone: None,
            labels: vec![],
        },
        table: "kube-wasm-proxy".into(),
        masquerade_all: false,
        detect_local: DetectLocal::None,
        extra: String::new(),
    }
}

/// [`config()`] with this node's pods told by `cidr` (detectLocalMode
/// ClusterCIDR).
pub fn config_with_pods_in(cidr: &str) -> ModeConfig {
    ModeConfig {
        detect_local: DetectLocal::Cidrs(vec![cidr.into()]),
        ..config()
    }
}

/// `ns/web` port 80/TCP at 10.96.0.10, node port 30080, round-robin.
pub fn service(internal: TrafficPolicy, external: TrafficPolicy) -> ServicePort {
    ServicePort {
        id: 1,
        namespace: "ns".into(),
        name: "web".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ips: vec![v4([10, 96, 0, 10])],
        port: 80,
        node_port: Some(30080),
        external_ips: vec![],
        load_balancer_ingress: vec![],
        source_ranges: vec![],
        session_affinity: SessionAffinity::None,
        external_traffic_policy: external,
        internal_traffic_policy: internal,
        health_check_node_port: None,
        lb_policy: "round-robin".into(),
        lb_policy_config: String::new(),
    }
}

/// 10.1.0.`last`:8080; `ready` false means serving and terminating.
pub fn endpoint(last: u8, ready: bool, local: bool) -> Endpoint {
    Endpoint {
        address: v4([10, 1, 0, last]),
        port: 8080,
        ready,
        serving: true,
        terminating: !ready,
        node_name: None,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
        is_local: local,
    }
}

/// A set with equal weights.
pub fn endpoint_set(eps: &[Endpoint]) -> EndpointSet {
    EndpointSet {
        endpoints: eps.to_vec(),
        backends: BackendPlan::Weights(vec![1; eps.len()]),
    }
}

/// What the host hands `render-service`: the internal, external and
/// short-circuit (`cluster`, empty unless externalTrafficPolicy is Local)
/// sets, each with equal weights.
pub fn sets(
    internal: &[Endpoint],
    external: &[Endpoint],
    cluster: &[Endpoint],
    has_any: bool,
) -> ServiceEndpoints {
    ServiceEndpoints {
        internal: endpoint_set(internal),
        external: endpoint_set(external),
        cluster: endpoint_set(cluster),
        has_any_endpoints: has_any,
    }
}

/// Both traffic policies Local with an external IP (203.0.113.7): the
/// internal and external sets hold the local endpoint 10.1.0.1, the
/// cluster-wide short-circuit set also the remote 10.1.0.2. The case of
/// upstream's short-circuit of pods and the node to every endpoint.
pub fn both_local_with_an_external_ip() -> (ServicePort, ServiceEndpoints) {
    let local = endpoint(1, true, true);
    let remote = endpoint(2, true, false);
    let mut port = service(TrafficPolicy::Local, TrafficPolicy::Local);
    port.external_ips = vec![v4([203, 0, 113, 7])];
    let eps = sets(&[local.clone()], &[local.clone()], &[local, remote], true);
    (port, eps)
}
