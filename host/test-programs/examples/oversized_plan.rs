//! A proxy mode that renders 200,000 items for one Service: the host must
//! refuse the fragment as too large.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Fragment, Item, NftElement, NftFamily};
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    struct Huge;
    impl Guest for Huge {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(_: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            let item = |i: u32| {
                Item::NftElement(NftElement {
                    family: NftFamily::Ip,
                    table: "kube-wasm-proxy".into(),
                    set: "s".into(),
                    element: i.to_string(),
                })
            };
            Ok(Fragment {
                items: (0..200_000).map(item).collect(),
            })
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Huge with_types_in kwp_sdk::mode::bindings);
}
