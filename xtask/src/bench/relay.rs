//! The floor under the latency figure: a relay that does nothing but copy
//! bytes, measured in the same open-loop slices as direct and the proxy.
//!
//! Any userspace hop between a client and Redis adds two wake-ups of the
//! hop (request in, reply back), two `recv`s and two `send`s, each `send`
//! running the receiver's TCP path. This relay pays exactly that and no
//! more: one thread per direction of each connection, blocked in `read`,
//! writing what it read at once (no epoll, no parsing, no queue, Nagle
//! off). What it adds over direct is what this machine charges for a hop,
//! whoever makes it; the proxy's own share is what it adds beyond that.
//!
//! It runs as a child process (`cargo xtask relay-floor`, hidden), in the
//! bench's network namespace, one listener per Redis master.
//!
//! The same relays, and a responder that has no upstream at all, are the
//! user-time floor of the workloads part: what this machine charges a
//! process's user time for the I/O of a hop alone (`workloads`, "floor").

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use testbed::process::{Child, Place, wait_for};

/// How the relay waits for bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// One thread per direction of each connection, blocked in `read`.
    Threads,
    /// One thread, one event loop (tokio's current-thread runtime, as the
    /// proxy's workers), `copy_bidirectional` per connection.
    EventLoop,
    /// One thread, one level-triggered epoll over every connection, and no
    /// runtime: a ready socket's bytes are read once and written to its
    /// peer at once, from one buffer. The least user-space work any
    /// event-driven hop can do per request (no task, no waker, no queue),
    /// so its user time is the floor of a proxy's, whatever it is
    /// written in.
    Epoll,
    /// One thread, one io_uring over every connection: a receive stays
    /// posted on each socket, and what it brings is sent to the peer with
    /// the next receive linked behind the send, so a request costs two
    /// completions and every ready socket of a turn shares one
    /// `io_uring_enter`. Whether batching the syscalls lowers the kernel's
    /// share of a hop, which the epoll loop pays one syscall at a time.
    Uring,
    /// No upstream at all: a thread per connection, blocked in `read`,
    /// answering every request itself (a nil per `*` read, which is one
    /// per request in redis-benchmark's GET and SET traffic, whose keys and
    /// values hold none). One `recv`, one `send` and one wake-up per
    /// request and nothing else: the client side of any hop, the least a
    /// proxy can be charged for.
    Responder,
}

/// Serves every `(listen, upstream)` pair until killed.
pub fn serve(model: Model, pairs: &[(SocketAddr, SocketAddr)]) -> Result<()> {
    if pairs.is_empty() {
        bail!("relay-floor: no --pair LISTEN=UPSTREAM given");
    }
    match model {
        Model::Threads => serve_blocking(pairs, relay),
        Model::EventLoop => serve_event_loop(pairs),
        Model::Epoll => serve_epoll(pairs),
        Model::Uring => uring::serve(pairs),
        Model::Responder => serve_blocking(pairs, respond),
    }
}

/// [`Model::Responder`]'s client (its upstream is not used): a thread
/// answers it.
fn respond(client: TcpStream, _upstream: SocketAddr) -> Result<()> {
    client.set_nodelay(true)?;
    thread::spawn(move || answer(client));
    Ok(())
}

/// Answers each `*` read with a nil until the client leaves.
fn answer(mut client: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.clear();
                for _ in buf[..n].iter().filter(|&&b| b == b'*') {
                    out.extend_from_slice(b"$-1\r\n");
                }
                if client.write_all(&out).is_err() {
                    break;
                }
            }
        }
    }
}

/// A thread per listener, blocked in `accept`, handing each client and the
/// pair's upstream to `serve` (the thread models).
fn serve_blocking(
    pairs: &[(SocketAddr, SocketAddr)],
    serve: fn(TcpStream, SocketAddr) -> Result<()>,
) -> Result<()> {
    let mut listeners = Vec::new();
    for &(listen, upstream) in pairs {
        let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        listeners.push(thread::spawn(move || -> Result<()> {
            for client in listener.incoming() {
                serve(client?, upstream)?;
            }
            Ok(())
        }));
    }
    for listener in listeners {
        listener
            .join()
            .map_err(|_| anyhow::anyhow!("a relay listener panicked"))??;
    }
    Ok(())
}

