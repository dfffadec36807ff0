//! A starting point for a proxy mode: cluster IPs only, IPv4, in nftables.
//! It drives the host's nftables dataplane, so it is installed as
//! `nftables.wasm` in the plugin directory.
//!
//! The base is one verdict map, `cluster-ips` (cluster IP . protocol .
//! port), looked up from the NAT hooks. Each service-port adds chains of
//! its own: `svc-ID` spreads new connections over `ep-ID-N` in proportion to
//! the policy's weights, and each `ep-ID-N` DNATs to one endpoint. Node
//! ports, external and load-balancer IPs, masquerading, session affinity
//! and IPv6 are left out; the bundled nftables mode (plugins/nftables) has
//! them all.

use std::net::Ipv4Addr;

use kwp_sdk::mode::{
    Fragment, IpAddress, Item, Mode, ModeConfig, NftChain, NftElement, NftFamily, NftSet, Protocol,
    ServiceEndpoints, ServicePort,
};

#[derive(Default)]
pub struct ClusterIpsOnly {
    /// The host's own table: items naming any other are refused.
    table: String,
}

impl Mode for ClusterIpsOnly {
    fn configure(&mut self, config: ModeConfig) -> Result<(), String> {
        self.table = config.table;
        Ok(())
    }

    fn render_base(&mut self) -> Result<Fragment, String> {
        let lookup = "ip daddr . meta l4proto . th dport vmap @cluster-ips".to_string();
        Ok(Fragment {
            items: vec![
                Item::NftSet(NftSet {
                    family: NftFamily::Ip,
                    table: self.table.clone(),
                    name: "cluster-ips".into(),
                    declaration: "type ipv4_addr . inet_proto . inet_service : verdict".into(),
                }),
                self.chain(
                    "nat-prerouting",
                    Some("type nat hook prerouting priority dstnat"),
                    lookup.clone(),
                ),
                self.chain(
                    "nat-output",
                    Some("type nat hook output priority -100"),
                    lookup,
                ),
            ],
        })
    }

    fn render_service(
        &mut self,
        svc: ServicePort,
        endpoints: ServiceEndpoints,
    ) -> Result<Fragment, String> {
        let proto = match svc.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        // Traffic to a cluster IP uses the internal set; its plan is the
        // Service's load-balancing policy speaking (weights or a slot table).
        let set = &endpoints.internal;
        let weights = kwp_sdk::mode_weights(&set.backends, set.endpoints.len())?;
        let mut items = Vec::new();
        let (mut arms, mut total) = (Vec::new(), 0);
        for (i, (ep, weight)) in set.endpoints.iter().zip(weights).enumerate() {
            // IPv4 only; weight 0: the policy excludes the endpoint.
            let IpAddress::V4(ip) = ep.address else {
                continue;
            };
            if weight == 0 {
                continue;
            }
            let chain = format!("ep-{}-{i}", svc.id);
            let dnat = format!(
                "meta l4proto {proto} dnat to {}:{}",
                Ipv4Addr::from(ip),
                ep.port
            );
            items.push(self.chain(&chain, None, dnat));
            let last = total + weight - 1;
            let range = if last == total {
                total.to_string()
            } else {
                format!("{total}-{last}")
            };
            arms.push(format!("{range} : goto {chain}"));
            total += weight;
        }
        // No endpoint: drop (upstream rejects; that needs a filter chain).
        let verdict = if total == 0 {
            "drop".to_string()
        } else {
            let chain = format!("svc-{}", svc.id);
            let spread = format!("numgen random mod {total} vmap {{ {} }}", arms.join(", "));
            items.push(self.chain(&chain, None, spread));
            format!("goto {chain}")
        };
        for ip in &svc.cluster_ips {
            if let IpAddress::V4(ip) = ip {
                items.push(Item::NftElement(NftElement {
                    family: NftFamily::Ip,
                    table: self.table.clone(),
                    set: "cluster-ips".into(),
                    element: format!(
                        "{} . {proto} . {} : {verdict}",
                        Ipv4Addr::from(*ip),
                        svc.port
                    ),
                }));
            }
        }
        Ok(Fragment { items })
    }
}

impl ClusterIpsOnly {
    fn chain(&self, name: &str, hook: Option<&str>, rule: String) -> Item {
        Item::NftChain(NftChain {
            family: NftFamily::Ip,
            table: self.table.clone(),
            name: name.into(),
            hook: hook.map(Into::into),
            rules: vec![rule],
        })
    }
}

kwp_sdk::export_mode!(ClusterIpsOnly);

#[cfg(test)]
mod tests {
    use super::*;
    use kwp_sdk::mode::BackendPlan;
    use kwp_sdk::mode::TrafficPolicy::Cluster;
    use kwp_sdk::testing::mode::{
        Harness, config, endpoint, nft_elements, nft_rules, service, sets,
    };

    #[test]
    fn a_cluster_ip_reaches_its_endpoints_in_proportion_to_the_weights() {
        let mut h = Harness::<ClusterIpsOnly>::new(config()).unwrap();
        let eps = [
            endpoint(1, true, true),
            endpoint(2, true, false),
            endpoint(3, true, false),
        ];
        let mut handed = sets(&eps, &eps, &[], true);
        handed.internal.backends = BackendPlan::Weights(vec![2, 0, 1]);
        let items = h.sync(&[(service(Cluster, Cluster), handed)]).unwrap();
        assert_eq!(
            nft_elements(&items, "cluster-ips"),
            ["10.96.0.10 . tcp . 80 : goto svc-1"]
        );
        assert_eq!(
            nft_rules(&items, "svc-1").unwrap(),
            ["numgen random mod 3 vmap { 0-1 : goto ep-1-0, 2 : goto ep-1-2 }"]
        );
        assert_eq!(
            nft_rules(&items, "ep-1-2").unwrap(),
            ["meta l4proto tcp dnat to 10.1.0.3:8080"]
        );
        assert!(nft_rules(&items, "ep-1-1").is_none(), "weight 0: no chain");
    }

    #[test]
    fn a_service_without_endpoints_drops() {
        let mut h = Harness::<ClusterIpsOnly>::new(config()).unwrap();
        let items = h
            .sync(&[(service(Cluster, Cluster), sets(&[], &[], &[], false))])
            .unwrap();
        assert_eq!(
            nft_elements(&items, "cluster-ips"),
            ["10.96.0.10 . tcp . 80 : drop"]
        );
    }
}
