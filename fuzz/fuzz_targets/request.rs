//! The RESP request splitter: whatever a client sends, `parse` takes a
//! request off the front, asks for more bytes, or names a protocol error;
//! never a panic, and never a request that is not what the bytes said.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redirector::resp::request::{self, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    // Small limits as well as Redis's own, so the limit checks are reached.
    let small = Limits {
        max_bulk_len: 64,
        max_args: 8,
        max_inline_len: 64,
    };
    for limits in [Limits::default(), small] {
        split_all(data, &limits);
    }
});

fn split_all(data: &[u8], limits: &Limits) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match request::parse(&mut buf, limits) {
            Ok(Parsed::Request(req)) => {
                assert!(buf.len() < before, "a request must consume bytes");
                assert!(!req.args().is_empty(), "a request has a command name");
                check_raw(req.raw(), req.args());
            }
            Ok(Parsed::Incomplete { needed }) => {
                assert!(needed <= limits.max_bulk_len + 2);
                return;
            }
            Err(_) => return,
        }
    }
}

/// The raw frame a request forwards says exactly its arguments: split
/// again, it gives them back, and it is the canonical encoding of them.
fn check_raw(raw: &Bytes, args: &[Bytes]) {
    assert_eq!(raw, &request::encode(args), "raw is not args' encoding");
    let mut again = BytesMut::from(&raw[..]);
    match request::parse(&mut again, &Limits::default()) {
        Ok(Parsed::Request(req)) => {
            assert_eq!(&req.args()[..], args);
            assert!(again.is_empty());
        }
        other => panic!("a forwarded frame does not parse again: {other:?}"),
    }
}
