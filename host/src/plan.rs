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

/// What the host allows a plan to touch and how big it may be.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Name of the nftables table the host owns (in each family).
    pub nft_table: String,
    /// Prefix of the iptables chains the host owns.
    pub iptables_prefix: String,
    /// Largest number of items one fragment may hold.
    pub max_items: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            nft_table: "kube-wasm-proxy".into(),
            iptables_prefix: "KWP-".into(),
            max_items: 100_000,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("names table {0:?}, but the host only owns {1:?}")]
    ForeignTable(String, String),
    #[error("names iptables chain {0:?}, outside the host's {1:?} chains")]
    ForeignChain(String, String),
    #[error("rule text {0:?} contains a command separator")]
    Injection(String),
    #[error("has {0} items, more than the limit of {1}")]
    TooLarge(usize, usize),
    #[error("has an invalid name {0:?}")]
    BadName(String),
    #[error("rule {0:?} jumps to {1:?}, neither a standard target nor one of the host's chains")]
    ForeignJump(String, String),
    #[error("names IPVS scheduler {0:?}, not one of {IPVS_SCHEDULERS:?}")]
    BadScheduler(String),
    #[error("has an unusable IPVS address {0}")]
    BadAddress(SocketAddr),
}

/// The schedulers IPVS ships.
pub const IPVS_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

/// An IPVS address must name one host and one port.
fn check_endpoint(a: &SocketAddr) -> Result<(), PlanError> {
    let ip = a.ip();
    if a.port() == 0
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip == std::net::Ipv4Addr::BROADCAST
    {
        return Err(PlanError::BadAddress(*a));
    }
    Ok(())
}

