//! UDP forwarding: one flow per client address, each with its own socket
//! connected to the chosen endpoint, closed after an idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::proxier::backends::{Backends, Choice};

const MAX_DATAGRAM: usize = 65_535;

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>;

pub async fn serve(socket: UdpSocket, service: u32, backends: Arc<Backends>, idle: Duration) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(service, error = %e, "udp recv failed");
                continue;
            }
        };
        let existing = flows.lock().expect("flows lock").get(&client).cloned();
        let upstream = match existing {
            Some(u) => u,
            None => match open_flow(&socket, &flows, client, service, &backends, idle).await {
                Some(u) => u,
                None => continue, // no endpoint: drop, as there is nobody to answer
            },
        };
        if let Err(e) = upstream.send(&buf[..len]).await {
            tracing::debug!(service, %client, error = %e, "udp send to endpoint failed");
        }
    }
}

async fn open_flow(
    listener: &Arc<UdpSocket>,
    flows: &Flows,
    client: SocketAddr,
    service: u32,
    backends: &Arc<Backends>,
    idle: Duration,
) -> Option<Arc<UdpSocket>> {
    let svc = backends.get(service)?;
    let choice = svc.choose(client)?;
    let local: SocketAddr = if choice.addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
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
    let upstream = Arc::new(upstream);
    flows.lock().expect("flows lock").insert(client, upstream.clone());
    tokio::spawn(relay_replies(listener.clone(), upstream.clone(), flows.clone(), client, idle, move |c: Choice| svc.closed(c), choice));
    Some(upstream)
}

/// Copies replies from the endpoint back to the client until the flow has
/// been idle for `idle`.
async fn relay_replies(
    listener: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    flows: Flows,
    client: SocketAddr,
    idle: Duration,
    closed: impl FnOnce(Choice),
    choice: Choice,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(Ok(len)) = tokio::time::timeout(idle, upstream.recv(&mut buf)).await {
        if let Err(e) = listener.send_to(&buf[..len], client).await {
            tracing::debug!(%client, error = %e, "udp reply failed");
        }
    }
    flows.lock().expect("flows lock").remove(&client);
    closed(choice);
}
