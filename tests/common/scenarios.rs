//! Real-packet scenarios that every kernel mode must pass, parameterised
//! by how the mode's proxy starts and how its rules are listed.

use std::time::Duration;

use super::node_proxy::{Proxy, addr, eventually, service};
use super::topology::Cluster;
use super::write;

/// One long-lived UDP flow (the same 5-tuple throughout) from pod-b to
/// Service `dns` at `ip`: answered by pod-c; when pod-c leaves the Service
/// (still running, so only a stale conntrack entry could reach it) the
/// flow must move to pod-a.
pub fn stale_udp_flow_moves(
    c: &Cluster,
    ip: &'static str,
    start: impl Fn(&Cluster, &str) -> Proxy,
    rules: impl Fn(&Cluster) -> String,
) {
    let p = start(c, &service(c, "dns", ip, "", &["pod-c"], "UDP"));
    eventually("udp rules", || rules(c).contains(ip));
    let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<String>>();
    c.pod("pod-b").ns.background(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(reply_to) = rx.recv() {
            let _ = socket.send_to(b"who", addr(ip, 80));
            let mut buf = [0u8; 128];
            let answer = match socket.recv_from(&mut buf) {
                Ok((n, _)) => String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                Err(_) => "timeout".into(),
            };
            let _ = reply_to.send(answer);
        }
    });
    let ask = || {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        tx.send(reply_tx).unwrap();
        reply_rx.recv().unwrap()
    };
    assert_eq!(ask(), "pod-c");
    write(
        &p.dir,
        "objects.yaml",
        &service(c, "dns", ip, "", &["pod-a"], "UDP"),
    );
    eventually("pod-c removed", || !rules(c).contains("10.244.2.11"));
    let mut answer = String::new();
    eventually("the flow to reach pod-a", || {
        answer = ask();
        answer == "pod-a"
    });
    assert_eq!(ask(), "pod-a");
}
