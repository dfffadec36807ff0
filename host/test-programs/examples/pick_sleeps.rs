//! Sleeps in `pick` on a WASI clock for far longer than any deadline: the
//! guest runs no code while it waits, so the epoch cannot stop it; the
//! host must end the call as a deadline error anyway.
struct Sleeps;

impl kwp_test_programs::Pick for Sleeps {
    fn pick(_service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        std::thread::sleep(std::time::Duration::from_secs(10));
        kwp_test_programs::first(endpoints)
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Sleeps>);
