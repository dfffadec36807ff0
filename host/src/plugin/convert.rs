//! Model types -> WIT types, at the plugin boundary.

use std::net::IpAddr;

use super::bindings::types as wit;
use crate::model::{
    BackendPlan, Cidr, Endpoint, IpMode, NodeInfo, Protocol, ServicePort, TrafficPolicy,
};

pub fn ip_to_wit(ip: IpAddr) -> wit::IpAddress {
    match ip {
        IpAddr::V4(v4) => wit::IpAddress::V4(v4.to_bits()),
        IpAddr::V6(v6) => {
            let bits = v6.to_bits();
            wit::IpAddress::V6(((bits >> 64) as u64, bits as u64))
        }
    }
}

pub fn ip_from_wit(ip: wit::IpAddress) -> IpAddr {
    match ip {
        wit::IpAddress::V4(bits) => IpAddr::V4(bits.into()),
        wit::IpAddress::V6((hi, lo)) => {
            IpAddr::V6(((u128::from(hi) << 64) | u128::from(lo)).into())
        }
    }
}

pub fn protocol_to_wit(p: Protocol) -> wit::Protocol {
    match p {
        Protocol::Tcp => wit::Protocol::Tcp,
        Protocol::Udp => wit::Protocol::Udp,
        Protocol::Sctp => wit::Protocol::Sctp,
    }
}

pub fn protocol_from_wit(p: wit::Protocol) -> Protocol {
    match p {
        wit::Protocol::Tcp => Protocol::Tcp,
        wit::Protocol::Udp => Protocol::Udp,
        wit::Protocol::Sctp => Protocol::Sctp,
    }
}

fn policy_to_wit(p: TrafficPolicy) -> wit::TrafficPolicy {
    match p {
        TrafficPolicy::Cluster => wit::TrafficPolicy::Cluster,
        TrafficPolicy::Local => wit::TrafficPolicy::Local,
    }
}

fn cidr_to_wit(c: &Cidr) -> wit::Cidr {
    wit::Cidr {
        address: ip_to_wit(c.address),
        prefix_len: c.prefix_len,
    }
}

pub fn endpoint_to_wit(ep: &Endpoint) -> wit::Endpoint {
    wit::Endpoint {
        address: ip_to_wit(ep.ip),
        port: ep.port,
        ready: ep.ready,
        serving: ep.serving,
        terminating: ep.terminating,
        node_name: ep.node_name.as_deref().map(Into::into),
        zone: ep.zone.as_deref().map(Into::into),
        zone_hints: ep.zone_hints.to_vec(),
        node_hints: ep.node_hints.to_vec(),
        is_local: ep.is_local,
    }
}

/// `id` is the host's stable number for the service port; `lb_policy` the
/// resolved policy name.
pub fn service_to_wit(id: u32, svc: &ServicePort, lb_policy: &str) -> wit::ServicePort {
    wit::ServicePort {
        id,
        namespace: svc.name.namespace.to_string(),
        name: svc.name.name.to_string(),
        port_name: svc.name.port.to_string(),
        protocol: protocol_to_wit(svc.name.protocol),
        cluster_ips: svc.cluster_ips.iter().copied().map(ip_to_wit).collect(),
        port: svc.port,
        node_port: svc.node_port,
        external_ips: svc.external_ips.iter().copied().map(ip_to_wit).collect(),
        load_balancer_ingress: svc
            .load_balancer_ingress
            .iter()
            .map(|(ip, mode)| wit::LoadBalancerIngress {
                ip: ip_to_wit(*ip),
                ip_mode: if *mode == IpMode::Proxy {
                    wit::IpMode::Proxy
                } else {
                    wit::IpMode::Vip
                },
            })
            .collect(),
        source_ranges: svc.source_ranges.iter().map(cidr_to_wit).collect(),
        session_affinity: match svc.affinity_timeout {
            Some(t) => wit::SessionAffinity::ClientIp(t),
            None => wit::SessionAffinity::None,
        },
        external_traffic_policy: policy_to_wit(svc.external_policy),
        internal_traffic_policy: policy_to_wit(svc.internal_policy),
        health_check_node_port: svc.health_check_node_port,
        lb_policy: lb_policy.into(),
        lb_policy_config: svc.lb_policy_config.clone(),
    }
}

pub fn node_to_wit(node: &NodeInfo) -> wit::NodeInfo {
    wit::NodeInfo {
        name: node.name.clone(),
        addresses: node.addresses.iter().copied().map(ip_to_wit).collect(),
        zone: node.zone.clone(),
        labels: node.labels.clone(),
    }
}

pub fn plan_to_wit(plan: &BackendPlan) -> wit::BackendPlan {
    match plan {
        BackendPlan::Weights(w) => wit::BackendPlan::Weights(w.clone()),
        BackendPlan::Slots(s) => wit::BackendPlan::Slots(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_as_integers() {
        for s in ["10.0.0.1", "255.255.255.255", "::1", "fd00:1:2:3:4:5:6:7"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_wit(ip_to_wit(ip)), ip);
        }
        assert_eq!(
            ip_to_wit("10.0.0.1".parse().unwrap()),
            wit::IpAddress::V4(0x0a00_0001)
        );
        assert_eq!(
            ip_to_wit("::1".parse().unwrap()),
            wit::IpAddress::V6((0, 1))
        );
    }
}

pub fn plan_from_wit(p: wit::BackendPlan) -> BackendPlan {
    match p {
        wit::BackendPlan::Weights(w) => BackendPlan::Weights(w),
        wit::BackendPlan::Slots(s) => BackendPlan::Slots(s),
    }
}
