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
//! A [`slot_router`](super::slot_router) in front of the cluster is its CPU
//! floor: the least a cluster proxy is charged.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::epoll::{Epoll, EpollEvent, EpollTimeout};
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
    /// No upstream at all: a thread per connection, blocked in `read`,
    /// answering every request itself (a nil per `*` read, which is one
    /// per request in redis-benchmark's GET and SET traffic, whose keys and
    /// values hold none). One `recv`, one `send` and one wake-up per
    /// request and nothing else: the client side of any hop, the least a
    /// proxy can be charged for.
    Responder,
    /// A Redis Cluster proxy that does nothing but route: one epoll loop,
    /// requests hashed to their slot's primary over one shared connection
    /// each, writes batched per turn ([`super::slot_router`]). Its pair's
    /// upstream is a seed node of the cluster.
    SlotRouter,
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
        Model::Responder => serve_blocking(pairs, respond),
        Model::SlotRouter => match pairs {
            &[(listen, seed)] => super::slot_router::serve(listen, seed),
            _ => bail!("relay-floor: the slot router serves one --pair LISTEN=SEED"),
        },
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

    use nix::sys::epoll::{EpollCreateFlags, EpollFlags};

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
        let ready = wait(&epoll, &mut events)?;
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

/// Waits for events without a timeout, again when a signal interrupts.
pub(super) fn wait(epoll: &Epoll, events: &mut [EpollEvent]) -> Result<usize> {
    loop {
        match epoll.wait(events, EpollTimeout::NONE) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("epoll_wait"),
        }
    }
}

/// Writes all of `bytes` to a non-blocking stream, retrying while its
/// send buffer is full (a request or reply of this bench never fills it).
pub(super) fn write_all_spinning(mut to: &TcpStream, mut bytes: &[u8]) -> bool {
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

    use testbed::{ports::free_port, process::wait_for};

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

    /// Starts `model` in front of `upstream` on a free loopback port (left
    /// running: `serve` does not return) and gives its address once it
    /// accepts.
    fn start(model: Model, upstream: SocketAddr) -> SocketAddr {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        thread::spawn(move || serve(model, &[(listen, upstream)]));
        wait_for(
            &format!("the {model:?} relay listening on {listen}"),
            Duration::from_secs(2),
            || TcpStream::connect(listen).ok().map(drop),
        );
        listen
    }

    /// Rounds of clients that come and go, so new connections take the fd
    /// numbers closed ones left.
    fn relays_every_round_of_short_lived_clients(model: Model) {
        let listen = start(model, echo_upstream());
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
    fn the_tokio_relay_copies_both_ways_across_reconnections() {
        relays_every_round_of_short_lived_clients(Model::EventLoop);
    }

    #[test]
    fn the_threaded_relay_copies_both_ways_across_reconnections() {
        relays_every_round_of_short_lived_clients(Model::Threads);
    }

    #[test]
    fn the_responder_answers_each_request_with_a_nil_without_its_upstream() {
        // Its upstream is never dialled: this address has no listener.
        let nowhere = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut client = TcpStream::connect(start(Model::Responder, nowhere)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            .unwrap();
        let mut got = [0u8; 10];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"$-1\r\n$-1\r\n");
    }
}
