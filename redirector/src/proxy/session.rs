//! One client connection.
//!
//! The session reads pipelined requests, asks the planner
//! ([`super::plan`]) what each one is, carries the plan out, and keeps a
//! queue of pending replies in request order. A routed single-slot command
//! is sent on a shared upstream connection right here (the hot path: no
//! task); its reply lands in the session's inbox at its place in the queue.
//! Anything slower (redirects, retries, split or fan-out commands,
//! transactions, blocking commands) runs in a task of its own whose result
//! lands at the same place. Replies are written as soon as the head of the
//! queue is ready, coalesced into one write when several are.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    ops::ControlFlow,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::{
    AuthMode, ClientSlot, Shared,
    buffers::{self, Spares},
    client_cmd,
    clients::{ClientEntry, flags},
    clock::Stamp,
    exec::{self, Routed, Target},
    functions,
    gather::{self, Gather},
    jobs::{Inbox, Job, Payload, Seqs, Sink, lend_seqs},
    local::{self, Caller},
    login::{self, Accepted, Credentials},
    metrics::{CommandCounters, UNKNOWN_COMMAND},
    monitor, output_limit,
    plan::{self, Admin, Local, Plan, SessionState, Txn},
    pubsub, tracking, txn,
    upstream::Conn,
};
use crate::{
    cluster::{
        commands::{AclCategories, CommandInfo, CommandTable, Flags, LastCommand},
        topology::View,
    },
    resp::{
        Protocol,
        reply::{self, Reply},
        request::{self, Parsed, Request},
    },
    socket::EdgeSocket,
};

/// Requests taken from one client's buffer before the other clients of the
/// worker get a turn.
const REQUESTS_PER_TURN: usize = super::TURN;

/// While the daemon goes away: a client quiet this long between two
/// requests is closed, to reconnect to whoever serves next.
pub const QUIET_BEFORE_LEAVING: Duration = Duration::from_secs(1);

/// A client connection's addresses, besides the peer and local ones its
/// registry entry (the slot's) holds.
pub struct Addresses {
    /// Where the client believes it is connected: the address it dialled
    /// (its original destination when steered), shown in cluster views.
    pub advertised: SocketAddr,
}

/// CLIENT REPLY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    /// The next command's reply is not sent.
    Skip,
}

/// A client's session: the future its task runs. Not an `async fn`, so
/// that the task holds the session once, not also the arguments it was
/// made from (an idle client costs about the size of this future, see
/// `tests/tests/idle_clients.rs`).
pub fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    Addresses { advertised }: Addresses,
    id: u64,
    slot: ClientSlot,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // TCP_NODELAY is inherited from the listener.
    let mut session = Session::new(shared, advertised, id, slot);
    // The session is borrowed where the block holds it: an `async fn`
    // taking it by value would keep it twice (argument and local).
    // The stream too: borrowed, it is not also copied into `run`'s state.
    async move { session.run(&mut stream).await }
}

impl Session {
    fn new(shared: Arc<Shared>, advertised: SocketAddr, id: u64, slot: ClientSlot) -> Self {
        let entry = Arc::clone(slot.entry());
        Session {
            authed: starts_authed(&shared),
            shared: Arc::clone(&shared),
            unauthenticated: Arc::clone(&shared),
            id,
            advertised,
            protocol: Protocol::Resp2,
            user: super::clients::default_user(),
            multi: None,
            baton: None,
            pubsub: None,
            last_write_slot: None,
            closing: false,
            view: shared.topology.view(),
            conns: Vec::new(),
            inbox: Arc::new(Inbox::default()),
            next_seq: 0,
            batch: Vec::new(),
            metric_cache: Vec::new(),
            read_at: Stamp::now(),
            entry,
            reply_mode: ReplyMode::On,
            monitor: None,
            held: None,
            barriers: 0,
            stashed: None,
            last_cmd: usize::MAX,
            last_command: LastCommand::default(),
            tracking: None,
            _slot: slot,
        }
    }
}

/// The commands one read routed to one node, sent as one job.
struct Batched {
    node: SocketAddr,
    payload: Payload,
    seqs: Seqs,
}

thread_local! {
    /// An empty batch list per worker thread, lent to the session routing a
    /// read and given back by its flush: routing allocates no list per
    /// request, and an idle session holds none.
    static SPARE_BATCH: std::cell::Cell<Vec<Batched>> = const { std::cell::Cell::new(Vec::new()) };
}

fn lend_batch() -> Vec<Batched> {
    SPARE_BATCH.with(std::cell::Cell::take)
}

thread_local! {
    /// Empty reply queues per worker thread, lent to a session while it
    /// owes replies and given back when it goes idle: an idle client holds
    /// no queue (a queue of one is 120 bytes), and a busy one allocates
    /// none per request.
    static SPARE_QUEUES: Spares<VecDeque<Pending>> = const { Spares::new(QUEUES_KEPT) };
}

/// Queues kept per thread; more are freed.
const QUEUES_KEPT: usize = 256;

/// A queue with room for one reply owed, what a request-reply client needs
/// (pipelines grow it).
fn lend_queue() -> VecDeque<Pending> {
    SPARE_QUEUES
        .with(Spares::take)
        .unwrap_or_else(|| VecDeque::with_capacity(1))
}

/// An idle session's buffers and reply queue, back to the worker's pools.
fn flow_release(inbuf: &mut BytesMut, out: &mut BytesMut, pending: &mut VecDeque<Pending>) {
    buffers::release(inbuf);
    buffers::release(out);
    give_back_queue(pending);
}

/// Takes an empty queue back, leaving the session none; one grown by a
/// long pipeline is freed, not kept.
fn give_back_queue(queue: &mut VecDeque<Pending>) {
    if queue.capacity() == 0 || !queue.is_empty() {
        return;
    }
    let queue = std::mem::take(queue);
    if queue.capacity() <= 16 {
        SPARE_QUEUES.with(|spare| spare.keep(queue));
    }
}

fn give_back_batch(batch: Vec<Batched>) {
    // A list grown by a wide fan-out is not kept.
    if batch.is_empty() && batch.capacity() <= 16 {
        SPARE_BATCH.with(|spare| spare.set(batch));
    }
}

impl Batched {
    fn add(&mut self, raw: &Bytes, seq: u64) {
        match &mut self.payload {
            Payload::Shared(first) => {
                // A pooled buffer (4 KiB, grown for large values): joining
                // two commands allocates nothing, nor does a third.
                let mut joined = buffers::take();
                joined.extend_from_slice(first);
                joined.extend_from_slice(raw);
                self.payload = Payload::Joined(joined);
                self.seqs = lend_seqs(&self.seqs);
            }
            Payload::Joined(joined) => joined.extend_from_slice(raw),
        }
        self.seqs.push(seq);
    }
}

/// What one drain carries from reply to reply.
#[derive(Default)]
struct Writing {
    /// One clock read for every reply the drain writes.
    now: Option<Stamp>,
    /// One time taken per read the replies' commands came in (a
    /// pipeline's share one start), and how many replies took it: observed
    /// in the latency histogram once per read, when the next read's reply
    /// or the drain's end comes.
    took_since: Option<(Stamp, Duration, u64)>,
    /// Replies copied out, let go together when the drain returns: a
    /// reference count's locked decrement right after each copy waited for
    /// that copy's stores (8% of the proxy on pipelined GETs).
    written: smallvec::SmallVec<[Bytes; 16]>,
}

/// Per-command bookkeeping for metrics.
struct Meta {
    /// When the read carrying the command returned.
    started: Stamp,
    /// Index into the session's metric cache.
    metric: usize,
    /// CLIENT REPLY OFF/SKIP: the reply is not written.
    silent: bool,
    /// Whether the slow log may want the command (it is on, and the
    /// command is not one Redis keeps out of it).
    logs_slow: bool,
    /// The command as sent, while the slow log may want it.
    slow: Option<Bytes>,
}

impl Meta {
    /// Keeps a copy of the command's bytes for the slow log, if it may
    /// want them: where the bytes themselves go on (a task, a lease).
    fn keeping(mut self, command: &Bytes) -> Self {
        if self.logs_slow && self.slow.is_none() {
            self.slow = Some(command.clone());
        }
        self
    }

    /// Keeps the command's own bytes for the slow log, if it may want
    /// them: a routed command's, once its reply has come. A copy taken at
    /// dispatch cost every command a reference count's increment and
    /// decrement (about 1.8% of the proxy's CPU on pipelined GETs, perf).
    fn taking(mut self, command: Bytes) -> Self {
        if self.logs_slow && self.slow.is_none() {
            self.slow = Some(command);
        }
        self
    }
}

enum Pending {
    Ready(Bytes, Option<Meta>),
    /// First attempt on a shared connection; the reply arrives in the
    /// session's inbox under `seq`.
    Upstream {
        seq: u64,
        routed: Routed,
        meta: Meta,
    },
    /// A command whose parts went out with the session's own jobs
    /// (`gather`); their replies arrive in the inbox from `first` on.
    Gather(Box<Gather>, Meta),
    /// Work running in a task.
    Task(oneshot::Receiver<Bytes>, Option<Meta>),
    /// A blocking command, a script, SCAN, WATCH, EXEC or a fan-out on
    /// leases, in a task: as in Redis, the client's next commands run only
    /// once it has answered.
    Barrier(oneshot::Receiver<Bytes>, Option<Meta>),
    /// AUTH (or HELLO with AUTH) being checked, a barrier too: the
    /// session's next commands run as whoever it turns out to be.
    Login(oneshot::Receiver<Login>, Option<Meta>),
    /// A command the proxy answers itself, once Redis's ACL allows the
    /// client's user to run it (a barrier).
    Permit(
        oneshot::Receiver<Result<(), Bytes>>,
        Box<(Local, Request)>,
        Meta,
    ),
    /// Close the connection once everything before has been written.
    Close,
}

