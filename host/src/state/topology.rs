//! Which endpoints a service port's traffic may use, as upstream's
//! CategorizeEndpoints: readiness, terminating fallback, traffic policies
//! and topology hints.

use std::sync::Arc;

use crate::model::{Endpoint, NodeInfo, ServicePort, TrafficPolicy};

/// Endpoints by traffic kind. Indices are not shared: each list is what a
/// policy receives for that kind of traffic. A list that is every endpoint
/// of the service port (most are) is the state's list itself, which the
/// policy's replay record then shares.
#[derive(Debug, Default, PartialEq)]
pub struct Categorized {
    /// For traffic under an internal/external policy of Cluster.
    pub cluster: Arc<[Endpoint]>,
    /// Local endpoints, for traffic under a policy of Local.
    pub local: Arc<[Endpoint]>,
    /// No endpoint (the external set of a port with no external frontend).
    none: Arc<[Endpoint]>,
    /// Whether any endpoint (ready or fallback) exists at all; false means
    /// reject rather than drop.
    pub has_any: bool,
}

impl Categorized {
    /// Endpoints for traffic to the cluster IP.
    pub fn internal<'a>(&'a self, svc: &ServicePort) -> &'a Arc<[Endpoint]> {
        if svc.internal_policy == TrafficPolicy::Local {
            &self.local
        } else {
            &self.cluster
        }
    }
    /// Endpoints for traffic to node ports, external and load-balancer IPs
    /// (none when the service port has none of those).
    pub fn external<'a>(&'a self, svc: &ServicePort) -> &'a Arc<[Endpoint]> {
        if !svc.externally_accessible() {
            &self.none
        } else if svc.external_policy == TrafficPolicy::Local {
            &self.local
        } else {
            &self.cluster
        }
    }
    /// The cluster-wide endpoints that this node's pods and the node itself
    /// reach a node port, external or load-balancer IP through under
    /// externalTrafficPolicy Local (upstream's short-circuit); none when
    /// the service port has no such frontend or its external policy is
    /// Cluster (the external set is then already cluster-wide).
    pub fn short_circuit<'a>(&'a self, svc: &ServicePort) -> &'a Arc<[Endpoint]> {
        if svc.externally_accessible() && svc.external_policy == TrafficPolicy::Local {
            &self.cluster
        } else {
            &self.none
        }
    }
}

pub fn categorize(svc: &ServicePort, endpoints: &[Endpoint], node: &NodeInfo) -> Categorized {
    categorize_shared(svc, &endpoints.into(), node)
}

/// `categorize`, with a list equal to `endpoints` being `endpoints` itself.
pub fn categorize_shared(
    svc: &ServicePort,
    endpoints: &Arc<[Endpoint]>,
    node: &NodeInfo,
) -> Categorized {
    let mut out = Categorized::default();
    // Each set only when some traffic uses it: the external policy matters
    // only for a service port reachable from outside. Any such port needs
    // the cluster-wide set, also under externalTrafficPolicy Local, for the
    // short-circuit of its own pods and node (upstream's
    // UsesClusterEndpoints).
    let external = svc.externally_accessible();
    let needs_cluster = svc.internal_policy == TrafficPolicy::Cluster || external;
    let needs_local = svc.internal_policy == TrafficPolicy::Local
        || (external && svc.external_policy == TrafficPolicy::Local);
    if needs_cluster {
        let topology = topology_filter(endpoints, node);
        out.cluster = with_fallback(endpoints, |ep| {
            topology.as_ref().is_none_or(|keep| keep(ep))
        });
        out.has_any |= !out.cluster.is_empty();
    }
    if needs_local {
        out.local = with_fallback(endpoints, |ep| ep.is_local);
        // Any endpoint anywhere counts: no local endpoint means drop, not reject.
        out.has_any |= endpoints
            .iter()
            .any(|ep| ep.ready || (ep.serving && ep.terminating));
    }
    out
}

/// Ready endpoints passing `keep`; if none, serving-and-terminating ones
/// passing `keep` (so connections drain instead of failing).
fn with_fallback(endpoints: &Arc<[Endpoint]>, keep: impl Fn(&Endpoint) -> bool) -> Arc<[Endpoint]> {
    if endpoints.iter().all(|ep| ep.ready && keep(ep)) {
        return endpoints.clone();
    }
    let ready: Arc<[Endpoint]> = endpoints
        .iter()
        .filter(|ep| ep.ready && keep(ep))
        .cloned()
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|ep| ep.serving && ep.terminating && keep(ep))
        .cloned()
        .collect()
}

/// A filter by EndpointSlice hints, or `None` when hints do not apply: they
/// apply only when every ready endpoint carries them and at least one is
/// meant for this node (node hints, preferred) or zone.
fn topology_filter<'a>(
    endpoints: &'a [Endpoint],
    node: &'a NodeInfo,
) -> Option<Box<dyn Fn(&Endpoint) -> bool + 'a>> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|ep| ep.ready).collect();
    if ready.is_empty() {
        return None;
    }
    if ready.iter().all(|ep| !ep.node_hints.is_empty())
        && ready.iter().any(|ep| ep.node_hints.contains(&node.name))
    {
        return Some(Box::new(move |ep: &Endpoint| {
            ep.node_hints.contains(&node.name)
        }));
    }
    let zone = node.zone.as_ref()?;
    if ready.iter().all(|ep| !ep.zone_hints.is_empty())
        && ready.iter().any(|ep| ep.zone_hints.contains(zone))
    {
        return Some(Box::new(move |ep: &Endpoint| ep.zone_hints.contains(zone)));
    }
    None
}
