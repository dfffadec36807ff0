//! Internal and external endpoint sets through the proxier, with the
//! bundled nftables mode on the fake kernel: each set reaches the mode, the
//! external one has its own policy id only while it differs, and the
//! counters see the right sets.

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
