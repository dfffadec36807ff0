//! The whole IPVS dataplane against the real kernel: a first instance
//! applies a ClusterIP and a node-port Service; a second instance adopts
//! the state, deletes only what is ours and no longer wanted, spares a
//! foreign virtual server, and then changes cost one call each; a real
//! connection goes through the virtual server it made. The sysctls
//! upstream sets are set.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, ensure};

use crate::dataplane::Dataplane;
use crate::dataplane::ipvs::IpvsDataplane;
use crate::dataplane::ipvs::kernel::{IpvsKernel, NetlinkIpvs, VirtualKey, VirtualServer};
use crate::model::{Protocol, ServicePortName};
use crate::plan::{Fragment, Item};

const RECORD: &str = "/run/kwp-probe/ipvs-virtual-servers";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address literal")
}

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "probe".into(),
        name: n.into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn service(vip: &str, reals: &[&str]) -> Fragment {
    let mut items = vec![Item::IpvsVirtualServer {
        address: sa(vip),
        protocol: Protocol::Tcp,
        scheduler: "rr".into(),
        persistence_timeout: 0,
    }];
    items.extend(reals.iter().map(|r| Item::IpvsRealServer {
        virtual_address: sa(vip),
        protocol: Protocol::Tcp,
        address: sa(r),
        weight: 1,
    }));
    Fragment {
        items: items.into(),
    }
}

fn dataplane() -> IpvsDataplane {
    IpvsDataplane::with_kernel(Box::new(NetlinkIpvs::new()), Some(RECORD.into()))
}

fn listed(k: &mut NetlinkIpvs) -> Result<BTreeSet<SocketAddr>> {
    Ok(k.services()?.into_iter().map(|s| s.key.address).collect())
}

pub fn run() -> Result<()> {
    let mut k = NetlinkIpvs::new();
    // Someone else's virtual server, on an address not on kube-ipvs0.
    let foreign = VirtualServer {
        key: VirtualKey {
            address: sa("192.0.2.1:443"),
            protocol: Protocol::Tcp,
        },
        scheduler: "rr".into(),
        persistence_timeout: 0,
    };
    k.add_service(&foreign)?;
    let before = listed(&mut k)?;

    let cluster = service("10.96.1.1:80", &["10.244.9.2:8080"]);
    // 10.244.9.1 is a node address (veth-node): a node port.
    let node_port = service("10.244.9.1:30080", &["10.244.9.2:8080"]);
    let mut first = dataplane();
    let applied = first.apply(
        None,
        &[
            (name("cluster"), Some(&cluster)),
            (name("np"), Some(&node_port)),
        ],
    )?;
    ensure!(applied.refused.is_empty(), "refused {:?}", applied.refused);
    for name in [
        "net/ipv4/vs/expire_nodest_conn",
        "net/ipv4/vs/expire_quiescent_template",
        "net/ipv4/vs/conntrack",
        "net/ipv4/ip_forward",
    ] {
        ensure!(k.sysctl(name)? == "1", "sysctl {name} not set");
    }
    let bound = k.link_addresses()?;
    ensure!(bound.contains(&"10.96.1.1".parse::<IpAddr>()?), "{bound:?}");
    ensure!(
        !bound.contains(&"10.244.9.1".parse::<IpAddr>()?),
        "node address bound"
    );
    let record = std::fs::read_to_string(RECORD).context("ownership record")?;
    ensure!(record == "tcp 10.244.9.1:30080\n", "record {record:?}");
    drop(first);

    // A new instance without the node port: it adopts `cluster` with no
    // call, deletes our stale servers, leaves the foreign ones.
    let mut second = dataplane();
    let applied = second.apply(None, &[(name("cluster"), Some(&cluster))])?;
    ensure!(applied.refused.is_empty(), "refused {:?}", applied.refused);
    let after = listed(&mut k)?;
    ensure!(after.contains(&sa("10.96.1.1:80")));
    ensure!(
        after.contains(&foreign.key.address),
        "foreign server deleted"
    );
    ensure!(
        !after.contains(&sa("10.244.9.1:30080")),
        "recorded node port kept"
    );
    // Stale servers on kube-ipvs0 addresses (the earlier steps') are ours:
    // the first instance's reconcile deleted them.
    for ours in ["10.96.0.10:80", "10.96.0.20:80", "[fd00::10]:443"] {
        ensure!(
            before.contains(&sa(ours)) && !after.contains(&sa(ours)),
            "{ours}"
        );
    }
    // 10.96.0.53 was unbound earlier: no longer provably ours, kept.
    ensure!(
        after.contains(&sa("10.96.0.53:53")),
        "unowned server deleted"
    );
    println!("PROBE-ADOPTION calls {}", second.calls);
    // Only the node port's deletion: `cluster` is adopted with no call.
    ensure!(second.calls == 1, "adoption cost {} calls", second.calls);

    let before_calls = second.calls;
    let grown = service("10.96.1.1:80", &["10.244.9.2:8080", "10.244.9.3:8080"]);
    second.apply(None, &[(name("cluster"), Some(&grown))])?;
    ensure!(
        second.calls - before_calls == 1,
        "one endpoint cost {}",
        second.calls - before_calls
    );
    second.apply(None, &[(name("cluster"), Some(&cluster))])?;
    let answer = crate::packet::connect(sa("10.96.1.1:80"))?;
    ensure!(answer == "pod", "answer {answer:?}");
    println!("PROBE-DATAPLANE-PACKET 10.96.1.1:80 answered {answer:?}");
    second.resync()?;
    Ok(())
}
