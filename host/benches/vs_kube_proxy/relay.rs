//! A TCP relay in front of the API server that counts what passes, so
//! each proxy's API traffic is measured where it enters the network (TLS
//! included), whatever its client library does inside the connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

#[derive(Default)]
pub struct Counts {
    /// Bytes from the proxy to the API server.
    pub sent: AtomicU64,
    /// Bytes from the API server to the proxy.
    pub received: AtomicU64,
    pub connections: AtomicU64,
}

impl Counts {
    pub fn take(&self) -> (u64, u64, u64) {
        (
            self.sent.swap(0, Ordering::Relaxed),
            self.received.swap(0, Ordering::Relaxed),
            self.connections.swap(0, Ordering::Relaxed),
        )
    }
}

/// Listens on a free loopback port and relays every connection to
/// `target`, counting into the returned counts. Runs until the process
/// ends (its threads block in accept and read).
pub fn start(target: SocketAddr) -> Result<(SocketAddr, Arc<Counts>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the API relay")?;
    let addr = listener.local_addr()?;
    let counts = Arc::new(Counts::default());
    let shared = counts.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            shared.connections.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            for (from, to, up) in [
                (client.try_clone(), server.try_clone(), true),
                (server.try_clone(), client.try_clone(), false),
            ] {
                let (Ok(from), Ok(to)) = (from, to) else {
                    continue;
                };
                let counts = shared.clone();
                std::thread::spawn(move || pipe(from, to, &counts, up));
            }
        }
    });
    Ok((addr, counts))
}

fn pipe(mut from: TcpStream, mut to: TcpStream, counts: &Counts, up: bool) {
    let mut buf = vec![0u8; 64 << 10];
    let counter = if up { &counts.sent } else { &counts.received };
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
