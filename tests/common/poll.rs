//! The one way the tests wait: poll a check until it holds, with a
//! deadline, and fail naming what was awaited.
//!
//! `eventually("what", || check)` for the usual case; `until(timeout, ..)`
//! returns whether the check came true, for a caller whose failure message
//! needs what only it knows (a child's logs); the `_async` forms sleep
//! without blocking a tokio runtime.

use std::time::{Duration, Instant};

/// How long `eventually` waits: a proxy syncs in well under a second, but
/// the machine may be loaded.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// How often a check runs.
const EVERY: Duration = Duration::from_millis(100);

/// Polls `check` until it holds (true) or `timeout` has passed (false).
pub fn until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(EVERY);
    }
}

/// `until` for an async check, sleeping on the runtime.
pub async fn until_async(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(EVERY / 2).await;
    }
}

/// Waits until `check` holds, for up to `PATIENCE`.
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, PATIENCE, check)
}

/// Waits until `check` holds, for up to `timeout`.
pub fn eventually_within(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    assert!(
        until(timeout, check),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// `eventually_within` for an async check.
pub async fn eventually_async(what: &str, timeout: Duration, check: impl AsyncFnMut() -> bool) {
    assert!(
        until_async(timeout, check).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}
