//! Cluster state: objects from a source go in, per-service-port changes
//! come out.
//!
//! Like upstream's change trackers, [`ClusterState`] remembers which
//! Services were touched since the last sync; [`ClusterState::take_changes`]
//! turns only those into updated or removed service ports, so a sync costs
//! work proportional to what changed.

pub mod convert;
pub mod frontends;
mod slices;
pub mod topology;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Endpoint, NodeInfo, ObjectKey, Protocol, ServicePort, ServicePortName};
use frontends::{Claimant, Frontends};

type SliceEndpoints = Vec<((Arc<str>, Protocol), Arc<[Endpoint]>)>;

/// A service port with its merged endpoints. Handed around as
/// `Arc<ServiceState>`: the state's two views of a service port, the
/// changes of a sync and the proxier's work list share one copy.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceState {
    /// The state's own copy of the port, shared.
    pub port: Arc<ServicePort>,
    /// Shared with the policy's replay record (see `topology`).
    pub endpoints: Arc<[Endpoint]>,
}

/// What changed since the last `take_changes`.
#[derive(Debug, Default)]
pub struct Changes {
    pub updated: Vec<Arc<ServiceState>>,
    pub removed: Vec<ServicePortName>,
    /// The node object changed (labels, zone, addresses).
    pub node_changed: bool,
    /// When the changed EndpointSlices' changes were triggered.
    pub triggers: Vec<std::time::SystemTime>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty() && !self.node_changed
    }
}

#[derive(Default)]
pub struct ClusterState {
    node_name: String,
    services: BTreeMap<ObjectKey, Vec<Arc<ServicePort>>>,
    /// Each Service's creationTimestamp (seconds), for frontend ownership.
    created: BTreeMap<ObjectKey, Option<i64>>,
    /// service key -> slice name -> endpoints
    slices: BTreeMap<ObjectKey, slices::BySlice<SliceEndpoints>>,
    /// slice key -> the service it belongs to
    slice_owner: BTreeMap<ObjectKey, ObjectKey>,
    node: NodeInfo,
    node_changed: bool,
    /// Endpoints' node and zone names, shared.
    names: crate::model::Names,
    /// Services whose ports or endpoints may differ from `last`.
    dirty: BTreeSet<ObjectKey>,
    /// Service and EndpointSlice changes seen (totals) and not yet synced
    /// (pending), as upstream's change-tracker metrics count them.
    pub service_changes: (u64, u64),
    pub endpoint_changes: (u64, u64),
    /// Objects refused as invalid (each logged by name).
    pub invalid_objects: u64,
    /// The node ports objects may use, when no API server enforced it.
    node_port_range: Option<std::ops::RangeInclusive<u16>>,
    /// last-change-trigger-time of EndpointSlices changed since the last
    /// take (network programming latency).
    triggers: Vec<std::time::SystemTime>,
    /// Every service port as its objects say, as of the last take.
    wanted: BTreeMap<ServicePortName, Arc<ServiceState>>,
    /// Who owns each frontend that two service ports ask for.
    frontends: Frontends,
    /// Every service port as it is to be programmed: `wanted` without the
    /// frontends another service port owns (the same `Arc` as in `wanted`
    /// when it lost none: most service ports).
    last: BTreeMap<ServicePortName, Arc<ServiceState>>,
}

