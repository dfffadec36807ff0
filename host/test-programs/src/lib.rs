//! Shared pieces of the test programs in `examples/`; each example is one
//! guest component with one misbehaviour in `pick`.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy, even_weights};

/// The misbehaviour: what `pick` does, given the endpoint count.
pub trait Pick: 'static {
    fn pick(service: u32, endpoints: usize, port: u16) -> Option<u32>;
    fn configure(_config: &str) -> Result<(), String> {
        Ok(())
    }
    /// Called before `plan` answers (a hook for misbehaving there).
    fn before_plan(_service: u32) {}
    /// Called before `set-endpoints` stores the count (a hook for misbehaving there).
    fn before_set_endpoints(_service: u32, _endpoints: usize) {}
}

/// A policy that keeps endpoint counts and delegates `pick` to `P`.
pub struct With<P> {
    counts: BTreeMap<u32, usize>,
    _pick: PhantomData<P>,
}

impl<P> Default for With<P> {
    fn default() -> Self {
        Self {
            counts: BTreeMap::new(),
            _pick: PhantomData,
        }
    }
}

impl<P: Pick> Policy for With<P> {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        P::configure(config)
    }
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        P::before_set_endpoints(service, endpoints.len());
        self.counts.insert(service, endpoints.len());
    }
    fn remove_service(&mut self, service: u32) {
        self.counts.remove(&service);
    }
    fn pick(&mut self, service: u32, _client: IpAddress, port: u16) -> Option<u32> {
        P::pick(
            service,
            self.counts.get(&service).copied().unwrap_or(0),
            port,
        )
    }
    fn plan(&mut self, service: u32) -> BackendPlan {
        P::before_plan(service);
        even_weights(self.counts.get(&service).copied().unwrap_or(0))
    }
}

/// Endpoint 0 when there is one.
pub fn first(endpoints: usize) -> Option<u32> {
    (endpoints > 0).then_some(0)
}
