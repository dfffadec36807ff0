//! An iptables proxy mode that passes the reload probe (a valid `KWP-`
//! chain for the `kwp-probe` Service) and then, for real Services, renders
//! a rule the host accepts but iptables-restore refuses (a match module
//! that does not exist): its first sync fails in the kernel, to test that
//! a reloaded iptables mode is rolled back with nothing of it applied.
#[cfg(target_arch = "wasm32")]
mod component {
    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Fragment, IptablesChain, Item};
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    fn chain(name: String, rule: &str) -> Fragment {
        Fragment {
            items: vec![Item::IptablesChain(IptablesChain {
                ipv6: false,
                table: "nat".into(),
                name,
                rules: vec![rule.into()],
            })],
        }
    }

    struct Breaks;
    impl Guest for Breaks {
        fn configure(_: ModeConfig) -> Result<(), String> {
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            Ok(chain("KWP-SERVICES".into(), "-j RETURN"))
        }
        fn render_service(svc: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            let name = format!("KWP-SVC-BROKEN{}", svc.id);
            match svc.namespace.as_str() {
                "kwp-probe" => Ok(chain(name, "-j RETURN")),
                _ => Ok(chain(name, "-m no-such-match --nope 1 -j RETURN")),
            }
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Breaks with_types_in kwp_sdk::mode::bindings);
}
