//! The codec's newer messages in the real kernel: IPVS's connection
//! timeouts (IPVS_CMD_SET_CONFIG, read back with IPVS_CMD_GET_CONFIG),
//! destination connection counts after a real connection, and graceful
//! termination by the whole dataplane (a real server with a connection
//! stays at weight 0 when the plan drops it). Runs last: the dataplane's
//! first reconcile cleans what earlier steps left on kube-ipvs0.

use std::net::SocketAddr;

use anyhow::{Result, ensure};

use crate::dataplane::Dataplane;
use crate::dataplane::ipvs::IpvsDataplane;
use crate::dataplane::ipvs::kernel::{
    IpvsKernel, NetlinkIpvs, RealServer, Timeouts, VirtualKey, VirtualServer,
};
use crate::model::{Protocol, ServicePortName};
use crate::packet;
use crate::plan::{Fragment, Item};

pub fn run() -> Result<()> {
    let mut k = NetlinkIpvs::new();
    let before = k.timeouts()?;
    let wanted = Timeouts {
        tcp: 1000,
        tcp_fin: 0,
        udp: 33,
    };
    k.set_timeouts(&wanted)?;
    let after = k.timeouts()?;
    println!("PROBE-CONFIG timeouts {before:?} -> {after:?}");
    ensure!(
        after
            == Timeouts {
                tcp_fin: before.tcp_fin,
                ..wanted
            },
        "tcpFinTimeout 0 must keep the kernel's value: {after:?}"
    );
    k.set_timeouts(&before)?;
    ensure!(k.timeouts()? == before, "timeouts restored");

    // A real connection through a virtual server, then its count.
    let vip: SocketAddr = "10.96.0.30:80".parse()?;
    let pod: SocketAddr = "10.244.9.2:8080".parse()?;
    let key = VirtualKey {
        address: vip,
        protocol: Protocol::Tcp,
    };
    k.bind(vip.ip())?;
    k.add_service(&VirtualServer {
        key,
        scheduler: "rr".into(),
        persistence_timeout: 0,
    })?;
    k.add_destination(
        &key,
        &RealServer {
            address: pod,
            weight: 1,
        },
    )?;
    ensure!(packet::connect(vip)? == "pod", "no answer through {vip}");
    let counts = k.connections(&key)?;
    println!("PROBE-CONFIG connections {counts:?}");
    ensure!(
        counts.get(&pod).copied().unwrap_or(0) >= 1,
        "the closed connection counts as inactive: {counts:?}"
    );

    // The dataplane drops the endpoint from the plan: it drains.
    let mut dp = IpvsDataplane::with_kernel(Box::new(NetlinkIpvs::new()), None);
    let without_pod = Fragment {
        items: vec![Item::IpvsVirtualServer {
            address: vip,
            protocol: Protocol::Tcp,
            scheduler: "rr".into(),
            persistence_timeout: 0,
        }]
        .into(),
    };
    let name = ServicePortName {
        namespace: "probe".into(),
        name: "drain".into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    let applied = dp.apply(None, &[(name, Some(&without_pod))])?;
    ensure!(applied.refused.is_empty(), "refused: {:?}", applied.refused);
    let dests = k.destinations(&key)?;
    println!("PROBE-CONFIG draining {dests:?}");
    ensure!(
        dests
            == [RealServer {
                address: pod,
                weight: 0
            }],
        "a real server with a connection drains at weight 0: {dests:?}"
    );
    Ok(())
}
