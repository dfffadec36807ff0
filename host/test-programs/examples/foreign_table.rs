//! A proxy mode whose plan names a table the host does not own (the
//! node's `filter` table): the host must refuse the fragment.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Fragment, Item, NftChain, NftFamily};
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    struct Foreign;
    impl Guest for Foreign {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(_: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            Ok(Fragment {
                items: vec![Item::NftChain(NftChain {
                    family: NftFamily::Inet,
                    table: "filter".into(),
                    name: "input".into(),
                    hook: None,
                    rules: vec!["accept".into()],
                })],
            })
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Foreign with_types_in kwp_sdk::mode::bindings);
}
