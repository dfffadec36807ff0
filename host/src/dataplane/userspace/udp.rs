//! UDP forwarding: one flow per client address, each with its own socket
//! connected to the chosen endpoint. A flow closes after `idle` without a
//! datagram in either direction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::dataplane::userspace::backends::{Backends, ServiceBackends};

const MAX_DATAGRAM: usize = 65_535;

struct Flow {
    upstream: UdpSocket,
    /// Milliseconds since `epoch` of the last datagram either way.
    last_active: AtomicU64,
}

struct Flows {
    epoch: Instant,
    by_client: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
}

impl Flows {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn touch(&self, flow: &Flow) {
        flow.last_active.store(self.now_ms(), Ordering::Relaxed);
    }
}

pub async fn serve(socket: UdpSocket, service: u32, backends: Arc<Backends>, idle: Duration) {
    let socket = Arc::new(socket);
    let flows = Arc::new(Flows {
        epoch: Instant::now(),
        by_client: Mutex::default(),
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(service, error = %e, "udp recv failed");
                continue;
            }
        };
        let existing = flows
            .by_client
            .lock()
            .expect("flows lock")
            .get(&client)
            .cloned();
        let flow = match existing {
            Some(f) => f,
            None => match open_flow(&socket, &flows, client, service, &backends, idle).await {
                Some(f) => f,
                None => continue, // no endpoint: drop, there is nobody to answer
            },
        };
        flows.touch(&flow);
        if let Err(e) = flow.upstream.send(&buf[..len]).await {
            tracing::debug!(service, %client, error = %e, "udp send to endpoint failed");
        }
    }
}

async fn open_flow(
    listener: &Arc<UdpSocket>,
    flows: &Arc<Flows>,
    client: SocketAddr,
    service: u32,
    backends: &Arc<Backends>,
    idle: Duration,
) -> Option<Arc<Flow>> {
    let svc = backends.get(service)?;
    let choice = svc.choose(client)?;
    let local: SocketAddr = if choice.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service = %svc.name, error = %e, "cannot open udp flow socket");
            svc.closed(choice);
            return None;
        }
    };
    if let Err(e) = upstream.connect(choice.addr).await {
        tracing::debug!(service = %svc.name, endpoint = %choice.addr, error = %e, "udp connect failed");
        svc.closed(choice);
        return None;
    }
    let flow = Arc::new(Flow {
        upstream,
        last_active: AtomicU64::new(flows.now_ms()),
    });
    flows
        .by_client
        .lock()
        .expect("flows lock")
        .insert(client, flow.clone());
    tokio::spawn(relay_replies(
        listener.clone(),
        flow.clone(),
        flows.clone(),
        client,
        idle,
        svc,
        choice,
    ));
    Some(flow)
}

/// Copies replies from the endpoint back to the client until the flow has
/// been idle for `idle`, then forgets it.
async fn relay_replies(
    listener: Arc<UdpSocket>,
    flow: Arc<Flow>,
    flows: Arc<Flows>,
    client: SocketAddr,
    idle: Duration,
    svc: Arc<ServiceBackends>,
    choice: crate::dataplane::userspace::backends::Choice,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle_ms = idle.as_millis() as u64;
    loop {
        let quiet = flows
            .now_ms()
            .saturating_sub(flow.last_active.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            break;
        }
        match tokio::time::timeout(
            Duration::from_millis(idle_ms - quiet),
            flow.upstream.recv(&mut buf),
        )
        .await
        {
            Ok(Ok(len)) => {
                flows.touch(&flow);
                if let Err(e) = listener.send_to(&buf[..len], client).await {
                    tracing::debug!(%client, error = %e, "udp reply failed");
                }
            }
            Ok(Err(e)) => {
                // ICMP unreachable from the endpoint and the like.
                tracing::debug!(%client, error = %e, "udp flow error");
                break;
            }
            Err(_) => {} // re-check: the client may have sent meanwhile
        }
    }
    flows.by_client.lock().expect("flows lock").remove(&client);
    svc.closed(choice);
}
