//! Weighted: endpoints share new connections in proportion to their
//! weights, set per Service in the `kube-wasm-proxy.io/lb-policy-config`
//! annotation as `IP=WEIGHT` pairs (`10.244.1.11=3, 10.244.2.11=1`);
//! endpoints not named weigh 1, weight 0 takes them out of rotation.
//! Kernel modes get the weights as the plan.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use kwp_sdk::hash::mix;
use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};

pub struct Weighted {
    weights_by_ip: BTreeMap<String, u32>,
    /// service -> weight per pushed endpoint
    services: BTreeMap<u32, Vec<u32>>,
    state: u64,
}

impl Default for Weighted {
    fn default() -> Self {
        // std's RandomState is seeded from the platform's random source.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            weights_by_ip: BTreeMap::new(),
            services: BTreeMap::new(),
            state: seed,
        }
    }
}

fn ip_string(ip: IpAddress) -> String {
    match ip {
        IpAddress::V4(a) => std::net::Ipv4Addr::from(a).to_string(),
        IpAddress::V6((hi, lo)) => {
            std::net::Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo)).to_string()
        }
    }
}

impl Policy for Weighted {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        for pair in config.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (ip, w) = pair
                .split_once('=')
                .ok_or_else(|| format!("weighted: {pair:?} is not IP=WEIGHT"))?;
            let ip: std::net::IpAddr = ip
                .trim()
                .parse()
                .map_err(|_| format!("weighted: {ip:?} is not an IP address"))?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("weighted: weight {w:?} is not a number"))?;
            if w > 1000 {
                return Err(format!("weighted: weight {w} is above 1000"));
            }
            self.weights_by_ip.insert(ip.to_string(), w);
        }
        Ok(())
    }

    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        let weights = endpoints
            .iter()
            .map(|e| {
                self.weights_by_ip
                    .get(&ip_string(e.address))
                    .copied()
                    .unwrap_or(1)
            })
            .collect();
        self.services.insert(service, weights);
    }

    fn remove_service(&mut self, service: u32) {
        self.services.remove(&service);
    }

    fn pick(&mut self, service: u32, _client: IpAddress, _port: u16) -> Option<u32> {
        let weights = self.services.get(&service)?;
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut at = mix(self.state) % total;
        for (i, w) in weights.iter().enumerate() {
            if at < u64::from(*w) {
                return Some(i as u32);
            }
            at -= u64::from(*w);
        }
        None
    }

    fn plan(&mut self, service: u32) -> BackendPlan {
        BackendPlan::Weights(self.services.get(&service).cloned().unwrap_or_default())
    }
}

kwp_sdk::export_policy!(Weighted);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::Harness;

    #[test]
    fn connections_follow_the_weights() {
        let mut h = Harness::<Weighted>::new("10.0.0.1=3, 10.0.0.3=0")
            .unwrap()
            .with_endpoints(1, 3);
        let d = h.distribution(1, IpAddress::V4(1), 3, 40_000);
        // 3 : 1 : 0
        assert!((29_000..31_000).contains(&d[0]), "{d:?}");
        assert!((9_000..11_000).contains(&d[1]), "{d:?}");
        assert_eq!(d[2], 0, "weight 0 is out of rotation");
        assert_eq!(h.policy.plan(1), BackendPlan::Weights(vec![3, 1, 0]));
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Harness::<Weighted>::new("10.0.0.1").is_err());
        assert!(Harness::<Weighted>::new("nope=1").is_err());
        assert!(Harness::<Weighted>::new("10.0.0.1=x").is_err());
        assert!(Harness::<Weighted>::new("10.0.0.1=5000").is_err());
    }
}
