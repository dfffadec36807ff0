//! Panics in `pick` for client port 13, picks endpoint 0 otherwise: the host
//! must discard the trapped instance and serve the next call from a fresh one.
struct Panics;

impl kwp_test_programs::Pick for Panics {
    fn pick(_service: u32, endpoints: usize, port: u16) -> Option<u32> {
        if port == 13 {
            panic!("pick_panics: deliberate panic");
        }
        kwp_test_programs::first(endpoints)
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Panics>);
