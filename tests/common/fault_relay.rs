//! A relay between a node (a network namespace) and its API server that
//! injects faults on command: latency, resets, refused connections, and
//! HTTP errors (503, 429) answered by terminating TLS with the API server's
//! own serving certificate. The proxy under test reaches the API server
//! only through it (its kubeconfig names 127.0.0.1:PORT, which inside the
//! node namespace is this relay), so what it sees is what a node sees when
//! its API server is slow, overloaded or flapping.
//!
//! Faults apply to live connections too: latency to every byte relayed from
//! then on, and the error faults sever what is open (a reset), so a watch
//! in progress fails the way it would when the server went away. The hang
//! faults stall what is open instead: no byte either way, the connection
//! held open for good (a stalled request is never answered, even after the
//! fault ends), so only the client's own timeouts can free it.

use std::net::TcpListener as StdListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::netns::Netns;

/// What the relay does to the node's API traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Relays bytes as they come.
    None,
    /// Relays every chunk, both ways, this much later.
    Latency(Duration),
    /// Resets every connection, live and new, once accepted.
    Reset,
    /// Nothing listens: connections are refused; live ones are reset.
    Refuse,
    /// Answers every request with this HTTP status (a Kubernetes `Status`
    /// body, `Retry-After: 1`); live connections are reset.
    Http(u16),
    /// A hung API server: new connections are accepted (the kernel does
    /// that) and never get a byte; live ones stall.
    Hang,
    /// Responses stall after their headers: new connections are relayed
    /// through TLS terminated here (the API server's certificate) until the
    /// first response head has passed, then stall; live ones (a watch that
    /// answered its headers long ago) stall.
    StallAfterHeaders,
}

impl Fault {
    /// Faults under which no byte reaches the API server.
    fn severs(&self) -> bool {
        matches!(self, Fault::Reset | Fault::Refuse | Fault::Http(_))
    }

    /// Faults under which live connections stall (held open, silent).
    fn stalls(&self) -> bool {
        matches!(self, Fault::Hang | Fault::StallAfterHeaders)
    }
}

/// What the relay did, for the report.
#[derive(Debug, Default)]
pub struct Counts {
    pub relayed: AtomicU64,
    pub reset: AtomicU64,
    pub http_errors: AtomicU64,
    /// Connections stalled (live or new), held open for good.
    pub stalled: AtomicU64,
}

