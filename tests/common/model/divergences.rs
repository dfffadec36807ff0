//! Known defects of the current build, in one place, so that the checker
//! stays written to upstream's semantics everywhere else. A difference is
//! excused only when the kernel does exactly what a listed defect
//! predicts; anything else is a mismatch.
//!
//! To retire a defect when its fix lands: delete its entry from
//! `KNOWN_DIVERGENCES` and its arm in `predict` (the checker's unit test
//! `known_divergences_are_exactly_the_listed_ones` says which cases it
//! covers).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::expected::{PortModel, in_prefix, ports};
use super::{Api, Frontend, Kind, Outcome, Reach, Viewpoint};

/// The defects the checker knows about: (name, what it does).
pub const KNOWN_DIVERGENCES: &[(&str, &str)] = &[(
    "mode-gets-internal-endpoints",
    "the mode plugins receive only the endpoints of the internal traffic \
     policy (branch h-tp fixes it): internalTrafficPolicy Local restricts \
     node-port/external traffic to local endpoints; externalTrafficPolicy \
     Local takes the local ones among the cluster endpoints (no fallback to \
     local serving-terminating ones); an internal Local policy with no \
     local endpoint rejects instead of dropping",
)];

/// The name of the defect that explains `kernel` for `frontend`, if one does.
pub fn explains(
    api: &Api,
    view: &Viewpoint,
    frontend: &Frontend,
    kernel: &Reach,
) -> Option<&'static str> {
    let port = ports(api, view).into_iter().find(|p| {
        p.service == frontend.service
            && p.frontends
                .iter()
                .any(|f| f.0 == frontend.kind && f.1 == frontend.ip)
    })?;
    for (name, _) in KNOWN_DIVERGENCES {
        if predict(name, &port, frontend).as_ref() == Some(kernel) {
            return Some(name);
        }
    }
    None
}

/// What the build does under defect `name`.
fn predict(name: &str, port: &PortModel, frontend: &Frontend) -> Option<Reach> {
    // A firewalled VIP drops sources outside its ranges under any defect.
    let outside = port.frontends.iter().any(|(kind, ip, _, ranges)| {
        *kind == frontend.kind
            && *ip == frontend.ip
            && !ranges.is_empty()
            && !ranges
                .iter()
                .any(|(n, l)| in_prefix(frontend.source, *n, *l))
    });
    if outside {
        return None;
    }
    match name {
        "mode-gets-internal-endpoints" => {
            // The host hands the plugin one list: the internal policy's.
            let internal: BTreeSet<SocketAddr> = if port.internal_local {
                port.local_endpoints()
            } else {
                port.cluster_endpoints()
            };
            let local: BTreeSet<SocketAddr> = port
                .endpoints
                .iter()
                .filter(|e| e.local)
                .map(|e| e.addr)
                .collect();
            let (chosen, drop_when_empty) = match frontend.kind {
                Kind::ClusterIp => (internal.clone(), false),
                _ if port.external_local => (
                    internal.intersection(&local).copied().collect(),
                    !internal.is_empty(),
                ),
                _ => (internal.clone(), false),
            };
            let reach = if !chosen.is_empty() {
                chosen.into_iter().map(Outcome::Endpoint).collect()
            } else if drop_when_empty {
                Reach::from([Outcome::Drop])
            } else {
                Reach::from([Outcome::Reject])
            };
            Some(reach)
        }
        _ => None,
    }
}
