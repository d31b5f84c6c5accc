//! A shared, multiplexed, pipelined connection to one Redis node.
//!
//! Any number of client sessions hand it [`Job`]s. The writer (a task of
//! its own) coalesces every job queued by the end of the worker's turn
//! into one write, recording each job's reply sink in order; the reader
//! matches replies to sinks in the same order (Redis answers a
//! connection's commands in order). A job's payload is written
//! contiguously, so multi-command units such as `ASKING` + a command can
//! never be interleaved with other clients' commands.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::{mpsc, oneshot},
};

use super::{
    UpstreamError,
    buffers::{self, Spares},
    dial::{Dialer, UpstreamRead, UpstreamWrite},
    health::Health,
    metrics::{ProxyMetrics, UpstreamBatching},
    wakeup::Wakeup,
};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
};

/// How many bytes of queued jobs one write may coalesce.
const MAX_BATCH: usize = 256 * 1024;

/// What a job resolves to: its reply frames, in order.
pub type JobResult = Result<Vec<Reply>, UpstreamError>;

/// Where a job's replies go.
pub enum Sink {
    /// All of them, together, to one waiter (tasks: retries, fan-outs).
    Oneshot(oneshot::Sender<JobResult>),
    /// One reply per sequence number, into a session's inbox: a client's
    /// whole pipeline to a node travels as one job and is answered with one
    /// wake-up, not one channel per command.
    Inbox { inbox: Arc<Inbox>, seqs: Seqs },
}

/// The sequence numbers a job's replies go to: inline for the usual one or
/// two commands, so a routed command allocates nothing for them; a
/// pipeline's (16 commands over 3 masters: about 5 per node) take a list
/// lent by the worker ([`lend_seqs`]). Inline room for eight made every job
/// larger to move: 5% more instructions per W1 GET under callgrind.
pub type Seqs = smallvec::SmallVec<[u64; 2]>;

/// Sequence numbers a lent list has room for.
const SEQS_ROOM: usize = 8;
/// Lists kept per worker thread, and the longest kept.
const SEQS_KEPT: usize = 256;
const SEQS_LARGEST_KEPT: usize = 64;

thread_local! {
    static SPARE_SEQS: Spares<Vec<u64>> = const { Spares::new(SEQS_KEPT) };
}

/// A job's sequence numbers, `seqs` first, in a list with room for more.
pub fn lend_seqs(seqs: &[u64]) -> Seqs {
    let mut list = SPARE_SEQS
        .with(Spares::take)
        .unwrap_or_else(|| Vec::with_capacity(SEQS_ROOM));
    list.extend_from_slice(seqs);
    Seqs::from_vec(list)
}

/// Takes a finished job's list back.
fn give_back_seqs(seqs: Seqs) {
    if !seqs.spilled() || seqs.capacity() > SEQS_LARGEST_KEPT {
        return;
    }
    let mut list = seqs.into_vec();
    list.clear();
    SPARE_SEQS.with(|spare| spare.keep(list));
}

/// A job's bytes.
pub enum Payload {
    /// One command's, as the client sent them: shared, not copied.
    Shared(Bytes),
    /// Several commands joined in a buffer lent by the worker's pool, given
    /// back once the writer has copied it: a pipeline's job allocates
    /// nothing (callgrind: three allocations per joined job were 4% of a
    /// pipelined GET).
    Joined(BytesMut),
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Self::Shared(bytes)
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Shared(bytes) => bytes,
            Self::Joined(buf) => buf,
        }
    }
}

impl Sink {
    fn fail(self, error: UpstreamError, delivered: usize) {
        match self {
            Self::Oneshot(tx) => {
                let _ = tx.send(Err(error));
            }
            Self::Inbox { inbox, seqs } => {
                for &seq in &seqs[delivered..] {
                    inbox.put(seq, Err(error.clone()));
                }
            }
        }
    }
}

