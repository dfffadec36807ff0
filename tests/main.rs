//! The end-to-end tests of kube-wasm-proxy: one test crate (one link, one
//! `common`), a module per topic. `cargo test --test e2e nftables::` runs a
//! topic, `cargo test --test e2e <name>` one test; tests/README.md says where
//! a new test goes.
//!
//! All tests share this process and run on parallel threads, so nothing
//! here may depend on process-wide state: no environment or working
//! directory changes, ports from the kernel (`:0`) or inside a namespace of
//! the test's own, namespace tags unique across the crate (`Netns::new`
//! refuses a name already in use).

mod common;

// libtest starts tests in name order. The tutorial, two cold cargo builds
// and minutes long, sorts first (`_` before letters) so that it runs beside
// the others instead of alone at the end.
#[path = "tutorial.rs"]
mod _tutorial;

mod api_faults;
mod api_hang;
mod apiserver;
mod cleanup;
mod cli;
mod file_source;
mod health;
mod helm;
mod image;
mod ipt_resync;
mod iptables;
mod iptables_ops;
mod ipvs;
mod ipvs_filter;
mod ipvs_vm;
mod kernel_faults;
mod kubernetes;
mod nft_elements;
mod nft_resync;
mod nftables;
mod oci_image;
mod operate;
mod plugin_faults;
mod reliability;
mod reload;
mod semantics;
mod slice_selector;
mod soak;
mod tool_missing;
mod userspace;
mod userspace_redirect;
