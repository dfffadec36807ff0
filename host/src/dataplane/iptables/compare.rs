//! The compare's reads, off the sync loop. Reading every chain's summary
//! is the whole cost of a compare (at 10k Services one netlink dump per
//! chain, ~60k of them: 9-26 s wall on a loaded 2-core machine, measured),
//! and it needs nothing of the dataplane's state, so a thread of its own
//! does it while the loop keeps applying changes. The loop finishes the
//! compare when the reads are in (`resync`, or a drift check polling):
//! chains its own deltas wrote or deleted since the reads began are not
//! compared (the read may have seen them before or after; the delta
//! learned them, or the next compare rewrites them), the rest is compared
//! and repaired as before. A full reconcile in between drops the compare;
//! its reads are then ignored.

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::kernel::{IptablesKernel, Summaries};
use super::{ChainKey, IptablesDataplane, TABLES};

/// Every table's summaries, as read, and what reading them cost.
pub struct Read {
    pub(super) tables: Vec<((bool, String), Result<Summaries>)>,
    /// Wall and CPU time of the reads (CPU: the reading thread's own).
    pub(super) took: (Duration, Duration),
}

/// Reads every table's summaries (on whichever thread calls it), each
/// table tried `tries` times.
pub(super) fn read_tables(kernel: &mut dyn IptablesKernel, tries: usize) -> Read {
    let (started, cpu) = (Instant::now(), thread_cpu());
    let read = |kernel: &mut dyn IptablesKernel, ipv6: bool, table: &str| {
        let mut tried = 1;
        loop {
            match kernel.summaries(ipv6, table) {
                Err(e) if tried < tries => {
                    tracing::debug!(error = format!("{e:#}"), table, "reading again");
                    std::thread::sleep(RETRY_PAUSE);
                    tried += 1;
                }
                read => return read,
            }
        }
    };
    let tables = TABLES
        .iter()
        .map(|(ipv6, table)| ((*ipv6, table.to_string()), read(kernel, *ipv6, table)))
        .collect();
    Read {
        tables,
        took: (started.elapsed(), thread_cpu().saturating_sub(cpu)),
    }
}

/// On its own thread a table's read is tried this often (our deltas'
/// commits beside it may interrupt its dumps), this far apart.
const THREAD_TRIES: usize = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Lowers the calling thread's priority (nice +10 of the process's), so
/// on a busy node the changes the loop applies get the CPU first; the
/// reads are in no hurry.
fn yield_to_the_loop() {
    // SAFETY: get/setpriority(2) of this thread's own id (on Linux each
    // thread has its own nice value).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (nice + 10).min(19));
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writing into a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Where the reads of a compare under way are done.
pub(super) enum Reads {
    /// On a thread of their own, answering once.
    Thread(Receiver<Read>),
    /// By whoever began the compare (on the loop where the kernel has
    /// no second handle; tests interleaving reads and deltas by hand).
    ByCaller,
}

/// A compare under way.
pub(super) struct Pending {
    /// The generation and our restore count when the reads began: if
    /// the generation moved by our restores alone, what is learned at the
    /// end is all there is.
    pub(super) generation: Option<u64>,
    pub(super) restores: u64,
    /// Chains our deltas wrote or deleted since the reads began.
    pub(super) touched: BTreeSet<ChainKey>,
    /// Every chain those deltas wrote was learned back.
    pub(super) learned: bool,
    pub(super) started: Instant,
    pub(super) reads: Reads,
}

/// What the last finished compare cost: from its start to its end (the
/// repair included), and its reads' wall and CPU time.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompareCost {
    pub wall: Duration,
    /// Of which on the loop: comparing what was read, and the repair.
    pub on_the_loop: Duration,
    pub read_wall: Duration,
    pub read_cpu: Duration,
}

impl IptablesDataplane {
    /// Starts a compare: its reads on a thread where the kernel gives a
    /// second handle (and `background_compare`), else by the caller.
    pub(super) fn begin_compare(&mut self, generation: Option<u64>) {
        let reader = if self.background_compare {
            self.kernel.reader()
        } else {
            None
        };
        let reads = match reader {
            Some(mut kernel) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let spawned = std::thread::Builder::new()
                    .name("kwp-ipt-compare".into())
                    // A full reconcile may have dropped the compare: the
                    // send then fails and the reads are ignored.
                    .spawn(move || {
                        yield_to_the_loop();
                        drop(tx.send(read_tables(&mut *kernel, THREAD_TRIES)))
                    });
                match spawned {
                    Ok(_) => Reads::Thread(rx),
                    Err(e) => {
                        tracing::warn!(error = %e, "no thread for the compare; reading inline");
                        Reads::ByCaller
                    }
                }
            }
            None => Reads::ByCaller,
        };
        self.compare = Some(Pending {
            generation,
            restores: self.restores,
            touched: BTreeSet::new(),
            learned: true,
            started: Instant::now(),
            reads,
        });
    }

    /// Finishes the compare under way if its thread's reads are in.
    pub(super) fn poll_compare(&mut self) -> Result<()> {
        let read = match self.compare.as_ref().map(|p| &p.reads) {
            None | Some(Reads::ByCaller) => return Ok(()),
            Some(Reads::Thread(rx)) => match rx.try_recv() {
                Ok(read) => read,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.compare = None;
                    return Err(anyhow!(
                        "the compare's reading thread ended without an answer"
                    ));
                }
            },
        };
        self.finish_compare(read)
    }

    /// Waits for the compare under way and finishes it (tests and
    /// measurements; the loop polls).
    pub fn await_compare(&mut self) -> Result<()> {
        let read = match self.compare.as_ref().map(|p| &p.reads) {
            None => return Ok(()),
            Some(Reads::ByCaller) => read_tables(&mut *self.kernel, 1),
            Some(Reads::Thread(rx)) => match rx.recv() {
                Ok(read) => read,
                Err(_) => {
                    self.compare = None;
                    return Err(anyhow!(
                        "the compare's reading thread ended without an answer"
                    ));
                }
            },
        };
        self.finish_compare(read)
    }

    /// Compares with the reads on the sync loop (`true`), as before they
    /// moved to a thread: for A/B measurements.
    pub fn compare_on_the_loop(&mut self, on_the_loop: bool) {
        self.background_compare = !on_the_loop;
    }

    /// Whether a compare is under way (its reads not yet in).
    pub fn comparing(&self) -> bool {
        self.compare.is_some()
    }

    /// A delta wrote or deleted `chains`: a compare under way leaves them
    /// alone; `learned`: the delta learned every chain it wrote.
    pub(super) fn touched(&mut self, chains: impl IntoIterator<Item = ChainKey>, learned: bool) {
        if let Some(pending) = &mut self.compare {
            pending.touched.extend(chains);
            pending.learned &= learned;
        }
    }
}