pub struct Job {
    /// One or more encoded commands.
    pub payload: Payload,
    /// How many reply frames the payload produces.
    pub replies: usize,
    pub sink: Sink,
    /// HELLO on a private connection: its replies are read in this
    /// protocol, and so is everything after.
    pub switch_to: Option<Protocol>,
}

impl Job {
    pub fn new(payload: Bytes, replies: usize) -> (Self, oneshot::Receiver<JobResult>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                payload: payload.into(),
                replies,
                sink: Sink::Oneshot(tx),
                switch_to: None,
            },
            rx,
        )
    }

    /// Fails a job that could not be queued.
    pub fn fail(self, error: UpstreamError) {
        self.sink.fail(error, 0);
    }
}

/// A session's reply slots, filled by upstream readers in any order and
/// taken by the session in request order.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    /// `state.ready` as of the last lock's release: the session looks here
    /// before it locks, and a drain right after a dispatch, whose replies
    /// cannot have come yet, takes no lock.
    ready: AtomicUsize,
    /// Woken when the session has something to write (`InboxState::fill`).
    filled: Wakeup,
}

/// The inbox's state, locked; its release publishes `ready`.
struct Slots<'a> {
    state: MutexGuard<'a, InboxState>,
    published: &'a AtomicUsize,
}

impl std::ops::Deref for Slots<'_> {
    type Target = InboxState;
    fn deref(&self) -> &InboxState {
        &self.state
    }
}

impl std::ops::DerefMut for Slots<'_> {
    fn deref_mut(&mut self) -> &mut InboxState {
        &mut self.state
    }
}

impl Drop for Slots<'_> {
    fn drop(&mut self) {
        // Still under the lock: a reader that sees a count sees its
        // replies when it locks.
        self.published.store(self.state.ready, Ordering::Release);
    }
}

/// How many replies come in a row at the head before the session is woken
/// for them even while others are still owed: a turn's worth.
const WAKE_AFTER: usize = super::TURN;

#[derive(Default)]
struct InboxState {
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Result<Reply, UpstreamError>>>,
    /// How many slots from `slots[0]` on have their reply, in a row.
    ready: usize,
}

impl InboxState {
    /// Stores the reply for `seq`. Returns whether to wake the session:
    /// when every slot it opened has its reply, or a turn's worth in a row
    /// at the head have. A session opens slots and sends their commands in
    /// one step (`flush_batch`, no await between), so the last reply always
    /// comes. Waking at each delivery instead cost up to three wake-ups and
    /// 1.25 client writes per 16-command read spread over three nodes, where
    /// Redis writes once. False too if its slot is gone or was never opened.
    fn fill(&mut self, seq: u64, reply: Result<Reply, UpstreamError>) -> bool {
        let Some(index) = seq.checked_sub(self.base) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return false;
        };
        *slot = Some(reply);
        if index as usize != self.ready {
            return false;
        }
        let before = self.ready;
        while self.slots.get(self.ready).is_some_and(Option::is_some) {
            self.ready += 1;
        }
        self.ready == self.slots.len() || (before < WAKE_AFTER && self.ready >= WAKE_AFTER)
    }
}

impl Inbox {
    /// Opens slots up to sequence number `end` (exclusive). A session
    /// numbers a read's commands itself and opens their slots with one call,
    /// before any of them is sent.
    pub fn open_until(&self, end: u64) {
        let mut state = self.slots();
        let open = state.base + state.slots.len() as u64;
        // One slot for a request-reply client: grown by default to four,
        // they would stay allocated while it idles.
        if state.slots.capacity() == 0 {
            state
                .slots
                .reserve_exact(usize::try_from(end.saturating_sub(open)).unwrap_or(1));
        }
        for _ in open..end {
            state.slots.push_back(None);
        }
    }

    pub fn put(&self, seq: u64, reply: Result<Reply, UpstreamError>) {
        if self.slots().fill(seq, reply) {
            self.wake();
        }
    }

