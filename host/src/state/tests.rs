//! Conversion and snapshot semantics, from YAML as kubectl prints it.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::topology::categorize;
use super::*;
use crate::model::TrafficPolicy;

fn svc(yaml: &str) -> Service {
    serde_yaml_ng::from_str(yaml).expect("test Service parses")
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml_ng::from_str(yaml).expect("test EndpointSlice parses")
}

const WEB: &str = "metadata: {name: web, namespace: ns}\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']\n  ports:\n  - {name: http, port: 80, protocol: TCP}\n  - {name: dns, port: 53, protocol: UDP}\n";

fn web_slice(name: &str, ips: &[(&str, bool, bool, bool)]) -> EndpointSlice {
    let mut y = format!(
        "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n"
    );
    for (ip, ready, serving, terminating) in ips {
        y.push_str(&format!(
            "- addresses: ['{ip}']\n  nodeName: node-{}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n",
            if ip.ends_with('1') { "a" } else { "b" }
        ));
    }
    slice(&y)
}

fn state_with(services: &[Service], slices: &[EndpointSlice]) -> ClusterState {
    let mut s = ClusterState::new("node-a");
    s.replace_all(services, slices, None);
    s
}

#[test]
fn service_ports_carry_every_field() {
    let s = svc(r#"
metadata:
  name: lb
  namespace: ns
  annotations: {kube-wasm-proxy.io/lb-policy: maglev, kube-wasm-proxy.io/lb-policy-config: 'size=7'}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.5
  externalIPs: [192.0.2.9, not-an-ip]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  healthCheckNodePort: 31000
  loadBalancerSourceRanges: [' 203.0.113.0/24 ', bogus]
  sessionAffinity: ClientIP
  ports:
  - {port: 443, nodePort: 30443}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}]
