//! The kube-wasm-proxy SDK.
//!
//! A load-balancing policy is a type implementing [`Policy`], exported with
//! [`export_policy!`] from a `cdylib` crate built for `wasm32-wasip2`:
//!
//! ```
//! #[derive(Default)]
//! struct First;
//! impl kwp_sdk::Policy for First {
//!     fn set_endpoints(&mut self, _: u32, _: Vec<kwp_sdk::Endpoint>) {}
//!     fn remove_service(&mut self, _: u32) {}
//!     fn pick(&mut self, _: u32, _: kwp_sdk::IpAddress, _: u16) -> Option<u32> { Some(0) }
//!     fn plan(&mut self, _: u32) -> kwp_sdk::BackendPlan { kwp_sdk::BackendPlan::Weights(vec![1]) }
//! }
//! kwp_sdk::export_policy!(First);
//! ```
//!
//! The same type runs natively under [`testing::Harness`], so a policy is
//! unit-tested with `cargo test` and no Wasm toolchain.

pub mod hash;
pub mod mode;
pub mod sets;
pub mod slots;
pub mod testing;

/// Generated bindings of the `policy-plugin` world (`wit/`, shipped inside
/// this crate so that it builds from crates.io as it does here).
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export_policy_world",
        default_bindings_module: "kwp_sdk::bindings",
        additional_derives: [PartialEq, Eq, Hash, PartialOrd, Ord],
        generate_all,
    });
}

/// The values of `kwp:types`, shared by policies and modes: one Rust type
/// each, whichever world uses it.
pub use bindings::kwp::types::types;
pub use types::{BackendPlan, Endpoint, IpAddress};

/// For proxy modes: one weight per endpoint from a policy's plan (a lookup
/// table's slots counted per endpoint), or why the plan does not fit.
pub fn mode_weights(plan: &BackendPlan, n: usize) -> Result<Vec<u32>, String> {
    match plan {
        BackendPlan::Weights(w) if w.len() == n => Ok(w.clone()),
        BackendPlan::Weights(w) => {
            Err(format!("policy gave {} weights for {n} endpoints", w.len()))
        }
        BackendPlan::Slots(slots) => {
            let mut w = vec![0u32; n];
            for s in slots {
                *w.get_mut(*s as usize)
                    .ok_or(format!("slot names endpoint {s} of {n}"))? += 1;
            }
            Ok(w)
        }
    }
}

/// A stateful load-balancing policy. The host calls it from one thread at a
/// time; endpoints are referred to by their index in the last list given to
/// [`Policy::set_endpoints`] for that service.
pub trait Policy: Default + 'static {
    /// Receives the policy's configuration string once after start.
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
    /// The service's endpoint set changed.
    fn set_endpoints(&mut self, service: u32, endpoints: Vec<Endpoint>);
    /// The service is gone.
    fn remove_service(&mut self, service: u32);
    /// Choose an endpoint index for a new connection, `None` if there is none.
    fn pick(&mut self, service: u32, client: IpAddress, client_port: u16) -> Option<u32>;
    /// A connection routed to `endpoint` closed (userspace mode only).
    fn connection_closed(&mut self, service: u32, endpoint: u32) {
        let _ = (service, endpoint);
    }
    /// What a kernel mode should program for the service.
    fn plan(&mut self, service: u32) -> BackendPlan;
}

/// Exports a [`Policy`] type as the component's `policy` interface. On
/// native targets it expands to nothing: the policy is then an ordinary
/// Rust type for [`testing::Harness`].
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::exports::kwp::policy::policy::Guest;
            use $crate::{BackendPlan, Endpoint, IpAddress, Policy};

            ::std::thread_local! {
                static POLICY: ::std::cell::RefCell<$ty> = ::std::cell::RefCell::new(<$ty>::default());
            }
            fn with<R>(f: impl FnOnce(&mut $ty) -> R) -> R {
                POLICY.with(|p| f(&mut p.borrow_mut()))
            }

            struct Export;
            impl Guest for Export {
                fn configure(config: String) -> Result<(), String> {
                    with(|p| p.configure(&config))
                }
                fn set_endpoints(service: u32, endpoints: Vec<Endpoint>) {
                    with(|p| p.set_endpoints(service, endpoints))
                }
                fn remove_service(service: u32) {
                    with(|p| p.remove_service(service))
                }
                fn pick(service: u32, client: IpAddress, client_port: u16) -> Option<u32> {
                    with(|p| p.pick(service, client, client_port))
                }
                fn connection_closed(service: u32, endpoint: u32) {
                    with(|p| p.connection_closed(service, endpoint))
                }
                fn plan(service: u32) -> BackendPlan {
                    with(|p| p.plan(service))
                }
            }
            $crate::bindings::export_policy_world!(Export with_types_in $crate::bindings);
        };
        // Natively, only check that the type is a policy (and count it as used).
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() -> $ty = $crate::__new_policy::<$ty>;
    };
}

#[doc(hidden)]
pub fn __new_policy<P: Policy>() -> P {
    P::default()
}

/// Endpoint weights that treat every endpoint alike: the plan of policies
/// whose kernel form is an even spread (round-robin, random).
pub fn even_weights(endpoints: usize) -> BackendPlan {
    BackendPlan::Weights(vec![1; endpoints])
}
