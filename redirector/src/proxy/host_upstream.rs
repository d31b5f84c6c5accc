//! Shared plain-TCP upstream connections as entries of the worker's loop
//! (`proxy::host`), step 3 of the epoll data path (ARCHITECTURE.md, "What
//! the runtime costs a request").
//!
//! On a worker that runs the loop, a shared connection to a node reached
//! directly is not a reader task and a writer task fed by a channel:
//! - sessions, and the tasks beside them, queue jobs on it in a plain list
//!   ([`Handle::send`]);
//! - the loop writes every connection with queued jobs once, at the end of
//!   its turn ([`flush`]): the batching the writer task's yield gave, since
//!   every session of the turn has queued its jobs by then;
//! - its socket is in the loop's epoll: an edge reads, and hands each
//!   reply to its session's inbox ([`jobs::deliver`]); the loop steps those
//!   sessions in the same turn, with no task woken.
//!
//! Dialing (connect, HELLO or AUTH, READONLY) stays a task, and a node
//! found tunnelled when dialed gets a task pair (`upstream`), to which the
//! entry forwards its jobs. Everything here lives on the worker's thread:
//! a handle used on another thread refuses its jobs.

use std::{
    cell::RefCell,
    collections::VecDeque,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use slab::Slab;
use tokio::sync::mpsc;

use super::{
    UpstreamError,
    dial::{Dialer, Upstream},
    health::Health,
    jobs::{self, InFlight, Inbox, Job},
    metrics::{ProxyMetrics, UpstreamBatching},
    wakeup::ReadyList,
};
use crate::{resp::Protocol, socket::EdgeSocket};

/// Set in the loop's epoll data and ready-list tokens that name an upstream
/// connection, not a session.
pub const UPSTREAM: usize = 1 << (usize::BITS - 1);

/// Starts a task pair on a connection already open (a node found tunnelled
/// when dialed), sharing the entry's closed flag, and gives its job queue.
pub type Forward =
    Box<dyn FnOnce(Upstream, BytesMut, Arc<AtomicBool>) -> mpsc::UnboundedSender<Job> + Send>;

thread_local! {
    /// This worker's connections, from its loop's start.
    static UPSTREAMS: RefCell<Option<Upstreams>> = const { RefCell::new(None) };
}

struct Upstreams {
    /// The loop's epoll instance (a second fd for it).
    epoll: Epoll,
    ready: Arc<ReadyList>,
    conns: Slab<Entry>,
    /// Connections with jobs queued since the last flush.
    dirty: Vec<usize>,
    /// The loop is in its turn and flushes before it ends: a job queued
    /// now needs no wake-up.
    in_turn: bool,
    /// Jobs' shared bytes, let go together once copied (`Job::copy_into`).
    copied: Vec<Bytes>,
    /// Inboxes that got replies from one read, woken once each.
    to_wake: Vec<Arc<Inbox>>,
    /// Sessions of this loop whose inboxes got replies: stepped by the
    /// loop in this turn (`take_woken`), not woken through the ready list.
    woken: Vec<usize>,
}

/// What an entry and its handles share.
struct Common {
    token: usize,
    closed: Arc<AtomicBool>,
    /// Every handle is gone: the connection ends once it owes nothing.
    let_go: AtomicBool,
    ready: Arc<ReadyList>,
}

struct Entry {
    common: Arc<Common>,
    addr: SocketAddr,
    metrics: Arc<ProxyMetrics>,
    /// Jobs not written yet.
    queued: Vec<Job>,
    /// In `Upstreams::dirty`.
    dirty: bool,
    link: Link,
}

enum Link {
    Dialing,
    Open(Open),
    /// Tunnelled after all: jobs go to the task pair's queue.
    Forwarded(mpsc::UnboundedSender<Job>),
}

struct Open {
    socket: EdgeSocket,
    protocol: Protocol,
    inbuf: BytesMut,
    /// Written up to `sent`; the rest when the socket has room again.
    out: BytesMut,
    sent: usize,
    inflight: VecDeque<InFlight>,
    batching: UpstreamBatching,
}

/// The sessions' and tasks' hold on a connection (one, shared by every
/// clone of a `Conn`). When it goes, the connection ends once it owes no
/// replies.
pub struct Handle(Arc<Common>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.let_go.store(true, Ordering::Release);
        self.0.ready.push(self.0.token | UPSTREAM);
    }
}

