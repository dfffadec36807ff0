//! Where the kernel sends a new connection in iptables mode: a walker over
//! `iptables-save` text, read with iptables' own meaning of each match and
//! target (iptables-extensions(8)), not the plugin's. A packet goes through
//! nat PREROUTING; a DNAT ends the nat walk and the translated packet goes
//! through the filter hook routing picks (INPUT for a local destination,
//! FORWARD otherwise), which may still drop it; an un-DNATed packet goes
//! through that hook with its own destination. Marks are carried along a
//! branch (MARK, then `-m mark`). Random choices (`statistic`) and recent
//! lists (`recent --rcheck`, affinity) are explored both ways, so the result
//! is the set of everything a connection can end in.
//!
//! Anything the walker does not know (a match, an option, a target) is an
//! error: an unknown rule must never read as "no effect".

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};

use super::{Frontend, Outcome, Reach, Viewpoint};

/// The iptables and ip6tables rules of one node.
#[derive(Default, Debug)]
pub struct Iptables {
    /// (IPv6, table name) -> chains.
    tables: BTreeMap<(bool, String), BTreeMap<String, Chain>>,
    /// The node's own addresses (`addrtype LOCAL`, and the routing choice
    /// between INPUT and FORWARD).
    pub local_addresses: Vec<IpAddr>,
}

#[derive(Default, Debug)]
struct Chain {
    /// A built-in chain's policy (`ACCEPT` or `DROP`).
    policy: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    text: String,
    matches: Vec<(bool, Match)>,
    target: Target,
}

#[derive(Debug)]
enum Match {
    /// Address and mask (as bits; a mask need not be a prefix: iptables
    /// writes `0.0.0.5/0.0.0.63` as given).
    Source(IpAddr, u128),
    Destination(IpAddr, u128),
    Protocol(u64),
    /// `-i`: a name, or a prefix when it ends in `+`.
    InInterface(String),
    DestinationPort(u16, u16),
    DestinationType(String),
    SourceType(String),
    /// `statistic --mode random --probability p`.
    Random(f64),
    CtState(Vec<String>),
    Mark(u32, u32),
    /// `recent --rcheck` / `--update`: whether the client is on a list.
    RecentSeen,
    /// `recent --set`: always matches (records the client).
    RecentSet,
    /// `comment`, and module names given without options.
    Always,
}

#[derive(Debug)]
enum Target {
    None,
    Jump(String),
    Goto(String),
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(SocketAddr),
    Mark { and: u32, xor: u32 },
    Masquerade,
}

/// How a branch of the walk ends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Flow {
    /// The rule did not end the branch: the next rule, with this mark.
    Next(u32),
    /// The chain returned (or fell off its end).
    Return(u32),
    /// ACCEPT: the end of this table's walk at this hook.
    Accept(u32),
    Dnat(SocketAddr, u32),
    Final(Outcome),
}

type Flows = BTreeSet<Flow>;

#[derive(Clone)]
struct Packet {
    saddr: IpAddr,
    daddr: IpAddr,
    proto: u64,
    dport: u16,
    iifname: String,
    saddr_local: bool,
    daddr_local: bool,
    dnated: bool,
}