struct Session {
    /// The backend, as the identity this client's commands run as.
    shared: Arc<Shared>,
    /// The backend as a client that has not authenticated (RESET goes back
    /// to it).
    unauthenticated: Arc<Shared>,
    id: u64,
    advertised: SocketAddr,
    protocol: Protocol,
    authed: bool,
    /// Shared with the registry entry, not copied per client.
    user: Arc<str>,
    /// Between MULTI and EXEC. Boxed, as the other states few clients are
    /// ever in: an idle client's session stays small.
    multi: Option<Box<txn::Queued>>,
    /// The WATCH state, handed from transaction step to step.
    baton: Option<txn::Baton>,
    pubsub: Option<pubsub::Handle>,
    /// For WAIT: the slot this client last wrote to.
    last_write_slot: Option<u16>,
    closing: bool,
    view: Arc<View>,
    /// Shared upstream connections this client used, by node: saves the
    /// pool lookups on the hot path.
    conns: Vec<(SocketAddr, Conn)>,
    /// Where shared connections deliver this client's replies.
    inbox: Arc<Inbox>,
    /// Sequence number of the next command sent through the inbox.
    next_seq: u64,
    /// Commands routed by the current read, per node, not yet sent.
    batch: Vec<Batched>,
    metric_cache: Vec<CommandCounters>,
    read_at: Stamp,
    /// This client in the proxy's registry (CLIENT LIST, INFO clients).
    entry: Arc<ClientEntry>,
    reply_mode: ReplyMode,
    /// MONITOR: the feed of every client's commands.
    monitor: Option<mpsc::UnboundedReceiver<Bytes>>,
    /// A command held by CLIENT PAUSE, and until when.
    held: Option<Box<(Request, Instant)>>,
    /// Blocking commands and scripts not answered yet: the client's next
    /// commands wait for them.
    barriers: usize,
    /// A blocking command or script waiting for the client's earlier
    /// commands to answer.
    stashed: Option<Box<Request>>,
    /// Which command CLIENT LIST shows now (see `dispatch`).
    last_cmd: usize,
    /// The name of the client's last command, for the next lookup.
    last_command: LastCommand,
    /// CLIENT TRACKING.
    tracking: Option<Box<tracking::Handle>>,
    /// The client's place in the registry and the admission tally, given
    /// up after everything above (fields drop in order).
    _slot: ClientSlot,
}

enum Event {
    Resolved(Resolution),
    /// A read of the client's socket: bytes came (`Ok(n > 0)`), or EOF
    /// (`Ok(0)`), or an error.
    Read(std::io::Result<usize>),
    /// The client's socket takes bytes again: write what it is owed.
    Writable(std::io::Result<()>),
    /// The client has been over its soft output limit for its seconds.
    SoftLimitDue,
    PubSub(Option<pubsub::Out>),
    Monitor(Option<Bytes>),
    Unpaused,
    /// Killed, or frames pushed to this client.
    Attention,
    Idle,
}

enum Resolution {
    Gathered(Vec<Result<Reply, super::UpstreamError>>),
    Task(Bytes),
    Login(Login),
    Permit(Result<(), Bytes>),
    /// The inbox got a reply: look again.
    Wake,
}

/// A session's I/O state, kept by its driver between steps: the buffers and
/// the reply queue (each lent from the worker's pools only while bytes or
/// replies are in flight, see `buffers` and `lend_queue`), and what the
/// loop carries from turn to turn.
#[derive(Default)]
struct Flow {
    /// Bytes read from the client and not parsed yet.
    inbuf: BytesMut,
    /// Bytes owed to the client and not written yet.
    out: BytesMut,
    pending: VecDeque<Pending>,
    /// The client has sent its last byte (or its socket failed).
    eof: bool,
    /// Complete requests left in `inbuf` by a turn's or the pipeline's limit.
    backlog: bool,
    /// How long the client has been owed more than its soft output limit.
    soft_clock: output_limit::SoftClock,
    /// The buffers and reply queue stay with the session when it goes idle;
    /// its driver gives them back after a quiet spell (the worker's loop:
    /// `Hosted::release_idle`). Otherwise they go back at once.
    keeps_when_idle: bool,
}

/// What a session waits for until its next step. Its driver also waits for
/// the sources the session holds (the oldest owed reply, pub/sub, MONITOR,
/// CLIENT PAUSE, the registry's attention).
struct Wait {
    /// The client's socket, for requests or EOF.
    read: bool,
    /// The client's socket, for room to write what it is owed.
    write: bool,
    /// A step wrote to the client: the driver spends its task's budget, as
    /// an awaited write would, so a client with a long backlog yields to
    /// the others.
    wrote: bool,
    /// Close the client if nothing comes for this long.
    idle: Option<Duration>,
    /// When the client, still over its soft output limit, is dropped.
    soft_limit: Option<Instant>,
}

/// What a step leaves its driver to do.
enum Next {
    Wait(Wait),
    /// A turn's worth of requests was taken and more are buffered: give the
    /// worker's other clients a turn, then step again.
    Yield,
    /// Close the connection, after writing everything owed if `flush`.
    Close {
        flush: bool,
    },
}

/// Where a step writes what the client is owed: as much as the socket takes
/// now, without waiting. The step itself never waits, so a driver other
/// than a tokio task can run it.
trait ClientSocket {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl ClientSocket for TcpStream {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl ClientSocket for EdgeSocket {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        EdgeSocket::try_write(self, buf)
    }
}

/// A session on its worker's loop ([`super::host`]) instead of a task of
/// its own: the same steps, driven by the socket's edges and by wakes of
/// the sources it holds.
pub struct Hosted {
    session: Session,
    flow: Flow,
    core: Arc<Shared>,
    /// What the last step asked to wait for.
    wait: Wait,
    /// The last step yielded with requests buffered: the next turn steps
    /// again before it waits for anything (its `wait` is stale).
    yielded: bool,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    soft_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The end of a CLIENT PAUSE holding the session's next command.
    unpaused: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// Where a hosted session stands after [`Hosted::advance`].
pub enum Progress {
    /// Waits for an edge or a wake.
    Waits,
    /// Has more buffered requests: advance it again after the worker's
    /// other clients (and upstream writers) had a turn.
    Yields,
    /// Ends: write `rest` (QUIT's reply), then close.
    Closes { rest: BytesMut },
}

impl Hosted {
    pub fn new(
        shared: Arc<Shared>,
        Addresses { advertised }: Addresses,
        id: u64,
        slot: ClientSlot,
    ) -> Self {
        Self {
            core: Arc::clone(&shared),
            session: Session::new(shared, advertised, id, slot),
            flow: Flow {
                keeps_when_idle: true,
                ..Flow::default()
            },
            wait: Wait {
                read: true,
                write: false,
                wrote: false,
                idle: None,
                soft_limit: None,
            },
            yielded: false,
            idle_timer: None,
            soft_timer: None,
            unpaused: None,
        }
    }

    /// Says which loop hosts the session, and under which token: that
    /// loop's upstream connections step it without waking it
    /// (`Inbox::hosted_by`).
    pub fn hosted_by(&self, loop_id: usize, token: usize, waker: &Waker) {
        self.session.inbox.hosted_by(loop_id, token, waker);
        self.session.entry.attention_polled_with(waker);
    }

    /// Takes in what the socket's edges and the session's sources have,
    /// stepping after each, until the session waits for more. `cx` wakes
    /// the loop for this session.
    pub fn advance(&mut self, socket: &EdgeSocket, cx: &mut Context<'_>) -> Progress {
        self.turns(socket, cx, false)
    }

    /// Steps first, then as [`Self::advance`]: a new session, or one that
    /// yielded with requests still buffered.
    pub fn resume(&mut self, socket: &EdgeSocket, cx: &mut Context<'_>) -> Progress {
        self.turns(socket, cx, true)
    }

    fn turns(&mut self, socket: &EdgeSocket, cx: &mut Context<'_>, step_first: bool) -> Progress {
        let mut stepping = step_first || self.yielded;
        let mut read = false;
        loop {
            if !stepping {
                // One read of the socket per turn, as one read per task
                // poll: a client that streams (its read filled the buffer)
                // yields to the worker's others, and to the upstream
                // writers, between reads.
                if read && self.wait.read && socket.is_readable() {
                    self.yielded = true;
                    return Progress::Yields;
                }
                match self.poll_sources(socket, cx) {
                    Poll::Ready(came) => {
                        read |= matches!(came, Event::Read(Ok(1..)));
                        if self
                            .session
                            .take_in(&self.core, &mut self.flow, came)
                            .is_break()
                        {
                            return self.close(BytesMut::new());
                        }
                    }
                    Poll::Pending => return Progress::Waits,
                }
            }
            stepping = false;
            match self.session.step(&self.core, &mut self.flow, socket) {
                Next::Wait(wait) => {
                    self.yielded = false;
                    self.waits_for(wait);
                }
                Next::Yield => {
                    self.yielded = true;
                    return Progress::Yields;
                }
                Next::Close { flush } => {
                    let rest = if flush {
                        let mut rest = std::mem::take(&mut self.flow.out);
                        // Most often it all goes now.
                        if write_owed(socket, &mut rest).is_err() {
                            rest.clear();
                        }
                        rest
                    } else {
                        BytesMut::new()
                    };
                    return self.close(rest);
                }
            }
        }
    }

    /// Whether the session is idle (nothing owed, nothing half-read) and
    /// still holds its buffers or reply queue.
    pub fn holds_idle_buffers(&self) -> bool {
        let Flow {
            inbuf,
            out,
            pending,
            ..
        } = &self.flow;
        pending.is_empty()
            && inbuf.is_empty()
            && out.is_empty()
            && (inbuf.capacity() != 0 || out.capacity() != 0 || pending.capacity() != 0)
    }

    /// Gives an idle session's buffers and reply queue back to the
    /// worker's pools. Kept through its quiet spells between requests,
    /// they were taken and given back for every request (about 250
    /// user-space instructions of a W1 GET, callgrind).
    pub fn release_idle(&mut self) {
        if self.holds_idle_buffers() {
            let Flow {
                inbuf,
                out,
                pending,
                ..
            } = &mut self.flow;
            flow_release(inbuf, out, pending);
        }
    }

    fn close(&mut self, rest: BytesMut) -> Progress {
        buffers::release(&mut self.flow.inbuf);
        buffers::release(&mut self.flow.out);
        Progress::Closes { rest }
    }

