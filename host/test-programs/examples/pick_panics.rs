//! Panics in `pick` for client port 13, picks endpoint 0 otherwise: the host
//! must discard the trapped instance and serve the next call from a fresh one.
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
    fn pick(&mut self, service: u32, _: IpAddress, port: u16) -> Option<u32> {
        if port == 13 {
            panic!("pick_panics: deliberate panic");
        }
        self.0.0.get(&service).filter(|n| **n > 0).map(|_| 0)
    }
    fn plan(&mut self, service: u32) -> BackendPlan {
        self.0.plan(service)
    }
}

kwp_sdk::export_policy!(Bad);
