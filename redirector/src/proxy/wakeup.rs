//! A one-waiter wake-up that costs no lock: the session's waits on its reply
//! inbox and on its registry entry (CLIENT KILL, pushed frames). A tokio
//! `Notify` locks its waiter list at every poll and again when the wait is
//! dropped; the session polls both waits at every turn of its loop.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
};

use futures::task::AtomicWaker;

/// Remembers a wake-up until the waiter looks, like `Notify::notify_one`'s
/// permit.
#[derive(Default)]
pub struct Wakeup {
    waker: AtomicWaker,
    woken: AtomicBool,
}

impl Wakeup {
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once woken since the last time it was ready. The waker is
    /// registered before the flag is read, so a wake in between is seen.
    /// The flag is read before it is cleared: most polls find it unset (a
    /// session polls its inbox and its registry entry at every turn), and
    /// a plain load is not a locked instruction; a wake after the load
    /// finds the waker registered.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.woken.load(Ordering::Acquire) && self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_wake_before_the_poll_is_kept_and_seen_once() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
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
}
