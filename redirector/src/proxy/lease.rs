//! Dedicated upstream connections, leased to one client at a time: for
//! transactions (WATCH ... EXEC must share a connection), blocking commands
//! (which would stall a shared connection) and pub/sub. Returned leases are
//! kept warm in the node's pool, so a transaction never costs a connect.

use std::{io, net::SocketAddr};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::{UpstreamError, dial::Dialer};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
};

pub struct Leased {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    stream: TcpStream,
    buf: BytesMut,
    broken: bool,
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
        })
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
        loop {
            match reply::decode(&mut self.buf, self.protocol) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::Protocol(self.addr, e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| UpstreamError::Lost(self.addr, e.to_string()))?;
            if n == 0 {
                return Err(UpstreamError::Lost(self.addr, "closed by Redis".into()));
            }
        }
    }

    /// Whether it can go back to the pool: nothing half-read, and Redis has
    /// not closed it meanwhile.
    pub fn is_reusable(&mut self) -> bool {
        if self.broken || !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// For pub/sub: a reader that streams frames, and a writer.
    pub fn split(self) -> (LeasedReader, OwnedWriteHalf) {
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
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl LeasedReader {
    pub async fn next(&mut self) -> Result<Reply, UpstreamError> {
        loop {
            match reply::decode(&mut self.buf, self.protocol) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::Protocol(self.addr, e.to_string())),
            }
            let n = self
                .read
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| UpstreamError::Lost(self.addr, e.to_string()))?;
            if n == 0 {
                return Err(UpstreamError::Lost(self.addr, "closed by Redis".into()));
            }
        }
    }
}