    /// The slots, locked: a reader fills a job's replies under one lock.
    fn slots(&self) -> Slots<'_> {
        Slots {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            published: &self.ready,
        }
    }

    /// Whether the oldest open slot's reply may have come. False means
    /// [`Self::take_arrived`] would take nothing now; a reply that comes
    /// after the look wakes the session as ever.
    pub fn any_arrived(&self) -> bool {
        self.ready.load(Ordering::Acquire) > 0
    }

    fn wake(&self) {
        self.filled.wake();
    }

    /// Hands `each` the replies that have come for `first` (the oldest
    /// slot) and the slots after it, in order, up to `most` and up to the
    /// first that has not come: the replies of a pipeline's commands, under
    /// one lock (`each` must not use this inbox). Returns how many.
    pub fn take_arrived(
        &self,
        first: u64,
        most: usize,
        mut each: impl FnMut(Result<Reply, UpstreamError>),
    ) -> usize {
        let mut state = self.slots();
        if state.base != first {
            return 0;
        }
        let mut taken = 0;
        while taken < most {
            let Some(reply) = state.slots.front_mut().and_then(Option::take) else {
                break;
            };
            state.slots.pop_front();
            each(reply);
            taken += 1;
        }
        state.base += taken as u64;
        state.ready -= taken;
        taken
    }

    /// The replies for `first` (the oldest slot) and the `count - 1` after
    /// it, once all have arrived: the parts of one gathered command.
    pub fn take_run(&self, first: u64, count: usize) -> Option<Vec<Result<Reply, UpstreamError>>> {
        let mut state = self.slots();
        if state.base != first
            || state.slots.len() < count
            || state.slots.iter().take(count).any(Option::is_none)
        {
            return None;
        }
        state.base += count as u64;
        state.ready -= count;
        Some(state.slots.drain(..count).flatten().collect())
    }

    /// Ready after a wake-up since the last time it was (`InboxState::fill`
    /// says when; possibly for replies already taken: check again).
    pub fn poll_filled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.filled.poll(cx)
    }
}

struct InFlight {
    remaining: usize,
    delivered: usize,
    replies: Vec<Reply>,
    sink: Sink,
    switch_to: Option<Protocol>,
}

/// A handle to a running connection; cheap to clone.
#[derive(Clone)]
pub struct Conn {
    tx: mpsc::UnboundedSender<Job>,
    closed: Arc<AtomicBool>,
}

impl Conn {
    /// Starts connecting in the background; jobs sent meanwhile wait.
    pub fn spawn(
        addr: SocketAddr,
        protocol: Protocol,
        dialer: Arc<Dialer>,
        metrics: Arc<ProxyMetrics>,
        health: Arc<Health>,
    ) -> Self {
        Self::start(addr, protocol, dialer, metrics, health, None)
    }

    /// A connection of one client's own (CLIENT TRACKING): Redis's pushes
    /// on it go to `pushes`, and `first` (tracking on) is written before
    /// any job. When it ends, `pushes` gets a null invalidation: what it
    /// tracked is gone, so the client must flush.
    pub fn spawn_private(
        addr: SocketAddr,
        protocol: Protocol,
        (dialer, metrics, health): (Arc<Dialer>, Arc<ProxyMetrics>, Arc<Health>),
        pushes: mpsc::UnboundedSender<Reply>,
        first: oneshot::Receiver<Job>,
    ) -> Self {
        Self::start(
            addr,
            protocol,
            dialer,
            metrics,
            health,
            Some(Private { pushes, first }),
        )
    }

    fn start(
        addr: SocketAddr,
        protocol: Protocol,
        dialer: Arc<Dialer>,
        metrics: Arc<ProxyMetrics>,
        health: Arc<Health>,
        private: Option<Private>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let conn = Self {
            tx,
            closed: Arc::clone(&closed),
        };
        let ends = Ends {
            addr,
            protocol,
            metrics,
            health,
            closed,
        };
        tokio::spawn(run(ends, dialer, rx, private));
        conn
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Queues a job; gives it back if the connection is gone.
    pub fn send(&self, job: Job) -> Result<(), Job> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(job);
        }
        self.tx.send(job).map_err(|e| e.0)
    }
}

