//! Running the kernel tools (`nft`, `iptables-restore`, `iptables-save`,
//! `conntrack`) with a deadline. A tool that hangs (a stuck lock, a
//! wedged netlink socket, a broken wrapper) used to hold the sync loop
//! forever: the node kept its old rules and nothing said why. Now it is
//! killed at the deadline, the call fails with an error saying so, and the
//! sync counts as failed and is retried with the usual backoff (health
//! then reflects it as for any failed sync).
//!
//! The deadline scales with the work: a base (30 s) plus an allowance per
//! line of input (250 µs), so a full transaction of a large table on a
//! slow or loaded node is not killed for its size (a fixed 30 s killed
//! every attempt of a 10k-Service transaction under emulation, and the
//! node never converged). A tool killed at its deadline gets twice as
//! long on its next call, up to 8 times, and back to 1x once a call of it
//! finishes: what a small input costs can depend on the table already in
//! the kernel (nft reads it first), which the input does not show. Both
//! numbers are flags (`--kernel-tool-timeout`, `--kernel-tool-timeout-per-line`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, Result};

/// A tool's deadline: `base` plus `per_line` for each line of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scaling {
    pub base: Duration,
    pub per_line: Duration,
}

impl Default for Scaling {
    /// A full reconcile of 10,000 Services (about 200,000 lines) takes
    /// `nft` about a second natively (5 µs a line): the allowance is 50
    /// times that, the base far beyond any healthy small call and within
    /// upstream's default `syncPeriod`.
    fn default() -> Self {
        Scaling {
            base: Duration::from_secs(30),
            per_line: Duration::from_micros(250),
        }
    }
}

/// How many times a tool's deadline may double after kills in a row.
pub const MAX_DOUBLINGS: u32 = 3;

impl Scaling {
    /// The deadline for `lines` lines of input after `killed_in_a_row`
    /// calls of the same tool were killed at theirs.
    pub fn deadline(&self, lines: usize, killed_in_a_row: u32) -> Duration {
        let lines = u32::try_from(lines).unwrap_or(u32::MAX);
        self.base
            .saturating_add(self.per_line.saturating_mul(lines))
            .saturating_mul(1 << killed_in_a_row.min(MAX_DOUBLINGS))
    }
}

/// Which deadline a call runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// The one configured at start-up ([`configure`]).
    Configured,
    /// This one (tests).
    Given(Scaling),
}

/// The configured deadline: what every tool of the host runs under.
pub const DEADLINE: Deadline = Deadline::Configured;

impl From<Duration> for Deadline {
    /// A fixed deadline, whatever the input.
    fn from(base: Duration) -> Self {
        Deadline::Given(Scaling {
            base,
            per_line: Duration::ZERO,
        })
    }
}

static CONFIGURED: Mutex<Option<Scaling>> = Mutex::new(None);
/// Per program: how many of its calls in a row were killed at the deadline.
static KILLED_IN_A_ROW: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

impl Scaling {
    /// From `--kernel-tool-timeout` and `--kernel-tool-timeout-per-line`,
    /// defaults for what is not given.
    pub fn from_flags(base: Option<Duration>, per_line: Option<Duration>) -> Result<Self> {
        let d = Scaling::default();
        if base == Some(Duration::ZERO) {
            anyhow::bail!(
                "--kernel-tool-timeout: must be greater than 0 (every nft and iptables-restore call would be killed)"
            );
        }
        Ok(Scaling {
            base: base.unwrap_or(d.base),
            per_line: per_line.unwrap_or(d.per_line),
        })
    }
}

/// Sets the deadline every tool runs under (start-up, from the flags).
pub fn configure(scaling: Scaling) {
    *CONFIGURED.lock().unwrap_or_else(|e| e.into_inner()) = Some(scaling);
}

fn configured() -> Scaling {
    CONFIGURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default()
}

fn killed_in_a_row(program: &str, update: impl FnOnce(u32) -> u32) -> u32 {
    let mut map = KILLED_IN_A_ROW.lock().unwrap_or_else(|e| e.into_inner());
    let n = map.entry(program.to_string()).or_default();
    let before = *n;
    *n = update(before);
    before
}

fn lines(input: Option<&[u8]>) -> usize {
    input.map_or(0, |b| {
        b.iter().filter(|c| **c == b'\n').count()
            + usize::from(b.last().is_some_and(|c| *c != b'\n'))
    })
}

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

/// Whether `program` is an executable file on PATH (or at that path).
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(program))))
}

/// What a finished tool left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `program ARGS`, writing `input` to its standard input, and waits
/// at most its `deadline` for that input. Past it the tool (and anything
/// it started: it runs in a process group of its own) is killed and the
/// call fails.
pub fn run(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    deadline: impl Into<Deadline>,
) -> Result<Finished> {
    run_owned(program, args, input.map(<[u8]>::to_vec), deadline)
}

