//! Rendering, natively: which set each frontend reaches, the short-circuit
//! of external frontends, and drop vs reject.

use kwp_sdk::mode::ServiceEndpoints;
use kwp_sdk::mode::{Item, ModeConfig};
use kwp_sdk::mode::{ServicePort, TrafficPolicy};

use crate::Settings;
use crate::service::render;
use kwp_sdk::testing::mode::{config as cfg, endpoint as ep, service as svc, sets, v4};

/// This node's pods: the cluster CIDR of the namespace tests.
fn cluster_cidr() -> ModeConfig {
    kwp_sdk::testing::mode::config_with_pods_in("10.244.0.0/16")
}

/// Chains (IPv4) as (table, name, rules).
fn rendered(svc: &ServicePort, eps: &ServiceEndpoints) -> Vec<(String, String, Vec<String>)> {
    rendered_with(&cfg(), svc, eps)
}

fn rendered_with(
    cfg: &ModeConfig,
    svc: &ServicePort,
    eps: &ServiceEndpoints,
) -> Vec<(String, String, Vec<String>)> {
    let fragment = render(cfg, &Settings::default(), svc, eps).unwrap();
    fragment
        .items
        .into_iter()
        .filter_map(|item| match item {
            Item::IptablesChain(c) if !c.ipv6 => Some((c.table, c.name, c.rules)),
            _ => None,
        })
        .collect()
}

/// The rules of the one chain whose name starts with `prefix`, joined.
fn chain(chains: &[(String, String, Vec<String>)], table: &str, prefix: &str) -> String {
    let found: Vec<_> = chains
        .iter()
        .filter(|(t, n, _)| t == table && n.starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "one {table} {prefix}* in {chains:?}");
    found[0].2.join("\n")
}

/// DNAT destinations, one per endpoint chain.
fn dnats(chains: &[(String, String, Vec<String>)]) -> Vec<String> {
    chains
        .iter()
        .flat_map(|(_, _, r)| r)
        .filter_map(|r| r.split("--to-destination ").nth(1).map(str::to_string))
        .collect()
}

/// The endpoint chain a rule list jumps to for `last`.
fn sep_of(chains: &[(String, String, Vec<String>)], last: u8) -> String {
    chains
        .iter()
        .find(|(_, n, r)| {
            n.starts_with("KWP-SEP-")
                && r.iter()
                    .any(|r| r.ends_with(&format!("10.1.0.{last}:8080")))
        })
        .map(|(_, n, _)| n.clone())
        .unwrap_or_else(|| panic!("no endpoint chain for 10.1.0.{last}"))
}

#[test]
fn internal_local_external_cluster_sends_node_ports_to_every_endpoint() {
    let local = ep(1, true, true);
    let remote = ep(2, true, false);
    let eps = sets(&[local.clone()], &[local, remote], &[], true);
    let chains = rendered(&svc(TrafficPolicy::Local, TrafficPolicy::Cluster), &eps);
    assert_eq!(dnats(&chains), ["10.1.0.1:8080", "10.1.0.2:8080"]);
    let (a, b) = (sep_of(&chains, 1), sep_of(&chains, 2));
    let internal = chain(&chains, "nat", "KWP-SVC-");
    assert!(
        internal.contains(&a) && !internal.contains(&b),
        "{internal}"
    );
    let external = chain(&chains, "nat", "KWP-EXT-");
    assert!(external.contains(&a) && external.contains(&b), "{external}");
    assert!(external.contains("-j KWP-MARK-MASQ"), "{external}");
    assert!(chain(&chains, "nat", "KWP-NODEPORTS").contains("--dport 30080 -j KWP-EXT-"));
}

#[test]
fn external_local_uses_a_local_terminating_endpoint() {
    let remote = ep(2, true, false);
    let draining = ep(3, false, true);
    let chains = rendered(
        &svc(TrafficPolicy::Cluster, TrafficPolicy::Local),
        &sets(&[remote.clone()], &[draining], &[remote], true),
    );
    let (remote, draining) = (sep_of(&chains, 2), sep_of(&chains, 3));
    let external = chain(&chains, "nat", "KWP-EXT-");
    assert!(
        external.contains(&draining) && !external.contains(&remote),
        "{external}"
    );
    assert!(chain(&chains, "nat", "KWP-NODEPORTS").contains("-j KWP-EXT-"));
    assert!(!chains.iter().any(|(t, _, _)| t == "filter"), "{chains:?}");
}

