//! API objects and the viewpoint the checker's unit tests share (nftables,
//! iptables and IPVS walkers alike).

use serde_json::{Value, json};

use super::{Api, Viewpoint};

pub fn view() -> Viewpoint {
    Viewpoint {
        node_name: "node-1".into(),
        client_v4: "203.0.113.2".parse().unwrap(),
        client_v6: "2001:db8:1::2".parse().unwrap(),
        in_interface: "eth-cli".into(),
    }
}

pub fn node() -> Value {
    json!({"metadata": {"name": "node-1"},
           "status": {"addresses": [{"type": "InternalIP", "address": "203.0.113.1"}]}})
}

pub fn service(name: &str, ip: &str, spec: Value) -> Value {
    let mut s = json!({"metadata": {"name": name, "namespace": "t"},
                       "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                                "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}});
    for (k, v) in spec.as_object().unwrap() {
        s["spec"][k] = v.clone();
    }
    s
}

/// A slice of `service`: (address, node, ready, serving, terminating).
pub fn slice(service: &str, eps: &[(&str, &str, bool, bool, bool)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node, ready, serving, terminating)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({"metadata": {"name": format!("{service}-1"), "namespace": "t",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

pub fn api(services: &[Value], slices: &[Value]) -> Api {
    Api {
        services: services
            .iter()
            .map(|s| serde_json::from_value(s.clone()).unwrap())
            .collect(),
        slices: slices
            .iter()
            .map(|s| serde_json::from_value(s.clone()).unwrap())
            .collect(),
        node: Some(serde_json::from_value(node()).unwrap()),
    }
}