impl Iptables {
    /// Adds the tables of one `iptables-save` (or `ip6tables-save`) output.
    pub fn add_save(&mut self, ipv6: bool, text: &str) -> Result<()> {
        let mut table: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let context = || format!("iptables-save line {}: {line}", n + 1);
            if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name.to_string());
                self.tables.entry((ipv6, name.to_string())).or_default();
                continue;
            }
            let name = table.clone().with_context(context)?;
            let chains = self.tables.entry((ipv6, name)).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let mut parts = decl.split_whitespace();
                let chain = parts.next().with_context(context)?;
                let policy = parts.next().filter(|p| *p != "-").map(str::to_string);
                chains.entry(chain.to_string()).or_default().policy = policy;
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let words = split_words(rest).with_context(context)?;
                let (chain, args) = words.split_first().with_context(context)?;
                let rule = parse_rule(line, args).with_context(context)?;
                chains.entry(chain.clone()).or_default().rules.push(rule);
            } else {
                bail!("{}: not a table, chain or rule", context());
            }
        }
        Ok(())
    }

    /// Everything a new connection to `f` from `f.source` can end in.
    pub fn reach(&self, f: &Frontend, view: &Viewpoint) -> Result<Reach> {
        let ipv6 = f.ip.is_ipv6();
        let packet = Packet {
            saddr: f.source,
            daddr: f.ip,
            proto: f.proto.number(),
            dport: f.port,
            iifname: view.in_interface.clone(),
            saddr_local: self.local_addresses.contains(&f.source),
            daddr_local: self.local_addresses.contains(&f.ip),
            dnated: false,
        };
        let mut reach = Reach::new();
        for flow in self.hook(ipv6, "nat", "PREROUTING", &packet, 0)? {
            let (packet, mark, endpoint) = match flow {
                Flow::Final(o) => {
                    reach.insert(o);
                    continue;
                }
                Flow::Dnat(to, mark) => {
                    let mut p = packet.clone();
                    p.daddr = to.ip();
                    p.dport = to.port();
                    p.daddr_local = self.local_addresses.contains(&to.ip());
                    p.dnated = true;
                    (p, mark, Some(to))
                }
                Flow::Accept(mark) | Flow::Return(mark) | Flow::Next(mark) => {
                    (packet.clone(), mark, None)
                }
            };
            let hook = if packet.daddr_local {
                "INPUT"
            } else {
                "FORWARD"
            };
            for flow in self.hook(ipv6, "filter", hook, &packet, mark)? {
                reach.insert(match (flow, endpoint) {
                    (Flow::Final(o), _) => o,
                    (Flow::Dnat(..), _) => bail!("DNAT in the filter table"),
                    (_, Some(to)) => Outcome::Endpoint(to),
                    (_, None) => Outcome::NotCaptured,
                });
            }
        }
        Ok(reach)
    }

    /// One built-in chain of a table; its policy ends what returns from it.
    fn hook(&self, ipv6: bool, table: &str, chain: &str, p: &Packet, mark: u32) -> Result<Flows> {
        let Some(chains) = self.tables.get(&(ipv6, table.to_string())) else {
            return Ok(Flows::from([Flow::Return(mark)]));
        };
        let Some(base) = chains.get(chain) else {
            return Ok(Flows::from([Flow::Return(mark)]));
        };
        let walk = Walk { chains, p };
        let drop = base.policy.as_deref() == Some("DROP");
        Ok(walk
            .chain(chain, mark, 0)?
            .into_iter()
            .map(|f| match f {
                Flow::Return(_) if drop => Flow::Final(Outcome::Drop),
                f => f,
            })
            .collect())
    }
}

struct Walk<'a> {
    chains: &'a BTreeMap<String, Chain>,
    p: &'a Packet,
}

impl Walk<'_> {
    fn chain(&self, name: &str, mark: u32, depth: usize) -> Result<Flows> {
        let chain = super::jump_target(self.chains, name, depth)?;
        let mut open = BTreeSet::from([mark]);
        let mut done = Flows::new();
        for rule in &chain.rules {
            let mut next = BTreeSet::new();
            for mark in open {
                for flow in self
                    .rule(rule, mark, depth)
                    .with_context(|| format!("chain {name}: {}", rule.text))?
                {
                    match flow {
                        Flow::Next(m) => {
                            next.insert(m);
                        }
                        other => {
                            done.insert(other);
                        }
                    }
                }
            }
            open = next;
            if open.is_empty() {
                break;
            }
        }
        done.extend(open.into_iter().map(Flow::Return));
        Ok(done)
    }

    fn rule(&self, rule: &Rule, mark: u32, depth: usize) -> Result<Flows> {
        let (mut can_match, mut can_miss) = (true, false);
        for (negated, m) in &rule.matches {
            let outcomes: BTreeSet<bool> = self
                .outcomes(m, mark)?
                .into_iter()
                .map(|hit| hit != *negated)
                .collect();
            can_match &= outcomes.contains(&true);
            can_miss |= outcomes.contains(&false);
        }
        let mut flows = Flows::new();
        if can_miss {
            flows.insert(Flow::Next(mark));
        }
        if !can_match {
            return Ok(flows);
        }
        match &rule.target {
            Target::None | Target::Masquerade => {
                flows.insert(Flow::Next(mark));
            }
            Target::Mark { and, xor } => {
                flows.insert(Flow::Next((mark & and) ^ xor));
            }
            Target::Jump(to) => {
                for f in self.chain(to, mark, depth + 1)? {
                    flows.insert(match f {
                        Flow::Return(m) => Flow::Next(m),
                        f => f,
                    });
                }
            }
            Target::Goto(to) => flows.extend(self.chain(to, mark, depth + 1)?),
            Target::Accept => {
                flows.insert(Flow::Accept(mark));
            }
            Target::Drop => {
                flows.insert(Flow::Final(Outcome::Drop));
            }
            Target::Reject => {
                flows.insert(Flow::Final(Outcome::Reject));
            }
            Target::Return => {
                flows.insert(Flow::Return(mark));
            }
            Target::Dnat(to) => {
                flows.insert(Flow::Dnat(*to, mark));
            }
        }
        Ok(flows)
    }

    /// Whether `m` matches the packet: both when it cannot be known.
    fn outcomes(&self, m: &Match, mark: u32) -> Result<BTreeSet<bool>> {
        let p = self.p;
        let one = |b: bool| BTreeSet::from([b]);
        Ok(match m {
            Match::Source(net, mask) => one(masked(p.saddr, *net, *mask)),
            Match::Destination(net, mask) => one(masked(p.daddr, *net, *mask)),
            Match::Protocol(n) => one(p.proto == *n),
            Match::InInterface(name) => one(match name.strip_suffix('+') {
                Some(prefix) => p.iifname.starts_with(prefix),
                None => p.iifname == *name,
            }),
            Match::DestinationPort(lo, hi) => one((*lo..=*hi).contains(&p.dport)),
            Match::DestinationType(t) => one(address_type(t, p.daddr, p.daddr_local)?),
            Match::SourceType(t) => one(address_type(t, p.saddr, p.saddr_local)?),
            Match::Random(probability) if *probability >= 1.0 => one(true),
            Match::Random(probability) if *probability <= 0.0 => one(false),
            Match::Random(_) | Match::RecentSeen => BTreeSet::from([true, false]),
            Match::RecentSet | Match::Always => one(true),
            // The first packet of a connection: NEW, and DNAT once translated.
            Match::CtState(states) => one(states.iter().any(|s| match s.as_str() {
                "NEW" => true,
                "DNAT" => p.dnated,
                _ => false,
            })),
            Match::Mark(value, mask) => one(mark & mask == *value),
        })
    }
}