#[test]
fn a_local_policy_drops_with_endpoints_elsewhere_and_rejects_without_any() {
    let both_local = svc(TrafficPolicy::Local, TrafficPolicy::Local);
    let remote = ep(2, true, false);
    let chains = rendered(&both_local, &sets(&[], &[], &[remote.clone()], true));
    assert!(chain(&chains, "filter", "KWP-EXTERNAL-SERVICES").contains("--dport 30080 -j DROP"));
    assert!(chain(&chains, "filter", "KWP-SERVICES").ends_with("--dport 80 -j DROP"));
    let chains = rendered(&both_local, &sets(&[], &[], &[], false));
    assert!(chain(&chains, "filter", "KWP-EXTERNAL-SERVICES").contains("--dport 30080 -j REJECT"));
    assert!(chain(&chains, "filter", "KWP-SERVICES").ends_with("--dport 80 -j REJECT"));
    // externalTrafficPolicy Local alone: the cluster IP serves, the node
    // port drops.
    let chains = rendered(
        &svc(TrafficPolicy::Cluster, TrafficPolicy::Local),
        &sets(&[remote.clone()], &[], &[remote], true),
    );
    assert!(chain(&chains, "filter", "KWP-EXTERNAL-SERVICES").contains("--dport 30080 -j DROP"));
    assert!(chain(&chains, "nat", "KWP-SERVICE-IPS").contains("-j KWP-SVC-"));
}

#[test]
fn external_ips_under_external_local_reach_local_endpoints_only() {
    let local = ep(1, true, true);
    let remote = ep(2, true, false);
    let mut port = svc(TrafficPolicy::Cluster, TrafficPolicy::Local);
    port.external_ips = vec![v4([203, 0, 113, 7])];
    let all = [local.clone(), remote];
    let chains = rendered(&port, &sets(&all, &[local], &all, true));
    let (a, b) = (sep_of(&chains, 1), sep_of(&chains, 2));
    let external = chain(&chains, "nat", "KWP-EXT-");
    assert!(
        external.contains(&a) && !external.contains(&b),
        "{external}"
    );
    assert!(
        external.contains("--src-type LOCAL -j KWP-SVC-"),
        "{external}"
    );
    assert!(chain(&chains, "nat", "KWP-SERVICE-IPS").contains("-d 203.0.113.7/32"));
}

/// Both policies Local: this node's pods and the node itself reach the
/// external frontends through the cluster-wide set (`KWP-CLU-`, upstream's
/// KUBE-SVC- cluster policy chain), clients outside the local endpoint.
#[test]
fn both_policies_local_short_circuit_pods_and_the_node_to_the_cluster_wide_set() {
    let (port, eps) = kwp_sdk::testing::mode::both_local_with_an_external_ip();
    let chains = rendered_with(&cluster_cidr(), &port, &eps);
    let (a, b) = (sep_of(&chains, 1), sep_of(&chains, 2));
    let cluster = chain(&chains, "nat", "KWP-CLU-");
    assert!(cluster.contains(&a) && cluster.contains(&b), "{cluster}");
    let internal = chain(&chains, "nat", "KWP-SVC-");
    assert!(!internal.contains(&b), "{internal}");
    let external: Vec<String> = chain(&chains, "nat", "KWP-EXT-")
        .lines()
        .map(|r| r.replace("-m comment --comment ns/web ", ""))
        .collect();
    let clu = chains
        .iter()
        .find(|(_, n, _)| n.starts_with("KWP-CLU-"))
        .map(|(_, n, _)| n.clone())
        .unwrap();
    let svc_chain = chains
        .iter()
        .find(|(_, n, _)| n.starts_with("KWP-SVC-"))
        .map(|(_, n, _)| n.clone())
        .unwrap();
    assert_eq!(
        external,
        [
            format!("-s 10.244.0.0/16 -j {clu}"),
            "-m addrtype --src-type LOCAL -j KWP-MARK-MASQ".to_string(),
            format!("-m addrtype --src-type LOCAL -j {clu}"),
            format!("-j {svc_chain}"),
        ]
    );
    assert!(!chains.iter().any(|(t, _, _)| t == "filter"), "{chains:?}");
}

/// Both policies Local and no endpoint here: the external chain still
/// short-circuits pods and the node; anything else returns un-DNATed to
/// the filter table's drop.
#[test]
fn both_policies_local_without_local_endpoints_keep_the_short_circuit() {
    let remote = ep(2, true, false);
    let mut port = svc(TrafficPolicy::Local, TrafficPolicy::Local);
    port.external_ips = vec![v4([203, 0, 113, 7])];
    let chains = rendered_with(&cluster_cidr(), &port, &sets(&[], &[], &[remote], true));
    assert_eq!(dnats(&chains), ["10.1.0.2:8080"]);
    let external = chain(&chains, "nat", "KWP-EXT-");
    assert!(
        external.contains("-s 10.244.0.0/16 -j KWP-CLU-"),
        "{external}"
    );
    assert!(
        external.contains("--src-type LOCAL -j KWP-CLU-"),
        "{external}"
    );
    assert!(!external.contains("KWP-SEP-"), "{external}");
    assert!(chain(&chains, "nat", "KWP-NODEPORTS").contains("--dport 30080 -j KWP-EXT-"));
    let services = chain(&chains, "nat", "KWP-SERVICE-IPS");
    assert!(services.contains("-d 203.0.113.7/32"), "{services}");
    assert!(!services.contains("-d 10.96.0.10/32"), "{services}");
    let filter = chain(&chains, "filter", "KWP-EXTERNAL-SERVICES");
    assert!(filter.contains("--dport 30080 -j DROP"), "{filter}");
    assert!(filter.contains("-d 203.0.113.7/32"), "{filter}");
}
