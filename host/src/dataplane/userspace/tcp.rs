//! TCP forwarding: accept, choose an endpoint, copy both ways. EOF on one
//! side is passed on as a half-close (shutdown of the write side), so
//! request/response protocols that close their sending side still work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::dataplane::userspace::backends::Backends;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Endpoints tried per connection before giving up (upstream userspace
/// mode retried a few endpoints too).
const CONNECT_ATTEMPTS: usize = 3;

pub async fn serve(listener: TcpListener, service: u32, backends: Arc<Backends>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let _ = client.set_nodelay(true);
                tokio::spawn(forward(client, peer, service, backends.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn forward(mut client: TcpStream, peer: SocketAddr, service: u32, backends: Arc<Backends>) {
    let Some(svc) = backends.get(service) else {
        return reject(client);
    };
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(choice) = svc.choose(peer) else {
            break;
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(choice.addr)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                if let Err(e) = result {
                    tracing::debug!(service = %svc.name, endpoint = %choice.addr, error = %e, "connection ended with an error");
                }
                svc.closed(choice);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(service = %svc.name, endpoint = %choice.addr, error = %e, "connect failed")
            }
            Err(_) => {
                tracing::debug!(service = %svc.name, endpoint = %choice.addr, "connect timed out")
            }
        }
        svc.closed(choice);
    }
    reject(client)
}

/// No endpoint: reset the connection, as a kernel REJECT would.
fn reject(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}
