//! The iptables walker on hand-made rulesets in kwp's layout
//! (docs/iptables.md), loaded with `iptables-restore` into a private
//! namespace and read back with `iptables-save`, as the soak reads kwp's.

use std::net::IpAddr;

use super::fixtures::view;
use super::{Frontend, Iptables, Kind, Outcome, Proto, Reach};
use crate::common::netns::Netns;

const NODE: &str = "203.0.113.1";
const CLIENT: &str = "203.0.113.2";

/// The base chains and jumps kwp writes, plus `nat` and `filter` rules;
/// the service-IP dispatch is split in two goto shards by a
/// non-contiguous mask (a layout kwp measured and did not keep,
/// docs/iptables.md), so the walker is held to masks and `-g` too.
fn rules(tag: &str, nat: &str, filter: &str) -> Iptables {
    read_rules(tag, nat, filter).expect("the walker reads kwp's layout")
}

/// As `rules`, with the walker's verdict on what `iptables-save` printed.
fn read_rules(tag: &str, nat: &str, filter: &str) -> anyhow::Result<Iptables> {
    let ns = Netns::new(&format!("kwp-ipt-{tag}"));
    let text = format!(
        "*nat
:KWP-SERVICES - [0:0]
:KWP-SERVICE-IPS - [0:0]
:KWP-SERVICE-IPS-0 - [0:0]
:KWP-SERVICE-IPS-1 - [0:0]
:KWP-NODEPORTS - [0:0]
:KWP-MARK-MASQ - [0:0]
:KWP-SVC-A - [0:0]
:KWP-SEP-A1 - [0:0]
:KWP-SEP-A2 - [0:0]
:KWP-EXT-B - [0:0]
:KWP-FW-B - [0:0]
-A PREROUTING -m comment --comment \"kwp services\" -j KWP-SERVICES
-A KWP-SERVICES -j KWP-SERVICE-IPS
-A KWP-SERVICES -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KWP-NODEPORTS
-A KWP-MARK-MASQ -j MARK --or-mark 0x4000
-A KWP-SVC-A -m comment --comment \"t/a:p\" -m recent --name KWP-SEP-A1 --rcheck --seconds 10800 --reap -j KWP-SEP-A1
-A KWP-SVC-A -m comment --comment \"t/a:p\" -m statistic --mode random --probability 0.5000000000 -j KWP-SEP-A1
-A KWP-SVC-A -m comment --comment \"t/a:p\" -j KWP-SEP-A2
-A KWP-SEP-A1 -s 10.0.0.1/32 -j KWP-MARK-MASQ
-A KWP-SEP-A1 -p tcp -m recent --name KWP-SEP-A1 --set -m tcp -j DNAT --to-destination 10.0.0.1:8080
-A KWP-SEP-A2 -s 10.0.0.2/32 -j KWP-MARK-MASQ
-A KWP-SEP-A2 -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:8080
-A KWP-EXT-B -j KWP-MARK-MASQ
-A KWP-EXT-B -j KWP-SVC-A
-A KWP-FW-B -s 192.0.2.0/24 -j KWP-EXT-B
-A KWP-SERVICE-IPS -d 0.0.0.0/0.0.0.63 -g KWP-SERVICE-IPS-0
-A KWP-SERVICE-IPS -d 0.0.0.1/0.0.0.63 -g KWP-SERVICE-IPS-1
-A KWP-SERVICE-IPS-1 -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KWP-SVC-A
-A KWP-SERVICE-IPS-1 -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j KWP-FW-B
-A KWP-NODEPORTS -p tcp -m tcp --dport 30080 -j KWP-EXT-B
{nat}
COMMIT
*filter
:KWP-FORWARD - [0:0]
:KWP-SERVICES - [0:0]
:KWP-EXTERNAL-SERVICES - [0:0]
:KWP-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -j KWP-EXTERNAL-SERVICES
-A INPUT -m conntrack --ctstate NEW -j KWP-PROXY-FIREWALL
-A FORWARD -j KWP-FORWARD
-A FORWARD -m conntrack --ctstate NEW -j KWP-SERVICES
-A FORWARD -m conntrack --ctstate NEW -j KWP-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -j KWP-PROXY-FIREWALL
-A KWP-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KWP-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KWP-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KWP-SERVICES -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KWP-PROXY-FIREWALL -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j DROP
{filter}
COMMIT
"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    ns.sh(&format!("iptables-restore {}", file.path().display()));
    let mut k = Iptables::default();
    k.local_addresses = vec![NODE.parse().unwrap()];
    k.add_save(false, &ns.sh("iptables-save"))?;
    Ok(k)
}

fn to(ip: &str, port: u16, source: &str) -> Frontend {
    Frontend {
        service: "t/x:p".into(),
        kind: Kind::ClusterIp,
        ip: ip.parse().unwrap(),
        proto: Proto::Tcp,
        port,
        source: source.parse().unwrap(),
    }
}

fn endpoints(addrs: &[&str]) -> Reach {
    addrs
        .iter()
        .map(|a| Outcome::Endpoint(a.parse().unwrap()))
        .collect()
}

fn reach(k: &Iptables, f: &Frontend) -> Reach {
    k.reach(f, &view()).unwrap()
}

#[test]
fn iptables_random_and_affinity_branches_reach_every_endpoint() {
    let k = rules("spread", "", "");
    let both = endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert_eq!(reach(&k, &to("10.96.0.1", 80, CLIENT)), both);
    assert_eq!(reach(&k, &to(NODE, 30080, CLIENT)), both, "node port");
    assert_eq!(
        reach(&k, &to("10.96.0.1", 81, CLIENT)),
        Reach::from([Outcome::NotCaptured]),
        "another port"
    );
    let v6: IpAddr = "fd00::1".parse().unwrap();
    let mut f = to("10.96.0.1", 80, CLIENT);
    f.ip = v6;
    assert_eq!(
        reach(&k, &f),
        Reach::from([Outcome::NotCaptured]),
        "no ip6tables"
    );
}

#[test]
fn iptables_reject_and_source_ranges_are_read_from_the_filter_table() {
    let k = rules("filter", "", "");
    assert_eq!(
        reach(&k, &to("10.96.0.2", 80, CLIENT)),
        Reach::from([Outcome::Reject])
    );
    assert_eq!(
        reach(&k, &to("198.51.100.1", 80, CLIENT)),
        Reach::from([Outcome::Drop]),
        "outside the source ranges: un-DNATed, then dropped by destination"
    );
    assert_eq!(
        reach(&k, &to("198.51.100.1", 80, "192.0.2.7")),
        endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

/// A mark set in nat is seen by filter: a masquerade-marked packet that
/// nothing DNATed is accepted by `KWP-FORWARD` before the reject.
#[test]
fn iptables_marks_follow_the_packet_from_nat_to_filter() {
    let k = rules(
        "mark",
        "-I KWP-SERVICE-IPS 1 -d 10.96.0.2/32 -j KWP-MARK-MASQ",
        "",
    );
    assert_eq!(
        reach(&k, &to("10.96.0.2", 80, CLIENT)),
        Reach::from([Outcome::NotCaptured])
    );
}

/// The filter table sees the translated packet: a rule dropping the
/// endpoint's address drops the Service.
#[test]
fn iptables_a_dnated_packet_still_passes_the_filter_table() {
    let k = rules("dnat", "", "-I FORWARD 1 -d 10.0.0.2/32 -j DROP");
    let mut expected = endpoints(&["10.0.0.1:8080"]);
    expected.insert(Outcome::Drop);
    assert_eq!(reach(&k, &to("10.96.0.1", 80, CLIENT)), expected);
}

#[test]
fn iptables_a_rule_the_walker_does_not_know_is_an_error() {
    let Err(err) = read_rules(
        "unknown",
        "-I KWP-SERVICE-IPS 1 -m string --string evil --algo bm -j KWP-SVC-A",
        "",
    ) else {
        panic!("a rule with `-m string` was read as if understood");
    };
    assert!(format!("{err:#}").contains("string"), "{err:#}");
}
