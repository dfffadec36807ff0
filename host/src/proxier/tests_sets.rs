//! Internal, external and short-circuit endpoint sets through the proxier,
//! with the bundled nftables mode on the fake kernel: each set reaches the
//! mode, the external and short-circuit ones have their own policy ids only
//! while they differ, and the counters see the right sets.

use super::tests::nftables_over_fake;
use super::*;

/// A NodePort Service `t/web` with `spec` extra, over endpoints
/// (ip, node): this node is `n`.
fn web(spec: &str, endpoints: &[(&str, &str)]) -> ClusterState {
    let service: k8s_openapi::api::core::v1::Service = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: web, namespace: t}}\nspec: {{type: NodePort, clusterIP: 10.0.0.1, {spec} ports: [{{port: 80, nodePort: 30080}}]}}\n"
    ))
    .unwrap();
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, node)| format!("{{addresses: ['{ip}'], nodeName: {node}}}"))
        .collect();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        eps.join(", ")
    ))
    .unwrap();
    let mut state = ClusterState::new("n");
    state.replace_all(&[service], &[slice], None);
    state
}

fn sync_to(proxier: &mut Proxier, state: &mut ClusterState) {
    let changes = state.take_changes();
    proxier.sync(changes, state).unwrap();
}

#[test]
fn internal_local_external_cluster_hands_the_mode_both_sets() {
    let (mut proxier, fake) = nftables_over_fake();
    let mut state = web(
        "internalTrafficPolicy: Local,",
        &[("10.1.0.1", "n"), ("10.1.0.2", "other")],
    );
    sync_to(&mut proxier, &mut state);
    let kernel = fake.dump();
    // The remote endpoint exists only for node-port traffic.
    assert!(kernel.contains("10.1.0.2"), "{kernel}");
    let id = proxier.ids.values().copied().next().unwrap();
    assert_eq!(
        proxier.policies.held_ids(),
        [id, policies::external_id(id)],
        "the external set under its own id"
    );
    let shown: Vec<crate::inspect::ServiceInfo> =
        serde_json::from_str(&proxier.inspect.json()).unwrap();
    assert_eq!(shown[0].endpoints, 2, "both sets, each endpoint once");
    assert_eq!(proxier.no_local_endpoints(), (0, 0));

    // Both policies Cluster: one set, one id; the external one is released.
    let mut state = web("", &[("10.1.0.1", "n"), ("10.1.0.2", "other")]);
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids(), [id]);

    // Back to two sets, then the Service goes: nothing is left behind.
    let mut state = web(
        "internalTrafficPolicy: Local,",
        &[("10.1.0.1", "n"), ("10.1.0.2", "other")],
    );
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids().len(), 2);
    state.replace_all(&[], &[], None);
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids(), Vec::<u32>::new());
}

#[test]
fn no_local_endpoints_counts_only_while_the_service_has_endpoints_elsewhere() {
    let (mut proxier, fake) = nftables_over_fake();
    let mut state = web(
        "internalTrafficPolicy: Local, externalTrafficPolicy: Local,",
        &[("10.1.0.2", "other")],
    );
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.no_local_endpoints(), (1, 1));
    let kernel = fake.dump();
    assert!(
        kernel.contains("30080 : drop"),
        "endpoints elsewhere: drop\n{kernel}"
    );

    let mut state = web(
        "internalTrafficPolicy: Local, externalTrafficPolicy: Local,",
        &[],
    );
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.no_local_endpoints(), (0, 0), "no endpoint at all");
    let kernel = fake.dump();
    assert!(
        kernel.contains("30080 : goto reject-chain"),
        "none at all: reject\n{kernel}"
    );
}

/// The policy's calls so far (set-endpoints, plan, ...).
fn policy_calls(proxier: &Proxier) -> u64 {
    proxier
        .plugin_stats()
        .into_iter()
        .find(|(name, _)| name == "round-robin")
        .map_or(0, |(_, stats)| {
            stats.calls.load(std::sync::atomic::Ordering::Relaxed)
        })
}

