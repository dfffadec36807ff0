//! A native harness for unit-testing a [`Policy`] without Wasm: it drives the
//! policy exactly as the host does (configure, push endpoints, pick, close).

use crate::{Endpoint, IpAddress, Policy};

pub mod mode;

/// An endpoint as the host would push it: ready, serving, local.
pub fn endpoint(ipv4: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        address: IpAddress::V4(u32::from_be_bytes(ipv4)),
        port,
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
        zone: None,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
        is_local: true,
    }
}

/// Drives one policy instance.
pub struct Harness<P: Policy> {
    pub policy: P,
}

impl<P: Policy> Harness<P> {
    /// A fresh policy, configured with `config`.
    pub fn new(config: &str) -> Result<Self, String> {
        let mut policy = P::default();
        policy.configure(config)?;
        Ok(Self { policy })
    }

    /// Pushes `n` endpoints 10.0.0.1.. port 8080 for `service`.
    pub fn with_endpoints(mut self, service: u32, n: u8) -> Self {
        let eps = (1..=n).map(|i| endpoint([10, 0, 0, i], 8080)).collect();
        self.policy.set_endpoints(service, eps);
        self
    }

    /// Picks for `connections` new flows from distinct client ports of
    /// `client`, returning how many landed on each endpoint index (`None`
    /// picks are counted in the last slot).
    pub fn distribution(
        &mut self,
        service: u32,
        client: IpAddress,
        endpoints: usize,
        connections: u32,
    ) -> Vec<u32> {
        let mut counts = vec![0; endpoints + 1];
        for i in 0..connections {
            let port = 1024 + (i % 60000) as u16;
            match self.policy.pick(service, client, port) {
                Some(ep) if (ep as usize) < endpoints => counts[ep as usize] += 1,
                _ => counts[endpoints] += 1,
            }
        }
        counts
    }
}
