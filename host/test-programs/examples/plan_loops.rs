//! Spins forever in `plan` (for real services, not the reload probe's):
//! the epoch deadline must stop it and the sync must keep the last good rules.
struct Loops;

impl kwp_test_programs::Pick for Loops {
    fn pick(_service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        kwp_test_programs::first(endpoints)
    }
    fn before_plan(service: u32) {
        if service != u32::MAX {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Loops>);
