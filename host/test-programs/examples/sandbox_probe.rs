//! Tries to escape the sandbox in `configure`: read the filesystem, read the
//! environment, open a socket. `configure` fails listing whatever worked.
use kwp_sdk::{BackendPlan, Endpoint, IpAddress, Policy};

#[derive(Default)]
struct Probe;

impl Policy for Probe {
    fn configure(&mut self, _config: &str) -> Result<(), String> {
        let mut escaped = Vec::new();
        if std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok() {
            escaped.push("filesystem");
        }
        if std::env::vars().next().is_some() || std::env::args().next().is_some() {
            escaped.push("environment");
        }
        if std::net::UdpSocket::bind("127.0.0.1:0").is_ok() || std::net::TcpStream::connect("127.0.0.1:9").is_ok() {
            escaped.push("network");
        }
        // Clocks and randomness are allowed: std needs them.
        let _ = std::time::SystemTime::now();
        if escaped.is_empty() { Ok(()) } else { Err(format!("escaped: {}", escaped.join(", "))) }
    }
    fn set_endpoints(&mut self, _: u32, _: Vec<Endpoint>) {}
    fn remove_service(&mut self, _: u32) {}
    fn pick(&mut self, _: u32, _: IpAddress, _: u16) -> Option<u32> {
        None
    }
    fn plan(&mut self, _: u32) -> BackendPlan {
        BackendPlan::Weights(vec![])
    }
}

kwp_sdk::export_policy!(Probe);
