//! The packet-filter helpers: which set elements a Service contributes,
//! and the base's masquerade rule per detect-local setting.

use kwp_sdk::mode::Cidr;
use kwp_sdk::mode::DetectLocal;
use kwp_sdk::mode::NftFamily;

use super::tests::{ep, mode, render, svc, v4};
use super::*;
use kwp_sdk::mode::{BackendPlan, TrafficPolicy};

/// `set: element` for every element of `family` in `f`.
fn elements(f: &Fragment, family: NftFamily) -> Vec<String> {
    f.items
        .iter()
        .filter_map(|i| match i {
            Item::NftElement(e) if e.family == family => Some(format!("{}: {}", e.set, e.element)),
            _ => None,
        })
        .collect()
}

fn rendered(s: &ServicePort, eps: &[Endpoint]) -> Vec<String> {
    let weights = BackendPlan::Weights(vec![1; eps.len()]);
    let f = render(&mode(), &IpvsConfig::default(), s, eps, &weights).expect("renders");
    elements(&f, NftFamily::Ip)
}

fn has(all: &[String], want: &str) -> bool {
    all.iter().any(|e| e == want)
}

#[test]
fn each_frontend_is_in_upstreams_set_and_only_virtual_addresses_are_ipvs_ips() {
    let mut s = svc("round-robin");
    s.health_check_node_port = Some(32000);
    let all = rendered(&s, &[ep(1, true, false, true), ep(2, true, false, false)]);
    for want in [
        "cluster-ips: 10.96.0.10 . tcp . 80",
        "external-ips: 203.0.113.7 . tcp . 80",
        "lb-ips: 198.51.100.1 . tcp . 80",
        "node-ports: tcp . 30080",
        "health-check-node-ports: 32000",
        "ipvs-ips: 10.96.0.10",
        "ipvs-ips: 203.0.113.7",
        "ipvs-ips: 198.51.100.1",
        // Hairpin for the local endpoint only.
        "loop-back: 10.1.0.1 . tcp . 8080 . 10.1.0.1",
    ] {
        assert!(has(&all, want), "lacks {want:?}: {all:#?}");
    }
    assert!(!has(&all, "loop-back: 10.1.0.2 . tcp . 8080 . 10.1.0.2"));
    assert!(
        !has(&all, "ipvs-ips: 198.51.100.2"),
        "Proxy-mode ingress: not ours"
    );
    assert!(
        !all.iter().any(|e| e.starts_with("no-endpoint")),
        "{all:#?}"
    );
    assert!(
        !all.iter().any(|e| e.starts_with("lb-fw")),
        "no source ranges"
    );
    assert!(!all.iter().any(|e| e.contains("-local:")), "policy Cluster");
}

#[test]
fn source_ranges_fill_the_firewall_sets_and_keep_the_node_out_unless_a_range_holds_it() {
    let mut s = svc("round-robin");
    s.source_ranges = vec![Cidr {
        address: v4([10, 1, 2, 3]),
        prefix_len: 8,
    }];
    let all = rendered(&s, &[ep(1, true, false, false)]);
    for want in [
        "lb-fw: 198.51.100.1 . tcp . 80",
        "lb-source-cidrs: 198.51.100.1 . tcp . 80 . 10.0.0.0/8",
        "lb-no-node-access: 198.51.100.1 . tcp . 80",
    ] {
        assert!(has(&all, want), "lacks {want:?}: {all:#?}");
    }
    // A range holding the node's address (192.168.1.5) lets it in.
    s.source_ranges.push(Cidr {
        address: v4([192, 168, 0, 0]),
        prefix_len: 16,
    });
    let all = rendered(&s, &[ep(1, true, false, false)]);
    assert!(has(
        &all,
        "lb-source-ips: 198.51.100.1 . tcp . 80 . 198.51.100.1"
    ));
    assert!(!all.iter().any(|e| e.starts_with("lb-no-node-access")));
}

#[test]
fn no_endpoints_reject_and_local_policy_without_local_endpoints_drops() {
    let all = rendered(&svc("round-robin"), &[]);
    for want in [
        "no-endpoint-services: 10.96.0.10 . tcp . 80 : goto reject-chain",
        "no-endpoint-services: 203.0.113.7 . tcp . 80 : goto reject-chain",
        "no-endpoint-nodeports: tcp . 30080 : goto reject-chain",
    ] {
        assert!(has(&all, want), "lacks {want:?}: {all:#?}");
    }
    // Only terminating endpoints (weight 0, draining): no new connections.
    let draining = Endpoint {
        serving: false,
        ..ep(1, false, true, false)
    };
    let all = rendered(&svc("round-robin"), &[draining]);
    assert!(has(
        &all,
        "no-endpoint-services: 10.96.0.10 . tcp . 80 : goto reject-chain"
    ));

    let mut local = svc("round-robin");
    local.external_traffic_policy = TrafficPolicy::Local;
    let all = rendered(&local, &[ep(2, true, false, false)]);
    for want in [
        "external-ips-local: 203.0.113.7 . tcp . 80",
        "lb-ips-local: 198.51.100.1 . tcp . 80",
        "node-ports-local: tcp . 30080",
        "no-endpoint-services: 203.0.113.7 . tcp . 80 : drop",
        "no-endpoint-services: 198.51.100.1 . tcp . 80 : drop",
        "no-endpoint-nodeports: tcp . 30080 : drop",
    ] {
        assert!(has(&all, want), "lacks {want:?}: {all:#?}");
    }
    assert!(
        !all.iter()
            .any(|e| e.starts_with("no-endpoint-services: 10.96.0.10")),
        "the cluster IP still has its (remote) endpoint"
    );
    assert!(!all.iter().any(|e| e.starts_with("external-ips: ")));
}

#[test]
fn the_base_masquerades_cluster_traffic_by_detect_local_or_masquerade_all() {
    let services = |cfg: &ModeConfig| -> Vec<String> {
        let base = base::render(cfg).expect("base");
        base.items
            .iter()
            .find_map(|i| match i {
                Item::NftChain(c) if c.family == NftFamily::Ip && c.name == "services" => {
                    Some(c.rules.clone())
                }
                _ => None,
            })
            .expect("services chain")
    };
    let mut cfg = mode();
    let rule = "@cluster-ips jump mark-for-masquerade";
    assert!(services(&cfg).contains(&format!("ip saddr . meta l4proto . th dport {rule}")));
    cfg.detect_local = DetectLocal::Cidrs(vec!["10.244.0.0/16".into()]);
    assert!(services(&cfg).contains(&format!(
        "ip saddr != {{ 10.244.0.0/16 }} ip daddr . meta l4proto . th dport {rule}"
    )));
    cfg.masquerade_all = true;
    assert!(services(&cfg).contains(&format!("ip daddr . meta l4proto . th dport {rule}")));
    // Both families, every set a rule names.
    let base = base::render(&cfg).expect("base");
    let sets: Vec<(NftFamily, String)> = base
        .items
        .iter()
        .filter_map(|i| match i {
            Item::NftSet(s) => Some((s.family, s.name.clone())),
            _ => None,
        })
        .collect();
    for i in base.items.iter() {
        let Item::NftChain(c) = i else { continue };
        for r in &c.rules {
            for word in r.split_whitespace().filter_map(|w| w.strip_prefix('@')) {
                assert!(sets.contains(&(c.family, word.into())), "{word} in {r}");
            }
        }
    }
    assert_eq!(sets.len(), 32, "16 sets in each family");
}
