//! Least-connections: a new connection goes to the endpoint with the
//! fewest open connections, counted from `pick` to `connection-closed`
//! (userspace mode). Kernel modes cannot count, so the plan is an even
//! spread. Counts follow endpoints by address across endpoint changes.

use std::collections::BTreeMap;

use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy, even_weights};

#[derive(Default)]
pub struct LeastConnections {
    /// service -> endpoint keys, in pushed order
    endpoints: BTreeMap<u32, Vec<(IpAddress, u16)>>,
    /// (service, endpoint) -> open connections
    open: BTreeMap<(u32, (IpAddress, u16)), u32>,
    /// Rotates ties so that equal endpoints take turns.
    turn: u32,
}

impl Policy for LeastConnections {
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        let keys: Vec<(IpAddress, u16)> = endpoints.iter().map(|e| (e.address, e.port)).collect();
        // Forget counts of endpoints that are gone.
        self.open
            .retain(|(s, k), _| *s != service || keys.contains(k));
        self.endpoints.insert(service, keys);
    }

    fn remove_service(&mut self, service: u32) {
        self.endpoints.remove(&service);
        self.open.retain(|(s, _), _| *s != service);
    }

    fn pick(&mut self, service: u32, _client: IpAddress, _port: u16) -> Option<u32> {
        let keys = self.endpoints.get(&service).filter(|k| !k.is_empty())?;
        let n = keys.len();
        self.turn = self.turn.wrapping_add(1);
        let start = self.turn as usize % n;
        let best = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|i| self.open.get(&(service, keys[*i])).copied().unwrap_or(0))?;
        *self.open.entry((service, keys[best])).or_default() += 1;
        Some(best as u32)
    }

    fn connection_closed(&mut self, service: u32, endpoint: u32) {
        let Some(key) = self
            .endpoints
            .get(&service)
            .and_then(|k| k.get(endpoint as usize))
            .copied()
        else {
            return;
        };
        if let Some(count) = self.open.get_mut(&(service, key)) {
            *count = count.saturating_sub(1);
        }
    }

    fn plan(&mut self, service: u32) -> BackendPlan {
        even_weights(self.endpoints.get(&service).map_or(0, Vec::len))
    }
}

kwp_sdk::export_policy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::{Harness, endpoint};

    const C: IpAddress = IpAddress::V4(1);

    #[test]
    fn new_connections_go_to_the_least_loaded_endpoint() {
        let mut h = Harness::<LeastConnections>::new("")
            .unwrap()
            .with_endpoints(1, 3);
        let first: Vec<u32> = (0..3).map(|_| h.policy.pick(1, C, 1).unwrap()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "one each while all are equal");
        h.policy.connection_closed(1, 1);
        assert_eq!(h.policy.pick(1, C, 1), Some(1), "endpoint 1 has the fewest");
        // Endpoint 2 closes twice (one real close, one spurious): never below zero.
        h.policy.connection_closed(1, 2);
        h.policy.connection_closed(1, 2);
        assert_eq!(h.policy.pick(1, C, 1), Some(2));
    }

    #[test]
    fn counts_follow_endpoints_across_changes() {
        let mut h = Harness::<LeastConnections>::new("").unwrap();
        let (a, b, c) = (
            endpoint([10, 0, 0, 1], 80),
            endpoint([10, 0, 0, 2], 80),
            endpoint([10, 0, 0, 3], 80),
        );
        h.policy.set_endpoints(1, vec![a.clone(), b.clone()]);
        for _ in 0..4 {
            h.policy.pick(1, C, 1);
        }
        // a and b have 2 open each; c joins with none, in front.
        h.policy.set_endpoints(1, vec![c, a, b]);
        assert_eq!(h.policy.pick(1, C, 1), Some(0));
        assert_eq!(h.policy.plan(1), BackendPlan::Weights(vec![1, 1, 1]));
    }
}