/// Upstream's short-circuit: under both policies Local, this node's pods
/// and the node itself reach the node port through the cluster-wide set,
/// which here is more than the internal (local) one: it gets its own
/// policy id and plan, and is released when it equals the internal set.
#[test]
fn both_policies_local_give_the_short_circuit_the_cluster_wide_set() {
    let (mut proxier, fake) = nftables_over_fake();
    let both_local = "internalTrafficPolicy: Local, externalTrafficPolicy: Local,";
    let mut state = web(both_local, &[("10.1.0.1", "n"), ("10.1.0.2", "other")]);
    sync_to(&mut proxier, &mut state);
    let id = proxier.ids.values().copied().next().unwrap();
    assert_eq!(
        proxier.policies.held_ids(),
        [id, policies::cluster_id(id)],
        "internal and external are the same local set; the short-circuit its own"
    );
    let kernel = fake.dump();
    assert!(
        kernel.contains("fib saddr type local goto cluster-t.web._.tcp"),
        "the node's own traffic goes to the cluster-wide chain\n{kernel}"
    );
    assert!(
        kernel.contains("dnat to 10.1.0.2:8080"),
        "the remote endpoint is reachable through it\n{kernel}"
    );
    let shown: Vec<crate::inspect::ServiceInfo> =
        serde_json::from_str(&proxier.inspect.json()).unwrap();
    assert_eq!(shown[0].endpoints, 2, "every set's endpoints, once");

    // Only the local endpoint left: the cluster-wide set is the internal
    // one, its id is released and no plan is asked for it.
    let mut state = web(both_local, &[("10.1.0.1", "n")]);
    let before = policy_calls(&proxier);
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids(), [id]);
    // set-endpoints and plan of the one set, and the release of the other.
    assert_eq!(policy_calls(&proxier) - before, 3);
    let kernel = fake.dump();
    assert!(
        kernel.contains("fib saddr type local goto svc-t.web._.tcp"),
        "{kernel}"
    );
    assert!(!kernel.contains("cluster-t.web"), "{kernel}");

    // Only the remote endpoint: no local set, yet the external chain
    // exists for the short-circuit; outside traffic falls through to the
    // drop of a node port with no local endpoint.
    let mut state = web(both_local, &[("10.1.0.2", "other")]);
    sync_to(&mut proxier, &mut state);
    assert_eq!(
        proxier.policies.held_ids(),
        [id, policies::cluster_id(id)],
        "the empty local set and the cluster-wide one"
    );
    let kernel = fake.dump();
    for wanted in [
        "30080 : goto ext-t.web._.tcp",
        "30080 : drop",
        "fib saddr type local goto cluster-t.web._.tcp",
    ] {
        assert!(kernel.contains(wanted), "no {wanted:?} in\n{kernel}");
    }
    state.replace_all(&[], &[], None);
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids(), Vec::<u32>::new());
}

/// Under internalTrafficPolicy Cluster the short-circuit set is the
/// internal one: no id, no plan, no chain of its own; under
/// externalTrafficPolicy Cluster there is none at all.
#[test]
fn a_short_circuit_set_equal_to_the_internal_one_costs_nothing() {
    let (mut proxier, fake) = nftables_over_fake();
    let eps = [("10.1.0.1", "n"), ("10.1.0.2", "other")];
    let mut state = web("externalTrafficPolicy: Local,", &eps);
    sync_to(&mut proxier, &mut state);
    let id = proxier.ids.values().copied().next().unwrap();
    assert_eq!(
        proxier.policies.held_ids(),
        [id, policies::external_id(id)],
        "the external (local) set differs, the short-circuit set does not"
    );
    let kernel = fake.dump();
    assert!(
        kernel.contains("fib saddr type local goto svc-t.web._.tcp"),
        "{kernel}"
    );
    assert!(!kernel.contains("cluster-t.web"), "{kernel}");
    // An endpoint change re-renders: two sets, two pushes and two plans.
    let before = policy_calls(&proxier);
    let mut state = web(
        "externalTrafficPolicy: Local,",
        &[("10.1.0.1", "n"), ("10.1.0.3", "other")],
    );
    sync_to(&mut proxier, &mut state);
    assert_eq!(policy_calls(&proxier) - before, 4);

    let mut state = web("", &eps);
    let before = policy_calls(&proxier);
    sync_to(&mut proxier, &mut state);
    assert_eq!(proxier.policies.held_ids(), [id]);
    assert_eq!(
        policy_calls(&proxier) - before,
        3,
        "one push, one plan, the external set's release"
    );
}