fn address_type(t: &str, ip: IpAddr, local: bool) -> Result<bool> {
    Ok(match t {
        "LOCAL" => local,
        "UNICAST" => !local && !ip.is_multicast(),
        other => bail!("address type {other} is not modelled"),
    })
}

/// One rule's arguments, read as iptables reads them: `!` negates the
/// next match; long options belong to the last `-m` module or, after
/// `-j`, to the target.
fn parse_rule(text: &str, args: &[String]) -> Result<Rule> {
    let mut rule = Rule {
        text: text.to_string(),
        matches: Vec::new(),
        target: Target::None,
    };
    let mut module = String::new();
    let mut target = String::new();
    let mut negate = false;
    let mut dnat = None;
    let mut mark = None;
    let mut it = args.iter().map(String::as_str);
    while let Some(word) = it.next() {
        let mut value = || it.next().with_context(|| format!("{word} without a value"));
        let found = match word {
            "!" => {
                negate = true;
                continue;
            }
            "-s" => Some(prefix(value()?).map(|(a, l)| Match::Source(a, l))?),
            "-d" => Some(prefix(value()?).map(|(a, l)| Match::Destination(a, l))?),
            "-p" => Some(Match::Protocol(protocol(value()?)?)),
            "-i" => Some(Match::InInterface(value()?.to_string())),
            "-m" => {
                module = value()?.to_string();
                match module.as_str() {
                    "tcp" | "udp" | "sctp" | "comment" | "addrtype" | "statistic" | "conntrack"
                    | "state" | "mark" | "recent" => None,
                    other => bail!("match module {other} is not modelled"),
                }
            }
            "-j" | "-g" => {
                target = value()?.to_string();
                rule.target = match target.as_str() {
                    "ACCEPT" => Target::Accept,
                    "DROP" => Target::Drop,
                    "REJECT" => Target::Reject,
                    "RETURN" => Target::Return,
                    "MASQUERADE" => Target::Masquerade,
                    "DNAT" | "MARK" => Target::None,
                    chain
                        if chain
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || "-_0123456789".contains(c)) =>
                    {
                        if word == "-g" {
                            Target::Goto(chain.into())
                        } else {
                            Target::Jump(chain.into())
                        }
                    }
                    other => bail!("target {other} is not modelled"),
                };
                None
            }
            long if !target.is_empty() => {
                match (target.as_str(), long) {
                    ("DNAT", "--to-destination") => dnat = Some(socket(value()?)?),
                    ("MARK", "--or-mark") => {
                        let v = number(value()?)?;
                        mark = Some((!v, v));
                    }
                    ("MARK", "--xor-mark") => mark = Some((u32::MAX, number(value()?)?)),
                    ("MARK", "--set-xmark") => {
                        let (v, m) = value_mask(value()?)?;
                        mark = Some((!m, v));
                    }
                    ("MASQUERADE", "--random-fully" | "--random") => {}
                    ("REJECT", "--reject-with") => {
                        value()?;
                    }
                    (t, o) => bail!("option {o} of target {t} is not modelled"),
                }
                None
            }
            long => match (module.as_str(), long) {
                ("tcp" | "udp" | "sctp", "--dport" | "--destination-port") => {
                    let v = value()?;
                    let (lo, hi) = v.split_once(':').unwrap_or((v, v));
                    Some(Match::DestinationPort(lo.parse()?, hi.parse()?))
                }
                ("comment", "--comment") => {
                    value()?;
                    Some(Match::Always)
                }
                ("addrtype", "--dst-type") => Some(Match::DestinationType(value()?.into())),
                ("addrtype", "--src-type") => Some(Match::SourceType(value()?.into())),
                ("addrtype", "--limit-iface-in") => None,
                ("statistic", "--mode") if value()? == "random" => None,
                ("statistic", "--probability") => Some(Match::Random(value()?.parse()?)),
                ("conntrack", "--ctstate") | ("state", "--state") => Some(Match::CtState(
                    value()?.split(',').map(str::to_string).collect(),
                )),
                ("mark", "--mark") => {
                    let (v, m) = value_mask(value()?)?;
                    Some(Match::Mark(v, m))
                }
                ("recent", "--rcheck" | "--update") => Some(Match::RecentSeen),
                ("recent", "--set") => Some(Match::RecentSet),
                ("recent", "--name" | "--seconds" | "--mask" | "--hitcount") => {
                    value()?;
                    None
                }
                ("recent", "--reap" | "--rsource") => None,
                (m, o) => bail!("option {o} of match {m:?} is not modelled"),
            },
        };
        if let Some(m) = found {
            rule.matches.push((negate, m));
        } else if negate {
            bail!("`!` before {word}, which is not a match");
        }
        negate = false;
    }
    match target.as_str() {
        "DNAT" => rule.target = Target::Dnat(dnat.context("DNAT without --to-destination")?),
        "MARK" => {
            let (and, xor) = mark.context("MARK without a mark")?;
            rule.target = Target::Mark { and, xor };
        }
        _ => {}
    }
    Ok(rule)
}

