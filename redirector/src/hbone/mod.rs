//! HBONE: TCP streams carried between nodes as HTTP/2 `CONNECT` streams
//! over mutual TLS, on port 15008, as Istio ambient's ztunnels do.
//!
//! - [`outbound`]: dials peers' 15008 through a pool of h2 connections
//!   (one TLS handshake per peer, not per Redis connection).
//! - [`inbound`]: the 15008 listener; checks the peer's SPIFFE identity and
//!   the target, then connects to the local endpoint.
//!
//! A tunnel stream is an ordinary byte stream to its users ([`Stream`]), so
//! the Redis proxy's upstream connections run over it unchanged.

pub mod inbound;
pub mod metrics;
pub mod outbound;

use std::{
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

use metrics::TunnelMetrics;

/// Istio's HBONE port.
pub const DEFAULT_PORT: u16 = 15008;

/// HTTP/2 settings both ends use: Istio's windows and frame size.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams per tunnel connection (the peer's own limit may be lower).
pub const MAX_STREAMS: u32 = 100;
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A TLS plus HTTP/2 handshake that takes longer has failed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which Redis endpoints sit on meshed nodes (reached through their
/// node's HBONE listener), and the dialer for them. Everything else is
/// dialled directly.
pub struct Mesh {
    pub outbound: outbound::Outbound,
    pub meshed: Vec<MeshEndpoint>,
    /// Pod and Service addresses of the ambient mesh, from the API
    /// (`--mesh-identities-from-api`), with who answers for each.
    pub learned: Option<watch::Receiver<Arc<AddressIdentities>>>,
}

impl Mesh {
    pub fn is_meshed(&self, ip: IpAddr) -> bool {
        self.meshed.iter().any(|e| e.cidr.contains(ip))
            || self
                .learned
                .as_ref()
                .is_some_and(|learned| learned.borrow().contains_key(&ip))
    }

    /// Who may answer for `ip`: the identities every entry that contains
    /// it names; else those the API names for it; else the peer nodes'
    /// identity (redirector to redirector). An operator's entry wins over
    /// the API, so a wrong annotation can be overridden in place.
    pub fn expected(&self, ip: IpAddr) -> Option<PeerIdentities> {
        expected_identities(&self.meshed, ip).or_else(|| {
            self.learned
                .as_ref()
                .and_then(|learned| learned.borrow().get(&ip).cloned())
        })
    }

    /// A stream to `target`, through the listener on its address, from a
    /// peer proving one of the identities expected for it.
    pub async fn connect(
        &self,
        target: std::net::SocketAddr,
        origin: outbound::Origin,
    ) -> Result<Stream, outbound::Error> {
        self.outbound
            .connect_expecting(target, origin, self.expected(target.ip()))
            .await
    }
}

/// `--mesh-endpoints` entries: `CIDR` (a peer node answers, with the node
/// identity) or `CIDR=spiffe://...` (the workload there, with that
/// identity; several entries for one address add identities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshEndpoint {
    pub cidr: Cidr,
    pub identity: Option<crate::identity::Identity>,
}

impl std::str::FromStr for MeshEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (cidr, identity) = match s.split_once('=') {
            Some((cidr, id)) => (cidr, Some(id.parse().map_err(|e| format!("`{s}`: {e}"))?)),
            None => (s, None),
        };
        let cidr = cidr.parse()?;
        Ok(Self { cidr, identity })
    }
}

/// The identities named for `ip` (pure; `None`: the default peer).
pub fn expected_identities(entries: &[MeshEndpoint], ip: IpAddr) -> Option<PeerIdentities> {
    let named: Vec<_> = entries
        .iter()
        .filter(|e| e.cidr.contains(ip))
        .filter_map(|e| e.identity.clone())
        .collect();
    (!named.is_empty()).then(|| PeerIdentities::new(named))
}

use crate::identity::{AddressIdentities, PeerIdentities};

pub use crate::cidr::Cidr;

/// One CONNECT stream as a byte stream. Splits into halves that move
/// independently, as a TCP stream's do.
pub struct Stream {
    pub read: ReadHalf,
    pub write: WriteHalf,
}

