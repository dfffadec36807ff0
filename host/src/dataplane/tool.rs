//! Running the kernel tools (`nft`, `iptables-restore`, `iptables-save`,
//! `conntrack`) with a deadline. A tool that hangs (a stuck lock, a
//! wedged netlink socket, a broken wrapper) used to hold the sync loop
//! forever: the node kept its old rules and nothing said why. Now it is
//! killed at the deadline, the call fails with an error saying so, and the
//! sync counts as failed and is retried with the usual backoff (health
//! then reflects it as for any failed sync).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};

/// How long one tool invocation may take. A full reconcile of 10,000
/// Services takes `nft` about a second; thirty is far beyond any healthy
/// run and well within upstream's default `syncPeriod`.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The tool could not do its job at all: it is not installed (not on
/// PATH, not executable) or it was killed at the deadline. Unlike a
/// refusal of the rules it was given, trying the same changes one by one
/// cannot help (each would fail alike, or wait out the deadline again):
/// the sync as a whole fails and is retried. Check with [`is_unavailable`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

/// Whether `e` (or what it wraps) is [`Unavailable`].
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unavailable>().is_some()
}

impl Unavailable {
    /// For the tests' fake kernels.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

/// What a finished tool left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `program ARGS`, writing `input` to its standard input, and waits
/// at most `deadline`. Past it the tool (and anything it started: it runs
/// in a process group of its own) is killed and the call fails.
pub fn run(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    deadline: Duration,
) -> Result<Finished> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Unavailable(format!("running {program} (is it installed?): {e}")))?;
    let pid = child.id();
    // Writing and reading on threads of their own: a tool that stops
    // reading its input must not block us past the deadline either.
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        let bytes = bytes.to_vec();
        std::thread::spawn(move || stdin.write_all(&bytes));
    }
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = match done.recv_timeout(deadline) {
        Ok(status) => status.with_context(|| format!("waiting for {program}"))?,
        Err(_) => {
            // The whole group: a wrapper's `sleep` would keep the pipes open.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = done.recv_timeout(Duration::from_secs(5));
            tracing::error!(
                program,
                ?deadline,
                "killed a kernel tool that did not finish in time"
            );
            return Err(Unavailable(format!(
                "{program} did not finish within {deadline:?} and was killed"
            ))
            .into());
        }
    };
    // The tool exited; a child it left behind may still hold the pipes,
    // so reading them is bounded too.
    let collect =
        |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_nft_is_killed_at_the_deadline() {
        // A wrapper that hangs the way a stuck `nft` does, with a child of
        // its own holding the pipes.
        let dir = tempfile::tempdir().unwrap();
        let nft = dir.path().join("nft");
        std::fs::write(&nft, "#!/bin/sh\ncat >/dev/null\nsleep 60\n").unwrap();
        std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let started = std::time::Instant::now();
        let err = crate::dataplane::nftables::kernel::nft_program(
            nft.to_str().unwrap(),
            &["-f", "-"],
            &"add table ip t\n".repeat(20_000),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(
            format!("{err:#}").contains("did not finish within 300ms and was killed"),
            "{err:#}"
        );
        assert!(is_unavailable(&err), "a hung tool is unavailable: {err:?}");
        // So is one that is not there; its error says so.
        let err = crate::dataplane::nftables::kernel::nft_program(
            dir.path().join("missing").to_str().unwrap(),
            &["-f", "-"],
            "",
            DEADLINE,
        )
        .unwrap_err();
        assert!(is_unavailable(&err), "{err:?}");
        assert!(
            format!("{err:#}")
                .contains("running nft (is the nftables package installed?): running "),
            "{err:#}"
        );
        // A quick tool is untouched by the deadline, and its refusal is named.
        let err = run("sh", &["-c", "echo no >&2; exit 1"], None, DEADLINE).unwrap();
        assert_eq!((err.status.code(), err.stderr), (Some(1), b"no\n".to_vec()));
    }
}