/// A private connection's extras.
struct Private {
    pushes: mpsc::UnboundedSender<Reply>,
    first: oneshot::Receiver<Job>,
}

/// What a connection task reports to.
struct Ends {
    addr: SocketAddr,
    protocol: Protocol,
    metrics: Arc<ProxyMetrics>,
    health: Arc<Health>,
    closed: Arc<AtomicBool>,
}

/// A RESP3 `invalidate` push with no keys: "flush everything".
pub const FLUSH_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

async fn run(
    ends: Ends,
    dialer: Arc<Dialer>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    private: Option<Private>,
) {
    let Ends {
        addr,
        protocol,
        metrics,
        health,
        closed,
    } = ends;
    let (pushes, first) = match private {
        Some(Private { pushes, first }) => (Some(pushes), Some(first)),
        None => (None, None),
    };
    let flush = |pushes: &Option<mpsc::UnboundedSender<Reply>>| {
        if let Some(pushes) = pushes {
            let _ = pushes.send(Reply::local(Bytes::from_static(FLUSH_ALL)));
        }
    };
    let (stream, leftover) = match dialer.open(addr, protocol).await {
        Ok(opened) => {
            health.connected(addr);
            opened
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "upstream connect failed");
            metrics.upstream_connect_failed(addr);
            health.failed(addr);
            closed.store(true, Ordering::Relaxed);
            rx.close();
            while let Ok(job) = rx.try_recv() {
                job.fail(UpstreamError::NotSent(addr, e.to_string()));
            }
            flush(&pushes);
            return;
        }
    };
    metrics.upstream_opened(addr);
    let batching = metrics.upstream_batching(addr);
    let (reader, writer) = stream.into_split();
    let inflight = Arc::new(Mutex::new(VecDeque::<InFlight>::new()));
    // The writer is a task of its own: a reply read wakes only the reader,
    // so the writer runs where its first job of a turn queued it, behind
    // the sessions already queued (see `write_jobs`).
    let (stop_writing, stopped) = oneshot::channel::<()>();
    let mut writing = tokio::spawn(writer_task(
        writer,
        first,
        rx,
        Arc::clone(&inflight),
        batching,
        stopped,
    ));
    // The queue comes back with the writer, to fail what is left in it; a
    // writer that panicked (or a runtime shutting down) takes it along.
    let (outcome, joined) = tokio::select! {
        r = read_replies(reader, leftover, protocol, &inflight, pushes.as_ref()) => {
            drop(stop_writing);
            (r, (&mut writing).await.map(|(_, rx)| rx))
        }
        joined = &mut writing => match joined {
            Ok((r, rx)) => (r, Ok(rx)),
            Err(e) => (Err(format!("writer failed: {e}")), Err(e)),
        },
    };
    let rx = joined
        .inspect_err(|error| tracing::error!(%addr, %error, "upstream writer task failed"))
        .ok();
    closed.store(true, Ordering::Relaxed);
    metrics.upstream_closed(addr);
    // Let go of (no handles left) or lost: only a loss costs the client
    // what this connection tracked.
    let lost = outcome.is_err();
    let reason = match outcome {
        Ok(()) => "connection closed".to_string(),
        Err(e) => e,
    };
    tracing::debug!(%addr, reason, "upstream connection ended");
    // Sent jobs may or may not have run; queued ones surely did not.
    for job in inflight.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        job.sink
            .fail(UpstreamError::Lost(addr, reason.clone()), job.delivered);
    }
    if let Some(mut rx) = rx {
        rx.close();
        while let Ok(job) = rx.try_recv() {
            job.fail(UpstreamError::NotSent(addr, reason.clone()));
        }
    }
    if lost {
        flush(&pushes);
    }
}

