//! A proxy mode that spins forever in `render-service`: the deadline must
//! stop it and the Service keeps its last good rules.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::exports::kwp::proxy::mode::{Guest, ModeConfig, ServiceEndpoints};
    use kwp_sdk::mode::kwp::proxy::plan::Fragment;
    use kwp_sdk::mode::kwp::proxy::types::ServicePort;

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
    kwp_sdk::mode::export_mode_world!(Loops with_types_in kwp_sdk::mode);
}
