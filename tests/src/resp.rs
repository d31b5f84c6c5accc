//! A raw, synchronous RESP client for comparing replies byte for byte:
//! what the proxy answers against what Redis answers.
//!
//! Replies are returned as the exact bytes of one frame, never re-encoded.
//! Frame boundaries come from `redis-protocol`, parsing RESP2 or RESP3
//! according to the protocol the connection speaks: the client watches the
//! commands it sends for `HELLO <version>` and switches when the reply to it
//! is not an error. [`RespClient::set_resp3`] overrides that.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use redis_protocol::{resp2, resp3};

use crate::process::Place;

/// How long a read waits for the rest of a reply before failing the test.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RespClient {
    stream: TcpStream,
    /// Received, not yet returned.
    input: BytesMut,
    resp3: bool,
    /// One entry per command sent and not yet answered: `Some(resp3)` for a
    /// `HELLO` that switches protocol when it succeeds.
    pending: VecDeque<Option<bool>>,
    /// Bytes sent with [`Self::send_raw`] not yet forming a whole command.
    outgoing: BytesMut,
    /// Cleared when raw bytes sent are not parseable as commands: from then
    /// on only [`Self::set_resp3`] changes the protocol.
    tracking: bool,
}

impl RespClient {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        Self::from_stream(TcpStream::connect_timeout(&addr, READ_TIMEOUT)?)
    }

    /// Connects from inside `place`'s network namespace (needs root). The
    /// socket keeps that namespace; the cgroup of `place` is not used.
    pub fn connect_in(place: &Place, addr: SocketAddr) -> io::Result<Self> {
        Self::from_stream(place.connect(addr, READ_TIMEOUT)?)
    }

    pub fn from_stream(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            input: BytesMut::new(),
            resp3: false,
            pending: VecDeque::new(),
            outgoing: BytesMut::new(),
            tracking: true,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn is_resp3(&self) -> bool {
        self.resp3
    }

    /// Parses replies as RESP3 (`true`) or RESP2 from now on, and forgets
    /// pending `HELLO`s.
    pub fn set_resp3(&mut self, resp3: bool) {
        self.resp3 = resp3;
        self.pending.iter_mut().for_each(|p| *p = None);
    }

    /// Sends one command as a RESP array of bulk strings.
    pub fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.stream.write_all(&encode(args))?;
        self.pending.push_back(hello_version(args));
        Ok(())
    }

    /// Sends bytes as they are: pipelines, inline commands, a command split
    /// anywhere. Whole commands among them are tracked like [`Self::send`].
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        if self.tracking {
            self.outgoing.extend_from_slice(bytes);
            self.track_outgoing();
        }
        Ok(())
    }

    /// Exactly one complete reply frame, as received.
    pub fn read_reply(&mut self) -> io::Result<Bytes> {
        let hello = self.pending.front().copied().flatten();
        // The reply to HELLO is already in the protocol it asks for.
        let resp3 = hello.unwrap_or(self.resp3);
        loop {
            if let Some(frame) = self.decode(resp3)? {
                // A RESP3 push (pub/sub message, invalidation) answers no
                // command.
                let push = resp3 && frame.first() == Some(&b'>');
                if !push {
                    self.pending.pop_front();
                    if let Some(v) = hello
                        && !matches!(frame.first(), Some(b'-' | b'!'))
                    {
                        self.resp3 = v;
                    }
                }
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed with {} bytes of an incomplete reply: {:?}",
                        self.input.len(),
                        String::from_utf8_lossy(&self.input)
                    ),
                ));
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> io::Result<Bytes> {
        self.send(args)?;
        self.read_reply()
    }

    /// [`Self::call`] with string arguments, the reply as lossy UTF-8 (still
    /// raw RESP: `+OK\r\n`, `$1\r\nv\r\n`, ...).
    pub fn call_str(&mut self, args: &[&str]) -> io::Result<String> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call(&args)
            .map(|r| String::from_utf8_lossy(&r).into_owned())
    }

    /// Whether a whole reply is already buffered (without reading more).
    pub fn has_buffered_reply(&self) -> bool {
        let resp3 = self
            .pending
            .front()
            .copied()
            .flatten()
            .unwrap_or(self.resp3);
        if resp3 {
            matches!(resp3::decode::complete::decode(&self.input), Ok(Some(_)))
        } else {
            matches!(resp2::decode::decode(&self.input), Ok(Some(_)))
        }
    }

    fn decode(&mut self, resp3: bool) -> io::Result<Option<Bytes>> {
        if self.input.is_empty() {
            return Ok(None);
        }
        let decoded = if resp3 {
            resp3::decode::complete::decode_bytes_mut(&mut self.input).map(|o| o.map(|(_, _, b)| b))
        } else {
            resp2::decode::decode_bytes_mut(&mut self.input).map(|o| o.map(|(_, _, b)| b))
        };
        decoded.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "invalid {} reply ({e}): {:?}",
                    if resp3 { "RESP3" } else { "RESP2" },
                    String::from_utf8_lossy(&self.input)
                ),
            )
        })
    }

    /// Moves whole commands out of `outgoing` into `pending`.
    fn track_outgoing(&mut self) {
        loop {
            let Some(&first) = self.outgoing.first() else {
                return;
            };
            if first == b'*' {
                match resp2::decode::decode(&self.outgoing) {
                    Ok(Some((frame, amt))) => {
                        let args: Vec<Vec<u8>> = match frame {
                            resp2::types::OwnedFrame::Array(items) => items
                                .into_iter()
                                .map(|f| match f {
                                    resp2::types::OwnedFrame::BulkString(b)
                                    | resp2::types::OwnedFrame::SimpleString(b) => b,
                                    _ => Vec::new(),
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                        self.pending.push_back(hello_version(&args));
                        let _ = self.outgoing.split_to(amt);
                    }
                    Ok(None) => return,
                    Err(_) => {
                        self.tracking = false;
                        self.outgoing.clear();
                        return;
                    }
                }
            } else {
                // An inline command: one line of space-separated words.
                let Some(end) = self.outgoing.iter().position(|&b| b == b'\n') else {
                    return;
                };
                let line = self.outgoing.split_to(end + 1);
                let args: Vec<&[u8]> = line[..]
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|w| !w.is_empty())
                    .collect();
                // Redis ignores empty lines: no reply.
                if !args.is_empty() {
                    self.pending.push_back(hello_version(&args));
                }
            }
        }
    }
}

/// `Some(resp3)` when `args` is `HELLO <2|3> ...`.
fn hello_version(args: &[&[u8]]) -> Option<bool> {
    match args {
        [cmd, version, ..] if cmd.eq_ignore_ascii_case(b"HELLO") => match &version[..] {
            b"3" => Some(true),
            b"2" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// One command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// String arguments as owned bytes, e.g. `cmd(&["SET", "k", "v"])`.
pub fn cmd(args: &[&str]) -> Vec<Bytes> {
    args.iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect()
}

/// Borrowed views of [`cmd`]'s output, for [`RespClient::call`].
pub fn as_args(args: &[Bytes]) -> Vec<&[u8]> {
    args.iter().map(Bytes::as_ref).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_bulk_array() {
        assert_eq!(
            encode(&[b"SET", b"k", b""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn hello_is_recognised() {
        assert_eq!(hello_version(&[b"hello", b"3"]), Some(true));
        assert_eq!(hello_version(&[b"HELLO", b"2", b"AUTH"]), Some(false));
        assert_eq!(hello_version(&[b"HELLO"]), None);
        assert_eq!(hello_version(&[b"GET", b"3"]), None);
    }
}
