//! The bounded-frequency sync loop (upstream's BoundedFrequencyRunner):
//! changes are batched, no two syncs run closer than minSyncPeriod, and a
//! full resync runs at least every syncPeriod.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::proxier::Proxier;
use crate::source::SourceEvent;
use crate::state::ClusterState;

pub struct SyncLoop {
    pub state: ClusterState,
    pub proxier: Proxier,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
}

impl SyncLoop {
    /// Runs until the source closes its channel.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) {
        let mut last_sync: Option<Instant> = None;
        let mut pending = false;
        loop {
            let now = Instant::now();
            let earliest = last_sync.map_or(now, |t| t + self.min_sync_period);
            let periodic = last_sync.map_or(now, |t| t + self.sync_period);
            let wake = if pending { earliest.min(periodic) } else { periodic };
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        self.apply(event);
                        pending = true;
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake), if last_sync.is_some() || pending => {
                    let periodic_due = Instant::now() >= periodic && last_sync.is_some();
                    self.sync();
                    if periodic_due {
                        let _ = self.proxier.resync();
                    }
                    last_sync = Some(Instant::now());
                    pending = false;
                }
            }
        }
    }

    fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Full { services, slices, node } => self.state.replace_all(&services, &slices, node.as_ref()),
        }
    }

    /// One sync: whatever changed (possibly nothing; the proxier then only
    /// retries earlier failures).
    pub fn sync(&mut self) {
        let changes = self.state.take_changes();
        let (updated, removed) = (changes.updated.len(), changes.removed.len());
        if let Err(e) = self.proxier.sync(changes, &self.state) {
            tracing::error!(error = format!("{e:#}"), "sync failed; will retry");
        }
        if updated + removed > 0 {
            tracing::debug!(updated, removed, took = ?self.proxier.stats.last_duration, "synced");
        }
    }
}
