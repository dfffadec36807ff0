//! Per-service backends shared between the sync loop (which updates them)
//! and the userspace data path (which picks from them per connection).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::model::ServicePortName;
use crate::plugin::policy::Policy;

/// A policy instance, shared by every service that uses it.
pub type SharedPolicy = Arc<Mutex<Policy>>;

/// What a new connection to one service port can be sent to.
pub struct ServiceBackends {
    pub id: u32,
    pub name: ServicePortName,
    /// In the order pushed to the policy: a pick is an index into this.
    pub endpoints: Vec<SocketAddr>,
    pub policy: SharedPolicy,
    /// ClientIP affinity: client -> (endpoint, last used).
    pub affinity: Option<Affinity>,
}

pub struct Affinity {
    pub timeout: Duration,
    table: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl Affinity {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            table: Mutex::default(),
        }
    }
}

/// A chosen endpoint: its index (for `connection-closed`) and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub index: u32,
    pub addr: SocketAddr,
}

impl ServiceBackends {
    /// Chooses an endpoint for a new connection from `client`: the
    /// affinity entry if it is fresh and still an endpoint, else the policy.
    pub fn choose(&self, client: SocketAddr) -> Option<Choice> {
        let now = Instant::now();
        if let Some(aff) = &self.affinity {
            let mut table = aff.table.lock().expect("affinity lock");
            if let Some((addr, used)) = table.get_mut(&client.ip())
                && now.duration_since(*used) < aff.timeout
                && let Some(index) = self.endpoints.iter().position(|e| e == addr)
            {
                *used = now;
                return Some(Choice {
                    index: index as u32,
                    addr: *addr,
                });
            }
        }
        let pick =
            self.policy
                .lock()
                .expect("policy lock")
                .pick(self.id, client.ip(), client.port());
        let index = match pick {
            Ok(Some(i)) => i,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(service = %self.name, error = %e, "policy failed to pick; using the first endpoint");
                if self.endpoints.is_empty() {
                    return None;
                }
                0
            }
        };
        let addr = *self.endpoints.get(index as usize)?;
        if let Some(aff) = &self.affinity {
            let mut table = aff.table.lock().expect("affinity lock");
            // Expired entries go when the table is touched, keeping it bounded.
            if table.len() > 4096 {
                table.retain(|_, (_, used)| now.duration_since(*used) < aff.timeout);
            }
            table.insert(client.ip(), (addr, now));
        }
        Some(Choice { index, addr })
    }

    pub fn closed(&self, choice: Choice) {
        if let Err(e) = self
            .policy
            .lock()
            .expect("policy lock")
            .connection_closed(self.id, choice.index)
        {
            tracing::debug!(service = %self.name, error = %e, "connection-closed failed");
        }
    }
}

/// service id -> backends, swapped whole on each change.
#[derive(Default)]
pub struct Backends {
    map: RwLock<HashMap<u32, Arc<ServiceBackends>>>,
}

impl Backends {
    pub fn get(&self, id: u32) -> Option<Arc<ServiceBackends>> {
        self.map.read().expect("backends lock").get(&id).cloned()
    }

    pub fn set(&self, backends: ServiceBackends) {
        // Keep the affinity table across endpoint changes.
        let mut map = self.map.write().expect("backends lock");
        let mut backends = backends;
        if let (Some(old), Some(new)) = (map.get(&backends.id), backends.affinity.as_mut())
            && let Some(old_aff) = &old.affinity
            && old_aff.timeout == new.timeout
        {
            *new.table.get_mut().expect("affinity lock") =
                old_aff.table.lock().expect("affinity lock").clone();
        }
        map.insert(backends.id, Arc::new(backends));
    }

    pub fn remove(&self, id: u32) {
        self.map.write().expect("backends lock").remove(&id);
    }
}
