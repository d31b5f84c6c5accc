//! The reply decoder: whatever a Redis node (or something posing as one)
//! sends, `decode` takes a complete frame off the front, waits for more,
//! or names the stream malformed; never a panic. A decoded frame decodes
//! as a value too, and the value, written back, is one complete frame.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redirector::resp::{
    Protocol,
    reply::{self, ReplyKind},
    value::Value,
};

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::Resp2, Protocol::Resp3] {
        decode_all(data, protocol);
    }
});

fn decode_all(data: &[u8], protocol: Protocol) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = reply::decode(&mut buf, protocol) {
        assert!(!frame.raw.is_empty(), "a frame takes bytes");
        // A RESP3 attribute ahead of an error hides its text (a known
        // limit: Redis sends attributes only under DEBUG PROTOCOL).
        if frame.kind == ReplyKind::Error && frame.raw.first() != Some(&b'|') {
            assert!(frame.error_message().is_some());
        }
        // The frame was complete: the value decoder agrees, unless a
        // simple string or error holds text that is not UTF-8, which
        // redis-protocol's frames cannot (callers then answer an error).
        let Some(value) = Value::decode(&frame.raw, protocol) else {
            assert!(
                std::str::from_utf8(&frame.raw).is_err(),
                "decode took {:?}, Value refused it",
                frame.raw
            );
            continue;
        };
        if let (ReplyKind::Integer(n), Value::Int(m)) = (frame.kind, &value) {
            assert_eq!(n, *m);
        }
        check_reencoded(&value, protocol);
        let _ = value.as_int();
        let _ = value.as_bytes();
        let _ = value.clone().into_pairs();
        let _ = value.into_items();
    }
}

/// What the proxy writes from a value (merged replies) is exactly one
/// frame, whatever the value held: no reply can smuggle a second one.
fn check_reencoded(value: &Value, protocol: Protocol) {
    let encoded: Bytes = value.encode(protocol);
    let mut again = BytesMut::from(&encoded[..]);
    match reply::decode(&mut again, protocol) {
        Ok(Some(frame)) => {
            assert_eq!(
                frame.raw, encoded,
                "{value:?} encodes to more than one frame"
            );
        }
        other => panic!("{value:?} encodes to {encoded:?}, which decodes to {other:?}"),
    }
}