impl Handle {
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Relaxed)
    }

    /// Queues a job for the loop's next flush; gives it back if the
    /// connection is gone (or this is not its worker's thread).
    pub fn send(&self, job: Job) -> Result<(), Job> {
        if self.is_closed() {
            return Err(job);
        }
        UPSTREAMS.with(|upstreams| {
            // Never borrowed here while the loop reads or flushes: those
            // run no session and no task.
            let Ok(mut upstreams) = upstreams.try_borrow_mut() else {
                return Err(job);
            };
            match upstreams.as_mut() {
                Some(upstreams) => upstreams.queue(&self.0, job),
                None => Err(job),
            }
        })
    }
}

/// Starts this thread's connections beside its loop.
pub fn install(epoll: Epoll, ready: Arc<ReadyList>) {
    UPSTREAMS.with(|upstreams| {
        *upstreams.borrow_mut() = Some(Upstreams {
            epoll,
            ready,
            conns: Slab::new(),
            dirty: Vec::new(),
            in_turn: false,
            copied: Vec::new(),
            to_wake: Vec::new(),
            woken: Vec::new(),
        });
    });
}

/// What [`spawn`] needs of the pool.
pub struct Dial {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub dialer: Arc<Dialer>,
    pub metrics: Arc<ProxyMetrics>,
    pub health: Arc<Health>,
}

/// A connection in this thread's loop, dialed by a task; `None` if the
/// thread runs no loop.
pub fn spawn(dial: Dial, forward: Forward) -> Option<Handle> {
    UPSTREAMS.with(|upstreams| {
        let mut upstreams = upstreams.try_borrow_mut().ok()?;
        let upstreams = upstreams.as_mut()?;
        let entry = upstreams.conns.vacant_entry();
        let common = Arc::new(Common {
            token: entry.key(),
            closed: Arc::default(),
            let_go: AtomicBool::new(false),
            ready: Arc::clone(&upstreams.ready),
        });
        entry.insert(Entry {
            common: Arc::clone(&common),
            addr: dial.addr,
            metrics: Arc::clone(&dial.metrics),
            queued: Vec::new(),
            dirty: false,
            link: Link::Dialing,
        });
        tokio::spawn(dial_entry(Arc::clone(&common), dial, forward));
        Some(Handle(common))
    })
}

async fn dial_entry(common: Arc<Common>, dial: Dial, forward: Forward) {
    let Dial {
        addr,
        protocol,
        dialer,
        metrics,
        health,
    } = dial;
    let opened = dialer.open(addr, protocol).await;
    match &opened {
        Ok(_) => health.connected(addr),
        Err(e) => {
            tracing::debug!(%addr, error = %e, "upstream connect failed");
            metrics.upstream_connect_failed(addr);
            health.failed(addr);
        }
    }
    UPSTREAMS.with(|upstreams| {
        if let Some(upstreams) = upstreams.borrow_mut().as_mut() {
            upstreams.opened(&common, opened.map(|o| (o, protocol)), forward);
        }
    });
}

/// The loop's turn begins: jobs queued from now on are flushed in it.
pub fn begin_turn() {
    with(|upstreams| upstreams.in_turn = true);
}

/// The loop's turn has ended: a job queued from now on wakes it.
pub fn end_turn() {
    with(|upstreams| upstreams.in_turn = false);
}

/// Adds to `into` the sessions of this loop that replies read since the
/// last call are for (`Inbox::wake_in`).
pub fn take_woken(into: &mut Vec<usize>) {
    with(|upstreams| into.append(&mut upstreams.woken));
}

/// Whether sessions are left for [`take_woken`].
pub fn has_woken() -> bool {
    UPSTREAMS.with(|upstreams| {
        upstreams
            .borrow()
            .as_ref()
            .is_some_and(|upstreams| !upstreams.woken.is_empty())
    })
}