impl Stream {
    fn new(send: SendStream<Bytes>, recv: RecvStream, guard: StreamGuard) -> Self {
        let guard = Arc::new(guard);
        Self {
            read: ReadHalf {
                recv: Some(recv),
                pending: Bytes::new(),
                ended: false,
                guard: Arc::clone(&guard),
            },
            write: WriteHalf {
                send,
                shut: false,
                guard,
            },
        }
    }

    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }
}

/// Counts the stream as active while either half lives, and its bytes.
struct StreamGuard {
    metrics: Arc<TunnelMetrics>,
    on_close: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl StreamGuard {
    fn new(metrics: Arc<TunnelMetrics>, on_close: Option<Box<dyn FnOnce() + Send + Sync>>) -> Self {
        metrics.stream_opened();
        Self { metrics, on_close }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.stream_closed();
        if let Some(on_close) = self.on_close.take() {
            on_close();
        }
    }
}

pub struct ReadHalf {
    /// Taken only by `drop`, to drain the stream to its end.
    recv: Option<RecvStream>,
    /// The rest of the last DATA frame.
    pending: Bytes,
    /// The peer ended the stream (or it failed): nothing left to drain.
    ended: bool,
    guard: Arc<StreamGuard>,
}

/// How long a dropped stream's read side waits for the peer's END_STREAM
/// before it gives up (then h2 resets it).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for ReadHalf {
    /// Dropping a stream the peer has not ended would make h2 reset it
    /// (RST_STREAM CANCEL), which ztunnel logs and counts as a failed
    /// connection: read it to its end instead, off the caller's path.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (Some(mut recv), Ok(runtime)) =
            (self.recv.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let guard = Arc::clone(&self.guard);
        runtime.spawn(async move {
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                loop {
                    match std::future::poll_fn(|cx| recv.poll_data(cx)).await {
                        None => return "end_stream",
                        Some(Err(e)) => return end_of(&e),
                        Some(Ok(data)) => {
                            let _ = recv.flow_control().release_capacity(data.len());
                        }
                    }
                }
            })
            .await;
            if let Ok(how) = drained {
                guard.metrics.stream_end_received(how);
            }
        });
    }
}

/// How a stream's read side ended, as `stream_ends_received` labels it.
fn end_of(e: &h2::Error) -> &'static str {
    if e.is_reset() { "reset" } else { "error" }
}

pub struct WriteHalf {
    send: SendStream<Bytes>,
    shut: bool,
    guard: Arc<StreamGuard>,
}