/// A running relay; it stops when dropped.
pub struct FaultRelay {
    fault: watch::Sender<Fault>,
    pub counts: Arc<Counts>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultRelay {
    /// Relays `127.0.0.1:port` inside `ns` to `127.0.0.1:port` of the
    /// calling process's namespace. `pki` holds the API server's
    /// `serving.crt` and `serving.key` (for `Fault::Http`).
    pub fn start(ns: &Netns, port: u16, pki: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-relay")
            .enable_all()
            .build()
            .expect("relay runtime");
        let (fault, faults) = watch::channel(Fault::None);
        let counts = Arc::new(Counts::default());
        let tls = Tls {
            acceptor: TlsAcceptor::from(server_config(pki)),
            connector: TlsConnector::from(client_config(pki)),
        };
        let netns = format!("/run/netns/{}", ns.name);
        // Bound once here so that a port taken fails the test at once.
        let first = bind_in(&netns, port).expect("binding the relay");
        let c = counts.clone();
        runtime.spawn(serve(netns, port, Some(first), faults, tls, c));
        Self {
            fault,
            counts,
            runtime: Some(runtime),
        }
    }

    pub fn set(&self, fault: Fault) {
        tracing::info!(?fault, "fault relay");
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        self.fault.borrow().clone()
    }

    /// A network partition (`restore` ends it).
    pub fn cut(&self) {
        self.set(Fault::Refuse);
    }

    pub fn restore(&self) {
        self.set(Fault::None);
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// TLS as the API server (its certificate) and as a client of it (its CA).
#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// A TLS client trusting the API server's CA.
fn client_config(pki: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(pki.join("ca.crt")).expect("the API server's CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("ca.crt parses")).expect("a CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The API server's serving certificate and key, as a TLS server.
fn server_config(pki: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |name: &str| std::fs::read(pki.join(name)).expect("the API server's PKI");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("serving.crt"))
        .collect::<Result<_, _>>()
        .expect("serving.crt parses");
    let key = PrivateKeyDer::from_pem_slice(&read("serving.key")).expect("serving.key parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS server config");
    Arc::new(config)
}

/// Binds `127.0.0.1:port` in the namespace at `netns` (a socket lives in
/// the namespace of the thread that made it).
fn bind_in(netns: &str, port: u16) -> std::io::Result<StdListener> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns)?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = StdListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .expect("bind thread")
}

/// Accepts until the relay is dropped; under `Fault::Refuse` nothing
/// listens (the listener is closed, and bound again when the fault ends).
async fn serve(
    netns: String,
    port: u16,
    mut first: Option<StdListener>,
    mut faults: watch::Receiver<Fault>,
    tls: Tls,
    counts: Arc<Counts>,
) {
    loop {
        if *faults.borrow_and_update() == Fault::Refuse {
            first = None;
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        let std_listener = match first.take() {
            Some(l) => l,
            None => match bind_in(&netns, port) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot bind again; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(listener) = TcpListener::from_std(std_listener) else {
            return;
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((conn, _)) = accepted {
                        let (faults, tls, counts) = (faults.clone(), tls.clone(), counts.clone());
                        tokio::spawn(handle(conn, port, faults, tls, counts));
                    }
                }
                changed = faults.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *faults.borrow() == Fault::Refuse {
                        break; // closes the listener
                    }
                }
            }
        }
    }
}

async fn handle(
    conn: TcpStream,
    port: u16,
    faults: watch::Receiver<Fault>,
    tls: Tls,
    counts: Arc<Counts>,
) {
    let fault = faults.borrow().clone();
    match fault {
        Fault::None | Fault::Latency(_) => relay(conn, port, faults, &counts).await,
        Fault::Reset | Fault::Refuse => reset(conn, &counts),
        Fault::Http(code) => answer(conn, code, tls.acceptor, &counts).await,
        Fault::Hang => stall(&counts, [conn]).await,
        Fault::StallAfterHeaders => headers_then_stall(conn, port, tls, &counts).await,
    }
}

/// Holds what it is given open and silent until the relay is dropped.
async fn stall<T>(counts: &Counts, held: T) {
    counts.stalled.fetch_add(1, Ordering::Relaxed);
    std::future::pending::<()>().await;
    drop(held);
}

/// Terminates TLS, relays requests to the API server over TLS of its
/// own, and relays its answer up to the end of the first response head
/// (`\r\n\r\n`); from then on nothing more either way.
async fn headers_then_stall(conn: TcpStream, port: u16, tls: Tls, counts: &Counts) {
    let Ok(Ok(inner)) =
        tokio::time::timeout(Duration::from_secs(10), tls.acceptor.accept(conn)).await
    else {
        return;
    };
    let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let Ok(outer) = tls.connector.connect(name, tcp).await else {
        return;
    };
    counts.relayed.fetch_add(1, Ordering::Relaxed);
    let (mut ir, mut iw) = tokio::io::split(inner);
    let (mut or, mut ow) = tokio::io::split(outer);
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = ir.read(&mut buf).await {
            if ow.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let head = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1];
        // Byte by byte: not one byte past the head.
        while !seen.ends_with(b"\r\n\r\n") {
            match or.read(&mut buf).await {
                Ok(1) => seen.push(buf[0]),
                _ => return,
            }
            if iw.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = iw.flush().await;
        stall(counts, ()).await;
    };
    tokio::join!(requests, head);
}

/// Closes `conn` with a RST instead of a FIN.
fn reset(conn: TcpStream, counts: &Counts) {
    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    counts.reset.fetch_add(1, Ordering::Relaxed);
}

async fn relay(
    mut inner: TcpStream,
    port: u16,
    mut faults: watch::Receiver<Fault>,
    counts: &Counts,
) {
    let Ok(mut outer) = TcpStream::connect(("127.0.0.1", port)).await else {
        return reset(inner, counts); // the API server is down: so is the relay
    };
    counts.relayed.fetch_add(1, Ordering::Relaxed);
    let latency = faults.clone();
    let severed = async {
        loop {
            let fault = faults.borrow_and_update().clone();
            if fault.severs() || fault.stalls() {
                return fault.stalls();
            }
            if faults.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let stalled;
    {
        let (ir, iw) = inner.split();
        let (or, ow) = outer.split();
        tokio::select! {
            _ = async { tokio::join!(pipe(ir, ow, latency.clone()), pipe(or, iw, latency)) } => return,
            s = severed => stalled = s,
        }
    }
    if stalled {
        return stall(counts, (inner, outer)).await;
    }
    reset(inner, counts);
    let _ = socket2::SockRef::from(&outer).set_linger(Some(Duration::ZERO));
}

/// Copies `from` to `to`, each chunk held back by the latency in force
/// when it was read (a delay line: order is kept).
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    faults: watch::Receiver<Fault>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let delay = match *faults.borrow() {
                Fault::Latency(d) => d,
                _ => Duration::ZERO,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Terminates TLS, reads the request head and answers `code` with a
/// Kubernetes `Status`, as an overloaded (429) or failing (503) API server
/// does, then closes.
async fn answer(conn: TcpStream, code: u16, tls: TlsAcceptor, counts: &Counts) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(conn)).await
    else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) if head.len() < 64 * 1024 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let (reason, text) = match code {
        429 => ("TooManyRequests", "Too Many Requests"),
        _ => ("ServiceUnavailable", "Service Unavailable"),
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "injected by the tests' fault relay", "reason": reason, "code": code,
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    counts.http_errors.fetch_add(1, Ordering::Relaxed);
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
