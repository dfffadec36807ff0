//! The HTTP/1.1 side of the healthz, metrics and health-check node port
//! servers, on hyper. Like upstream kube-proxy's servers, none of them ever
//! goes down for good:
//! - a failed bind is logged and retried every 5 s (upstream runs its
//!   servers under `wait.Until(..., 5*time.Second)`);
//! - a failed accept (EMFILE, ENFILE, ENOBUFS, ...) is logged, rate-limited,
//!   and the server backs off briefly and goes on, as Go's `http.Server`
//!   does with temporary accept errors;
//! - each connection runs on its own task, its request head bounded in size
//!   and time and the whole exchange bounded in time, so a silent, slow or
//!   malformed client only ever holds its own connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

pub type Body = Full<Bytes>;

/// Answers one request. The servers only report in-memory state, so this
/// is synchronous and cheap.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Body> + Send + Sync>;

/// How long a failed bind waits before the next try, as upstream.
const BIND_RETRY: Duration = Duration::from_secs(5);

// What one connection may cost the server: generous for probes, load
// balancers and Prometheus, which send one small request and read a small
// answer at once.
/// Time a client has to send its request line and headers.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of the request line and headers; hyper answers 431 beyond it.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time one connection may live in all: request, answer, the client
/// reading the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A response with a body and its content type; `X-Content-Type-Options:
/// nosniff` as upstream sets it on every answer.
pub fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Binds `addr` (retrying until it can) and serves `handler` on it for
/// as long as the task lives. `what` names the server in logs.
pub async fn serve(addr: SocketAddr, what: String, handler: Handler) {
    let listener = bind(addr, &what).await;
    accept_loop(listener, addr, &what, handler).await
}

/// Binds `addr`, retrying every `BIND_RETRY`: the port may be held for a
/// while by an old process, or fds may be exhausted for a moment.
async fn bind(addr: SocketAddr, what: &str) -> TcpListener {
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, what, "serving");
                return listener;
            }
            Err(e) => {
                tracing::error!(%addr, what, error = %e, retry_in = ?BIND_RETRY, "cannot bind");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    }
}

/// Accepts connections on `listener` (bound to `addr`) for ever, each
/// served on its own task.
async fn accept_loop(listener: TcpListener, addr: SocketAddr, what: &str, handler: Handler) {
    let mut errors = AcceptErrors::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.succeeded();
                tokio::spawn(serve_connection(stream, handler.clone()));
            }
            Err(e) => tokio::time::sleep(errors.failed(&e, addr, what)).await,
        }
    }
}

async fn serve_connection(stream: TcpStream, handler: Handler) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        std::future::ready(Ok::<_, Infallible>(handler(&request)))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        // One request per connection, as the servers always answered:
        // nothing idles on a connection between two probes.
        .keep_alive(false)
        // `Content-Type`, not `content-type`: as Go writes headers.
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection failed"),
        Err(_) => {
            tracing::debug!(timeout = ?CONNECTION_TIMEOUT, "HTTP connection timed out")
        }
    }
}

/// Backoff and log rate limit for failed accepts. Accept fails at once and
/// again while fds are exhausted (the connection stays queued), so without
/// a pause the loop would spin, and without a rate limit flood the log.
struct AcceptErrors {
    backoff: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    const LOG_INTERVAL: Duration = Duration::from_secs(10);

    fn succeeded(&mut self) {
        self.backoff = Self::FIRST_BACKOFF;
    }

    /// Logs `e` unless logged lately; returns how long to wait.
    fn failed(&mut self, e: &std::io::Error, addr: SocketAddr, what: &str) -> Duration {
        self.unlogged += 1;
        if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= Self::LOG_INTERVAL)
        {
            tracing::warn!(%addr, what, error = %e, failures = self.unlogged, "cannot accept a connection; going on");
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        wait
    }
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            backoff: Self::FIRST_BACKOFF,
            last_logged: None,
            unlogged: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_and_are_logged_once_per_interval() {
        let mut errors = AcceptErrors::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let addr = SocketAddr::from(([127, 0, 0, 1], 10256));
        let waits: Vec<Duration> = (0..10).map(|_| errors.failed(&e, addr, "test")).collect();
        assert_eq!(waits[0], AcceptErrors::FIRST_BACKOFF);
        assert_eq!(waits[1], AcceptErrors::FIRST_BACKOFF * 2);
        assert_eq!(waits[9], AcceptErrors::MAX_BACKOFF);
        assert_eq!(errors.unlogged, 9, "only the first failure was logged");
        errors.succeeded();
        assert_eq!(errors.failed(&e, addr, "test"), AcceptErrors::FIRST_BACKOFF);
    }
}
