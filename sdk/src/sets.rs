//! For proxy modes: a service port's internal, external and short-circuit
//! endpoint sets merged into one list, so an endpoint in several gets one
//! per-endpoint rule (upstream renders each endpoint chain once), with each
//! set's plan re-indexed onto that list.

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

/// The sets over one endpoint list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedSets {
    /// Every endpoint some set names, each address and port once.
    pub endpoints: Vec<Endpoint>,
    pub internal: SetPlan,
    pub external: SetPlan,
    /// The cluster-wide set that this node's pods and the node itself reach
    /// external frontends through under externalTrafficPolicy Local
    /// (`ServiceEndpoints::cluster`); all weights 0 when it is empty.
    pub cluster: SetPlan,
    /// The external set is the internal one (same endpoints, same plan):
    /// external traffic can share the internal chain.
    pub external_is_internal: bool,
    /// The short-circuit set is the internal one: the short-circuit can
    /// use the internal chain.
    pub cluster_is_internal: bool,
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
        let cluster_at = index(&sets.cluster);
        let n = endpoints.len();
        let internal =
            plan_over(&sets.internal, &internal_at, n).map_err(|e| format!("internal set: {e}"))?;
        let external =
            plan_over(&sets.external, &external_at, n).map_err(|e| format!("external set: {e}"))?;
        let cluster = plan_over(&sets.cluster, &cluster_at, n)
            .map_err(|e| format!("short-circuit (cluster) set: {e}"))?;
        Ok(Self {
            endpoints,
            external_is_internal: sets.external == sets.internal,
            cluster_is_internal: sets.cluster == sets.internal,
            internal,
            external,
            cluster,
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