/// An edge of connection `token`'s socket.
pub fn on_edge(token: usize, readable: bool, writable: bool) {
    with(|upstreams| upstreams.on_edge(token, readable, writable));
}

/// Connection `token` was woken: its handles may all be gone.
pub fn on_woken(token: usize) {
    with(|upstreams| upstreams.settle(token));
}

/// Whether a connection has jobs queued since the last flush.
pub fn any_queued() -> bool {
    UPSTREAMS.with(|upstreams| {
        upstreams
            .try_borrow()
            .is_ok_and(|upstreams| upstreams.as_ref().is_some_and(|u| !u.dirty.is_empty()))
    })
}

/// Writes every connection's queued jobs.
pub fn flush() {
    with(Upstreams::flush);
}

fn with(f: impl FnOnce(&mut Upstreams)) {
    UPSTREAMS.with(|upstreams| {
        if let Some(upstreams) = upstreams.borrow_mut().as_mut() {
            f(upstreams);
        }
    });
}

/// The entry `common` names, if it is still that connection's (a token is
/// reused once its connection has gone). Borrows the slab alone, so the
/// epoll and the dirty list stay at hand.
fn entry<'a>(conns: &'a mut Slab<Entry>, common: &Arc<Common>) -> Option<&'a mut Entry> {
    conns
        .get_mut(common.token)
        .filter(|entry| Arc::ptr_eq(&entry.common, common))
}

impl Upstreams {
    fn queue(&mut self, common: &Arc<Common>, job: Job) -> Result<(), Job> {
        let in_turn = self.in_turn;
        let Some(entry) = entry(&mut self.conns, common) else {
            return Err(job);
        };
        if let Link::Forwarded(tx) = &entry.link {
            return tx.send(job).map_err(|e| e.0);
        }
        entry.queued.push(job);
        if !entry.dirty {
            entry.dirty = true;
            let open = matches!(entry.link, Link::Open(_));
            self.dirty.push(common.token);
            // A dialing connection is flushed once it opens.
            if open && !in_turn {
                self.ready.nudge();
            }
        }
        Ok(())
    }

