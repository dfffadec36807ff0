//! What the fuzz targets in `fuzz/` run, one function per target, so that
//! the same code replays the kept corpora in `cargo test` (on stable, no
//! libFuzzer needed) and fuzzes under `cargo fuzz` (scripts/fuzz.sh).
//!
//! A target returns normally for any input it does not like; it panics
//! only when the host misbehaves: a panic on input from outside, or a
//! plan the validator accepted that reaches beyond kwp's own objects.

mod confinement;
mod hostile;
mod rendered;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::{Cli, FileConfig, Settings};
use crate::dataplane::Dataplane;
use crate::dataplane::iptables::IptablesDataplane;
use crate::dataplane::iptables::kernel::IptablesKernel;
use crate::dataplane::ipvs::fake::FakeIpvs;
use crate::dataplane::ipvs::{IpvsDataplane, RealServer, VirtualKey, VirtualServer};
use crate::dataplane::nftables::NftDataplane;
use crate::dataplane::nftables::kernel::{Listing, NftKernel};
use crate::plan::{Fragment, Rules};
use crate::state::ClusterState;

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and
/// corpus directory.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("kube_proxy_configuration", kube_proxy_configuration),
    ("api_objects", api_objects),
    ("file_objects", file_objects),
    ("hostile_plan", hostile_plan),
    ("rendered_rules", rendered_rules),
];

pub use rendered::rendered_rules;

/// A KubeProxyConfiguration file, resolved into settings as at start-up.
pub fn kube_proxy_configuration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::parse(text) else {
        return;
    };
    // Parsed once: clap building its whole command per input was ~4 % of
    // this target's time and none of it depends on the input.
    thread_local! {
        static CLI: Cli =
            <Cli as clap::Parser>::parse_from(["kube-wasm-proxy", "--hostname-override", "n"]);
    }
    CLI.with(|cli| {
        let _ = Settings::resolve_file(&cli.flags, file);
    });
}

/// Objects as the API server could send them: the first byte says which
/// kind, the rest is its JSON; every object goes into one cluster state,
/// whose changes are then taken as the proxier would.
pub fn api_objects(data: &[u8]) {
    let mut state = ClusterState::new("node-a");
    for chunk in data.split(|b| *b == 0) {
        let Some((kind, json)) = chunk.split_first() else {
            continue;
        };
        match kind % 3 {
            0 => {
                if let Ok(svc) = serde_json::from_slice::<Service>(json) {
                    state.upsert_service(&svc);
                }
            }
            1 => {
                if let Ok(slice) = serde_json::from_slice::<EndpointSlice>(json) {
                    state.upsert_slice(&slice);
                }
            }
            _ => {
                if let Ok(node) = serde_json::from_slice::<Node>(json) {
                    state.set_node(&node);
                }
            }
        }
    }
    take_everything(&mut state);
}

/// A file of the file source: parsed with its limits, then applied.
pub fn file_objects(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = crate::source::file::parse::parse_objects(text) else {
        return;
    };
    let mut state = ClusterState::new("node-a");
    objects.nodes.iter().for_each(|n| state.set_node(n));
    objects.services.iter().for_each(|s| {
        state.upsert_service(s);
    });
    objects.slices.iter().for_each(|s| state.upsert_slice(s));
    take_everything(&mut state);
}

fn take_everything(state: &mut ClusterState) {
    let _ = state.take_changes();
    let _ = state.snapshot().count();
}

