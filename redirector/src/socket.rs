//! The one place the daemon opens outbound TCP sockets (ztunnel's socket
//! factory, in small).
//!
//! Every socket it opens carries the proxy's `SO_MARK`, which the connect
//! programs recognise and never steer: without it a proxy in an enrolled
//! namespace would dial itself forever. The proxy's dialer and both HBONE
//! directions use it, so none of them depends on another for a socket.

use std::{io, net::SocketAddr, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection carrying the proxy's mark, so steering leaves it alone.
pub async fn connect_marked(
    addr: SocketAddr,
    socket_mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if socket_mark != 0 {
        setsockopt(&socket, sockopt::Mark, &socket_mark)?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}
