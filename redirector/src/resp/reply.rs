//! Replies: decoding what Redis sends (with redis-protocol, keeping the raw
//! bytes so a reply is forwarded to the client without re-encoding), and
//! encoding what the proxy answers itself, in the client's protocol.

use bytes::{BufMut as _, Bytes, BytesMut};
use redis_protocol::{
    resp2::{decode as resp2_decode, types::RangeFrame as Range2},
    resp3::{decode::complete as resp3_decode, types::RangeFrame as Range3},
};

use super::{
    Protocol,
    request::{itoa_buf, parse_int},
};

/// One reply frame from Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The complete frame as received.
    pub raw: Bytes,
    pub kind: ReplyKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// `-ERR ...` / `!<len>` (RESP3 blob error).
    Error,
    Integer(i64),
    /// RESP3 out-of-band push (`>`), e.g. a pub/sub message.
    Push,
    Other,
}

impl Reply {
    /// The error text (without the leading `-`), for error replies.
    pub fn error_message(&self) -> Option<&[u8]> {
        if self.kind != ReplyKind::Error {
            return None;
        }
        match self.raw.first() {
            Some(b'-') => Some(trim_crlf(&self.raw[1..])),
            // `!<len>\r\n<text>\r\n`
            Some(b'!') => {
                let start = self.raw.iter().position(|&b| b == b'\n')? + 1;
                Some(trim_crlf(&self.raw[start..]))
            }
            _ => None,
        }
    }

    /// A reply made by the proxy.
    pub fn local(raw: Bytes) -> Self {
        let kind = match raw.first() {
            Some(b'-' | b'!') => ReplyKind::Error,
            _ => ReplyKind::Other,
        };
        Self { raw, kind }
    }

    pub fn is_error(&self) -> bool {
        self.kind == ReplyKind::Error
    }
}

fn trim_crlf(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r\n").unwrap_or(b)
}

/// Why an upstream reply stream could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed reply from Redis: {0}")]
pub struct DecodeError(String);

/// Takes one complete reply off the front of `buf`, if there is one.
pub fn decode(buf: &mut BytesMut, protocol: Protocol) -> Result<Option<Reply>, DecodeError> {
    let (kind, len) = match quick_frame(buf, protocol) {
        Quick::Frame(kind, len) => (kind, len),
        Quick::Incomplete => return Ok(None),
        Quick::Unsure => match general_frame(buf, protocol)? {
            Some(frame) => frame,
            None => return Ok(None),
        },
    };
    Ok(Some(Reply {
        raw: buf.split_to(len).freeze(),
        kind,
    }))
}

/// A bulk string's length as `decode` frames it by hand: larger ones are
/// left to the general decoder (Redis caps a bulk at 512 MiB).
const QUICK_BULK_MAX: usize = 512 * 1024 * 1024;

/// What a look at a reply's first line tells.
#[derive(Debug, PartialEq, Eq)]
enum Quick {
    Frame(ReplyKind, usize),
    /// A bulk string whose header is complete and valid, and whose data
    /// has not all come.
    Incomplete,
    /// Anything else: the general decoder decides.
    Unsure,
}

/// The replies nearly every command gets (a bulk string, a status, an
/// error, an integer, a RESP3 null), framed by hand: the general decoder's
/// parser combinators cost more than the rest of a GET reply's trip.
/// Whatever is not plainly one of those, or not all there, goes to it.
fn quick_frame(buf: &[u8], protocol: Protocol) -> Quick {
    let Some((&prefix, rest)) = buf.split_first() else {
        return Quick::Unsure;
    };
    if !matches!(prefix, b'$' | b'+' | b'-' | b':' | b'_') {
        return Quick::Unsure;
    }
    // The first line, up to its `\r\n`.
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return Quick::Unsure;
    };
    if rest.get(cr + 1) != Some(&b'\n') {
        return Quick::Unsure;
    }
    let line = &rest[..cr];
    let line_len = 1 + cr + 2;
    match prefix {
        b'+' => Quick::Frame(ReplyKind::Other, line_len),
        b'-' => Quick::Frame(ReplyKind::Error, line_len),
        b':' => match parse_int(line) {
            Some(n) => Quick::Frame(ReplyKind::Integer(n), line_len),
            None => Quick::Unsure,
        },
        b'_' if protocol == Protocol::Resp3 && line.is_empty() => {
            Quick::Frame(ReplyKind::Other, line_len)
        }
        b'$' => match parse_int(line) {
            Some(-1) if protocol == Protocol::Resp2 => Quick::Frame(ReplyKind::Other, line_len),
            Some(n) if n >= 0 && (n as usize) <= QUICK_BULK_MAX => {
                let end = line_len + n as usize + 2;
                if buf.len() < end {
                    Quick::Incomplete
                } else if &buf[end - 2..end] == b"\r\n" {
                    Quick::Frame(ReplyKind::Other, end)
                } else {
                    Quick::Unsure
                }
            }
            _ => Quick::Unsure,
        },
        _ => Quick::Unsure,
    }
}

