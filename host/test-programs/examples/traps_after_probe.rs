//! Passes the reload probe (which uses service id u32::MAX) but panics on
//! every real pick: a version that only fails under real traffic, which the
//! host must roll back after its probation failures.
struct Sneaky;

impl kwp_test_programs::Pick for Sneaky {
    fn pick(service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        if service != u32::MAX {
            panic!("traps_after_probe: real traffic");
        }
        kwp_test_programs::first(endpoints)
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Sneaky>);
