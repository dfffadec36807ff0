//! The host's bindings of the WIT contract (`wit/`), generated once here for
//! both worlds; the proxy-mode world reuses the policy world's shared types.

pub mod policy {
    wasmtime::component::bindgen!({ world: "policy-plugin", path: "../wit", additional_derives: [PartialEq] });
}

pub mod mode {
    wasmtime::component::bindgen!({
        world: "proxy-mode",
        path: "../wit",
        with: { "kwp:proxy/types": super::policy::kwp::proxy::types },
    });
}

/// The types both worlds share (addresses, endpoints, plans).
pub use policy::kwp::proxy::types;
