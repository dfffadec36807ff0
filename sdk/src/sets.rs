//! For proxy modes: a service port's internal and external endpoint sets
//! merged into one list, so an endpoint in both gets one per-endpoint rule
//! (upstream renders each endpoint chain once), with each set's plan
//! re-indexed onto that list.

use crate::mode::{EndpointSet, ServiceEndpoints};
use std::collections::HashMap;

use crate::{BackendPlan, Endpoint, IpAddress};

/// One set's plan over the merged list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetPlan {
    /// One weight per merged endpoint; 0 for those outside this set (or
    /// excluded by the policy).
    pub weights: Vec<u32>,
    /// A consistent-hash slot table naming merged endpoints, when the
    /// policy planned one.
    pub slots: Option<Vec<u32>>,
}

impl SetPlan {
    /// Merged indices this set may reach (weight above 0), in list order.
    pub fn members(&self) -> Vec<usize> {
        (0..self.weights.len())
            .filter(|i| self.weights[*i] > 0)
            .collect()
    }

    /// The plan as a backend plan over the merged list.
    pub fn plan(&self) -> BackendPlan {
        match &self.slots {
            Some(slots) => BackendPlan::Slots(slots.clone()),
            None => BackendPlan::Weights(self.weights.clone()),
        }
    }
}

/// Both sets over one endpoint list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedSets {
    /// Every endpoint either set names, each address and port once.
    pub endpoints: Vec<Endpoint>,
    pub internal: SetPlan,
    pub external: SetPlan,
    /// The external set is the internal one (same endpoints, same plan):
    /// external traffic can share the internal chain.
    pub external_is_internal: bool,
    /// The Service has a usable endpoint on some node: an empty set drops
    /// rather than rejects.
    pub has_any: bool,
}

impl MergedSets {
    pub fn new(sets: &ServiceEndpoints) -> Result<Self, String> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        // By address and port: a Service may have tens of thousands.
        let mut seen: HashMap<(IpAddress, u16), usize> = HashMap::new();
        let mut index = |set: &EndpointSet| -> Vec<usize> {
            set.endpoints
                .iter()
                .map(|ep| {
                    *seen.entry((ep.address, ep.port)).or_insert_with(|| {
                        endpoints.push(ep.clone());
                        endpoints.len() - 1
                    })
                })
                .collect()
        };
        let internal_at = index(&sets.internal);
        let external_at = index(&sets.external);
        let n = endpoints.len();
        let internal =
            plan_over(&sets.internal, &internal_at, n).map_err(|e| format!("internal set: {e}"))?;
        let external =
            plan_over(&sets.external, &external_at, n).map_err(|e| format!("external set: {e}"))?;
        Ok(Self {
            endpoints,
            external_is_internal: sets.external == sets.internal,
            internal,
            external,
            has_any: sets.has_any_endpoints,
        })
    }
}

/// `set`'s plan re-indexed through `at` (set index to merged index).
fn plan_over(set: &EndpointSet, at: &[usize], n: usize) -> Result<SetPlan, String> {
    let own = crate::mode_weights(&set.backends, set.endpoints.len())?;
    let mut weights = vec![0u32; n];
    for (i, w) in own.iter().enumerate() {
        weights[at[i]] = weights[at[i]].saturating_add(*w);
    }
    let slots = match &set.backends {
        BackendPlan::Slots(slots) => Some(slots.iter().map(|s| at[*s as usize] as u32).collect()),
        BackendPlan::Weights(_) => None,
    };
    Ok(SetPlan { weights, slots })
}