    fn opened(
        &mut self,
        common: &Arc<Common>,
        opened: Result<((Upstream, BytesMut), Protocol), UpstreamError>,
        forward: Forward,
    ) {
        let token = common.token;
        let in_turn = self.in_turn;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        let Some(entry) = entry(&mut self.conns, common) else {
            // Let go while it was dialing.
            return;
        };
        let addr = entry.addr;
        let ((stream, leftover), protocol) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.close(token, Ending::NotOpened(e.to_string()));
                return;
            }
        };
        match stream {
            Upstream::Tcp(stream) => {
                let registered = stream.into_std().and_then(|stream| {
                    self.epoll
                        .add(
                            stream.as_fd(),
                            EpollEvent::new(flags, (token | UPSTREAM) as u64),
                        )
                        .map_err(std::io::Error::from)?;
                    Ok(stream)
                });
                let stream = match registered {
                    Ok(stream) => stream,
                    Err(e) => {
                        let reason = format!("cannot join the worker's loop: {e}");
                        self.close(token, Ending::NotOpened(reason));
                        return;
                    }
                };
                entry.metrics.upstream_opened(addr);
                entry.link = Link::Open(Open {
                    socket: EdgeSocket::new(stream),
                    protocol,
                    inbuf: leftover,
                    out: BytesMut::new(),
                    sent: 0,
                    inflight: VecDeque::new(),
                    batching: entry.metrics.upstream_batching(addr),
                });
                if !entry.queued.is_empty() {
                    if !entry.dirty {
                        entry.dirty = true;
                        self.dirty.push(token);
                    }
                    if !in_turn {
                        self.ready.nudge();
                    }
                }
            }
            tunnel @ Upstream::Tunnel(_) => {
                let tx = forward(tunnel, leftover, Arc::clone(&common.closed));
                for job in entry.queued.drain(..) {
                    if let Err(e) = tx.send(job) {
                        e.0.fail(UpstreamError::NotSent(addr, "connection closed".into()));
                    }
                }
                entry.link = Link::Forwarded(tx);
            }
        }
        self.settle(token);
    }

    fn on_edge(&mut self, token: usize, readable: bool, writable: bool) {
        let Some(entry) = self.conns.get_mut(token) else {
            return;
        };
        let Link::Open(open) = &mut entry.link else {
            return;
        };
        open.socket.mark(readable, writable);
        let mut outcome = Ok(());
        if writable {
            outcome = open.write_out();
        }
        if outcome.is_ok() && open.socket.is_readable() {
            outcome = open.read(&mut self.to_wake);
        }
        let loop_id = self.ready.id();
        for inbox in self.to_wake.drain(..) {
            self.woken.extend(inbox.wake_in(loop_id));
        }
        match outcome {
            Ok(()) => self.settle(token),
            Err(reason) => self.close(token, Ending::Lost(reason)),
        }
    }

    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &token in &dirty {
            let Some(entry) = self.conns.get_mut(token) else {
                continue;
            };
            let Link::Open(open) = &mut entry.link else {
                // Dialing: marked again once it opens.
                entry.dirty = false;
                continue;
            };
            if !entry.dirty {
                continue;
            }
            entry.dirty = false;
            open.take(&mut entry.queued, &mut self.copied);
            if let Err(reason) = open.write_out() {
                self.close(token, Ending::Lost(reason));
            }
        }
        self.copied.clear();
        dirty.clear();
        self.dirty = dirty;
    }

    /// Ends a connection whose handles are all gone, once it owes nothing.
    fn settle(&mut self, token: usize) {
        let Some(entry) = self.conns.get(token) else {
            return;
        };
        if !entry.common.let_go.load(Ordering::Acquire) || !entry.queued.is_empty() {
            return;
        }
        if let Link::Open(open) = &entry.link
            && (!open.inflight.is_empty() || open.sent < open.out.len())
        {
            return;
        }
        self.close(token, Ending::LetGo);
    }

    fn close(&mut self, token: usize, ending: Ending) {
        let entry = self.conns.remove(token);
        entry.common.closed.store(true, Ordering::Relaxed);
        let addr = entry.addr;
        let reason = match ending {
            Ending::LetGo => "connection closed".to_string(),
            Ending::Lost(reason) => {
                tracing::debug!(%addr, reason, "upstream connection ended");
                reason
            }
            Ending::NotOpened(reason) => reason,
        };
        // The socket, dropped here, leaves the epoll as it closes.
        if let Link::Open(open) = entry.link {
            entry.metrics.upstream_closed(addr);
            // Sent jobs may or may not have run; queued ones surely did not.
            for flight in open.inflight {
                flight
                    .sink
                    .fail(UpstreamError::Lost(addr, reason.clone()), flight.delivered);
            }
        }
        for job in entry.queued {
            job.fail(UpstreamError::NotSent(addr, reason.clone()));
        }
    }
}

enum Ending {
    /// Its handles are gone and it owed nothing.
    LetGo,
    /// Redis closed it, or a read, a write or a reply failed.
    Lost(String),
    NotOpened(String),
}

impl Open {
    /// Moves queued jobs into the output, owed their replies from now on.
    fn take(&mut self, queued: &mut Vec<Job>, copied: &mut Vec<Bytes>) {
        let mut commands = 0;
        for job in queued.drain(..) {
            commands += job.replies;
            self.inflight
                .push_back(job.copy_into(&mut self.out, copied));
        }
        self.batching.wrote(commands);
    }

