//! Network namespaces made by the tests themselves (`ip netns`), deleted
//! when the guard drops, even if the test failed.

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with loopback up. Requires root.
    pub fn new(prefix: &str) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "network-namespace tests need root (CAP_NET_ADMIN); run the suite as root"
        );
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs a shell command inside the namespace; panics if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = run(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in netns")
    }

    /// Runs `f` on a new thread that has entered the namespace, so its
    /// sockets live there.
    pub fn run_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.thread(f).join().expect("netns thread")
    }

    /// Like `run_in`, but the thread keeps running `f` in the background.
    pub fn background(&self, f: impl FnOnce() + Send + 'static) {
        self.thread(f);
    }

    fn thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