"#);
    let mut warnings = Vec::new();
    let ports = convert::service_ports(&s, &mut |w| warnings.push(w)).unwrap();
    assert_eq!(ports.len(), 1);
    let p = &ports[0];
    assert_eq!(p.name.to_string(), "ns/lb/tcp");
    assert_eq!(p.node_port, Some(30443));
    assert_eq!(
        p.external_ips,
        ["192.0.2.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(p.source_ranges.len(), 1);
    assert_eq!(p.load_balancer_ingress[1].1, crate::model::IpMode::Proxy);
    assert_eq!(p.affinity_timeout, Some(convert::DEFAULT_AFFINITY_TIMEOUT));
    assert_eq!(
        (p.external_policy, p.internal_policy),
        (TrafficPolicy::Local, TrafficPolicy::Local)
    );
    assert_eq!(p.health_check_node_port, Some(31000));
    assert_eq!(p.lb_policy.as_deref(), Some("maglev"));
    assert_eq!(p.lb_policy_config, "size=7");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn external_traffic_policy_only_applies_to_external_types() {
    let s = svc(
        "metadata: {name: c}\nspec: {type: ClusterIP, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}\n",
    );
    let p = &convert::service_ports(&s, &mut |_| {}).unwrap()[0];
    assert_eq!(p.external_policy, TrafficPolicy::Cluster);
    assert_eq!(p.node_port, None, "a ClusterIP service has no node port");
    assert_eq!(p.health_check_node_port, None);
}

#[test]
fn skip_rules_match_upstream() {
    let cases = [
        (
            "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n",
            convert::Skip::Headless,
        ),
        (
            "metadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}\n",
            convert::Skip::ExternalName,
        ),
        (
            "metadata: {name: n}\nspec: {ports: [{port: 80}]}\n",
            convert::Skip::NoClusterIp,
        ),
        (
            "metadata: {name: p, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
            convert::Skip::Label(convert::LABEL_SERVICE_PROXY_NAME),
        ),
        (
            "metadata: {name: l, labels: {service.kubernetes.io/headless: ''}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
            convert::Skip::Label(convert::LABEL_HEADLESS),
        ),
    ];
    for (yaml, want) in cases {
        let s = svc(yaml);
        assert_eq!(
            convert::service_ports(&s, &mut |_| {}),
            Err(want.clone()),
            "{yaml}"
        );
        let mut state = ClusterState::new("node-a");
        assert_eq!(state.upsert_service(&s), Some(want));
        assert!(state.take_changes().updated.is_empty());
    }
}

#[test]
fn slices_merge_per_port_and_keep_conditions() {
    let state = &mut state_with(
        &[svc(WEB)],
        &[
            web_slice(
                "web-a",
                &[
                    ("10.1.0.1", true, true, false),
                    ("10.1.0.2", false, true, true),
                ],
            ),
            web_slice(
                "web-b",
                &[
                    ("10.1.0.3", false, false, true),
                    ("10.1.0.1", true, true, false),
                ],
            ),
        ],
    );
    let changes = state.take_changes();
    assert_eq!(changes.updated.len(), 2, "http and dns ports");
    let http = changes
        .updated
        .iter()
        .find(|s| &*s.port.name.port == "http")
        .unwrap();
    let ips: Vec<String> = http.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["10.1.0.1", "10.1.0.2", "10.1.0.3"],
        "merged, duplicate dropped"
    );
    let e2 = &http.endpoints[1];
    assert_eq!((e2.ready, e2.serving, e2.terminating), (false, true, true));
    assert!(http.endpoints[0].is_local && !e2.is_local);
    assert_eq!(http.endpoints[0].port, 8080);
    let dns = changes
        .updated
        .iter()
        .find(|s| &*s.port.name.port == "dns")
        .unwrap();
    assert!(dns.endpoints.is_empty(), "no slice port named dns");
}

#[test]
fn missing_conditions_default_like_upstream() {
    let s = slice(
        "metadata: {name: x, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 1}]\nendpoints: [{addresses: ['10.1.0.9']}]\n",
    );
    let eps = convert::slice_endpoints(&s, "node-a", &mut Default::default());
    let e = &eps[0].1[0];
    assert_eq!((e.ready, e.serving, e.terminating), (true, true, false));
    let fqdn = slice(
        "metadata: {name: f}\naddressType: FQDN\nports: [{port: 1}]\nendpoints: [{addresses: [example.com]}]\n",
    );
    assert!(convert::slice_endpoints(&fqdn, "n", &mut Default::default()).is_empty());
}

#[test]
fn only_changed_services_are_reported() {
    let other = svc(
        "metadata: {name: other, namespace: ns}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 81}]}\n",
    );
    let slices = [web_slice("web-a", &[("10.1.0.1", true, true, false)])];
    let mut state = state_with(&[svc(WEB), other.clone()], &slices);
    assert_eq!(state.take_changes().updated.len(), 3);

    state.replace_all(&[svc(WEB), other.clone()], &slices, None);
    assert!(state.take_changes().is_empty(), "same objects, no changes");

    let slices = [web_slice(
        "web-a",
        &[
            ("10.1.0.1", true, true, false),
            ("10.1.0.2", true, true, false),
        ],
    )];
    state.replace_all(&[svc(WEB), other.clone()], &slices, None);
    let changes = state.take_changes();
    let names: Vec<String> = changes
        .updated
        .iter()
        .map(|s| s.port.name.to_string())
        .collect();
    assert_eq!(
        names,
        ["ns/web:http/tcp"],
        "only the port whose endpoints changed"
    );

    state.replace_all(&[other], &slices, None);
    let changes = state.take_changes();
    assert_eq!(changes.removed.len(), 2);
    assert!(changes.updated.is_empty());
    assert_eq!(state.snapshot().count(), 1);
}

#[test]
fn a_service_port_is_held_once_however_many_views_it_is_in() {
    // The state's two views (as the objects say, as programmed) and the
    // changes share one copy of a service port that lost no frontend, and
    // its ports share their namespace and name: at 10k Services the copies
    // were 13 MiB of the heap.
    let mut state = state_with(
        &[svc(WEB)],
        &[web_slice("web-a", &[("10.1.0.1", true, true, false)])],
    );
    let changes = state.take_changes();
    assert_eq!(changes.updated.len(), 2);
    for updated in &changes.updated {
        let name = &updated.port.name;
        let (wanted, last) = (&state.wanted[name], &state.last[name]);
        assert!(Arc::ptr_eq(wanted, last), "{name}: two copies in the state");
        assert!(
            Arc::ptr_eq(updated, last),
            "{name}: copied into the changes"
        );
    }
    let [a, b] = [0, 1].map(|i| &changes.updated[i].port.name);
    assert!(Arc::ptr_eq(&a.namespace, &b.namespace) && Arc::ptr_eq(&a.name, &b.name));
}

#[test]
fn a_service_ports_endpoints_are_held_once_from_slice_to_policy() {
    // One slice port with every endpoint ready: the merged list is the
    // slice's own, categorizing keeps it (the policy's replay record then
    // shares it), and the port is the state's own copy. At 10k Services
    // the copies were ~20 MB of the heap (docs/performance.md).
    let ready = [
        ("10.1.0.1", true, true, false),
        ("10.1.0.2", true, true, false),
    ];
    let mut state = state_with(&[svc(WEB)], &[web_slice("web-a", &ready)]);
    let changes = state.take_changes();
    let http = (changes.updated.iter())
        .find(|s| &*s.port.name.port == "http")
        .unwrap();
    let key = ObjectKey::new("ns", "web");
    let from_slice = &state.slices[&key].get("web-a").unwrap()[0].1;
    assert!(
        Arc::ptr_eq(&http.endpoints, from_slice),
        "merged list copied"
    );
    assert!(
        (state.services[&key].iter()).any(|p| Arc::ptr_eq(p, &http.port)),
        "port copied"
    );
    let c = topology::categorize_shared(&http.port, &http.endpoints, &NodeInfo::default());
    assert!(
        Arc::ptr_eq(&c.cluster, &http.endpoints),
        "categorized list copied"
    );
    // Not all ready: a list of its own, filtered as before.
    let mixed = [
        ("10.1.0.1", true, true, false),
        ("10.1.0.2", false, true, true),
    ];
    let mut state = state_with(&[svc(WEB)], &[web_slice("web-a", &mixed)]);
    let changes = state.take_changes();
    let http = (changes.updated.iter())
        .find(|s| &*s.port.name.port == "http")
        .unwrap();
    let c = topology::categorize_shared(&http.port, &http.endpoints, &NodeInfo::default());
    let ips: Vec<String> = c.cluster.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.1.0.1"]);
}

#[test]
fn terminating_endpoints_are_used_only_when_nothing_is_ready() {
    let mut state = state_with(
        &[svc(WEB)],
        &[web_slice(
            "web-a",
            &[
                ("10.1.0.1", true, true, false),
                ("10.1.0.2", false, true, true),
                ("10.1.0.3", false, false, true),
            ],
        )],
    );
    let changes = state.take_changes();
    let http = changes
        .updated
        .iter()
        .find(|s| &*s.port.name.port == "http")
        .unwrap();
    let node = state.node().clone();
    let c = categorize(&http.port, &http.endpoints, &node);
    assert_eq!(c.cluster.len(), 1, "the ready one only");

    state.replace_all(
        &[svc(WEB)],
        &[web_slice(
            "web-a",
            &[
                ("10.1.0.2", false, true, true),
                ("10.1.0.3", false, false, true),
            ],
        )],
        None,
    );
    let changes = state.take_changes();
    let http = changes
        .updated
        .iter()
        .find(|s| &*s.port.name.port == "http")
        .unwrap();
    let c = categorize(&http.port, &http.endpoints, &node);
    let ips: Vec<String> = c.cluster.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["10.1.0.2"],
        "serving+terminating fallback, not the non-serving one"
    );
    assert!(c.has_any);
}

