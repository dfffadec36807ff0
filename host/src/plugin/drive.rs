//! The calling model: every Wasm call is a future (wasmtime's async calls,
//! WASI's async bindings, as Spin runs components), and this module drives
//! that future to completion on the caller's own thread, with an executor
//! of its own and a deadline on the time the call spends waiting.
//!
//! Why not the alternatives, measured (docs/performance.md, issue 10):
//! - Sync calls with WASI's sync bindings re-enter tokio when a guest
//!   writes to stderr (a panic message): on a tokio worker that panics the
//!   host unless the call runs in `block_in_place`, which hands the
//!   worker's other tasks to another thread at every call; that cost
//!   ~40 us CPU per new userspace connection (113-120 against 74-76 us).
//! - Sync calls on a blocking pool would pay a thread handoff (two context
//!   switches) per call in the same place.
//! - Awaiting the call on the caller's tokio task would make `Policy` and
//!   `Mode`, and everything that holds them under a lock, async.
//!
//! Here a call costs one poll when the guest never waits (all of them, for
//! the plugins the project ships). A guest that does wait, on a WASI clock
//! or `poll`, parks this thread until the awaited timer fires or the call's
//! deadline passes, measured by the monotonic clock here: epoch
//! interruption only ever fires while Wasm code runs, so without this a
//! guest that sleeps would hold the caller for as long as it likes. The
//! overrun future is dropped, which unwinds the guest's stack (wasmtime
//! disposes of a suspended fiber), and the caller discards the instance.
//!
//! WASI's clocks are tokio timers. They are created and polled inside the
//! context of a one-thread runtime kept for them, so they fire whatever
//! thread the call is on: a test thread outside any runtime, or the only
//! thread of a current-thread runtime, which is busy here and could not
//! drive its own timers.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A call still waiting when its budget ran out.
#[derive(Debug)]
pub struct Overrun {
    pub waited: Duration,
}

/// Polls `call` on this thread until it is ready, or until it has been
/// pending past `budget` (counted from now), when it is dropped.
pub fn run<F: Future>(call: F, budget: Duration) -> Result<F::Output, Overrun> {
    let started = Instant::now();
    let _timers = timers().map(tokio::runtime::Handle::enter);
    let mut call = pin!(call);
    THIS_THREAD.with(|(wakeup, waker)| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(out) = call.as_mut().poll(&mut cx) {
                return Ok(out);
            }
            // Pending: the guest waits on something of WASI's. Sleep until
            // woken or out of budget.
            while !wakeup.woken.swap(false, Ordering::Acquire) {
                let waited = started.elapsed();
                match budget.checked_sub(waited) {
                    Some(left) if !left.is_zero() => std::thread::park_timeout(left),
                    _ => return Err(Overrun { waited }),
                }
            }
        }
    })
}

/// Wakes the thread that runs a call. The flag tells its wake from any
/// other unpark of the thread (and from spurious wakeups of `park`).
struct Wakeup {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

thread_local! {
    /// Made once per thread: a call allocates nothing for its waker.
    static THIS_THREAD: (Arc<Wakeup>, Waker) = {
        let wakeup = Arc::new(Wakeup {
            thread: std::thread::current(),
            woken: AtomicBool::new(false),
        });
        (wakeup.clone(), Waker::from(wakeup))
    };
}

/// The runtime whose one thread fires WASI's timers; started on first use
/// and kept for the life of the process (a tokio runtime must not be
/// dropped from async code, which a plugin runtime may be). `None` if its
/// thread cannot be started (logged): the caller's runtime, if it has one,
/// then serves the timers.
fn timers() -> Option<&'static tokio::runtime::Handle> {
    static TIMERS: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    TIMERS
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("kwp-wasi-timers")
                .enable_time()
                .build()
                .inspect_err(|e| {
                    tracing::error!(error = %e, "cannot start the thread for plugins' WASI timers")
                })
                .ok()
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_call_returns_its_value() {
        assert_eq!(run(async { 7 }, Duration::from_millis(1)).unwrap(), 7);
    }

    #[test]
    fn a_call_woken_by_a_timer_finishes_within_its_budget() {
        let started = Instant::now();
        let out = run(
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                "slept"
            },
            Duration::from_secs(5),
        );
        assert_eq!(out.unwrap(), "slept");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_call_pending_past_its_budget_is_dropped_promptly() {
        let started = Instant::now();
        let err = run(std::future::pending::<()>(), Duration::from_millis(30)).unwrap_err();
        assert!(err.waited >= Duration::from_millis(30), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
}
