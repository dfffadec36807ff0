//! Probation of a hot-reloaded plugin version: for a while after the swap
//! its failures are counted, and too many roll it back to the version it
//! replaced (whose digest is then quarantined).

use std::time::{Duration, Instant};

use wasmtime::component::Component;

use super::{PluginDigest, Runtime};

/// How long a reloaded plugin is watched, and how many failures (traps,
/// deadline or memory hits, bad answers, refused rules) in that time roll
/// it back.
pub const PROBATION: Duration = Duration::from_secs(120);
pub const PROBATION_FAILURES: u32 = 3;

pub struct Probation {
    /// The version to go back to.
    pub previous: Component,
    /// The reloaded version's digest, quarantined on rollback.
    pub digest: PluginDigest,
    pub failures: u32,
    until: Instant,
}

impl Probation {
    pub fn new(previous: Component, digest: PluginDigest) -> Self {
        Self {
            previous,
            digest,
            failures: 0,
            until: Instant::now() + PROBATION,
        }
    }

    pub fn is_over(&self) -> bool {
        Instant::now() > self.until
    }

    /// Counts `n` failures; true once there are too many.
    pub fn fail(&mut self, n: u32) -> bool {
        self.failures += n;
        self.failures >= PROBATION_FAILURES
    }

    /// Records that this version was rolled back: quarantined, counted and
    /// logged the same way for every kind of plugin.
    pub fn rolled_back(&self, runtime: &Runtime, plugin: &str, first_sync: bool) {
        runtime.quarantine(self.digest);
        runtime
            .reloads
            .rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(
            plugin,
            digest = %self.digest,
            failures = self.failures,
            first_sync,
            "reloaded plugin failed; rolled back to the previous version and quarantined it"
        );
    }
}
