//! Bounds on what tests may run at once in this process. Tests run on
//! parallel threads, and more heavy environments than two cores carry make
//! timing assertions flaky; a test needing one waits for a slot while
//! lighter tests run.

use std::sync::{Condvar, Mutex};

/// A number of slots, taken and given back.
pub struct Slots {
    taken: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// One slot of `Slots`, given back when dropped.
pub struct Slot(&'static Slots);

impl Slots {
    pub const fn new(max: usize) -> Self {
        Self {
            taken: Mutex::new(0),
            freed: Condvar::new(),
            max,
        }
    }

    /// Waits for a free slot and takes it.
    pub fn take(&'static self) -> Slot {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        while *taken >= self.max {
            taken = self.freed.wait(taken).unwrap_or_else(|e| e.into_inner());
        }
        *taken += 1;
        Slot(self)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.taken.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// Namespace clusters (7 namespaces, 12 pod servers and a proxy each).
pub static CLUSTERS: Slots = Slots::new(2);

/// Control planes (etcd and kube-apiserver each). A test takes a cluster
/// before a control plane, never the other way round, so the two bounds
/// cannot wait on each other.
pub static CONTROL_PLANES: Slots = Slots::new(2);
