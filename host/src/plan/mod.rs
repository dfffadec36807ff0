//! The host's form of a plan, its validation and its printing.
//!
//! A plan is a base fragment plus one fragment per service port. The host
//! refuses any fragment that names an object outside the tables it owns or
//! smuggles extra commands into rule text, before anything is applied.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::model::{Protocol, ServicePortName};

mod validate;
pub use validate::{IPVS_SCHEDULERS, PlanError, Rules};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NftFamily {
    Ip,
    Ip6,
    Inet,
}

impl fmt::Display for NftFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NftFamily::Ip => "ip",
            NftFamily::Ip6 => "ip6",
            NftFamily::Inet => "inet",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub service: u32,
    pub protocol: Protocol,
    pub frontends: Vec<SocketAddr>,
    pub udp_idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    NftChain {
        family: NftFamily,
        table: String,
        name: String,
        hook: Option<String>,
        rules: Vec<String>,
    },
    NftSet {
        family: NftFamily,
        table: String,
        name: String,
        declaration: String,
    },
    NftElement {
        family: NftFamily,
        table: String,
        set: String,
        element: String,
    },
    IptablesChain {
        ipv6: bool,
        table: String,
        name: String,
        rules: Vec<String>,
    },
    IpvsVirtualServer {
        address: SocketAddr,
        protocol: Protocol,
        scheduler: String,
        persistence_timeout: u32,
    },
    IpvsRealServer {
        virtual_address: SocketAddr,
        protocol: Protocol,
        address: SocketAddr,
        weight: u32,
    },
    Listener(Listener),
}

/// Shared, immutable items: the proxier's plan and the dataplane's record of
/// what is applied hold the same fragment, not copies (at 50k Services the
/// copies were a large part of the heap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    pub items: std::sync::Arc<[Item]>,
}

/// A whole plan, for `--dry-run`.
#[derive(Debug, Default)]
pub struct Plan {
    pub base: Fragment,
    pub services: BTreeMap<ServicePortName, Fragment>,
    /// Why each fragment looks as it does (policy, endpoints, backend
    /// plan), printed as comments; kept only when asked for (`--dry-run`).
    pub context: BTreeMap<ServicePortName, String>,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::NftChain {
                family,
                table,
                name,
                hook,
                rules,
            } => {
                writeln!(f, "nft chain {family} {table} {name}")?;
                if let Some(hook) = hook {
                    writeln!(f, "    {hook}")?;
                }
                rules.iter().try_for_each(|r| writeln!(f, "    {r}"))
            }
            Item::NftSet {
                family,
                table,
                name,
                declaration,
            } => writeln!(f, "nft set {family} {table} {name} {{ {declaration} }}"),
            Item::NftElement {
                family,
                table,
                set,
                element,
            } => writeln!(f, "nft element {family} {table} {set} {{ {element} }}"),
            Item::IptablesChain {
                ipv6,
                table,
                name,
                rules,
            } => {
                writeln!(
                    f,
                    "{} -t {table} chain {name}",
                    if *ipv6 { "ip6tables" } else { "iptables" }
                )?;
                rules
                    .iter()
                    .try_for_each(|r| writeln!(f, "    -A {name} {r}"))
            }
            Item::IpvsVirtualServer {
                address,
                protocol,
                scheduler,
                persistence_timeout,
            } => {
                write!(f, "ipvs virtual {protocol} {address} scheduler {scheduler}")?;
                if *persistence_timeout > 0 {
                    write!(f, " persistent {persistence_timeout}s")?;
                }
                writeln!(f)
            }
            Item::IpvsRealServer {
                virtual_address,
                protocol,
                address,
                weight,
            } => {
                writeln!(
                    f,
                    "ipvs real {protocol} {virtual_address} -> {address} weight {weight}"
                )
            }
            Item::Listener(l) => {
                let fronts: Vec<String> = l.frontends.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "listen {} for service #{} frontends [{}]",
                    l.protocol,
                    l.service,
                    fronts.join(", ")
                )?;
                if l.protocol == Protocol::Udp {
                    write!(f, " udp-idle {}ms", l.udp_idle_timeout.as_millis())?;
                }
                writeln!(f)
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# base")?;
        self.base.items.iter().try_for_each(|i| write!(f, "{i}"))?;
        for (name, fragment) in &self.services {
            writeln!(f, "# service {name}")?;
            if let Some(context) = self.context.get(name) {
                writeln!(f, "#   {context}")?;
            }
            fragment.items.iter().try_for_each(|i| write!(f, "{i}"))?;
        }
        Ok(())
    }
}
