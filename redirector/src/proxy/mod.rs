//! The node proxy: the listener steered connects land on.
//!
//! Each accepted connection is matched to its original destination through
//! the `rdr_orig_dst` map (keyed by the 4-tuple), then served. A connection
//! with no entry was not steered: someone dialled the proxy port directly,
//! and it is closed, so the proxy is never an open relay.

pub mod relay;
pub mod upstream;

use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, debug, info_span};

use crate::steering::{OrigDstTable, orig_dst_addr};
pub use upstream::Dialer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

pub struct Proxy {
    listeners: Vec<TcpListener>,
    orig_dst: Arc<OrigDstTable>,
    dialer: Dialer,
}

impl Proxy {
    /// Binds every listener now, so a bind error surfaces before the daemon
    /// reports itself ready (and before the heartbeat turns steering on).
    pub fn bind(
        addrs: &[SocketAddr],
        orig_dst: OrigDstTable,
        dialer: Dialer,
    ) -> Result<Self, Error> {
        let listeners = addrs
            .iter()
            .map(|&addr| {
                // The socket is created non-blocking, as tokio requires.
                let bind = || TcpListener::from_std(listener_socket(addr)?);
                bind().map_err(|source| Error::Bind { addr, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            listeners,
            orig_dst: Arc::new(orig_dst),
            dialer,
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until the task is dropped.
    pub async fn serve(self) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.listeners {
            let orig_dst = Arc::clone(&self.orig_dst);
            let dialer = self.dialer;
            tasks.spawn(accept_loop(listener, orig_dst, dialer));
        }
        while tasks.join_next().await.is_some() {}
    }
}

fn listener_socket(addr: SocketAddr) -> io::Result<StdTcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    // The node address may not be up yet when the daemon starts.
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(StdTcpListener::from(fd))
}

async fn accept_loop(listener: TcpListener, orig_dst: Arc<OrigDstTable>, dialer: Dialer) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let orig_dst = Arc::clone(&orig_dst);
        let span = info_span!("client", %peer);
        tokio::spawn(serve_client(client, peer, orig_dst, dialer).instrument(span));
    }
}

async fn serve_client(
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: Arc<OrigDstTable>,
    dialer: Dialer,
) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    let Some(orig) = orig_dst.take(peer, local) else {
        debug!("no original destination: not a steered connection, closing");
        return;
    };
    let dest = orig_dst_addr(&orig);
    let _ = client.set_nodelay(true);
    let upstream = match dialer.connect(dest).await {
        Ok(upstream) => upstream,
        Err(e) => {
            debug!(%dest, error = %e, "upstream connect failed");
            return;
        }
    };
    debug!(%dest, netns_cookie = orig.netns_cookie, "relaying");
    match relay::relay(client, upstream).await {
        Ok((sent, received)) => debug!(%dest, sent, received, "closed"),
        Err(e) => debug!(%dest, error = %e, "relay ended"),
    }
}
