//! The bookkeeping a sync keeps as it goes instead of scanning every
//! service port (no-local-endpoint totals, health-check counts, retries by
//! name) must equal what a scan would find, change after change.

use super::tests::nftables_over_fake;
use super::*;

/// Service `t/name` with both traffic policies Local and a health-check
/// node port, on 10.0.2.`i`.
fn local_service(name: &str, i: usize, health_port: u16) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "t"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": format!("10.0.2.{i}"),
            "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": health_port,
            "ports": [{"port": 80, "nodePort": 30000 + i}],
        },
    }))
    .expect("a valid Service")
}

/// `name`'s slice: one endpoint on each of `nodes` (this node is `n`).
fn slice_on(name: &str, nodes: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let endpoints: Vec<serde_json::Value> = nodes
        .iter()
        .enumerate()
        .map(|(k, node)| {
            serde_json::json!({
                "addresses": [format!("10.1.{}.{}", name.len(), k + 1)],
                "conditions": {"ready": true},
                "nodeName": node,
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

/// What `no_local_endpoints` was before it was kept as a running total.
fn recount(proxier: &Proxier) -> (u64, u64) {
    proxier.no_local.values().fold((0, 0), |(i, e), (ni, ne)| {
        (i + u64::from(*ni), e + u64::from(*ne))
    })
}

#[test]
fn running_totals_and_health_counts_follow_every_change() {
    let (mut proxier, _fake) = nftables_over_fake();
    let mut state = ClusterState::new("n");
    let names = ["a", "bb", "ccc", "dddd"];
    for (i, name) in names.iter().enumerate() {
        state.upsert_service(&local_service(name, i + 1, 31000 + i as u16));
        state.upsert_slice(&slice_on(name, &["other"]));
    }
    proxier.sync(state.take_changes(), &state).unwrap();
    assert_eq!(proxier.no_local_endpoints(), (4, 4));
    assert!(std::mem::take(&mut proxier.health_changed));
    // Each step: the change, then (internal, external) totals and a's
    // local endpoint count as a scan finds them.
    let steps: [(&str, &[&str]); 5] = [
        ("a", &["n"]),
        ("bb", &["n", "n"]),
        ("a", &["other", "n"]),
        ("ccc", &[]),
        ("a", &["other"]),
    ];
    for (name, nodes) in steps {
        let before = proxier.health_wanted.clone();
        state.upsert_slice(&slice_on(name, nodes));
        proxier.sync(state.take_changes(), &state).unwrap();
        assert_eq!(
            proxier.no_local_endpoints(),
            recount(&proxier),
            "after {name} -> {nodes:?}"
        );
        let moved = proxier.health_wanted != before;
        assert_eq!(
            std::mem::take(&mut proxier.health_changed),
            moved,
            "health servers told of a change exactly when a count moved ({name} -> {nodes:?})"
        );
    }
    let a = crate::model::ObjectKey::new("t", "a");
    assert_eq!(proxier.health_wanted.get(&a), Some(&(31000, 0)));
    // A sync with nothing to do touches neither.
    proxier.sync(Changes::default(), &state).unwrap();
    assert!(!proxier.health_changed);
    // Removals leave the totals too.
    state.delete_service(&a);
    state.delete_service(&crate::model::ObjectKey::new("t", "dddd"));
    proxier.sync(state.take_changes(), &state).unwrap();
    assert_eq!(proxier.no_local_endpoints(), recount(&proxier));
    assert_eq!(
        proxier.no_local_endpoints(),
        (0, 0),
        "bb is local, ccc has none"
    );
    assert!(proxier.health_changed && !proxier.health_wanted.contains_key(&a));
}
