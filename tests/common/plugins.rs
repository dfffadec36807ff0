//! Policy plugins for the reload tests: bundled builds by name, installing
//! a build into a plugin directory as an operator would, and telling
//! which policy answers (round-robin strictly cycles over three backends).
//! Used by tests/reload.rs and tests/plugin_faults.rs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::{ask, poll};

pub fn bundled(name: &str) -> Vec<u8> {
    kwp_plugins_bundle::bundled()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.to_vec())
        .expect("bundled plugin")
}

/// Replaces `dir/name.wasm` atomically, as an operator's `mv` would.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

/// Who answers `n` requests to `addr`, in order.
pub async fn answers(addr: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(ask(addr).await.expect("request"));
    }
    v
}

/// Round-robin over three backends: no two of any three answers alike.
pub fn strictly_cycles(v: &[String]) -> bool {
    v.windows(3)
        .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2])
}

pub async fn wait_for(what: &str, check: impl Fn() -> bool) {
    poll::eventually_async(what, Duration::from_secs(10), async || check()).await;
}

/// A client asking `addr` back to back on the runtime until stopped,
/// counting answered and failed requests.
pub struct AskLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl AskLoop {
    pub fn start(addr: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match ask(addr).await {
                        Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Stops it: (answered, failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("client task");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
