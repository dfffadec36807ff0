//! A policy without `pick`: the host must refuse it with a clear error.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        world: "kwp:policy/policy-plugin",
        path: ["../../sdk/wit/deps/types@0.3.0", "wit-missing-export"],
        generate_all,
    });
    use exports::kwp::policy::policy::Guest;
    use kwp::types::types::{BackendPlan, Endpoint};

    struct NoPick;
    impl Guest for NoPick {
        fn configure(_: String) -> Result<(), String> {
            Ok(())
        }
        fn set_endpoints(_: u32, _: Vec<Endpoint>) {}
        fn remove_service(_: u32) {}
        fn connection_closed(_: u32, _: u32) {}
        fn plan(_: u32) -> BackendPlan {
            BackendPlan::Weights(Vec::new())
        }
    }
    export!(NoPick);
}
