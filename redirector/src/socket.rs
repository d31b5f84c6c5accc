//! The one place the daemon opens TCP sockets (ztunnel's socket factory,
//! in small): outbound connections, and the proxy's and admin listeners.
//!
//! Every socket it opens carries the proxy's `SO_MARK`, which the connect
//! programs recognise and never steer: without it a proxy in an enrolled
//! namespace would dial itself forever. The proxy's dialer and both HBONE
//! directions use it, so none of them depends on another for a socket.

use std::{
    cell::Cell,
    io,
    net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use bytes::BytesMut;
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

/// What a listener is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listening {
    /// Where steered connects land: the node address may not be up yet,
    /// and every accepted client wants `TCP_NODELAY`.
    Proxy,
    /// `/metrics`, probes, `/status`.
    Admin,
    /// The HBONE listener (15008): an upgrade's two daemons share it too.
    Hbone,
}

/// A non-blocking listener on `addr`, with `SO_REUSEPORT`: a daemon's
/// workers share the proxy addresses, and an upgrade's new daemon binds
/// every address beside the old one before the old one hands over. Only
/// sockets of the same user can join a group: root's, here.
pub fn listener(addr: SocketAddr, listening: Listening) -> io::Result<StdTcpListener> {
    let socket = bound(addr, listening)?;
    listen(&socket)?;
    Ok(socket)
}

/// Starts listening on a socket from [`bound`]: from now on the kernel
/// hands it connections (its share of the `SO_REUSEPORT` group's).
pub fn listen(socket: &StdTcpListener) -> io::Result<()> {
    nix::sys::socket::listen(socket, nix::sys::socket::Backlog::MAXCONN)?;
    Ok(())
}

/// [`listener`], bound but not listening yet: the address is taken (a
/// conflict fails now), but until [`listen`] the socket is not in the
/// `SO_REUSEPORT` group, so no connection lands on a daemon that cannot
/// serve it yet.
pub fn bound(addr: SocketAddr, listening: Listening) -> io::Result<StdTcpListener> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, socket};
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
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if listening == Listening::Proxy {
        // The node address may not be up yet when the daemon starts.
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
        // Accepted sockets inherit it: one syscall here instead of one per
        // client.
        setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(StdTcpListener::from(fd))
}

/// Accepts one connection from a non-blocking listener as a plain
/// non-blocking socket, registered in no reactor: for a worker's own epoll
/// loop, which would otherwise take it out of tokio's (`accept4` with
/// `SOCK_NONBLOCK`: no `fcntl`, no `getpeername`, no `epoll_ctl` pair).
pub fn accept_plain(
    listener: &impl std::os::fd::AsRawFd,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use nix::sys::socket::{SockaddrLike as _, SockaddrStorage};
    use std::os::fd::FromRawFd as _;
    let mut storage = std::mem::MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `storage` is a zeroed sockaddr_storage and `len` its size;
    // accept4 writes at most that much, and the length it wrote.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            storage.as_mut_ptr().cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is the connection accept4 just opened, owned by no one
    // else.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    // SAFETY: `storage` holds the `len` bytes of address accept4 wrote.
    let peer = unsafe { SockaddrStorage::from_raw(storage.as_ptr().cast(), Some(len)) }
        .ok_or_else(|| io::Error::other("accept gave no peer address"))?;
    let peer = peer
        .as_sockaddr_in()
        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        .or_else(|| {
            peer.as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        })
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((stream, peer))
}

/// A socket in the worker loop's epoll (`proxy::host`), a client's or an
/// upstream connection's: plain, non-blocking, edge-triggered, with the
/// readiness its edges reported and no read or write has used up yet.
pub struct EdgeSocket {
    stream: StdTcpStream,
    readable: Cell<bool>,
    writable: Cell<bool>,
}

impl EdgeSocket {
    /// Ready to read and write until a call says otherwise: the first
    /// step tries at once, rather than wait for the edges the socket's
    /// registration brings.
    pub fn new(stream: StdTcpStream) -> Self {
        Self {
            stream,
            readable: Cell::new(true),
            writable: Cell::new(true),
        }
    }

    pub fn into_stream(self) -> StdTcpStream {
        self.stream
    }

    /// An edge from the epoll: what the socket may do now.
    pub fn mark(&self, readable: bool, writable: bool) {
        if readable {
            self.readable.set(true);
        }
        if writable {
            self.writable.set(true);
        }
    }

    /// Reads into `buf`'s spare room. A read that leaves room has drained
    /// the socket, so its readiness ends there (the next bytes bring an
    /// edge), as tokio's does: no second `recv` that finds nothing.
    pub fn read_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        // A read into no room returns 0, which is EOF.
        if buf.capacity() == buf.len() {
            buf.reserve(16 * 1024);
        }
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        // SAFETY: `recvfrom` writes at most `room` bytes into the spare
        // capacity, and only the bytes it wrote are then counted as set;
        // no source address is asked for.
        let n = unsafe {
            direct_syscall(
                libc::SYS_recvfrom,
                self.stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                room,
                0,
            )
        }
        .inspect_err(|e| ends_at_would_block(e, &self.readable))?;
        // SAFETY: the first `n` spare bytes were written by `recvfrom` above.
        unsafe { buf.set_len(buf.len() + n) };
        if n < room {
            self.readable.set(false);
        }
        Ok(n)
    }

    pub fn is_readable(&self) -> bool {
        self.readable.get()
    }

    pub fn is_writable(&self) -> bool {
        self.writable.get()
    }

    /// Writes what the socket takes now; its write readiness ends at a
    /// `WouldBlock`.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `sendto` reads at most `buf.len()` bytes of `buf`; no
        // destination address is given (the socket is connected).
        unsafe {
            direct_syscall(
                libc::SYS_sendto,
                self.stream.as_raw_fd(),
                buf.as_ptr().cast_mut().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        }
        .inspect_err(|e| ends_at_would_block(e, &self.writable))
    }
}

/// A readiness ends where the socket says it would block.
fn ends_at_would_block(error: &io::Error, ready: &Cell<bool>) {
    if error.kind() == io::ErrorKind::WouldBlock {
        ready.set(false);
    }
}

/// `recvfrom` or `sendto` with no address, by `syscall(2)`. libc's `recv`
/// and `send` are thread cancellation points, and a multi-threaded
/// process's call switches asynchronous cancellation on and off around
/// each: 130 user-space instructions of a W1 GET (callgrind), for a
/// feature Rust never uses.
///
/// # Safety
/// `buf` must be valid for `len` bytes: written by `recvfrom`, read by
/// `sendto`.
unsafe fn direct_syscall(
    call: libc::c_long,
    fd: libc::c_int,
    buf: *mut libc::c_void,
    len: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    let none: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: the caller's promise on `buf`; the address arguments are
    // null, which both calls take as none.
    let n = unsafe { libc::syscall(call, fd, buf, len, flags, none, none) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
