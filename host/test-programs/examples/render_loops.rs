//! A proxy mode that spins forever in `render-service`: the deadline must
//! stop it and the Service keeps its last good rules.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::Fragment;
    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    struct Loops;
    impl Guest for Loops {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(_: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Loops with_types_in kwp_sdk::mode::bindings);
}
