//! A small cluster made of network namespaces, built by the tests:
//!
//! ```text
//!   client (203.0.113.2) ──veth── node (203.0.113.1, runs the proxy)
//!                                  │ br0 10.244.1.1/24
//!                                  ├── pod-a 10.244.1.11 (local)
//!                                  ├── pod-b 10.244.1.12 (local)
//!                                  │ veth 10.0.0.1 ── remote 10.0.0.2, br0 10.244.2.1/24
//!                                  │                   ├── pod-c 10.244.2.11
//!                                  │                   └── pod-d 10.244.2.12
//! ```
//!
//! Every pod runs a TCP and a UDP server on port 8080 answering
//! "<pod> <source address it saw>". Everything is deleted on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::netns::Netns;
use super::slots::{CLUSTERS, Slot};

pub const NODE_IP: &str = "203.0.113.1";
pub const CLIENT_IP: &str = "203.0.113.2";
pub const NODE_IP6: &str = "2001:db8:1::1";
pub const CLIENT_IP6: &str = "2001:db8:1::2";
pub const POD_PORT: u16 = 8080;

pub struct Pod {
    pub name: &'static str,
    pub ip: &'static str,
    pub ip6: String,
    pub local: bool,
    // Before `ns`: the servers stop first, so the namespace really goes.
    _servers: Servers,
    pub ns: Netns,
}

pub struct Cluster {
    pub node: Netns,
    pub remote: Netns,
    pub client: Netns,
    pub pods: Vec<Pod>,
    // Last: released once everything above is gone.
    _slot: Slot,
}

const PODS: &[(&str, &str, bool)] = &[
    ("pod-a", "10.244.1.11", true),
    ("pod-b", "10.244.1.12", true),
    ("pod-c", "10.244.2.11", false),
    ("pod-d", "10.244.2.12", false),
];

impl Cluster {
    pub fn new(tag: &str) -> Self {
        let slot = CLUSTERS.take();
        let node = Netns::new(&format!("kwp-{tag}-node"));
        let remote = Netns::new(&format!("kwp-{tag}-rem"));
        let client = Netns::new(&format!("kwp-{tag}-cli"));
        for ns in [&node, &remote, &client] {
            // Addresses usable at once: no duplicate address detection.
            ns.sh("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.forwarding=1");
        }
        for ns in [&node, &remote] {
            // No ICMP redirects: a pod told to reach a hairpinned service
            // "directly" would bypass the node, as CNI bridges also avoid.
            ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0 && ip link add br0 type bridge && ip link set br0 up");
        }
        node.sh(
            "ip addr add 10.244.1.1/24 dev br0 && ip -6 addr add fd00:10:244:1::1/64 dev br0 nodad",
        );
        remote.sh(
            "ip addr add 10.244.2.1/24 dev br0 && ip -6 addr add fd00:10:244:2::1/64 dev br0 nodad",
        );
        link(&node, "eth-cli", &client, "eth0");
        // A default route, as every real node has: service IPs are not local.
        node.sh(&format!("ip addr add {NODE_IP}/24 dev eth-cli && ip link set eth-cli up && ip route add default via {CLIENT_IP}"));
        client.sh(&format!("ip addr add {CLIENT_IP}/24 dev eth0 && ip link set eth0 up && ip route add default via {NODE_IP}"));
        node.sh(&format!("ip -6 addr add {NODE_IP6}/64 dev eth-cli nodad && ip -6 route add default via {CLIENT_IP6}"));
        client.sh(&format!("ip -6 addr add {CLIENT_IP6}/64 dev eth0 nodad && ip -6 route add default via {NODE_IP6}"));
        link(&node, "eth-rem", &remote, "eth-node");
        node.sh("ip addr add 10.0.0.1/24 dev eth-rem && ip link set eth-rem up && ip route add 10.244.2.0/24 via 10.0.0.2");
        remote.sh("ip addr add 10.0.0.2/24 dev eth-node && ip link set eth-node up && ip route add default via 10.0.0.1");
        node.sh("ip -6 addr add fd00:0:0:1::1/64 dev eth-rem nodad && ip -6 route add fd00:10:244:2::/64 via fd00:0:0:1::2");
        remote.sh("ip -6 addr add fd00:0:0:1::2/64 dev eth-node nodad && ip -6 route add default via fd00:0:0:1::1");

        let mut pods = Vec::new();
        for (i, (name, ip, local)) in PODS.iter().enumerate() {
            let ns = Netns::new(&format!("kwp-{tag}-p{i}"));
            let host = if *local { &node } else { &remote };
            let gw = if *local { "10.244.1.1" } else { "10.244.2.1" };
            let port = format!("veth-p{i}");
            link(host, &port, &ns, "eth0");
            // Hairpin mode, as CNI bridges set it: a pod reaching its own
            // Service may be sent back out the port it came in on.
            host.sh(&format!("ip link set {port} master br0 && ip link set {port} type bridge_slave hairpin on && ip link set {port} up"));
            ns.sh(&format!("ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via {gw}"));
            // fd00:10:244:<node>::<host>, mirroring the IPv4 address.
            let octets: Vec<&str> = ip.split('.').collect();
            let ip6 = format!("fd00:10:244:{}::{}", octets[2], octets[3]);
            ns.sh(&format!("ip -6 addr add {ip6}/64 dev eth0 nodad && ip -6 route add default via fd00:10:244:{}::1", octets[2]));
            pods.push(Pod {
                name,
                ip,
                ip6,
                local: *local,
                _servers: serve(&ns, name),
                ns,
            });
        }
        Cluster {
            node,
            remote,
            client,
            pods,
            _slot: slot,
        }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod")
    }

