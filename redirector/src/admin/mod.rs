//! The admin endpoint: `/metrics` (Prometheus text), `/dashboard` (a live
//! page of the same figures, with no external assets), `/healthz/ready`,
//! `/healthz/live`, `/status` (JSON, for `redirector status`), and
//! `POST /drain` (from this host only) for a preStop hook. A second,
//! metrics-only listener can face the network (`--metrics-addr`) while the
//! full one stays on loopback.
//!
//! hyper's HTTP/1 server answers one request per connection, on a thread of
//! its own (`redirector-admin`) with its own current-thread runtime, as
//! ztunnel does: a scrape, or a hostile client, never takes a turn from the
//! data path's workers. Each listener has [`Limits`]: a cap on open
//! connections (more are closed at once), the header size, a header-read
//! timeout, a whole-exchange timeout, and a bounded POST body; what they
//! turn away is counted in `redirector_admin_rejected_total`.

pub mod client;
pub mod metrics;
mod route;

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, oneshot},
};

use crate::metrics::MetricsRegistry;
use metrics::{AdminMetrics, Rejected};
use route::{Asked, Route, State};

/// The node dashboard: one HTML file whose script reads `/metrics`.
const DASHBOARD: &str = include_str!("../dashboard.html");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the admin runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot serve the admin listener on {addr}: {source}")]
    Listener { addr: String, source: io::Error },
    #[error("cannot start the admin thread: {0}")]
    Thread(io::Error),
}

/// Binds a listener here, so a taken port fails the daemon's start; it is
/// served on the admin thread.
/// With `SO_REUSEPORT`, as the proxy's: during an upgrade the old and the
/// new daemon both answer on it until the old one exits.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    crate::socket::listener(addr, crate::socket::Listening::Admin)
}

/// What each admin listener allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; one more is closed before a byte is read.
    pub max_connections: usize,
    /// Request line and headers; more gets 431.
    pub max_header_bytes: usize,
    /// From accept to the end of the headers (slowloris).
    pub header_timeout: Duration,
    /// The whole exchange: a slow body, or a client that never reads.
    pub request_timeout: Duration,
    /// A POST body; more gets 413 (nothing here takes a body).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Probes, a scrape or two, `redirector status`: a handful at
            // most, each for milliseconds.
            max_connections: 64,
            max_header_bytes: 16 * 1024,
            // Probes and scrapers send their headers in one segment.
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 4 * 1024,
        }
    }
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

/// The admin listeners, served on their own thread until dropped.
pub struct AdminServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    limits: Limits,
    registry: Arc<MetricsRegistry>,
    counters: AdminMetrics,
    health: Arc<Health>,
}