/// [`run`] handed its input, which the writing thread takes over: a full
/// nftables reconcile's text (tens of MB at 50k Services) is not copied.
pub fn run_owned(
    program: &str,
    args: &[&str],
    input: Option<Vec<u8>>,
    deadline: impl Into<Deadline>,
) -> Result<Finished> {
    let scaling = match deadline.into() {
        Deadline::Configured => configured(),
        Deadline::Given(s) => s,
    };
    let lines = lines(input.as_deref());
    let doublings = killed_in_a_row(program, |n| n).min(MAX_DOUBLINGS);
    let deadline = scaling.deadline(lines, doublings);
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
        Ok(status) => {
            killed_in_a_row(program, |_| 0);
            status.with_context(|| format!("waiting for {program}"))?
        }
        Err(_) => {
            killed_in_a_row(program, |n| n.saturating_add(1));
            // The whole group: a wrapper's `sleep` would keep the pipes open.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = done.recv_timeout(Duration::from_secs(5));
            tracing::error!(
                program,
                ?deadline,
                lines,
                doublings,
                "killed a kernel tool that did not finish in time; its next call gets twice as long"
            );
            let doubled = match doublings {
                0 => String::new(),
                n => format!(", doubled {n} time(s) after earlier kills"),
            };
            return Err(Unavailable(format!(
                "{program} did not finish within its deadline of {deadline:?} ({:?} plus {:?} for each of {lines} input lines{doubled}) and was killed",
                scaling.base, scaling.per_line
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
            format!("{err:#}").contains("did not finish within its deadline of 300ms"),
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

    fn script(dir: &std::path::Path, body: &str) -> String {
        let path = dir.join("tool");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn the_deadline_is_a_base_plus_a_share_per_line_doubled_after_kills() {
        let s = Scaling::default();
        assert_eq!(s.deadline(0, 0), Duration::from_secs(30));
        // A full transaction of 10k Services: about 200,000 lines.
        assert_eq!(s.deadline(200_000, 0), Duration::from_secs(80));
        assert_eq!(s.deadline(0, 1), Duration::from_secs(60));
        assert_eq!(s.deadline(0, 3), Duration::from_secs(240));
        assert_eq!(s.deadline(0, 50), Duration::from_secs(240), "at most 8x");
        let huge = Scaling {
            base: Duration::MAX,
            per_line: Duration::from_secs(1),
        };
        assert_eq!(huge.deadline(10, 3), Duration::MAX, "saturates");
        assert!(s.deadline(usize::MAX, 50) > Duration::from_secs(8_000_000));
        assert_eq!(lines(None), 0);
        assert_eq!(lines(Some(b"")), 0);
        assert_eq!(lines(Some(b"a\nb")), 2);
        assert_eq!(lines(Some(b"a\nb\n")), 2);
        assert_eq!(
            Scaling::from_flags(Some(Duration::from_secs(5)), None).unwrap(),
            Scaling {
                base: Duration::from_secs(5),
                per_line: Duration::from_micros(250)
            }
        );
        let err = Scaling::from_flags(Some(Duration::ZERO), None).unwrap_err();
        assert!(format!("{err}").contains("--kernel-tool-timeout"), "{err}");
    }

    /// A tool whose work grows with its input (reading it line by line,
    /// as nft parses a script) finishes under a base far below what the
    /// whole input costs: the allowance per line carries it. A hung one
    /// is still killed, at base + lines x per_line; its next call gets
    /// twice that, and once a call of it finishes, 1x again.
    #[test]
    fn a_large_input_gets_a_longer_deadline_and_a_killed_tool_a_doubled_one() {
        let dir = tempfile::tempdir().unwrap();
        let hang = dir.path().join("hang");
        let tool = script(
            dir.path(),
            &format!(
                "n=$(wc -l)\nsleep $(awk \"BEGIN {{ print $n / 1000 }}\")\n[ -e {} ] && sleep 60\nexit 0",
                hang.display()
            ),
        );
        let scaling = Scaling {
            base: Duration::from_millis(20),
            per_line: Duration::from_millis(2),
        };
        let input = "add table ip t\n".repeat(400);
        // 1 ms a line: 400 ms, well past the base of 20 ms.
        let started = std::time::Instant::now();
        let out = run(&tool, &[], Some(input.as_bytes()), Deadline::Given(scaling))
            .expect("a tool given time for its input is not killed");
        assert!(out.status.success());
        assert!(
            started.elapsed() > scaling.base,
            "the tool took {:?}: it shows nothing",
            started.elapsed()
        );
        std::fs::write(&hang, "").unwrap();
        let killed_after = |expect: &str| {
            let started = std::time::Instant::now();
            let err =
                run(&tool, &[], Some(input.as_bytes()), Deadline::Given(scaling)).unwrap_err();
            let took = started.elapsed();
            assert!(is_unavailable(&err), "{err:?}");
            assert!(format!("{err:#}").contains(expect), "{err:#}");
            took
        };
        let first = killed_after("deadline of 820ms (20ms plus 2ms for each of 400 input lines)");
        let second = killed_after(
            "deadline of 1.64s (20ms plus 2ms for each of 400 input lines, doubled 1 time(s)",
        );
        assert!(first >= Duration::from_millis(820), "{first:?}");
        assert!(second >= Duration::from_millis(1640), "{second:?}");
        assert!(second < Duration::from_secs(10), "{second:?}");
        // A call that finishes resets the doubling.
        std::fs::remove_file(&hang).unwrap();
        run(&tool, &[], Some(input.as_bytes()), Deadline::Given(scaling)).unwrap();
        std::fs::write(&hang, "").unwrap();
        killed_after("deadline of 820ms (");
    }
}
