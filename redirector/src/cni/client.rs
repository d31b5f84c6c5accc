//! The plugin's side of the agent socket: blocking, with one deadline over
//! connect, send and reply, so a hung agent costs a pod at most `timeout`.

use std::{
    io::{self, Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr},
};

use super::{
    Error, MAX_LINE,
    wire::{Reply, Request},
};

/// Sends one request line to the agent at `socket` and reads its one reply
/// line, all within `timeout`.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, Error> {
    let deadline = Instant::now() + timeout;
    let timed_out = || Error::AgentTimedOut {
        socket: socket.to_path_buf(),
        timeout,
    };
    let lost = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else {
            Error::AgentIo {
                socket: socket.to_path_buf(),
                source,
            }
        }
    };
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(timed_out())
        } else {
            Ok(left)
        }
    };

    let mut stream = connect(socket, deadline).map_err(|e| match e {
        Some(source) => Error::AgentUnreachable {
            socket: socket.to_path_buf(),
            source,
        },
        None => timed_out(),
    })?;

    let mut line = serde_json::to_vec(request).map_err(Error::EncodeRequest)?;
    line.push(b'\n');
    stream.set_write_timeout(Some(left()?)).map_err(lost)?;
    stream.write_all(&line).map_err(lost)?;

    let mut reply = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    while !reply.contains(&b'\n') {
        stream.set_read_timeout(Some(left()?)).map_err(lost)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(e)),
        }
        if reply.len() > MAX_LINE {
            return Err(Error::AgentReplyTooLong {
                socket: socket.to_path_buf(),
            });
        }
    }
    let line = reply.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::AgentHungUp {
            socket: socket.to_path_buf(),
        });
    }
    serde_json::from_slice(line).map_err(|source| Error::AgentBadReply {
        socket: socket.to_path_buf(),
        source,
    })
}

/// Connects before `deadline`. A Unix `connect` blocks while the listener's
/// backlog is full (an agent that stopped accepting), so it is made
/// non-blocking and retried; `None` means the deadline passed.
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, Option<io::Error>> {
    let addr = UnixAddr::new(path).map_err(|e| Some(e.into()))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Some(e.into()))?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(Errno::EAGAIN) => return Err(None),
            Err(e) => return Err(Some(e.into())),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(Some)?;
    Ok(stream)
}
