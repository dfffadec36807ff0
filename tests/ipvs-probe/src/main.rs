//! Drives the host's netlink IPVS code (compiled in from host/src by path)
//! against a real kernel and checks every step by reading it back; prints
//! `PROBE-OK` at the end. tests/ipvs.rs also checks /proc/net/ip_vs.
//! `bench ...` instead runs the IPVS-vs-nftables benchmark (bench/mod.rs,
//! scripts/ipvs-vm-bench.sh).

#[allow(dead_code)]
#[path = "../../../host/src/model.rs"]
mod model;

mod bench;
mod config;
#[allow(dead_code)]
mod dataplane;
mod packet;
#[allow(dead_code, unused_imports)]
#[path = "../../../host/src/plan/mod.rs"]
mod plan;
mod whole;

use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};
use dataplane::ipvs::kernel::{
    self, IpvsKernel, NetlinkIpvs, RealServer, VirtualKey, VirtualServer,
};
use model::Protocol;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address literal")
}

fn vs(addr: &str, protocol: Protocol, scheduler: &str, persistence: u32) -> VirtualServer {
    VirtualServer {
        key: VirtualKey {
            address: sa(addr),
            protocol,
        },
        scheduler: scheduler.into(),
        persistence_timeout: persistence,
    }
}

fn step(name: &str, r: Result<()>) -> Result<()> {
    r.with_context(|| format!("step {name}"))?;
    println!("PROBE-STEP {name} ok");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => return bench::main(&args[1..]),
        Some("bench-one") => return bench::one(&args[1..]),
        _ => {}
    }
    let mut k = NetlinkIpvs::new();
    let web = vs("10.96.0.10:80", Protocol::Tcp, "rr", 0);
    let dns = vs("10.96.0.53:53", Protocol::Udp, "wrr", 10800);
    let v6 = vs("[fd00::10]:443", Protocol::Tcp, "mh", 0);
    let node_port = vs("10.0.2.15:30080", Protocol::Tcp, "lc", 0);
    step(
        "link",
        (|| {
            k.ensure_link()?;
            k.ensure_link()?; // idempotent
            for ip in ["10.96.0.10", "10.96.0.53", "fd00::10"] {
                k.bind(ip.parse()?)?;
            }
            let bound = k.link_addresses()?;
            ensure!(bound.len() == 3, "bound {bound:?}");
            ensure!(!k.node_addresses()?.contains(&"10.96.0.10".parse()?));
            Ok(())
        })(),
    )?;
    step(
        "services",
        (|| {
            for s in [&web, &dns, &v6, &node_port] {
                k.add_service(s)?;
            }
            let e = k.add_service(&web).expect_err("duplicate");
            ensure!(kernel::exists(&e), "duplicate add says EEXIST: {e:#}");
            let mut listed = k.services()?;
            listed.sort_by_key(|s| s.key);
            let mut want = vec![web.clone(), dns.clone(), v6.clone(), node_port.clone()];
            want.sort_by_key(|s| s.key);
            ensure!(listed == want, "listed {listed:#?}");
            Ok(())
        })(),
    )?;
    step(
        "destinations",
        (|| {
            for (a, w) in [
                ("10.244.1.1:8080", 1),
                ("10.244.1.2:8080", 3),
                ("10.244.1.3:8080", 0),
            ] {
                k.add_destination(
                    &web.key,
                    &RealServer {
                        address: sa(a),
                        weight: w,
                    },
                )?;
            }
            k.add_destination(
                &dns.key,
                &RealServer {
                    address: sa("10.244.2.1:53"),
                    weight: 2,
                },
            )?;
            k.add_destination(
                &v6.key,
                &RealServer {
                    address: sa("[fd00:244::1]:8443"),
                    weight: 1,
                },
            )?;
            let mut d = k.destinations(&web.key)?;
            d.sort();
            ensure!(
                d == [
                    RealServer {
                        address: sa("10.244.1.1:8080"),
                        weight: 1
                    },
                    RealServer {
                        address: sa("10.244.1.2:8080"),
                        weight: 3
                    },
                    RealServer {
                        address: sa("10.244.1.3:8080"),
                        weight: 0
                    },
                ],
                "web destinations {d:?}"
            );
            let d6 = k.destinations(&v6.key)?;
            ensure!(
                d6.len() == 1 && d6[0].address == sa("[fd00:244::1]:8443"),
                "{d6:?}"
            );
            Ok(())
        })(),
    )?;
    println!("PROBE-DUMP-BEGIN");
    print!(
        "{}",
        std::fs::read_to_string("/proc/net/ip_vs").unwrap_or_default()
    );
    println!("PROBE-DUMP-END");
    step(
        "updates",
        (|| {
            k.update_destination(
                &web.key,
                &RealServer {
                    address: sa("10.244.1.1:8080"),
                    weight: 5,
                },
            )?;
            k.delete_destination(&web.key, sa("10.244.1.3:8080"))?;
            k.update_service(&vs("10.96.0.10:80", Protocol::Tcp, "wrr", 60))?;
            let e = k
                .delete_destination(&web.key, sa("10.244.1.3:8080"))
                .expect_err("gone");
            ensure!(
                kernel::missing(&e),
                "delete of a missing destination: {e:#}"
            );
            let d = k.destinations(&web.key)?;
            ensure!(d.len() == 2 && d.iter().any(|r| r.weight == 5), "{d:?}");
            let s = k.services()?;
            let w = s.iter().find(|s| s.key == web.key).context("web listed")?;
            ensure!(w.scheduler == "wrr" && w.persistence_timeout == 60, "{w:?}");
            Ok(())
        })(),
    )?;
    step(
        "adoption",
        (|| {
            // A second instance (fresh sockets) sees the same state.
            let mut other = NetlinkIpvs::new();
            ensure!(other.services()?.len() == 4);
            ensure!(other.link_addresses()?.len() == 3);
            Ok(())
        })(),
    )?;
    step(
        "removal",
        (|| {
            k.delete_service(&node_port.key)?;
            let e = k.delete_service(&node_port.key).expect_err("gone");
            ensure!(kernel::missing(&e), "delete of a missing service: {e:#}");
            k.unbind("10.96.0.53".parse()?)?;
            ensure!(k.services()?.len() == 3);
            ensure!(k.link_addresses()?.len() == 2);
            Ok(())
        })(),
    )?;
    step(
        "packet",
        (|| {
            packet::start_pod()?;
            let vip = vs("10.96.0.20:80", Protocol::Tcp, "rr", 0);
            k.bind("10.96.0.20".parse()?)?;
            k.add_service(&vip)?;
            k.add_destination(
                &vip.key,
                &RealServer {
                    address: sa("10.244.9.2:8080"),
                    weight: 1,
                },
            )?;
            let answer = packet::connect(vip.key.address)?;
            ensure!(answer == "pod", "answer {answer:?}");
            // The control: the same address on a port with no virtual server.
            ensure!(
                packet::connect(sa("10.96.0.20:81")).is_err(),
                "port 81 answered"
            );
            println!("PROBE-PACKET 10.96.0.20:80 answered {answer:?} from 10.244.9.2:8080");
            Ok(())
        })(),
    )?;
    println!("PROBE-FINAL-BEGIN");
    print!(
        "{}",
        std::fs::read_to_string("/proc/net/ip_vs").unwrap_or_default()
    );
    println!("PROBE-FINAL-END");
    step("dataplane", whole::run())?;
    println!("PROBE-DATAPLANE-BEGIN");
    print!(
        "{}",
        std::fs::read_to_string("/proc/net/ip_vs").unwrap_or_default()
    );
    println!("PROBE-DATAPLANE-END");
    step("config", config::run())?;
    println!("PROBE-OK");
    Ok(())
}
