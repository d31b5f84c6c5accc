//! Client read and write buffers, lent while a client has bytes in flight
//! and taken back when it goes idle: thousands of idle PHP-FPM or Node.js
//! connections then hold no buffer at all, and a busy one reuses a warm
//! buffer instead of allocating. One free list per worker thread (no lock,
//! no sharing across threads), bounded.

use std::cell::RefCell;

use bytes::BytesMut;

/// A fresh buffer's size: one request or reply of a typical app fits.
pub const SIZE: usize = 4 * 1024;
/// Buffers kept per thread; more are freed.
const KEPT: usize = 256;
/// Larger buffers (a client that sent or received a big value) are freed,
/// not kept: the pool must not pin a burst's memory.
const LARGEST_KEPT: usize = 64 * 1024;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with room for at least [`SIZE`] / 4 bytes.
pub fn take() -> BytesMut {
    let mut buf = FREE
        .with(|free| free.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE));
    if buf.capacity() < SIZE / 4 {
        // A tail of a buffer whose head went out with a request: `reserve`
        // reclaims the whole allocation once nothing else holds it.
        buf.reserve(SIZE);
    }
    buf
}

/// Takes a buffer back (emptied); a buffer with nothing allocated is left.
pub fn give_back(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > LARGEST_KEPT {
        return;
    }
    buf.clear();
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
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