    /// Arms what a step asked to wait for (as the tokio driver does after
    /// each step).
    fn waits_for(&mut self, wait: Wait) {
        if let Some(d) = wait.idle {
            arm(&mut self.idle_timer, tokio::time::Instant::now() + d);
        }
        if let Some(deadline) = wait.soft_limit {
            arm(
                &mut self.soft_timer,
                tokio::time::Instant::from_std(deadline),
            );
        }
        self.wait = wait;
        match (&self.session.held, &self.unpaused) {
            (Some(held), None) => {
                let core = Arc::clone(&self.core);
                let until = held.1;
                self.unpaused = Some(Box::pin(async move {
                    core.clients.wait_unpaused(until).await;
                }));
            }
            (None, Some(_)) => self.unpaused = None,
            _ => {}
        }
    }

    /// What came, in the tokio driver's order: the held sources, the
    /// socket's edges, then the timers.
    fn poll_sources(&mut self, socket: &EdgeSocket, cx: &mut Context<'_>) -> Poll<Event> {
        let wait = &self.wait;
        let session = &mut self.session;
        let held = poll_held(
            &session.entry,
            &session.inbox,
            &mut self.flow.pending,
            &mut session.pubsub,
            &mut session.monitor,
            self.unpaused.as_mut(),
            cx,
        );
        if held.is_ready() {
            if matches!(held, Poll::Ready(Event::Unpaused)) {
                self.unpaused = None;
            }
            return held;
        }
        if wait.read && socket.is_readable() {
            if self.flow.inbuf.capacity() == 0 {
                self.flow.inbuf = buffers::take();
            }
            match socket.read_into(&mut self.flow.inbuf) {
                Ok(n) => return Poll::Ready(Event::Read(Ok(n))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    cx.waker().wake_by_ref();
                }
                Err(e) => return Poll::Ready(Event::Read(Err(e))),
            }
        }
        if wait.write && socket.is_writable() {
            return Poll::Ready(Event::Writable(Ok(())));
        }
        if wait.soft_limit.is_some()
            && let Some(timer) = self.soft_timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Event::SoftLimitDue);
        }
        if wait.idle.is_some()
            && let Some(timer) = self.idle_timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Event::Idle);
        }
        Poll::Pending
    }
}

