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
pub mod outbound;

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::TunnelMetrics;

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
    pub meshed: Vec<Cidr>,
}

impl Mesh {
    pub fn is_meshed(&self, ip: IpAddr) -> bool {
        self.meshed.iter().any(|cidr| cidr.contains(ip))
    }
}

/// An address block, `10.0.0.0/24`, or one address (`10.0.0.5`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => (u32::from(net).into(), u32::from(ip).into(), 32),
            (IpAddr::V6(net), IpAddr::V6(ip)) => (u128::from(net), u128::from(ip), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= bits || (net >> host_bits) == (ip >> host_bits)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s}: expected an address or a CIDR such as 10.0.0.0/24");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

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
                recv,
                pending: Bytes::new(),
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
    recv: RecvStream,
    /// The rest of the last DATA frame.
    pending: Bytes,
    guard: Arc<StreamGuard>,
}

pub struct WriteHalf {
    send: SendStream<Bytes>,
    shut: bool,
    guard: Arc<StreamGuard>,
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
            match ready!(self.recv.poll_data(cx)) {
                // End of stream: EOF, as a TCP FIN.
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(data)) => {
                    // The frame is ours now: let the peer send the next one.
                    let _ = self.recv.flow_control().release_capacity(data.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_block_only() {
        let net: Cidr = "10.1.0.0/16".parse().expect("cidr");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let one: Cidr = "10.1.0.5".parse().expect("single address");
        assert!(one.contains("10.1.0.5".parse().expect("ip")));
        assert!(!one.contains("10.1.0.6".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "nonsense", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