    /// Node YAML for the proxy's file source (name node-1, InternalIP).
    pub fn node_yaml() -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {{topology.kubernetes.io/zone: zone-a}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {NODE_IP}}}\n  - {{type: InternalIP, address: '{NODE_IP6}'}}\n"
        )
    }
}

/// A veth pair between two namespaces.
fn link(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.sh(&format!(
        "ip link add {a_name} type veth peer name {b_name} netns {}",
        b.name
    ));
}

/// A pod's servers, stopped when dropped: an open socket keeps its
/// namespace alive, and every test shares this process.
struct Servers {
    stop: Arc<AtomicBool>,
    /// Handles on the servers' sockets, to wake their blocked calls.
    sockets: Vec<socket2::Socket>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// TCP and UDP servers answering "<name> <peer ip>", on IPv4 and IPv6.
fn serve(ns: &Netns, name: &'static str) -> Servers {
    let (tcp6, tcp4, udp) = ns.run_in(|| {
        let tcp6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("socket");
        tcp6.set_only_v6(true).expect("v6only");
        tcp6.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, POD_PORT)).into())
            .expect("pod tcp6 bind");
        tcp6.listen(128).expect("listen");
        let tcp4 = TcpListener::bind(("0.0.0.0", POD_PORT)).expect("pod tcp bind");
        let udp = UdpSocket::bind(("0.0.0.0", POD_PORT)).expect("pod udp bind");
        (TcpListener::from(tcp6), tcp4, udp)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let handle = |fd: std::os::fd::BorrowedFd| {
        socket2::Socket::from(fd.try_clone_to_owned().expect("dup a pod socket"))
    };
    let sockets = vec![
        handle(tcp6.as_fd()),
        handle(tcp4.as_fd()),
        handle(udp.as_fd()),
    ];
    for listener in [tcp6, tcp4] {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || answer(conn, name));
                }
            }
        });
    }
    let udp_stop = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            if udp_stop.load(Ordering::Relaxed) {
                break;
            }
            let _ = udp.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
        }
    });
    Servers { stop, sockets }
}

/// Reads the request and answers "<name> <peer ip>".
fn answer(mut conn: TcpStream, name: &str) {
    let peer = conn
        .peer_addr()
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    let mut buf = [0u8; 64];
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.read(&mut buf);
    let _ = conn.write_all(format!("{name} {peer}").as_bytes());
}

/// What happened to one connection attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// (pod, source address the pod saw)
    Answered(String, String),
    Refused,
    TimedOut,
    Other(String),
}

/// One TCP request from namespace `from` to `addr`.
pub fn tcp_from(from: &Netns, addr: SocketAddr) -> Outcome {
    from.run_in(move || tcp_here(addr))
}

/// One TCP request from namespace `from`, from source address `src`.
pub fn tcp_from_source(from: &Netns, src: std::net::IpAddr, addr: SocketAddr) -> Outcome {
    from.run_in(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .expect("bind source");
        match socket.connect_timeout(&addr.into(), Duration::from_millis(1500)) {
            Ok(()) => exchange(socket.into()),
            Err(e) => connect_error(e),
        }
    })
}

fn connect_error(e: std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::TimedOut,
        _ => Outcome::Other(e.to_string()),
    }
}

/// One TCP request from the calling thread's namespace.
pub fn tcp_here(addr: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) {
        Ok(conn) => exchange(conn),
        Err(e) => connect_error(e),
    }
}

/// Sends a request on a connected stream and reads the pod's answer.
fn exchange(mut conn: TcpStream) -> Outcome {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if let Err(e) = conn.write_all(b"who\n") {
        return Outcome::Other(e.to_string());
    }
    let mut out = String::new();
    match conn.read_to_string(&mut out) {
        Ok(_) => parse(&out),
        Err(e) => Outcome::Other(e.to_string()),
    }
}

/// One UDP exchange from namespace `from` to `addr`.
pub fn udp_from(from: &Netns, addr: SocketAddr) -> Outcome {
    from.run_in(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        if let Err(e) = socket.send_to(b"who", addr) {
            return Outcome::Other(e.to_string());
        }
        let mut buf = [0u8; 512];
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => parse(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(_) => Outcome::TimedOut,
        }
    })
}

fn parse(reply: &str) -> Outcome {
    match reply.split_once(' ') {
        Some((pod, src)) => Outcome::Answered(pod.into(), src.into()),
        None => Outcome::Other(format!("unexpected reply {reply:?}")),
    }
}

/// A client connecting to `addr` back to back from a namespace until
/// stopped, recording every failure.
pub struct ContinuousClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<Outcome>)>,
}

impl ContinuousClient {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        Self::start_every(ns, addr, Duration::from_millis(1))
    }

    /// At most one connection every `gap` (an emulated CPU needs slack).
    pub fn start_every(ns: &Netns, addr: SocketAddr, gap: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/run/netns/{}", ns.name);
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(path).expect("open netns");
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
                0
            );
            let (mut ok, mut failed) = (0, Vec::new());
            // At most one connection a millisecond: unpaced, a run of tens of
            // seconds wraps the 28k ephemeral ports, and a reused 4-tuple that
            // meets its own TIME_WAIT or conntrack entry loses a SYN now and
            // then with no proxy involved. A gap in the rules of even a few
            // milliseconds still fails connections.
            let mut next = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                next += gap;
                std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
                match tcp_here(addr) {
                    Outcome::Answered(..) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        });
        Self { stop, thread }
    }

    /// Stops it: (successful connections, failures).
    pub fn stop(self) -> (usize, Vec<Outcome>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("client thread")
    }
}
