//! A proxy mode that passes the reload probe (the `kwp-probe` Service) and
//! then fails on real Services, to test probation and rollback of modes:
//! in namespace `render-fails` it returns an error; in `ok` it renders a
//! valid chain; anywhere else it renders a rule nft refuses. Configured
//! with `extra` = `base-fails`, its node-wide fragment fails to render.
#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use kwp_sdk::mode::ServicePort;
    use kwp_sdk::mode::{Fragment, Item, NftChain, NftFamily};
    use kwp_sdk::mode::{Guest, ModeConfig, ServiceEndpoints};

    thread_local! {
        static TABLE: RefCell<String> = RefCell::default();
        static BASE_FAILS: RefCell<bool> = RefCell::default();
    }

    fn chain(name: String, rule: &str) -> Fragment {
        Fragment {
            items: vec![Item::NftChain(NftChain {
                family: NftFamily::Ip,
                table: TABLE.with(|t| t.borrow().clone()),
                name,
                hook: None,
                rules: vec![rule.into()],
            })],
        }
    }

    struct Breaks;
    impl Guest for Breaks {
        fn configure(config: ModeConfig) -> Result<(), String> {
            TABLE.with(|t| *t.borrow_mut() = config.table);
            BASE_FAILS.with(|b| *b.borrow_mut() = config.extra == "base-fails");
            Ok(())
        }
        fn render_base() -> Result<Fragment, String> {
            if BASE_FAILS.with(|b| *b.borrow()) {
                return Err("base broken on purpose".into());
            }
            Ok(Fragment { items: Vec::new() })
        }
        fn render_service(svc: ServicePort, _: ServiceEndpoints) -> Result<Fragment, String> {
            let name = format!("svc-{}", svc.id);
            match svc.namespace.as_str() {
                "kwp-probe" | "ok" => Ok(chain(name, "accept")),
                "render-fails" => Err("broken on purpose".into()),
                _ => Ok(chain(name, "no-such-statement 42")),
            }
        }
    }
    kwp_sdk::mode::bindings::export_mode_world!(Breaks with_types_in kwp_sdk::mode::bindings);
}