impl Session {
    /// The session's tokio driver: waits for what the last step asked for
    /// and steps with what came.
    async fn run(&mut self, stream: &mut TcpStream) {
        // Borrowed halves: dropping the stream just closes it, where an
        // owned write half would cost a shutdown() syscall first.
        let (mut reader, mut writer) = stream.split();
        // The backend's settings, which a login does not change (another
        // identity's Shared derefs to the same core): no copy per client.
        // Held here, not read through `self.shared` per command: a command's
        // table entry then borrows from the session's own handle, and
        // dispatching it takes no reference count.
        let core = Arc::clone(&self.shared);
        let mut flow = Flow::default();
        let inbox = Arc::clone(&self.inbox);
        let entry = Arc::clone(&self.entry);
        let mut idle_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // A timer to drop a client over its soft output limit even if
        // nothing more comes.
        let mut soft_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let wait = match self.step(&core, &mut flow, reader.as_ref()) {
                Next::Wait(wait) => wait,
                Next::Yield => {
                    // A turn's worth (`REQUESTS_PER_TURN`) at a time: the
                    // other clients on this worker get a turn between them.
                    tokio::task::yield_now().await;
                    continue;
                }
                Next::Close { flush } => {
                    if flush {
                        // The last replies (QUIT's +OK) go out, and nothing
                        // after them.
                        let _ = writer.write_all(&flow.out).await;
                    }
                    buffers::release(&mut flow.inbuf);
                    buffers::release(&mut flow.out);
                    return;
                }
            };
            if wait.wrote {
                tokio::task::coop::consume_budget().await;
            }
            // Timers live in boxes, made only when wanted: in the future
            // itself they would cost every idle client their size.
            let idle_deadline = wait.idle.map(|d| tokio::time::Instant::now() + d);
            if let Some(deadline) = idle_deadline {
                arm(&mut idle_timer, deadline);
            }
            let soft_deadline = wait.soft_limit.map(tokio::time::Instant::from_std);
            if let Some(deadline) = soft_deadline {
                arm(&mut soft_timer, deadline);
            }
            let mut unpaused = self
                .held
                .as_ref()
                .map(|held| Box::pin(core.clients.wait_unpaused(held.1)));
            // One poll over the sources this session has, in this order
            // (a `select!` would poll a future per branch, present or not,
            // and keep them all in the session's future: every idle client
            // paid for them).
            let mut soft_due = soft_deadline.and(soft_timer.as_mut());
            let mut idle_due = idle_deadline.and(idle_timer.as_mut());
            let Flow { inbuf, pending, .. } = &mut flow;
            let came = std::future::poll_fn(|cx| {
                if let Poll::Ready(came) = poll_held(
                    &entry,
                    &inbox,
                    pending,
                    &mut self.pubsub,
                    &mut self.monitor,
                    unpaused.as_mut(),
                    cx,
                ) {
                    return Poll::Ready(came);
                }
                // Read here, in the poll: the socket's own waker slot, not
                // `readable()`, which links a waiter per turn; and a read
                // future of one poll, not `try_read`: a read that leaves
                // room in the buffer has drained the socket and clears its
                // readiness, where `try_read` keeps it and the next turn
                // pays a recv that finds nothing (one syscall per request
                // of a client that waits for each reply). Not awaited: an
                // await of its own grew every session's task by a step.
                if wait.read && reader.as_ref().poll_read_ready(cx).is_ready() {
                    if inbuf.capacity() == 0 {
                        *inbuf = buffers::take();
                    }
                    if let Poll::Ready(read) = std::pin::pin!(reader.read_buf(inbuf)).poll(cx) {
                        return Poll::Ready(Event::Read(read));
                    }
                    // A spurious wake: readiness is cleared, and the read
                    // waits on the socket's waker like the other sources.
                }
                if wait.write
                    && let Poll::Ready(ready) = reader.as_ref().poll_write_ready(cx)
                {
                    return Poll::Ready(Event::Writable(ready));
                }
                if let Some(timer) = soft_due.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Event::SoftLimitDue);
                }
                if let Some(timer) = idle_due.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Event::Idle);
                }
                Poll::Pending
            })
            .await;
            drop(unpaused);
            if self.take_in(&core, &mut flow, came).is_break() {
                buffers::release(&mut flow.inbuf);
                buffers::release(&mut flow.out);
                return;
            }
        }
    }

    /// One turn of the session, without waiting: parses and dispatches
    /// what the client sent, writes the replies that are ready in order,
    /// and says what to wait for next. Out of line: the driver's future
    /// keeps only the waiting, and a second driver calls the same code.
    #[inline(never)]
    fn step(&mut self, core: &Shared, flow: &mut Flow, socket: &impl ClientSocket) -> Next {
        let settings = &core.settings;
        let commands = &core.commands;
        let mut wrote = false;
        loop {
            // Replies owed and not yet taken by the client hold up its next
            // requests (backpressure, as a blocked write did): only pushed
            // frames (pub/sub, MONITOR, invalidations) still pile up, and
            // those are what the output limits bound.
            let flushed = flow.out.is_empty();
            if flushed
                && self.held.is_none()
                && self.barriers == 0
                && self.stashed.is_none()
                && !self.closing
                && !flow.inbuf.is_empty()
                && flow.pending.len() < settings.max_pipeline
            {
                if flow.pending.capacity() == 0 {
                    flow.pending = lend_queue();
                }
                flow.backlog =
                    self.parse_and_dispatch(&mut flow.inbuf, &mut flow.pending, settings, commands);
                self.entry.set_qbuf(flow.inbuf.len());
            }
            if flow.out.capacity() == 0 && !flow.pending.is_empty() {
                flow.out = buffers::take();
            }
            let close_now = self.drain(&mut flow.pending, &mut flow.out);
            // The earlier commands have answered: the stashed one runs.
            if flow.pending.is_empty()
                && !close_now
                && let Some(req) = self.stashed.take()
            {
                self.read_at = Stamp::now();
                self.dispatch(*req, &mut flow.pending, commands);
                self.flush_batch();
                continue;
            }
            if close_now {
                return Next::Close { flush: true };
            }
            if !flow.out.is_empty() {
                // As much as the socket takes now; the rest waits for it to
                // be writable, while the session goes on serving events.
                if write_owed(socket, &mut flow.out).is_err() {
                    return Next::Close { flush: false };
                }
                wrote = true;
                if flow.out.is_empty() {
                    flow.soft_clock.reset();
                    if flow.out.capacity() > 1024 * 1024 {
                        flow.out = BytesMut::new();
                    }
                } else if self.over_output_limit(flow.out.len(), &mut flow.soft_clock) {
                    return Next::Close { flush: false };
                }
            }
            break;
        }
        let Flow {
            inbuf,
            out,
            pending,
            eof,
            backlog,
            soft_clock,
            keeps_when_idle,
        } = flow;
        // Requests already buffered wait only for room in the pipeline,
        // never for more input (the client may be done sending).
        if *backlog
            && out.is_empty()
            && self.held.is_none()
            && self.barriers == 0
            && self.stashed.is_none()
            && !self.closing
            && pending.len() < settings.max_pipeline
        {
            return Next::Yield;
        }
        if *eof && pending.is_empty() && !*backlog && self.held.is_none() && out.is_empty() {
            return Next::Close { flush: false };
        }
        // Idle: nothing owed, nothing half-read. The buffers go back to the
        // pool until the client sends again (or after a quiet spell).
        if pending.is_empty() && inbuf.is_empty() && out.is_empty() {
            if !*keeps_when_idle {
                flow_release(inbuf, out, pending);
            } else if inbuf.capacity() != 0 {
                buffers::rewind(inbuf);
            }
        }
        let read =
            !*eof && !self.closing && out.is_empty() && pending.len() < settings.max_pipeline;
        let subscribed = self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active);
        let idle = settings
            .idle_timeout
            .filter(|_| pending.is_empty() && !subscribed && self.monitor.is_none());
        // Only at a request boundary: nothing owed, nothing half-sent.
        let leaving = self.entry.leaves_when_quiet()
            && pending.is_empty()
            && inbuf.is_empty()
            && out.is_empty()
            && self.held.is_none()
            && !subscribed
            && self.monitor.is_none();
        let idle = if leaving {
            Some(idle.map_or(QUIET_BEFORE_LEAVING, |d| d.min(QUIET_BEFORE_LEAVING)))
        } else {
            idle
        };
        if inbuf.capacity() != 0 && inbuf.capacity() - inbuf.len() < 1024 {
            inbuf.reserve(16 * 1024);
        }
        // Only a client over its soft limit reads the limits here.
        let soft_limit = if soft_clock.is_running() && !out.is_empty() {
            soft_clock.deadline(core.output_limits.get().of(self.output_class()))
        } else {
            None
        };
        Next::Wait(Wait {
            read,
            write: !out.is_empty(),
            wrote,
            idle,
            soft_limit,
        })
    }

    /// What came while the session waited, taken in before its next step;
    /// `Break` when the connection ends now.
    #[inline(always)]
    fn take_in(&mut self, core: &Shared, flow: &mut Flow, came: Event) -> ControlFlow<()> {
        let pending = &mut flow.pending;
        match came {
            Event::Resolved(Resolution::Wake) => {}
            Event::Resolved(resolution) => self.resolve_head(pending, resolution),
            Event::Read(Ok(0) | Err(_)) => flow.eof = true,
            Event::Read(Ok(_)) => {}
            // The step writes what is owed, or sees the error.
            Event::Writable(Ok(())) => {}
            Event::Writable(Err(_)) => return ControlFlow::Break(()),
            Event::SoftLimitDue => {
                if self.over_output_limit(flow.out.len(), &mut flow.soft_clock) {
                    return ControlFlow::Break(());
                }
            }
            Event::PubSub(Some(pubsub::Out::Frame(frame))) => flow.out.extend_from_slice(&frame),
            Event::PubSub(Some(pubsub::Out::Close) | None) => {
                pending.push_back(Pending::Close);
                self.closing = true;
            }
            // Never ahead of a reply still owed (MONITOR's own +OK).
            Event::Monitor(Some(line)) if pending.is_empty() => flow.out.extend_from_slice(&line),
            Event::Monitor(Some(line)) => pending.push_back(Pending::Ready(line, None)),
            Event::Monitor(None) => self.monitor = None,
            // After the replies already queued: an invalidation never
            // overtakes the reply of a read it races with.
            Event::Attention => {
                if self.entry.is_killed() {
                    return ControlFlow::Break(());
                }
                for frame in self.entry.take_pushed() {
                    pending.push_back(Pending::Ready(frame, None));
                }
            }
            Event::Unpaused => {
                if let Some(held) = self.held.take() {
                    let (req, _) = *held;
                    self.entry.set_flag(flags::BLOCKED, false);
                    self.read_at = Stamp::now();
                    self.dispatch(req, pending, &core.commands);
                    self.flush_batch();
                }
            }
            Event::Idle => {
                tracing::debug!("idle timeout");
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// The class whose output limit this client is held to.
    fn output_class(&self) -> output_limit::Class {
        if self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active) {
            output_limit::Class::Pubsub
        } else {
            output_limit::Class::Normal
        }
    }

    /// Whether the client, owed `owed` bytes it has not read, is over its
    /// class's limit; then it is counted, and the caller drops it, as Redis
    /// does.
    fn over_output_limit(&self, owed: usize, clock: &mut output_limit::SoftClock) -> bool {
        let class = self.output_class();
        let limit = self.shared.output_limits.get().of(class);
        if !output_limit::over_limit(limit, owed, clock, Instant::now()) {
            return false;
        }
        tracing::info!(
            client = self.id,
            addr = %self.entry.addr,
            class = class.label(),
            owed,
            "client closed for overcoming of output buffer limits"
        );
        self.shared.metrics.output_limit_disconnected(class);
        true
    }

    /// Writes every resolved reply at the head of the queue into `out`.
    /// Returns true when the connection must close now.
    // Inlined into each driver's step, as when the step had one caller:
    // out of line, with two, it cost a W1 GET 200 instructions (callgrind).
    #[inline(always)]
    fn drain(&mut self, pending: &mut VecDeque<Pending>, out: &mut BytesMut) -> bool {
        let mut writing = Writing::default();
        let close = self.drain_into(pending, out, &mut writing);
        if let Some((_, took, n)) = writing.took_since {
            self.shared.metrics.latencies(took, n);
        }
        close
    }

    /// [`Self::drain`], with what the replies written share.
    #[inline(always)]
    fn drain_into(
        &mut self,
        pending: &mut VecDeque<Pending>,
        out: &mut BytesMut,
        writing: &mut Writing,
    ) -> bool {
        loop {
            let resolution = match pending.front_mut() {
                None => return false,
                Some(Pending::Close) => return true,
                Some(Pending::Ready(..)) => None,
                Some(Pending::Upstream { seq, .. }) => {
                    // The replies of every command routed in a row at the
                    // head that have come, taken under one lock and
                    // resolved in place. None come yet (as right after
                    // the dispatch): no lock.
                    if !self.inbox.any_arrived() {
                        return false;
                    }
                    let first = *seq;
                    let run = pending
                        .iter()
                        .zip(first..)
                        .take_while(|(p, n)| matches!(p, Pending::Upstream { seq, .. } if seq == n))
                        .count();
                    // Each reply is written as it is taken while all before
                    // it were: resolved in place and popped later, it was
                    // moved whole (120 bytes) twice more, and reading it
                    // back right after its stores stalled (perf). From the
                    // first that is not done (a redirect, a retry), the rest
                    // wait in place behind it.
                    let mut entries = pending.iter_mut();
                    let mut sent = 0;
                    let mut in_order = true;
                    let taken = self.inbox.take_arrived(first, run, |result| {
                        let entry = entries.next().expect("one entry per reply taken");
                        let Pending::Upstream { routed, meta, .. } =
                            std::mem::replace(entry, Pending::Close)
                        else {
                            unreachable!("the run holds only routed commands");
                        };
                        match exec::judge_one(result, routed.target.readonly) {
                            exec::Verdict::Done(reply) if in_order => {
                                self.write_reply(
                                    writing,
                                    out,
                                    reply.raw,
                                    Some(meta.taking(routed.payload)),
                                );
                                sent += 1;
                            }
                            verdict => {
                                in_order = false;
                                *entry = upstream_settled(&self.shared, routed, meta, verdict);
                            }
                        }
                    });
                    // The replies written were the queue's head, each left
                    // as a `Close` no one reads. Popped one by one:
                    // `VecDeque::drain` cost a W1 GET 107 instructions
                    // (callgrind) for its one entry.
                    for _ in 0..sent {
                        pending.pop_front();
                    }
                    if taken == 0 {
                        return false;
                    }
                    continue;
                }
                Some(Pending::Gather(gather, _)) => {
                    match self.inbox.take_run(gather.first, gather.replies()) {
                        Some(results) => Some(Resolution::Gathered(results)),
                        None => return false,
                    }
                }
                Some(Pending::Task(rx, _) | Pending::Barrier(rx, _)) => match rx.try_recv() {
                    Ok(raw) => Some(Resolution::Task(raw)),
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                    Err(oneshot::error::TryRecvError::Closed) => Some(Resolution::Task(
                        reply::error("ERR redirector: internal task failed"),
                    )),
                },
                Some(Pending::Login(rx, _)) => match rx.try_recv() {
                    Ok(login) => Some(Resolution::Login(login)),
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Some(Resolution::Login(Login::failed_task()))
                    }
                },
                Some(Pending::Permit(rx, ..)) => match rx.try_recv() {
                    Ok(verdict) => Some(Resolution::Permit(verdict)),
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                    Err(oneshot::error::TryRecvError::Closed) => Some(Resolution::Permit(Err(
                        reply::error("ERR redirector: internal task failed"),
                    ))),
                },
            };
            if let Some(resolution) = resolution {
                self.resolve_head(pending, resolution);
                continue;
            }
            if let Some(Pending::Ready(raw, meta)) = pending.pop_front() {
                self.write_reply(writing, out, raw, meta);
            }
        }
    }

    /// Writes one reply owed to the client (unless it asked for none) and
    /// counts its command.
    fn write_reply(
        &self,
        writing: &mut Writing,
        out: &mut BytesMut,
        raw: Bytes,
        meta: Option<Meta>,
    ) {
        let mut silent = false;
        if let Some(meta) = meta {
            let now = *writing.now.get_or_insert_with(Stamp::now);
            let took = match &mut writing.took_since {
                Some((started, took, n)) if *started == meta.started => {
                    *n += 1;
                    *took
                }
                since => {
                    if let Some((_, took, n)) = since.take() {
                        self.shared.metrics.latencies(took, n);
                    }
                    let took = now.since(meta.started);
                    *since = Some((meta.started, took, 1));
                    took
                }
            };
            let ok = !matches!(raw.first(), Some(b'-' | b'!'));
            self.metric_cache[meta.metric].record(ok);
            silent = meta.silent;
            if let Some(command) = &meta.slow
                && self.shared.slowlog.is_slow(took)
            {
                self.shared
                    .slowlog
                    .record(command, took, self.entry.addr, self.entry.name());
            }
        }
        if !silent {
            out.extend_from_slice(&raw);
        }
        if writing.written.len() < writing.written.inline_size() {
            writing.written.push(raw);
        }
    }

    /// Out of line: what it may run (a gather's task, a command held for
    /// its permission) would grow the frame of every drain.
    #[inline(never)]
    fn resolve_head(&mut self, pending: &mut VecDeque<Pending>, resolution: Resolution) {
        let Some(front) = pending.pop_front() else {
            return;
        };
        let resolved = match (front, resolution) {
            (Pending::Gather(gather, meta), Resolution::Gathered(results)) => {
                match gather.finish(&self.shared, results) {
                    gather::Finished::Reply(raw) => Pending::Ready(raw, Some(meta)),
                    gather::Finished::Later(work) => Pending::Task(spawn_raw(work), Some(meta)),
                }
            }
            (Pending::Task(_, meta), Resolution::Task(raw)) => Pending::Ready(raw, meta),
            (Pending::Barrier(_, meta), Resolution::Task(raw)) => {
                self.barriers -= 1;
                Pending::Ready(raw, meta)
            }
            (Pending::Login(_, meta), Resolution::Login(login)) => {
                self.barriers -= 1;
                Pending::Ready(self.finish_login(login), meta)
            }
            (Pending::Permit(_, held, meta), Resolution::Permit(verdict)) => {
                self.barriers -= 1;
                match verdict {
                    Ok(()) => {
                        let (local, req) = *held;
                        // As Redis shows it while the command runs.
                        self.entry.set_qbuf(req.raw().len());
                        // Its replies take the permit's place, in order.
                        let mut replies = VecDeque::new();
                        self.local(local, &req, &mut replies, meta);
                        self.entry.set_qbuf(0);
                        for reply in replies.into_iter().rev() {
                            pending.push_front(reply);
                        }
                        return;
                    }
                    Err(raw) => {
                        self.shared.count_local_error(&raw);
                        Pending::Ready(raw, Some(meta))
                    }
                }
            }
            (other, _) => other,
        };
        pending.push_front(resolved);
    }

    /// Parses and dispatches buffered requests until none is complete, the
    /// pipeline is full or a command is held by CLIENT PAUSE. Returns true
    /// when it stopped at the limit with bytes left, which the caller
    /// parses as soon as there is room.
    #[inline(always)]
    fn parse_and_dispatch(
        &mut self,
        inbuf: &mut BytesMut,
        pending: &mut VecDeque<Pending>,
        settings: &super::Settings,
        commands: &CommandTable,
    ) -> bool {
        let backlog = self.parse_requests(inbuf, pending, settings, commands);
        self.flush_batch();
        backlog
    }

    #[inline(always)]
    fn parse_requests(
        &mut self,
        inbuf: &mut BytesMut,
        pending: &mut VecDeque<Pending>,
        settings: &super::Settings,
        commands: &CommandTable,
    ) -> bool {
        self.read_at = Stamp::now();
        self.entry.active_at(self.read_at);
        let mut parsed = 0;
        // An emptied buffer is not parsed again only to hear it is
        // incomplete: most reads hold whole requests.
        while !inbuf.is_empty()
            && pending.len() < settings.max_pipeline
            && parsed < REQUESTS_PER_TURN
            && !self.closing
            && self.held.is_none()
            && self.barriers == 0
            && self.stashed.is_none()
        {
            match request::parse(inbuf, &settings.limits) {
                Ok(Parsed::Request(req)) => {
                    parsed += 1;
                    let info = plan::lookup_cached(commands, &req, &mut self.last_command);
                    self.dispatch_known(req, info, pending, commands);
                }
                Ok(Parsed::Incomplete { needed }) => {
                    if needed > 0 {
                        inbuf.reserve(needed);
                    }
                    return false;
                }
                Err(e) => {
                    // As Redis: reply with the protocol error, then close.
                    self.shared.metrics.protocol_error();
                    tracing::debug!(error = %e, "malformed request");
                    pending.push_back(Pending::Ready(reply::error(&format!("ERR {e}")), None));
                    pending.push_back(Pending::Close);
                    self.closing = true;
                    inbuf.clear();
                    return false;
                }
            }
        }
        // Stopped at the pipeline limit, a turn's worth or a pause:
        // complete requests may remain.
        !self.closing && !inbuf.is_empty()
    }

    /// This session's counters for a command name (few distinct names per
    /// client: a short scan beats the shared map and its locking).
    fn metric_index(&mut self, name: &[u8]) -> usize {
        if let Some(i) = self.metric_cache.iter().position(|c| c.name() == name) {
            return i;
        }
        // Exactly one at first: most clients use few commands, and a
        // cache grown to four would stay with every idle client.
        if self.metric_cache.is_empty() {
            self.metric_cache.reserve_exact(1);
        }
        self.metric_cache.push(self.shared.metrics.command(name));
        self.metric_cache.len() - 1
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            id: self.id,
            protocol: self.protocol,
            peer: self.entry.addr,
            local: self.entry.laddr,
            advertised: self.advertised,
            user: &self.user,
        }
    }

    fn state(&self) -> SessionState<'_> {
        let settings = &self.shared.settings;
        SessionState {
            protocol: self.protocol,
            authed: self.authed,
            in_multi: self.multi.is_some(),
            subscribed_resp2: self.protocol == Protocol::Resp2
                && self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active),
            one_shard: self.shared.topology.is_standalone(),
            admin: if settings.auth_mode == AuthMode::Proxy && !settings.allow_admin_commands {
                Admin::Refused {
                    backend: self.shared.metrics.backend(),
                }
            } else {
                Admin::Allowed
            },
        }
    }

    /// Whether CLIENT REPLY silences this command's reply (SKIP silences
    /// the one after it).
    fn silence(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::Skip => {
                self.reply_mode = ReplyMode::On;
                true
            }
        }
    }

    fn dispatch(&mut self, req: Request, pending: &mut VecDeque<Pending>, commands: &CommandTable) {
        let info = plan::lookup(commands, &req);
        self.dispatch_known(req, info, pending, commands);
    }

    /// [`Self::dispatch`], the command's table entry already looked up.
    fn dispatch_known(
        &mut self,
        req: Request,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        commands: &CommandTable,
    ) {
        let plan = plan::plan_known(commands, info, &req, &self.state());
        // As in Redis, a blocking command or a script starts only once the
        // client's earlier commands have run.
        if !pending.is_empty() && self.is_barrier(&plan, info, &req) {
            self.stashed = Some(Box::new(req));
            return;
        }
        // CLIENT PAUSE holds writes (or everything) until it ends.
        // What Redis rejects before it looks at a pause (an unknown command,
        // a wrong arity) is answered at once.
        let valid = info.is_some_and(|i| i.arity_ok(req.argc()));
        if valid && let Some(until) = self.shared.clients.held_until(|| self.writes(info, &req)) {
            // Redis counts a paused client as blocked.
            self.entry.set_flag(flags::BLOCKED, true);
            self.held = Some(Box::new((req, until)));
            return;
        }
        self.shared.count_command();
        // The metric's name: the table's own lowercase one.
        let name = info.map_or(UNKNOWN_COMMAND, |i| i.container_name().as_bytes());
        // CLIENT LIST's cmd=, written only when it changes (a pipeline of
        // one command takes no lock per command). The address only tells
        // table entries apart; it is never dereferenced.
        let cmd_id = info.map_or(0, |i| std::ptr::from_ref(i) as usize);
        if cmd_id != self.last_cmd {
            self.last_cmd = cmd_id;
            match info {
                Some(info) => self.entry.command(&info.name),
                None => self.entry.command(&super::clients::unknown_command()),
            }
        }
        // As Redis shows it while the command runs: in the query buffer.
        self.entry.set_qbuf(req.raw().len());
        if info.is_some_and(plan::changes_credentials) {
            self.shared.logins.forget_checks();
        }
        if self.shared.clients.is_monitored() && info.is_some_and(plan::monitored) {
            self.shared.clients.feed(self.entry.addr, req.args());
        }
        let metric = self.metric_index(name);
        let silent = self.silence();
        // Redis keeps some commands out of its slow log (AUTH, EXEC, ...).
        // The command's bytes are kept for it on the way (`Meta::keeping`).
        let logs_slow = self.shared.slowlog.enabled()
            && info.is_some_and(|i| !i.flags.contains(Flags::SKIP_SLOWLOG));
        let meta = Meta {
            started: self.read_at,
            metric,
            silent,
            logs_slow,
            slow: None,
        };
        self.carry_out(plan, req, info, pending, meta);
    }

    /// Whether CLIENT PAUSE WRITE holds this command: it writes, may
    /// replicate (EVAL, PUBLISH, ...), or is an EXEC of writes.
    fn writes(&self, info: Option<&CommandInfo>, req: &Request) -> bool {
        if req.args()[0].eq_ignore_ascii_case(b"exec") {
            return self.multi.as_ref().is_some_and(|q| q.writes);
        }
        if info.is_some_and(|i| &*i.name == "evalsha")
            && let Some(sha) = req.args().get(1)
        {
            return !self.shared.functions.script_no_writes(sha);
        }
        // FCALL writes unless its function declares no-writes.
        if info.is_some_and(|i| &*i.name == "fcall")
            && let Some(function) = req.args().get(1)
        {
            return match self.shared.functions.no_writes(function) {
                Some(no_writes) => !no_writes,
                None => {
                    functions::learn(&self.shared);
                    true
                }
            };
        }
        info.is_some_and(|i| plan::may_replicate(i, req))
    }

    /// EVALSHA/FCALL without keys: the shard the script's literal keys
    /// name, learnt when it went through SCRIPT LOAD or FUNCTION LOAD.
    fn loaded_script_slot(&self, info: Option<&CommandInfo>, req: &Request) -> Option<u16> {
        let name = req.args().get(1)?;
        match &*info?.name {
            "evalsha" | "evalsha_ro" => self.shared.functions.script_slot(name),
            "fcall" | "fcall_ro" => self.shared.functions.function_slot(name),
            _ => None,
        }
    }

    /// Carries out `plan`: a command routed to its slot's node here, most
    /// of the traffic; any other plan out of line, in [`Self::carry_out_any`],
    /// whose spawned tasks' futures (built on the stack at full size) made
    /// the frame of every command 19 KiB when inlined here.
    #[inline]
    fn carry_out(
        &mut self,
        plan: Plan,
        req: Request,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        match plan {
            // A routed command's bytes reach the slow log with its reply.
            Plan::Route { slot, readonly } => {
                self.carry_out_route(req, slot, readonly, info, pending, meta);
            }
            plan => {
                let meta = meta.keeping(req.raw());
                self.carry_out_any(plan, req, info, pending, meta);
            }
        }
    }

    /// [`Plan::Route`]: to the slot's node, or on a lease for a script.
    #[inline]
    fn carry_out_route(
        &mut self,
        req: Request,
        slot: Option<u16>,
        readonly: bool,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let slot = slot.or_else(|| self.loaded_script_slot(info, &req));
        if !readonly {
            self.last_write_slot = slot.or(self.last_write_slot);
        }
        if self.script_on_lease(info) {
            let meta = meta.keeping(req.raw());
            self.blocking(req, slot, false, pending, meta);
            return;
        }
        self.route(req, slot, readonly, pending, meta);
    }

    #[inline(never)]
    fn carry_out_any(
        &mut self,
        plan: Plan,
        req: Request,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let ready = |pending: &mut VecDeque<Pending>, raw: Bytes, meta: Meta| {
            pending.push_back(Pending::Ready(raw, Some(meta)));
        };
        // The backend handle is cloned only where work leaves the session
        // (a task): a routed command takes no reference count.
        let protocol = self.protocol;
        match plan {
            Plan::Local(local) if self.needs_permit(info, &req) => {
                let name = info.map_or_else(String::new, |i| i.name.to_string());
                let (user, args) = (self.user.to_string(), req.args().to_vec());
                let (tx, rx) = oneshot::channel();
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    let _ = tx.send(login::permitted(shared, user, args, name).await);
                });
                self.barriers += 1;
                pending.push_back(Pending::Permit(rx, Box::new((local, req)), meta));
            }
            Plan::Local(local) => self.local(local, &req, pending, meta),
            Plan::Route { slot, readonly } => {
                self.carry_out_route(req, slot, readonly, info, pending, meta);
            }
            Plan::Publish { slot } => self.route(req, Some(slot), false, pending, meta),
            Plan::Split {
                groups,
                merge,
                readonly,
            } => {
                if !readonly {
                    self.last_write_slot = groups.last().map(|(s, _)| *s);
                }
                let via = self.tracking.as_ref().map(|t| Arc::clone(t.conns()));
                let parts = exec::split_parts(&req, &groups, protocol, readonly, via.as_ref());
                self.refresh_view();
                let nodes: Result<Vec<SocketAddr>, Bytes> = parts
                    .iter()
                    .map(|part| exec::pick(&self.shared, &self.view, part.target))
                    .collect();
                let Ok(nodes) = nodes else {
                    // A slot without an owner right now: the parts wait
                    // for the topology, as a retry does.
                    let rx = spawn_raw(exec::split(
                        Arc::clone(&self.shared),
                        protocol,
                        parts,
                        groups,
                        merge,
                    ));
                    pending.push_back(Pending::Task(rx, Some(meta)));
                    return;
                };
                let first = self.next_seq;
                for (node, part) in nodes.into_iter().zip(&parts) {
                    self.enqueue(node, &part.payload);
                }
                let work = gather::Work::Split {
                    parts,
                    groups,
                    how: merge,
                };
                gather_from(pending, first, protocol, work, meta);
            }
            Plan::FanOut {
                nodes,
                merge,
                readonly,
            } => {
                let entry = Arc::clone(&self.entry);
                if !plan::fan_out_in_turn(info, &req, merge) {
                    let shared = Arc::clone(&self.shared);
                    let rx = spawn_raw(async move {
                        exec::fan_out(shared, protocol, req, nodes, merge, readonly, entry).await
                    });
                    self.barrier(pending, rx, meta);
                    return;
                }
                self.refresh_view();
                let targets = exec::fan_out_nodes(&self.view, nodes);
                if targets.is_empty() {
                    ready(pending, reply::error(exec::CLUSTERDOWN), meta);
                    return;
                }
                let first = self.next_seq;
                for &node in &targets {
                    self.enqueue(node, req.raw());
                }
                let work = gather::Work::FanOut {
                    req,
                    targets,
                    how: merge,
                    readonly,
                    client: entry,
                };
                gather_from(pending, first, protocol, work, meta);
            }
            Plan::Scan => {
                let shared = Arc::clone(&self.shared);
                let rx = spawn_raw(async move { exec::scan(shared, protocol, req).await });
                self.barrier(pending, rx, meta);
            }
            Plan::Blocking { slot } => {
                if info.is_some_and(|i| i.flags.contains(Flags::WRITE)) {
                    self.last_write_slot = slot.or(self.last_write_slot);
                }
                self.blocking(req, slot, true, pending, meta);
            }
            Plan::Wait => {
                let slot = self.last_write_slot;
                self.blocking(req, slot, true, pending, meta);
            }
            Plan::Txn(step) => self.transaction(step, req, pending, meta),
            Plan::PubSub => {
                let handle = self.pubsub.get_or_insert_with(|| {
                    pubsub::start(
                        Arc::clone(&self.shared),
                        self.protocol,
                        Arc::clone(&self.entry),
                    )
                });
                handle.send(req);
                // Replies come from the subscription connections.
                self.metric_cache[meta.metric].record(true);
            }
            Plan::Queue(checked) => {
                let queued = self.multi.as_mut().expect("queued only in MULTI");
                let raw = match checked {
                    Ok(slot) => {
                        let writes = info.is_some_and(|i| plan::may_replicate(i, &req));
                        match queued.push(req, slot, writes) {
                            Ok(()) => Bytes::from_static(b"+QUEUED\r\n"),
                            Err(e) => {
                                self.shared.count_local_error(&e);
                                e
                            }
                        }
                    }
                    Err(e) => {
                        queued.dirty = true;
                        self.shared.count_local_error(&e);
                        e
                    }
                };
                self.entry
                    .set_multi(self.multi.as_ref().map(|q| q.commands.len()));
                ready(pending, raw, meta);
            }
            Plan::Refuse(raw) => {
                self.shared.count_local_error(&raw);
                ready(pending, raw, meta);
            }
        }
    }

    fn local(&mut self, local: Local, req: &Request, pending: &mut VecDeque<Pending>, meta: Meta) {
        let subscribed = self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active);
        let raw = match local {
            Local::Ping => local::ping(req, self.protocol, subscribed),
            Local::Echo => local::echo(req, self.protocol),
            Local::Time => local::time(self.protocol),
            Local::Select => local::select(req, self.shared.topology.is_standalone()),
            Local::Ok => reply::ok(),
            Local::AclWhoami => reply::build(self.protocol, |e| e.bulk(self.user.as_bytes())),
            Local::Slowlog => self.shared.slowlog.command(req.args(), self.protocol),
            Local::Quit => {
                pending.push_back(Pending::Ready(reply::ok(), Some(meta)));
                pending.push_back(Pending::Close);
                self.closing = true;
                return;
            }
            Local::Auth | Local::Hello => {
                let step = if local == Local::Auth {
                    self.auth(req)
                } else {
                    self.hello(req)
                };
                match step {
                    Step::Now(raw) => raw,
                    Step::Later(rx) => {
                        self.barriers += 1;
                        pending.push_back(Pending::Login(rx, Some(meta)));
                        return;
                    }
                }
            }
            Local::Reset => {
                self.reset();
                Bytes::from_static(b"+RESET\r\n")
            }
            // A standalone Redis answers CLUSTER as one without cluster
            // support: clients must not start looking for slots.
            Local::Cluster if self.shared.topology.is_standalone() => {
                reply::error("ERR This instance has cluster support disabled")
            }
            Local::Cluster => local::cluster(req, &self.caller()),
            Local::Monitor => {
                let (feed, ready) = monitor::start(&self.shared);
                self.monitor = Some(feed);
                self.entry.set_flag(flags::MONITOR, true);
                pending.push_back(Pending::Task(ready, Some(meta)));
                return;
            }
            Local::Client => {
                let outcome = client_cmd::client(
                    req,
                    &mut client_cmd::Context {
                        shared: &self.shared,
                        entry: &self.entry,
                        protocol: self.protocol,
                        reply_mode: &mut self.reply_mode,
                        tracking: &mut self.tracking,
                    },
                );
                match outcome {
                    client_cmd::Outcome::Reply(raw) => raw,
                    client_cmd::Outcome::Loud(raw) => {
                        let meta = Meta {
                            silent: false,
                            ..meta
                        };
                        pending.push_back(Pending::Ready(raw, Some(meta)));
                        return;
                    }
                    client_cmd::Outcome::ReplyThenClose(raw) => {
                        pending.push_back(Pending::Ready(raw, Some(meta)));
                        pending.push_back(Pending::Close);
                        self.closing = true;
                        return;
                    }
                    client_cmd::Outcome::Silent => {
                        pending.push_back(Pending::Ready(
                            Bytes::new(),
                            Some(Meta {
                                silent: true,
                                ..meta
                            }),
                        ));
                        return;
                    }
                    client_cmd::Outcome::Task(rx) => {
                        pending.push_back(Pending::Task(rx, Some(meta)));
                        return;
                    }
                }
            }
        };
        pending.push_back(Pending::Ready(raw, Some(meta)));
    }

    fn transaction(
        &mut self,
        step: Txn,
        req: Request,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        match step {
            Txn::Multi => {
                let raw = if self.multi.is_some() {
                    reply::error("ERR MULTI calls can not be nested")
                } else {
                    self.multi = Some(Box::default());
                    self.entry.set_multi(Some(0));
                    reply::ok()
                };
                pending.push_back(Pending::Ready(raw, Some(meta)));
            }
            Txn::Exec => match self.multi.take() {
                None => pending.push_back(Pending::Ready(
                    reply::error("ERR EXEC without MULTI"),
                    Some(meta),
                )),
                Some(queued) => {
                    self.entry.set_multi(None);
                    let (prev, next) = self.next_baton();
                    let rx =
                        spawn_raw(
                            async move { txn::exec(shared, protocol, prev, next, *queued).await },
                        );
                    self.barrier(pending, rx, meta);
                }
            },
            Txn::Discard => match self.multi.take() {
                None => pending.push_back(Pending::Ready(
                    reply::error("ERR DISCARD without MULTI"),
                    Some(meta),
                )),
                Some(_) => {
                    self.entry.set_multi(None);
                    let (prev, next) = self.next_baton();
                    let rx = spawn_raw(async move { txn::unwatch(prev, next).await });
                    pending.push_back(Pending::Task(rx, Some(meta)));
                }
            },
            Txn::Watch { slot } => {
                let (prev, next) = self.next_baton();
                let rx =
                    spawn_raw(
                        async move { txn::watch(shared, protocol, prev, next, req, slot).await },
                    );
                self.barrier(pending, rx, meta);
            }
            Txn::Unwatch => {
                let (prev, next) = self.next_baton();
                let rx = spawn_raw(async move { txn::unwatch(prev, next).await });
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
        }
    }

    fn next_baton(&mut self) -> (Option<txn::Baton>, txn::BatonTx) {
        let (tx, rx) = txn::baton();
        (self.baton.replace(rx), tx)
    }

    fn auth(&mut self, req: &Request) -> Step {
        let (user, password) = match req.argc() {
            2 => (None, req.args()[1].clone()),
            3 => (Some(req.args()[1].clone()), req.args()[2].clone()),
            _ => return Step::Now(plan::wrong_arity("auth")),
        };
        let settings = &self.shared.settings;
        if settings.auth_mode == AuthMode::Proxy && !settings.auth.required() {
            return Step::Now(reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            ));
        }
        self.login(Credentials { user, password }, After::Auth)
    }

    /// Checks credentials: in passthrough Redis does (in a task), in proxy
    /// mode the proxy's own users. Either way an address with recent
    /// failures waits first.
    fn login(&mut self, credentials: Credentials, then: After) -> Step {
        let ip = self.entry.addr.ip();
        let (tx, rx) = oneshot::channel();
        match self.shared.settings.auth_mode {
            AuthMode::Passthrough => {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    let outcome = login::passthrough(shared, ip, credentials).await;
                    let _ = tx.send(Login { outcome, then });
                });
            }
            AuthMode::Proxy => {
                let logins = &self.shared.logins;
                let delay = logins.delay(ip);
                let accepted = self
                    .shared
                    .settings
                    .auth
                    .check(credentials.user.as_deref(), &credentials.password);
                let outcome = if accepted {
                    Ok(Accepted {
                        shared: None,
                        user: credentials.user.as_ref().map_or_else(
                            || "default".into(),
                            |u| String::from_utf8_lossy(u).into_owned(),
                        ),
                    })
                } else {
                    logins.failed(ip);
                    Err(reply::error(WRONGPASS))
                };
                let login = Login { outcome, then };
                if delay.is_zero() {
                    return Step::Now(self.finish_login(login));
                }
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(login);
                });
            }
        }
        Step::Later(rx)
    }

    /// Takes on a login's outcome; the reply of its command.
    fn finish_login(&mut self, login: Login) -> Bytes {
        match login.outcome {
            Err(raw) => raw,
            Ok(Accepted { shared, user }) => {
                if let Some(shared) = shared {
                    self.run_as(shared);
                }
                self.authed = true;
                self.user = user.into();
                self.entry.set_user(&self.user);
                match login.then {
                    After::Auth => reply::ok(),
                    After::Hello(hello) => self.finish_hello(hello),
                }
            }
        }
    }

    /// The client's next commands run as another identity.
    fn run_as(&mut self, shared: Arc<Shared>) {
        if !shared.same_identity(&self.shared) {
            // Cached connections are the old identity's.
            self.conns.clear();
            // An actor without subscriptions would subscribe later with the
            // old identity's rights; one with subscriptions keeps them, as
            // a connection does in Redis.
            if !self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active) {
                self.pubsub = None;
            }
        }
        self.shared = shared;
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    fn hello(&mut self, req: &Request) -> Step {
        let mut protocol = self.protocol;
        if let Some(version) = req.args().get(1) {
            protocol = match &version[..] {
                b"2" => Protocol::Resp2,
                b"3" => Protocol::Resp3,
                _ => return Step::Now(reply::error("NOPROTO unsupported protocol version")),
            };
        }
        let mut i = 2;
        let mut name = None;
        let mut credentials = None;
        while i < req.argc() {
            if req.arg_is(i, "auth") && i + 2 < req.argc() {
                credentials = Some(Credentials {
                    user: Some(req.args()[i + 1].clone()),
                    password: req.args()[i + 2].clone(),
                });
                i += 3;
            } else if req.arg_is(i, "setname") && i + 1 < req.argc() {
                name = Some(req.args()[i + 1].clone());
                i += 2;
            } else {
                return Step::Now(reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&req.args()[i])
                )));
            }
        }
        let hello = Hello { protocol, name };
        match credentials {
            // As Redis: options first, then the credentials, then the rest.
            Some(credentials) => self.login(credentials, After::Hello(hello)),
            None => Step::Now(self.finish_hello(hello)),
        }
    }

    fn finish_hello(&mut self, Hello { protocol, name }: Hello) -> Bytes {
        if !self.authed {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if name.is_some() {
            self.entry.set_name(name);
        }
        if protocol != self.protocol {
            self.conns.clear();
        }
        self.protocol = protocol;
        self.entry.set_protocol(protocol);
        if let Some(tracking) = &mut self.tracking {
            tracking.set_protocol(protocol);
        }
        local::hello_reply(&self.shared, &self.caller())
    }

    fn reset(&mut self) {
        self.multi = None;
        self.entry.set_multi(None);
        if self.baton.is_some() {
            let (prev, next) = self.next_baton();
            tokio::spawn(async move { txn::unwatch(prev, next).await });
        }
        self.pubsub = None;
        self.entry.set_subscriptions(0, 0, 0);
        self.protocol = Protocol::Resp2;
        self.entry.set_protocol(self.protocol);
        self.conns.clear();
        self.entry.set_name(None);
        // Back to the identity of a client that has not authenticated.
        self.shared = Arc::clone(&self.unauthenticated);
        self.authed = starts_authed(&self.shared);
        self.user = super::clients::default_user();
        self.entry.set_user(&self.user);
        self.reply_mode = ReplyMode::On;
        if self.monitor.take().is_some() {
            self.entry.set_flag(flags::MONITOR, false);
        }
        if self.tracking.take().is_some() {
            self.entry.set_flag(flags::TRACKING, false);
            self.entry.set_flag(flags::TRACKING_BROKEN_REDIR, false);
            self.entry.set_redirect(0);
        }
        self.entry.set_flag(flags::NO_EVICT, false);
    }

    /// The hot path: one command to one node on a shared connection.
    fn route(
        &mut self,
        req: Request,
        slot: Option<u16>,
        readonly: bool,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let via = self.tracking.as_ref().map(|t| Arc::clone(t.conns()));
        let caching = self
            .tracking
            .as_mut()
            .and_then(|handle| handle.take_caching());
        let routed = Routed {
            payload: req.into_raw(),
            target: Target { slot, readonly },
            protocol: self.protocol,
            via,
        };
        self.refresh_view();
        if let Some(caching) = caching {
            let meta = meta.keeping(&routed.payload);
            // CLIENT CACHING must precede the command on the connection
            // that tracks it: both in this turn's job, the command's reply
            // kept.
            if let Ok(node) = exec::pick(&self.shared, &self.view, routed.target) {
                let first = self.enqueue(node, &caching);
                self.enqueue(node, &routed.payload);
                let work = gather::Work::Caching { routed };
                gather_from(pending, first, self.protocol, work, meta);
                return;
            }
            let rx = spawn_with_caching(Arc::clone(&self.shared), routed, caching);
            pending.push_back(Pending::Task(rx, Some(meta)));
            return;
        }
        match exec::pick(&self.shared, &self.view, routed.target) {
            Ok(node) => {
                let seq = self.enqueue(node, &routed.payload);
                pending.push_back(Pending::Upstream { seq, routed, meta });
            }
            Err(e) => {
                // No owner right now: wait for the topology like a retry.
                let first = exec::Verdict::Retry {
                    reply: Reply::local(e),
                };
                let meta = meta.keeping(&routed.payload);
                let rx = spawn_complete(Arc::clone(&self.shared), routed, first);
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
        }
    }

    /// The slot map, if a newer one was installed.
    #[inline]
    fn refresh_view(&mut self) {
        if self.view.version != self.shared.topology.version() {
            self.view = self.shared.topology.view();
        }
    }

    /// Adds a command for `node` to this read's jobs, after the ones
    /// already there; its reply's sequence number.
    #[inline]
    fn enqueue(&mut self, node: SocketAddr, payload: &Bytes) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.batch.iter_mut().find(|b| b.node == node) {
            Some(batched) => batched.add(payload, seq),
            None => {
                if self.batch.capacity() == 0 {
                    self.batch = lend_batch();
                }
                self.batch.push(Batched {
                    node,
                    // The client's own bytes, shared, not copied.
                    payload: Payload::Shared(payload.clone()),
                    seqs: smallvec::smallvec![seq],
                });
            }
        }
        seq
    }

    /// Work in a task that the client's next commands wait for.
    fn barrier(
        &mut self,
        pending: &mut VecDeque<Pending>,
        rx: oneshot::Receiver<Bytes>,
        meta: Meta,
    ) {
        self.barriers += 1;
        pending.push_back(Pending::Barrier(rx, Some(meta)));
    }

    /// Sends what this read routed: one job per node, carrying every
    /// command for that node in request order, on this client's cached
    /// shared connection to it.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.inbox.open_until(self.next_seq);
        let mut batch = std::mem::take(&mut self.batch);
        for Batched {
            node,
            payload,
            seqs,
        } in batch.drain(..)
        {
            let job = Job {
                payload,
                replies: seqs.len(),
                sink: Sink::Inbox {
                    inbox: Arc::clone(&self.inbox),
                    seqs,
                },
                switch_to: None,
            };
            // A tracking client's commands run on its own connections.
            let private;
            let cached = self
                .conns
                .iter()
                .position(|(addr, conn)| *addr == node && !conn.is_closed());
            let conn = match (&self.tracking, cached) {
                (Some(tracking), _) => {
                    private = tracking.conns().conn(&self.shared, node);
                    &private
                }
                (None, cached) => match cached {
                    Some(i) => &self.conns[i].1,
                    None => {
                        self.conns
                            .retain(|(addr, conn)| *addr != node && !conn.is_closed());
                        let conn = self.shared.pools.node(node, self.protocol).conn();
                        if self.conns.is_empty() {
                            self.conns.reserve_exact(1);
                        }
                        self.conns.push((node, conn));
                        &self.conns[self.conns.len() - 1].1
                    }
                },
            };
            if let Err(job) = conn.send(job) {
                job.fail(super::UpstreamError::NotSent(
                    node,
                    "connection closed".into(),
                ));
            }
        }
        give_back_batch(batch);
    }

    /// A command that may block runs on a leased connection, so it never
    /// holds up a shared one.
    fn blocking(
        &mut self,
        req: Request,
        slot: Option<u16>,
        blocks: bool,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        let entry = Arc::clone(&self.entry);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let work = exec::blocking_call(shared, protocol, req, slot, &entry, blocks);
            tokio::pin!(work);
            let mut tx = tx;
            tokio::select! {
                raw = &mut work => { let _ = tx.send(raw); }
                // The client left: dropping the call closes the leased
                // connection, which is what unblocks Redis.
                () = tx.closed() => {}
            }
            entry.set_blocked_on(None);
        });
        self.barriers += 1;
        pending.push_back(Pending::Barrier(rx, Some(meta)));
    }
}

