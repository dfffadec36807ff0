//! A service port's endpoint sets as the mode receives them: the internal,
//! external and short-circuit sets from `categorize`, each with the
//! policy's plan; a set equal to another shares its plan, so most Services
//! cost one policy id and one plan.

use std::sync::Arc;

use anyhow::Result;

use super::policies::{self, OwnSets};
use crate::dataplane::userspace::backends::SharedPolicy;
use crate::model::{Endpoint, EndpointSet, ServiceEndpoints, ServicePort};
use crate::state::topology::Categorized;

/// Which sets differ from the ones before them and so need ids of their own
/// in the policy.
pub fn own_sets(port: &ServicePort, categorized: &Categorized) -> OwnSets {
    let internal = categorized.internal(port);
    let external = categorized.external(port);
    let cluster = categorized.short_circuit(port);
    OwnSets {
        external: !external.is_empty() && external != internal,
        cluster: !cluster.is_empty() && cluster != internal && cluster != external,
    }
}

/// Pushes each set that has an id of its own to `policy` and asks for its
/// plan; the others copy the set they equal.
pub fn planned(
    policy: &SharedPolicy,
    id: u32,
    port: &ServicePort,
    categorized: &Categorized,
    own: OwnSets,
) -> Result<ServiceEndpoints> {
    let mut p = policy.lock().expect("policy lock");
    let mut plan = |policy_id: u32, endpoints: &Arc<[Endpoint]>| -> Result<EndpointSet> {
        p.set_shared_endpoints(policy_id, endpoints.clone())?;
        Ok(EndpointSet {
            backends: p.plan(policy_id)?,
            endpoints: endpoints.to_vec(),
        })
    };
    let internal = plan(id, categorized.internal(port))?;
    let external = categorized.external(port);
    let external = if own.external {
        plan(policies::external_id(id), external)?
    } else if external.is_empty() {
        EndpointSet::empty()
    } else {
        internal.clone()
    };
    let cluster = categorized.short_circuit(port);
    let cluster = if own.cluster {
        plan(policies::cluster_id(id), cluster)?
    } else if cluster.is_empty() {
        EndpointSet::empty()
    } else if **cluster == *internal.endpoints {
        internal.clone()
    } else {
        external.clone()
    };
    Ok(ServiceEndpoints {
        internal,
        external,
        cluster,
        has_any: categorized.has_any,
    })
}

/// Every endpoint some set may reach, once each (upstream's
/// allLocallyReachableEndpoints): what inspect counts and what stale UDP
/// flows are judged against.
pub fn reachable(endpoints: &ServiceEndpoints) -> Vec<Endpoint> {
    let mut all = endpoints.internal.endpoints.clone();
    let others: Vec<&EndpointSet> = [&endpoints.external, &endpoints.cluster]
        .into_iter()
        .filter(|s| !s.endpoints.is_empty() && **s != endpoints.internal)
        .collect();
    if others.is_empty() {
        return all;
    }
    // Hashed: a Service may have tens of thousands of endpoints.
    let mut seen: std::collections::HashSet<(std::net::IpAddr, u16)> =
        all.iter().map(|e| (e.ip, e.port)).collect();
    for ep in others.into_iter().flat_map(|s| &s.endpoints) {
        if seen.insert((ep.ip, ep.port)) {
            all.push(ep.clone());
        }
    }
    all
}

/// `--dry-run`'s note on a service's fragment: its policy and its sets
/// (each once).
pub fn render_context(policy: &str, endpoints: &ServiceEndpoints) -> String {
    let addrs = |s: &EndpointSet| {
        s.endpoints
            .iter()
            .map(|e| e.socket_addr().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let internal = &endpoints.internal;
    let mut context = format!(
        "policy {policy}, endpoints [{}], backends {:?}",
        addrs(internal),
        internal.backends
    );
    let external = &endpoints.external;
    for (label, set, shown) in [
        ("external", external, false),
        (
            "short-circuit",
            &endpoints.cluster,
            endpoints.cluster == *external,
        ),
    ] {
        if set != internal && !shown && !set.endpoints.is_empty() {
            context.push_str(&format!(
                "; {label} endpoints [{}], backends {:?}",
                addrs(set),
                set.backends
            ));
        }
    }
    context
}
