//! Dialling upstream: every socket the proxy opens carries the proxy's
//! `SO_MARK`, which the connect programs recognise and never steer. Without
//! it, a proxy in an enrolled namespace would dial itself forever.

use std::{io, net::SocketAddr, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub socket_mark: u32,
    pub connect_timeout: Duration,
}

impl Dialer {
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        setsockopt(&socket, sockopt::Mark, &self.socket_mark)?;
        socket.set_nodelay(true)?;
        match tokio::time::timeout(self.connect_timeout, socket.connect(addr)).await {
            Ok(stream) => stream,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect to {addr} timed out after {:?}",
                    self.connect_timeout
                ),
            )),
        }
    }
}
