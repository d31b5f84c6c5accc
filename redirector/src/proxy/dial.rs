//! Opening upstream connections to Redis nodes.
//!
//! Every socket the proxy opens carries the proxy's `SO_MARK`, which the
//! connect programs recognise and never steer: without it a proxy in an
//! enrolled namespace would dial itself forever. Each connection then runs
//! the same handshake: `HELLO 3` for RESP3 connections (with AUTH inside),
//! else `AUTH`, then `READONLY` so replicas serve reads (masters ignore it).

use std::{io, net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use super::UpstreamError;
use crate::resp::{
    Protocol,
    reply::{self, Reply},
    request,
};

/// Credentials the proxy presents to Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamAuth {
    pub user: Option<String>,
    pub password: String,
}

#[derive(Clone, Debug)]
pub struct Dialer {
    /// 0 disables marking (proxy-only mode, where nothing steers).
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub auth: Option<UpstreamAuth>,
}

impl Dialer {
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if self.socket_mark != 0 {
            setsockopt(&socket, sockopt::Mark, &self.socket_mark)?;
        }
        socket.set_nodelay(true)?;
        match tokio::time::timeout(self.connect_timeout, socket.connect(addr)).await {
            Ok(stream) => stream,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            )),
        }
    }

    /// Connects and runs the handshake. Returns the stream and any bytes
    /// read past the handshake replies.
    pub async fn open(
        &self,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<(TcpStream, BytesMut), UpstreamError> {
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
        commands.push(vec![Bytes::from_static(b"READONLY")]);
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
        if let Some(failed) = replies.iter().find(|r| r.is_error()) {
            let message = failed.error_message().unwrap_or_default();
            return Err(UpstreamError::Handshake(
                addr,
                String::from_utf8_lossy(message).into_owned(),
            ));
        }
        Ok((stream, buf))
    }
}
