//! The load-balancing policy instances: one per (policy, configuration),
//! shared by the service ports configured alike; which service port uses
//! which; hot reload into every instance of a policy; and dropping the
//! instances nobody uses any more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::dataplane::userspace::backends::SharedPolicy;
use crate::model::{ServicePort, ServicePortName};
use crate::plugin::policy::Policy;
use crate::plugin::{Catalog, PluginStats, Runtime};

/// One policy instance: the plugin's name and its configuration (shared
/// strings: every service port using the instance holds a copy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub name: Arc<str>,
    pub config: Arc<str>,
}

impl PolicyKey {
    /// What `Display` writes, without a new string for the common case
    /// (no configuration).
    pub fn label(&self) -> Arc<str> {
        if self.config.is_empty() {
            self.name.clone()
        } else {
            self.to_string().into()
        }
    }
}

impl std::fmt::Display for PolicyKey {
    /// `name`, or `name[config]`: the plugin label of its metrics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.config.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}[{}]", self.name, self.config)
        }
    }
}

/// A service port's place in a policy instance: its id for the internal
/// set and which of its other sets are pushed under ids of their own.
#[derive(Clone, Debug, PartialEq)]
struct Use {
    key: PolicyKey,
    id: u32,
    sets: OwnSets,
}

/// Which of a service port's sets other than the internal one its policy
/// holds under ids of their own (a set equal to another shares its plan).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnSets {
    /// The external set, under `external_id(id)`.
    pub external: bool,
    /// The cluster-wide set of the short-circuit, under `cluster_id(id)`.
    pub cluster: bool,
}

/// Ids the proxier hands out stay below these bits; the same id with a bit
/// set names another endpoint set of the service port in its policy, so
/// the sets keep separate state (least-connections counts, rotation) and
/// none overwrites another at every sync.
const EXTERNAL_ID_BIT: u32 = 1 << 31;
const CLUSTER_ID_BIT: u32 = 1 << 30;

/// The policy id of `id`'s external endpoint set.
pub fn external_id(id: u32) -> u32 {
    id | EXTERNAL_ID_BIT
}

/// The policy id of `id`'s cluster-wide (short-circuit) endpoint set.
pub fn cluster_id(id: u32) -> u32 {
    id | CLUSTER_ID_BIT
}

/// Whether the proxier may hand out `id` (its twins must not collide with
/// another service port's id).
pub fn valid_id(id: u32) -> bool {
    id & (EXTERNAL_ID_BIT | CLUSTER_ID_BIT) == 0
}

pub struct Policies {
    runtime: Arc<Runtime>,
    catalog: Catalog,
    default: PolicyKey,
    instances: HashMap<PolicyKey, SharedPolicy>,
    /// Which instance each service port uses, and its policy ids there.
    used_by: HashMap<ServicePortName, Use>,
    /// How many service ports use each instance (`used_by` counted as it
    /// changes: `drop_unused` runs every sync and must not scan it).
    users: HashMap<PolicyKey, usize>,
    /// Each policy plugin's source and `sha256:<digest>`, as loaded or
    /// last reloaded.
    origins: HashMap<Arc<str>, (Arc<str>, Arc<str>)>,
}

impl Policies {
    /// The default policy must load: without it nothing can be proxied.
    pub fn new(runtime: Arc<Runtime>, catalog: Catalog, default: &str) -> Result<Self> {
        let mut policies = Self {
            runtime,
            catalog,
            default: PolicyKey {
                name: default.into(),
                config: "".into(),
            },
            instances: HashMap::new(),
            used_by: HashMap::new(),
            users: HashMap::new(),
            origins: HashMap::new(),
        };
        let key = policies.default.clone();
        policies
            .instance(&key)
            .with_context(|| format!("loading the default lb policy {default:?}"))?;
        Ok(policies)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The policy for `port` (its annotation's, or the default when it has
    /// none or it fails to load, logged), recorded as used by it under `id`.
    pub fn for_service(&mut self, port: &ServicePort, id: u32) -> (PolicyKey, SharedPolicy) {
        let (key, policy) = self.resolve(port);
        let sets = match self.used_by.get(&port.name) {
            Some(old) if old.key != key => {
                // The service port moved to another instance.
                let old = old.clone();
                self.forget(&old);
                OwnSets::default()
            }
            Some(old) => old.sets,
            None => OwnSets::default(),
        };
        let previous = self.used_by.insert(
            port.name.clone(),
            Use {
                key: key.clone(),
                id,
                sets,
            },
        );
        self.count_user(previous.map(|u| u.key), Some(&key));
        (key, policy)
    }

    /// Records which of `name`'s other endpoint sets are pushed to its
    /// policy under ids of their own; a set that stops being is forgotten
    /// by the instance. Call after `for_service`.
    pub fn use_sets(&mut self, name: &ServicePortName, sets: OwnSets) {
        let Some(using) = self.used_by.get_mut(name) else {
            return;
        };
        let was = std::mem::replace(&mut using.sets, sets);
        let (key, id) = (using.key.clone(), using.id);
        if was.external && !sets.external {
            self.forget_id(&key, external_id(id));
        }
        if was.cluster && !sets.cluster {
            self.forget_id(&key, cluster_id(id));
        }
    }

    fn resolve(&mut self, port: &ServicePort) -> (PolicyKey, SharedPolicy) {
        if let Some(name) = &port.lb_policy {
            let key = PolicyKey {
                name: name.as_str().into(),
                config: port.lb_policy_config.as_str().into(),
            };
            match self.instance(&key) {
                // The instance's own key: its strings are shared.
                Ok(p) => {
                    let key = (self.instances.get_key_value(&key)).map_or(key, |(k, _)| k.clone());
                    return (key, p);
                }
                Err(e) => {
                    tracing::error!(service = %port.name, policy = %name, error = format!("{e:#}"), "using the default policy instead")
                }
            }
        }
        let key = self.default.clone();
        let policy = self.instances[&key].clone();
        (key, policy)
    }

    /// `name` is gone: its instance forgets it.
    pub fn release(&mut self, name: &ServicePortName) {
        if let Some(using) = self.used_by.remove(name) {
            self.forget(&using);
            self.count_user(Some(using.key), None);
        }
    }

    /// A service port moved from instance `from` to `to` (either `None`).
    fn count_user(&mut self, from: Option<PolicyKey>, to: Option<&PolicyKey>) {
        if from.as_ref() == to {
            return;
        }
        if let Some(from) = from
            && let Some(n) = self.users.get_mut(&from)
        {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&from);
            }
        }
        if let Some(to) = to {
            *self.users.entry(to.clone()).or_default() += 1;
        }
    }

