//! Proxy modes: the `proxy-mode` world of `kwp:mode`, and the contract's
//! types under their own names (`kwp_sdk::mode::{ModeConfig, Fragment,
//! ServicePort, ...}`), so a mode needs no generated paths.

/// Generated bindings of the `proxy-mode` world. Its `kwp:types` values are
/// the policy world's ([`crate::types`]), so a mode and a policy share them.
pub mod bindings {
    wit_bindgen::generate!({
        world: "proxy-mode",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export_mode_world",
        default_bindings_module: "kwp_sdk::mode::bindings",
        with: { "kwp:types/types@0.3.0": crate::types },
        additional_derives: [PartialEq, Eq, Hash, PartialOrd, Ord],
        generate_all,
    });
}

pub use crate::types::*;
pub use bindings::exports::kwp::mode::mode::{
    DetectLocal, EndpointSet, Guest, ModeConfig, ServiceEndpoints,
};
pub use bindings::kwp::mode::plan::{
    Fragment, IptablesChain, IpvsRealServer, IpvsVirtualServer, Item, Listener, NftChain,
    NftElement, NftFamily, NftSet,
};

/// A proxy mode: turns the node's settings and each service-port's
/// endpoints into declarative plan fragments that the host checks and
/// applies (a mode never touches the kernel). The host calls it from one
/// thread at a time and may start a fresh instance at any moment (after a
/// trap, or a reload), calling [`Mode::configure`] first: keep no state
/// that cannot be rebuilt from the calls.
pub trait Mode: Default + 'static {
    /// The node-wide settings, once after start and again whenever they
    /// change. An error refuses them.
    fn configure(&mut self, config: ModeConfig) -> Result<(), String>;
    /// The node-wide base: tables, hook chains, dispatch maps.
    fn render_base(&mut self) -> Result<Fragment, String>;
    /// One service-port's fragment, from its endpoints as upstream
    /// kube-proxy categorizes them (already filtered: do not filter again).
    /// Called again whenever the Service or its endpoints change; the host
    /// replaces the service-port's previous fragment with it.
    fn render_service(
        &mut self,
        service: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String>;
}

/// Exports a [`Mode`] type as the component's `mode` interface. On native
/// targets it expands to nothing: the mode is then an ordinary Rust type
/// for [`crate::testing::mode::Harness`].
#[macro_export]
macro_rules! export_mode {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::mode::{Fragment, Guest, Mode, ModeConfig, ServiceEndpoints, ServicePort};

            ::std::thread_local! {
                static MODE: ::std::cell::RefCell<$ty> = ::std::cell::RefCell::new(<$ty>::default());
            }
            fn with<R>(f: impl FnOnce(&mut $ty) -> R) -> R {
                MODE.with(|m| f(&mut m.borrow_mut()))
            }

            struct Export;
            impl Guest for Export {
                fn configure(config: ModeConfig) -> Result<(), String> {
                    with(|m| m.configure(config))
                }
                fn render_base() -> Result<Fragment, String> {
                    with(|m| m.render_base())
                }
                fn render_service(
                    service: ServicePort,
                    endpoints: ServiceEndpoints,
                ) -> Result<Fragment, String> {
                    with(|m| m.render_service(service, endpoints))
                }
            }
            $crate::mode::bindings::export_mode_world!(Export with_types_in $crate::mode::bindings);
        };
        // Natively, only check that the type is a mode (and count it as used).
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() -> $ty = $crate::mode::__new_mode::<$ty>;
    };
}

#[doc(hidden)]
pub fn __new_mode<M: Mode>() -> M {
    M::default()
}
