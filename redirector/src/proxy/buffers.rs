//! Client read and write buffers, lent while a client has bytes in flight
//! and taken back when it goes idle: thousands of idle PHP-FPM or Node.js
//! connections then hold no buffer at all, and a busy one reuses a warm
//! buffer instead of allocating. One free list per worker thread (no lock,
//! no sharing across threads), bounded: [`Spares`], which the session's
//! reply queues and the jobs' sequence lists use too.

use std::cell::RefCell;

use bytes::BytesMut;

/// A worker thread's spare containers of one kind, emptied, at most `kept`
/// of them: lent to whoever needs one, taken back when done with, so the
/// hot path allocates none. The caller decides what is worth keeping (a
/// container grown by a burst is freed, not kept: the list must not pin a
/// burst's memory).
pub struct Spares<T> {
    list: RefCell<Vec<T>>,
    kept: usize,
}

impl<T> Spares<T> {
    pub const fn new(kept: usize) -> Self {
        Self {
            list: RefCell::new(Vec::new()),
            kept,
        }
    }

    pub fn take(&self) -> Option<T> {
        self.list.borrow_mut().pop()
    }

    /// Keeps `spare`, or frees it if `kept` are already here.
    pub fn keep(&self, spare: T) {
        let mut list = self.list.borrow_mut();
        if list.len() < self.kept {
            list.push(spare);
        }
    }

    /// How many are kept now.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.list.borrow().len()
    }
}

/// A fresh buffer's size: one request or reply of a typical app fits.
pub const SIZE: usize = 4 * 1024;
/// Buffers kept per thread; more are freed.
const KEPT: usize = 256;
/// Larger buffers (a client that sent or received a big value) are freed,
/// not kept: the pool must not pin a burst's memory.
const LARGEST_KEPT: usize = 64 * 1024;

thread_local! {
    static FREE: Spares<BytesMut> = const { Spares::new(KEPT) };
}

/// A buffer with room for at least [`SIZE`] / 4 bytes.
pub fn take() -> BytesMut {
    let mut buf = FREE
        .with(Spares::take)
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE));
    rewind(&mut buf);
    buf
}

/// Gives an empty buffer its room back: it may be the tail of a buffer
/// whose head went out with a request, and `reserve` reclaims the whole
/// allocation once nothing else holds it (as at a request boundary), in
/// place.
pub fn rewind(buf: &mut BytesMut) {
    if buf.capacity() < SIZE / 4 {
        buf.reserve(SIZE);
    }
}

/// Takes a buffer back (emptied); a buffer with nothing allocated is left.
pub fn give_back(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > LARGEST_KEPT {
        return;
    }
    buf.clear();
    FREE.with(|free| free.keep(buf));
}

/// Takes `buf`'s buffer back, leaving it empty and unallocated.
pub fn release(buf: &mut BytesMut) {
    give_back(std::mem::take(buf));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_lent_again_and_big_ones_are_freed() {
        let mut buf = take();
        assert!(buf.capacity() >= SIZE);
        buf.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        let ptr = buf.as_ptr();
        release(&mut buf);
        assert_eq!(buf.capacity(), 0, "the client holds nothing while idle");
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same allocation, reused");
        let mut big = BytesMut::with_capacity(LARGEST_KEPT * 2);
        big.extend_from_slice(b"x");
        give_back(big);
        assert_ne!(take().capacity(), LARGEST_KEPT * 2);
    }

    #[test]
    fn a_kept_buffer_gets_its_room_back_in_place_once_its_requests_are_gone() {
        let mut buf = take();
        let start = buf.as_ptr();
        // Requests read into it in one go, then split off its front one
        // by one, each let go once answered.
        buf.resize(SIZE - 100, b'x');
        while buf.len() >= 40 {
            drop(buf.split_to(40).freeze());
        }
        buf.clear();
        assert!(buf.capacity() < SIZE / 4, "split requests shrank it");
        rewind(&mut buf);
        assert!(buf.capacity() >= SIZE);
        assert_eq!(buf.as_ptr(), start, "the same allocation, from its start");
    }

    #[test]
    fn a_tail_left_by_a_split_request_gets_room_again() {
        let mut buf = take();
        buf.extend_from_slice(&[b'x'; SIZE - 10]);
        let request = buf.split_to(SIZE - 10).freeze();
        give_back(buf);
        let lent = take();
        assert!(lent.capacity() >= SIZE / 4);
        drop(request);
    }
}
