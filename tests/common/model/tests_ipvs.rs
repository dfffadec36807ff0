//! The IPVS walker on text fixtures: `/proc/net/ip_vs` and `ip -o addr`
//! as the kernel prints them, no IPVS kernel needed. The cases with kwp's
//! packet filter load a trimmed copy of its helper table (docs/ipvs.md,
//! plugins/ipvs/src/base.rs) with `nft -f` into a private namespace and
//! read it back with `nft -j`, as the soak reads kwp's.

use serde_json::{Value, json};

use super::fixtures::{self, api, service, view};
use super::{Api, Ipvs, Kind, Outcome, Report, check, expected_frontends};
use crate::common::netns::Netns;

/// `web` at 10.96.0.1:80, node port 30080, `spec` merged in.
fn web(spec: Value) -> Value {
    let mut nodeport = json!({"type": "NodePort",
        "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}]});
    for (k, v) in spec.as_object().unwrap() {
        nodeport[k] = v.clone();
    }
    service("web", "10.96.0.1", nodeport)
}

/// `web`'s slice: (address, node, ready, serving, terminating).
fn slice(eps: &[(&str, &str, bool, bool, bool)]) -> Value {
    fixtures::slice("web", eps)
}

/// Two ready endpoints (one per node) and one terminating, not serving.
fn two_ready() -> Value {
    slice(&[
        ("10.244.1.11", "node-1", true, true, false),
        ("10.244.2.11", "node-2", true, true, false),
        ("10.244.2.12", "node-2", false, false, true),
    ])
}

const HEAD: &str = "IP Virtual Server version 1.2.1 (size=4096)\n\
    Prot LocalAddress:Port Scheduler Flags\n\
    \x20 -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n";

/// 10.96.0.1:80 and 203.0.113.1:30080 (and 10.244.1.1:30080, the bridge
/// address) to the two ready pods at weight 1, the terminating one
/// draining at weight 0: what kwp writes for `two_ready`.
fn table() -> String {
    let dests = "  -> 0AF4010B:1F90      Masq    1      0          0\n\
                 \x20 -> 0AF4020B:1F90      Masq    1      0          0\n\
                 \x20 -> 0AF4020C:1F90      Masq    0      1          0\n";
    format!(
        "{HEAD}TCP  0A600001:0050 rr \n{dests}TCP  CB007101:7580 rr \n{dests}TCP  0AF40101:7580 rr \n{dests}"
    )
}

const ADDRESSES: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth-cli    inet 203.0.113.1/24 scope global eth-cli\\       valid_lft forever preferred_lft forever
3: br0    inet 10.244.1.1/24 scope global br0\\       valid_lft forever preferred_lft forever
3: br0    inet6 fd00:10:244:1::1/64 scope global \\       valid_lft forever preferred_lft forever
7: kube-ipvs0    inet 10.96.0.1/32 scope global kube-ipvs0\\       valid_lft forever preferred_lft forever
";

fn ipvs(proc: &str, addresses: &str) -> Ipvs {
    let mut k = Ipvs::default();
    k.add_proc(proc).expect("the IPVS table");
    k.add_addresses(addresses).expect("the addresses");
    k
}

fn run(api: &Api, k: &Ipvs) -> Report {
    check(api, &view(), k).unwrap()
}

#[test]
fn a_table_that_matches_has_no_mismatch_and_no_leftover() {
    let a = api(&[web(json!({}))], &[two_ready()]);
    let k = ipvs(&table(), ADDRESSES);
    let r = run(&a, &k);
    assert_eq!(
        (r.frontends, r.mismatches.len()),
        (2, 0),
        "{}",
        r.summary(9)
    );
    // The bridge address's node port reaches what the primary one does.
    let expected = expected_frontends(&a, &view(), super::Semantics::Nftables);
    assert_eq!(
        k.leftovers(&expected, &view()).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_missing_real_server_or_a_ready_one_at_weight_zero_is_a_mismatch() {
    let a = api(&[web(json!({}))], &[two_ready()]);
    let missing = table().replacen(
        "  -> 0AF4020B:1F90      Masq    1      0          0\n",
        "",
        1,
    );
    let r = run(&a, &ipvs(&missing, ADDRESSES));
    assert_eq!(r.mismatches.len(), 1, "{}", r.summary(9));
    let text = r.mismatches[0].to_string();
    assert!(
        text.contains("t/web:p ClusterIp 10.96.0.1:80/tcp") && text.contains("10.244.2.11:8080"),
        "{text}"
    );
    // Quiesced where it should take new connections: the node port.
    let quiesced = table().replacen(
        "TCP  CB007101:7580 rr \n  -> 0AF4010B:1F90      Masq    1",
        "TCP  CB007101:7580 rr \n  -> 0AF4010B:1F90      Masq    0",
        1,
    );
    let r = run(&a, &ipvs(&quiesced, ADDRESSES));
    assert_eq!(r.mismatches.len(), 1, "{}", r.summary(9));
    assert_eq!(r.mismatches[0].frontend.kind, Kind::NodePort);
    assert_eq!(
        r.mismatches[0].kernel,
        [Outcome::Endpoint("10.244.2.11:8080".parse().unwrap())].into()
    );
}

#[test]
fn a_cluster_ip_not_bound_on_kube_ipvs0_is_not_captured() {
    let a = api(&[web(json!({}))], &[two_ready()]);
    let unbound = ADDRESSES.replace("10.96.0.1/32", "10.96.0.9/32");
    let k = ipvs(&table(), &unbound);
    let r = run(&a, &k);
    assert_eq!(r.mismatches.len(), 1, "{}", r.summary(9));
    assert_eq!(r.mismatches[0].kernel, [Outcome::NotCaptured].into());
    let expected = expected_frontends(&a, &view(), super::Semantics::Nftables);
    assert_eq!(
        k.leftovers(&expected, &view()).unwrap(),
        vec!["kube-ipvs0 holds 10.96.0.9, which no Service has".to_string()]
    );
}

#[test]
fn no_endpoints_is_ipvs_rejecting_and_a_real_server_left_behind_is_a_mismatch() {
    let none = slice(&[("10.244.2.12", "node-2", false, false, true)]);
    let a = api(&[web(json!({}))], &[none]);
    // Only the not-serving terminating endpoint, draining at weight 0.
    let empty = format!(
        "{HEAD}TCP  0A600001:0050 rr \n  -> 0AF4020C:1F90      Masq    0      1          0\n\
         TCP  CB007101:7580 rr \n"
    );
    let r = run(&a, &ipvs(&empty, ADDRESSES));
    assert_eq!(
        (r.frontends, r.mismatches.len()),
        (2, 0),
        "{}",
        r.summary(9)
    );
    let r = run(&a, &ipvs(&table(), ADDRESSES));
    assert_eq!(r.mismatches.len(), 2, "{}", r.summary(9));
    assert_eq!(r.mismatches[0].expected, [Outcome::Reject].into());
}

#[test]
fn leftovers_name_a_deleted_services_server_and_a_node_port_that_differs() {
    let a = api(&[web(json!({}))], &[two_ready()]);
    let stale = format!(
        "{}TCP  0A600002:0051 wrr persistent 10800 FFFFFFFF\n  -> 0AF4010B:1F90      Masq    1      0          0\n",
        table().replacen(
            "TCP  0AF40101:7580 rr \n  -> 0AF4010B:1F90      Masq    1",
            "TCP  0AF40101:7580 rr \n  -> 0AF4010B:1F90      Masq    0",
            1
        )
    );
    let k = ipvs(&stale, ADDRESSES);
    assert_eq!(run(&a, &k).mismatches.len(), 0);
    let expected = expected_frontends(&a, &view(), super::Semantics::Nftables);
    let left = k.leftovers(&expected, &view()).unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left[1].contains("10.244.1.1:30080") && left[1].contains("expected {10.244.1.11:8080"),
        "{left:?}"
    );
    assert!(
        left[0].contains(
            "virtual server 10.96.0.2:81/tcp (wrr, 1 real servers) belongs to no Service"
        ),
        "{left:?}"
    );
}

#[test]
fn what_the_walker_does_not_know_is_an_error_not_a_pass() {
    let mut k = Ipvs::default();
    let fwm = format!("{HEAD}FWM  00000001 rr \n");
    assert!(
        k.add_proc(&fwm)
            .unwrap_err()
            .to_string()
            .contains("firewall-mark")
    );
    let tunnel = format!(
        "{HEAD}TCP  0A600001:0050 rr \n  -> 0AF4010B:1F90      Tunnel  1      0          0\n"
    );
    let e = Ipvs::default().add_proc(&tunnel).unwrap_err();
    assert!(format!("{e:#}").contains("Tunnel"), "{e:#}");
    let e = Ipvs::default()
        .add_proc("TCP  nothex:0050 rr\n")
        .unwrap_err();
    assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    let v6 = format!(
        "{HEAD}TCP  [fd00:0000:0000:0000:0000:0000:0000:0010]:01BB mh \n  -> [fd00:0010:0244:0001:0000:0000:0000:000b]:1F90      Masq    1      0          0\n"
    );
    Ipvs::default().add_proc(&v6).expect("IPv6 lines");
}

/// kwp's filter chains that decide drops and rejects (base.rs), with
/// `elements` added.
fn filtered(tag: &str, proc: &str, elements: &str) -> Ipvs {
    let ns = Netns::new(&format!("kwp-ipvsm-{tag}"));
    let script = format!(
        "table ip kube-wasm-proxy {{
  set lb-fw {{ type ipv4_addr . inet_proto . inet_service; }}
  set lb-source-cidrs {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }}
  set ipvs-ips {{ type ipv4_addr; }}
  set cluster-ips {{ type ipv4_addr . inet_proto . inet_service; }}
  set lb-ips {{ type ipv4_addr . inet_proto . inet_service; }}
  map no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
  map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict; }}
  chain reject-chain {{ reject; }}
  chain source-ranges {{
    ip daddr . meta l4proto . th dport . ip saddr @lb-source-cidrs return
    drop
  }}
  chain firewall {{ ip daddr . meta l4proto . th dport @lb-fw jump source-ranges; }}
  chain ipvs-filter {{
    ip daddr . meta l4proto . th dport @lb-ips return
    ip daddr . meta l4proto . th dport @cluster-ips return
    ct state new ip daddr @ipvs-ips reject
  }}
  chain endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
    fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
  }}
  chain filter-input {{
    type filter hook input priority -110;
    jump firewall
    jump ipvs-filter
    ct state new jump endpoints-check
  }}
}}
add element ip kube-wasm-proxy ipvs-ips {{ 10.96.0.1, 198.51.100.1 }}
add element ip kube-wasm-proxy cluster-ips {{ 10.96.0.1 . tcp . 80 }}
add element ip kube-wasm-proxy lb-ips {{ 198.51.100.1 . tcp . 80 }}
{elements}
"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    ns.sh(&format!("nft -f {}", file.path().display()));
    let mut k = Ipvs::default();
    k.add_proc(proc).unwrap();
    k.add_addresses(&format!(
        "{ADDRESSES}8: kube-ipvs0    inet 198.51.100.1/32 scope global kube-ipvs0\n"
    ))
    .unwrap();
    k.add_filter_json(&ns.sh("nft -j list table ip kube-wasm-proxy"))
        .unwrap();
    k
}