impl Session {
    /// Whether a routed command is a script that runs on a lease: one may
    /// run long, and on a shared connection it would hold every command
    /// queued behind it (SCRIPT KILL and the BUSY replies Redis gives
    /// meanwhile included). A tracking client keeps its own connections,
    /// which track its reads.
    fn script_on_lease(&self, info: Option<&CommandInfo>) -> bool {
        self.tracking.is_none() && info.is_some_and(|i| plan::is_script(&i.name))
    }

    /// Whether the command runs as a barrier (`plan::waits_for_earlier`, a
    /// script on a lease, a command waiting for Redis's permission), so it
    /// must not overtake the client's earlier commands.
    fn is_barrier(&self, plan: &Plan, info: Option<&CommandInfo>, req: &Request) -> bool {
        match plan {
            Plan::Route { .. } => self.script_on_lease(info),
            Plan::Local(_) => self.needs_permit(info, req),
            plan => plan::waits_for_earlier(plan, info, req),
        }
    }

    /// ACL passthrough: a command the proxy answers itself (CLIENT KILL,
    /// MONITOR, SLOWLOG, ...) that Redis's ACL gates as `@admin` or
    /// `@dangerous` runs only once Redis says the client's user may run it.
    /// As in Redis, a wrong arity is answered first.
    fn needs_permit(&self, info: Option<&CommandInfo>, req: &Request) -> bool {
        self.shared.settings.auth_mode == AuthMode::Passthrough
            && info.is_some_and(|i| {
                i.acl
                    .intersects(AclCategories::ADMIN | AclCategories::DANGEROUS)
                    && i.arity_ok(req.argc())
            })
    }
}