impl ClusterState {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.into(),
            node: NodeInfo {
                name: node_name.into(),
                ..NodeInfo::default()
            },
            ..Self::default()
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Number of Services with changes not yet taken.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Node ports must keep to `range` (the file source, which has no API
    /// server to enforce one: without it a Service could take port 22).
    pub fn with_node_port_range(mut self, range: Option<std::ops::RangeInclusive<u16>>) -> Self {
        self.node_port_range = range;
        self
    }

    /// Drops node ports (and health-check node ports) outside the range,
    /// with a warning; the rest of the Service is programmed.
    fn within_node_port_range(&self, mut ports: Vec<ServicePort>) -> Vec<ServicePort> {
        let Some(range) = &self.node_port_range else {
            return ports;
        };
        for port in &mut ports {
            for (what, value) in [
                ("nodePort", &mut port.node_port),
                ("healthCheckNodePort", &mut port.health_check_node_port),
            ] {
                if let Some(n) = value.filter(|n| !range.contains(n)) {
                    tracing::warn!(
                        service = %port.name,
                        "ignoring {what} {n}: outside the node-port range {}-{}",
                        range.start(),
                        range.end()
                    );
                    *value = None;
                }
            }
        }
        ports
    }

    /// Adds or replaces a Service. Returns why it is skipped, if it is.
    pub fn upsert_service(&mut self, svc: &Service) -> Option<convert::Skip> {
        let key = ObjectKey::of(&svc.metadata);
        let (ports, skip) = match convert::service_ports(svc, &mut |w| tracing::warn!("{w}")) {
            Ok(ports) => (
                (self.within_node_port_range(ports).into_iter())
                    .map(Arc::new)
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(skip @ convert::Skip::Invalid(_)) => {
                // What the API server would refuse: keep the last good
                // version (if any), as a broken file keeps its contents.
                tracing::error!(service = %key, error = %skip, "invalid Service; its last good version stays in force");
                self.invalid_objects += 1;
                return Some(skip);
            }
            Err(skip) => (Vec::new(), Some(skip)),
        };
        if ports.is_empty() {
            self.delete_service(&key);
        } else if self.services.get(&key) != Some(&ports) {
            let created = svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second());
            self.created.insert(key.clone(), created);
            self.services.insert(key.clone(), ports);
            self.dirty.insert(key);
            self.service_changes.0 += 1;
            self.service_changes.1 += 1;
        }
        skip
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        if self.services.remove(key).is_some() {
            self.created.remove(key);
            self.dirty.insert(key.clone());
            self.service_changes.0 += 1;
            self.service_changes.1 += 1;
        }
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let key = ObjectKey::of(&slice.metadata);
        let Some(service) = convert::slice_service(slice) else {
            self.delete_slice(&key);
            return;
        };
        let endpoints = convert::slice_endpoints(slice, &self.node_name, &mut self.names);
        let trigger = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(convert::ANNOTATION_TRIGGER_TIME))
            .and_then(|t| convert::parse_trigger_time(t));
        if self.slice_owner.get(&key) == Some(&service) {
            let current = self.slices.get(&service).and_then(|s| s.get(&key.name));
            if current == Some(&endpoints) {
                return;
            }
        } else {
            // New slice, or its service label changed.
            self.delete_slice(&key);
            self.slice_owner.insert(key.clone(), service.clone());
        }
        self.slices
            .entry(service.clone())
            .or_default()
            .insert(key.name, endpoints);
        self.dirty.insert(service);
        self.triggers.extend(trigger);
        self.endpoint_changes.0 += 1;
        self.endpoint_changes.1 += 1;
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        if let Some(service) = self.slice_owner.remove(key) {
            if let Some(by_name) = self.slices.get_mut(&service) {
                by_name.remove(&key.name);
                if by_name.is_empty() {
                    self.slices.remove(&service);
                }
            }
            self.dirty.insert(service);
            self.endpoint_changes.0 += 1;
            self.endpoint_changes.1 += 1;
        }
    }

    pub fn set_node(&mut self, node: &Node) {
        let info = convert::node_info(node);
        if info != self.node {
            self.node = info;
            self.node_changed = true;
        }
    }

    /// The node object is gone: only its name is known (no labels, zone or
    /// addresses), as upstream forgets the node's labels.
    pub fn clear_node(&mut self) {
        let bare = NodeInfo {
            name: self.node_name.clone(),
            ..NodeInfo::default()
        };
        if self.node != bare {
            self.node = bare;
            self.node_changed = true;
        }
    }

