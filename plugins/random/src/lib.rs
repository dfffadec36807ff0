//! Random: each new connection goes to a uniformly random endpoint. In
//! kernel modes the plan is an even spread (`numgen random`).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy, even_weights, hash::mix};

pub struct Random {
    counts: BTreeMap<u32, u32>,
    state: u64,
}

impl Default for Random {
    fn default() -> Self {
        // std's RandomState draws its keys from the platform's random source
        // (WASI random in the sandbox), which gives us a seed.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            counts: BTreeMap::new(),
            state: seed,
        }
    }
}

impl Random {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }
}

impl Policy for Random {
    /// Config: empty, or `seed=N` for a reproducible sequence.
    fn configure(&mut self, config: &str) -> Result<(), String> {
        match config.trim() {
            "" => Ok(()),
            c => match c.strip_prefix("seed=").map(str::parse::<u64>) {
                Some(Ok(seed)) => {
                    self.state = seed;
                    Ok(())
                }
                _ => Err(format!(
                    "random: unknown config {c:?} (expected \"seed=N\")"
                )),
            },
        }
    }

    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        self.counts.insert(service, endpoints.len() as u32);
    }

    fn remove_service(&mut self, service: u32) {
        self.counts.remove(&service);
    }

    fn pick(&mut self, service: u32, _client: IpAddress, _port: u16) -> Option<u32> {
        let n = *self.counts.get(&service).filter(|n| **n > 0)?;
        Some((self.next() % u64::from(n)) as u32)
    }

    fn plan(&mut self, service: u32) -> BackendPlan {
        even_weights(self.counts.get(&service).copied().unwrap_or(0) as usize)
    }
}

kwp_sdk::export_policy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::Harness;

    #[test]
    fn spreads_roughly_evenly_and_never_out_of_range() {
        let mut h = Harness::<Random>::new("seed=42")
            .unwrap()
            .with_endpoints(1, 4);
        let d = h.distribution(1, IpAddress::V4(1), 4, 40_000);
        assert_eq!(d[4], 0, "picked outside the endpoint list");
        for c in &d[..4] {
            assert!((9_000..11_000).contains(c), "{d:?}");
        }
    }

    #[test]
    fn seed_makes_it_reproducible_and_bad_config_is_an_error() {
        let mut a = Harness::<Random>::new("seed=7")
            .unwrap()
            .with_endpoints(1, 5);
        let mut b = Harness::<Random>::new("seed=7")
            .unwrap()
            .with_endpoints(1, 5);
        let pa: Vec<_> = (0..20)
            .map(|_| a.policy.pick(1, IpAddress::V4(1), 1))
            .collect();
        let pb: Vec<_> = (0..20)
            .map(|_| b.policy.pick(1, IpAddress::V4(1), 1))
            .collect();
        assert_eq!(pa, pb);
        assert!(Harness::<Random>::new("bogus").is_err());
    }
}