/// `web` as a LoadBalancer at 198.51.100.1 with `loadBalancerSourceRanges`
/// 192.0.2.0/24 and externalTrafficPolicy Local.
fn firewalled_local() -> Value {
    let mut s = web(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                           "loadBalancerSourceRanges": ["192.0.2.0/24"]}),
    );
    s["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}});
    s
}

#[test]
fn the_filter_drops_outsiders_and_a_local_policy_without_local_endpoints() {
    // Its endpoints all on node-2: the node port and the VIP drop.
    let remote = slice(&[("10.244.2.11", "node-2", true, true, false)]);
    let a = api(&[firewalled_local()], &[remote]);
    let dest = "  -> 0AF4020B:1F90      Masq    1      0          0\n";
    let vs = format!(
        "{HEAD}TCP  0A600001:0050 rr \n{dest}TCP  CB007101:7580 rr \n{dest}TCP  C6336401:0050 rr \n{dest}"
    );
    let drops = "add element ip kube-wasm-proxy lb-fw { 198.51.100.1 . tcp . 80 }
add element ip kube-wasm-proxy lb-source-cidrs { 198.51.100.1 . tcp . 80 . 192.0.2.0/24 }
add element ip kube-wasm-proxy no-endpoint-services { 198.51.100.1 . tcp . 80 : drop }
add element ip kube-wasm-proxy no-endpoint-nodeports { tcp . 30080 : drop }";
    let r = run(&a, &filtered("drop", &vs, drops));
    // Cluster IP; node port; VIP from inside the ranges and from outside.
    assert_eq!(
        (r.frontends, r.mismatches.len()),
        (4, 0),
        "{}",
        r.summary(9)
    );
    // Without the local-policy drop, IPVS would send the VIP's traffic
    // to node-2 (upstream's kubernetes#97081): a mismatch.
    let no_drop = drops.replace(
        "add element ip kube-wasm-proxy no-endpoint-services { 198.51.100.1 . tcp . 80 : drop }",
        "",
    );
    let r = run(&a, &filtered("nodrop", &vs, &no_drop));
    assert_eq!(r.mismatches.len(), 1, "{}", r.summary(9));
    assert_eq!(r.mismatches[0].frontend.kind, Kind::LoadBalancer);
    assert_eq!(r.mismatches[0].expected, [Outcome::Drop].into());
    // Without the source range check, the outsider reaches the VIP too.
    let open = drops.replace(
        "add element ip kube-wasm-proxy lb-fw { 198.51.100.1 . tcp . 80 }",
        "",
    );
    let r = run(&a, &filtered("open", &vs, &open));
    assert_eq!(
        r.mismatches.len(),
        0,
        "the drop for no local endpoint still holds"
    );
    let no_local = slice(&[("10.244.1.11", "node-1", true, true, false)]);
    let a = api(&[firewalled_local()], &[no_local]);
    let vs_local = vs.replace("0AF4020B", "0AF4010B");
    let open = open.replace(
        "add element ip kube-wasm-proxy no-endpoint-services { 198.51.100.1 . tcp . 80 : drop }\n",
        "",
    ).replace("add element ip kube-wasm-proxy no-endpoint-nodeports { tcp . 30080 : drop }", "");
    let r = run(&a, &filtered("open2", &vs_local, &open));
    assert_eq!(r.mismatches.len(), 1, "{}", r.summary(9));
    assert_eq!(r.mismatches[0].frontend.source.to_string(), "203.0.113.2");
}