/// Words as iptables-save quotes them: `"..."` with `\"` and `\\` inside.
fn split_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = line.chars();
    let mut word: Option<String> = None;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => w.push(chars.next().context("a quote ends in \\")?),
                        Some(c) => w.push(c),
                        None => bail!("an unterminated quote"),
                    }
                }
            }
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// `addr[/len]` or `addr/mask`: the address and its mask as bits.
fn prefix(v: &str) -> Result<(IpAddr, u128)> {
    let (addr, mask) = v.split_once('/').unwrap_or((v, ""));
    let addr: IpAddr = addr.parse().with_context(|| format!("address {v}"))?;
    let width = if addr.is_ipv4() { 32 } else { 128 };
    let all = u128::MAX >> (128 - width);
    let mask = if mask.is_empty() {
        all
    } else if let Ok(len) = mask.parse::<u32>() {
        anyhow::ensure!(len <= width, "prefix length {v}");
        all & !all.checked_shr(len).unwrap_or(0)
    } else {
        match (
            addr,
            mask.parse::<IpAddr>()
                .with_context(|| format!("mask {v}"))?,
        ) {
            (IpAddr::V4(_), IpAddr::V4(m)) => u128::from(m.to_bits()),
            (IpAddr::V6(_), IpAddr::V6(m)) => m.to_bits(),
            _ => bail!("mask of another family: {v}"),
        }
    };
    Ok((addr, mask))
}

fn masked(ip: IpAddr, net: IpAddr, mask: u128) -> bool {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    };
    ip.is_ipv4() == net.is_ipv4() && bits(ip) & mask == bits(net) & mask
}

fn protocol(v: &str) -> Result<u64> {
    Ok(match v {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        n => n.parse().with_context(|| format!("protocol {n}"))?,
    })
}

fn socket(v: &str) -> Result<SocketAddr> {
    v.parse()
        .with_context(|| format!("DNAT destination {v} is not address:port"))
}

fn number(v: &str) -> Result<u32> {
    match v.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .with_context(|| format!("number {v}"))
}

fn value_mask(v: &str) -> Result<(u32, u32)> {
    match v.split_once('/') {
        Some((value, mask)) => Ok((number(value)?, number(mask)?)),
        None => Ok((number(v)?, u32::MAX)),
    }
}