impl Fragment {
    pub fn validate(&self, rules: &Rules) -> Result<(), PlanError> {
        if self.items.len() > rules.max_items {
            return Err(PlanError::TooLarge(self.items.len(), rules.max_items));
        }
        let own_table = |t: &str| {
            if t == rules.nft_table {
                Ok(())
            } else {
                Err(PlanError::ForeignTable(t.into(), rules.nft_table.clone()))
            }
        };
        for item in self.items.iter() {
            match item {
                Item::NftChain {
                    table,
                    name,
                    hook,
                    rules: lines,
                    ..
                } => {
                    own_table(table)?;
                    check_name(name)?;
                    hook.iter().try_for_each(|h| check_braced(h, false))?;
                    lines.iter().try_for_each(|l| check_text(l))?;
                }
                Item::NftSet {
                    table,
                    name,
                    declaration,
                    ..
                } => {
                    own_table(table)?;
                    check_name(name)?;
                    check_braced(declaration, true)?;
                }
                Item::NftElement {
                    table,
                    set,
                    element,
                    ..
                } => {
                    own_table(table)?;
                    check_name(set)?;
                    check_braced(element, false)?;
                }
                Item::IptablesChain {
                    table,
                    name,
                    rules: lines,
                    ..
                } => {
                    if !IPTABLES_TABLES.contains(&table.as_str()) {
                        return Err(PlanError::ForeignTable(
                            table.clone(),
                            IPTABLES_TABLES.join(" or "),
                        ));
                    }
                    if !name.starts_with(&rules.iptables_prefix) || name.len() > 28 {
                        return Err(PlanError::ForeignChain(
                            name.clone(),
                            rules.iptables_prefix.clone(),
                        ));
                    }
                    check_name(name)?;
                    lines
                        .iter()
                        .try_for_each(|l| check_iptables_rule(l, &rules.iptables_prefix))?;
                }
                Item::IpvsVirtualServer {
                    address, scheduler, ..
                } => {
                    check_endpoint(address)?;
                    if !IPVS_SCHEDULERS.contains(&scheduler.as_str()) {
                        return Err(PlanError::BadScheduler(scheduler.clone()));
                    }
                }
                Item::IpvsRealServer {
                    virtual_address,
                    address,
                    ..
                } => {
                    check_endpoint(virtual_address)?;
                    check_endpoint(address)?;
                }
                Item::Listener(_) => {}
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PlanError::BadName(name.into()))
    }
}

/// nft and iptables-restore read one command per line (nft also splits on
/// `;`): rule text may hold neither, or it could add commands of its own.
fn check_text(text: &str) -> Result<(), PlanError> {
    check_chars(text, &['\n', '\r', ';'])
}

/// The iptables tables a plan may use.
const IPTABLES_TABLES: &[&str] = &["nat", "filter"];

/// The targets an iptables rule may jump to besides the host's own chains.
const IPTABLES_TARGETS: &[&str] = &[
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
    "RETURN",
    "ACCEPT",
    "DROP",
    "REJECT",
];

/// One iptables-restore rule line after `-A CHAIN`: one line, no quoting
/// (Kubernetes names need none, and a quote could hide a token), no
/// command of its own (table switch, flush, delete, policy, new chain,
/// insert, commit), and jumps only to standard targets or own chains.
fn check_iptables_rule(rule: &str, prefix: &str) -> Result<(), PlanError> {
    check_chars(rule, &['\n', '\r', '"', '\'', '\0'])?;
    const COMMANDS: &[&str] = &[
        "-t",
        "--table",
        "-F",
        "--flush",
        "-X",
        "--delete-chain",
        "-P",
        "--policy",
        "-N",
        "--new-chain",
        "-D",
        "--delete",
        "-I",
        "--insert",
        "-A",
        "--append",
        "-R",
        "--replace",
        "-Z",
        "--zero",
        "-E",
        "--rename-chain",
        "COMMIT",
    ];
    // `*table` and `:CHAIN` only mean something at the start of a line,
    // and the host writes every rule after its own `-A CHAIN`; a word like
    // `::1/128` is an IPv6 address.
    let words: Vec<&str> = rule.split_whitespace().collect();
    if words.iter().any(|w| COMMANDS.contains(w)) {
        return Err(PlanError::Injection(rule.into()));
    }
    for pair in words.windows(2) {
        if ["-j", "--jump", "-g", "--goto"].contains(&pair[0])
            && !IPTABLES_TARGETS.contains(&pair[1])
            && !pair[1].starts_with(prefix)
        {
            return Err(PlanError::ForeignJump(rule.into(), pair[1].into()));
        }
    }
    if matches!(words.last(), Some(&("-j" | "--jump" | "-g" | "--goto"))) {
        return Err(PlanError::Injection(rule.into()));
    }
    Ok(())
}

/// Text the host wraps in `{ ... }` (hooks, set declarations, elements) may
/// not close the brace; a set declaration may use `;` inside it.
fn check_braced(text: &str, allow_semicolon: bool) -> Result<(), PlanError> {
    check_chars(text, &['\n', '\r', '{', '}'])?;
    if allow_semicolon {
        Ok(())
    } else {
        check_text(text)
    }
}

fn check_chars(text: &str, forbidden: &[char]) -> Result<(), PlanError> {
    if text.contains(forbidden) {
        Err(PlanError::Injection(text.into()))
    } else {
        Ok(())
    }
}

/// A whole plan, for `--dry-run`.
#[derive(Debug, Default)]
pub struct Plan {
    pub base: Fragment,
    pub services: BTreeMap<ServicePortName, Fragment>,
    /// Why each fragment looks as it does (policy, endpoints, backend
    /// plan), printed as comments.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(table: &str, rule: &str) -> Fragment {
        Fragment {
            items: vec![Item::NftChain {
                family: NftFamily::Ip,
                table: table.into(),
                name: "svc-1".into(),
                hook: None,
                rules: vec![rule.into()],
            }]
            .into(),
        }
    }

