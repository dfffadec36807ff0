//! Network namespaces made by the tests themselves (`ip netns`), deleted
//! when the guard drops, even if the test failed.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        // Every test shares this process id: two tests using one tag would
        // delete each other's namespace.
        assert!(
            in_use().lock().unwrap().insert(name.clone()),
            "namespace {name} is already in use by another test: choose a unique tag"
        );
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

    /// Makes `127.0.0.1:port` of the calling process's namespace reachable
    /// at `127.0.0.1:port` inside this one (a plain TCP relay, one upstream
    /// connection per connection), as a node reaches its API server. A
    /// refused upstream closes the client's connection, so an outage upstream
    /// looks the same from inside. Stops accepting when dropped.
    pub fn forward_loopback(&self, port: u16) -> Forward {
        let listener = self
            .run_in(move || TcpListener::bind(("127.0.0.1", port)))
            .unwrap_or_else(|e| panic!("listening on 127.0.0.1:{port} in {}: {e}", self.name));
        Forward::serve(listener, SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// Makes `upstream` reachable at `127.0.0.1:port` of the calling process's
/// own namespace (the IPVS VM's guest reaches its host's API server this
/// way, QEMU's 10.0.2.2 standing for the host's loopback).
pub fn forward_here(port: u16, upstream: SocketAddr) -> Forward {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("listening on 127.0.0.1:{port}: {e}"));
    Forward::serve(listener, upstream)
}

/// A running `Netns::forward_loopback`.
#[derive(Default)]
pub struct Forward(Arc<ForwardState>);

#[derive(Default)]
struct ForwardState {
    stop: AtomicBool,
    cut: AtomicBool,
    /// Both ends of every relayed connection, to sever them on `cut`.
    live: Mutex<Vec<TcpStream>>,
}

impl Forward {
    /// Relays each connection `listener` accepts to `upstream`.
    fn serve(listener: TcpListener, upstream: SocketAddr) -> Self {
        listener.set_nonblocking(true).expect("nonblocking");
        let forward = Forward::default();
        let state = forward.0.clone();
        std::thread::spawn(move || {
            while !state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) if state.cut.load(Ordering::Relaxed) => drop(conn),
                    Ok((conn, _)) => {
                        let state = state.clone();
                        std::thread::spawn(move || relay(conn, upstream, &state));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        forward
    }

    /// A network partition: severs every relayed connection and refuses new
    /// ones until `restore`.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::Relaxed);
        for conn in self.0.live.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.0.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both ways between `inner` and `upstream` until both ends close.
fn relay(inner: TcpStream, upstream: SocketAddr, state: &ForwardState) {
    let Ok(outer) = TcpStream::connect(upstream) else {
        return; // dropping `inner` closes it: the client sees the outage
    };
    let _ = inner.set_nonblocking(false);
    let clones = (
        inner.try_clone(),
        outer.try_clone(),
        inner.try_clone(),
        outer.try_clone(),
    );
    let (Ok(inner2), Ok(outer2), Ok(inner3), Ok(outer3)) = clones else {
        return;
    };
    state.live.lock().unwrap().extend([inner3, outer3]);
    let up = std::thread::spawn(move || pipe(inner2, outer2));
    pipe(outer, inner);
    let _ = up.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        in_use().lock().unwrap().remove(&self.name);
    }
}

/// The names of this process's live namespaces.
fn in_use() -> &'static Mutex<std::collections::HashSet<String>> {
    static NAMES: std::sync::OnceLock<Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    NAMES.get_or_init(Default::default)
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

/// Runs `f` on a thread of its own in a fresh, unnamed network namespace
/// (`unshare`), which the programs it starts inherit; its result, once
/// the thread ends (and the namespace with it). Requires root.
pub fn in_private_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (a private network namespace)"
    );
    std::thread::spawn(|| {
        // SAFETY: unshare(2) of this thread's own network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        f()
    })
    .join()
    .expect("the thread in the private namespace")
}
