//! kube-wasm-proxy's host: sources -> state -> plan (Wasm plugins) ->
//! validate -> apply. See docs/architecture.md.

pub mod app;
pub mod cleanup;
pub mod config;
pub mod dataplane;
pub mod demo;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod healthcheck;
pub mod instance_lock;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod plugin;
pub mod proxier;
pub mod source;
pub mod state;
pub mod sync;
