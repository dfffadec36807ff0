//! Plan items as a hostile proxy-mode plugin would write them: the
//! fuzzer's bytes choose the shape, and text is spliced from tokens that
//! mean something to nft, iptables-restore or a shell, so that mutations
//! reach the validator's corners quickly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Result, Unstructured};

use crate::model::Protocol;
use crate::plan::{Item, Listener, NftFamily};

const TOKENS: &[&str] = &[
    "kube-wasm-proxy",
    "KWP-SVC-ABC",
    "KWP-",
    "nat",
    "filter",
    "mangle",
    "raw",
    "security",
    "ip",
    "ip6",
    "inet",
    " ",
    ";",
    "\n",
    "\r",
    "{",
    "}",
    "\"",
    "'",
    "#",
    "\\",
    "\0",
    "-A",
    "-I",
    "-D",
    "-N",
    "-X",
    "-F",
    "-P",
    "-t",
    "-j",
    "-g",
    "--jump",
    "--goto",
    "COMMIT",
    "*filter",
    ":INPUT ACCEPT",
    "KUBE-SERVICES",
    "INPUT",
    "PREROUTING",
    "POSTROUTING",
    "DNAT",
    "ACCEPT",
    "DROP",
    "MASQUERADE",
    "flush ruleset",
    "add table ip filter",
    "delete table ip filter",
    "add rule ip filter INPUT drop",
    "include \"/etc/passwd\"",
    "jump",
    "goto",
    "drop",
    "accept",
    "counter",
    "comment",
    "ip daddr",
    "@",
    "$",
    ":",
    "::1/128",
    "10.96.0.1",
    "type filter hook input priority 0",
    "policy drop",
    "type ipv4_addr",
    "flags interval",
    " : verdict",
    "é",
    "\u{2028}",
    "\u{85}",
];

/// A short text of tokens and raw strings.
fn text(u: &mut Unstructured) -> Result<String> {
    let mut s = String::new();
    for _ in 0..u.int_in_range(0..=6)? {
        if u.arbitrary()? {
            s.push_str(u.choose(TOKENS)?);
        } else {
            s.push_str(u.arbitrary::<&str>()?);
        }
    }
    Ok(s)
}

/// Usually kwp's own table or chain, sometimes anything.
fn name(u: &mut Unstructured, own: &str) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => own.to_string(),
        1 => format!("{own}{}", text(u)?),
        _ => text(u)?,
    })
}

fn lines(u: &mut Unstructured) -> Result<Vec<String>> {
    (0..u.int_in_range(0..=4)?).map(|_| text(u)).collect()
}

fn family(u: &mut Unstructured) -> Result<NftFamily> {
    Ok(*u.choose(&[NftFamily::Ip, NftFamily::Ip6, NftFamily::Inet])?)
}

fn protocol(u: &mut Unstructured) -> Result<Protocol> {
    Ok(*u.choose(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp])?)
}

fn address(u: &mut Unstructured) -> Result<SocketAddr> {
    let ip = if u.arbitrary()? {
        IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?))
    };
    Ok(SocketAddr::new(ip, u.arbitrary()?))
}

fn item(u: &mut Unstructured) -> Result<Item> {
    Ok(match u.int_in_range(0..=6)? {
        0 => Item::NftChain {
            family: family(u)?,
            table: name(u, "kube-wasm-proxy")?,
            name: name(u, "services")?,
            hook: if u.arbitrary()? { Some(text(u)?) } else { None },
            rules: lines(u)?,
        },
        1 => Item::NftSet {
            family: family(u)?,
            table: name(u, "kube-wasm-proxy")?,
            name: name(u, "backends")?,
            declaration: text(u)?,
        },
        2 => Item::NftElement {
            family: family(u)?,
            table: name(u, "kube-wasm-proxy")?,
            set: name(u, "backends")?,
            element: text(u)?,
        },
        3 => Item::IptablesChain {
            ipv6: u.arbitrary()?,
            table: name(u, "nat")?,
            name: name(u, "KWP-SVC-ABC")?,
            rules: lines(u)?,
        },
        4 => Item::IpvsVirtualServer {
            address: address(u)?,
            protocol: protocol(u)?,
            scheduler: name(u, "rr")?,
            persistence_timeout: u.arbitrary()?,
        },
        5 => Item::IpvsRealServer {
            virtual_address: address(u)?,
            protocol: protocol(u)?,
            address: address(u)?,
            weight: u.arbitrary()?,
        },
        _ => Item::Listener(Listener {
            service: u.arbitrary()?,
            protocol: protocol(u)?,
            frontends: (0..u.int_in_range(0..=2)?)
                .map(|_| address(u))
                .collect::<Result<_>>()?,
            udp_idle_timeout: Duration::from_millis(u.int_in_range(0..=60_000)?),
        }),
    })
}

/// One fragment's items; mostly of one dataplane, as a mode would write.
pub fn items(u: &mut Unstructured) -> Result<Vec<Item>> {
    (0..u.int_in_range(1..=8)?).map(|_| item(u)).collect()
}
