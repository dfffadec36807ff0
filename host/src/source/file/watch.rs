//! Wake-ups for the file source from inotify, so an idle directory of
//! thousands of files costs nothing between scans. inotify only says when
//! to scan: what changed is still decided by comparing metadata, and a
//! slow periodic rescan covers what inotify cannot see (the target of a
//! file symlink outside the tree, a queue overflow).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// An inotify instance watching directories for entries that change.
pub struct Watch {
    fd: OwnedFd,
}

const MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

impl Watch {
    /// `None` if inotify is unavailable (the source then polls).
    pub fn new() -> Option<Self> {
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "no inotify; polling the source directory");
            return None;
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Some(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches each directory (again: adding a watched one is a no-op).
    /// A directory that cannot be watched is still found by the rescan.
    pub fn add(&self, dirs: &[PathBuf]) {
        for dir in dirs {
            let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: valid descriptor and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), MASK) };
            if wd < 0 {
                tracing::debug!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "cannot watch directory");
            }
        }
    }

    /// Waits up to `timeout` for an event; drains the queue. True if
    /// anything happened.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        ready > 0 && self.drain()
    }

    /// Reads and discards every queued event; true if there were any.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let mut any = false;
        loop {
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }
}