/// A fragment a hostile proxy-mode plugin could return. If the validator
/// accepts it, whatever the host then writes to nft and iptables-restore
/// must address only kwp's own objects, one command per line the host
/// meant to write (checked by an independent reading of that text); and
/// IPVS must leave another program's virtual server and the node's own
/// addresses alone.
pub fn hostile_plan(data: &[u8]) {
    let Ok(items) = hostile::items(&mut arbitrary::Unstructured::new(data)) else {
        return;
    };
    let fragment = Fragment {
        items: items.into(),
    };
    let rules = Rules::default();
    if fragment.validate(&rules).is_err() {
        return;
    }
    let written = Arc::new(Mutex::new(Vec::new()));
    let mut nft = NftDataplane::with_kernel(&rules.nft_table, Box::new(Recorder(written.clone())));
    if nft.apply(Some(&fragment), &[]).is_ok() {
        for script in written.lock().expect("recorder").drain(..) {
            confinement::nft_script(&script, &rules.nft_table)
                .unwrap_or_else(|e| panic!("{e}\nin the nft script:\n{script}"));
        }
    }
    let mut iptables = IptablesDataplane::with_kernel(Box::new(Recorder(written.clone())));
    if iptables.apply(Some(&fragment), &[]).is_ok() {
        for script in written.lock().expect("recorder").drain(..) {
            confinement::iptables_restore(&script, &rules.iptables_prefix)
                .unwrap_or_else(|e| panic!("{e}\nin the iptables-restore input:\n{script}"));
        }
    }
    ipvs_confined(&fragment);
}

/// Another program's virtual server on a node address, with one real
/// server, and the node's address: present before the hostile plan.
fn foreign_ipvs() -> (FakeIpvs, VirtualServer, RealServer) {
    let node = std::net::Ipv4Addr::new(192, 0, 2, 10);
    let foreign = VirtualServer {
        key: VirtualKey {
            address: (node, 8443).into(),
            protocol: crate::model::Protocol::Tcp,
        },
        scheduler: "wlc".into(),
        persistence_timeout: 0,
    };
    let real = RealServer {
        address: (std::net::Ipv4Addr::new(192, 0, 2, 20), 443).into(),
        weight: 7,
    };
    let fake = FakeIpvs::new();
    {
        let mut s = fake.state();
        s.node_addresses.insert(node.into());
        s.services.insert(
            foreign.key,
            (foreign.clone(), [(real.address, real.weight)].into()),
        );
    }
    (fake, foreign, real)
}

fn hostile_service() -> crate::model::ServicePortName {
    crate::model::ServicePortName {
        namespace: "hostile".into(),
        name: "plan".into(),
        port: "p".into(),
        protocol: crate::model::Protocol::Tcp,
    }
}

fn ipvs_confined(fragment: &Fragment) {
    let (fake, foreign, real) = foreign_ipvs();
    let mut ipvs = IpvsDataplane::with_kernel(Box::new(fake.clone()), None);
    for change in [
        ipvs.apply(Some(fragment), &[]),
        ipvs.apply(None, &[(hostile_service(), Some(fragment))]),
    ] {
        let _ = change;
        let s = fake.state();
        let (vs, reals) = s
            .services
            .get(&foreign.key)
            .unwrap_or_else(|| panic!("the foreign virtual server {} was deleted", foreign.key));
        assert_eq!(vs, &foreign, "the foreign virtual server was changed");
        assert_eq!(
            reals,
            &[(real.address, real.weight)].into(),
            "the foreign virtual server's real servers were changed"
        );
        for ip in s.link.iter().flatten() {
            assert!(
                !s.node_addresses.contains(ip),
                "the node's address {ip} was bound to kube-ipvs0"
            );
        }
    }
}

/// A kernel that takes everything and remembers what it was given.
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn record(&self, text: &str) -> Result<()> {
        self.0.lock().expect("recorder").push(text.to_string());
        Ok(())
    }
}

impl NftKernel for Recorder {
    fn run(&mut self, script: &str) -> Result<()> {
        self.record(script)
    }
    fn check(&mut self, script: &str) -> Result<()> {
        self.record(script)
    }
    fn list(&mut self, _: &str) -> Result<Listing> {
        Ok(Listing::default())
    }
}

impl IptablesKernel for Recorder {
    fn restore(&mut self, _: bool, _: &str, text: &str) -> Result<()> {
        self.record(text)
    }
    fn check(&mut self, _: bool, _: &str, text: &str) -> Result<()> {
        self.record(text)
    }
    fn save(&mut self, _: bool, table: &str) -> Result<String> {
        Ok(format!("*{table}\nCOMMIT\n"))
    }
    fn chain_rules(&mut self, _: bool, _: &str, _: &str) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
    fn enable_route_localnet(&mut self) -> Result<()> {
        Ok(())
    }
}
