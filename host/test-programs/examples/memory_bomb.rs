//! Allocates without bound in `pick`: the memory cap must stop it.
use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};
use kwp_test_programs::Counts;

#[derive(Default)]
struct Bad(Counts);

impl Policy for Bad {
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        self.0.set(service, &endpoints)
    }
    fn remove_service(&mut self, service: u32) {
        self.0.0.remove(&service);
    }
    fn pick(&mut self, _: u32, _: IpAddress, _: u16) -> Option<u32> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    fn plan(&mut self, service: u32) -> BackendPlan {
        self.0.plan(service)
    }
}

kwp_sdk::export_policy!(Bad);
