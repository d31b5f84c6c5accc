//! Wake-ups on the request path.
//!
//! [`Wakeup`]: a one-waiter wake-up that costs no lock: the session's waits
//! on its reply inbox and on its registry entry (CLIENT KILL, pushed
//! frames). A tokio `Notify` locks its waiter list at every poll and again
//! when the wait is dropped; the session polls both waits at every turn of
//! its loop.
//!
//! [`ReadyList`]: what wakes the worker's loop (`host`) for one of its
//! entries, a session or an upstream connection.

use std::{
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use futures::task::AtomicWaker;

/// Remembers a wake-up until the waiter looks, like `Notify::notify_one`'s
/// permit.
#[derive(Default)]
pub struct Wakeup {
    waker: AtomicWaker,
    woken: AtomicBool,
    /// The one waker the waiter polls with, when it has one (a session on
    /// the worker's loop): never taken, so never registered again. A
    /// registration is two locked instructions, and a hosted session
    /// polls its inbox and its registry entry twice per step.
    fixed: OnceLock<Waker>,
}

impl Wakeup {
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        match self.fixed.get() {
            Some(waker) => waker.wake_by_ref(),
            None => self.waker.wake(),
        }
    }

    /// Says the waiter polls with `waker` (or one that wakes the same)
    /// from now on.
    pub fn polled_with(&self, waker: &Waker) {
        let _ = self.fixed.set(waker.clone());
    }

    /// Remembers a wake-up without waking the waiter: for a caller that
    /// runs the waiter itself next (the worker's loop, for a session it
    /// hosts).
    pub fn mark(&self) {
        self.woken.store(true, Ordering::Release);
    }

    /// Ready once woken since the last time it was ready. The waker is
    /// registered before the flag is read, so a wake in between is seen.
    /// The flag is read before it is cleared: most polls find it unset (a
    /// session polls its inbox and its registry entry at every turn), and
    /// a plain load is not a locked instruction; a wake after the load
    /// finds the waker registered.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fixed.get().is_none() {
            self.waker.register(cx.waker());
        }
        if self.woken.load(Ordering::Acquire) && self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The loop's entries woken by their sources, for the loop to take in its
/// turn; pushed from anywhere, taken by the loop.
#[derive(Default)]
pub struct ReadyList {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    tokens: Vec<usize>,
    /// The loop's task, taken by the first wake after it registered.
    host: Option<Waker>,
    /// The loop is in its turn, and takes what is pushed before the turn
    /// ends (`end_turn`): its deliveries wake sessions without waking it.
    in_turn: bool,
}

impl ReadyList {
    pub fn push(&self, token: usize) {
        self.wake(Some(token));
    }

    /// Wakes the loop for work of its own (an upstream connection's queued
    /// jobs), unless it is in its turn.
    pub fn nudge(&self) {
        self.wake(None);
    }

    fn wake(&self, token: Option<usize>) {
        let host = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.tokens.extend(token);
            if state.in_turn {
                None
            } else {
                state.host.take()
            }
        };
        if let Some(host) = host {
            host.wake();
        }
    }

    /// Tells this loop apart from the other workers' (its address: a
    /// loop lives as long as its thread).
    pub fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    pub fn begin_turn(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).in_turn = true;
    }

    /// Swaps the woken entries into `into` (emptied first).
    pub fn take(&self, into: &mut Vec<usize>) {
        into.clear();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut state.tokens, into);
    }

    /// Ends the loop's turn and registers its task for the next wake;
    /// false, and still in the turn, if entries were woken since the last
    /// `take`.
    pub fn end_turn(&self, host: &Waker) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.tokens.is_empty() {
            return false;
        }
        state.in_turn = false;
        match &state.host {
            Some(registered) if registered.will_wake(host) => {}
            _ => state.host = Some(host.clone()),
        }
        true
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use super::*;

    /// A waker that counts its wakes.
    pub(in crate::proxy) struct Count(pub(in crate::proxy) AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(in crate::proxy) fn counting_waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        (count, waker)
    }

    #[test]
    fn a_wake_before_the_poll_is_kept_and_seen_once() {
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let wakeup = Wakeup::default();
        assert!(wakeup.poll(&mut cx).is_pending());
        wakeup.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "the waiter is woken");
        wakeup.wake();
        assert!(wakeup.poll(&mut cx).is_ready());
        assert!(
            wakeup.poll(&mut cx).is_pending(),
            "two wakes, one readiness"
        );
    }

    #[test]
    fn a_waiter_with_one_waker_is_woken_at_every_wake_without_polling_again() {
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let wakeup = Wakeup::default();
        wakeup.polled_with(&waker);
        wakeup.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken before any poll");
        assert!(wakeup.poll(&mut cx).is_ready());
        assert!(wakeup.poll(&mut cx).is_pending());
        wakeup.wake();
        wakeup.wake();
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            3,
            "the waker is kept, never taken"
        );
        assert!(wakeup.poll(&mut cx).is_ready());
        assert!(
            wakeup.poll(&mut cx).is_pending(),
            "two wakes, one readiness"
        );
    }

    #[test]
    fn the_loop_is_woken_outside_its_turn_and_takes_what_comes_during_it() {
        let (count, host) = counting_waker();
        let woken = || count.0.load(Ordering::Relaxed);
        let ready = ReadyList::default();
        let mut taken = Vec::new();
        ready.begin_turn();
        assert!(ready.end_turn(&host), "nothing came");
        ready.push(3);
        assert_eq!(woken(), 1, "woken outside its turn");
        ready.push(4);
        assert_eq!(woken(), 1, "once, until it registers again");
        ready.begin_turn();
        ready.take(&mut taken);
        assert_eq!(taken, [3, 4]);
        ready.push(5);
        ready.nudge();
        assert_eq!(woken(), 1, "not woken in its turn");
        assert!(!ready.end_turn(&host), "5 came during the turn");
        ready.take(&mut taken);
        assert_eq!(taken, [5]);
        assert!(ready.end_turn(&host));
        ready.nudge();
        assert_eq!(woken(), 2, "a nudge wakes it outside its turn");
    }
}
