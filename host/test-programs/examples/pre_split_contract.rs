//! A policy built against the contract before it was split into versioned
//! packages (`kwp:proxy@0.2.0`, every plugin built before kwp-sdk 0.3's
//! contract): the host must refuse it naming both versions.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ world: "policy-plugin", path: "wit-pre-split" });
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
