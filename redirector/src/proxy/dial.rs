//! Opening upstream connections to Redis nodes.
//!
//! Direct connections come from [`crate::socket`], so they carry the
//! proxy's `SO_MARK` and are never steered back to it. Each connection then
//! runs the same handshake: `HELLO 3` for RESP3 connections (with AUTH
//! inside), else `AUTH`, then `READONLY` so replicas serve reads (masters
//! ignore it).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::UpstreamError;
use crate::{
    hbone,
    resp::{
        Protocol,
        reply::{self, Reply},
        request,
    },
    socket,
};

/// Credentials the proxy presents to Redis.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UpstreamAuth {
    pub user: Option<String>,
    pub password: String,
}

/// Never the password: configurations holding one are logged whole.
impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone)]
pub struct Dialer {
    /// 0 disables marking (proxy-only mode, where nothing steers).
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub auth: Option<UpstreamAuth>,
    /// Meshed nodes are reached through HBONE tunnels, the rest directly.
    pub mesh: Option<Arc<hbone::Mesh>>,
    /// Cluster nodes get READONLY (so replicas serve reads); a standalone
    /// Redis refuses it, and its replicas serve reads anyway.
    pub cluster: bool,
}

/// How a node is reached now: directly, or through a tunnel whose listener
/// must prove one of these identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamPath {
    Direct,
    Tunnel(Option<crate::identity::PeerIdentities>),
}

impl Dialer {
    /// How [`Self::connect`] would reach `addr` now. A connection kept
    /// across dials is opened again when this changes: the API meshed the
    /// node, or names another account for it.
    pub fn path_to(&self, addr: SocketAddr) -> UpstreamPath {
        match self.mesh.as_ref().filter(|m| m.is_meshed(addr.ip())) {
            Some(mesh) => UpstreamPath::Tunnel(mesh.expected(addr.ip())),
            None => UpstreamPath::Direct,
        }
    }

    /// Unmarked, no credentials, no mesh: tests and local tools.
    pub fn plain() -> Self {
        Self {
            socket_mark: 0,
            connect_timeout: Duration::from_secs(5),
            auth: None,
            mesh: None,
            cluster: false,
        }
    }

    /// A byte stream to a Redis node: a long-lived HBONE stream when the
    /// node is meshed, else plain TCP.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<Upstream> {
        if let Some(mesh) = self.mesh.as_ref().filter(|m| m.is_meshed(addr.ip())) {
            // TLS, HTTP/2 and the peer's own connect to the endpoint: a
            // peer that takes longer than both timeouts is treated as down.
            let limit = self.connect_timeout + hbone::HANDSHAKE_TIMEOUT;
            let opened = tokio::time::timeout(
                limit,
                mesh.connect(addr, hbone::outbound::Origin::default()),
            )
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("tunnel to {addr} not open after {limit:?}"),
                )
            })?;
            return Ok(Upstream::Tunnel(Box::new(
                opened.map_err(io::Error::other)?,
            )));
        }
        socket::connect_marked(addr, self.socket_mark, self.connect_timeout)
            .await
            .map(Upstream::Tcp)
    }

    /// Connects and runs the handshake. Returns the stream and any bytes
    /// read past the handshake replies.
    pub async fn open(
        &self,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<(Upstream, BytesMut), UpstreamError> {
        let mut stream = self
            .connect(addr)
            .await
            .map_err(|e| UpstreamError::Connect(addr, e.to_string()))?;
        let mut commands: Vec<Vec<Bytes>> = Vec::with_capacity(2);
        let auth = self.auth.as_ref().map(|a| {
            (
                Bytes::from(a.user.clone().unwrap_or_else(|| "default".into())),
                Bytes::from(a.password.clone()),
            )
        });
        match (protocol, auth) {
            (Protocol::Resp3, Some((user, pass))) => commands.push(vec![
                Bytes::from_static(b"HELLO"),
                Bytes::from_static(b"3"),
                Bytes::from_static(b"AUTH"),
                user,
                pass,
            ]),
            (Protocol::Resp3, None) => {
                commands.push(vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"3")]);
            }
            (Protocol::Resp2, Some((user, pass))) => {
                commands.push(vec![Bytes::from_static(b"AUTH"), user, pass]);
            }
            (Protocol::Resp2, None) => {}
        }
        if self.cluster {
            commands.push(vec![Bytes::from_static(b"READONLY")]);
        }
        let mut out = BytesMut::new();
        for command in &commands {
            request::encode_into(&mut out, command);
        }
        let io_err = |e: io::Error| UpstreamError::Connect(addr, e.to_string());
        stream.write_all(&out).await.map_err(io_err)?;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut replies: Vec<Reply> = Vec::with_capacity(commands.len());
        let handshake = async {
            while replies.len() < commands.len() {
                match reply::decode(&mut buf, protocol) {
                    Ok(Some(reply)) => replies.push(reply),
                    Ok(None) => {
                        if stream.read_buf(&mut buf).await.map_err(io_err)? == 0 {
                            return Err(UpstreamError::Connect(
                                addr,
                                "closed during handshake".into(),
                            ));
                        }
                    }
                    Err(e) => return Err(UpstreamError::Protocol(addr, e.to_string())),
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::Connect(addr, "handshake timed out".into()))??;
        // A node busy with a script refuses READONLY (it is not allowed
        // while busy), yet the connection is sound, and it is what SCRIPT
        // KILL and FUNCTION KILL need; so is one whose ACL user may not
        // run READONLY (a read-only `+@read` user). A replica's reads then
        // come back MOVED to its master.
        let busy_readonly = |(i, r): &(usize, &Reply)| {
            self.cluster
                && *i == commands.len() - 1
                && r.error_message()
                    .is_some_and(|m| m.starts_with(b"BUSY") || m.starts_with(b"NOPERM"))
        };
        if let Some((_, failed)) = replies
            .iter()
            .enumerate()
            .find(|entry| entry.1.is_error() && !busy_readonly(entry))
        {
            let message = failed.error_message().unwrap_or_default();
            return Err(UpstreamError::Handshake(
                addr,
                String::from_utf8_lossy(message).into_owned(),
            ));
        }
        Ok((stream, buf))
    }
}

/// A connection to a Redis node, direct or tunnelled; the rest of the
/// proxy does not care which.
pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(Box<hbone::Stream>),
}

pub enum UpstreamRead {
    Tcp(OwnedReadHalf),
    Tunnel(hbone::ReadHalf),
}

pub enum UpstreamWrite {
    Tcp(OwnedWriteHalf),
    Tunnel(hbone::WriteHalf),
}

impl Upstream {
    /// Open, with nothing to read: probed once, without waiting.
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Self::Tcp(stream) => {
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Self::Tunnel(stream) => {
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(&mut **stream)
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    pub fn into_split(self) -> (UpstreamRead, UpstreamWrite) {
        match self {
            Self::Tcp(stream) => {
                let (read, write) = stream.into_split();
                (UpstreamRead::Tcp(read), UpstreamWrite::Tcp(write))
            }
            Self::Tunnel(stream) => {
                let (read, write) = stream.into_split();
                (UpstreamRead::Tunnel(read), UpstreamWrite::Tunnel(write))
            }
        }
    }
}

macro_rules! delegate_read {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tunnel(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(Upstream);
delegate_write!(Upstream);
delegate_read!(UpstreamRead);
delegate_write!(UpstreamWrite);
