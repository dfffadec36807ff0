//! Where the kernel sends a new connection: a walker over `nft -j list
//! table` output. It follows the nat base chains hooked at prerouting (in
//! priority order) and, when nothing DNATs, the filter base chains of the
//! input (local destination) or forward hook, through jumps, gotos, verdict
//! maps and DNAT maps. Random choices (`numgen`, `jhash`) and membership
//! of dynamic sets (affinity) are explored on every branch, so the result
//! is the set of everything a connection can end in.
//!
//! It understands the expressions nftables mode writes and errors on
//! anything else: an unknown expression must never read as "no effect".

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::expected::in_prefix;
use super::{Frontend, Outcome, Reach, Viewpoint};

/// The tables of one node (`ip` and `ip6` families).
#[derive(Default, Debug)]
pub struct Kernel {
    tables: Vec<Table>,
    /// The node's own addresses (`fib daddr type local`).
    pub local_addresses: Vec<IpAddr>,
}

#[derive(Default, Debug)]
struct Table {
    family: String,
    chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
}

#[derive(Default, Debug)]
struct Chain {
    hook: Option<(String, String, i64)>,
    rules: Vec<Vec<Value>>,
}

#[derive(Default, Debug)]
struct Set {
    /// (key, data): data is null for a plain set.
    elements: Vec<(Value, Value)>,
    /// Filled by the data path (affinity): membership is unknown.
    dynamic: bool,
}

/// A value a packet carries, or one of several (random numbers, hashes).
#[derive(Clone, Debug)]
enum Val {
    Addr(IpAddr),
    Num(u64),
    Text(String),
    Concat(Vec<Val>),
    /// Any number in `0..n`.
    AnyBelow(u64),
}

/// How a rule (or a chain) ends, on one branch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Flow {
    /// The rule did not match or had no verdict: the next rule.
    Next,
    /// The chain returned to its caller (or fell off its end).
    Return,
    Final(Outcome),
}

type Flows = BTreeSet<Flow>;

/// A packet: the first one of a new connection.
struct Packet {
    saddr: IpAddr,
    daddr: IpAddr,
    proto: u64,
    dport: u16,
    iifname: String,
    daddr_local: bool,
}

