//! An iptables proxy mode whose plan writes into a built-in chain (filter
//! INPUT) instead of its own `KWP-` chains: the host must refuse it, at
//! the reload probe already.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Fragment, IptablesChain, Item};
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    struct Builtin;
    impl Guest for Builtin {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(_: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            Ok(Fragment {
                items: vec![Item::IptablesChain(IptablesChain {
                    ipv6: false,
                    table: "filter".into(),
                    name: "INPUT".into(),
                    rules: vec!["-j ACCEPT".into()],
                })],
            })
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Builtin with_types_in kwp_sdk::mode::bindings);
}
