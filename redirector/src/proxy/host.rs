//! A worker's own loop for its clients' sessions (`--session-loop epoll`),
//! step 2 of the epoll data path (ARCHITECTURE.md, "What the runtime costs
//! a request").
//!
//! Per worker thread, one epoll instance, registered in tokio as a single
//! `AsyncFd`: accepted clients go into its slab (token = index), edge
//! triggered, and an edge steps the session directly; no task per client
//! and no tokio registration per socket. What still comes through tokio
//! (replies in the inbox, tasks' answers, pub/sub, MONITOR, timers, CLIENT
//! PAUSE, the registry's attention) wakes the loop with the session's
//! index through a ready list. The loop runs as one task on the worker's
//! runtime, so the upstream writers still run after every client that
//! queued work for them in a turn, and batch as before.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use bytes::BytesMut;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::Instrument as _;

use super::session::{Hosted, HostedSocket, Progress};

/// Edges taken from the epoll per `epoll_wait`.
const EVENTS: usize = 256;

/// Which loop runs client sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionLoop {
    /// A tokio task per client, its socket registered in tokio.
    Task,
    /// The worker's own epoll loop (see the module docs): the default,
    /// since `cargo xtask bench` measured it 2-5% under tasks in CPU and
    /// it keeps a third less memory per idle client.
    #[default]
    Epoll,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the worker's epoll instance: {0}")]
    Create(#[source] nix::Error),
    #[error("cannot register the worker's epoll instance in its runtime: {0}")]
    Register(#[source] io::Error),
    #[error("cannot hand the client's socket to the worker's loop: {0}")]
    Adopt(#[source] io::Error),
}

/// The epoll instance, as tokio sees it: one readable fd.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// Sessions woken by their sources, for the loop's next turn.
#[derive(Default)]
struct ReadyList {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    tokens: Vec<usize>,
    /// The loop's task, taken by the first wake after it registered.
    host: Option<Waker>,
}

impl ReadyList {
    fn push(&self, token: usize) {
        let host = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.tokens.push(token);
            state.host.take()
        };
        if let Some(host) = host {
            host.wake();
        }
    }

    /// Swaps the woken sessions into `into` (emptied first), and registers
    /// the loop's task for the next wake.
    fn take(&self, into: &mut Vec<usize>, host: &Waker) {
        into.clear();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut state.tokens, into);
        match &state.host {
            Some(registered) if registered.will_wake(host) => {}
            _ => state.host = Some(host.clone()),
        }
    }
}

/// A session's waker: queues its index once until the loop takes it.
struct SessionWake {
    token: usize,
    queued: AtomicBool,
    ready: Arc<ReadyList>,
}

impl Wake for SessionWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.push(self.token);
        }
    }
}

struct Client {
    hosted: Hosted,
    socket: HostedSocket,
    wake: Arc<SessionWake>,
    waker: Waker,
    span: tracing::Span,
    /// In `Host::yielded`: a session that yields again in the same turn
    /// (stepped on an edge, then on a wake) is resumed once.
    resume_queued: bool,
}

struct Host {
    epoll: AsyncFd<EpollFd>,
    clients: Slab<Client>,
    ready: Arc<ReadyList>,
    events: Vec<EpollEvent>,
    woken: Vec<usize>,
    /// Sessions that yielded with requests buffered: stepped next turn.
    yielded: Vec<usize>,
    resuming: Vec<usize>,
}

thread_local! {
    /// This worker thread's loop, made with its first client.
    static HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
}

/// Hands an accepted client's session to this worker's loop, starting the
/// loop with the worker's first client. Must run on the worker's runtime;
/// `stream` is a non-blocking socket in no reactor.
pub fn adopt(
    hosted: Hosted,
    stream: std::net::TcpStream,
    span: tracing::Span,
) -> Result<(), Error> {
    HOST.with(|host| {
        let mut host = host.borrow_mut();
        if host.is_none() {
            *host = Some(Host::new()?);
            tokio::spawn(turns().instrument(tracing::debug_span!("session loop")));
        }
        let Some(host) = host.as_mut() else {
            unreachable!("made above");
        };
        host.adopt(hosted, stream, span)
    })
}

/// The loop's task: a turn each time an edge or a wake comes.
async fn turns() {
    std::future::poll_fn(|cx| {
        HOST.with(|host| match host.borrow_mut().as_mut() {
            Some(host) => host.turn(cx),
            None => Poll::Ready(()),
        })
    })
    .await;
}

