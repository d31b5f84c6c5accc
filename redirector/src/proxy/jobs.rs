//! What sessions and tasks hand an upstream connection, and how its
//! replies find their way back: [`Job`]s, their [`Sink`]s, a session's
//! [`Inbox`], and [`deliver`], which matches a read's replies to the jobs
//! in flight in order (Redis answers a connection's commands in order).
//! Both kinds of connection use it: a task pair per connection
//! (`upstream`) and an entry in the worker's loop (`host_upstream`).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Waker,
};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::{
    UpstreamError,
    buffers::{self, Spares},
    wakeup::Wakeup,
};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
};

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
pub(super) fn give_back_seqs(seqs: Seqs) {
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
    pub(super) fn fail(self, error: UpstreamError, delivered: usize) {
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
    /// The sequence number after the last one the session opened: kept
    /// out of the lock, so that opening a read's slots is one plain store
    /// (it was a lock and an unlock, two locked instructions per request).
    /// Readers see it through the job that carries the numbers.
    opened: AtomicU64,
    /// Woken when the session has something to write (`InboxState::fill`).
    filled: Wakeup,
    /// The worker loop hosting the session ([`ReadyList::id`](super::wakeup::ReadyList::id))
    /// and its token there: that loop's own upstream connections mark the
    /// inbox filled and have the loop step the session in the same turn,
    /// with no waker, lock or locked instruction on the way.
    host: OnceLock<(usize, usize)>,
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
    /// From `base` on, up to the last reply that came (later ones are
    /// added as their replies come: the session opens slots by number).
    slots: VecDeque<Option<Result<Reply, UpstreamError>>>,
    /// How many slots from `slots[0]` on have their reply, in a row.
    ready: usize,
}

impl InboxState {
    /// Stores the reply for `seq`, the session having opened slots up to
    /// `opened` (exclusive). Returns whether to wake the session: when
    /// every slot it opened has its reply, or a turn's worth in a row at
    /// the head have. A session opens slots and sends their commands in
    /// one step (`flush_batch`, no await between), so the last reply always
    /// comes. Waking at each delivery instead cost up to three wake-ups and
    /// 1.25 client writes per 16-command read spread over three nodes, where
    /// Redis writes once. False too if its slot is gone or was never opened.
    fn fill(&mut self, seq: u64, reply: Result<Reply, UpstreamError>, opened: u64) -> bool {
        let Some(index) = seq.checked_sub(self.base) else {
            return false;
        };
        let (Ok(index), Ok(open)) = (
            usize::try_from(index),
            usize::try_from(opened.saturating_sub(self.base)),
        ) else {
            return false;
        };
        if index >= open {
            return false;
        }
        if index >= self.slots.len() {
            // One slot for a request-reply client: grown by default to
            // four, they would stay allocated while it idles.
            if self.slots.capacity() == 0 {
                self.slots.reserve_exact(open);
            }
            self.slots.resize_with(index + 1, || None);
        }
        self.slots[index] = Some(reply);
        if index != self.ready {
            return false;
        }
        let before = self.ready;
        while self.slots.get(self.ready).is_some_and(Option::is_some) {
            self.ready += 1;
        }
        self.ready == open || (before < WAKE_AFTER && self.ready >= WAKE_AFTER)
    }
}

impl Inbox {
    /// Opens slots up to sequence number `end` (exclusive). A session
    /// numbers a read's commands itself and opens their slots with one call,
    /// before any of them is sent.
    pub fn open_until(&self, end: u64) {
        // Only the session stores it, and its numbers only grow: a plain
        // store (`fetch_max` would be a locked one). Release: a reader
        // that gets a job numbered below `end` sees it.
        debug_assert!(end >= self.opened.load(Ordering::Relaxed));
        self.opened.store(end, Ordering::Release);
    }

    /// Up to where slots are open, for [`InboxState::fill`].
    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }

    pub fn put(&self, seq: u64, reply: Result<Reply, UpstreamError>) {
        let opened = self.opened();
        if self.slots().fill(seq, reply, opened) {
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

    pub(super) fn wake(&self) {
        self.filled.wake();
    }

    /// Says the session is hosted by loop `loop_id` under `token`, and
    /// polls with `waker` alone; set once, before its first command is
    /// sent.
    pub fn hosted_by(&self, loop_id: usize, token: usize, waker: &Waker) {
        let _ = self.host.set((loop_id, token));
        self.filled.polled_with(waker);
    }

    /// Marks the inbox filled and returns the session's token, if loop
    /// `loop_id` hosts it and will step it; else wakes it as ever.
    pub(super) fn wake_in(&self, loop_id: usize) -> Option<usize> {
        match self.host.get() {
            Some(&(host, token)) if host == loop_id => {
                self.filled.mark();
                Some(token)
            }
            _ => {
                self.wake();
                None
            }
        }
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

/// A job written to a connection, owed its replies.
pub(super) struct InFlight {
    pub(super) remaining: usize,
    pub(super) delivered: usize,
    pub(super) replies: Vec<Reply>,
    pub(super) sink: Sink,
    pub(super) switch_to: Option<Protocol>,
}

impl Job {
    /// Copies the job's bytes to the end of a connection's output, and
    /// returns what stays owed. Shared bytes go to `copied`, to be let go
    /// together after the write (a locked decrement right after each copy
    /// waits for it); a lent buffer goes back to the worker's pool.
    pub(super) fn copy_into(self, out: &mut BytesMut, copied: &mut Vec<Bytes>) -> InFlight {
        out.extend_from_slice(&self.payload);
        match self.payload {
            Payload::Shared(bytes) => copied.push(bytes),
            Payload::Joined(buf) => buffers::give_back(buf),
        }
        let collect = matches!(self.sink, Sink::Oneshot(_));
        InFlight {
            remaining: self.replies,
            delivered: 0,
            replies: Vec::with_capacity(if collect { self.replies } else { 0 }),
            sink: self.sink,
            switch_to: self.switch_to,
        }
    }
}

/// Makes room in a connection's read buffer for the next read: Redis's
/// replies to a write of many clients' jobs come in one go.
pub(super) fn make_read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 8 * 1024 {
        buf.reserve(32 * 1024);
    }
}

/// Hands every complete reply in `buf` to its job, in order.
pub(super) fn deliver(
    buf: &mut BytesMut,
    protocol: &mut Protocol,
    queue: &mut VecDeque<InFlight>,
    to_wake: &mut Vec<Arc<Inbox>>,
    pushes: Option<&mpsc::UnboundedSender<Reply>>,
) -> Result<(), String> {
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
        let mut owes_wake = false;
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
                let opened = inbox.opened();
                let mut slots = inbox.slots();
                let mut wake = slots.fill(seqs[front.delivered], Ok(reply), opened);
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
                    wake |= slots.fill(seqs[front.delivered], Ok(next), opened);
                    front.delivered += 1;
                    front.remaining -= 1;
                }
                drop(slots);
                // A finished job hands its own reference over below: a
                // clone and a drop are a locked instruction each.
                owes_wake = wake && front.remaining == 0;
                if wake && front.remaining > 0 {
                    owe_wake(to_wake, Arc::clone(inbox));
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
                Sink::Inbox { inbox, seqs } => {
                    give_back_seqs(seqs);
                    if owes_wake {
                        owe_wake(to_wake, inbox);
                    }
                }
            }
        }
    }
}

