//! Dedicated upstream connections, leased to one client at a time: for
//! transactions (WATCH ... EXEC must share a connection), blocking commands
//! (which would stall a shared connection) and pub/sub. Returned leases are
//! kept warm in the node's pool, so a transaction never costs a connect.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    UpstreamError,
    dial::{Dialer, Upstream, UpstreamRead, UpstreamWrite},
};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
};

pub struct Leased {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    stream: Upstream,
    buf: BytesMut,
    broken: bool,
    /// Redis's CLIENT ID for this connection, once asked.
    upstream_id: Option<u64>,
}

impl Leased {
    pub async fn open(
        dialer: &Dialer,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<Self, UpstreamError> {
        let (stream, buf) = dialer.open(addr, protocol).await?;
        Ok(Self {
            addr,
            protocol,
            stream,
            buf,
            broken: false,
            upstream_id: None,
        })
    }

    /// Redis's id for this connection (asked once per connection).
    pub async fn client_id(&mut self) -> Result<u64, UpstreamError> {
        if let Some(id) = self.upstream_id {
            return Ok(id);
        }
        let replies = self.call(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n", 1).await?;
        match replies.first().map(|r| r.kind) {
            Some(reply::ReplyKind::Integer(id)) => {
                let id = u64::try_from(id).unwrap_or(0);
                self.upstream_id = Some(id);
                Ok(id)
            }
            _ => Err(UpstreamError::Protocol(self.addr, "no client id".into())),
        }
    }

    /// Writes `payload` (a command whose reply [`Self::read`] awaits).
    pub async fn write(&mut self, payload: &[u8]) -> Result<(), UpstreamError> {
        let result = self
            .stream
            .write_all(payload)
            .await
            .map_err(|e| UpstreamError::NotSent(self.addr, e.to_string()));
        self.broken |= result.is_err();
        result
    }

    /// Reads one reply.
    pub async fn read(&mut self) -> Result<Reply, UpstreamError> {
        let result = self.read_reply().await;
        self.broken |= result.is_err();
        result
    }

    /// Writes `payload` and reads `replies` frames.
    pub async fn call(
        &mut self,
        payload: &[u8],
        replies: usize,
    ) -> Result<Vec<Reply>, UpstreamError> {
        let result = async {
            self.stream
                .write_all(payload)
                .await
                .map_err(|e| UpstreamError::NotSent(self.addr, e.to_string()))?;
            let mut out = Vec::with_capacity(replies);
            while out.len() < replies {
                out.push(self.read_reply().await?);
            }
            Ok(out)
        }
        .await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn read_reply(&mut self) -> Result<Reply, UpstreamError> {
        read_reply(&mut self.stream, &mut self.buf, self.protocol, self.addr).await
    }

    /// Whether it can go back to the pool: nothing half-read, and Redis has
    /// not closed it meanwhile.
    pub fn is_reusable(&mut self) -> bool {
        if self.broken || !self.buf.is_empty() {
            return false;
        }
        self.stream.is_quiet()
    }

    /// For pub/sub: a reader that streams frames, and a writer.
    pub fn split(self) -> (LeasedReader, UpstreamWrite) {
        let (read, write) = self.stream.into_split();
        (
            LeasedReader {
                addr: self.addr,
                protocol: self.protocol,
                read,
                buf: self.buf,
            },
            write,
        )
    }
}

pub struct LeasedReader {
    pub addr: SocketAddr,
    protocol: Protocol,
    read: UpstreamRead,
    buf: BytesMut,
}

impl LeasedReader {
    pub async fn next(&mut self) -> Result<Reply, UpstreamError> {
        read_reply(&mut self.read, &mut self.buf, self.protocol, self.addr).await
    }
}

/// One reply frame from `read`, buffering in `buf`.
async fn read_reply(
    read: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    protocol: Protocol,
    addr: SocketAddr,
) -> Result<Reply, UpstreamError> {
    loop {
        match reply::decode(buf, protocol) {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) => return Err(UpstreamError::Protocol(addr, e.to_string())),
        }
        let n = read
            .read_buf(buf)
            .await
            .map_err(|e| UpstreamError::Lost(addr, e.to_string()))?;
        if n == 0 {
            return Err(UpstreamError::Lost(addr, "closed by Redis".into()));
        }
    }
}