impl Drop for WriteHalf {
    /// Ends the stream as a TCP close does (END_STREAM), not with the
    /// RST_STREAM(CANCEL) h2 sends for a stream dropped half-open: a
    /// discovery call, an evicted pooled connection and a client's QUIT
    /// are graceful ends. Resets stay for real errors.
    fn drop(&mut self) {
        if !self.shut {
            self.shut = true;
            let _ = self.send.send_data(Bytes::new(), true);
        }
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            let Some(recv) = self.recv.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(recv.poll_data(cx)) {
                // End of stream: EOF, as a TCP FIN.
                None => {
                    if !self.ended {
                        self.ended = true;
                        self.guard.metrics.stream_end_received("end_stream");
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => {
                    if !self.ended {
                        self.ended = true;
                        self.guard.metrics.stream_end_received(end_of(&e));
                    }
                    return Poll::Ready(Err(h2_io_error(e)));
                }
                Some(Ok(data)) => {
                    // The frame is ours now: let the peer send the next one.
                    let _ = recv.flow_control().release_capacity(data.len());
                    self.guard.metrics.bytes_in(data.len());
                    self.pending = data;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Send only what the peer's window admits: the rest waits, so a
        // slow reader on the far side pushes back to our writer.
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    self.guard.metrics.bytes_out(n);
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // END_STREAM: the far side reads EOF, as after a TCP FIN.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; returns when a pong does
/// not come within [`KEEPALIVE_TIMEOUT`] (the caller then drops the
/// connection), or when the connection is gone.
async fn keepalive(mut ping_pong: h2::PingPong) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Runs one end of a TLS handshake within [`HANDSHAKE_TIMEOUT`] and checks
/// that it negotiated ALPN h2 (rustls lets a peer that offers no ALPN at
/// all complete the handshake); counts every failure by reason.
async fn tls_handshake<T>(
    metrics: &TunnelMetrics,
    handshake: impl Future<Output = io::Result<T>>,
    negotiated_h2: impl FnOnce(&T) -> bool,
) -> io::Result<T> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.handshake_failed(handshake_failure(&e));
            return Err(e);
        }
        Err(_) => {
            metrics.handshake_failed("timeout");
            return Err(io::ErrorKind::TimedOut.into());
        }
    };
    if !negotiated_h2(&tls) {
        metrics.handshake_failed("no_alpn");
        return Err(io::Error::other("ALPN h2 was not negotiated"));
    }
    Ok(tls)
}

/// Every label [`handshake_failure`] (and the dialer) may give.
pub const HANDSHAKE_FAILURE_REASONS: [&str; 13] = [
    "timeout",
    "unknown_ca",
    "expired",
    "bad_certificate",
    "no_client_certificate",
    "no_alpn",
    "incompatible",
    "peer_unknown_ca",
    "alert",
    "not_tls",
    "tls",
    "io",
    "wrong_identity",
];

/// Why a TLS handshake failed, as a metric label.
fn handshake_failure(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_ca",
        Some(Error::InvalidCertificate(CertificateError::Expired)) => "expired",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::NoApplicationProtocol) => "no_alpn",
        Some(Error::PeerIncompatible(_)) => "incompatible",
        Some(Error::AlertReceived(AlertDescription::UnknownCA)) => "peer_unknown_ca",
        Some(Error::AlertReceived(_)) => "alert",
        Some(Error::InvalidMessage(_) | Error::InappropriateMessage { .. }) => "not_tls",
        Some(_) => "tls",
        None => "io",
    }
}

/// The tunnel end to end in one process: both sides on loopback (a loopback
/// listener may lead to loopback endpoints), certificates minted here.
#[cfg(test)]
mod endpoint_tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn mesh_endpoints_name_the_identities_that_answer_for_an_address() {
        let entries: Vec<MeshEndpoint> = [
            "10.0.2.0/24",
            "10.0.2.7=spiffe://cluster.local/ns/shop/sa/cart",
            "10.0.2.7=spiffe://cluster.local/ns/shop/sa/cart-svc",
            "10.0.3.9/32=spiffe://cluster.local/ns/auth/sa/sessions",
        ]
        .iter()
        .map(|e| e.parse().expect(e))
        .collect();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let cart = expected_identities(&entries, ip("10.0.2.7")).expect("named");
        assert!(cart.accepts(&Identity::new("cluster.local", "shop", "cart")));
        assert!(cart.accepts(&Identity::new("cluster.local", "shop", "cart-svc")));
        assert_eq!(cart.iter().count(), 2);
        assert_eq!(
            expected_identities(&entries, ip("10.0.2.8")),
            None,
            "meshed, no identity named: the peer node answers"
        );
        assert_eq!(
            expected_identities(&entries, ip("10.0.3.9")),
            Some(PeerIdentities::one(Identity::new(
                "cluster.local",
                "auth",
                "sessions"
            )))
        );
        for bad in [
            "10.0.2.7=cart",
            "10.0.2.x=spiffe://cluster.local/ns/a/sa/b",
            "=spiffe://cluster.local/ns/a/sa/b",
        ] {
            assert!(bad.parse::<MeshEndpoint>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod tunnel_tests {
    use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        sync::watch,
    };

    use super::{
        inbound::Inbound,
        metrics::TunnelMetrics,
        outbound::{Origin, Outbound},
    };
    use crate::identity::{
        AddressIdentities, Identity, PeerIdentities, Policy,
        mint::Ca,
        tls::{CertFiles, Tls},
    };

    fn issue(ca: &Ca, identity: &Identity, name: &str) -> Arc<Tls> {
        // Tests run in parallel threads of one process: one directory each.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir: PathBuf =
            std::env::temp_dir().join(format!("rdr-hbone-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca.issue_into(identity, &dir).expect("issue");
        let tls = Tls::load(CertFiles::in_dir(&dir)).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        tls
    }

    async fn echo_server() -> SocketAddr {
        echo_on("127.0.0.1").await
    }

    struct Rig {
        node: Identity,
        ca: Ca,
        listener: SocketAddr,
        echo: SocketAddr,
        server_metrics: Arc<TunnelMetrics>,
    }

    async fn rig() -> Rig {
        let ca = Ca::new("cluster.local").expect("ca");
        let node = Identity::new("cluster.local", "redirector", "node");
        let server_metrics = Arc::new(TunnelMetrics::detached());
        let inbound = Inbound::bind(
            "127.0.0.1:0".parse().expect("addr"),
            issue(&ca, &node, "server"),
            Vec::new(),
            Policy {
                trust_domain: "cluster.local".into(),
                namespaces: vec!["redirector".into()],
            },
            Arc::clone(&server_metrics),
            0,
            Duration::from_secs(1),
        )
        .await
        .expect("bind");
        let listener = inbound.local_addr().expect("addr");
        tokio::spawn(inbound.run());
        Rig {
            echo: echo_server().await,
            node,
            ca,
            listener,
            server_metrics,
        }
    }

    fn outbound(rig: &Rig, identity: &Identity, name: &str, idle: Duration) -> Outbound {
        Outbound::new(
            issue(&rig.ca, identity, name),
            rig.listener.port(),
            rig.node.clone(),
            Arc::new(TunnelMetrics::detached()),
            0,
            Duration::from_secs(1),
            idle,
        )
    }

    #[tokio::test]
    async fn streams_share_one_connection_which_idles_out() {
        let rig = rig().await;
        let out = outbound(&rig, &rig.node, "client", Duration::from_millis(300));
        let mut streams = Vec::new();
        for i in 0..5u8 {
            let mut stream = out
                .connect_via(rig.listener, rig.echo, Origin::default())
                .await
                .expect("CONNECT");
            stream.write_all(&[b'a' + i; 3]).await.expect("write");
            let mut back = [0u8; 3];
            stream.read_exact(&mut back).await.expect("echo");
            assert_eq!(back, [b'a' + i; 3]);
            streams.push(stream);
        }
        assert_eq!(out.connections(), 1, "five streams, one connection");
        // A large write crosses flow control windows both ways.
        let big = vec![7u8; 9 * 1024 * 1024];
        let (mut r, mut w) = streams.pop().expect("stream").into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&big).await.expect("write 9 MiB");
            w.shutdown().await.expect("end stream");
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.expect("read 9 MiB back");
        writer.await.expect("writer");
        assert_eq!(echoed.len(), 9 * 1024 * 1024);
        assert!(echoed.iter().all(|&b| b == 7));
        drop(streams);
        drop(r);
        tokio::time::timeout(Duration::from_secs(5), async {
            while out.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("an idle connection is closed");
        // And a new stream opens a new one.
        out.connect_via(rig.listener, rig.echo, Origin::default())
            .await
            .expect("CONNECT after idling out");
        assert_eq!(out.connections(), 1);
    }

    #[tokio::test]
    async fn streams_the_proxy_ends_close_with_end_stream_not_a_reset() {
        let rig = rig().await;
        let client_metrics = Arc::new(TunnelMetrics::detached());
        let out = Outbound::new(
            issue(&rig.ca, &rig.node, "client"),
            rig.listener.port(),
            rig.node.clone(),
            Arc::clone(&client_metrics),
            0,
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        // A discovery call or an evicted pooled connection: one exchange,
        // then the stream is dropped as it is.
        for _ in 0..3 {
            let mut stream = out
                .connect_via(rig.listener, rig.echo, Origin::default())
                .await
                .expect("CONNECT");
            stream.write_all(b"PING").await.expect("write");
            let mut back = [0u8; 4];
            stream.read_exact(&mut back).await.expect("echo");
            drop(stream);
        }
        // A client's QUIT: the write side is shut first.
        let mut stream = out
            .connect_via(rig.listener, rig.echo, Origin::default())
            .await
            .expect("CONNECT");
        stream.write_all(b"QUIT").await.expect("write");
        stream.shutdown().await.expect("end stream");
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.expect("echo, then EOF");
        assert_eq!(back, b"QUIT");
        drop(stream);
        // Read by the far end: four END_STREAMs, no RST_STREAM; and the
        // far end's own ends, drained here, are graceful too.
        let ended = |m: &TunnelMetrics| m.stream_ends_received("end_stream");
        tokio::time::timeout(Duration::from_secs(5), async {
            while ended(&rig.server_metrics) < 4 || ended(&client_metrics) < 4 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every stream ended with END_STREAM on both sides");
        for m in [&rig.server_metrics, &client_metrics] {
            assert_eq!(m.stream_ends_received("reset"), 0, "a stream was reset");
            assert_eq!(m.stream_ends_received("error"), 0);
        }
        assert_eq!(out.connections(), 1, "the tunnel itself stays up");
    }

    /// The listeners' policy in these tests: the trust domain, any namespace.
    fn any_namespace() -> Policy {
        Policy {
            trust_domain: "cluster.local".into(),
            namespaces: vec![],
        }
    }

    /// An echo server on `ip`.
    async fn echo_on(ip: &str) -> SocketAddr {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// An HBONE listener on `ip:port` presenting `identity` there (as a
    /// fronted workload's certificate chosen by the local address; the
    /// node's certificate otherwise).
    async fn workload_listener(rig: &Rig, ip: &str, port: u16, identity: &Identity) -> SocketAddr {
        let inbound = Inbound::bind(
            SocketAddr::new(ip.parse().expect("ip"), port),
            issue(&rig.ca, &rig.node, "node"),
            vec![(
                ip.parse().expect("ip"),
                issue(&rig.ca, identity, "workload"),
            )],
            any_namespace(),
            Arc::new(TunnelMetrics::detached()),
            0,
            Duration::from_secs(1),
        )
        .await
        .expect("bind");
        let addr = inbound.local_addr().expect("addr");
        tokio::spawn(inbound.run());
        addr
    }

    fn mesh(rig: &Rig, port: u16, entries: &[&str]) -> super::Mesh {
        super::Mesh {
            outbound: Outbound::new(
                issue(&rig.ca, &rig.node, "client"),
                port,
                rig.node.clone(),
                Arc::new(TunnelMetrics::detached()),
                0,
                Duration::from_secs(1),
                Duration::from_secs(30),
            ),
            meshed: entries.iter().map(|e| e.parse().expect("entry")).collect(),
            learned: None,
        }
    }

    async fn exchange(
        mesh: &super::Mesh,
        target: SocketAddr,
    ) -> Result<(), super::outbound::Error> {
        let mut stream = mesh.connect(target, Origin::default()).await?;
        stream.write_all(b"PING").await.expect("write");
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"PING");
        Ok(())
    }

    #[tokio::test]
    async fn a_destination_is_answered_by_the_workload_identity_named_for_it() {
        let rig = rig().await;
        let cart = Identity::new("cluster.local", "shop", "cart-redis");
        // The listener presents the cart workload's certificate on
        // 127.0.0.5, where the caller dials the workload.
        let listener = workload_listener(&rig, "127.0.0.5", 0, &cart).await;
        let redis = echo_on("127.0.0.5").await;
        let named = mesh(
            &rig,
            listener.port(),
            &["127.0.0.5=spiffe://cluster.local/ns/shop/sa/cart-redis"],
        );
        exchange(&named, redis)
            .await
            .expect("the workload identity is accepted");

        // The same peer, where another identity is expected: refused in
        // the handshake, before any CONNECT.
        let other = mesh(
            &rig,
            listener.port(),
            &["127.0.0.5=spiffe://cluster.local/ns/shop/sa/other"],
        );
        match exchange(&other, redis).await {
            Err(super::outbound::Error::WrongPeer { found, .. }) => {
                assert_eq!(found, cart.to_string());
            }
            other => panic!("expected WrongPeer, got {:?}", other.err()),
        }
        // And where a peer node is expected (no identity named): refused too.
        let node = mesh(&rig, listener.port(), &["127.0.0.5"]);
        assert!(matches!(
            exchange(&node, redis).await,
            Err(super::outbound::Error::WrongPeer { .. })
        ));
    }

    #[tokio::test]
    async fn identities_learned_from_the_api_mesh_an_address_and_follow_its_changes() {
        let rig = rig().await;
        let cart = Identity::new("cluster.local", "shop", "cart-redis");
        let listener = workload_listener(&rig, "127.0.0.8", 0, &cart).await;
        let redis = echo_on("127.0.0.8").await;
        let (api, learned) = watch::channel(Arc::new(AddressIdentities::new()));
        let mut ambient = mesh(&rig, listener.port(), &[]);
        ambient.learned = Some(learned);
        assert!(
            !ambient.is_meshed(redis.ip()),
            "nothing meshed before the API names it"
        );
        api.send_replace(Arc::new(AddressIdentities::from([(
            redis.ip(),
            PeerIdentities::one(cart.clone()),
        )])));
        assert!(ambient.is_meshed(redis.ip()));
        exchange(&ambient, redis)
            .await
            .expect("the pod's service account, as the API says");
        // The pod is replaced by one of another account: the pooled tunnel
        // (keyed by the identity set) is not reused, and the listener's
        // certificate no longer passes.
        api.send_replace(Arc::new(AddressIdentities::from([(
            redis.ip(),
            PeerIdentities::one(Identity::new("cluster.local", "shop", "other")),
        )])));
        assert!(matches!(
            exchange(&ambient, redis).await,
            Err(super::outbound::Error::WrongPeer { .. })
        ));
        // An operator's entry for the address wins over the API.
        let mut pinned = mesh(
            &rig,
            listener.port(),
            &["127.0.0.8=spiffe://cluster.local/ns/shop/sa/cart-redis"],
        );
        pinned.learned = ambient.learned.clone();
        exchange(&pinned, redis)
            .await
            .expect("the operator's entry");
    }

    #[tokio::test]
    async fn two_destinations_with_their_own_identities_and_a_peer_node_at_once() {
        let rig = rig().await;
        let cart = Identity::new("cluster.local", "shop", "cart-redis");
        let sessions = Identity::new("cluster.local", "auth", "sessions-redis");
        let first = workload_listener(&rig, "127.0.0.5", 0, &cart).await;
        let port = first.port();
        workload_listener(&rig, "127.0.0.6", port, &sessions).await;
        // A redirector node: its listener presents the node identity.
        let node_listener = Inbound::bind(
            SocketAddr::new("127.0.0.7".parse().expect("ip"), port),
            issue(&rig.ca, &rig.node, "peer-node"),
            Vec::new(),
            any_namespace(),
            Arc::new(TunnelMetrics::detached()),
            0,
            Duration::from_secs(1),
        )
        .await
        .expect("bind");
        tokio::spawn(node_listener.run());
        let targets = [
            echo_on("127.0.0.5").await,
            echo_on("127.0.0.6").await,
            echo_on("127.0.0.7").await,
        ];
        let both = mesh(
            &rig,
            port,
            &[
                "127.0.0.5=spiffe://cluster.local/ns/shop/sa/cart-redis",
                "127.0.0.6=spiffe://cluster.local/ns/auth/sa/sessions-redis",
                // A Service SAN also accepted for the sessions address.
                "127.0.0.6=spiffe://cluster.local/ns/auth/sa/sessions-svc",
                "127.0.0.7",
            ],
        );
        let (a, b, c) = tokio::join!(
            exchange(&both, targets[0]),
            exchange(&both, targets[1]),
            exchange(&both, targets[2]),
        );
        a.expect("cart through its workload identity");
        b.expect("sessions through its workload identity");
        c.expect("a peer redirector through the node identity");
        assert_eq!(
            both.outbound.connections(),
            3,
            "one tunnel per (identities, peer)"
        );
    }

    #[tokio::test]
    async fn a_draining_listener_hands_new_tunnels_to_its_successor_and_keeps_open_streams() {
        let rig = rig().await;
        let listener = |addr: SocketAddr, metrics: &Arc<TunnelMetrics>| {
            Inbound::bind(
                addr,
                issue(&rig.ca, &rig.node, "listener"),
                Vec::new(),
                any_namespace(),
                Arc::clone(metrics),
                0,
                Duration::from_secs(1),
            )
        };
        let old_metrics = Arc::new(TunnelMetrics::detached());
        let old = listener("127.0.0.8:0".parse().expect("addr"), &old_metrics)
            .await
            .expect("bind");
        let addr = old.local_addr().expect("addr");
        let old_drain = old.drain();
        tokio::spawn(old.run());
        let echo = echo_on("127.0.0.8").await;
        let out = outbound(&rig, &rig.node, "client", Duration::from_secs(30));
        let mut open = out
            .connect_via(addr, echo, Origin::default())
            .await
            .expect("CONNECT through the old listener");
        assert_eq!(old_drain.open_streams(), 1);

        // An upgrade: the successor binds the same port beside it.
        let new_metrics = Arc::new(TunnelMetrics::detached());
        let new = listener(addr, &new_metrics)
            .await
            .expect("the successor shares the HBONE port");
        tokio::spawn(new.run());
        old_drain.start();
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A new stream: the pooled tunnel got a GOAWAY, so a fresh one,
        // which only the successor's listener can take now.
        let mut fresh = out
            .connect_via(addr, echo, Origin::default())
            .await
            .expect("CONNECT after the old listener drained");
        fresh.write_all(b"new").await.expect("write");
        let mut back = [0u8; 3];
        fresh.read_exact(&mut back).await.expect("echo");
        assert_eq!(
            new_metrics.connect_status_count(200),
            1,
            "served by the successor"
        );
        // The stream opened before goes on through the old daemon.
        open.write_all(b"old").await.expect("write");
        open.read_exact(&mut back)
            .await
            .expect("echo through the old tunnel");
        assert_eq!(&back, b"old");
        drop(open);
        tokio::time::timeout(Duration::from_secs(5), async {
            while old_drain.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the old listener's last stream ends");
        assert_eq!(old_metrics.connect_status_count(200), 1);
    }

    /// What a peer's HTTP/2 client (ztunnel's) sees of a redirector that
    /// stops: one that waits for `open_tunnels()` to reach 0 after the
    /// drain has sent each idle tunnel a GOAWAY and TLS close_notify, so
    /// the client's connection ends without an error. (Exiting at once
    /// dropped it mid-connection: ztunnel logged "Error in HBONE connection
    /// handshake: ... peer closed connection without sending TLS
    /// close_notify" per tunnel, `cargo xtask interop`.)
    #[test]
    fn a_drained_listener_counts_a_tunnel_open_until_it_has_ended_cleanly() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        // The daemon's runtime, on its own thread, shut down below as an
        // exiting process would.
        let daemon = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = Ca::new("cluster.local").expect("ca");
        let node = Identity::new("cluster.local", "redirector", "node");
        let inbound = daemon
            .block_on(Inbound::bind(
                "127.0.0.1:0".parse().expect("addr"),
                issue(&ca, &node, "draining"),
                Vec::new(),
                any_namespace(),
                Arc::new(TunnelMetrics::detached()),
                0,
                Duration::from_secs(1),
            ))
            .expect("bind");
        let addr = inbound.local_addr().expect("addr");
        let drain = inbound.drain();
        daemon.spawn(inbound.run());

        let client = runtime();
        let tls = issue(&ca, &node, "peer");
        let (send, ended) = client.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.current().client));
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = connector.connect(name, tcp).await.expect("tls");
            let (send, conn) = h2::client::handshake(stream).await.expect("h2");
            // Driven as ztunnel drives its pooled connections (PINGs
            // answered); its result is what ztunnel logs.
            let ended = tokio::spawn(conn);
            let drain = &drain;
            let settle = |want: usize| async move {
                while drain.open_tunnels() != want {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), settle(1))
                .await
                .expect("the tunnel counted");
            drain.start();
            tokio::time::timeout(Duration::from_secs(5), settle(0))
                .await
                .expect("the idle tunnel closed after the drain");
            // The client keeps its handle, as a pool does.
            (send, ended)
        });
        daemon.shutdown_background();
        let result = client
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), ended).await })
            .expect("the client's connection ended")
            .expect("joined");
        assert!(result.is_ok(), "the peer saw {result:?}");
        drop(send);
    }

    /// A Redis that answers every read with an error.
    async fn refusing_redis() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        let _ = n;
                        let _ = tcp.write_all(b"-ERR not a cluster\r\n").await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_discovery_call_through_a_tunnel_ends_its_stream_with_end_stream() {
        let rig = rig().await;
        let redis = refusing_redis().await;
        let mesh = super::Mesh {
            outbound: outbound(&rig, &rig.node, "client", Duration::from_secs(30)),
            meshed: vec!["127.0.0.0/8".parse().expect("cidr")],
            learned: None,
        };
        let dialer = crate::proxy::Dialer {
            mesh: Some(Arc::new(mesh)),
            ..crate::proxy::Dialer::plain()
        };
        // The answer is an error; the call is over either way.
        let view = crate::proxy::discovery::fetch_view(
            &mut crate::proxy::discovery::Control::default(),
            &dialer,
            redis,
        )
        .await;
        assert!(view.is_err(), "a refusing Redis gives no slot map");
        tokio::time::timeout(Duration::from_secs(5), async {
            while rig.server_metrics.stream_ends_received("end_stream") < 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the discovery stream ended with END_STREAM");
        assert_eq!(rig.server_metrics.stream_ends_received("reset"), 0);
    }

    #[tokio::test]
    async fn a_request_that_is_not_connect_gets_400() {
        let rig = rig().await;
        let tls = issue(&rig.ca, &rig.node, "raw");
        let tcp = tokio::net::TcpStream::connect(rig.listener)
            .await
            .expect("tcp");
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.current().client));
        let name = rustls::pki_types::ServerName::IpAddress(rig.listener.ip().into());
        let stream = connector.connect(name, tcp).await.expect("tls");
        let (send, conn) = h2::client::handshake(stream).await.expect("h2");
        tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("https://{}/", rig.echo))
            .body(())
            .expect("request");
        let (response, _) = send.send_request(request, true).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(rig.server_metrics.connect_status_count(400), 1);
    }

