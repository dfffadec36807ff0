//! iptables mode in operation, with real packets in the namespace cluster
//! of common/topology.rs: upstream's iptables metrics as a scrape shows
//! them, drift repair when someone flushes iptables under the proxy,
//! localhost node ports, and hot reload of the mode plugin.

use crate::common;

use std::time::{Duration, Instant};

use common::node_proxy::{
    CONFIG, Proxy, addr, answered_by, eventually, http_get, many, service, start_full,
};
use common::topology::{Cluster, Outcome, tcp_from};
use common::write;

const METRICS: &str = "127.0.0.1:10249";

fn start(c: &Cluster, objects: &str, extra: &[&str]) -> Proxy {
    let mut args = vec![
        "--proxy-mode",
        "iptables",
        "--metrics-bind-address",
        METRICS,
    ];
    args.extend_from_slice(extra);
    start_full(c, objects, CONFIG, &Cluster::node_yaml(), &args)
}

fn save(c: &Cluster, table: &str) -> String {
    c.node.sh(&format!("iptables-save -t {table}"))
}

/// The value of one sample line of the proxy's `/metrics`, 0 if absent.
fn sample(c: &Cluster, series: &str) -> f64 {
    let (status, body) = http_get(&c.node, METRICS.parse().unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Rules in our chains of one table, as iptables-save shows them (the
/// canary aside: upstream's is empty, so its count leaves it out).
fn our_rules(c: &Cluster, table: &str) -> usize {
    save(c, table)
        .lines()
        .filter(|l| l.starts_with("-A KWP-") && !l.starts_with("-A KWP-PROXY-CANARY "))
        .count()
}

#[test]
fn upstream_iptables_metrics_count_what_the_kernel_holds() {
    let c = Cluster::new("imet");
    let objects = |pods: &[&str]| service(&c, "web", "10.96.0.40", "", pods, "TCP");
    let p = start(&c, &objects(&["pod-a", "pod-c", "pod-d"]), &[]);
    let nat = r#"kubeproxy_sync_proxy_rules_iptables_total{table="nat",ip_family="IPv4"}"#;
    let filter = r#"kubeproxy_sync_proxy_rules_iptables_total{table="filter",ip_family="IPv4"}"#;
    eventually("the rule counts", || {
        sample(&c, nat) as usize == our_rules(&c, "nat")
            && sample(&c, filter) as usize == our_rules(&c, "filter")
    });
    assert!(sample(&c, nat) > 10.0);
    assert_eq!(
        sample(&c, r#"kwp_iptables_backend_info{backend="nft"}"#),
        1.0
    );
    let full = r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#;
    let partial = r#"kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#;
    assert!(sample(&c, full) >= 1.0);
    let partial_before = sample(&c, partial);
    // One endpoint goes: a partial sync, and the counts follow the kernel.
    write(&p.dir, "objects.yaml", &objects(&["pod-a", "pod-c"]));
    eventually("pod-d removed", || !save(&c, "nat").contains("10.244.2.12"));
    eventually("a partial sync counted", || {
        sample(&c, partial) > partial_before && sample(&c, nat) as usize == our_rules(&c, "nat")
    });
    let last = r#"kubeproxy_sync_proxy_rules_iptables_last{table="nat",ip_family="IPv4"}"#;
    assert!(
        sample(&c, last) < sample(&c, nat),
        "a partial sync writes less than the whole table"
    );
    assert_eq!(
        sample(
            &c,
            r#"kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}"#
        ),
        0.0
    );
}

/// Time until `from` reaches `ip`:80 again, polling every 20 ms.
fn until_answered(c: &Cluster, ip: &str) -> Duration {
    let start = Instant::now();
    let from = &c.pod("pod-b").ns;
    while !matches!(tcp_from(from, addr(ip, 80)), Outcome::Answered(..)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{ip} never answered again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn a_flushed_nat_table_comes_back_long_before_the_sync_period() {
    let c = Cluster::new("ican");
    let _p = start(
        &c,
        &service(&c, "web", "10.96.0.41", "", &["pod-a", "pod-c"], "TCP"),
        &["--sync-period", "120s"],
    );
    let from = &c.pod("pod-b").ns;
    assert_eq!(
        answered_by(&many(10, || tcp_from(from, addr("10.96.0.41", 80)))).len(),
        2
    );
    let canary = "-A KWP-PROXY-CANARY -j RETURN";
    assert!(save(&c, "nat").contains(canary), "{}", save(&c, "nat"));
    assert!(save(&c, "filter").contains(canary));
    // `iptables -t nat -F`: every rule gone, chains kept.
    c.node.sh("iptables -t nat -F");
    assert!(!save(&c, "nat").contains("10.96.0.41"));
    let flushed = until_answered(&c, "10.96.0.41");
    // `-F` and `-X`: our chains gone too, as a firewall restart leaves it.
    c.node.sh("iptables -t nat -F && iptables -t nat -X");
    let deleted = until_answered(&c, "10.96.0.41");
    eprintln!("service back after nat -F in {flushed:?}, after -F -X in {deleted:?}");
    // The canary repaired it, not the resync (syncPeriod is 120 s and
    // `until_answered` gives up at 30 s): counted, not timed, as the
    // machine's load decides the seconds.
    assert_eq!(sample(&c, "kwp_iptables_canary_resyncs_total"), 2.0);
    assert!(save(&c, "nat").contains(canary));
    assert_eq!(
        save(&c, "nat")
            .matches("-A PREROUTING -j KWP-SERVICES")
            .count(),
        1
    );
    assert_eq!(sample(&c, "kwp_iptables_canary_resyncs_total"), 2.0);
}

fn route_localnet(c: &Cluster) -> String {
    c.node
        .sh("sysctl -n net.ipv4.conf.all.route_localnet")
        .trim()
        .to_string()
}

fn node_port_service(c: &Cluster, ip: &str, node_port: u16) -> String {
    service(
        c,
        "web",
        ip,
        &format!("  type: NodePort\n  # nodePort: {node_port}\n"),
        &["pod-a", "pod-c"],
        "TCP",
    )
}

/// Datagrams a UDP socket on the node's 127.0.0.1:`port` received.
fn loopback_listener(c: &Cluster, port: u16) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = got.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    c.node.background(move || {
        let socket = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("bind 127.0.0.1");
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        while socket.recv_from(&mut buf).is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    ready.recv().unwrap();
    got
}

/// Upstream's default in iptables mode: node ports on every local address
/// (not only the Node's), 127.0.0.1 included with `route_localnet=1`, and
/// the guard that keeps other hosts from reaching the node's loopback
/// services through it (CVE-2020-8558).
#[test]
fn node_ports_answer_on_every_local_address_and_on_localhost() {
    let c = Cluster::new("iloc");
    assert_eq!(route_localnet(&c), "0");
    let _p = start(&c, &node_port_service(&c, "10.96.0.42", 30094), &[]);
    assert_eq!(route_localnet(&c), "1");
    let answered = |from: &common::netns::Netns, ip: &str| {
        matches!(tcp_from(from, addr(ip, 30094)), Outcome::Answered(..))
    };
    assert!(answered(&c.node, "127.0.0.1"), "localhost node port");
    assert!(answered(&c.client, common::topology::NODE_IP));
    assert!(
        answered(&c.client, "10.0.0.1"),
        "a local address the Node object does not list"
    );
    // A pod that routes 127.0.0.1 to the node (as a hostile neighbour
    // could) does not reach a service listening on the node's loopback.
    let got = loopback_listener(&c, 9999);
    let pod = &c.pod("pod-b").ns;
    pod.sh("sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 && ip route del local 127.0.0.1 table local && ip route del local 127.0.0.0/8 table local && ip route add 127.0.0.1/32 via 10.244.1.1 dev eth0");
    let send = |ns: &common::netns::Netns, from: &'static str| {
        ns.run_in(move || {
            let socket = std::net::UdpSocket::bind((from, 0)).expect("bind");
            socket.send_to(b"x", "127.0.0.1:9999").expect("send")
        })
    };
    for _ in 0..5 {
        send(pod, "10.244.1.12");
    }
    send(&c.node, "127.0.0.1");
    eventually("the node's own datagram", || {
        got.load(std::sync::atomic::Ordering::Relaxed) >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        got.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "martian datagrams from the pod reached the node's loopback"
    );
    let filter = save(&c, "filter");
    for line in [
        "-A KWP-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        "-A INPUT -j KWP-FIREWALL",
        "-A OUTPUT -j KWP-FIREWALL",
    ] {
        assert!(filter.contains(line), "{line} in\n{filter}");
    }
}

/// `nodePortAddresses: [primary]` on a node whose Node object has no IPv4
/// address: upstream then has no IPv4 CIDR, which means every IPv4
/// address, localhost included (route_localnet and the guard), as unset.
#[test]
fn primary_without_an_ipv4_node_address_puts_node_ports_on_localhost() {
    let c = Cluster::new("iprim");
    let node_ip = common::topology::NODE_IP;
    let node = Cluster::node_yaml().replace(
        &format!("  - {{type: InternalIP, address: {node_ip}}}\n"),
        "",
    );
    assert!(!node.contains(node_ip), "{node}");
    let config = format!("{CONFIG}nodePortAddresses: [primary]\n");
    let objects = node_port_service(&c, "10.96.0.44", 30096);
    let _p = start_full(&c, &objects, &config, &node, &["--proxy-mode", "iptables"]);
    let answered = |from: &common::netns::Netns, ip: &str| {
        matches!(tcp_from(from, addr(ip, 30096)), Outcome::Answered(..))
    };
    eventually("the node port on 127.0.0.1", || {
        answered(&c.node, "127.0.0.1")
    });
    assert!(answered(&c.client, node_ip), "every IPv4 address");
    assert_eq!(route_localnet(&c), "1");
    assert!(save(&c, "filter").contains("-A INPUT -j KWP-FIREWALL"));
}

/// localhostNodePorts false, or nodePortAddresses without loopback: no
/// node ports on 127.0.0.1, `route_localnet` untouched, no guard; and
/// nodePortAddresses limits the addresses as upstream does.
#[test]
fn localhost_node_ports_off_leave_loopback_alone() {
    let c = Cluster::new("inol");
    let objects = node_port_service(&c, "10.96.0.43", 30095);
    let answered = |from: &common::netns::Netns, ip: &str| {
        matches!(tcp_from(from, addr(ip, 30095)), Outcome::Answered(..))
    };
    for (config, flag, on_other_address) in [
        (
            format!("{CONFIG}iptables:\n  localhostNodePorts: false\n"),
            None,
            true,
        ),
        (
            CONFIG.to_string(),
            Some("--iptables-localhost-nodeports=false"),
            true,
        ),
        (
            format!("{CONFIG}nodePortAddresses: [203.0.113.0/24]\n"),
            None,
            false,
        ),
    ] {
        let mut args = vec!["--proxy-mode", "iptables"];
        args.extend(flag);
        let p = start_full(&c, &objects, &config, &Cluster::node_yaml(), &args);
        let config = format!("{config}{flag:?}");
        // This proxy's rules, not the previous one's.
        let dispatch = if on_other_address {
            "-A KWP-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KWP-NODEPORTS"
        } else {
            "-A KWP-SERVICES -d 203.0.113.1/32 -j KWP-NODEPORTS"
        };
        eventually("the node port", || save(&c, "nat").contains(dispatch));
        assert!(answered(&c.client, common::topology::NODE_IP));
        assert_eq!(
            answered(&c.client, "10.0.0.1"),
            on_other_address,
            "{config}"
        );
        assert!(!answered(&c.node, "127.0.0.1"), "{config}");
        assert_eq!(route_localnet(&c), "0", "{config}");
        assert!(!save(&c, "filter").contains("KWP-FIREWALL"), "{config}");
        drop(p);
        // The next proxy starts from nothing, so what it shows is its own.
        c.node
            .sh("iptables -t nat -F && iptables -t nat -X && iptables -F && iptables -X");
    }
}

/// Hot reload of the iptables mode under a continuous client: a new build
/// is swapped in; one that writes into a built-in chain is rejected at its
/// probe; one whose rules iptables-restore refuses is rolled back in the
/// same sync with nothing of it applied (every table checked before any
/// is committed), and refused when installed again.
#[test]
fn the_iptables_mode_reloads_under_traffic_and_a_broken_one_is_rolled_back() {
    let c = Cluster::new("irl");
    let plugins = tempfile::tempdir().unwrap();
    let iptables = kwp_plugins_bundle::bundled()
        .find(|(n, _)| n == "iptables")
        .unwrap()
        .1
        .to_vec();
    let install = |bytes: &[u8]| {
        std::fs::write(plugins.path().join(".tmp"), bytes).unwrap();
        std::fs::rename(
            plugins.path().join(".tmp"),
            plugins.path().join("iptables.wasm"),
        )
        .unwrap();
    };
    install(&iptables);
    let dir = plugins.path().display().to_string();
    let p = start(
        &c,
        &service(&c, "web", "10.96.0.44", "", &["pod-a", "pod-c"], "TCP"),
        &["--plugin-dir", &dir],
    );
    eventually("rules", || save(&c, "nat").contains("-d 10.96.0.44/32"));
    let logged = |what: &str| p.logs.text().matches(what).count();
    let before = (save(&c, "nat"), save(&c, "filter"));

    let client =
        common::topology::ContinuousClient::start(&c.pod("pod-b").ns, addr("10.96.0.44", 80));
    let filter_rules = || {
        save(&c, "filter")
            .lines()
            .filter(|l| l.starts_with("-A KWP-"))
            .count()
    };
    // The fewest filter rules of ours seen while the reloads run: a
    // refused version must not have committed any table.
    let (fewest, watching) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(filter_rules())),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    );
    let watcher = {
        let (fewest, watching, node) = (fewest.clone(), watching.clone(), c.node.name.clone());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &node, "iptables-save", "-t", "filter"])
                    .output()
                    .expect("iptables-save");
                let n = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A KWP-"))
                    .count();
                fewest.fetch_min(n, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    install(&[iptables.as_slice(), b"".as_slice()].concat());
    eventually("the mode reload", || logged("reloaded proxy mode") == 1);
    install(kwp_test_programs_artifacts::program(
        "iptables_builtin_chain",
    ));
    eventually("the rejection", || logged("reload rejected") == 1);
    let breaks = kwp_test_programs_artifacts::program("iptables_breaks_after_probe");
    install(breaks);
    eventually("the rollback", || {
        logged("rolled back to the previous version") == 1
    });
    install(breaks);
    eventually("the quarantined version refused", || {
        logged("reload rejected") == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = client.stop();
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(
        fewest.load(std::sync::atomic::Ordering::Relaxed),
        filter_rules(),
        "filter rules went missing while a refused version was applied"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 10, "only {ok} connections");
    eprintln!("{ok} connections through three reloads, none failed");
    let after = (save(&c, "nat"), save(&c, "filter"));
    for (table, was, is) in [
        ("nat", &before.0, &after.0),
        ("filter", &before.1, &after.1),
    ] {
        let rules = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("-A ") || l.starts_with(':'))
                .map(|l| l.split(" [").next().unwrap_or(l).to_string())
                .collect()
        };
        assert_eq!(rules(is), rules(was), "{table} changed by the reloads");
    }
    assert!(!after.0.contains("BROKEN") && !after.1.contains("-A INPUT -j ACCEPT"));
}

/// On a node whose rules are in iptables-legacy: the backend shows in
/// /metrics, and the canary, checked through iptables-legacy, notices a
/// flush of the legacy nat table.
#[test]
fn on_iptables_legacy_the_backend_is_exported_and_the_canary_watches_legacy() {
    let c = Cluster::new("ilgc");
    c.node
        .sh("iptables-legacy -N BYSTANDER && iptables-legacy -A INPUT -j BYSTANDER");
    let _p = start(
        &c,
        &service(&c, "web", "10.96.0.45", "", &["pod-a", "pod-c"], "TCP"),
        &["--sync-period", "120s"],
    );
    assert_eq!(
        sample(&c, r#"kwp_iptables_backend_info{backend="legacy"}"#),
        1.0
    );
    assert!(
        c.node
            .sh("iptables-legacy-save -t nat")
            .contains("-A KWP-PROXY-CANARY -j RETURN")
    );
    // Checks run (every second) and find the canary where it is.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        sample(&c, "kwp_iptables_canary_resyncs_total"),
        0.0,
        "an intact canary forced a resync"
    );
    c.node
        .sh("iptables-legacy -t nat -F && iptables-legacy -t nat -X");
    let back = until_answered(&c, "10.96.0.45");
    eprintln!("legacy: service back after nat -F -X in {back:?}");
    assert_eq!(sample(&c, "kwp_iptables_canary_resyncs_total"), 1.0);
}