/// The web Service's first port, ready endpoints at `ips` as node-a sees
/// them (those ending in 1 are on node-a), and node-a in zone-2: the setup
/// of the categorisation tests.
fn web_port_on_node_a(ips: &[&str]) -> (ServicePort, Vec<Endpoint>, NodeInfo) {
    let port = convert::service_ports(&svc(WEB), &mut |_| {})
        .unwrap()
        .remove(0);
    let ready: Vec<_> = ips.iter().map(|ip| (*ip, true, true, false)).collect();
    let endpoints =
        convert::slice_endpoints(&web_slice("w", &ready), "node-a", &mut Default::default())
            .into_iter()
            .flat_map(|(_, e)| e.to_vec())
            .collect();
    let node = NodeInfo {
        name: "node-a".into(),
        zone: Some("zone-2".into()),
        ..NodeInfo::default()
    };
    (port, endpoints, node)
}

#[test]
fn local_policies_use_local_endpoints_and_topology_hints_filter() {
    let (mut port, mut endpoints, node) = web_port_on_node_a(&["10.1.0.1", "10.1.0.2"]);

    port.internal_policy = TrafficPolicy::Local;
    let c = categorize(&port, &endpoints, &node);
    assert_eq!(c.internal(&port).len(), 1);
    assert_eq!(c.internal(&port)[0].ip.to_string(), "10.1.0.1");

    port.internal_policy = TrafficPolicy::Cluster;
    endpoints[0].zone_hints = ["zone-1".into()].into();
    endpoints[1].zone_hints = ["zone-2".into()].into();
    let c = categorize(&port, &endpoints, &node);
    let ips: Vec<String> = c.cluster.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.1.0.2"], "zone hints for this node's zone");

    endpoints[1].zone_hints = Box::default();
    assert_eq!(
        categorize(&port, &endpoints, &node).cluster.len(),
        2,
        "hints ignored unless every endpoint has them"
    );

    // No local endpoint under a Local policy: empty set but not "no endpoints" (drop, not reject).
    port.internal_policy = TrafficPolicy::Local;
    for e in &mut endpoints {
        e.is_local = false;
    }
    let c = categorize(&port, &endpoints, &node);
    assert!(c.internal(&port).is_empty() && c.has_any);
}

