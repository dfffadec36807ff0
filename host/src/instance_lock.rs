//! One rule-writing kube-wasm-proxy per node. Two instances would keep
//! replacing each other's kernel rules; the second must refuse to start.
//!
//! The lock is an abstract unix socket: it lives in the network namespace
//! (the kernel rules' scope too), needs no file that could go stale, and
//! the kernel releases it when the process dies, however it dies.

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

use anyhow::{Context, Result, bail};

/// The abstract socket name (shown as `@kube-wasm-proxy/node-rules`).
pub const NODE_RULES_LOCK: &str = "kube-wasm-proxy/node-rules";

/// Held for as long as the proxy runs; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _socket: UnixListener,
}

impl InstanceLock {
    /// Takes the lock `name`, or fails naming it when another process holds it.
    pub fn acquire(name: &str) -> Result<Self> {
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .with_context(|| format!("lock name @{name}"))?;
        match UnixListener::bind_addr(&addr) {
            Ok(socket) => Ok(Self { _socket: socket }),
            Err(e) if e.kind() == ErrorKind::AddrInUse => bail!(
                "another kube-wasm-proxy already programs this node's rules: the lock \
                 @{name} (an abstract unix socket in this network namespace) is held; \
                 stop the other instance first (`ss -xlp | grep {name}` shows it)"
            ),
            Err(e) => Err(e).with_context(|| format!("taking the lock @{name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let name = format!("kube-wasm-proxy/test-{}", std::process::id());
        let first = InstanceLock::acquire(&name).unwrap();
        let err = InstanceLock::acquire(&name).unwrap_err().to_string();
        assert!(
            err.contains(&format!("@{name}")) && err.contains("is held"),
            "{err}"
        );
        drop(first);
        InstanceLock::acquire(&name).expect("released when dropped");
    }
}
