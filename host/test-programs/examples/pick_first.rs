//! Well behaved: always picks endpoint 0; `configure("fail")` errors.
use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};
use kwp_test_programs::Counts;

#[derive(Default)]
struct PickFirst(Counts);

impl Policy for PickFirst {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        if config == "fail" { Err("configured to fail".into()) } else { Ok(()) }
    }
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>) {
        self.0.set(service, &endpoints)
    }
    fn remove_service(&mut self, service: u32) {
        self.0.0.remove(&service);
    }
    fn pick(&mut self, service: u32, _: IpAddress, _: u16) -> Option<u32> {
        self.0.0.get(&service).filter(|n| **n > 0).map(|_| 0)
    }
    fn plan(&mut self, service: u32) -> BackendPlan {
        self.0.plan(service)
    }
}

kwp_sdk::export_policy!(PickFirst);