/// A Service `name` created at `created` (seconds), with `spec` lines.
fn svc_at(name: &str, created: &str, spec: &str) -> Service {
    svc(&format!(
        "metadata: {{name: {name}, namespace: ns, creationTimestamp: '{created}'}}\nspec:\n{spec}"
    ))
}

#[test]
fn a_shared_frontend_belongs_to_the_oldest_service_until_it_goes() {
    let ext =
        "  type: NodePort\n  externalIPs: [192.0.2.1]\n  ports: [{port: 80, nodePort: 30080}]\n";
    let old = svc_at(
        "old",
        "2024-01-01T00:00:00Z",
        &format!("  clusterIP: 10.0.0.1\n{ext}"),
    );
    let young = svc_at(
        "young",
        "2025-01-01T00:00:00Z",
        &format!("  clusterIP: 10.0.0.2\n{ext}"),
    );
    // The younger one arrives first: it is programmed whole until the
    // older one appears.
    let mut s = ClusterState::new("node-a");
    s.upsert_service(&young);
    let first = s.take_changes();
    assert_eq!(first.updated[0].port.external_ips.len(), 1);
    s.upsert_service(&old);
    let changes = s.take_changes();
    let by_name = |c: &Changes, n: &str| {
        c.updated
            .iter()
            .find(|u| &*u.port.name.name == n)
            .map(|u| u.port.clone())
    };
    let young_port =
        by_name(&changes, "young").expect("the younger Service loses its shared frontends");
    assert!(young_port.external_ips.is_empty());
    assert_eq!(young_port.node_port, None);
    assert_eq!(
        young_port.cluster_ips,
        ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let old_port = by_name(&changes, "old").unwrap();
    assert_eq!(old_port.external_ips.len(), 1);
    assert_eq!(old_port.node_port, Some(30080));
    assert_eq!(s.frontend_conflicts(), 2);

    // The owner is deleted: the younger Service takes both over.
    s.delete_service(&crate::model::ObjectKey::new("ns", "old"));
    let changes = s.take_changes();
    assert_eq!(changes.removed.len(), 1);
    let young_port = by_name(&changes, "young").expect("re-programmed with the freed frontends");
    assert_eq!(young_port.external_ips.len(), 1);
    assert_eq!(young_port.node_port, Some(30080));
    assert_eq!(s.frontend_conflicts(), 0);
    assert_eq!(s.snapshot().count(), 1);
}

#[test]
fn the_same_cluster_ip_twice_programs_only_the_owner() {
    let spec = "  clusterIP: 10.0.0.1\n  ports: [{port: 80}]\n";
    let a = svc_at("a", "2024-01-01T00:00:00Z", spec);
    let b = svc_at("b", "2024-06-01T00:00:00Z", spec);
    let mut s = state_with(&[b, a], &[]);
    s.take_changes();
    let programmed: Vec<String> = s
        .snapshot()
        .map(|st| st.port.name.name.to_string())
        .collect();
    assert_eq!(
        programmed,
        ["a"],
        "no Service is programmed without its cluster IP"
    );
    assert_eq!(s.frontend_conflicts(), 1);
}

/// The file source has no API server to keep node ports in its range: a
/// Service could otherwise take the node's port 22.
#[test]
fn node_ports_outside_the_range_are_not_programmed_when_no_api_server_checked_them() {
    let s = svc(r#"
metadata: {name: np, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.6
  externalTrafficPolicy: Local
  healthCheckNodePort: 1
  ports:
  - {name: ssh, port: 2222, nodePort: 22}
  - {name: web, port: 80, nodePort: 30080}
"#);
    let node_ports = |state: &mut ClusterState| -> Vec<(String, Option<u16>, Option<u16>)> {
        state.replace_all(std::slice::from_ref(&s), &[], None);
        state
            .take_changes()
            .updated
            .iter()
            .map(|u| {
                (
                    u.port.name.port.to_string(),
                    u.port.node_port,
                    u.port.health_check_node_port,
                )
            })
            .collect()
    };
    let mut checked = ClusterState::new("node-a").with_node_port_range(Some(30000..=32767));
    assert_eq!(
        node_ports(&mut checked),
        [
            ("ssh".into(), None, None),
            ("web".into(), Some(30080), None)
        ]
    );
    // From the API server: its own range was enforced there.
    let mut trusted = ClusterState::new("node-a");
    assert_eq!(
        node_ports(&mut trusted),
        [
            ("ssh".into(), Some(22), Some(1)),
            ("web".into(), Some(30080), Some(1))
        ]
    );
}

/// Upstream's UsesClusterEndpoints: a port with a node port needs the
/// cluster-wide set (topology applied) even under both policies Local, for
/// the short-circuit of this node's pods and the node itself; without
/// external frontends, or under externalTrafficPolicy Cluster, there is no
/// short-circuit set.
#[test]
fn both_policies_local_with_a_node_port_keep_the_cluster_wide_set() {
    let (mut port, mut endpoints, node) = web_port_on_node_a(&["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    endpoints[1].is_local = false;
    endpoints[2].is_local = false;
    for (e, zone) in endpoints.iter_mut().zip(["zone-1", "zone-2", "zone-2"]) {
        e.zone_hints = [zone.into()].into();
    }
    port.internal_policy = TrafficPolicy::Local;
    port.external_policy = TrafficPolicy::Local;
    let ips = |eps: &[Endpoint]| -> Vec<String> { eps.iter().map(|e| e.ip.to_string()).collect() };

    port.node_port = None;
    let c = categorize(&port, &endpoints, &node);
    assert!(c.short_circuit(&port).is_empty(), "no external frontend");
    assert_eq!(ips(c.internal(&port)), ["10.1.0.1"]);

    port.node_port = Some(30080);
    let c = categorize(&port, &endpoints, &node);
    assert_eq!(ips(c.internal(&port)), ["10.1.0.1"]);
    assert_eq!(ips(c.external(&port)), ["10.1.0.1"]);
    assert_eq!(
        ips(c.short_circuit(&port)),
        ["10.1.0.2", "10.1.0.3"],
        "cluster-wide, with this zone's hints"
    );

    port.external_policy = TrafficPolicy::Cluster;
    let c = categorize(&port, &endpoints, &node);
    assert!(
        c.short_circuit(&port).is_empty(),
        "the external set is cluster-wide"
    );
    assert_eq!(ips(c.external(&port)), ["10.1.0.2", "10.1.0.3"]);
}