impl Host {
    fn new() -> Result<Self, Error> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(Error::Create)?;
        // SAFETY: the epoll's fd is valid and open, owned by the `Epoll`
        // inside, which the `AsyncFd` owns and never replaces or closes.
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
            .map_err(|e| Error::Register(e.into()))?;
        Ok(Self {
            epoll,
            clients: Slab::new(),
            ready: Arc::default(),
            events: vec![EpollEvent::empty(); EVENTS],
            woken: Vec::new(),
            yielded: Vec::new(),
            resuming: Vec::new(),
        })
    }

    fn adopt(
        &mut self,
        hosted: Hosted,
        stream: std::net::TcpStream,
        span: tracing::Span,
    ) -> Result<(), Error> {
        let entry = self.clients.vacant_entry();
        let token = entry.key();
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        let registered = self
            .epoll
            .get_ref()
            .0
            .add(stream.as_fd(), EpollEvent::new(flags, token as u64));
        registered.map_err(|e| Error::Adopt(e.into()))?;
        let wake = Arc::new(SessionWake {
            token,
            queued: AtomicBool::new(false),
            ready: Arc::clone(&self.ready),
        });
        entry.insert(Client {
            hosted,
            socket: HostedSocket::new(stream),
            waker: Waker::from(Arc::clone(&wake)),
            wake,
            span,
            resume_queued: false,
        });
        self.run(token, true);
        Ok(())
    }

    /// One turn: the sockets' edges, the woken sessions, then those that
    /// yielded last turn.
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut more = false;
        loop {
            let mut guard = match self.epoll.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "the worker's session loop failed");
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            };
            let taken = guard
                .get_inner()
                .0
                .wait(&mut self.events, EpollTimeout::ZERO);
            let n = match taken {
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "the worker's session loop failed");
                    return Poll::Ready(());
                }
            };
            if n < self.events.len() {
                guard.clear_ready();
            }
            for i in 0..n {
                let event = self.events[i];
                let token = usize::try_from(event.data()).unwrap_or(usize::MAX);
                let flags = event.events();
                let Some(client) = self.clients.get(token) else {
                    continue;
                };
                let hup = flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
                client.socket.mark(
                    hup || flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP),
                    hup || flags.contains(EpollFlags::EPOLLOUT),
                );
                self.run(token, false);
            }
            if n == self.events.len() {
                // More edges than one wait takes: the rest next turn, after
                // the upstream writers have had theirs.
                more = true;
                break;
            }
        }
        let mut woken = std::mem::take(&mut self.woken);
        self.ready.take(&mut woken, cx.waker());
        for &token in &woken {
            if let Some(client) = self.clients.get(token) {
                client.wake.queued.store(false, Ordering::Release);
                self.run(token, false);
            }
        }
        self.woken = woken;
        let mut resuming = std::mem::take(&mut self.resuming);
        std::mem::swap(&mut resuming, &mut self.yielded);
        for &token in &resuming {
            if let Some(client) = self.clients.get_mut(token) {
                client.resume_queued = false;
                self.run(token, true);
            }
        }
        resuming.clear();
        self.resuming = resuming;
        if more || !self.yielded.is_empty() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Advances one session and carries out where it ends up.
    fn run(&mut self, token: usize, step_first: bool) {
        let Some(client) = self.clients.get_mut(token) else {
            return;
        };
        let progress = {
            let _entered = client.span.enter();
            let mut cx = Context::from_waker(&client.waker);
            if step_first {
                client.hosted.resume(&client.socket, &mut cx)
            } else {
                client.hosted.advance(&client.socket, &mut cx)
            }
        };
        match progress {
            Progress::Waits => {}
            Progress::Yields if client.resume_queued => {}
            Progress::Yields => {
                client.resume_queued = true;
                self.yielded.push(token);
            }
            Progress::Closes { rest } => {
                let client = self.clients.remove(token);
                let Client {
                    hosted,
                    socket,
                    span,
                    ..
                } = client;
                // The registry entry goes before the socket closes, as with
                // a task.
                drop(hosted);
                if !rest.is_empty() {
                    self.flush_then_close(socket, rest, span);
                }
            }
        }
    }

    /// QUIT's reply, or whatever was owed when the session ended, written
    /// by a task: the socket leaves the loop's epoll for tokio's.
    fn flush_then_close(&self, socket: HostedSocket, rest: BytesMut, span: tracing::Span) {
        let stream = socket.into_stream();
        let _ = self.epoll.get_ref().0.delete(stream.as_fd());
        let Ok(mut stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        tokio::spawn(
            async move {
                use tokio::io::AsyncWriteExt as _;
                let _ = stream.write_all(&rest).await;
            }
            .instrument(span),
        );
    }
}
