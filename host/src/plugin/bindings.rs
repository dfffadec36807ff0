//! The host's bindings of the WIT contract (`sdk/wit/`, the copy the SDK
//! crate ships), generated once here for both worlds; the proxy-mode world
//! reuses the policy world's `kwp:types` values. Exports are async: every
//! call is a future that `drive` runs (the worlds import no functions).

pub mod policy {
    wasmtime::component::bindgen!({
        world: "policy-plugin",
        path: "../sdk/wit",
        additional_derives: [PartialEq],
        exports: { default: async },
    });
}

pub mod mode {
    wasmtime::component::bindgen!({
        world: "proxy-mode",
        path: "../sdk/wit",
        with: { "kwp:types/types": super::policy::kwp::types::types },
        exports: { default: async },
    });
}

/// The types both worlds share (addresses, endpoints, plans).
pub use policy::kwp::types::types;