    /// Replaces everything with a complete set of objects (a full listing),
    /// marking only what differs as changed.
    pub fn replace_all(
        &mut self,
        services: &[Service],
        slices: &[EndpointSlice],
        node: Option<&Node>,
    ) {
        let svc_keys: BTreeSet<ObjectKey> = services
            .iter()
            .map(|s| ObjectKey::of(&s.metadata))
            .collect();
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|k| !svc_keys.contains(*k))
            .cloned()
            .collect();
        gone.iter().for_each(|k| self.delete_service(k));
        services.iter().for_each(|s| {
            self.upsert_service(s);
        });
        let slice_keys: BTreeSet<ObjectKey> =
            slices.iter().map(|s| ObjectKey::of(&s.metadata)).collect();
        let gone: Vec<ObjectKey> = self
            .slice_owner
            .keys()
            .filter(|k| !slice_keys.contains(*k))
            .cloned()
            .collect();
        gone.iter().for_each(|k| self.delete_slice(k));
        slices.iter().for_each(|s| self.upsert_slice(s));
        match node {
            Some(node) => self.set_node(node),
            None => self.clear_node(),
        }
    }

    /// The changes since the last call, as service-port states.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes {
            node_changed: std::mem::take(&mut self.node_changed),
            ..Changes::default()
        };
        self.service_changes.1 = 0;
        self.endpoint_changes.1 = 0;
        changes.triggers = std::mem::take(&mut self.triggers);
        // Service ports to program again: changed ones, and those whose
        // frontends changed owner through them.
        let mut touched = BTreeSet::new();
        for key in std::mem::take(&mut self.dirty) {
            let current: BTreeMap<ServicePortName, Arc<ServiceState>> = self
                .services
                .get(&key)
                .into_iter()
                .flatten()
                .map(|port| {
                    (
                        port.name.clone(),
                        Arc::new(ServiceState {
                            port: port.clone(),
                            endpoints: self.merged_endpoints(&key, &port.name),
                        }),
                    )
                })
                .collect();
            let previous: Vec<ServicePortName> = self
                .wanted
                .range(prefix_range(&key))
                .map(|(name, _)| name.clone())
                .collect();
            for name in previous {
                if !current.contains_key(&name) {
                    self.wanted.remove(&name);
                    touched.extend(self.frontends.release(&name));
                    if self.last.remove(&name).is_some() {
                        changes.removed.push(name);
                    }
                }
            }
            let created = self.created.get(&key).copied().flatten();
            for (name, state) in current {
                if self.wanted.get(&name) != Some(&state) {
                    let claimant = Claimant::new(created, name.clone());
                    touched.extend(
                        self.frontends
                            .claim(claimant, frontends::frontends_of(&state.port)),
                    );
                    touched.insert(name.clone());
                    self.wanted.insert(name, state);
                }
            }
        }
        for name in touched {
            let Some(wanted) = self.wanted.get(&name) else {
                continue;
            };
            let lost = self.frontends.lost(&name);
            for (frontend, owner) in &lost {
                tracing::warn!(
                    service = %name,
                    %frontend,
                    owner = %owner,
                    "frontend already belongs to an older Service; not programming it for this one"
                );
            }
            let state = if lost.is_empty() {
                wanted.clone()
            } else {
                let lost = lost.into_iter().map(|(f, _)| f).collect();
                Arc::new(ServiceState {
                    port: Arc::new(frontends::without(&wanted.port, &lost)),
                    endpoints: wanted.endpoints.clone(),
                })
            };
            if state.port.cluster_ips.is_empty() {
                // Its cluster IP is another Service's (only the file source
                // allows that): a Service is not programmed without it.
                if self.last.remove(&name).is_some() {
                    changes.removed.push(name);
                }
            } else if self.last.get(&name) != Some(&state) {
                self.last.insert(name, state.clone());
                changes.updated.push(state);
            }
        }
        changes
    }

    /// How many frontends some service port asks for but another owns.
    pub fn frontend_conflicts(&self) -> usize {
        self.frontends.conflicts()
    }

    /// Every service port as of the last `take_changes`.
    pub fn snapshot(&self) -> impl Iterator<Item = &Arc<ServiceState>> {
        self.last.values()
    }

    /// One service port as of the last `take_changes` (a retry looks up
    /// what failed instead of scanning every service port).
    pub fn service_port(&self, name: &ServicePortName) -> Option<&Arc<ServiceState>> {
        self.last.get(name)
    }

    /// All slices of the service merged for one port: first occurrence of
    /// an address wins, slices taken in name order (upstream's cache). The
    /// one slice port's list itself when it is the only one and has no
    /// address twice (most Services): no copy of its endpoints.
    fn merged_endpoints(&self, service: &ObjectKey, port: &ServicePortName) -> Arc<[Endpoint]> {
        let lists: Vec<&Arc<[Endpoint]>> = (self.slices.get(service).into_iter())
            .flat_map(|s| s.values().flatten())
            .filter(|((name, proto), _)| **name == *port.port && *proto == port.protocol)
            .map(|(_, endpoints)| endpoints)
            .collect();
        let mut seen = std::collections::HashSet::new();
        if let [only] = lists[..]
            && only.iter().all(|ep| seen.insert((ep.ip, ep.port)))
        {
            return only.clone();
        }
        seen.clear();
        let merged: Vec<Endpoint> = (lists.into_iter().flat_map(|l| l.iter()))
            .filter(|ep| seen.insert((ep.ip, ep.port)))
            .cloned()
            .collect();
        merged.into()
    }
}

/// The range of ServicePortNames belonging to one Service.
fn prefix_range(key: &ObjectKey) -> std::ops::RangeInclusive<ServicePortName> {
    let lo = ServicePortName {
        namespace: key.namespace.as_str().into(),
        name: key.name.as_str().into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    let hi = ServicePortName {
        namespace: key.namespace.as_str().into(),
        name: key.name.as_str().into(),
        port: "\u{10ffff}".repeat(4).into(),
        protocol: Protocol::Sctp,
    };
    lo..=hi
}

#[cfg(test)]
mod tests;