/// [`Model::Threads`]' client: a connection to the upstream and a thread
/// per direction.
fn relay(client: TcpStream, upstream: SocketAddr) -> Result<()> {
    let server = TcpStream::connect(upstream).with_context(|| format!("connect {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_tx, server_tx) = (client.try_clone()?, server.try_clone()?);
    thread::spawn(move || pump(client, server_tx));
    thread::spawn(move || pump(server, client_tx));
    Ok(())
}

/// Copies `from` to `to` until either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn serve_event_loop(pairs: &[(SocketAddr, SocketAddr)]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let mut listeners = Vec::new();
        for &(listen, upstream) in pairs {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind {listen}"))?;
            listeners.push(tokio::spawn(accept_events(listener, upstream)));
        }
        for listener in listeners {
            listener.await??;
        }
        Ok(())
    })
}

async fn accept_events(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    loop {
        let (mut client, _) = listener.accept().await?;
        let mut server = tokio::net::TcpStream::connect(upstream).await?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

/// [`Model::Epoll`]: listeners and connections in one epoll; a token is a
/// listener's index (below `pairs.len()`) or a connection's fd plus that.
fn serve_epoll(pairs: &[(SocketAddr, SocketAddr)]) -> Result<()> {
    use std::os::fd::{AsRawFd as _, RawFd};

    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut listeners = Vec::new();
    for (at, &(listen, upstream)) in pairs.iter().enumerate() {
        let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        listener.set_nonblocking(true)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, at as u64))?;
        listeners.push((listener, upstream));
    }
    let base = listeners.len() as u64;
    // By fd: the stream and the fd of its peer.
    let mut streams: Vec<Option<(TcpStream, RawFd)>> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = [EpollEvent::empty(); 64];
    loop {
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        for event in &events[..ready] {
            let token = event.data();
            if token < base {
                let (listener, upstream) = &listeners[token as usize];
                while let Ok((client, _)) = listener.accept() {
                    let server = TcpStream::connect(upstream)
                        .with_context(|| format!("connect {upstream}"))?;
                    for stream in [&client, &server] {
                        stream.set_nodelay(true)?;
                        stream.set_nonblocking(true)?;
                    }
                    let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
                    for (stream, fd) in [(&client, c), (&server, s)] {
                        epoll.add(
                            stream,
                            EpollEvent::new(EpollFlags::EPOLLIN, base + fd as u64),
                        )?;
                    }
                    let most = c.max(s) as usize;
                    if streams.len() <= most {
                        streams.resize_with(most + 1, || None);
                    }
                    streams[c as usize] = Some((client, s));
                    streams[s as usize] = Some((server, c));
                }
                continue;
            }
            let fd = (token - base) as usize;
            let Some((from, peer)) = streams.get(fd).and_then(Option::as_ref) else {
                continue;
            };
            let peer = *peer as usize;
            let copied = match (&*from).read(&mut buf) {
                Ok(0) => false,
                Ok(n) => streams[peer]
                    .as_ref()
                    .is_some_and(|(to, _)| write_all_spinning(to, &buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            };
            if !copied {
                // Dropping both streams closes them, which takes them out
                // of the epoll.
                streams[fd] = None;
                streams[peer] = None;
            }
        }
    }
}

/// [`Model::Uring`].
mod uring {
    use std::{
        net::{SocketAddr, TcpListener, TcpStream},
        os::fd::{AsRawFd as _, FromRawFd as _, RawFd},
    };

    use anyhow::{Context as _, Result};
    use io_uring::{IoUring, opcode, squeue, types};

    /// Bytes a socket's receive may bring at once; a W1/W2 pipeline of
    /// this bench is far smaller.
    const BUF: usize = 64 * 1024;
    /// `IORING_RECVSEND_POLL_FIRST`: a re-posted receive waits for data
    /// instead of first trying a read that would find none.
    const POLL_FIRST: u16 = 1;

    /// What a completion is about: `token >> 2` is a listener's index or
    /// the socket's fd, the low bits what was posted.
    const ACCEPT: u64 = 0;
    const RECV: u64 = 1;
    const SEND: u64 = 2;

    /// One socket of a relayed pair, by fd. Its buffer holds what its
    /// receive brings until the send to the peer has taken it; the kernel
    /// may write to it while a receive is posted, so a socket is dropped
    /// only once its last receive has completed.
    struct Socket {
        stream: TcpStream,
        peer: RawFd,
        buf: Box<[u8]>,
        closing: bool,
    }

    /// One thread submits and reaps, so the kernel may defer completion
    /// work to the next `io_uring_enter` rather than interrupt (6.1+).
    fn ring(entries: u32) -> std::io::Result<IoUring> {
        IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
    }

    pub(super) fn probe() -> std::io::Result<()> {
        ring(2).map(drop)
    }

    pub(super) fn serve(pairs: &[(SocketAddr, SocketAddr)]) -> Result<()> {
        let mut ring = ring(1024).context("io_uring_setup")?;
        let mut listeners = Vec::new();
        for &(listen, upstream) in pairs {
            let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
            listeners.push((listener, upstream));
        }
        let mut pending = Vec::new();
        for (at, (listener, _)) in listeners.iter().enumerate() {
            pending.push(accept(listener, at));
        }
        let mut sockets: Vec<Option<Socket>> = Vec::new();
        loop {
            for entry in pending.drain(..) {
                if ring.submission().is_full() {
                    ring.submit().context("io_uring_enter")?;
                }
                // SAFETY: every buffer an entry points into is a live
                // socket's, kept until that socket's receive completes.
                unsafe { ring.submission().push(&entry) }.context("the submission queue")?;
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (token, result) in done {
                let (what, at) = (token & 3, (token >> 2) as usize);
                match what {
                    ACCEPT => {
                        let (listener, upstream) = &listeners[at];
                        pending.push(accept(listener, at));
                        if result < 0 {
                            continue;
                        }
                        // SAFETY: the fd the accept completed with is ours.
                        let client = unsafe { TcpStream::from_raw_fd(result) };
                        let server = TcpStream::connect(upstream)
                            .with_context(|| format!("connect {upstream}"))?;
                        for stream in [&client, &server] {
                            stream.set_nodelay(true)?;
                        }
                        let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
                        let most = c.max(s) as usize;
                        if sockets.len() <= most {
                            sockets.resize_with(most + 1, || None);
                        }
                        for (stream, peer) in [(client, s), (server, c)] {
                            let fd = stream.as_raw_fd();
                            let mut socket = Socket {
                                stream,
                                peer,
                                buf: vec![0; BUF].into_boxed_slice(),
                                closing: false,
                            };
                            pending.push(recv(fd, &mut socket.buf));
                            sockets[fd as usize] = Some(socket);
                        }
                    }
                    RECV => {
                        let Some(socket) = sockets[at].as_mut() else {
                            continue;
                        };
                        if socket.closing || result <= 0 {
                            let peer = socket.peer as usize;
                            // Ends the peer's posted receive, whose
                            // completion then drops it.
                            let _ = socket.stream.shutdown(std::net::Shutdown::Both);
                            sockets[at] = None;
                            // The peer may be gone already and its fd
                            // number taken by a new connection's socket,
                            // whose peer is another.
                            if let Some(other) = sockets.get_mut(peer).and_then(Option::as_mut)
                                && other.peer == at as RawFd
                                && !other.closing
                            {
                                other.closing = true;
                                let _ = other.stream.shutdown(std::net::Shutdown::Both);
                            }
                            continue;
                        }
                        // Send what came to the peer, then post the next
                        // receive into the same buffer once the send has
                        // taken it (linked; MSG_WAITALL resends a short
                        // write). A send completes silently unless it fails.
                        let n = result as u32;
                        let send =
                            opcode::Send::new(types::Fd(socket.peer), socket.buf.as_ptr(), n)
                                .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
                                .build()
                                .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
                                .user_data(((at as u64) << 2) | SEND);
                        pending.push(send);
                        pending.push(recv(at as RawFd, &mut socket.buf));
                    }
                    // A failed send: its linked receive completes cancelled
                    // and closes the pair.
                    _ => {
                        if let Some(socket) = sockets[at].as_mut() {
                            socket.closing = true;
                        }
                    }
                }
            }
        }
    }

    fn accept(listener: &TcpListener, at: usize) -> squeue::Entry {
        opcode::Accept::new(
            types::Fd(listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(((at as u64) << 2) | ACCEPT)
    }

    fn recv(fd: RawFd, buf: &mut [u8]) -> squeue::Entry {
        opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
            .ioprio(POLL_FIRST)
            .build()
            .user_data(((fd as u64) << 2) | RECV)
    }
}

/// Writes all of `bytes` to a non-blocking stream, retrying while its
/// send buffer is full (a request or reply of this bench never fills it).
fn write_all_spinning(mut to: &TcpStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::yield_now(),
            Err(_) => return false,
        }
    }
    true
}

/// Why `model` cannot run on this kernel, if it cannot: io_uring may be
/// switched off (`kernel.io_uring_disabled`) or filtered by seccomp.
pub fn unavailable(model: Model) -> Option<String> {
    (model == Model::Uring)
        .then(uring::probe)
        .and_then(|probe| probe.err())
        .map(|e| format!("io_uring_setup: {e}"))
}

/// Starts the relay in `place` (killed when the returned child drops) and
/// waits until every listener accepts.
pub fn start(place: &Place, model: Model, pairs: &[(SocketAddr, SocketAddr)]) -> Result<Child> {
    let mut cmd = place.command(std::env::current_exe().context("the xtask binary")?);
    // The name `relay-floor --model` parses it back from (clap's).
    let name = clap::ValueEnum::to_possible_value(&model).context("a relay model's name")?;
    cmd.arg("relay-floor").arg("--model").arg(name.get_name());
    for (listen, upstream) in pairs {
        cmd.arg("--pair").arg(format!("{listen}={upstream}"));
    }
    let child = Child::spawn("relay-floor", cmd);
    for (listen, _) in pairs {
        wait_for(
            &format!("the relay floor listening on {listen}"),
            Duration::from_secs(10),
            || {
                place
                    .connect(*listen, Duration::from_millis(200))
                    .ok()
                    .map(drop)
            },
        );
    }
    Ok(child)
}

/// Parses `LISTEN=UPSTREAM`.
pub fn parse_pair(pair: &str) -> Result<(SocketAddr, SocketAddr)> {
    let (listen, upstream) = pair
        .split_once('=')
        .with_context(|| format!("{pair:?}: expected LISTEN=UPSTREAM"))?;
    Ok((
        listen.parse().with_context(|| format!("{listen:?}"))?,
        upstream.parse().with_context(|| format!("{upstream:?}"))?,
    ))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpListener, TcpStream},
        thread,
        time::Duration,
    };

    use super::{Model, serve};

    /// An upstream that echoes whatever it reads, a thread per connection.
    fn echo_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Starts `model` on a free loopback port (left running: `serve` does
    /// not return) and gives its address once it accepts.
    fn start(model: Model) -> SocketAddr {
        let listen = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let upstream = echo_upstream();
        thread::spawn(move || serve(model, &[(listen, upstream)]));
        for _ in 0..100 {
            if TcpStream::connect(listen).is_ok() {
                return listen;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("the {model:?} relay never listened on {listen}");
    }

    /// Rounds of clients that come and go, so a new connection takes the
    /// fd numbers a closed one left while its peer may still be closing.
    fn relays_every_round_of_short_lived_clients(model: Model) {
        let listen = start(model);
        for round in 0..30 {
            let mut clients: Vec<TcpStream> = (0..4)
                .map(|_| TcpStream::connect(listen).unwrap())
                .collect();
            for (at, client) in clients.iter_mut().enumerate() {
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let sent = format!("*1\r\n$4\r\nPING{round}-{at}\r\n");
                client.write_all(sent.as_bytes()).unwrap();
                let mut got = vec![0u8; sent.len()];
                client
                    .read_exact(&mut got)
                    .unwrap_or_else(|e| panic!("{model:?} round {round} client {at}: {e}"));
                assert_eq!(got, sent.as_bytes(), "{model:?} round {round} client {at}");
            }
        }
    }

    #[test]
    fn the_epoll_relay_copies_both_ways_across_reconnections() {
        relays_every_round_of_short_lived_clients(Model::Epoll);
    }

    #[test]
    fn the_io_uring_relay_copies_both_ways_across_reconnections() {
        // Fails loudly where io_uring is off: the bench would lose a row.
        if let Some(why) = super::unavailable(Model::Uring) {
            panic!("io_uring is unavailable here: {why}");
        }
        relays_every_round_of_short_lived_clients(Model::Uring);
    }
}
