//! Userspace mode with CAP_NET_ADMIN, in a network namespace of its own:
//! traffic to the cluster IP reaches the listener through the nftables
//! redirect the host installs, and the redirect goes away with the Service
//! and with the process.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{service, slices, write};

const CLUSTER_IP: &str = "10.96.7.1";

/// A blocking backend in the namespace answering `name`.
fn start_backend(ns: &Netns, name: &'static str) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.background(move || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(listener.local_addr().unwrap()).unwrap();
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(name.as_bytes());
        }
    });
    rx.recv().unwrap()
}

/// One request to the cluster IP from inside the namespace.
fn ask_cluster_ip(ns: &Netns) -> Result<String, String> {
    ns.run_in(|| {
        let addr: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn.write_all(b"who\n").map_err(|e| e.to_string())?;
        let mut out = String::new();
        conn.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cluster_ip_traffic_is_redirected_to_the_listener() {
    let ns = Netns::new("kwp-us");
    // An address and a route for the service range, as a real node has.
    ns.sh("ip link add kwp0 type veth peer name kwp1 && ip addr add 10.0.0.2/24 dev kwp0 && ip link set kwp0 up && ip link set kwp1 up && ip route add 10.96.0.0/16 dev kwp0");
    let backend = start_backend(&ns, "redirected");
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "svc.yaml",
        &(service("web", CLUSTER_IP, "TCP", "") + &slices("web", "TCP", &[backend])),
    );

    let source = format!("file:{}", dir.path().display());
    let mut proxy = ns.spawn(
        env!("CARGO_BIN_EXE_kube-wasm-proxy"),
        &[
            "--proxy-mode",
            "userspace",
            "--source",
            &source,
            "--min-sync-period",
            "50ms",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ],
    );
    let guard = KillOnDrop(&mut proxy);

    eventually("the cluster IP to answer", || {
        ask_cluster_ip(&ns).is_ok_and(|r| r == "redirected")
    });
    let table = ns.sh("nft list table ip kube-wasm-proxy-userspace");
    assert!(
        table.contains(&format!("ip daddr {CLUSTER_IP} tcp dport 80 redirect to :")),
        "{table}"
    );

    // Service gone: its redirect goes, and the cluster IP stops answering.
    std::fs::remove_file(dir.path().join("svc.yaml")).unwrap();
    eventually("the redirect to go", || {
        !ns.sh("nft list table ip kube-wasm-proxy-userspace")
            .contains(CLUSTER_IP)
    });
    assert!(ask_cluster_ip(&ns).is_err());

    // SIGTERM: the process removes its table on the way out.
    let pid = guard.0.id() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = guard.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        !ns.sh("nft list tables")
            .contains("kube-wasm-proxy-userspace"),
        "table left behind"
    );
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
