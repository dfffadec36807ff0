//! The host's bindings of the WIT contract (`sdk/wit/`, the copy the SDK
//! crate ships), generated once here for both worlds; the proxy-mode world
//! reuses the policy world's `kwp:types` values.

pub mod policy {
    wasmtime::component::bindgen!({ world: "policy-plugin", path: "../sdk/wit", additional_derives: [PartialEq] });
}

pub mod mode {
    wasmtime::component::bindgen!({
        world: "proxy-mode",
        path: "../sdk/wit",
        with: { "kwp:types/types": super::policy::kwp::types::types },
    });
}

/// The types both worlds share (addresses, endpoints, plans).
pub use policy::kwp::types::types;
