//! A proxy mode built against `kwp:mode@0.3.0`, the contract before the
//! short-circuit set (`cluster`) joined `service-endpoints`: a mode built
//! with an older kwp-sdk. The host must refuse it naming both versions.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        world: "kwp:mode/proxy-mode@0.3.0",
        path: ["../../sdk/wit/deps/types@0.3.0", "wit-mode-v0.3.0"],
        generate_all,
    });
    use exports::kwp::mode::mode::{Guest, ModeConfig, ServiceEndpoints};
    use kwp::mode::plan::Fragment;
    use kwp::types::types::ServicePort;

    struct Old;
    impl Guest for Old {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(_: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
    }
    export!(Old);
}
