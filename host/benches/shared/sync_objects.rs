//! The objects of the file-source sync benchmarks: N Services x 5 endpoints,
//! 1000 Services (and their EndpointSlices) per YAML file. Shared by
//! host/benches/nft_sync.rs and the IPVS VM benchmark
//! (tests/ipvs-probe/src/bench), which includes this file by path, so both
//! measure the same objects.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

pub const ENDPOINTS: usize = 5;
pub const PER_FILE: usize = 1000;
/// The port every Service exposes, and the port of every endpoint.
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// Service `s`'s ClusterIP: 10.96.0.0 upward.
pub fn cluster_ip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        (96 + s / 65536) as u8,
        (s / 256 % 256) as u8,
        (s % 256) as u8,
    )
}

/// Endpoint `e` of Service `s`; `shift` moves it to another address (a
/// change), each shift to a different one.
pub fn endpoint_ip(s: usize, e: usize, shift: usize) -> Ipv4Addr {
    let idx = s * ENDPOINTS + e + shift * 1_000_000;
    Ipv4Addr::new(
        172,
        (16 + (idx / 65536) % 16) as u8,
        (idx / 256 % 256) as u8,
        (idx % 256) as u8,
    )
}

/// The file holding Service `s`.
pub fn file_of(s: usize) -> usize {
    s / PER_FILE
}

pub fn file_name(file: usize) -> String {
    format!("services-{file:04}.yaml")
}

pub fn files(n: usize) -> usize {
    n.div_ceil(PER_FILE)
}

/// File `file` of N Services; `shift(s)` is how far Service `s`'s first
/// endpoint has moved (0: not at all).
pub fn yaml(file: usize, n: usize, shift: impl Fn(usize) -> usize) -> String {
    let mut y = String::new();
    for s in file * PER_FILE..((file + 1) * PER_FILE).min(n) {
        let ip = cluster_ip(s);
        // Writing to a String cannot fail.
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: {PORT}}}]\n"
        );
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: {TARGET_PORT}}}]\nendpoints:\n"
        );
        for e in 0..ENDPOINTS {
            let moved = if e == 0 { shift(s) } else { 0 };
            let _ = writeln!(y, "- addresses: ['{}']", endpoint_ip(s, e, moved));
        }
    }
    y
}
