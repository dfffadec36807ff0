//! Traps whenever it is handed more than 100 endpoints: one Service that
//! poisons the instance. Every other Service using it must keep working.
struct Poisoned;

impl kwp_test_programs::Pick for Poisoned {
    fn pick(_service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        kwp_test_programs::first(endpoints)
    }
    fn before_set_endpoints(_service: u32, endpoints: usize) {
        if endpoints > 100 {
            panic!("traps_on_many_endpoints: {endpoints} endpoints");
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Poisoned>);