impl Kernel {
    /// Adds one table from `nft -j list table <family> <name>` output.
    pub fn add_json(&mut self, json: &str) -> Result<()> {
        let doc: Value = serde_json::from_str(json).context("nft -j output is not JSON")?;
        let items = doc["nftables"]
            .as_array()
            .context("nft -j output has no `nftables` list")?;
        let mut table = Table::default();
        for item in items {
            if let Some(t) = item.get("table") {
                table.family = text(&t["family"])?.to_string();
            } else if let Some(c) = item.get("chain") {
                let hook = match (c.get("type"), c.get("hook")) {
                    (Some(t), Some(h)) => Some((
                        text(t)?.to_string(),
                        text(h)?.to_string(),
                        c["prio"].as_i64().unwrap_or(0),
                    )),
                    _ => None,
                };
                table
                    .chains
                    .entry(text(&c["name"])?.to_string())
                    .or_default()
                    .hook = hook;
            } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
                let flags: Vec<&str> = s["flags"]
                    .as_array()
                    .map(|f| f.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let elements = s["elem"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .map(|el| match el.as_array() {
                                Some(pair) if item.get("map").is_some() && pair.len() == 2 => {
                                    (pair[0].clone(), pair[1].clone())
                                }
                                _ => (el.clone(), Value::Null),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table.sets.insert(
                    text(&s["name"])?.to_string(),
                    Set {
                        elements,
                        dynamic: flags.iter().any(|f| matches!(*f, "timeout" | "dynamic")),
                    },
                );
            } else if let Some(r) = item.get("rule") {
                let exprs = r["expr"].as_array().context("a rule without expr")?.clone();
                table
                    .chains
                    .entry(text(&r["chain"])?.to_string())
                    .or_default()
                    .rules
                    .push(exprs);
            }
        }
        self.tables.push(table);
        Ok(())
    }

    /// Everything a new connection to `f` from `f.source` can end in.
    pub fn reach(&self, f: &Frontend, view: &Viewpoint) -> Result<Reach> {
        let family = if f.ip.is_ipv4() { "ip" } else { "ip6" };
        let packet = Packet {
            saddr: f.source,
            daddr: f.ip,
            proto: f.proto.number(),
            dport: f.port,
            iifname: view.in_interface.clone(),
            daddr_local: self.local_addresses.contains(&f.ip),
        };
        let mut reach = Reach::new();
        for table in self.tables.iter().filter(|t| t.family == family) {
            let nat = table.walk_hook("nat", "prerouting", &packet)?;
            let mut undecided = false;
            for flow in nat {
                match flow {
                    Flow::Final(o) => {
                        reach.insert(o);
                    }
                    _ => undecided = true,
                }
            }
            if !undecided {
                continue;
            }
            // Not DNATed on some branch: the filter hooks see the frontend.
            let hook = if packet.daddr_local {
                "input"
            } else {
                "forward"
            };
            for flow in table.walk_hook("filter", hook, &packet)? {
                reach.insert(match flow {
                    Flow::Final(o) => o,
                    _ => Outcome::NotCaptured,
                });
            }
        }
        if reach.is_empty() {
            reach.insert(Outcome::NotCaptured);
        }
        Ok(reach)
    }
}

impl Table {
    /// Base chains of `kind` at `hook`, in priority order; a branch ends at
    /// the first verdict.
    fn walk_hook(&self, kind: &str, hook: &str, p: &Packet) -> Result<Flows> {
        let mut bases: Vec<(&String, i64)> = self
            .chains
            .iter()
            .filter_map(|(name, c)| match &c.hook {
                Some((t, h, prio)) if t == kind && h == hook => Some((name, *prio)),
                _ => None,
            })
            .collect();
        bases.sort_by_key(|(_, prio)| *prio);
        let mut open = Flows::from([Flow::Return]);
        for (name, _) in bases {
            if !open.remove(&Flow::Return) {
                break;
            }
            open.extend(self.chain(name, p, 0)?);
        }
        Ok(open)
    }

    fn chain(&self, name: &str, p: &Packet, depth: usize) -> Result<Flows> {
        let chain = super::jump_target(&self.chains, name, depth)?;
        self.rules_from(name, chain, 0, p, depth)
    }

    fn rules_from(
        &self,
        name: &str,
        chain: &Chain,
        index: usize,
        p: &Packet,
        depth: usize,
    ) -> Result<Flows> {
        let Some(rule) = chain.rules.get(index) else {
            return Ok(Flows::from([Flow::Return]));
        };
        let mut flows = self
            .exprs(rule, p, depth)
            .with_context(|| format!("chain {name}, rule {}", index + 1))?;
        if flows.remove(&Flow::Next) {
            flows.extend(self.rules_from(name, chain, index + 1, p, depth)?);
        }
        Ok(flows)
    }

    /// One rule's expressions, left to right.
    fn exprs(&self, exprs: &[Value], p: &Packet, depth: usize) -> Result<Flows> {
        let Some((first, rest)) = exprs.split_first() else {
            return Ok(Flows::from([Flow::Next]));
        };
        let (op, body) = single(first)?;
        let then = |flows: Flows| -> Result<Flows> { self.continue_after(flows, rest, p, depth) };
        match op {
            "match" => {
                let left = self.value(&body["left"], p)?;
                let hits = self.matches(&left, &body["right"])?;
                let want = !matches!(body["op"].as_str(), Some("!="));
                let mut flows = Flows::new();
                if hits.contains(&!want) {
                    flows.insert(Flow::Next);
                }
                if hits.contains(&want) {
                    flows.extend(self.exprs(rest, p, depth)?);
                }
                Ok(flows)
            }
            // Statements with no effect on where the packet goes.
            "counter" | "mangle" | "masquerade" | "set" | "log" | "notrack" => {
                self.exprs(rest, p, depth)
            }
            "jump" | "goto" | "drop" | "accept" | "return" | "reject" | "continue" => {
                then(self.verdict(first, p, depth)?)
            }
            "vmap" => {
                let key = self.value(&body["key"], p)?;
                let (hits, miss) = self.lookup(&key, &body["data"])?;
                let mut flows = Flows::new();
                if miss {
                    flows.insert(Flow::Next);
                }
                for data in hits {
                    flows.extend(then(self.verdict(&data, p, depth)?)?);
                }
                Ok(flows)
            }
            "dnat" => {
                let targets = self.dnat_targets(body, p)?;
                let mut flows = Flows::new();
                if targets.1 {
                    flows.insert(Flow::Next);
                }
                flows.extend(
                    targets
                        .0
                        .into_iter()
                        .map(|a| Flow::Final(Outcome::Endpoint(a))),
                );
                Ok(flows)
            }
            other => bail!("unknown expression {other}: {first}"),
        }
    }

    /// What follows a verdict: `Next` (a jump that returned) runs the rest
    /// of the rule.
    fn continue_after(
        &self,
        flows: Flows,
        rest: &[Value],
        p: &Packet,
        depth: usize,
    ) -> Result<Flows> {
        let mut out = Flows::new();
        for f in flows {
            if f == Flow::Next {
                out.extend(self.exprs(rest, p, depth)?);
            } else {
                out.insert(f);
            }
        }
        Ok(out)
    }

    /// A verdict: `Next` for a jump that returned.
    fn verdict(&self, v: &Value, p: &Packet, depth: usize) -> Result<Flows> {
        let (op, body) = single(v)?;
        Ok(match op {
            "jump" | "goto" => {
                let target = text(&body["target"])?;
                let mut out = Flows::new();
                for f in self.chain(target, p, depth + 1)? {
                    out.insert(match (op, f) {
                        ("jump", Flow::Return) => Flow::Next,
                        (_, f) => f,
                    });
                }
                out
            }
            "drop" => Flows::from([Flow::Final(Outcome::Drop)]),
            "reject" => Flows::from([Flow::Final(Outcome::Reject)]),
            "accept" => Flows::from([Flow::Final(Outcome::NotCaptured)]),
            "return" => Flows::from([Flow::Return]),
            "continue" => Flows::from([Flow::Next]),
            other => bail!("unknown verdict {other}: {v}"),
        })
    }

    /// `dnat to ADDR:PORT` or `dnat to KEY map @m`: (targets, a miss).
    fn dnat_targets(&self, body: &Value, p: &Packet) -> Result<(Vec<SocketAddr>, bool)> {
        let addr = &body["addr"];
        if let Some(map) = addr.get("map") {
            let key = self.value(&map["key"], p)?;
            let (hits, miss) = self.lookup(&key, &map["data"])?;
            let targets = hits
                .iter()
                .map(|d| {
                    let parts = d["concat"].as_array().context("DNAT map data")?;
                    let ip: IpAddr = text(&parts[0])?.parse().context("DNAT address")?;
                    let port = parts[1].as_u64().context("DNAT port")?;
                    Ok(SocketAddr::new(ip, u16::try_from(port)?))
                })
                .collect::<Result<_>>()?;
            return Ok((targets, miss));
        }
        let ip: IpAddr = text(addr)?.parse().context("DNAT address")?;
        let port = body["port"].as_u64().context("DNAT without a port")?;
        Ok((vec![SocketAddr::new(ip, u16::try_from(port)?)], false))
    }

    /// A packet field, or an expression over fields.
    fn value(&self, e: &Value, p: &Packet) -> Result<Val> {
        if let Some(parts) = e.get("concat").and_then(Value::as_array) {
            return Ok(Val::Concat(
                parts
                    .iter()
                    .map(|x| self.value(x, p))
                    .collect::<Result<_>>()?,
            ));
        }
        let (op, body) = single(e)?;
        Ok(
            match (op, body["protocol"].as_str(), body["field"].as_str()) {
                ("payload", Some("ip" | "ip6"), Some("saddr")) => Val::Addr(p.saddr),
                ("payload", Some("ip" | "ip6"), Some("daddr")) => Val::Addr(p.daddr),
                ("payload", Some("th" | "tcp" | "udp" | "sctp"), Some("dport")) => {
                    Val::Num(p.dport.into())
                }
                ("meta", ..) => match text(&body["key"])? {
                    "l4proto" | "protocol" => Val::Num(p.proto),
                    "iifname" => Val::Text(p.iifname.clone()),
                    "mark" => Val::Num(0),
                    other => bail!("unknown meta key {other}"),
                },
                ("ct", ..) => match text(&body["key"])? {
                    "state" => Val::Text("new".into()),
                    "status" => Val::Text("none".into()),
                    other => bail!("unknown ct key {other}"),
                },
                ("fib", ..) => {
                    let flags = body["flags"].to_string();
                    let local = if flags.contains("saddr") {
                        false
                    } else {
                        p.daddr_local
                    };
                    Val::Text(if local { "local" } else { "unicast" }.into())
                }
                ("numgen" | "jhash", ..) => Val::AnyBelow(body["mod"].as_u64().context("mod")?),
                _ => bail!("unknown value expression {e}"),
            },
        )
    }

    /// Whether `v` is in `right` (a set reference, an anonymous set, one
    /// value): the outcomes possible, `{true, false}` when unknown.
    fn matches(&self, v: &Val, right: &Value) -> Result<BTreeSet<bool>> {
        if let Some(name) = right.as_str().and_then(|s| s.strip_prefix('@')) {
            let set = self.set(name)?;
            if set.dynamic {
                return Ok(BTreeSet::from([true, false]));
            }
            let (hits, miss) = self.lookup_in(v, &set.elements)?;
            return Ok(outcomes(!hits.is_empty(), miss));
        }
        let elements: Vec<(Value, Value)> = match right.get("set").and_then(Value::as_array) {
            Some(list) => list.iter().map(|e| (e.clone(), Value::Null)).collect(),
            None => vec![(right.clone(), Value::Null)],
        };
        let (hits, miss) = self.lookup_in(v, &elements)?;
        Ok(outcomes(!hits.is_empty(), miss))
    }

    fn set(&self, name: &str) -> Result<&Set> {
        self.sets
            .get(name)
            .with_context(|| format!("reference to a set or map that does not exist: @{name}"))
    }

    /// A map lookup: the data of every element `key` can match, and
    /// whether some value of `key` matches none.
    fn lookup(&self, key: &Val, data: &Value) -> Result<(Vec<Value>, bool)> {
        match data.as_str().and_then(|s| s.strip_prefix('@')) {
            Some(name) => self.lookup_in(key, &self.set(name)?.elements),
            None => {
                let list = data["set"].as_array().context("map data")?;
                let elements: Vec<(Value, Value)> = list
                    .iter()
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                self.lookup_in(key, &elements)
            }
        }
    }

    fn lookup_in(&self, key: &Val, elements: &[(Value, Value)]) -> Result<(Vec<Value>, bool)> {
        // At most one part of a key is a random number (`numgen` last in a
        // backend map's key, or a whole `jhash`): which of its values each
        // element takes is an interval, and the values no element takes
        // are a miss.
        let below = match key {
            Val::AnyBelow(n) => Some(*n),
            Val::Concat(parts) => parts.iter().find_map(|p| match p {
                Val::AnyBelow(n) => Some(*n),
                _ => None,
            }),
            _ => None,
        };
        let mut hits = Vec::new();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        for (element, data) in elements {
            if let Some(range) = element_matches(key, element)? {
                hits.push(data.clone());
                covered.extend(range);
            }
        }
        let miss = match below {
            None => hits.is_empty(),
            Some(n) => {
                covered.sort();
                let mut next = 0;
                for (lo, hi) in covered {
                    if lo > next {
                        break;
                    }
                    next = next.max(hi + 1);
                }
                next < n
            }
        };
        Ok((hits, miss))
    }
}

fn outcomes(hit: bool, miss: bool) -> BTreeSet<bool> {
    let mut out = BTreeSet::new();
    if hit {
        out.insert(true);
    }
    if miss {
        out.insert(false);
    }
    out
}

/// Whether `element` matches `v`: `None` for no; `Some(None)` for yes;
/// `Some(Some((lo, hi)))` for "yes for random values lo..=hi".
fn element_matches(v: &Val, element: &Value) -> Result<Option<Option<(u64, u64)>>> {
    if let Some(inner) = element.get("elem") {
        return element_matches(v, &inner["val"]);
    }
    Ok(match v {
        Val::Concat(parts) => {
            let Some(list) = element["concat"].as_array() else {
                bail!("a concatenated key against a plain element {element}");
            };
            if list.len() != parts.len() {
                return Ok(None);
            }
            let mut range = None;
            for (part, e) in parts.iter().zip(list) {
                match element_matches(part, e)? {
                    None => return Ok(None),
                    Some(r) => range = range.or(r),
                }
            }
            Some(range)
        }
        Val::AnyBelow(n) => {
            let (lo, hi) = match element.get("range").and_then(Value::as_array) {
                Some(r) => (num(&r[0])?, num(&r[1])?),
                None => (num(element)?, num(element)?),
            };
            (lo < *n).then_some(Some((lo, hi.min(n - 1))))
        }
        Val::Addr(ip) => {
            let hit = if let Some(prefix) = element.get("prefix") {
                let net: IpAddr = text(&prefix["addr"])?.parse()?;
                in_prefix(*ip, net, u8::try_from(num(&prefix["len"])?)?)
            } else if let Some(r) = element.get("range").and_then(Value::as_array) {
                let (lo, hi): (IpAddr, IpAddr) = (text(&r[0])?.parse()?, text(&r[1])?.parse()?);
                lo <= *ip && *ip <= hi
            } else {
                text(element)?.parse::<IpAddr>()? == *ip
            };
            hit.then_some(None)
        }
        Val::Num(n) => {
            let hit = match element.get("range").and_then(Value::as_array) {
                Some(r) => (num(&r[0])?..=num(&r[1])?).contains(n),
                None => num(element)? == *n,
            };
            hit.then_some(None)
        }
        Val::Text(t) => {
            let e = text(element)?;
            let hit = match e.strip_suffix('*') {
                Some(prefix) => t.starts_with(prefix),
                None => e == t,
            };
            hit.then_some(None)
        }
    })
}

/// A number, or a protocol name as nft prints `inet_proto` values.
fn num(v: &Value) -> Result<u64> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    Ok(match text(v)? {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        other => other
            .parse()
            .with_context(|| format!("not a number: {other}"))?,
    })
}

fn text(v: &Value) -> Result<&str> {
    v.as_str()
        .with_context(|| format!("expected a string, got {v}"))
}

/// The one key of a `{"op": body}` object.
fn single(v: &Value) -> Result<(&str, &Value)> {
    match v.as_object() {
        Some(o) if o.len() == 1 => {
            let (k, b) = o.iter().next().expect("one key");
            Ok((k.as_str(), b))
        }
        _ => bail!("expected an expression object, got {v}"),
    }
}
