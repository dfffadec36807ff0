//! A real connection through a virtual server: a "pod" in its own network
//! namespace behind a veth pair, a listener there, and a client on the
//! node connecting to the virtual address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::dataplane::ipvs::netlink::{Attrs, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, Socket};

const RTM_NEWLINK: u16 = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

fn sh(cmd: &str) -> Result<()> {
    let ok = Command::new("/bin/sh")
        .args(["-c", cmd])
        .status()?
        .success();
    ensure!(ok, "{cmd} failed");
    Ok(())
}

/// `veth-node` here, its peer `veth-pod` in the namespace of `ns_fd`.
fn veth(ns_fd: i32) -> Result<()> {
    let mut peer = vec![0u8; 16]; // struct ifinfomsg
    let mut pa = Attrs::default();
    pa.str(IFLA_IFNAME, "veth-pod")
        .u32(IFLA_NET_NS_FD, ns_fd as u32);
    peer.extend_from_slice(&pa.0);
    let mut data = Attrs::default();
    data.put(VETH_INFO_PEER | 0x8000, &peer);
    let mut info = Attrs::default();
    info.str(IFLA_INFO_KIND, "veth")
        .nested(IFLA_INFO_DATA, data);
    let mut a = Attrs::default();
    a.str(IFLA_IFNAME, "veth-node").nested(IFLA_LINKINFO, info);
    let mut msg = vec![0u8; 16];
    msg.extend_from_slice(&a.0);
    Socket::open(libc::NETLINK_ROUTE)?
        .request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &msg)
        .context("creating the veth pair")?;
    Ok(())
}

/// Starts the pod; returns once it listens on 10.244.9.2:8080 and answers
/// each connection with "pod".
pub fn start_pod() -> Result<()> {
    let (tx, rx) = mpsc::channel::<Result<i32, String>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (up_tx, up_rx) = mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error().to_string()));
            return;
        }
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(Ok(unsafe { libc::gettid() }));
        let _ = go_rx.recv();
        // Children of this thread start in its namespace.
        let setup = sh("ip link set lo up && ip addr add 10.244.9.2/24 dev veth-pod && ip link set veth-pod up")
            .and_then(|()| Ok(TcpListener::bind("10.244.9.2:8080")?));
        let listener = match setup {
            Ok(l) => l,
            Err(e) => {
                let _ = up_tx.send(Err(format!("{e:#}")));
                return;
            }
        };
        let _ = up_tx.send(Ok(()));
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"pod");
        }
    });
    let tid = rx.recv()?.map_err(anyhow::Error::msg)?;
    let ns = std::fs::File::open(format!("/proc/self/task/{tid}/ns/net"))?;
    veth(ns.as_raw_fd())?;
    sh("ip addr add 10.244.9.1/24 dev veth-node && ip link set veth-node up")?;
    go_tx.send(())?;
    up_rx.recv()?.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Connects from the node's veth address to `vip` and reads the answer.
pub fn connect(vip: SocketAddr) -> Result<String> {
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    ensure!(sock >= 0, "socket");
    // SAFETY: sock is a fresh, valid descriptor.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    let local = socket2_addr("10.244.9.1:0".parse()?);
    // SAFETY: local is a valid sockaddr_in of the size given.
    let rc = unsafe { libc::bind(sock, (&local as *const libc::sockaddr_in).cast(), 16) };
    ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
    let remote = socket2_addr(vip);
    // SAFETY: as above.
    let rc = unsafe { libc::connect(sock, (&remote as *const libc::sockaddr_in).cast(), 16) };
    if rc != 0 {
        bail!("connect to {vip}: {}", std::io::Error::last_os_error());
    }
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn socket2_addr(a: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(a) = a else {
        unreachable!("IPv4 only")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}