    /// Every set of a service port leaves its instance.
    fn forget(&self, using: &Use) {
        self.forget_id(&using.key, using.id);
        if using.sets.external {
            self.forget_id(&using.key, external_id(using.id));
        }
        if using.sets.cluster {
            self.forget_id(&using.key, cluster_id(using.id));
        }
    }

    fn forget_id(&self, key: &PolicyKey, id: u32) {
        if let Some(p) = self.instances.get(key) {
            // An instance that cannot forget is re-created on its next trap.
            let _ = p.lock().expect("policy lock").remove_service(id);
        }
    }

    /// Instances no service port uses (a configuration that is gone) are
    /// dropped with their metric series; the default stays.
    pub fn drop_unused(&mut self) {
        let (default, users) = (&self.default, &self.users);
        self.instances
            .retain(|key, _| key == default || users.contains_key(key));
    }

    /// Swaps a checked new version of policy `candidate.name` into every
    /// instance of it; returns the service ports using it (their kernel
    /// plans may differ and are rendered again).
    pub fn reload(&mut self, candidate: &crate::plugin::reload::Candidate) -> Vec<ServicePortName> {
        use std::sync::atomic::Ordering::Relaxed;
        for (key, policy) in &self.instances {
            if *key.name != *candidate.name {
                continue;
            }
            let result = policy
                .lock()
                .expect("policy lock")
                .reload(&candidate.component, candidate.digest);
            match result {
                Ok(()) => {
                    self.runtime.reloads.reloads.fetch_add(1, Relaxed);
                    if let Some(dir) = self.catalog.dir() {
                        let path = dir.join(format!("{}.wasm", candidate.name));
                        self.origins.insert(
                            candidate.name.as_str().into(),
                            origin(&path.display().to_string(), candidate.digest),
                        );
                    }
                    tracing::info!(policy = %key, "reloaded policy");
                }
                Err(e) => {
                    self.runtime.reloads.rejections.fetch_add(1, Relaxed);
                    tracing::error!(policy = %key, error = format!("{e:#}"), "reload failed; the current version stays");
                }
            }
        }
        self.used_by
            .iter()
            .filter(|(_, using)| *using.key.name == *candidate.name)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// (source, `sha256:<digest>`) of policy plugin `name`, for `inspect`.
    pub fn origin(&self, name: &str) -> Option<(Arc<str>, Arc<str>)> {
        self.origins.get(name).cloned()
    }

    /// Per-instance counters, labelled `name` or `name[config]`.
    pub fn stats(&self) -> Vec<(String, Arc<PluginStats>)> {
        self.instances
            .iter()
            .map(|(key, p)| (key.to_string(), p.lock().expect("policy lock").stats()))
            .collect()
    }

    /// Every service id some instance holds an endpoint set for.
    #[cfg(test)]
    pub fn held_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .instances
            .values()
            .flat_map(|p| p.lock().expect("policy lock").services())
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The instance for `key`, loaded on first use. Only the operator's
    /// default may be a path; a Service's annotation names a plugin.
    fn instance(&mut self, key: &PolicyKey) -> Result<SharedPolicy> {
        if let Some(p) = self.instances.get(key) {
            return Ok(p.clone());
        }
        let (source, bytes) = if key.name == self.default.name {
            self.catalog.load(&key.name)?
        } else {
            self.catalog.load_named(&key.name)?
        };
        let component = self
            .runtime
            .compile(&bytes)
            .with_context(|| format!("plugin {source}"))?;
        let policy = Policy::new(self.runtime.clone(), &key.name, &component, &key.config)?;
        self.origins.insert(
            key.name.clone(),
            origin(&source.to_string(), crate::plugin::PluginDigest::of(&bytes)),
        );
        tracing::info!(policy = %key, %source, "loaded lb policy");
        let shared = Arc::new(Mutex::new(policy));
        self.instances.insert(key.clone(), shared.clone());
        Ok(shared)
    }
}

/// A plugin's source and digest as `inspect` shows them.
fn origin(source: &str, digest: crate::plugin::PluginDigest) -> (Arc<str>, Arc<str>) {
    (source.into(), format!("sha256:{digest}").into())
}
