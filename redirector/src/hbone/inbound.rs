//! The HBONE listener (15008): terminates mTLS and HTTP/2, and connects
//! each allowed `CONNECT` to its local endpoint.
//!
//! Per stream, in this order:
//! - 400 unless the method is `CONNECT`;
//! - 401 unless the peer's SPIFFE identity is allowed by the [`Policy`];
//! - 400 unless the authority is an `ip:port` assigned in this network
//!   namespace (not the HBONE port itself; loopback only when the listener
//!   itself is on loopback, so no other host can use it): a tunnel reaches
//!   this node's endpoints and nothing else;
//! - 503 when the endpoint does not accept;
//! - 200, then bytes flow both ways until either side ends.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS, STREAM_WINDOW, Stream, StreamGuard, keepalive,
    metrics::TunnelMetrics, tls_handshake,
};
use crate::identity::{
    Identity, Policy, peer_identity,
    tls::{ALPN_H2, Tls},
};

pub struct Inbound {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Ends an [`Inbound`] gracefully: its listener closes (new tunnels go to
/// an upgrade's new daemon, which listens on the same port), and its
/// tunnels get a GOAWAY (no new streams; the open ones carry on).
#[derive(Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Drain {
    pub fn start(&self) {
        self.shared.draining.send_replace(true);
    }

    /// Streams still open through this listener.
    pub fn open_streams(&self) -> usize {
        self.shared
            .open_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tunnels (TLS + HTTP/2 connections) still open: after [`Self::start`]
    /// each closes once its streams are done, with a GOAWAY and TLS
    /// `close_notify`. A process that exits before then drops them as they
    /// are, which a peer's HTTP/2 client sees as an unexpected EOF (ztunnel
    /// logs "Error in HBONE connection handshake" for each).
    pub fn open_tunnels(&self) -> usize {
        self.shared
            .open_tunnels
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct Shared {
    tls: Arc<Tls>,
    /// Presented instead of `tls` on these local addresses: the fronted
    /// workload's identity, which its callers expect (ztunnel sends no SNI,
    /// so the address the caller dialled is all there is to go by).
    workloads: Vec<(std::net::IpAddr, Arc<Tls>)>,
    policy: Policy,
    metrics: Arc<TunnelMetrics>,
    /// Marks the sockets to local endpoints, so steering leaves them alone.
    socket_mark: u32,
    connect_timeout: Duration,
    /// The listener's address: its port is never a valid target, and
    /// only a loopback listener may lead to loopback endpoints.
    listen: SocketAddr,
    draining: tokio::sync::watch::Sender<bool>,
    open_streams: std::sync::atomic::AtomicUsize,
    open_tunnels: std::sync::atomic::AtomicUsize,
}

impl Inbound {
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<Tls>,
        workloads: Vec<(std::net::IpAddr, Arc<Tls>)>,
        policy: Policy,
        metrics: Arc<TunnelMetrics>,
        socket_mark: u32,
        connect_timeout: Duration,
    ) -> io::Result<Self> {
        let listener = TcpListener::from_std(crate::socket::listener(
            addr,
            crate::socket::Listening::Hbone,
        )?)?;
        let listen = listener.local_addr()?;
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                tls,
                workloads,
                policy,
                metrics,
                socket_mark,
                connect_timeout,
                listen,
                draining: tokio::sync::watch::Sender::new(false),
                open_streams: std::sync::atomic::AtomicUsize::new(0),
                open_tunnels: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    pub fn drain(&self) -> Drain {
        Drain {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts tunnels until the task is dropped or [`Drain::start`].
    pub async fn run(self) {
        let mut draining = self.shared.draining.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = draining.wait_for(|d| *d) => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let shared = Arc::clone(&self.shared);
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(shared, tcp, peer).await {
                            tracing::debug!(%peer, error = %e, "inbound tunnel ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr()?.ip();
    // A second handle on the socket, for the lingering close below (TLS
    // and HTTP/2 own the first until they end).
    let tcp = tcp.into_std()?;
    let lingering = tcp.try_clone()?;
    let tcp = TcpStream::from_std(tcp)?;
    let tls = shared
        .workloads
        .iter()
        .find(|(ip, _)| *ip == local)
        .map_or(&shared.tls, |(_, tls)| tls);
    let acceptor = TlsAcceptor::from(Arc::clone(&tls.current().server));
    let tls = tls_handshake(&shared.metrics, acceptor.accept(tcp), |tls| {
        tls.get_ref().1.alpn_protocol() == Some(ALPN_H2)
    })
    .await?;
    // The chain was verified in the handshake; what is left is its name.
    let identity = peer_identity(tls.get_ref().1.peer_certificates());
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| io::Error::other(format!("HTTP/2 handshake from {peer}: {e}")))?;
    let _closed = OpenTunnel::new(Arc::clone(&shared), "inbound");
    let mut pinger = conn.ping_pong().map(|p| tokio::spawn(keepalive(p)));
    let mut draining = shared.draining.subscribe();
    let mut goaway_sent = false;
    let result = loop {
        let dead_peer = async {
            match pinger.as_mut() {
                Some(pinger) => {
                    let _ = pinger.await;
                }
                None => std::future::pending().await,
            }
        };
        // accept() also drives the connection for the streams under way.
        let next = tokio::select! {
            next = conn.accept() => next,
            () = dead_peer => break Err(io::Error::other("keepalive: no pong in time")),
            // Once: no new streams here; the open ones finish.
            _ = draining.wait_for(|d| *d), if !goaway_sent => {
                goaway_sent = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(io::Error::other(e)),
            Some(Ok((request, respond))) => {
                let shared = Arc::clone(&shared);
                let identity = identity.clone();
                tokio::spawn(async move {
                    serve_stream(shared, identity, peer, request, respond).await;
                });
            }
        }
    };
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    if result.is_ok() {
        // The connection ended cleanly: HTTP/2 sent its GOAWAY, TLS its
        // close_notify, TCP its FIN. Closing now, with the peer's last
        // bytes (its own close_notify, a PING's ack) unread, would answer
        // them with a reset, and the peer's client would see a broken
        // pipe instead of a clean end. So the tunnel reads until the peer
        // closes too (bounded), and counts as open until then.
        drop(conn);
        linger(TcpStream::from_std(lingering)?).await;
    }
    result
}

/// How long a cleanly ended tunnel waits for its peer to close its side.
const LINGER: Duration = Duration::from_secs(2);

/// Reads (and drops) what the peer still sends, until it closes or
/// [`LINGER`] has passed.
async fn linger(mut tcp: TcpStream) {
    let drain = async {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Counts a tunnel open (metrics, [`Drain::open_tunnels`]) until dropped.
struct OpenTunnel(Arc<Shared>, &'static str);

impl OpenTunnel {
    fn new(shared: Arc<Shared>, direction: &'static str) -> Self {
        shared.metrics.tunnel_opened(direction);
        shared
            .open_tunnels
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(shared, direction)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0
            .open_tunnels
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.metrics.tunnel_closed(self.1);
    }
}

fn respond_with(metrics: &TunnelMetrics, respond: &mut SendResponse<Bytes>, status: StatusCode) {
    metrics.connect_status(status.as_u16());
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("a status-only response is valid");
    let _ = respond.send_response(response, true);
}

async fn serve_stream(
    shared: Arc<Shared>,
    identity: Result<Identity, crate::identity::Error>,
    peer: SocketAddr,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let metrics = &shared.metrics;
    let allowed = identity.as_ref().is_ok_and(|id| shared.policy.allows(id));
    let target = match admit(request.method(), request.uri(), allowed, shared.listen) {
        Admission::Connect(target) if assigned_here(target) => target,
        Admission::Connect(_) | Admission::Refuse(Refusal::NotLocalEndpoint) => {
            tracing::debug!(%peer, uri = %request.uri(), "tunnel refused: not a local endpoint");
            return respond_with(metrics, &mut respond, StatusCode::BAD_REQUEST);
        }
        Admission::Refuse(refusal @ Refusal::Identity) => {
            match &identity {
                Ok(id) => {
                    tracing::info!(%peer, identity = %id, "tunnel refused: identity not allowed")
                }
                Err(e) => tracing::info!(%peer, error = %e, "tunnel refused: no usable identity"),
            }
            return respond_with(metrics, &mut respond, refusal.status());
        }
        Admission::Refuse(refusal @ Refusal::NotConnect) => {
            return respond_with(metrics, &mut respond, refusal.status());
        }
    };
    let upstream =
        crate::socket::connect_marked(target, shared.socket_mark, shared.connect_timeout).await;
    let mut upstream = match upstream {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%peer, %target, error = %e, "tunnel target unreachable");
            return respond_with(metrics, &mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    metrics.connect_status(200);
    tracing::debug!(%peer, %target, forwarded = ?request.headers().get("forwarded"), "tunnel stream open");
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("a status-only response is valid");
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(_) => return,
    };
    let counted = Arc::clone(&shared);
    counted
        .open_streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let guard = StreamGuard::new(
        Arc::clone(metrics),
        Some(Box::new(move || {
            counted
                .open_streams
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        })),
    );
    let mut stream = Stream::new(send, request.into_body(), guard);
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        tracing::debug!(%peer, %target, error = %e, "tunnel stream ended with an error");
    }
}

/// What a tunnel stream gets, decided from its request alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Connect to this endpoint, if it is assigned here ([`assigned_here`]).
    Connect(SocketAddr),
    Refuse(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a `CONNECT`.
    NotConnect,
    /// The peer's identity is missing or not allowed by the policy.
    Identity,
    /// The authority is not `ip:port` of an endpoint a tunnel may reach.
    NotLocalEndpoint,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NotConnect | Self::NotLocalEndpoint => StatusCode::BAD_REQUEST,
            Self::Identity => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The checks of a `CONNECT`, in the order the module doc gives, before
/// any I/O: the method, the peer's identity (`identity_allowed`: the
/// policy's verdict), then the authority. Pure, so it is fuzzed.
pub fn admit(method: &Method, uri: &Uri, identity_allowed: bool, listen: SocketAddr) -> Admission {
    if method != Method::CONNECT {
        return Admission::Refuse(Refusal::NotConnect);
    }
    if !identity_allowed {
        return Admission::Refuse(Refusal::Identity);
    }
    match uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    {
        Some(target) if may_target(target, listen) => Admission::Connect(target),
        _ => Admission::Refuse(Refusal::NotLocalEndpoint),
    }
}

/// An address a tunnel may lead to: not unspecified or multicast, loopback
/// only for a listener on loopback (which no other host reaches), and not
/// the HBONE port (a tunnel into a tunnel goes nowhere).
fn may_target(target: SocketAddr, listen: SocketAddr) -> bool {
    let ip = target.ip();
    if ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    if ip.is_loopback() && !listen.ip().is_loopback() {
        return false;
    }
    target.port() != 0 && target.port() != listen.port()
}

/// Whether `target`'s address is assigned to an interface of this network
/// namespace (binding to it succeeds): a tunnel reaches this node's
/// endpoints and nothing else.
fn assigned_here(target: SocketAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(target.ip(), 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authority: &str, listen: SocketAddr) -> Admission {
        let uri: Uri = authority.parse().expect("authority");
        admit(&Method::CONNECT, &uri, true, listen)
    }

    /// Whether a CONNECT to `target` through `listen` reaches it.
    fn is_local_endpoint(target: &str, listen: SocketAddr) -> bool {
        matches!(connect(target, listen), Admission::Connect(t) if assigned_here(t))
    }

    #[test]
    fn only_this_hosts_endpoints_are_targets() {
        let node: SocketAddr = "0.0.0.0:15008".parse().expect("addr");
        let on_loopback: SocketAddr = "127.0.0.1:15008".parse().expect("addr");
        // Loopback endpoints only through a loopback listener.
        assert!(!is_local_endpoint("127.0.0.1:6379", node));
        assert!(is_local_endpoint("127.0.0.1:6379", on_loopback));
        // Never the listener's own port, never unspecified.
        assert!(!is_local_endpoint("127.0.0.1:15008", on_loopback));
        assert!(!is_local_endpoint("0.0.0.0:6379", node));
        // An address no interface here has (TEST-NET-3).
        assert!(!is_local_endpoint("203.0.113.9:6379", node));
    }

    #[test]
    fn a_tunnel_request_is_judged_by_method_then_identity_then_authority() {
        let listen: SocketAddr = "127.0.0.1:15008".parse().expect("addr");
        let uri: Uri = "127.0.0.1:6379".parse().expect("authority");
        let get: Uri = "http://127.0.0.1:6379/".parse().expect("uri");
        assert_eq!(
            admit(&Method::GET, &get, false, listen),
            Admission::Refuse(Refusal::NotConnect)
        );
        assert_eq!(
            admit(&Method::CONNECT, &uri, false, listen),
            Admission::Refuse(Refusal::Identity)
        );
        assert_eq!(Refusal::Identity.status(), StatusCode::UNAUTHORIZED);
        // Names are not resolved: a tunnel names an address.
        assert_eq!(
            connect("redis.shop:6379", listen),
            Admission::Refuse(Refusal::NotLocalEndpoint)
        );
        assert_eq!(
            connect("[ff02::1]:6379", listen),
            Admission::Refuse(Refusal::NotLocalEndpoint)
        );
        assert_eq!(
            connect("127.0.0.1:6379", listen),
            Admission::Connect("127.0.0.1:6379".parse().expect("addr"))
        );
    }
}
