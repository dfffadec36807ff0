//! Frontend ownership: which service port may program an address and port.
//!
//! Two Services can ask for the same frontend: the API server does not check
//! externalIPs or load-balancer ingress IPs for uniqueness, and the file
//! source checks nothing. Programming both makes the kernel refuse the
//! transaction ("File exists") or lets the last writer win at random. As
//! upstream's rule goes, the oldest Service owns a frontend (creation time,
//! then namespace/name, then port name); the others are programmed without
//! it, reported, and take it over when the owner lets go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::model::{Protocol, ServicePort, ServicePortName};

/// An address a packet can be sent to to reach a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// A cluster IP, external IP or load-balancer ingress IP with the port.
    Ip(IpAddr, Protocol, u16),
    /// A node port (on every node address).
    NodePort(Protocol, u16),
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frontend::Ip(ip, proto, port) => {
                write!(f, "{}/{proto}", std::net::SocketAddr::from((*ip, *port)))
            }
            Frontend::NodePort(proto, port) => write!(f, "node port {port}/{proto}"),
        }
    }
}

/// Who asks for a frontend; the least one owns it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claimant {
    /// The Service's creationTimestamp in seconds; unknown sorts last.
    pub created: i64,
    pub name: ServicePortName,
}

impl Claimant {
    pub fn new(created: Option<i64>, name: ServicePortName) -> Self {
        Self {
            created: created.unwrap_or(i64::MAX),
            name,
        }
    }
}

/// Every frontend a service port asks for.
pub fn frontends_of(port: &ServicePort) -> Vec<Frontend> {
    let proto = port.name.protocol;
    let ips = port
        .cluster_ips
        .iter()
        .chain(&port.external_ips)
        .chain(port.load_balancer_ingress.iter().map(|(ip, _)| ip));
    let mut out: Vec<Frontend> = ips.map(|ip| Frontend::Ip(*ip, proto, port.port)).collect();
    out.extend(port.node_port.map(|p| Frontend::NodePort(proto, p)));
    out.sort();
    out.dedup();
    out
}

/// `port` without the frontends in `lost`.
pub fn without(port: &ServicePort, lost: &BTreeSet<Frontend>) -> ServicePort {
    let proto = port.name.protocol;
    let kept = |ip: &IpAddr| !lost.contains(&Frontend::Ip(*ip, proto, port.port));
    let mut out = port.clone();
    out.cluster_ips.retain(kept);
    out.external_ips.retain(kept);
    out.load_balancer_ingress.retain(|(ip, _)| kept(ip));
    out.node_port = out
        .node_port
        .filter(|p| !lost.contains(&Frontend::NodePort(proto, *p)));
    out
}

/// A frontend's claimants, least first (the owner). Almost always one: a
/// sorted `Vec` of one costs one claimant, where a `BTreeSet` of one
/// allocated a whole B-tree node (eleven claimants' room; 9 MiB of the
/// heap at 10k Services, measured with heaptrack).
#[derive(Debug, Default)]
struct Claims(Vec<Claimant>);

impl Claims {
    fn first(&self) -> Option<&Claimant> {
        self.0.first()
    }

    fn insert(&mut self, claimant: Claimant) {
        if let Err(at) = self.0.binary_search(&claimant) {
            // A push makes room for four (2.5 MB of the heap at 10k).
            self.0.reserve_exact(1);
            self.0.insert(at, claimant);
        }
    }

    fn remove(&mut self, claimant: &Claimant) {
        if let Ok(at) = self.0.binary_search(claimant) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Debug, Default)]
pub struct Frontends {
    /// Each frontend's claimants; the first owns it.
    claims: BTreeMap<Frontend, Claims>,
    /// What each service port holds a claim on.
    held: HashMap<ServicePortName, (Claimant, Vec<Frontend>)>,
    /// Claims denied right now (every claimant of a frontend but its
    /// owner), kept as claims change: the sync loop publishes it after
    /// every sync, and summing over every frontend cost ~1 ms at 50k.
    denied: usize,
}

impl Frontends {
    /// Replaces the claims of `claimant` with `wanted` (empty: releases
    /// them). Returns the other service ports that gained or lost a
    /// frontend through it: they must be programmed again.
    pub fn claim(
        &mut self,
        claimant: Claimant,
        wanted: Vec<Frontend>,
    ) -> BTreeSet<ServicePortName> {
        let mut affected = BTreeSet::new();
        if let Some((old, frontends)) = self.held.remove(&claimant.name) {
            for f in frontends {
                let Some(set) = self.claims.get_mut(&f) else {
                    continue;
                };
                let was_owner = set.first() == Some(&old);
                let before = set.len().saturating_sub(1);
                set.remove(&old);
                self.denied -= before - set.len().saturating_sub(1);
                if was_owner && let Some(next) = set.first() {
                    affected.insert(next.name.clone());
                }
                if set.is_empty() {
                    self.claims.remove(&f);
                }
            }
        }
        for f in &wanted {
            let set = self.claims.entry(*f).or_default();
            let previous = set.first().cloned();
            let before = set.len().max(1);
            set.insert(claimant.clone());
            self.denied += set.len() - before;
            if let Some(previous) = previous
                && set.first() == Some(&claimant)
            {
                affected.insert(previous.name);
            }
        }
        if !wanted.is_empty() {
            self.held
                .insert(claimant.name.clone(), (claimant.clone(), wanted));
        }
        affected.remove(&claimant.name);
        affected
    }

