//! Userspace mode end to end: real TCP and UDP traffic through the proxy,
//! driven by YAML files the way an operator would write them.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn spread(addr: std::net::SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = ask(addr).await.expect("request through the proxy");
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_requests_spread_over_all_backends() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        tcp_backend("a").await,
        tcp_backend("b").await,
        tcp_backend("c").await,
    ];
    write(
        dir.path(),
        "web.yaml",
        &(service("web", "10.96.0.1", "TCP", "") + &slices("web", "TCP", &backends)),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "web").await;
    let seen = spread(addr, 30).await;
    assert_eq!(
        seen,
        BTreeMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]),
        "round-robin over all three"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_spread_and_replies_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [udp_backend("u1").await, udp_backend("u2").await];
    write(
        dir.path(),
        "dns.yaml",
        &(service("dns", "10.96.0.53", "UDP", "") + &slices("dns", "UDP", &backends)),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "dns").await;
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let who = ask_udp(addr).await.expect("udp reply through the proxy");
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(seen, BTreeMap::from([("u1".into(), 5), ("u2".into(), 5)]));

    // Within one flow, datagrams stick to the flow's endpoint.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    let mut answers = Vec::new();
    for _ in 0..4 {
        socket.send_to(b"x", addr).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    answers.dedup();
    assert_eq!(answers.len(), 1, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_stops_getting_connections_within_2s() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        tcp_backend("keep-1").await,
        tcp_backend("keep-2").await,
        tcp_backend("gone").await,
    ];
    write(
        dir.path(),
        "svc.yaml",
        &service("web", "10.96.0.2", "TCP", ""),
    );
    write(dir.path(), "eps.yaml", &slices("web", "TCP", &backends));
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "web").await;
    assert!(spread(addr, 6).await.contains_key("gone"));

    write(
        dir.path(),
        "eps.yaml",
        &slices("web", "TCP", &backends[..2]),
    );
    let changed = Instant::now();
    // Once 12 connections in a row avoid it, it is out of rotation (round-robin over 2).
    let mut streak = 0;
    while streak < 12 {
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "still routed to the removed backend after 2 s"
        );
        let who = ask(addr).await.expect("request through the proxy");
        streak = if who == "gone" { 0 } else { streak + 1 };
    }
    let seen = spread(addr, 20).await;
    assert!(!seen.contains_key("gone"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [tcp_backend("one").await, tcp_backend("two").await];
    write(
        dir.path(),
        "web.yaml",
        &(service("web", "10.96.0.3", "TCP", "") + &slices("web", "TCP", &backends)),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "web").await;
    let before = spread(addr, 4).await;

    write(
        dir.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n  this is: [not yaml",
    );
    tokio::time::sleep(Duration::from_millis(800)).await; // several scans and syncs
    assert_eq!(listener(&mapping, "web").await, addr, "listener kept");
    assert_eq!(spread(addr, 4).await, before, "same backends still serve");

    // Fixing the file applies again.
    write(
        dir.path(),
        "web.yaml",
        &(service("web", "10.96.0.3", "TCP", "") + &slices("web", "TCP", &backends[..1])),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while spread(addr, 2).await.contains_key("two") {
        assert!(Instant::now() < deadline, "fixed file not applied");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_sticks_and_no_endpoints_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        tcp_backend("s1").await,
        tcp_backend("s2").await,
        tcp_backend("s3").await,
    ];
    let sticky =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n";
    write(
        dir.path(),
        "sticky.yaml",
        &(service("sticky", "10.96.0.4", "TCP", sticky) + &slices("sticky", "TCP", &backends)),
    );
    write(
        dir.path(),
        "empty.yaml",
        &service("empty", "10.96.0.5", "TCP", ""),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "sticky").await;
    let seen = spread(addr, 12).await;
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");

    let empty = listener(&mapping, "empty").await;
    assert_eq!(
        ask(empty).await,
        None,
        "no endpoints: the connection is rejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_half_close_is_passed_through() {
    // A backend that reads until EOF before answering: works only if the
    // client's shutdown(write) reaches it through the proxy.
    let listener_sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener_sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener_sock.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                conn.read_to_end(&mut all).await.unwrap();
                conn.write_all(format!("got {} bytes", all.len()).as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hc.yaml",
        &(service("hc", "10.96.0.6", "TCP", "") + &slices("hc", "TCP", &[backend])),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "hc").await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(&[7u8; 100_000]).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 100000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_policy_is_used_and_an_unknown_one_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [tcp_backend("r1").await, tcp_backend("r2").await];
    let random = "metadata:\n  annotations: {kube-wasm-proxy.io/lb-policy: random, kube-wasm-proxy.io/lb-policy-config: 'seed=1'}\n";
    let svc = service("rnd", "10.96.0.7", "TCP", "").replace("metadata:\n", random);
    write(
        dir.path(),
        "rnd.yaml",
        &(svc + &slices("rnd", "TCP", &backends)),
    );
    let bogus = service("bog", "10.96.0.8", "TCP", "").replace(
        "metadata:\n",
        "metadata:\n  annotations: {kube-wasm-proxy.io/lb-policy: no-such-policy}\n",
    );
    write(
        dir.path(),
        "bog.yaml",
        &(bogus + &slices("bog", "TCP", &backends)),
    );
    let mapping = start_proxy(dir.path(), &[]).await;

    // Random: not the strict alternation round-robin would give.
    let addr = listener(&mapping, "rnd").await;
    let mut order = Vec::new();
    for _ in 0..40 {
        order.push(ask(addr).await.unwrap());
    }
    let alternating = order.windows(2).all(|w| w[0] != w[1]);
    assert!(!alternating, "looks like round-robin: {order:?}");
    assert!(order.iter().any(|w| w == "r1") && order.iter().any(|w| w == "r2"));

    // Unknown policy: served by the default (round-robin), not dropped.
    let addr = listener(&mapping, "bog").await;
    assert_eq!(
        spread(addr, 4).await,
        BTreeMap::from([("r1".into(), 2), ("r2".into(), 2)])
    );
}

/// A backend that says its name at once and holds the connection until the
/// client closes it.
async fn holding_backend(name: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(name.as_bytes()).await;
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

async fn open(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    (conn, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_new_connections_to_the_idlest_backend() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        holding_backend("a").await,
        holding_backend("b").await,
        holding_backend("c").await,
    ];
    let svc = service("lc", "10.96.0.9", "TCP", "").replace(
        "metadata:\n",
        "metadata:\n  annotations: {kube-wasm-proxy.io/lb-policy: least-connections}\n",
    );
    write(
        dir.path(),
        "lc.yaml",
        &(svc + &slices("lc", "TCP", &backends)),
    );
    let mapping = start_proxy(dir.path(), &[]).await;
    let addr = listener(&mapping, "lc").await;
    let mut held = BTreeMap::new();
    for _ in 0..3 {
        let (conn, who) = open(addr).await;
        held.insert(who, conn);
    }
    assert_eq!(
        held.keys().cloned().collect::<Vec<_>>(),
        ["a", "b", "c"],
        "one each while equal"
    );
    // Close the one on b: b is now the least loaded, twice over.
    let mut on_b = held.remove("b").unwrap();
    on_b.shutdown().await.unwrap();
    drop(on_b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_again, who) = open(addr).await;
    assert_eq!(who, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_works_with_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        tcp_backend("x1").await,
        tcp_backend("x2").await,
        tcp_backend("x3").await,
    ];
    let sticky =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n";
    let policies = [
        "round-robin",
        "random",
        "maglev",
        "weighted",
        "least-connections",
    ];
    for (i, policy) in policies.iter().enumerate() {
        let name = format!("aff-{i}");
        let svc = service(&name, &format!("10.96.1.{i}"), "TCP", sticky).replace(
            "metadata:\n",
            &format!("metadata:\n  annotations: {{kube-wasm-proxy.io/lb-policy: {policy}}}\n"),
        );
        write(
            dir.path(),
            &format!("{name}.yaml"),
            &(svc + &slices(&name, "TCP", &backends)),
        );
    }
    let mapping = start_proxy(dir.path(), &[]).await;
    for (i, policy) in policies.iter().enumerate() {
        let addr = listener(&mapping, &format!("aff-{i}")).await;
        let seen = spread(addr, 8).await;
        assert_eq!(seen.len(), 1, "{policy}: one client, one backend: {seen:?}");
    }
}
