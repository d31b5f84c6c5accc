//! The admin endpoint: `/metrics` (Prometheus text), `/dashboard` (a live
//! page of the same figures, with no external assets), `/healthz/ready`,
//! `/healthz/live`, `/status` (JSON, for `redirector status`), and
//! `POST /drain` (from this host only) for a preStop hook. A second,
//! metrics-only listener can face the network (`--metrics-addr`) while the
//! full one stays on loopback.
//! A few lines of HTTP/1.1 (one request per connection) on their own task,
//! so a scrape never sits in the data path.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::metrics::MetricsRegistry;

/// The node dashboard: one HTML file whose script reads `/metrics`.
const DASHBOARD: &str = include_str!("dashboard.html");

pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Full,
    /// `/metrics` only: for a listener other hosts reach (Prometheus).
    MetricsOnly,
}

/// What the probes report.
#[derive(Default)]
pub struct Health {
    /// Programs attached and listeners bound (not: Redis reachable).
    ready: AtomicBool,
    /// `POST /drain` came: steering of new connects stops for good.
    draining: AtomicBool,
    /// Each backend's state, for `/status`.
    backends: std::sync::OnceLock<BackendsReport>,
}

type BackendsReport = Box<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>;

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_draining()
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Where `/status` finds the backends.
    pub fn set_backends_report(
        &self,
        report: impl Fn() -> Vec<serde_json::Value> + Send + Sync + 'static,
    ) {
        let _ = self.backends.set(Box::new(report));
    }

    fn backends(&self) -> Vec<serde_json::Value> {
        self.backends
            .get()
            .map(|report| report())
            .unwrap_or_default()
    }
}

pub async fn serve(
    listener: TcpListener,
    scope: Scope,
    metrics: Arc<MetricsRegistry>,
    health: Arc<Health>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer(stream, peer, scope, &metrics, &health),
            )
            .await;
        });
    }
}

fn accepts_openmetrics(request: &str) -> bool {
    request.lines().any(|header| {
        header.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    })
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    scope: Scope,
    metrics: &MetricsRegistry,
    health: &Health,
) -> io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() > 8192 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        // Prometheus asks for OpenMetrics; everyone else gets the classic
        // text format.
        ("GET", "/metrics") if accepts_openmetrics(&line) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode_prometheus_text(),
        ),
        (_, _) if scope == Scope::MetricsOnly => (
            "404 Not Found",
            "text/plain",
            "this listener serves /metrics only\n".to_string(),
        ),
        ("GET", "/status") => {
            let backends = health.backends();
            // Up: every backend serves (and there is at least one).
            let up = !backends.is_empty() && backends.iter().all(|b| b["state"] == "up");
            (
                "200 OK",
                "application/json",
                serde_json::json!({
                    "ready": health.is_ready(),
                    "draining": health.is_draining(),
                    "backend_up": up,
                    "backends": backends,
                })
                .to_string(),
            )
        }
        ("GET", "/dashboard" | "/dashboard/") => {
            ("200 OK", "text/html; charset=utf-8", DASHBOARD.to_string())
        }
        ("GET", "/healthz/ready") if health.is_ready() => {
            ("200 OK", "text/plain", "ready\n".to_string())
        }
        ("GET", "/healthz/ready") if health.is_draining() => (
            "503 Service Unavailable",
            "text/plain",
            "draining\n".to_string(),
        ),
        ("GET", "/healthz/ready") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: installing\n".to_string(),
        ),
        ("GET", "/healthz/live") => ("200 OK", "text/plain", "live\n".to_string()),
        // Only this host (a preStop hook) may drain the node's proxy.
        ("POST", "/drain") if peer.ip().is_loopback() => {
            health.drain();
            tracing::info!("draining: new connects go direct from now on");
            ("200 OK", "text/plain", "draining\n".to_string())
        }
        ("POST", "/drain") => (
            "403 Forbidden",
            "text/plain",
            "drain is allowed from this host only\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET, or POST /drain\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
