//! Maglev consistent hashing: each client address maps to a slot of a
//! Maglev table, so a client keeps its endpoint and removing one of N
//! endpoints moves only about 1/N of clients. Kernel modes get the table
//! itself (`slots`) and hash the client address into it.
//!
//! Config: `size=N` (a prime, default 251).

use std::collections::BTreeMap;

use kwp_sdk::hash::client_hash;
use kwp_sdk::slots::maglev;
use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};

pub const DEFAULT_SIZE: usize = 251;

pub struct Maglev {
    size: usize,
    tables: BTreeMap<u32, Vec<u32>>,
}

impl Default for Maglev {
    fn default() -> Self {
        Self {
            size: DEFAULT_SIZE,
            tables: BTreeMap::new(),
        }
    }
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn key(ep: &Endpoint) -> String {
    match ep.address {
        IpAddress::V4(a) => format!("{}:{}", std::net::Ipv4Addr::from(a), ep.port),
        IpAddress::V6((hi, lo)) => format!(
            "[{}]:{}",
            std::net::Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo)),
            ep.port
        ),
    }
}

impl Policy for Maglev {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        for part in config.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("size", n)) => {
                    let n: usize = n
                        .parse()
                        .map_err(|_| format!("maglev: size {n:?} is not a number"))?;
                    if !is_prime(n) || n > 65_537 {
                        return Err(format!(
                            "maglev: size {n} must be a prime no larger than 65537"
                        ));
                    }
                    self.size = n;
                }
                _ => return Err(format!("maglev: unknown config {part:?} (expected size=N)")),
            }
        }
        Ok(())
    }

    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        let names: Vec<String> = endpoints.iter().map(key).collect();
        self.tables.insert(service, maglev(&names, self.size));
    }

    fn remove_service(&mut self, service: u32) {
        self.tables.remove(&service);
    }

    fn pick(&mut self, service: u32, client: IpAddress, _port: u16) -> Option<u32> {
        let table = self.tables.get(&service).filter(|t| !t.is_empty())?;
        Some(table[(client_hash(client) % table.len() as u64) as usize])
    }

    fn plan(&mut self, service: u32) -> BackendPlan {
        BackendPlan::Slots(self.tables.get(&service).cloned().unwrap_or_default())
    }
}

kwp_sdk::export_policy!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::testing::{Harness, endpoint};

    fn clients() -> impl Iterator<Item = IpAddress> {
        (0..5000u32).map(|i| IpAddress::V4(0xc000_0000 | i))
    }

    #[test]
    fn clients_spread_evenly_and_stick() {
        let mut h = Harness::<Maglev>::new("").unwrap().with_endpoints(1, 5);
        let mut counts = [0u32; 5];
        for c in clients() {
            let a = h.policy.pick(1, c, 1).unwrap();
            assert_eq!(
                h.policy.pick(1, c, 2),
                Some(a),
                "same client, same endpoint"
            );
            counts[a as usize] += 1;
        }
        for n in counts {
            assert!((850..1150).contains(&n), "{counts:?}");
        }
        assert!(matches!(h.policy.plan(1), BackendPlan::Slots(s) if s.len() == DEFAULT_SIZE));
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth_of_clients() {
        let mut h = Harness::<Maglev>::new("size=1009").unwrap();
        let eps: Vec<Endpoint> = (1..=8).map(|i| endpoint([10, 0, 0, i], 80)).collect();
        h.policy.set_endpoints(1, eps.clone());
        let before: Vec<String> = clients()
            .map(|c| key(&eps[h.policy.pick(1, c, 1).unwrap() as usize]))
            .collect();
        let mut fewer = eps.clone();
        fewer.remove(5);
        h.policy.set_endpoints(1, fewer.clone());
        let after: Vec<String> = clients()
            .map(|c| key(&fewer[h.policy.pick(1, c, 1).unwrap() as usize]))
            .collect();
        let moved =
            before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / before.len() as f64;
        assert!(moved < 1.0 / 8.0 + 0.05, "moved {moved:.3}");
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Harness::<Maglev>::new("size=100").is_err());
        assert!(Harness::<Maglev>::new("size=x").is_err());
        assert!(Harness::<Maglev>::new("bogus=1").is_err());
        assert!(Harness::<Maglev>::new("size=13").is_ok());
    }
}
