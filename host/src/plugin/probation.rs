//! Probation of a hot-reloaded plugin version: for a while after the swap
//! its failures are counted, and too many roll it back to the version it
//! replaced (whose digest is then quarantined).

use std::time::{Duration, Instant};

use wasmtime::component::Component;

/// How long a reloaded plugin is watched, and how many failures (traps,
/// deadline or memory hits, bad answers, refused rules) in that time roll
/// it back.
pub const PROBATION: Duration = Duration::from_secs(120);
pub const PROBATION_FAILURES: u32 = 3;

pub struct Probation {
    /// The version to go back to.
    pub previous: Component,
    /// The reloaded version's digest, quarantined on rollback.
    pub digest: [u8; 32],
    pub failures: u32,
    until: Instant,
}

impl Probation {
    pub fn new(previous: Component, digest: [u8; 32]) -> Self {
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
}