    #[test]
    fn only_owned_tables_and_single_commands_pass() {
        let rules = Rules::default();
        assert_eq!(
            chain("kube-wasm-proxy", "ip daddr 10.0.0.1 accept").validate(&rules),
            Ok(())
        );
        assert!(matches!(
            chain("filter", "accept").validate(&rules),
            Err(PlanError::ForeignTable(..))
        ));
        assert!(matches!(
            chain("kube-wasm-proxy", "accept; flush ruleset").validate(&rules),
            Err(PlanError::Injection(_))
        ));
        assert!(matches!(
            chain("kube-wasm-proxy", "accept\nflush ruleset").validate(&rules),
            Err(PlanError::Injection(_))
        ));
        let set = |decl: &str| Fragment {
            items: vec![Item::NftSet {
                family: NftFamily::Ip,
                table: "kube-wasm-proxy".into(),
                name: "s".into(),
                declaration: decl.into(),
            }]
            .into(),
        };
        assert_eq!(
            set("type ipv4_addr; flags dynamic,timeout; timeout 10s;").validate(&rules),
            Ok(())
        );
        assert!(matches!(
            set("type ipv4_addr; }; flush ruleset; add set ip t x {").validate(&rules),
            Err(PlanError::Injection(_))
        ));
        let ipt = Fragment {
            items: vec![Item::IptablesChain {
                ipv6: false,
                table: "nat".into(),
                name: "KUBE-SERVICES".into(),
                rules: vec![],
            }]
            .into(),
        };
        assert!(matches!(
            ipt.validate(&rules),
            Err(PlanError::ForeignChain(..))
        ));
        let ipt = |table: &str, name: &str, rule: &str| Fragment {
            items: vec![Item::IptablesChain {
                ipv6: false,
                table: table.into(),
                name: name.into(),
                rules: vec![rule.into()],
            }]
            .into(),
        };
        assert_eq!(
            ipt(
                "nat",
                "KWP-SVC-ABC",
                "-m comment --comment t/web:p -m statistic --mode random --probability 0.5000000000 -j KWP-SEP-X"
            )
            .validate(&rules),
            Ok(())
        );
        assert_eq!(
            ipt(
                "filter",
                "KWP-SERVICES",
                "-d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j REJECT"
            )
            .validate(&rules),
            Ok(())
        );
        // ip6tables: an address may start with a colon.
        assert_eq!(
            ipt(
                "nat",
                "KWP-SERVICES",
                "-m addrtype --dst-type LOCAL ! -d ::1/128 -j KWP-NODEPORTS"
            )
            .validate(&rules),
            Ok(())
        );
        for (table, name, hostile) in [
            ("raw", "KWP-X", "-j ACCEPT"),
            ("nat", "KWP-THIS-NAME-IS-FAR-TOO-LONG-FOR-IT", "-j ACCEPT"),
            ("nat", "KWP-X", "-j ACCEPT\n-F INPUT"),
            ("nat", "KWP-X", "-j ACCEPT\rCOMMIT"),
            ("nat", "KWP-X", "-m comment --comment \"x\" -j ACCEPT"),
            ("nat", "KWP-X", "-m comment --comment 'a -F b' -j ACCEPT"),
            ("nat", "KWP-X", "-j ACCEPT -t filter"),
            ("nat", "KWP-X", "-F"),
            ("nat", "KWP-X", "-X KUBE-SERVICES"),
            ("nat", "KWP-X", "-P INPUT DROP"),
            ("nat", "KWP-X", "-N EVIL"),
            ("nat", "KWP-X", "-D INPUT 1"),
            ("nat", "KWP-X", "-I INPUT -j ACCEPT"),
            ("nat", "KWP-X", "-j ACCEPT COMMIT"),
            ("nat", "KWP-X", "-j KUBE-SERVICES"),
            ("nat", "KWP-X", "-g DOCKER"),
            ("nat", "KWP-X", "-p tcp -j"),
        ] {
            assert!(
                ipt(table, name, hostile).validate(&rules).is_err(),
                "{table} {name} {hostile:?} must be refused"
            );
        }
        let big = Fragment {
            items: vec![chain("kube-wasm-proxy", "accept").items[0].clone(); 3].into(),
        };
        let vs = |addr: &str, scheduler: &str| Fragment {
            items: vec![Item::IpvsVirtualServer {
                address: addr.parse().unwrap_or_else(|_| unreachable!()),
                protocol: Protocol::Tcp,
                scheduler: scheduler.into(),
                persistence_timeout: 0,
            }]
            .into(),
        };
        assert_eq!(vs("10.96.0.1:443", "mh").validate(&rules), Ok(()));
        assert!(matches!(
            vs("10.96.0.1:443", "fastest").validate(&rules),
            Err(PlanError::BadScheduler(_))
        ));
        assert!(matches!(
            vs("0.0.0.0:443", "rr").validate(&rules),
            Err(PlanError::BadAddress(_))
        ));
        assert!(matches!(
            vs("10.96.0.1:0", "rr").validate(&rules),
            Err(PlanError::BadAddress(_))
        ));
        assert_eq!(
            big.validate(&Rules {
                max_items: 2,
                ..Rules::default()
            }),
            Err(PlanError::TooLarge(3, 2))
        );
    }
}
