//! Allocates without bound in `pick`: the memory cap must stop it.
struct Bomb;

impl kwp_test_programs::Pick for Bomb {
    fn pick(_service: u32, _endpoints: usize, _port: u16) -> Option<u32> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Bomb>);
