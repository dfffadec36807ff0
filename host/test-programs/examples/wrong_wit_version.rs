//! A policy built against `kwp:policy@0.0.9`, a version this host does not
//! speak: the host must refuse it naming both versions.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        world: "kwp:policy/policy-plugin@0.0.9",
        path: ["../../sdk/wit/deps/types@0.3.0", "wit-v0.0.9"],
        generate_all,
    });
    use exports::kwp::policy::policy::Guest;
    use kwp::types::types::{BackendPlan, Endpoint, IpAddress};

    struct Old;
    impl Guest for Old {
        fn configure(_: String) -> Result<(), String> {
            Ok(())
        }
        fn set_endpoints(_: u32, _: Vec<Endpoint>) {}
        fn remove_service(_: u32) {}
        fn pick(_: u32, _: IpAddress, _: u16) -> Option<u32> {
            None
        }
        fn connection_closed(_: u32, _: u32) {}
        fn plan(_: u32) -> BackendPlan {
            BackendPlan::Weights(Vec::new())
        }
    }
    export!(Old);
}
