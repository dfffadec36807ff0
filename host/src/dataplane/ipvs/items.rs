//! The IPVS items of a fragment as virtual servers, which fragment owns
//! each, and the record of node-address virtual servers that are ours.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};

use super::FragmentKey;
use super::kernel::{VirtualKey, VirtualServer};
use crate::plan::{Fragment, Item};

/// One virtual server as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Desired {
    pub vs: VirtualServer,
    pub reals: BTreeMap<SocketAddr, u32>,
}

pub(super) type Servers = BTreeMap<VirtualKey, Desired>;

pub(super) fn read_record(path: Option<&PathBuf>) -> BTreeSet<VirtualKey> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let (proto, addr) = l.split_once(' ')?;
            Some(VirtualKey {
                protocol: proto.to_uppercase().parse().ok()?,
                address: addr.parse().ok()?,
            })
        })
        .collect()
}

pub(super) fn describe(key: &FragmentKey) -> String {
    match key {
        Some(name) => format!("service {name}"),
        None => "the node-wide base".into(),
    }
}

/// Which fragment owns each virtual server; two fragments claiming one
/// virtual server is an error naming both.
pub(super) fn owners(
    plan: &BTreeMap<FragmentKey, Servers>,
) -> Result<BTreeMap<VirtualKey, FragmentKey>> {
    let mut owner = BTreeMap::new();
    for (key, servers) in plan {
        for vk in servers.keys() {
            if let Some(other) = owner.insert(*vk, key.clone()) {
                return Err(claimed_twice(vk, &other, key));
            }
        }
    }
    Ok(owner)
}

pub(super) fn claimed_twice(
    vk: &VirtualKey,
    owner: &FragmentKey,
    key: &FragmentKey,
) -> anyhow::Error {
    anyhow!(
        "virtual server {vk} is claimed by both {} and {}",
        describe(owner),
        describe(key)
    )
}

/// The IPVS items of a fragment as virtual servers with their reals.
pub(super) fn parse(fragment: &Fragment) -> Result<Servers> {
    let mut servers = Servers::new();
    for item in fragment.items.iter() {
        if let Item::IpvsVirtualServer {
            address,
            protocol,
            scheduler,
            persistence_timeout,
        } = item
        {
            let key = VirtualKey {
                address: *address,
                protocol: *protocol,
            };
            let vs = VirtualServer {
                key,
                scheduler: scheduler.clone(),
                persistence_timeout: *persistence_timeout,
            };
            let reals = BTreeMap::new();
            if servers.insert(key, Desired { vs, reals }).is_some() {
                bail!("virtual server {key} appears twice");
            }
        }
    }
    for item in fragment.items.iter() {
        match item {
            Item::IpvsVirtualServer { .. } => {}
            Item::IpvsRealServer {
                virtual_address,
                protocol,
                address,
                weight,
            } => {
                let key = VirtualKey {
                    address: *virtual_address,
                    protocol: *protocol,
                };
                let d = servers.get_mut(&key).ok_or_else(|| {
                    anyhow!("real server {address} names unknown virtual server {key}")
                })?;
                if address.is_ipv4() != virtual_address.is_ipv4() {
                    bail!("real server {address} is not of {key}'s family");
                }
                d.reals.insert(*address, *weight);
            }
            other => bail!(
                "the IPVS dataplane cannot apply {}",
                other.to_string().trim()
            ),
        }
    }
    Ok(servers)
}
