//! The userspace dataplane: one local listener per service port, like
//! upstream's old userspace mode. Without CAP_NET_ADMIN it only opens the
//! listeners on `--userspace-bind-address` and logs which frontend maps to
//! which listener; with it, it also redirects the frontends to the
//! listeners with nftables (see `redirect`).

pub mod backends;
mod redirect;
mod tcp;
mod udp;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use tokio::task::JoinHandle;

use super::{Applied, Dataplane};
use crate::model::{Protocol, ServicePortName};
use crate::plan::{Fragment, Item, Listener};
use backends::Backends;
pub use redirect::Redirector;
/// The nftables table of the redirects (for `--cleanup`).
pub use redirect::TABLE as REDIRECT_TABLE;

/// An open listener.
struct Active {
    spec: Listener,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which local address serves which service port (for logs, tests and the demo).
pub type Mapping = Arc<RwLock<BTreeMap<ServicePortName, (Listener, SocketAddr)>>>;

pub struct UserspaceDataplane {
    bind_ip: IpAddr,
    backends: Arc<Backends>,
    active: BTreeMap<ServicePortName, Active>,
    redirector: Option<Redirector>,
    mapping: Mapping,
}

impl UserspaceDataplane {
    pub fn new(bind_ip: IpAddr, backends: Arc<Backends>, redirector: Option<Redirector>) -> Self {
        Self {
            bind_ip,
            backends,
            active: BTreeMap::new(),
            redirector,
            mapping: Mapping::default(),
        }
    }

    pub fn mapping(&self) -> Mapping {
        self.mapping.clone()
    }

    fn open(&self, spec: &Listener) -> Result<Active> {
        let addr = SocketAddr::new(self.bind_ip, 0);
        let (local, task) = match spec.protocol {
            Protocol::Tcp => {
                let std = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding tcp {addr}"))?;
                std.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(std)?;
                let local = listener.local_addr()?;
                (
                    local,
                    tokio::spawn(tcp::serve(listener, spec.service, self.backends.clone())),
                )
            }
            Protocol::Udp => {
                let std = std::net::UdpSocket::bind(addr)
                    .with_context(|| format!("binding udp {addr}"))?;
                std.set_nonblocking(true)?;
                let socket = tokio::net::UdpSocket::from_std(std)?;
                let local = socket.local_addr()?;
                (
                    local,
                    tokio::spawn(udp::serve(
                        socket,
                        spec.service,
                        self.backends.clone(),
                        spec.udp_idle_timeout,
                    )),
                )
            }
            Protocol::Sctp => bail!("userspace mode cannot proxy SCTP"),
        };
        Ok(Active {
            spec: spec.clone(),
            local,
            task,
        })
    }
}

impl Dataplane for UserspaceDataplane {
    fn apply(
        &mut self,
        _base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<Applied> {
        let mut applied = Applied::all();
        for (name, fragment) in changed {
            let spec = match fragment.map(listener_of).transpose() {
                Ok(spec) => spec.flatten(),
                Err(e) => {
                    applied.refused.push((Some(name.clone()), e));
                    continue;
                }
            };
            let Some(spec) = spec else {
                if self.active.remove(name).is_some() {
                    tracing::info!(service = %name, "userspace listener closed");
                }
                continue;
            };
            // Keep the socket (and its port) when only the frontends changed.
            let reuse = self.active.get(name).is_some_and(|a| {
                a.spec.protocol == spec.protocol
                    && a.spec.service == spec.service
                    && a.spec.udp_idle_timeout == spec.udp_idle_timeout
            });
            if reuse {
                let active = self.active.get_mut(name).expect("checked");
                active.spec = spec;
            } else {
                match self.open(&spec) {
                    Ok(active) => {
                        self.active.insert(name.clone(), active);
                    }
                    Err(e) => {
                        applied.refused.push((Some(name.clone()), e));
                        continue;
                    }
                }
            }
            let active = &self.active[name];
            let fronts: Vec<String> = active
                .spec
                .frontends
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::info!(service = %name, listen = %active.local, frontends = fronts.join(","), "userspace listener");
        }
        let mut mapping = self.mapping.write().expect("mapping lock");
        *mapping = self
            .active
            .iter()
            .map(|(n, a)| (n.clone(), (a.spec.clone(), a.local)))
            .collect();
        if let Some(redirector) = &mut self.redirector {
            redirector
                .apply(&mapping)
                .context("installing nftables redirects")?;
        }
        Ok(applied)
    }
}

/// The single listener a userspace fragment must hold.
fn listener_of(fragment: &Fragment) -> Result<Option<Listener>> {
    let mut found = None;
    for item in fragment.items.iter() {
        match item {
            Item::Listener(l) if found.is_none() => found = Some(l.clone()),
            Item::Listener(_) => bail!("more than one listener for one service port"),
            other => bail!("userspace mode cannot apply {}", other.to_string().trim()),
        }
    }
    Ok(found)
}
