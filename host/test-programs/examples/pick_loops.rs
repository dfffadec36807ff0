//! Spins forever in `pick`: the epoch deadline must stop it.
struct Loops;

impl kwp_test_programs::Pick for Loops {
    fn pick(_service: u32, _endpoints: usize, _port: u16) -> Option<u32> {
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Loops>);
