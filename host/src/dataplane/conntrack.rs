//! Stale UDP conntrack entries. UDP has no connection to end, so after an
//! endpoint goes away the kernel keeps sending a flow's packets to it until
//! the entry times out; and packets sent while a Service had no endpoints
//! leave entries that bypass the DNAT added later. Upstream kube-proxy
//! deletes both; so do we, with the `conntrack` tool, after each applied
//! change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Endpoint, Protocol, ServicePort, ServicePortName};

/// What a UDP service port looked like at the last cleanup.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    frontends: Vec<IpAddr>,
    port: u16,
    node_port: Option<u16>,
    endpoints: BTreeSet<IpAddr>,
}

#[derive(Default)]
pub struct ConntrackCleaner {
    seen: BTreeMap<ServicePortName, Seen>,
    /// `conntrack` invocations that failed (metric).
    pub errors: u64,
}

impl ConntrackCleaner {
    /// Records the service port's new endpoints and flushes entries that
    /// point at endpoints it no longer has.
    pub fn updated(&mut self, svc: &ServicePort, endpoints: &[Endpoint]) {
        if svc.name.protocol != Protocol::Udp {
            return;
        }
        let mut frontends = svc.cluster_ips.clone();
        frontends.extend(&svc.external_ips);
        frontends.extend(svc.load_balancer_ingress.iter().map(|(ip, _)| *ip));
        let now = Seen {
            frontends,
            port: svc.port,
            node_port: svc.node_port,
            endpoints: endpoints.iter().map(|e| e.ip).collect(),
        };
        let before = self.seen.insert(svc.name.clone(), now.clone());
        match before {
            Some(before) => {
                for gone in before.endpoints.difference(&now.endpoints) {
                    self.flush_endpoint(&before, *gone);
                }
                if before.endpoints.is_empty() && !now.endpoints.is_empty() {
                    self.flush_frontends(&now);
                }
            }
            None if !now.endpoints.is_empty() => self.flush_frontends(&now),
            None => {}
        }
    }

    pub fn removed(&mut self, name: &ServicePortName) {
        if let Some(before) = self.seen.remove(name) {
            for ep in &before.endpoints {
                self.flush_endpoint(&before, *ep);
            }
        }
    }

    /// Entries from any frontend of the service that were DNATed to `ep`.
    fn flush_endpoint(&mut self, svc: &Seen, ep: IpAddr) {
        for ip in &svc.frontends {
            self.run(&[
                "-p",
                "udp",
                "--orig-dst",
                &ip.to_string(),
                "--orig-port-dst",
                &svc.port.to_string(),
                "--dst-nat",
                &ep.to_string(),
            ]);
        }
        if let Some(np) = svc.node_port {
            self.run(&[
                "-p",
                "udp",
                "--orig-port-dst",
                &np.to_string(),
                "--dst-nat",
                &ep.to_string(),
            ]);
        }
    }

    /// Entries to the service's frontends made while it had no endpoints.
    fn flush_frontends(&mut self, svc: &Seen) {
        for ip in &svc.frontends {
            self.run(&[
                "-p",
                "udp",
                "--orig-dst",
                &ip.to_string(),
                "--orig-port-dst",
                &svc.port.to_string(),
            ]);
        }
        if let Some(np) = svc.node_port {
            self.run(&["-p", "udp", "--orig-port-dst", &np.to_string()]);
        }
    }

    fn run(&mut self, filter: &[&str]) {
        let family = if filter.iter().any(|a| a.contains(':')) {
            "ipv6"
        } else {
            "ipv4"
        };
        let mut args = vec!["-D", "-f", family];
        args.extend_from_slice(filter);
        let status =
            crate::dataplane::tool::run("conntrack", &args, None, crate::dataplane::tool::DEADLINE)
                .map(|f| f.status);
        match status {
            // Exit code 1 means nothing matched, which is fine.
            Ok(s) if s.success() || s.code() == Some(1) => {}
            Ok(s) => {
                self.errors += 1;
                tracing::warn!(?filter, status = %s, "conntrack -D failed");
            }
            Err(e) => {
                self.errors += 1;
                tracing::warn!(error = %e, "cannot run conntrack (is the conntrack package installed?)");
            }
        }
    }
}
