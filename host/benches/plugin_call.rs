//! What one per-connection policy call costs the host: `pick` then
//! `connection-closed` on the bundled round-robin policy (4 endpoints),
//! the two calls the userspace data path makes per connection.
//!
//!     cargo bench -p kube-wasm-proxy --bench plugin_call
//!
//! Measured on a plain thread and inside a task on a multi-thread tokio
//! runtime (where the data path calls it), several rounds, median reported.
//! Knobs: KWP_BENCH_CALLS (pairs per round, 200000), KWP_BENCH_ROUNDS (5),
//! RUST_LOG (kwp's tracing filter, off unless set).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use kwp::model::Endpoint;
use kwp::plugin::policy::Policy;
use kwp::plugin::{Catalog, Limits, Runtime};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per pick + connection-closed pair.
fn round(policy: &mut Policy, calls: u64) -> f64 {
    let started = Instant::now();
    for i in 0..calls {
        let port = (i % 60_000) as u16;
        let picked = policy.pick(1, CLIENT, port).expect("pick");
        let index = picked.expect("an endpoint");
        policy
            .connection_closed(1, index)
            .expect("connection-closed");
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // RUST_LOG=warn shows why a call failed (the epoch or drive's clock).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let calls = knob("KWP_BENCH_CALLS", 200_000);
    let rounds = knob("KWP_BENCH_ROUNDS", 5) as usize;
    let runtime = Runtime::new(Limits::default())?;
    let (_, bytes) = Catalog::new(None).load("round-robin")?;
    let component = runtime.compile(&bytes)?;
    let make = || -> anyhow::Result<Policy> {
        let mut p = Policy::new(runtime.clone(), "round-robin", &component, "")?;
        let endpoints: Vec<Endpoint> = (1..=4u8)
            .map(|i| Endpoint::sample([10, 0, 0, i].into(), 80))
            .collect();
        p.set_endpoints(1, &endpoints)?;
        round(&mut p, 1000); // warm
        Ok(p)
    };

    let mut plain = make()?;
    let thread: Vec<f64> = (0..rounds).map(|_| round(&mut plain, calls)).collect();

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut on_worker = make()?;
    let worker: Vec<f64> = tokio.block_on(async move {
        tokio::spawn(async move {
            (0..rounds)
                .map(|_| round(&mut on_worker, calls))
                .collect::<Vec<f64>>()
        })
        .await
    })?;
    tokio.shutdown_timeout(Duration::from_secs(1));

    println!("plugin_call: {calls} pick + connection-closed pairs per round, {rounds} rounds");
    println!(
        "  plain thread   ns/pair median {:.0}  all {thread:.0?}",
        median(thread.clone())
    );
    println!(
        "  tokio worker   ns/pair median {:.0}  all {worker:.0?}",
        median(worker.clone())
    );
    Ok(())
}