impl AdminServer {
    /// Serves `listeners` (each bound by [`bind`]) on the `redirector-admin`
    /// thread.
    pub fn start(
        listeners: Vec<(std::net::TcpListener, Scope)>,
        limits: Limits,
        registry: Arc<MetricsRegistry>,
        health: Arc<Health>,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        // Registered with the admin runtime's reactor, here, so an error is
        // the caller's to report.
        let listeners = {
            let _entered = runtime.enter();
            listeners
                .into_iter()
                .map(|(listener, scope)| {
                    let addr = listener
                        .local_addr()
                        .map_or_else(|_| "?".to_string(), |a| a.to_string());
                    TcpListener::from_std(listener)
                        .map(|listener| (listener, scope))
                        .map_err(|source| Error::Listener { addr, source })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let shared = Arc::new(Shared {
            limits,
            counters: registry.admin(),
            registry,
            health,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("redirector-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for (listener, scope) in listeners {
                        tokio::spawn(serve(listener, scope, Arc::clone(&shared)));
                    }
                    let _ = stopped.await;
                });
                // Dropping the runtime here ends every admin connection.
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Scope {
    /// The `listener` label of the admin metrics.
    fn label(self) -> &'static str {
        match self {
            Self::Full => "admin",
            Self::MetricsOnly => "metrics",
        }
    }
}

async fn serve(listener: TcpListener, scope: Scope, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, most likely: let connections finish.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Closed before a byte is read: a flood of idle connections
            // costs an accept each, and holds nothing.
            shared
                .counters
                .rejected(scope.label(), Rejected::MaxConnections);
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _open = shared.counters.open(scope.label());
            connection(stream, peer, scope, &shared).await;
            drop(slot);
        });
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, scope: Scope, shared: &Arc<Shared>) {
    let limits = shared.limits;
    let service = {
        let shared = Arc::clone(shared);
        service_fn(move |request| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(answer(request, peer, scope, &shared).await) }
        })
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // One request per connection: an idle keep-alive connection would
        // hold a slot.
        .keep_alive(false)
        .max_header_size(limits.max_header_bytes)
        .header_read_timeout(limits.header_timeout);
    let served = tokio::time::timeout(
        limits.request_timeout,
        http.serve_connection(TokioIo::new(stream), service),
    )
    .await;
    let rejected = match served {
        Err(_elapsed) => Some(Rejected::RequestTimeout),
        Ok(Err(e)) => rejection(&e),
        Ok(Ok(())) => None,
    };
    if let Some(reason) = rejected {
        shared.counters.rejected(scope.label(), reason);
    }
}

/// Which limit a failed connection ran into (none: the peer went away).
fn rejection(e: &hyper::Error) -> Option<Rejected> {
    if e.is_parse_too_large() {
        Some(Rejected::HeaderTooLarge)
    } else if e.is_timeout() {
        Some(Rejected::HeaderTimeout)
    } else if e.is_parse() {
        Some(Rejected::BadRequest)
    } else {
        None
    }
}

async fn answer(
    request: Request<Incoming>,
    peer: SocketAddr,
    scope: Scope,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|accept| accept.to_str().is_ok_and(route::accepts_openmetrics));
    let state = State {
        ready: shared.health.ready.load(Ordering::Relaxed),
        draining: shared.health.is_draining(),
    };
    let asked = Asked {
        method: request.method().as_str(),
        path: request.uri().path(),
        openmetrics,
        from_loopback: peer.ip().is_loopback(),
    };
    let route = route::route(&asked, scope, state);
    if request.method() == Method::POST {
        // Nothing here takes a body: read at most the limit, so a large
        // one ends at once.
        let body = Limited::new(request.into_body(), shared.limits.max_body_bytes);
        match body.collect().await {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                shared
                    .counters
                    .rejected(scope.label(), Rejected::BodyTooLarge);
                return reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    "request body too large\n".into(),
                );
            }
            Err(_) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "unreadable request body\n".into(),
                );
            }
        }
    }
    respond(route, shared)
}

fn respond(route: Route, shared: &Shared) -> Response<Full<Bytes>> {
    let text = "text/plain";
    match route {
        Route::Metrics { openmetrics: true } => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.registry.encode(),
        ),
        Route::Metrics { openmetrics: false } => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.registry.encode_prometheus_text(),
        ),
        Route::MetricsOnly => reply(
            StatusCode::NOT_FOUND,
            text,
            "this listener serves /metrics only\n".into(),
        ),
        Route::Status => {
            let health = &shared.health;
            let backends = health.backends();
            // Up: every backend serves (and there is at least one).
            let up = !backends.is_empty() && backends.iter().all(|b| b["state"] == "up");
            let status = serde_json::json!({
                "ready": health.is_ready(),
                "draining": health.is_draining(),
                "backend_up": up,
                "backends": backends,
            });
            reply(StatusCode::OK, "application/json", status.to_string())
        }
        Route::Dashboard => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            DASHBOARD.to_string(),
        ),
        Route::Ready => reply(StatusCode::OK, text, "ready\n".into()),
        Route::NotReady { draining: true } => {
            reply(StatusCode::SERVICE_UNAVAILABLE, text, "draining\n".into())
        }
        Route::NotReady { draining: false } => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "not ready: installing\n".into(),
        ),
        Route::Live => reply(StatusCode::OK, text, "live\n".into()),
        Route::Drain => {
            shared.health.drain();
            tracing::info!("draining: new connects go direct from now on");
            reply(StatusCode::OK, text, "draining\n".into())
        }
        Route::DrainForbidden => reply(
            StatusCode::FORBIDDEN,
            text,
            "drain is allowed from this host only\n".into(),
        ),
        Route::NotFound => reply(StatusCode::NOT_FOUND, text, "not found\n".into()),
        Route::MethodNotAllowed => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "GET, or POST /drain\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests;
