//! The host's dataplane contract and IPVS dataplane, compiled in by path
//! (a file loaded by `#[path]` resolves its own `#[path]`s from here).

#[path = "../../../host/src/dataplane/contract.rs"]
mod contract;
pub use contract::*;
#[path = "../../../host/src/dataplane/ipvs/mod.rs"]
pub mod ipvs;
