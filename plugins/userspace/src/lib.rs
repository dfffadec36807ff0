//! The userspace proxy mode: every service-port becomes one host listener
//! that accepts the Service's frontends (cluster IPs, external IPs,
//! load-balancer IPs, node port) and forwards to the endpoint the
//! service's policy picks. The host does the forwarding; this plugin only
//! says which listeners exist.

use kwp_sdk::mode::{Fragment, Item, Listener};
use kwp_sdk::mode::{IpAddress, IpMode, Protocol, ServicePort};
use kwp_sdk::mode::{Mode, ModeConfig, ServiceEndpoints};

/// UDP flows idle this long are closed (upstream userspace mode: 250 ms was
/// its default for short-lived DNS-style flows; we favour longer flows).
const UDP_IDLE_TIMEOUT_MS: u32 = 30_000;

#[derive(Default)]
pub struct Userspace {
    node_addresses: Vec<IpAddress>,
}

impl Mode for Userspace {
    fn configure(&mut self, config: ModeConfig) -> Result<(), String> {
        self.node_addresses = config.node.addresses;
        Ok(())
    }

    fn render_base(&mut self) -> Result<Fragment, String> {
        Ok(Fragment { items: Vec::new() })
    }

    /// The host picks each connection's endpoint from the internal set.
    fn render_service(
        &mut self,
        service: ServicePort,
        _: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        Ok(Fragment {
            items: vec![Item::Listener(listener(&service, &self.node_addresses))],
        })
    }
}

fn listener(svc: &ServicePort, node_addresses: &[IpAddress]) -> Listener {
    let mut frontends: Vec<(IpAddress, u16)> = Vec::new();
    let mut add = |ip: IpAddress, port: u16| {
        if !frontends.contains(&(ip, port)) {
            frontends.push((ip, port));
        }
    };
    for ip in svc.cluster_ips.iter().chain(&svc.external_ips) {
        add(*ip, svc.port);
    }
    // ipMode Proxy: the load balancer delivers to the node itself, so the
    // ingress IP must not be captured locally.
    for lb in svc
        .load_balancer_ingress
        .iter()
        .filter(|lb| lb.ip_mode == IpMode::Vip)
    {
        add(lb.ip, svc.port);
    }
    if let Some(node_port) = svc.node_port {
        node_addresses.iter().for_each(|ip| add(*ip, node_port));
    }
    Listener {
        service: svc.id,
        protocol: svc.protocol,
        frontends,
        udp_idle_timeout_ms: if svc.protocol == Protocol::Udp {
            UDP_IDLE_TIMEOUT_MS
        } else {
            0
        },
    }
}

kwp_sdk::export_mode!(Userspace);