/// Adds `inbox` to the ones to wake once the read is done, once for a run
/// of its jobs.
fn owe_wake(to_wake: &mut Vec<Arc<Inbox>>, inbox: Arc<Inbox>) {
    if !to_wake.last().is_some_and(|last| Arc::ptr_eq(last, &inbox)) {
        to_wake.push(inbox);
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
    fn a_read_owes_each_filled_inbox_one_wake_in_job_order_and_keeps_no_other_reference() {
        let (first, second) = (Arc::new(Inbox::default()), Arc::new(Inbox::default()));
        first.open_until(2);
        second.open_until(1);
        let job = |inbox: &Arc<Inbox>, seqs: &[u64]| InFlight {
            remaining: seqs.len(),
            delivered: 0,
            replies: Vec::new(),
            sink: Sink::Inbox {
                inbox: Arc::clone(inbox),
                seqs: lend_seqs(seqs),
            },
            switch_to: None,
        };
        let mut queue = VecDeque::from([job(&first, &[0]), job(&first, &[1]), job(&second, &[0])]);
        let mut buf = BytesMut::from(&b":1\r\n:2\r\n:3\r\n"[..]);
        let mut to_wake = Vec::new();
        deliver(
            &mut buf,
            &mut Protocol::Resp2,
            &mut queue,
            &mut to_wake,
            None,
        )
        .expect("delivered");
        assert!(queue.is_empty() && buf.is_empty());
        let woken: Vec<_> = to_wake.iter().map(Arc::as_ptr).collect();
        assert_eq!(woken, [Arc::as_ptr(&first), Arc::as_ptr(&second)]);
        assert_eq!(Arc::strong_count(&first), 2, "ours and the one owed wake");
        assert_eq!(Arc::strong_count(&second), 2);
        assert!(first.any_arrived() && second.any_arrived());
    }

    #[test]
    fn a_session_is_woken_once_every_reply_it_is_owed_has_come_not_at_each_one() {
        let mut state = InboxState::default();
        assert!(!state.fill(3, reply(b":3\r\n"), 4), "the head has not come");
        assert_eq!(
            state.slots.capacity(),
            4,
            "room for what was opened, no more"
        );
        assert!(
            !state.fill(0, reply(b":0\r\n"), 4),
            "1 and 2 are still owed"
        );
        assert!(!state.fill(2, reply(b":2\r\n"), 4));
        assert!(state.fill(1, reply(b":1\r\n"), 4), "all four have come");
        assert_eq!(state.ready, 4);
        assert!(!state.fill(9, reply(b":9\r\n"), 4), "never opened");
        assert_eq!(state.slots.len(), 4, "a reply never opened takes no slot");
    }

    #[test]
    fn the_loop_hosting_a_session_steps_it_itself_and_any_other_wakes_its_waker() {
        let (count, waker) = super::super::wakeup::tests::counting_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let inbox = Inbox::default();
        assert!(inbox.poll_filled(&mut cx).is_pending());
        assert_eq!(inbox.wake_in(7), None, "no loop hosts it yet");
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "so its waker is woken");
        assert!(inbox.poll_filled(&mut cx).is_ready());
        inbox.hosted_by(7, 42, &waker);
        assert_eq!(inbox.wake_in(7), Some(42), "its own loop steps it");
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "with no wake-up");
        assert!(inbox.poll_filled(&mut cx).is_ready(), "and finds it filled");
        assert_eq!(inbox.wake_in(8), None, "another worker's loop");
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "wakes it as ever");
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
            .filter(|&seq| inbox.slots().fill(seq, reply(b"+OK\r\n"), opened))
            .collect::<Vec<_>>();
        assert_eq!(wakes, [WAKE_AFTER as u64 - 1, opened - 1]);
        assert_eq!(inbox.take_arrived(0, WAKE_AFTER, |_| {}), WAKE_AFTER);
        assert_eq!(inbox.slots().ready, WAKE_AFTER, "the rest are still ready");
        inbox.open_until(opened + 1);
        assert!(
            inbox.slots().fill(opened, reply(b"+OK\r\n"), opened + 1),
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
}