/// Frames one reply with redis-protocol: its kind and length, `None` when
/// more bytes are needed.
fn general_frame(
    buf: &[u8],
    protocol: Protocol,
) -> Result<Option<(ReplyKind, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    Ok(Some(match protocol {
        Protocol::Resp2 => match resp2_decode::decode_range(buf) {
            Ok(Some((frame, len))) => {
                let kind = match frame {
                    Range2::Error(_) => ReplyKind::Error,
                    Range2::Integer(i) => ReplyKind::Integer(i),
                    _ => ReplyKind::Other,
                };
                (kind, len)
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(DecodeError(e.to_string())),
        },
        Protocol::Resp3 => match resp3_decode::decode_range(buf) {
            Ok(Some((frame, len))) => {
                let kind = match frame {
                    Range3::SimpleError { .. } | Range3::BlobError { .. } => ReplyKind::Error,
                    Range3::Number { data, .. } => ReplyKind::Integer(data),
                    Range3::Push { .. } => ReplyKind::Push,
                    _ => ReplyKind::Other,
                };
                (kind, len)
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(DecodeError(e.to_string())),
        },
    }))
}

/// Decodes a complete raw reply into an owned frame tree, for the rare
/// replies the proxy must look into (merging fan-out results, topology).
pub fn frame2(raw: &Bytes) -> Option<redis_protocol::resp2::types::BytesFrame> {
    resp2_decode::decode_bytes(raw)
        .ok()
        .flatten()
        .map(|(f, _)| f)
}

pub fn frame3(raw: &Bytes) -> Option<redis_protocol::resp3::types::BytesFrame> {
    resp3_decode::decode_bytes(raw)
        .ok()
        .flatten()
        .map(|(f, _)| f)
}

/// Writes replies in a client's protocol.
pub struct Encoder<'a> {
    pub out: &'a mut BytesMut,
    pub protocol: Protocol,
}

impl Encoder<'_> {
    pub fn simple(&mut self, s: &str) {
        self.out.put_u8(b'+');
        self.out.extend_from_slice(s.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn ok(&mut self) {
        self.out.extend_from_slice(b"+OK\r\n");
    }

    /// `msg` must not contain CR or LF; it is cleaned if it does.
    pub fn error(&mut self, msg: &str) {
        self.out.reserve(msg.len() + 3);
        self.out.put_u8(b'-');
        // The runs between CRs and LFs copied whole, not byte by byte.
        for (i, run) in msg.split(['\r', '\n']).enumerate() {
            if i > 0 {
                self.out.put_u8(b' ');
            }
            self.out.extend_from_slice(run.as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn integer(&mut self, n: i64) {
        self.out.put_u8(b':');
        self.out.extend_from_slice(n.to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn bulk(&mut self, data: &[u8]) {
        let mut itoa = itoa_buf();
        self.out.put_u8(b'$');
        self.out.extend_from_slice(itoa.format(data.len()));
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(data);
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn null(&mut self) {
        match self.protocol {
            Protocol::Resp2 => self.out.extend_from_slice(b"$-1\r\n"),
            Protocol::Resp3 => self.out.extend_from_slice(b"_\r\n"),
        }
    }

    pub fn array(&mut self, len: usize) {
        let mut itoa = itoa_buf();
        self.out.put_u8(b'*');
        self.out.extend_from_slice(itoa.format(len));
        self.out.extend_from_slice(b"\r\n");
    }

    /// A set: RESP3 `~`, or an array in RESP2.
    pub fn set(&mut self, len: usize) {
        match self.protocol {
            Protocol::Resp2 => self.array(len),
            Protocol::Resp3 => {
                let mut itoa = itoa_buf();
                self.out.put_u8(b'~');
                self.out.extend_from_slice(itoa.format(len));
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// A map: RESP3 `%`, or a flat array of key/value pairs in RESP2.
    pub fn map(&mut self, pairs: usize) {
        match self.protocol {
            Protocol::Resp2 => self.array(pairs * 2),
            Protocol::Resp3 => {
                let mut itoa = itoa_buf();
                self.out.put_u8(b'%');
                self.out.extend_from_slice(itoa.format(pairs));
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// A RESP3 verbatim string (`=`), or a bulk string in RESP2.
    pub fn verbatim(&mut self, text: &str) {
        match self.protocol {
            Protocol::Resp2 => self.bulk(text.as_bytes()),
            Protocol::Resp3 => {
                let mut itoa = itoa_buf();
                self.out.put_u8(b'=');
                self.out.extend_from_slice(itoa.format(text.len() + 4));
                self.out.extend_from_slice(b"\r\ntxt:");
                self.out.extend_from_slice(text.as_bytes());
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }

    pub fn raw(&mut self, raw: &[u8]) {
        self.out.extend_from_slice(raw);
    }
}

/// A one-off encoded reply.
pub fn build(protocol: Protocol, f: impl FnOnce(&mut Encoder<'_>)) -> Bytes {
    let mut out = BytesMut::new();
    f(&mut Encoder {
        out: &mut out,
        protocol,
    });
    out.freeze()
}

pub fn error(msg: &str) -> Bytes {
    build(Protocol::Resp2, |e| e.error(msg))
}

pub fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_framed_replies_agree_with_the_general_decoder_at_every_cut() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"-MOVED 3999 127.0.0.1:7001\r\n",
            b"-ERR a\rb\r\n",
            b":42\r\n",
            b":-7\r\n",
            b":0\r\n",
            b":007\r\n",
            b":-0\r\n",
            b":12x\r\n",
            b":9223372036854775807\r\n",
            b"$5\r\nhello\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"$-2\r\n",
            b"$05\r\nhello\r\n",
            b"$3\r\nab\r\n\r\n",
            b"$2\r\nabXY",
            b"$4\r\na\r\nb\r\n",
            b"_\r\n",
            b"_x\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"+a\rb\r\n",
            b"#t\r\n",
            b">2\r\n$10\r\ninvalidate\r\n_\r\n",
        ];
        for protocol in [Protocol::Resp2, Protocol::Resp3] {
            for reply in replies {
                // Each reply alone, cut at every length, and followed by
                // another reply.
                let mut whole = reply.to_vec();
                whole.extend_from_slice(b"+next\r\n");
                for cut in 0..=whole.len() {
                    let buf = &whole[..cut];
                    let general = general_frame(buf, protocol).ok();
                    match quick_frame(buf, protocol) {
                        Quick::Frame(kind, len) => {
                            assert_eq!(general, Some(Some((kind, len))), "{protocol:?} {buf:?}");
                        }
                        Quick::Incomplete => {
                            assert_eq!(general, Some(None), "{protocol:?} {buf:?}");
                        }
                        Quick::Unsure => {}
                    }
                }
            }
        }
        // The common replies never reach the general decoder.
        let quick = |buf: &[u8]| quick_frame(buf, Protocol::Resp2);
        assert_eq!(
            quick(b"$5\r\nhello\r\n"),
            Quick::Frame(ReplyKind::Other, 11)
        );
        assert_eq!(quick(b"$5\r\nhel"), Quick::Incomplete);
        assert_eq!(quick(b"$-1\r\n"), Quick::Frame(ReplyKind::Other, 5));
        assert_eq!(quick(b"+OK\r\n"), Quick::Frame(ReplyKind::Other, 5));
        assert_eq!(quick(b"-ERR x\r\n"), Quick::Frame(ReplyKind::Error, 8));
        assert_eq!(quick(b":-7\r\n"), Quick::Frame(ReplyKind::Integer(-7), 5));
    }

    #[test]
    fn replies_are_framed_and_classified() {
        let mut buf = BytesMut::from(
            &b"+OK\r\n-MOVED 3999 127.0.0.1:7001\r\n:42\r\n*2\r\n$1\r\na\r\n$-1\r\n$5\r\nhel"[..],
        );
        let r = decode(&mut buf, Protocol::Resp2).unwrap().unwrap();
        assert_eq!((&r.raw[..], r.kind), (&b"+OK\r\n"[..], ReplyKind::Other));
        let r = decode(&mut buf, Protocol::Resp2).unwrap().unwrap();
        assert_eq!(r.kind, ReplyKind::Error);
        assert_eq!(r.error_message(), Some(&b"MOVED 3999 127.0.0.1:7001"[..]));
        let r = decode(&mut buf, Protocol::Resp2).unwrap().unwrap();
        assert_eq!(r.kind, ReplyKind::Integer(42));
        let r = decode(&mut buf, Protocol::Resp2).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*2\r\n$1\r\na\r\n$-1\r\n");
        assert_eq!(decode(&mut buf, Protocol::Resp2).unwrap(), None);
        assert_eq!(&buf[..], b"$5\r\nhel");
    }

    #[test]
    fn resp3_errors_and_pushes_are_recognised() {
        let mut buf = BytesMut::from(
            &b"!9\r\nERR oops!\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n%1\r\n+a\r\n:1\r\n"
                [..],
        );
        let r = decode(&mut buf, Protocol::Resp3).unwrap().unwrap();
        assert_eq!(r.error_message(), Some(&b"ERR oops!"[..]));
        let r = decode(&mut buf, Protocol::Resp3).unwrap().unwrap();
        assert_eq!(r.kind, ReplyKind::Push);
        let r = decode(&mut buf, Protocol::Resp3).unwrap().unwrap();
        assert_eq!(r.kind, ReplyKind::Other);
        assert!(buf.is_empty());
    }

    #[test]
    fn encoder_follows_the_client_protocol() {
        let two = build(Protocol::Resp2, |e| {
            e.map(1);
            e.bulk(b"k");
            e.null();
        });
        assert_eq!(&two[..], b"*2\r\n$1\r\nk\r\n$-1\r\n");
        let three = build(Protocol::Resp3, |e| {
            e.map(1);
            e.bulk(b"k");
            e.null();
        });
        assert_eq!(&three[..], b"%1\r\n$1\r\nk\r\n_\r\n");
        assert_eq!(&error("ERR bad\r\nthing")[..], b"-ERR bad  thing\r\n");
    }
}