/// The writer task: its outcome, and the queue back, to fail what is left.
async fn writer_task(
    writer: UpstreamWrite,
    first: Option<oneshot::Receiver<Job>>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    batching: UpstreamBatching,
    stopped: oneshot::Receiver<()>,
) -> (Result<(), String>, mpsc::UnboundedReceiver<Job>) {
    let outcome = write_jobs(writer, first, &mut rx, &inflight, &batching, stopped).await;
    (outcome, rx)
}

/// One of the writer's waits: `wait`'s output, or `None` once the reader
/// has ended (the stop is looked at first).
async fn unless_stopped<F: std::future::Future>(
    stopped: &mut oneshot::Receiver<()>,
    wait: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = stopped => None,
        out = wait => Some(out),
    }
}

async fn write_jobs(
    mut writer: UpstreamWrite,
    mut first: Option<oneshot::Receiver<Job>>,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    inflight: &Mutex<VecDeque<InFlight>>,
    batching: &UpstreamBatching,
    mut stopped: oneshot::Receiver<()>,
) -> Result<(), String> {
    let mut batch = BytesMut::with_capacity(16 * 1024);
    // The jobs' bytes, let go together once written: a locked decrement
    // of a reference count right after each copy waits for its stores.
    let mut copied: Vec<Bytes> = Vec::new();
    loop {
        // The reader ended (its outcome is the connection's): stop, but
        // only in the waits below (`unless_stopped`), where every job is
        // still queued or already in flight, so each is failed as not sent
        // or as lost. Stopped during the yield further down, a taken job
        // was dropped unanswered and its client waited forever (seen once
        // in the HBONE peer-restart test). A write in progress ends first:
        // on a broken connection, which is what ends a reader, it fails at
        // once.
        // A private connection's first job goes out before any other.
        let next = match first.take() {
            Some(gate) => {
                let Some(job) = unless_stopped(&mut stopped, gate).await else {
                    return Ok(());
                };
                Some(job.map_err(|_| "setup abandoned".to_string())?)
            }
            None => {
                let Some(job) = unless_stopped(&mut stopped, rx.recv()).await else {
                    return Ok(());
                };
                job
            }
        };
        // All handles dropped (the pool let go of this connection): finish
        // once the replies already owed have arrived.
        let Some(first) = next else {
            while !inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                let nap = tokio::time::sleep(std::time::Duration::from_millis(10));
                if unless_stopped(&mut stopped, nap).await.is_none() {
                    return Ok(());
                }
            }
            return Ok(());
        };
        // The write waits until the sessions queued on this worker behind
        // this task have run (tokio polls a yielded task once it has run
        // out of queued ones, or after `event_interval` of them, and polled
        // for I/O), so their jobs join it: one write of many clients' jobs
        // costs Redis one read. It is the loop predixy and Redis itself
        // run: handle every ready event, then flush. When reader and writer
        // were one task, woken by a reply in the middle of a turn, it wrote
        // at once and left the rest of the turn's jobs for another write.
        // W1 (50 clients, one command each): Redis read 5.5 commands per
        // read then, 8.3 with this yield, 8.6 with the writer a task of its
        // own. Writing at once when nothing was owed (Nagle's rule) read
        // 6.3: after each turn's replies the first job found the
        // connection idle and went alone.
        tokio::task::yield_now().await;
        batch.clear();
        let mut commands = 0;
        {
            let mut queue = inflight.lock().unwrap_or_else(|e| e.into_inner());
            let mut job = first;
            loop {
                batch.extend_from_slice(&job.payload);
                match job.payload {
                    Payload::Shared(bytes) => copied.push(bytes),
                    Payload::Joined(buf) => buffers::give_back(buf),
                }
                commands += job.replies;
                let collect = matches!(job.sink, Sink::Oneshot(_));
                queue.push_back(InFlight {
                    remaining: job.replies,
                    delivered: 0,
                    replies: Vec::with_capacity(if collect { job.replies } else { 0 }),
                    sink: job.sink,
                    switch_to: job.switch_to,
                });
                if batch.len() >= MAX_BATCH {
                    break;
                }
                match rx.try_recv() {
                    Ok(next) => job = next,
                    Err(_) => break,
                }
            }
        }
        writer
            .write_all(&batch)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        batching.wrote(commands);
        copied.clear();
    }
}

