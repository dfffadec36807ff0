//! Typed fixtures: a Service and its EndpointSlice over pods of a namespace
//! cluster, built step by step (as upstream's `makeTestService`) from the
//! Kubernetes API types and written as the YAML the file source reads.
//!
//! ```ignore
//! TestService::new(&c, "web", "10.96.0.11").node_port(30080).pods(&["pod-a", "pod-c"]).yaml()
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::topology::{Cluster, POD_PORT};

/// Namespace of every fixture.
pub const NAMESPACE: &str = "t";

/// A Service with one port `p` (80 -> the pods' 8080) and its EndpointSlice.
pub struct TestService<'c> {
    cluster: &'c Cluster,
    pub service: Service,
    pub slice: EndpointSlice,
}

impl<'c> TestService<'c> {
    /// A TCP ClusterIP Service at `ip` with no endpoints.
    pub fn new(cluster: &'c Cluster, name: &str, ip: &str) -> Self {
        let service = Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(vec![ServicePort {
                    name: Some("p".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::Int(POD_PORT.into())),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-1")),
                namespace: Some(NAMESPACE.into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".into(),
                    name.into(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("p".into()),
                port: Some(POD_PORT.into()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            endpoints: Vec::new(),
        };
        Self {
            cluster,
            service,
            slice,
        }
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.service.spec.get_or_insert_default()
    }

    fn port(&mut self) -> &mut ServicePort {
        &mut self.spec().ports.get_or_insert_default()[0]
    }

    /// The port's protocol (`UDP`, `SCTP`), on the Service and the slice.
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.port().protocol = Some(protocol.into());
        for p in self.slice.ports.iter_mut().flatten() {
            p.protocol = Some(protocol.into());
        }
        self
    }

    /// Type NodePort (unless already LoadBalancer) on `port`.
    pub fn node_port(mut self, port: i32) -> Self {
        let spec = self.spec();
        if spec.type_.as_deref() != Some("LoadBalancer") {
            spec.type_ = Some("NodePort".into());
        }
        self.port().node_port = Some(port);
        self
    }

    /// Type LoadBalancer on node port `port`.
    pub fn load_balancer(mut self, port: i32) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        self.node_port(port)
    }

    pub fn external_traffic_local(mut self) -> Self {
        self.spec().external_traffic_policy = Some("Local".into());
        self
    }

    pub fn internal_traffic_local(mut self) -> Self {
        self.spec().internal_traffic_policy = Some("Local".into());
        self
    }

    /// ClientIP session affinity of `seconds`.
    pub fn affinity(mut self, seconds: i32) -> Self {
        let spec = self.spec();
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(seconds),
            }),
        });
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.spec().external_ips = Some(ips.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn source_ranges(mut self, cidrs: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(cidrs.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    /// A load-balancer ingress IP in the status; `ip_mode` `Proxy` or none.
    pub fn ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
        let status = self.service.status.get_or_insert_default();
        let lb = status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        lb.ingress
            .get_or_insert_default()
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: ip_mode.map(Into::into),
                ..Default::default()
            });
        self
    }

    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.service
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(key.into(), value.into());
        self
    }

    /// Ready endpoints on the named pods, with the node each runs on.
    pub fn pods(mut self, names: &[&str]) -> Self {
        for name in names {
            let endpoint = self.endpoint_of(name);
            self.slice.endpoints.push(endpoint);
        }
        self
    }

    /// Serving but terminating endpoints (not ready) on the named pods: a
    /// pod being deleted that still answers.
    pub fn draining_pods(mut self, names: &[&str]) -> Self {
        for name in names {
            let mut endpoint = self.endpoint_of(name);
            endpoint.conditions = Some(EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
            });
            self.slice.endpoints.push(endpoint);
        }
        self
    }

    /// A ready endpoint on pod `name` (its node set), for a caller to adjust.
    pub fn endpoint_of(&self, name: &str) -> Endpoint {
        let pod = self.cluster.pod(name);
        Endpoint {
            addresses: vec![pod.ip.into()],
            node_name: Some(if pod.local { "node-1" } else { "node-2" }.into()),
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The Service and its slice as YAML documents, each ended by `---`.
    pub fn yaml(&self) -> String {
        let service = serde_yaml_ng::to_string(&self.service).expect("a Service serialises");
        let slice = serde_yaml_ng::to_string(&self.slice).expect("a slice serialises");
        format!("{service}---\n{slice}---\n")
    }
}
