//! Tries to escape the sandbox in `configure`: read the filesystem, read the
//! environment, open a socket. `configure` fails listing whatever worked.
struct Probe;

impl kwp_test_programs::Pick for Probe {
    fn pick(_service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        kwp_test_programs::first(endpoints)
    }
    fn configure(_config: &str) -> Result<(), String> {
        let mut escaped = Vec::new();
        if std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok() {
            escaped.push("filesystem");
        }
        if std::env::vars().next().is_some() || std::env::args().next().is_some() {
            escaped.push("environment");
        }
        if std::net::UdpSocket::bind("127.0.0.1:0").is_ok()
            || std::net::TcpStream::connect("127.0.0.1:9").is_ok()
        {
            escaped.push("network");
        }
        // Clocks and randomness are allowed: std needs them.
        let _ = std::time::SystemTime::now();
        if escaped.is_empty() {
            Ok(())
        } else {
            Err(format!("escaped: {}", escaped.join(", ")))
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<Probe>);
