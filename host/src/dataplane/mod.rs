//! Dataplanes: where validated plan fragments take effect. One module per
//! kernel interface (`nftables`), or the userspace proxy (`userspace`); a
//! new kernel mode's host side goes here, beside them.
//!
//! A dataplane applies deltas: the proxier hands it only the fragments
//! that changed, and it keeps the record of what is in force.

pub mod conntrack;
mod contract;
pub mod iptables;
pub mod ipvs;
pub mod nftables;
pub mod tool;
pub mod userspace;

pub use contract::*;
