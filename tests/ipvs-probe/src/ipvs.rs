//! The host's IPVS modules, compiled in by path (a file loaded by
//! `#[path]` resolves its own `#[path]`s from this directory).

#[path = "../../../host/src/dataplane/ipvs/genl.rs"]
mod genl;
#[path = "../../../host/src/dataplane/ipvs/kernel.rs"]
pub mod kernel;
#[path = "../../../host/src/dataplane/ipvs/link.rs"]
mod link;
#[path = "../../../host/src/dataplane/ipvs/netlink.rs"]
pub mod netlink;
