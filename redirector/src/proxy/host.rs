//! A worker's own loop for its clients' sessions and its shared upstream
//! connections (`--session-loop epoll`, the default), steps 2 and 3 of the
//! epoll data path (ARCHITECTURE.md, "What the runtime costs a request").
//!
//! Per worker thread, one epoll instance, registered in tokio as a single
//! `AsyncFd`: accepted clients go into its slab (token = index), edge
//! triggered, and an edge steps the session directly; no task per client
//! and no tokio registration per socket. The shared plain-TCP connections
//! to Redis nodes are in the same epoll (`host_upstream`): an edge reads
//! their replies into the sessions' inboxes, and the turn steps those
//! sessions and writes the connections' queued jobs. What still comes
//! through tokio (tasks' answers, pub/sub, MONITOR, timers, CLIENT PAUSE,
//! the registry's attention, replies on task-pair connections) wakes the
//! loop with the session's index through a ready list. The loop runs as
//! one task on the worker's runtime.

use std::{
    cell::RefCell,
    future::Future,
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use bytes::BytesMut;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::Instrument as _;

use super::{
    host_upstream::{self, UPSTREAM},
    session::{Hosted, Progress},
    wakeup::ReadyList,
};
use crate::socket::EdgeSocket;

/// Edges taken from the epoll per `epoll_wait`.
const EVENTS: usize = 256;

/// Rounds of woken sessions and flushes in one turn before the loop lets
/// the rest of the worker run: sessions that keep waking each other (or
/// another worker waking them) cannot hold the thread.
const ROUNDS: usize = 8;

/// How long a session stays quiet before the loop gives its buffers and
/// reply queue back to the worker's pools: 10-20 ms. A request-reply
/// client keeps them from one request to its next (Redis, too, shrinks an
/// idle client's query buffer only later, in its cron); a client that
/// idles costs what it did.
const QUIET_SPELL: std::time::Duration = std::time::Duration::from_millis(10);

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
    #[error("cannot share the worker's epoll instance with its upstream connections: {0}")]
    Share(#[source] io::Error),
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
    socket: EdgeSocket,
    wake: Arc<SessionWake>,
    waker: Waker,
    span: tracing::Span,
    /// In `Host::yielded`: a session that yields again in the same turn
    /// (stepped on an edge, then on a wake) is resumed once.
    resume_queued: bool,
    /// In `Host::quiet`: idle, holding buffers to give back.
    quiet_listed: bool,
    /// The quiet spell (`Host::spells`) in which it last had work.
    busy_in: u64,
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
    /// The last turn queued upstream jobs: this one looks at the epoll
    /// first, whatever tokio says of it, then writes them with the
    /// requests it brings (see `turn`).
    flush_next: bool,
    /// Idle sessions that hold buffers, and the end of the current quiet
    /// spell, at which those with no work in it give them back.
    quiet: Vec<usize>,
    spells: u64,
    spell_ends: Option<Pin<Box<tokio::time::Sleep>>>,
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
        let ready = Arc::<ReadyList>::default();
        let second = epoll.0.try_clone().map_err(Error::Share)?;
        host_upstream::install(Epoll(second), Arc::clone(&ready));
        // SAFETY: the epoll's fd is valid and open, owned by the `Epoll`
        // inside, which the `AsyncFd` owns and never replaces or closes.
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
            .map_err(|e| Error::Register(e.into()))?;
        Ok(Self {
            epoll,
            clients: Slab::new(),
            ready,
            events: vec![EpollEvent::empty(); EVENTS],
            woken: Vec::new(),
            yielded: Vec::new(),
            resuming: Vec::new(),
            flush_next: false,
            quiet: Vec::new(),
            spells: 0,
            spell_ends: None,
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
        let waker = Waker::from(Arc::clone(&wake));
        hosted.hosted_by(self.ready.id(), token, &waker);
        entry.insert(Client {
            hosted,
            socket: EdgeSocket::new(stream),
            waker,
            wake,
            span,
            resume_queued: false,
            quiet_listed: false,
            busy_in: 0,
        });
        self.run(token, true);
        Ok(())
    }

    /// One turn: the sockets' edges, the woken sessions and those that
    /// yielded last turn, then the upstream connections' writes; again
    /// while sessions were woken meanwhile (by replies that came).
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut more = false;
        self.ready.begin_turn();
        host_upstream::begin_turn();
        // Jobs queued in one turn are written in the next, together with
        // the jobs of the requests that came meanwhile, as the writer
        // tasks' yield did (ARCHITECTURE, step 3). Written at the end of each turn, Redis
        // read 5.5 commands per read in W1, not 8.8, and the proxy made 0.07
        // more syscalls per request. The next turn follows at once, with no
        // poll of tokio's driver between (a `yield_now` cost one more
        // `epoll_wait` per flush): it takes the loop's epoll directly, since
        // tokio's readiness of it is as old as the last turn's wait.
        let flush_now = std::mem::take(&mut self.flush_next);
        let mut look_now = flush_now;
        loop {
            let guard = if std::mem::take(&mut look_now) {
                None
            } else {
                match self.epoll.poll_read_ready(cx) {
                    Poll::Ready(Ok(guard)) => Some(guard),
                    Poll::Ready(Err(e)) => {
                        tracing::error!(error = %e, "the worker's session loop failed");
                        return Poll::Ready(());
                    }
                    Poll::Pending => break,
                }
            };
            let taken = self
                .epoll
                .get_ref()
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
            if n < self.events.len()
                && let Some(mut guard) = guard
            {
                guard.clear_ready();
            }
            for i in 0..n {
                let event = self.events[i];
                let token = usize::try_from(event.data()).unwrap_or(usize::MAX);
                let flags = event.events();
                let hup = flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
                let readable =
                    hup || flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP);
                let writable = hup || flags.contains(EpollFlags::EPOLLOUT);
                if token & UPSTREAM != 0 {
                    host_upstream::on_edge(token & !UPSTREAM, readable, writable);
                    continue;
                }
                let Some(client) = self.clients.get(token) else {
                    continue;
                };
                client.socket.mark(readable, writable);
                self.run(token, false);
            }
            if n == self.events.len() {
                // More edges than one wait takes: the rest next turn, after
                // the upstream writers have had theirs.
                more = true;
                break;
            }
        }
        let mut ended = false;
        for round in 0..ROUNDS {
            self.run_woken();
            if round == 0 {
                self.resume_yielded();
            }
            if flush_now {
                host_upstream::flush();
            }
            if !host_upstream::has_woken() && self.ready.end_turn(cx.waker()) {
                ended = true;
                break;
            }
        }
        host_upstream::end_turn();
        self.end_quiet_spell(cx);
        if host_upstream::any_queued() {
            // Behind the worker's other runnable tasks, whose jobs join too.
            self.flush_next = true;
        }
        if more || !ended || self.flush_next || !self.yielded.is_empty() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// At the end of each quiet spell, gives back the buffers of the idle
    /// sessions that had no work in it; the others wait for the next.
    fn end_quiet_spell(&mut self, cx: &mut Context<'_>) {
        if self.quiet.is_empty() {
            return;
        }
        let ends = self
            .spell_ends
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(QUIET_SPELL)));
        if ends.as_mut().poll(cx).is_pending() {
            return;
        }
        let spell = self.spells;
        self.spells += 1;
        let clients = &mut self.clients;
        self.quiet.retain(|&token| {
            let Some(client) = clients.get_mut(token) else {
                return false;
            };
            if !client.quiet_listed {
                // A token reused by a session not listed.
                return false;
            }
            if client.busy_in == spell && client.hosted.holds_idle_buffers() {
                return true;
            }
            client.hosted.release_idle();
            client.quiet_listed = false;
            false
        });
        if self.quiet.is_empty() {
            self.spell_ends = None;
        } else if let Some(ends) = self.spell_ends.as_mut() {
            // Armed again, and polled so that its end wakes the loop.
            ends.as_mut()
                .reset(tokio::time::Instant::now() + QUIET_SPELL);
            let _ = ends.as_mut().poll(cx);
        }
    }

    /// Steps the sessions woken by their sources, and settles the upstream
    /// connections woken by their handles' end.
    fn run_woken(&mut self) {
        let mut woken = std::mem::take(&mut self.woken);
        self.ready.take(&mut woken);
        host_upstream::take_woken(&mut woken);
        for &token in &woken {
            if token & UPSTREAM != 0 {
                host_upstream::on_woken(token & !UPSTREAM);
            } else if let Some(client) = self.clients.get(token) {
                client.wake.queued.store(false, Ordering::Release);
                self.run(token, false);
            }
        }
        self.woken = woken;
    }

    /// Steps the sessions that yielded last turn with requests buffered.
    fn resume_yielded(&mut self) {
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
            Progress::Waits => {
                if client.hosted.holds_idle_buffers() {
                    if !client.quiet_listed {
                        client.quiet_listed = true;
                        self.quiet.push(token);
                    }
                } else {
                    client.busy_in = self.spells;
                }
            }
            Progress::Yields => {
                client.busy_in = self.spells;
                if !client.resume_queued {
                    client.resume_queued = true;
                    self.yielded.push(token);
                }
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
    fn flush_then_close(&self, socket: EdgeSocket, rest: BytesMut, span: tracing::Span) {
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