async fn read_replies(
    mut reader: UpstreamRead,
    mut buf: BytesMut,
    mut protocol: Protocol,
    inflight: &Mutex<VecDeque<InFlight>>,
    pushes: Option<&mpsc::UnboundedSender<Reply>>,
) -> Result<(), String> {
    // Sessions that got replies from the current read, woken once each.
    let mut to_wake: Vec<Arc<Inbox>> = Vec::new();
    loop {
        let decoded = deliver(&mut buf, &mut protocol, inflight, &mut to_wake, pushes);
        for inbox in to_wake.drain(..) {
            inbox.wake();
        }
        decoded?;
        if buf.capacity() - buf.len() < 8 * 1024 {
            buf.reserve(32 * 1024);
        }
        if reader
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read failed: {e}"))?
            == 0
        {
            return Err("closed by Redis".into());
        }
    }
}

/// Hands every complete reply in `buf` to its job, in order.
fn deliver(
    buf: &mut BytesMut,
    protocol: &mut Protocol,
    inflight: &Mutex<VecDeque<InFlight>>,
    to_wake: &mut Vec<Arc<Inbox>>,
    pushes: Option<&mpsc::UnboundedSender<Reply>>,
) -> Result<(), String> {
    // One lock for every reply of this read (the writer, in the same task,
    // takes it only to queue what it sends).
    let mut queue = inflight.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        // Only private connections switch protocol (their client's HELLO):
        // shared ones skip the look at the queue.
        if pushes.is_some()
            && !buf.is_empty()
            && let Some(front) = queue.front_mut()
            && front.delivered == 0
            && let Some(next) = front.switch_to.take()
        {
            *protocol = next;
        }
        let Some(reply) = reply::decode(buf, *protocol).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if reply.kind == reply::ReplyKind::Push {
            // A private connection's pushes are its client's (tracking
            // invalidations); shared connections never ask for any.
            if let Some(pushes) = pushes {
                let _ = pushes.send(reply);
            }
            continue;
        }
        let Some(front) = queue.front_mut() else {
            return Err("reply with no request outstanding".into());
        };
        match &front.sink {
            Sink::Oneshot(_) => {
                front.replies.push(reply);
                front.delivered += 1;
                front.remaining -= 1;
            }
            Sink::Inbox { inbox, seqs } => {
                // This job's other replies already read go in under the
                // same lock (a shared connection gets no pushes, and
                // never switches protocol).
                let mut slots = inbox.slots();
                let mut wake = slots.fill(seqs[front.delivered], Ok(reply));
                front.delivered += 1;
                front.remaining -= 1;
                while front.remaining > 0 && pushes.is_none() {
                    let Some(next) = reply::decode(buf, *protocol).map_err(|e| e.to_string())?
                    else {
                        break;
                    };
                    if next.kind == reply::ReplyKind::Push {
                        continue;
                    }
                    wake |= slots.fill(seqs[front.delivered], Ok(next));
                    front.delivered += 1;
                    front.remaining -= 1;
                }
                drop(slots);
                if wake && !to_wake.last().is_some_and(|last| Arc::ptr_eq(last, inbox)) {
                    to_wake.push(Arc::clone(inbox));
                }
            }
        }
        if front.remaining == 0 {
            let done = queue.pop_front().expect("front exists");
            match done.sink {
                // The client may have gone; its reply is simply dropped.
                Sink::Oneshot(tx) => {
                    let _ = tx.send(Ok(done.replies));
                }
                Sink::Inbox { seqs, .. } => give_back_seqs(seqs),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &'static [u8]) -> Result<Reply, UpstreamError> {
        Ok(Reply::local(Bytes::from_static(raw)))
    }

    #[test]
    fn a_finished_jobs_sequence_list_is_lent_again_and_a_grown_one_is_freed() {
        let seqs = lend_seqs(&[1, 2]);
        assert!(seqs.spilled() && seqs.capacity() >= SEQS_ROOM);
        let ptr = seqs.as_ptr();
        give_back_seqs(seqs);
        let again = lend_seqs(&[5]);
        assert_eq!(&again[..], &[5]);
        assert_eq!(again.as_ptr(), ptr, "the same list, reused");
        let kept = || SPARE_SEQS.with(Spares::count);
        let grown = lend_seqs(&[0; SEQS_LARGEST_KEPT + 1]);
        give_back_seqs(grown);
        assert_eq!(kept(), 0, "a list grown by a long pipeline is freed");
        give_back_seqs(again);
        assert_eq!(kept(), 1);
    }

    #[test]
    fn a_session_is_woken_once_every_reply_it_is_owed_has_come_not_at_each_one() {
        let mut state = InboxState::default();
        state.slots.extend([None, None, None, None]);
        assert!(!state.fill(3, reply(b":3\r\n")), "the head has not come");
        assert!(!state.fill(0, reply(b":0\r\n")), "1 and 2 are still owed");
        assert!(!state.fill(2, reply(b":2\r\n")));
        assert!(state.fill(1, reply(b":1\r\n")), "all four have come");
        assert_eq!(state.ready, 4);
        assert!(!state.fill(9, reply(b":9\r\n")), "never opened");
    }

    #[test]
    fn the_lock_free_look_says_whether_the_oldest_reply_has_come() {
        let inbox = Inbox::default();
        inbox.open_until(3);
        assert!(!inbox.any_arrived(), "nothing has come");
        inbox.put(1, reply(b":1\r\n"));
        assert!(!inbox.any_arrived(), "the oldest is still owed");
        inbox.put(0, reply(b":0\r\n"));
        assert!(inbox.any_arrived());
        let mut taken = Vec::new();
        assert_eq!(inbox.take_arrived(0, 3, |r| taken.push(r)), 2);
        assert_eq!(taken.len(), 2);
        assert!(!inbox.any_arrived(), "both were taken; the third is owed");
        inbox.put(2, reply(b":2\r\n"));
        assert!(inbox.any_arrived());
        assert_eq!(inbox.take_run(2, 1).map(|r| r.len()), Some(1));
        assert!(!inbox.any_arrived());
    }

    #[test]
    fn a_streaming_client_is_woken_for_a_turns_worth_of_replies_before_the_rest() {
        let inbox = Inbox::default();
        let opened = WAKE_AFTER as u64 * 2;
        inbox.open_until(opened);
        let wakes = (0..opened)
            .filter(|&seq| inbox.slots().fill(seq, reply(b"+OK\r\n")))
            .collect::<Vec<_>>();
        assert_eq!(wakes, [WAKE_AFTER as u64 - 1, opened - 1]);
        assert_eq!(inbox.take_arrived(0, WAKE_AFTER, |_| {}), WAKE_AFTER);
        assert_eq!(inbox.slots().ready, WAKE_AFTER, "the rest are still ready");
        inbox.open_until(opened + 1);
        assert!(
            inbox.slots().fill(opened, reply(b"+OK\r\n")),
            "the last owed reply wakes it"
        );
    }

    #[test]
    fn a_run_of_replies_is_taken_only_once_all_have_come_and_in_order() {
        let inbox = Inbox::default();
        inbox.open_until(4);
        assert!(inbox.take_run(0, 1).is_none(), "nothing came yet");
        inbox.put(0, reply(b":0\r\n"));
        inbox.put(2, reply(b":2\r\n"));
        assert!(inbox.take_run(1, 2).is_none(), "not the oldest slot");
        let take = |first, most| {
            let mut raws: Vec<Bytes> = Vec::new();
            let n = inbox.take_arrived(first, most, |r| raws.push(r.expect("replies").raw));
            assert_eq!(n, raws.len());
            raws
        };
        assert!(take(1, 4).is_empty(), "not the oldest slot");
        // Only what came in a row: 2 waits for 1.
        assert_eq!(take(0, 4), [&b":0\r\n"[..]]);
        assert!(inbox.take_run(1, 3).is_none(), "3 has not come");
        inbox.put(1, reply(b":1\r\n"));
        inbox.put(3, reply(b":3\r\n"));
        assert!(inbox.take_run(1, 4).is_none(), "more than were opened");
        let run: Vec<Bytes> = inbox
            .take_run(1, 3)
            .expect("all came")
            .into_iter()
            .map(|r| r.map(|r| r.raw).expect("replies"))
            .collect();
        assert_eq!(run, [&b":1\r\n"[..], b":2\r\n", b":3\r\n"]);
        inbox.open_until(8);
        for seq in 4..7 {
            inbox.put(seq, reply(b":n\r\n"));
        }
        // At most as many as asked for, and on from where they stopped.
        assert_eq!(take(4, 2).len(), 2);
        assert_eq!(take(6, 5).len(), 1, "7 has not come");
        assert!(take(7, 5).is_empty());
    }

    /// The writer takes a job, then yields so the turn's other jobs join
    /// its write. A reader that ends in between must not cost that job its
    /// answer: it goes out and is tracked in flight (then failed as lost
    /// with the connection), never dropped with the writer. Stopping the
    /// writer at the yield once left a client waiting forever (11f6d32).
    #[test]
    fn a_writer_stopped_while_it_holds_a_taken_job_sends_it_and_tracks_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The writer task of 6933159 raced the stop against the writer in a
        // `select!`, which polls its branches in a random order: it lost
        // the job in about half the tries.
        rt.block_on(async {
            for _ in 0..32 {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let node = listener.local_addr().expect("addr");
                let conn = tokio::net::TcpStream::connect(node).await.expect("connect");
                let (mut redis, _) = listener.accept().await.expect("accept");
                let (_read, write) = conn.into_split();
                let (tx, rx) = mpsc::unbounded_channel();
                let (job, mut answer) = Job::new(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 1);
                tx.send(job).map_err(|_| ()).expect("queued");
                let inflight = Arc::new(Mutex::new(VecDeque::new()));
                let (stop, stopped) = oneshot::channel();
                let batching = ProxyMetrics::detached().upstream_batching(node);
                let mut writer = std::pin::pin!(writer_task(
                    UpstreamWrite::Tcp(write),
                    None,
                    rx,
                    Arc::clone(&inflight),
                    batching,
                    stopped,
                ));
                let in_flight = || inflight.lock().expect("lock").len();
                // Neither answered nor dropped unanswered (a closed channel).
                let mut owed =
                    || matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty));
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(writer.as_mut().poll(cx)))
                        .await;
                assert!(first.is_pending(), "the writer waits at its yield");
                assert_eq!(in_flight(), 0, "the job is taken, and not in flight yet");
                assert!(owed(), "the job is held, not answered");
                drop(stop);
                let (outcome, _rx) = writer.await;
                assert_eq!(outcome, Ok(()));
                assert_eq!(
                    in_flight(),
                    1,
                    "the held job was written and is tracked in flight"
                );
                assert!(
                    owed(),
                    "its answer is still owed (the connection's end fails it as lost), not dropped"
                );
                let mut sent = [0u8; 14];
                redis.read_exact(&mut sent).await.expect("the node got it");
                assert_eq!(&sent, b"*1\r\n$4\r\nPING\r\n");
            }
        });
    }
}