const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Whether a new client may run commands before AUTH: in passthrough
/// Redis decides (the client runs without credentials); in proxy mode
/// only when the proxy has no users of its own.
fn starts_authed(shared: &Shared) -> bool {
    shared.settings.auth_mode == AuthMode::Passthrough || !shared.settings.auth.required()
}

/// AUTH or HELLO with AUTH, checked or being checked.
enum Step {
    Now(Bytes),
    Later(oneshot::Receiver<Login>),
}

/// A checked login and what its command does once accepted.
struct Login {
    outcome: Result<Accepted, Bytes>,
    then: After,
}

impl Login {
    fn failed_task() -> Self {
        Self {
            outcome: Err(reply::error("ERR redirector: internal task failed")),
            then: After::Auth,
        }
    }
}

enum After {
    Auth,
    Hello(Hello),
}

/// HELLO's options besides AUTH.
struct Hello {
    protocol: Protocol,
    name: Option<Bytes>,
}

/// What a routed command's first attempt left the client waiting for: its
/// reply, or a task following a redirect (MOVED, ASK) or retrying (a lost
/// connection).
fn upstream_settled(
    shared: &Arc<Shared>,
    routed: Routed,
    meta: Meta,
    verdict: exec::Verdict,
) -> Pending {
    match verdict {
        exec::Verdict::Done(reply) => Pending::Ready(reply.raw, Some(meta.taking(routed.payload))),
        verdict => {
            let meta = meta.keeping(&routed.payload);
            Pending::Task(
                spawn_complete(Arc::clone(shared), routed, verdict),
                Some(meta),
            )
        }
    }
}

