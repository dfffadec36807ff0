//! What a plan may touch: the host refuses any fragment that names an
//! object outside what it owns or smuggles commands into text the host
//! hands to `nft` or `iptables-restore`, before anything is applied.
//! fuzzing::confinement reads the host's output independently of this.

use std::net::SocketAddr;

use super::{Fragment, Item};

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
                    // The prefix alone is no chain of kwp's (found by fuzzing).
                    if !name.starts_with(&rules.iptables_prefix)
                        || name.len() <= rules.iptables_prefix.len()
                        || name.len() > 28
                    {
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

/// nft reads one command per line and also ends one at `;`; a string
/// (`"`) or a brace left open runs on into the host's next line, and `#`
/// comments out the rest of it: rule text may do none of these, or it
/// could swallow or add commands.
fn check_text(text: &str) -> Result<(), PlanError> {
    check_chars(text, &[';'])?;
    let injection = || Err(PlanError::Injection(text.into()));
    let (mut depth, mut quoted) = (0usize, false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '#' => return injection(),
            '{' => depth += 1,
            '}' if depth == 0 => return injection(),
            '}' => depth -= 1,
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return injection();
    }
    Ok(())
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
/// (Kubernetes names need none, and a quote could hide a token; nor a
/// backslash, iptables-restore's escape inside quotes, found by the
/// `hostile_plan` fuzz target), no
/// command of its own (table switch, flush, delete, policy, new chain,
/// insert, check, list, commit), and jumps only to standard targets or own chains.
fn check_iptables_rule(rule: &str, prefix: &str) -> Result<(), PlanError> {
    check_chars(rule, &['\n', '\r', '"', '\'', '\\', '\0'])?;
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
        "-C",
        "--check",
        "-L",
        "--list",
        "-S",
        "--list-rules",
        "COMMIT",
    ];
    // `*table` and `:CHAIN` only mean something at the start of a line,
    // and the host writes every rule after its own `-A CHAIN`; a word like
    // `::1/128` is an IPv6 address.
    let words: Vec<&str> = rule.split_whitespace().collect();
    if words
        .iter()
        .any(|w| COMMANDS.contains(w) || hides_an_option(w))
    {
        return Err(PlanError::Injection(rule.into()));
    }
    for pair in words.windows(2) {
        if ["-j", "--jump", "-g", "--goto"].contains(&pair[0])
            && !IPTABLES_TARGETS.contains(&pair[1])
            && !(pair[1].starts_with(prefix) && pair[1].len() > prefix.len())
        {
            return Err(PlanError::ForeignJump(rule.into(), pair[1].into()));
        }
    }
    if matches!(words.last(), Some(&("-j" | "--jump" | "-g" | "--goto"))) {
        return Err(PlanError::Injection(rule.into()));
    }
    Ok(())
}

/// iptables reads its words with getopt: `-vj X` is `-v -j X`, `-jX` is
/// `-j X`, `--ju X` is `--jump X` and `--fl` is `--flush`. A word that
/// bundles short options, or abbreviates or `=`-joins a long option that
/// is a command or a jump, would hide it from the word checks above.
fn hides_an_option(word: &str) -> bool {
    const LONG_COMMANDS: &[&str] = &[
        "append",
        "check",
        "delete",
        "insert",
        "replace",
        "list",
        "list-rules",
        "flush",
        "zero",
        "new-chain",
        "delete-chain",
        "policy",
        "rename-chain",
        "table",
    ];
    if let Some(long) = word.strip_prefix("--") {
        let (name, joined) = match long.split_once('=') {
            Some((name, _)) => (name, true),
            None => (long, false),
        };
        let jump = ["jump", "goto"]
            .iter()
            .any(|l| l.starts_with(name) && (joined || *l != name));
        return !name.is_empty() && (jump || LONG_COMMANDS.iter().any(|l| l.starts_with(name)));
    }
    // `-1` and the like are numbers, not options; `-2fl--goto` is a bundle
    // that getopt reads on to `-g oto` (found by the `hostile_plan` fuzz target).
    let Some(rest) = word.strip_prefix('-') else {
        return false;
    };
    let number = rest.chars().all(|c| c.is_ascii_digit() || c == '.');
    word.len() > 2 && !number
}

/// Text the host wraps in `{ ... }` (hooks, set declarations, elements) may
/// not close the brace, open a string past it or comment it out; a set
/// declaration may use `;` inside it.
fn check_braced(text: &str, allow_semicolon: bool) -> Result<(), PlanError> {
    check_chars(text, &['{', '}'])?;
    let stripped = if allow_semicolon {
        text.replace(';', " ")
    } else {
        text.to_string()
    };
    check_text(&stripped).map_err(|_| PlanError::Injection(text.into()))
}

/// No control character (a NUL ends what a C tool reads, a newline a
/// command) and none of `forbidden`.
fn check_chars(text: &str, forbidden: &[char]) -> Result<(), PlanError> {
    if text.contains(forbidden) || text.chars().any(|c| c.is_control() && c != '\t') {
        Err(PlanError::Injection(text.into()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::plan::NftFamily;

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
        // Found by fuzzing (fuzz/regressions/hostile_plan): text that leaves
        // a string or brace open, or comments out the host's closing brace,
        // joins the host's next line to this command.
        for hostile in [
            "comment \"open",
            "ip daddr { 10.0.0.1",
            "ip daddr 10.0.0.1 } accept",
            "accept # the rest",
            "accept\u{8}",
        ] {
            assert!(
                chain("kube-wasm-proxy", hostile).validate(&rules).is_err(),
                "{hostile:?} must be refused"
            );
        }
        assert_eq!(
            chain(
                "kube-wasm-proxy",
                "ip daddr { 10.0.0.1, 10.0.0.2 } comment \"a;b#c\" accept"
            )
            .validate(&rules),
            Err(PlanError::Injection(
                "ip daddr { 10.0.0.1, 10.0.0.2 } comment \"a;b#c\" accept".into()
            )),
            "`;` stays refused even inside a string"
        );
        assert!(matches!(
            set("type ipv4_addr # ; }").validate(&rules),
            Err(PlanError::Injection(_))
        ));
        let element = |e: &str| Fragment {
            items: vec![Item::NftElement {
                family: NftFamily::Ip6,
                table: "kube-wasm-proxy".into(),
                set: "backends".into(),
                element: e.into(),
            }]
            .into(),
        };
        assert_eq!(element("10.0.0.1 . tcp . 80").validate(&rules), Ok(()));
        assert!(element("\"MASQUERADE\u{8}drop").validate(&rules).is_err());
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
            ("nat", "KWP-X", "-jKUBE-SERVICES"),
            ("nat", "KWP-X", "-vj KUBE-SERVICES"),
            ("nat", "KWP-X", "--ju KUBE-SERVICES"),
            ("nat", "KWP-X", "--jump=KUBE-SERVICES"),
            ("nat", "KWP-X", "--fl"),
            ("nat", "KWP-X", "--check INPUT"),
            ("nat", "KWP-X", "-j ACCEPT\0-F INPUT"),
            // Found by fuzzing (fuzz/regressions/hostile_plan): a backslash,
            // and a bundle that starts with a digit.
            ("nat", "KWP-SVC-ABC", "DNATsa0a\\kaKWP-SVC-ABCKWP-SVC-ABC"),
            ("nat", "KWP-SVC-ABC", "-2fl--goto"),
            ("nat", "KWP-", "-j ACCEPT"),
            ("nat", "KWP-X", "-j KWP-"),
            // A check, list or list-rules command of its own (hostile_plan,
            // 1,457,522 executions on 6c5dd87).
            ("nat", "KWP-SVC-ABC", "-C"),
            ("nat", "KWP-SVC-ABC", "-L"),
            ("nat", "KWP-SVC-ABC", "-S KWP-SVC-ABC"),
        ] {
            assert!(
                ipt(table, name, hostile).validate(&rules).is_err(),
                "{table} {name} {hostile:?} must be refused"
            );
        }
        // Found by fuzzing: a word starting with a multibyte character
        // made the bundle check slice inside it (a panic, not a refusal).
        let _ = ipt("nat", "KWP-SVC-ABC", "é-2 x").validate(&rules);
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
