//! A starting point: round-robin over the endpoints on this node when there
//! are any, over all endpoints otherwise ("prefer local").

use std::collections::BTreeMap;

use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};

#[derive(Default)]
pub struct PreferLocal {
    /// service -> (endpoint count, candidate indices, next turn)
    services: BTreeMap<u32, (usize, Vec<u32>, usize)>,
}

impl Policy for PreferLocal {
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        let local: Vec<u32> = (0..endpoints.len() as u32).filter(|i| endpoints[*i as usize].is_local).collect();
        let candidates = if local.is_empty() { (0..endpoints.len() as u32).collect() } else { local };
        self.services.insert(service, (endpoints.len(), candidates, 0));
    }

    fn remove_service(&mut self, service: u32) {
        self.services.remove(&service);
    }

    fn pick(&mut self, service: u32, _client: IpAddress, _port: u16) -> Option<u32> {
        let (_, candidates, turn) = self.services.get_mut(&service)?;
        let pick = *candidates.get(*turn % candidates.len().max(1))?;
        *turn += 1;
        Some(pick)
    }

    /// Kernel modes: weight 1 for the candidates, 0 for the rest.
    fn plan(&mut self, service: u32) -> BackendPlan {
        let Some((n, candidates, _)) = self.services.get(&service) else { return BackendPlan::Weights(Vec::new()) };
        BackendPlan::Weights((0..*n as u32).map(|i| u32::from(candidates.contains(&i))).collect())
    }
}

kwp_sdk::export_policy!(PreferLocal);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::{Harness, endpoint};

    #[test]
    fn local_endpoints_are_preferred() {
        let mut h = Harness::<PreferLocal>::new("").unwrap();
        let mut remote = endpoint([10, 0, 0, 1], 80);
        remote.is_local = false;
        let mut other = endpoint([10, 0, 0, 3], 80);
        other.is_local = false;
        h.policy.set_endpoints(1, vec![remote, endpoint([10, 0, 0, 2], 80), other]);
        assert_eq!(h.distribution(1, IpAddress::V4(7), 3, 10), [0, 10, 0, 0]);
        assert_eq!(h.policy.plan(1), BackendPlan::Weights(vec![0, 1, 0]));
    }
}
