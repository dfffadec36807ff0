//! A policy built against `kwp:proxy@0.0.9`: the host must refuse it with
//! a clear error instead of instantiating it.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ world: "policy-plugin", path: "wit-v0.0.9" });
    use exports::kwp::proxy::policy::Guest;
    use kwp::proxy::types::{BackendPlan, Endpoint, IpAddress};

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