#[test]
fn a_port_without_a_virtual_server_on_a_vip_is_rejected_by_the_filter() {
    let a = api(&[web(json!({}))], &[two_ready()]);
    let k = filtered("port", &table(), "");
    assert_eq!(run(&a, &k).mismatches.len(), 0);
    let other_port = super::Frontend {
        service: "t/web:p (another port)".into(),
        kind: Kind::ClusterIp,
        ip: "10.96.0.1".parse().unwrap(),
        proto: super::Proto::Tcp,
        port: 22,
        source: "203.0.113.2".parse().unwrap(),
    };
    assert_eq!(
        k.reach(&other_port, &view()).unwrap(),
        [Outcome::Reject].into()
    );
}

#[test]
fn a_torn_read_of_the_table_is_read_again() {
    // The first read shows 10.96.0.1:80 twice (a sync moved it meanwhile).
    let torn = format!("{}TCP  0A600001:0050 rr \n", table());
    let connections = table().replace("Masq    0      1", "Masq    0      0");
    let mut reads = vec![torn.clone(), table(), connections].into_iter();
    let got = super::consistent_proc(5, || reads.next().unwrap_or_default());
    assert!(
        Ipvs::default().add_proc(&torn).is_err(),
        "a duplicate is refused"
    );
    // The two later reads differ only in connection counts: one state.
    assert!(got.contains("Masq    0      0"), "{got}");
    ipvs(&got, ADDRESSES);
}
