//! Shared pieces of the test programs in `examples/`; each example is one
//! guest component with one misbehaviour.

use kwp_sdk::{BackendPlan, Endpoint, even_weights};

/// Endpoint counts per service, the state every test program keeps.
#[derive(Default)]
pub struct Counts(pub std::collections::BTreeMap<u32, usize>);

impl Counts {
    pub fn set(&mut self, service: u32, endpoints: &[Endpoint]) {
        self.0.insert(service, endpoints.len());
    }
    pub fn plan(&self, service: u32) -> BackendPlan {
        even_weights(self.0.get(&service).copied().unwrap_or(0))
    }
}
