//! Panics in `pick` on every call: the host must discard the trapped instance.
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
        panic!("pick_panics: deliberate panic")
    }
    fn plan(&mut self, service: u32) -> BackendPlan {
        self.0.plan(service)
    }
}

kwp_sdk::export_policy!(Bad);
