//! Round-robin: each new connection goes to the next endpoint in turn. In
//! kernel modes the plan is an even spread (`numgen inc`).

use std::collections::BTreeMap;

use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy, even_weights};

#[derive(Default)]
pub struct RoundRobin {
    /// service -> (endpoint count, next index)
    services: BTreeMap<u32, (u32, u32)>,
}

impl Policy for RoundRobin {
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        let n = endpoints.len() as u32;
        let entry = self.services.entry(service).or_insert((0, 0));
        *entry = (n, if n == 0 { 0 } else { entry.1 % n });
    }

    fn remove_service(&mut self, service: u32) {
        self.services.remove(&service);
    }

    fn pick(&mut self, service: u32, _client: IpAddress, _port: u16) -> Option<u32> {
        let (n, next) = self.services.get_mut(&service)?;
        if *n == 0 {
            return None;
        }
        let pick = *next;
        *next = (*next + 1) % *n;
        Some(pick)
    }

    fn plan(&mut self, service: u32) -> BackendPlan {
        even_weights(self.services.get(&service).map_or(0, |s| s.0 as usize))
    }
}

kwp_sdk::export_policy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::Harness;

    #[test]
    fn cycles_through_every_endpoint_evenly() {
        let mut h = Harness::<RoundRobin>::new("").unwrap().with_endpoints(7, 3);
        assert_eq!(
            h.distribution(7, IpAddress::V4(1), 3, 300),
            [100, 100, 100, 0]
        );
        assert_eq!(h.policy.plan(7), BackendPlan::Weights(vec![1, 1, 1]));
    }

    #[test]
    fn no_endpoints_means_no_pick_and_shrinking_stays_in_range() {
        let mut h = Harness::<RoundRobin>::new("").unwrap().with_endpoints(1, 4);
        assert_eq!(h.policy.pick(2, IpAddress::V4(1), 1), None);
        for _ in 0..3 {
            h.policy.pick(1, IpAddress::V4(1), 1);
        }
        h = h.with_endpoints(1, 2);
        assert_eq!(h.distribution(1, IpAddress::V4(1), 2, 10), [5, 5, 0]);
        h.policy.set_endpoints(1, Vec::new());
        assert_eq!(h.policy.pick(1, IpAddress::V4(1), 1), None);
        h.policy.remove_service(1);
        assert_eq!(h.policy.plan(1), BackendPlan::Weights(vec![]));
    }
}