    /// Writes what the socket takes now.
    fn write_out(&mut self) -> Result<(), String> {
        while self.sent < self.out.len() && self.socket.is_writable() {
            match self.socket.try_write(&self.out[self.sent..]) {
                Ok(0) => return Err("write failed: connection closed".into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write failed: {e}")),
            }
        }
        if self.sent == self.out.len() {
            self.sent = 0;
            self.out.clear();
            // A burst's buffer is not kept for a connection's lifetime.
            if self.out.capacity() > OUT_KEPT {
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Reads until the socket is drained, handing replies to their jobs.
    fn read(&mut self, to_wake: &mut Vec<Arc<Inbox>>) -> Result<(), String> {
        loop {
            jobs::make_read_room(&mut self.inbuf);
            match self.socket.read_into(&mut self.inbuf) {
                Ok(0) => return Err("closed by Redis".into()),
                Ok(_) => {
                    jobs::deliver(
                        &mut self.inbuf,
                        &mut self.protocol,
                        &mut self.inflight,
                        to_wake,
                        None,
                    )?;
                    if !self.socket.is_readable() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

/// The output capacity a connection keeps between bursts.
const OUT_KEPT: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        time::Duration,
    };

    use nix::sys::epoll::{EpollCreateFlags, EpollTimeout};

    use super::*;

    /// Stands in for the loop: hands every edge the epoll has to its
    /// connection, and takes what the ready list woke.
    fn loop_turn(epoll: &Epoll, ready: &ReadyList) -> Vec<usize> {
        let mut events = [EpollEvent::empty(); 8];
        let n = epoll
            .wait(&mut events, EpollTimeout::from(100u16))
            .expect("epoll_wait");
        for event in &events[..n] {
            let token = usize::try_from(event.data()).expect("token") & !UPSTREAM;
            let flags = event.events();
            on_edge(
                token,
                flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP),
                flags.contains(EpollFlags::EPOLLOUT),
            );
        }
        let mut woken = Vec::new();
        ready.take(&mut woken);
        woken
    }

    #[test]
    fn a_loop_connection_writes_queued_jobs_once_open_answers_them_and_ends_when_let_go() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let redis = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = redis.local_addr().expect("addr");
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
        let ready = Arc::new(ReadyList::default());
        install(Epoll(epoll.0.try_clone().expect("dup")), Arc::clone(&ready));
        let metrics = ProxyMetrics::detached();
        let handle = rt.block_on(async {
            let dial = Dial {
                addr,
                protocol: Protocol::Resp2,
                dialer: Arc::new(Dialer::plain()),
                metrics: Arc::new(metrics),
                health: Arc::default(),
            };
            let forward: Forward = Box::new(|_, _, _| unreachable!("a direct node"));
            spawn(dial, forward).expect("this thread has a loop")
        });
        // Queued while it dials: written once it is open.
        let (job, answer) = Job::new(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 1);
        assert!(handle.send(job).is_ok());
        let is_open = || {
            UPSTREAMS.with(|u| {
                u.borrow()
                    .as_ref()
                    .is_some_and(|u| matches!(u.conns[handle.0.token].link, Link::Open(_)))
            })
        };
        rt.block_on(async {
            for _ in 0..500 {
                if is_open() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(is_open(), "dialed");
        let (mut node, _) = redis.accept().expect("the proxy dialed");
        begin_turn();
        flush();
        end_turn();
        let mut sent = [0u8; 14];
        node.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        node.read_exact(&mut sent).expect("the job was written");
        assert_eq!(&sent, b"*1\r\n$4\r\nPING\r\n");
        node.write_all(b"+PONG\r\n").expect("reply");
        let mut answer = answer;
        let replies = loop {
            loop_turn(&epoll, &ready);
            if let Ok(result) = answer.try_recv() {
                break result.expect("answered");
            }
        };
        assert_eq!(replies.len(), 1);
        assert_eq!(&replies[0].raw[..], b"+PONG\r\n");
        assert!(!handle.is_closed());
        // Every handle gone, nothing owed: the connection ends.
        let common = Arc::clone(&handle.0);
        drop(handle);
        let woken = loop_turn(&epoll, &ready);
        assert_eq!(woken, [common.token | UPSTREAM]);
        on_woken(common.token);
        assert!(common.closed.load(Ordering::Relaxed));
        let mut rest = Vec::new();
        assert_eq!(node.read_to_end(&mut rest).expect("EOF"), 0, "closed");
    }
}