/// Sets `timer` to fire at `deadline`, making it on first use only.
fn arm(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, deadline: tokio::time::Instant) {
    match timer.as_mut() {
        Some(timer) => timer.as_mut().reset(deadline),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
}

/// Writes as much of `out` as the socket takes without waiting, and keeps
/// the rest. A full write clears `out` (keeping its whole allocation);
/// `Err` when the client is gone.
fn write_owed(socket: &impl ClientSocket, out: &mut BytesMut) -> std::io::Result<()> {
    while !out.is_empty() {
        match socket.try_write(out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) if n == out.len() => out.clear(),
            Ok(n) => bytes::Buf::advance(out, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Queues a request whose parts went out from sequence number `first` on:
/// its reply is merged once every part has answered.
fn gather_from(
    pending: &mut VecDeque<Pending>,
    first: u64,
    protocol: Protocol,
    work: gather::Work,
    meta: Meta,
) {
    let gather = Gather {
        first,
        protocol,
        work,
    };
    pending.push_back(Pending::Gather(Box::new(gather), meta));
}

fn spawn_raw(work: impl Future<Output = Bytes> + Send + 'static) -> oneshot::Receiver<Bytes> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(work.await);
    });
    rx
}

fn spawn_reply(work: impl Future<Output = Reply> + Send + 'static) -> oneshot::Receiver<Bytes> {
    spawn_raw(async move { work.await.raw })
}

// The tasks a routed command may need, built out of line: a future is
// built on its spawner's stack at its full size, and inlined into
// `route` and `drain` these two made their frames 7.7 and 6.4 KiB.

#[cold]
#[inline(never)]
fn spawn_complete(
    shared: Arc<Shared>,
    routed: Routed,
    first: exec::Verdict,
) -> oneshot::Receiver<Bytes> {
    spawn_reply(async move { exec::complete(shared, routed, first).await })
}

#[cold]
#[inline(never)]
fn spawn_with_caching(
    shared: Arc<Shared>,
    routed: Routed,
    caching: Bytes,
) -> oneshot::Receiver<Bytes> {
    spawn_reply(async move { exec::with_caching(shared, routed, caching).await })
}

/// The sources a session waits on besides its socket and timers, in this
/// order: the registry's attention, the oldest owed reply, pub/sub,
/// MONITOR, the end of a CLIENT PAUSE. The session's fields, not the
/// session: its driver holds the others.
#[inline(always)]
fn poll_held<U: Future<Output = ()> + ?Sized>(
    entry: &ClientEntry,
    inbox: &Inbox,
    pending: &mut VecDeque<Pending>,
    pubsub: &mut Option<pubsub::Handle>,
    monitor: &mut Option<mpsc::UnboundedReceiver<Bytes>>,
    unpaused: Option<&mut Pin<Box<U>>>,
    cx: &mut Context<'_>,
) -> Poll<Event> {
    if entry.poll_attention(cx).is_ready() {
        return Poll::Ready(Event::Attention);
    }
    if let Poll::Ready(resolution) = poll_head(pending.front_mut(), inbox, cx) {
        return Poll::Ready(Event::Resolved(resolution));
    }
    if let Some(handle) = pubsub.as_mut()
        && let Poll::Ready(out) = handle.out.poll_recv(cx)
    {
        return Poll::Ready(Event::PubSub(out));
    }
    if let Some(feed) = monitor.as_mut()
        && let Poll::Ready(line) = feed.poll_recv(cx)
    {
        return Poll::Ready(Event::Monitor(line));
    }
    if let Some(unpaused) = unpaused
        && unpaused.as_mut().poll(cx).is_ready()
    {
        return Poll::Ready(Event::Unpaused);
    }
    Poll::Pending
}

/// Whether what the oldest owed reply waits for has come: the inbox's
/// wake-up, or its task's answer (never, when nothing waits).
#[inline(always)]
fn poll_head(front: Option<&mut Pending>, inbox: &Inbox, cx: &mut Context<'_>) -> Poll<Resolution> {
    match front {
        Some(Pending::Upstream { .. } | Pending::Gather(..)) => {
            inbox.poll_filled(cx).map(|()| Resolution::Wake)
        }
        Some(Pending::Task(rx, _) | Pending::Barrier(rx, _)) => Pin::new(rx).poll(cx).map(|r| {
            Resolution::Task(
                r.unwrap_or_else(|_| reply::error("ERR redirector: internal task failed")),
            )
        }),
        Some(Pending::Login(rx, _)) => Pin::new(rx)
            .poll(cx)
            .map(|r| Resolution::Login(r.unwrap_or_else(|_| Login::failed_task()))),
        Some(Pending::Permit(rx, ..)) => Pin::new(rx).poll(cx).map(|r| {
            Resolution::Permit(
                r.unwrap_or_else(|_| Err(reply::error("ERR redirector: internal task failed"))),
            )
        }),
        _ => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_session_holds_no_reply_queue_and_a_busy_one_reuses_a_lent_one() {
        let mut queue = lend_queue();
        assert!(queue.capacity() >= 1);
        queue.push_back(Pending::Close);
        give_back_queue(&mut queue);
        assert_eq!(queue.len(), 1, "a queue still owing replies is kept");
        queue.clear();
        let lent = queue.as_slices().0.as_ptr();
        give_back_queue(&mut queue);
        assert_eq!(queue.capacity(), 0, "nothing allocated while idle");
        let again = lend_queue();
        assert_eq!(
            again.as_slices().0.as_ptr(),
            lent,
            "the same allocation, lent again"
        );
        let mut grown: VecDeque<Pending> = VecDeque::with_capacity(1024);
        give_back_queue(&mut grown);
        assert!(
            lend_queue().capacity() < 1024,
            "a long pipeline's queue is freed"
        );
    }

    #[test]
    fn one_routed_command_goes_upstream_as_the_clients_own_bytes() {
        let raw = Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n");
        let batched = Batched {
            node: "127.0.0.1:7000".parse().unwrap(),
            payload: Payload::Shared(raw.clone()),
            seqs: smallvec::smallvec![7],
        };
        assert_eq!(batched.payload.as_ptr(), raw.as_ptr(), "shared, not copied");
        assert!(!batched.seqs.spilled(), "the sequence number is inline");
    }

    #[test]
    fn commands_for_one_node_are_joined_in_request_order() {
        let first = Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n");
        let second = Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n");
        let mut batched = Batched {
            node: "127.0.0.1:7000".parse().unwrap(),
            payload: Payload::Shared(first.clone()),
            seqs: smallvec::smallvec![3],
        };
        batched.add(&second, 4);
        batched.add(&first, 9);
        assert_eq!(&batched.seqs[..], &[3, 4, 9]);
        let mut expected = first.to_vec();
        expected.extend_from_slice(&second);
        expected.extend_from_slice(&first);
        assert_eq!(&batched.payload[..], &expected[..]);
        assert!(
            batched.seqs.capacity() >= 8,
            "one lent list holds a pipeline's share of a node"
        );
    }

    #[test]
    fn a_flushed_batch_list_is_lent_again_on_the_same_thread() {
        let mut batch = lend_batch();
        batch.reserve(2);
        let ptr = batch.as_ptr();
        give_back_batch(batch);
        let again = lend_batch();
        assert_eq!(again.as_ptr(), ptr, "the same allocation, reused");
        // Taken: the next one is fresh until a flush gives one back.
        assert_eq!(lend_batch().capacity(), 0);
    }
}