    #[tokio::test]
    async fn a_client_without_alpn_h2_is_refused() {
        let rig = rig().await;
        let tls = issue(&rig.ca, &rig.node, "no-alpn");
        let mut config = (*tls.current().client).clone();
        config.alpn_protocols.clear();
        let tcp = tokio::net::TcpStream::connect(rig.listener)
            .await
            .expect("tcp");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::IpAddress(rig.listener.ip().into());
        // TLS 1.3: the client finishes first; the refusal shows as the
        // server closing instead of speaking HTTP/2.
        if let Ok(stream) = connector.connect(name, tcp).await
            && let Ok((send, conn)) = h2::client::handshake(stream).await
        {
            tokio::spawn(conn);
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(rig.echo.to_string())
                .body(())
                .expect("request");
            let answered = async {
                let mut send = send.ready().await.ok()?;
                let (response, _) = send.send_request(request, false).ok()?;
                response.await.ok()
            };
            assert!(
                answered.await.is_none(),
                "HTTP/2 without ALPN h2 was served"
            );
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while rig.server_metrics.handshake_failure_count("no_alpn") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the listener counted the refusal");
    }

    #[tokio::test]
    async fn the_wrong_peer_identity_is_refused_before_any_request() {
        let rig = rig().await;
        // The client expects another identity than the server proves.
        let out = Outbound::new(
            issue(&rig.ca, &rig.node, "expecting"),
            rig.listener.port(),
            Identity::new("cluster.local", "redirector", "someone-else"),
            Arc::new(TunnelMetrics::detached()),
            0,
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let error = out
            .connect_via(rig.listener, rig.echo, Origin::default())
            .await
            .err()
            .expect("refused");
        assert!(error.to_string().contains("expected identity"), "{error}");
        assert_eq!(
            rig.server_metrics.connect_status_count(200),
            0,
            "no request was sent"
        );
    }
}