    /// Releases every claim of `name`; returns who takes over.
    pub fn release(&mut self, name: &ServicePortName) -> BTreeSet<ServicePortName> {
        match self.held.get(name) {
            Some((claimant, _)) => self.claim(claimant.clone(), Vec::new()),
            None => BTreeSet::new(),
        }
    }

    /// The frontends `name` asks for that another service port owns, with
    /// that owner.
    pub fn lost(&self, name: &ServicePortName) -> Vec<(Frontend, &ServicePortName)> {
        let Some((claimant, frontends)) = self.held.get(name) else {
            return Vec::new();
        };
        frontends
            .iter()
            .filter_map(|f| {
                let owner = self.claims.get(f)?.first()?;
                (owner != claimant).then_some((*f, &owner.name))
            })
            .collect()
    }

    /// How many (frontend, service port) claims are denied right now.
    pub fn conflicts(&self) -> usize {
        self.denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ServicePortName {
        ServicePortName {
            namespace: "t".into(),
            name: n.into(),
            port: "".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn ip(last: u8) -> Frontend {
        Frontend::Ip([10, 0, 0, last].into(), Protocol::Tcp, 80)
    }

    fn lost(f: &Frontends, n: &str) -> Vec<Frontend> {
        f.lost(&name(n)).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn the_oldest_claimant_owns_a_frontend_and_the_next_takes_over() {
        let mut f = Frontends::default();
        assert!(
            f.claim(Claimant::new(Some(20), name("young")), vec![ip(1), ip(2)])
                .is_empty()
        );
        // An older Service arrives later and takes ip(1) over.
        let affected = f.claim(Claimant::new(Some(10), name("old")), vec![ip(1)]);
        assert_eq!(affected, BTreeSet::from([name("young")]));
        assert_eq!(lost(&f, "young"), [ip(1)]);
        assert!(lost(&f, "old").is_empty());
        assert_eq!(f.conflicts(), 1);
        // Without a creation time, a claimant loses to any with one.
        f.claim(Claimant::new(None, name("a-unknown")), vec![ip(2)]);
        assert_eq!(lost(&f, "a-unknown"), [ip(2)]);
        assert_eq!(f.conflicts(), 2);
        // The owner goes: the next claimant is told and owns it.
        assert_eq!(f.release(&name("old")), BTreeSet::from([name("young")]));
        assert!(lost(&f, "young").is_empty());
        // The owner changes its frontends: the loser gets ip(2) back.
        assert_eq!(
            f.claim(Claimant::new(Some(20), name("young")), vec![ip(3)]),
            BTreeSet::from([name("a-unknown")])
        );
        assert_eq!(f.conflicts(), 0);
        f.release(&name("young"));
        f.release(&name("a-unknown"));
        assert!(f.claims.is_empty() && f.held.is_empty(), "nothing leaks");
    }

    #[test]
    fn the_conflict_count_follows_every_claim_and_release() {
        // Claims over a few shared frontends in a fixed pseudo-random
        // order; the kept count must equal a recount after every step.
        let mut f = Frontends::default();
        let mut x: u32 = 7;
        for step in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let who = name(&format!("s{}", (x >> 8) % 12));
            if (x >> 4) % 5 == 0 {
                f.release(&who);
            } else {
                let wanted: Vec<Frontend> = (0..(x >> 12) % 4)
                    .map(|k| ip(((x >> (14 + k)) % 6) as u8))
                    .collect();
                f.claim(Claimant::new(Some(i64::from((x >> 20) % 9)), who), wanted);
            }
            let recount: usize = f.claims.values().map(|c| c.len() - 1).sum();
            assert_eq!(f.conflicts(), recount, "after step {step}");
        }
    }

    #[test]
    fn equal_creation_times_fall_back_to_the_name() {
        let mut f = Frontends::default();
        f.claim(Claimant::new(Some(5), name("b")), vec![ip(1)]);
        f.claim(Claimant::new(Some(5), name("a")), vec![ip(1)]);
        assert_eq!(lost(&f, "b"), [ip(1)]);
        assert!(lost(&f, "a").is_empty());
    }
}
