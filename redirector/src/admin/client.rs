//! The admin port's client, for `redirector status` and `redirector drain`:
//! one hyper HTTP/1.1 exchange per call, bounded in time and size.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// From the connect to the last byte of the reply.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Far above any `/metrics` of a node, far below harm.
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the admin endpoint {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the admin endpoint {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("bad admin request {path}: {source}")]
    Request { path: String, source: http::Error },
    #[error("HTTP exchange with the admin endpoint {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the admin endpoint {addr} sent more than {MAX_REPLY_BYTES} bytes")]
    TooLarge { addr: SocketAddr },
    #[error("reading the reply of the admin endpoint {addr}: {reason}")]
    Body { addr: SocketAddr, reason: String },
}

/// A reply: its status and its body as text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
}

/// `method path` on the admin endpoint at `addr`.
pub async fn request(addr: SocketAddr, method: Method, path: &str) -> Result<Reply, Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout {
            addr,
            timeout: CONNECT_TIMEOUT,
        })?
        .map_err(|source| Error::Connect { addr, source })?;
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, addr, method, path))
        .await
        .map_err(|_| Error::Timeout {
            addr,
            timeout: EXCHANGE_TIMEOUT,
        })?
}

async fn exchange(
    stream: TcpStream,
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> Result<Reply, Error> {
    let http = |source| Error::Http { addr, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection is driven beside the request; the server closes it
    // after the one reply.
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|source| Error::Request {
            path: path.to_string(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                Error::TooLarge { addr }
            } else {
                Error::Body {
                    addr,
                    reason: e.to_string(),
                }
            }
        })?
        .to_bytes();
    driver.abort();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
