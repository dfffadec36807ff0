//! Kubernetes allows Services with tens of thousands of endpoints: such a
//! Service is programmed, and never holds back a small one.

use super::*;

/// One EndpointSlice of `count` ready endpoints (10.1.x.y) of `service`.
fn slice(
    service: &str,
    index: usize,
    count: usize,
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let endpoints: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let n = index * count + i;
            serde_json::json!({
                "addresses": [format!("10.1.{}.{}", n / 250, n % 250 + 1)],
                "conditions": {"ready": true},
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{service}-{index}"),
            "namespace": "big",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .expect("a valid EndpointSlice")
}

fn service(name: &str, ip: &str, policy: &str) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": "big",
            "annotations": {"kube-wasm-proxy.io/lb-policy": policy},
        },
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("a valid Service")
}

#[test]
fn a_service_of_20000_endpoints_is_programmed_beside_a_small_one_with_every_policy() {
    for policy in [
        "round-robin",
        "random",
        "weighted",
        "least-connections",
        "maglev",
    ] {
        let started = std::time::Instant::now();
        huge_and_small(policy);
        eprintln!("{policy}: {:?}", started.elapsed());
    }
}

fn huge_and_small(policy: &str) {
    let (_, bytes) = Catalog::new(None).load("nftables").unwrap();
    // A base deadline below what 20,000 endpoints cost (~90 ms here), so
    // only the share per endpoint lets the Service through.
    let limits = crate::plugin::Limits {
        call_timeout: Duration::from_millis(10),
        ..crate::plugin::Limits::default()
    };
    let runtime = Runtime::new(limits).unwrap();
    let dataplane = Box::new(crate::dataplane::NoDataplane);
    let mut proxier = super::tests::proxier_in(runtime, "nftables", &bytes, "", dataplane);
    let mut state = ClusterState::new("n");
    let services = [
        service("huge", "10.0.0.1", policy),
        service("small", "10.0.0.2", policy),
    ];
    // The API server caps a slice at 1,000 endpoints.
    let mut slices: Vec<_> = (0..20).map(|i| slice("huge", i, 1000)).collect();
    slices.push(slice("small", 100, 2));
    state.replace_all(&services, &slices, None);
    let changes = state.take_changes();
    proxier.sync(changes, &state).unwrap();
    assert_eq!(
        proxier.stats.failed_services, 0,
        "{policy}: {:?}",
        proxier.failed
    );
    let programmed: Vec<String> = proxier
        .plan()
        .services
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(programmed.len(), 2, "{policy}: {programmed:?}");
    let rules = format!("{:?}", proxier.plan().services);
    assert!(
        rules.contains("10.1.79.250"),
        "{policy}: the last endpoint is in the rules"
    );
}
