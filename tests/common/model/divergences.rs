//! Known defects of the current build, in one place, so that the checker
//! stays written to upstream's semantics everywhere else. A difference is
//! excused only when the kernel does exactly what a listed defect
//! predicts; anything else is a mismatch.
//!
//! To retire a defect when its fix lands: delete its entry from
//! `KNOWN_DIVERGENCES` and its arm in `predict` (the checker's unit test
//! `known_divergences_are_exactly_the_listed_ones` says which cases it
//! covers).

use super::expected::{PortModel, in_prefix, ports};
use super::{Api, Frontend, Reach, Viewpoint};

/// The defects the checker knows about: (name, what it does). Empty since
/// the mode plugins receive both endpoint sets (contract 0.2.0); the first
/// entry, "mode-gets-internal-endpoints", excused 180 differences in a
/// 10-minute soak before that fix.
pub const KNOWN_DIVERGENCES: &[(&str, &str)] = &[];

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
    // One arm per entry of KNOWN_DIVERGENCES, saying what the build does.
    #[allow(clippy::match_single_binding)]
    match name {
        _ => None,
    }
}
