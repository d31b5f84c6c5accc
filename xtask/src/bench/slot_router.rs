//! The CPU floor of a cluster proxy: the least work that routes Redis
//! Cluster traffic, measured against the proxy in the same rounds.
//!
//! One thread, one level-triggered epoll, no runtime. Clients sit in a slab
//! (token = index); each request's key is hashed to its slot and the
//! request's bytes are queued on the one connection to that slot's primary;
//! at the end of each `epoll_wait` turn every upstream's queue goes out in
//! one `send`, and every client whose replies came gets them in one `send`,
//! in its request order. That is the proxy's own syscall pattern (shared
//! upstream connections, batched writes) with none of its work: no command
//! table, no metrics, no ACL, no `MOVED` handling (the slot map is read once
//! from the seed with `CLUSTER SLOTS`; the cluster must not reshard), no
//! tasks, wakers or locks. Its user time is about the least a cluster
//! proxy's can be. Its kernel time is that syscall pattern at its own pace:
//! quick turns batch fewer requests per upstream write, so a slower proxy
//! makes a few percent fewer syscalls per request (ARCHITECTURE.md, "What
//! routing alone costs").

use std::{
    collections::VecDeque,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    ops::Range,
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::relay::{wait, write_all_spinning};

const SLOTS: usize = 16_384;
const XMODEM: crc::Crc<u16, crc::Table<16>> =
    crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_XMODEM);
/// The listener's token; upstream `i`'s is `UPSTREAM + i`; a client's is
/// its slab index.
const LISTENER: u64 = u64::MAX;
const UPSTREAM: u64 = 1 << 40;

/// Why a client's bytes cannot be routed: the floor drops the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// A RESP2 value, as much as `CLUSTER SLOTS` needs.
#[derive(Debug, PartialEq, Eq)]
enum Value<'a> {
    Int(i64),
    Text(&'a [u8]),
    Nil,
    Error,
    Array(Vec<Value<'a>>),
}

/// The integer in `digits` (an optional `-`, then ASCII digits).
fn integer(digits: &[u8]) -> Result<i64, Malformed> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(Malformed);
    }
    let mut value = 0i64;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return Err(Malformed);
        }
        value = value * 10 + i64::from(digit - b'0');
    }
    Ok(if negative { -value } else { value })
}

/// Where the line starting at `from` ends (its `\r`), if it is all here.
/// Lines are headers of a few bytes (payloads are skipped by length): a
/// plain scan, which `memchr`'s vector setup would cost more than.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .iter()
        .position(|&b| b == b'\r')
        .map(|at| from + at)
}

/// The value at `from` and where the next one starts, `None` if it is not
/// all here yet.
fn value(buf: &[u8], from: usize) -> Result<Option<(Value<'_>, usize)>, Malformed> {
    let Some(end) = line_end(buf, from) else {
        return Ok(None);
    };
    let line = &buf[from + 1..end];
    let next = end + 2;
    if buf.len() < next {
        return Ok(None);
    }
    let parsed = match buf[from] {
        b'+' => Value::Text(line),
        b'-' => Value::Error,
        b':' => Value::Int(integer(line)?),
        b'$' => {
            let Ok(len) = usize::try_from(integer(line)?) else {
                return Ok(Some((Value::Nil, next)));
            };
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            return Ok(Some((Value::Text(&buf[next..next + len]), next + len + 2)));
        }
        b'*' => {
            let Ok(count) = usize::try_from(integer(line)?) else {
                return Ok(Some((Value::Nil, next)));
            };
            let mut items = Vec::with_capacity(count.min(64));
            let mut at = next;
            for _ in 0..count {
                let Some((item, after)) = value(buf, at)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            return Ok(Some((Value::Array(items), at)));
        }
        _ => return Err(Malformed),
    };
    Ok(Some((parsed, next)))
}

/// A complete request at the start of a client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    /// How many bytes it takes.
    pub len: usize,
    /// Where its key (the first argument) is, if it has arguments.
    pub key: Option<Range<usize>>,
}

/// The request at the start of `buf` (a RESP array of bulk strings, as
/// every client library sends), `None` if it is not all here yet.
pub fn request(buf: &[u8]) -> Result<Option<Framed>, Malformed> {
    match buf.first() {
        None => return Ok(None),
        Some(b'*') => {}
        Some(_) => return Err(Malformed),
    }
    let Some(end) = line_end(buf, 0) else {
        return Ok(None);
    };
    if buf.len() < end + 2 {
        return Ok(None);
    }
    let argc = integer(&buf[1..end])?;
    let mut at = end + 2;
    let mut key = None;
    for arg in 0..argc {
        let Some(end) = line_end(buf, at) else {
            return Ok(None);
        };
        if buf[at] != b'$' {
            return Err(Malformed);
        }
        let len = usize::try_from(integer(&buf[at + 1..end])?).map_err(|_| Malformed)?;
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        if arg == 1 {
            key = Some(start..start + len);
        }
        at = start + len + 2;
    }
    Ok(Some(Framed { len: at, key }))
}

/// The slot of `key`, hash tags included. Not the testbed's `slot_of`,
/// which walks the CRC bit by bit to stay independent of the proxy: the
/// floor hashes with the table the proxy uses, or it would be charged more.
pub fn slot(key: &[u8]) -> usize {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    usize::from(XMODEM.checksum(hashed)) % SLOTS
}

/// The primaries and, per slot, the index of the one serving it, from the
/// seed's `CLUSTER SLOTS`.
fn slot_map(seed: SocketAddr) -> Result<(Vec<SocketAddr>, Vec<u8>)> {
    let mut conn = TcpStream::connect(seed).with_context(|| format!("connect {seed}"))?;
    conn.write_all(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let ranges = loop {
        let n = conn.read(&mut chunk)?;
        ensure!(n > 0, "{seed} closed before answering CLUSTER SLOTS");
        buf.extend_from_slice(&chunk[..n]);
        match value(&buf, 0) {
            Ok(Some((Value::Array(ranges), _))) => break ranges,
            Ok(Some((other, _))) => bail!("CLUSTER SLOTS from {seed}: {other:?}"),
            Ok(None) => {}
            Err(Malformed) => bail!("CLUSTER SLOTS from {seed}: not RESP"),
        }
    };
    let mut primaries = Vec::new();
    let mut owner = vec![u8::MAX; SLOTS];
    for range in &ranges {
        let Value::Array(fields) = range else {
            bail!("CLUSTER SLOTS: a range that is not an array: {range:?}");
        };
        let [
            Value::Int(first),
            Value::Int(last),
            Value::Array(primary),
            ..,
        ] = fields.as_slice()
        else {
            bail!("CLUSTER SLOTS: unexpected range {range:?}");
        };
        let [Value::Text(ip), Value::Int(port), ..] = primary.as_slice() else {
            bail!("CLUSTER SLOTS: unexpected node {primary:?}");
        };
        let addr = SocketAddr::new(
            std::str::from_utf8(ip)?.parse()?,
            u16::try_from(*port).context("port")?,
        );
        let index = match primaries.iter().position(|&known| known == addr) {
            Some(index) => index,
            None => {
                primaries.push(addr);
                primaries.len() - 1
            }
        };
        let index = u8::try_from(index).context("more than 255 primaries")?;
        let (first, last) = (usize::try_from(*first)?, usize::try_from(*last)?);
        ensure!(
            first <= last && last < SLOTS,
            "CLUSTER SLOTS: range {first}-{last}"
        );
        owner[first..=last].fill(index);
    }
    ensure!(
        !owner.contains(&u8::MAX),
        "the cluster at {seed} does not cover every slot"
    );
    Ok((primaries, owner))
}

/// A client: what it sent and has not been routed yet, replies ready to
/// go, and the replies it is still owed.
struct Client {
    stream: TcpStream,
    unrouted: Vec<u8>,
    out: Vec<u8>,
    owed: Owed,
    /// In `to_flush` this turn.
    flushing: bool,
}

/// A client's replies still owed, in request order: those that come before
/// an earlier one wait here; the rest go to its output at once.
#[derive(Default)]
struct Owed {
    /// Sequence number of `slots[0]`.
    first: u64,
    /// Sequence number of the next request.
    next: u64,
    /// Per reply owed: the reply, once it came early.
    slots: VecDeque<Option<Vec<u8>>>,
    /// Buffers of early replies already written, lent again: no
    /// allocation per early reply, and no more buffers than were ever
    /// held at once.
    spare: Vec<Vec<u8>>,
}

impl Owed {
    /// Opens a slot for the next request's reply and gives its number.
    fn open(&mut self) -> u64 {
        self.slots.push_back(None);
        self.next += 1;
        self.next - 1
    }

    /// Takes the reply for `seq`: into `out`, with every held one after it
    /// that can follow, if every earlier one is out; else held.
    fn reply(&mut self, seq: u64, raw: &[u8], out: &mut Vec<u8>) {
        let Some(at) = seq
            .checked_sub(self.first)
            .and_then(|at| usize::try_from(at).ok())
        else {
            return;
        };
        if at > 0 {
            if let Some(slot) = self.slots.get_mut(at) {
                let mut early = self.spare.pop().unwrap_or_default();
                early.clear();
                early.extend_from_slice(raw);
                *slot = Some(early);
            }
            return;
        }
        if self.slots.pop_front().is_none() {
            return;
        }
        out.extend_from_slice(raw);
        self.first += 1;
        while let Some(Some(_)) = self.slots.front() {
            if let Some(Some(early)) = self.slots.pop_front() {
                out.extend_from_slice(&early);
                self.spare.push(early);
            }
            self.first += 1;
        }
    }
}

/// A place in the client slab. Its generation tells the client in it from
/// an earlier one at the same index, whose replies may still come.
#[derive(Default)]
struct Seat {
    generation: u32,
    client: Option<Client>,
}

/// One connection to a primary, shared by every client.
struct Upstream {
    stream: TcpStream,
    queued: Vec<u8>,
    unread: Vec<u8>,
    /// Whose reply comes next: slab index, generation, sequence number.
    waiting: VecDeque<(usize, u32, u64)>,
}

/// Serves clients on `listen` for the cluster `seed` belongs to, until
/// killed.
pub fn serve(listen: SocketAddr, seed: SocketAddr) -> Result<()> {
    let (primaries, owner) = slot_map(seed)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut upstreams = Vec::new();
    for (at, &addr) in primaries.iter().enumerate() {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        epoll.add(
            &stream,
            EpollEvent::new(EpollFlags::EPOLLIN, UPSTREAM + at as u64),
        )?;
        upstreams.push(Upstream {
            stream,
            queued: Vec::with_capacity(64 * 1024),
            unread: Vec::with_capacity(64 * 1024),
            waiting: VecDeque::new(),
        });
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    listener.set_nonblocking(true)?;
    epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
    let mut clients: Vec<Seat> = Vec::new();
    let mut vacant: Vec<usize> = Vec::new();
    let mut to_flush: Vec<usize> = Vec::new();
    let mut events = [EpollEvent::empty(); 256];
    let mut read_buf = vec![0u8; 64 * 1024];
    loop {
        let ready = wait(&epoll, &mut events)?;
        for event in &events[..ready] {
            let token = event.data();
            if token == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nodelay(true)?;
                    stream.set_nonblocking(true)?;
                    let index = vacant.pop().unwrap_or_else(|| {
                        clients.push(Seat::default());
                        clients.len() - 1
                    });
                    epoll.add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, index as u64))?;
                    let seat = &mut clients[index];
                    seat.generation = seat.generation.wrapping_add(1);
                    seat.client = Some(Client {
                        stream,
                        unrouted: Vec::new(),
                        out: Vec::new(),
                        owed: Owed::default(),
                        flushing: false,
                    });
                }
            } else if token >= UPSTREAM {
                let upstream = usize::try_from(token - UPSTREAM)
                    .ok()
                    .and_then(|at| upstreams.get_mut(at))
                    .context("an event for no upstream")?;
                deliver(upstream, &mut read_buf, &mut clients, &mut to_flush)?;
            } else {
                let index = usize::try_from(token)?;
                let Some(seat) = clients.get_mut(index) else {
                    continue;
                };
                let routed = match seat.client.as_mut() {
                    Some(client) => route(
                        client,
                        (index, seat.generation),
                        &mut read_buf,
                        &owner,
                        &mut upstreams,
                    ),
                    None => continue,
                };
                if !routed {
                    // Dropping the stream closes it, which takes it out of
                    // the epoll; replies still owed to it are dropped.
                    seat.client = None;
                    vacant.push(index);
                }
            }
        }
        for upstream in &mut upstreams {
            if !upstream.queued.is_empty() {
                ensure!(
                    write_all_spinning(&upstream.stream, &upstream.queued),
                    "write to a primary failed"
                );
                upstream.queued.clear();
            }
        }
        for index in to_flush.drain(..) {
            let Some(client) = clients[index].client.as_mut() else {
                continue;
            };
            client.flushing = false;
            if write_all_spinning(&client.stream, &client.out) {
                client.out.clear();
            } else {
                clients[index].client = None;
                vacant.push(index);
            }
        }
    }
}

/// Reads what `client` (at slab index and generation `seat`) sent and
/// queues each complete request on its slot's primary. False when the
/// client is gone or sent what cannot be routed.
fn route(
    client: &mut Client,
    (index, generation): (usize, u32),
    read_buf: &mut [u8],
    owner: &[u8],
    upstreams: &mut [Upstream],
) -> bool {
    let n = match client.stream.read(read_buf) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(_) => return false,
    };
    // Parsed where it was read, unless an earlier read left part of a
    // request.
    let partial = !client.unrouted.is_empty();
    if partial {
        client.unrouted.extend_from_slice(&read_buf[..n]);
    }
    let bytes: &[u8] = if partial {
        &client.unrouted
    } else {
        &read_buf[..n]
    };
    let mut at = 0;
    loop {
        let Framed { len, key } = match request(&bytes[at..]) {
            Ok(Some(framed)) => framed,
            Ok(None) => break,
            Err(Malformed) => return false,
        };
        let primary = key.map_or(0, |key| {
            usize::from(owner[slot(&bytes[at + key.start..at + key.end])])
        });
        let upstream = &mut upstreams[primary];
        upstream.queued.extend_from_slice(&bytes[at..at + len]);
        let seq = client.owed.open();
        upstream.waiting.push_back((index, generation, seq));
        at += len;
    }
    if partial {
        client.unrouted.drain(..at);
    } else {
        client.unrouted.extend_from_slice(&read_buf[at..n]);
    }
    true
}

/// Reads a primary's replies and hands each to the client waiting for it.
fn deliver(
    upstream: &mut Upstream,
    read_buf: &mut [u8],
    clients: &mut [Seat],
    to_flush: &mut Vec<usize>,
) -> Result<()> {
    let n = match upstream.stream.read(read_buf) {
        Ok(0) => bail!("a primary closed its connection"),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e).context("read from a primary"),
    };
    upstream.unread.extend_from_slice(&read_buf[..n]);
    let mut at = 0;
    while let Some((_, next)) = value(&upstream.unread, at)
        .map_err(|Malformed| anyhow::anyhow!("a reply that is not RESP"))?
    {
        let (index, generation, seq) = upstream
            .waiting
            .pop_front()
            .context("a reply with no request outstanding")?;
        let seat = &mut clients[index];
        if let Some(client) = seat
            .client
            .as_mut()
            .filter(|_| seat.generation == generation)
        {
            client
                .owed
                .reply(seq, &upstream.unread[at..next], &mut client.out);
            if !client.flushing {
                client.flushing = true;
                to_flush.push(index);
            }
        }
        at = next;
    }
    upstream.unread.drain(..at);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        thread,
        time::Duration,
    };

    use testbed::{
        cluster::{RedisCluster, slot_of},
        ports::free_port,
        process::wait_for,
    };

    use super::{Framed, Malformed, Owed, Value, request, serve, slot, value};

    #[test]
    fn replies_that_come_early_wait_for_the_earlier_ones_then_go_out_in_order() {
        let mut owed = Owed::default();
        let seqs: Vec<u64> = (0..4).map(|_| owed.open()).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        let mut out = Vec::new();
        owed.reply(2, b"+two\r\n", &mut out);
        owed.reply(1, b"+one\r\n", &mut out);
        assert!(out.is_empty(), "nothing before the first reply");
        owed.reply(0, b"+zero\r\n", &mut out);
        assert_eq!(out, b"+zero\r\n+one\r\n+two\r\n");
        owed.reply(3, b"+three\r\n", &mut out);
        assert_eq!(out, b"+zero\r\n+one\r\n+two\r\n+three\r\n");
        // A reply for no open slot (a number already answered) is dropped.
        owed.reply(1, b"+again\r\n", &mut out);
        assert_eq!(out, b"+zero\r\n+one\r\n+two\r\n+three\r\n");
    }

    #[test]
    fn a_client_that_always_has_replies_owed_reuses_the_buffers_it_held() {
        let mut owed = Owed::default();
        let mut out = Vec::new();
        let mut expected = Vec::new();
        let mut oldest = owed.open();
        for round in 0..1_000 {
            // Two more in flight; the newer comes first and waits, then the
            // oldest comes: one reply and one held reply stay owed across
            // rounds, so the client is never without replies owed.
            let (older, newer) = (owed.open(), owed.open());
            owed.reply(newer, format!("+n{round}\r\n").as_bytes(), &mut out);
            owed.reply(oldest, format!("+o{round}\r\n").as_bytes(), &mut out);
            expected.extend(format!("+o{round}\r\n").into_bytes());
            if round > 0 {
                expected.extend(format!("+n{}\r\n", round - 1).into_bytes());
            }
            assert_eq!(out, expected, "round {round}");
            oldest = older;
            // One buffer held, one spare from the round before: the same
            // two lent in turn, never a third.
            let buffers = owed.spare.len() + owed.slots.iter().flatten().count();
            assert_eq!(buffers, if round == 0 { 1 } else { 2 }, "round {round}");
        }
    }

    /// One RESP command.
    fn command(args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        out
    }

    /// Reads until `expected` bytes came (or the timeout fails it).
    fn read_exactly(client: &mut TcpStream, expected: usize) -> Vec<u8> {
        let mut got = vec![0u8; expected];
        client.read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn a_pipeline_spread_over_three_primaries_is_answered_in_request_order() {
        let cluster = RedisCluster::start_local(3, 0);
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let seed = cluster.seeds()[0];
        // Runs until the cluster is gone (its connections fail).
        thread::spawn(move || serve(listen, seed));
        wait_for("the slot router listening", Duration::from_secs(10), || {
            TcpStream::connect(listen).ok()
        });
        let keys: Vec<String> = (0..300).map(|i| format!("key:{i}")).collect();
        let mut clients: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(listen).unwrap())
            .collect();
        for (at, client) in clients.iter_mut().enumerate() {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut sets = Vec::new();
            for key in &keys {
                sets.extend(command(&["SET", key, &format!("{key}@{at}")]));
            }
            client.write_all(&sets).unwrap();
        }
        for client in &mut clients {
            // A `MOVED` (a request on the wrong primary) would be longer.
            assert_eq!(
                read_exactly(client, 5 * keys.len()),
                b"+OK\r\n".repeat(keys.len())
            );
        }
        // Both clients wrote every key; the second's values are the last.
        let mut gets = Vec::new();
        let mut expected = Vec::new();
        for key in &keys {
            gets.extend(command(&["GET", key]));
            let value = format!("{key}@1");
            expected.extend(format!("${}\r\n{value}\r\n", value.len()).into_bytes());
        }
        gets.extend(command(&["GET", "never-set"]));
        expected.extend_from_slice(b"$-1\r\n");
        clients[0].write_all(&gets).unwrap();
        let got = read_exactly(&mut clients[0], expected.len());
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
        // The keys really are spread: every primary holds some of them.
        for primary in cluster.masters() {
            let mut direct = TcpStream::connect(primary).unwrap();
            direct.write_all(&command(&["DBSIZE"])).unwrap();
            let mut reply = [0u8; 32];
            let n = direct.read(&mut reply).unwrap();
            assert_ne!(&reply[..n], b":0\r\n", "{primary} holds none of the keys");
        }
    }

    #[test]
    fn a_request_is_measured_and_its_key_found_only_once_all_of_it_is_here() {
        let get = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n";
        let framed = request(get).unwrap().unwrap();
        assert_eq!(framed.len, get.len());
        assert_eq!(&get[framed.key.unwrap()], b"foo");
        for cut in 0..get.len() {
            assert_eq!(request(&get[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            request(b"*1\r\n$4\r\nPING\r\n"),
            Ok(Some(Framed { len: 14, key: None }))
        );
        assert_eq!(request(b"PING\r\n"), Err(Malformed));
        assert_eq!(request(b"*1\r\n:4\r\n"), Err(Malformed));
    }

    #[test]
    fn slots_are_redis_clusters_including_hash_tags() {
        // As Redis 7.0's `CLUSTER KEYSLOT` answers; the specification's
        // check value for "123456789" is 0x31C3.
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), 3_443);
        assert_eq!(slot(b"user1000"), 3_443);
        // An empty tag hashes the whole key; the tag ends at the first `}`.
        assert_eq!(slot(b"foo{}{bar}"), 8_363);
        assert_eq!(slot(b"foo{{bar}}zap"), 4_015);
        assert_eq!(slot(b"{bar"), 4_015);
        for n in 0..2_000 {
            let key = format!("{{user{}}}:key:{n}", n % 7);
            assert_eq!(slot(key.as_bytes()), usize::from(slot_of(key.as_bytes())));
        }
    }

    #[test]
    fn a_reply_is_taken_whole_or_not_at_all() {
        let reply = b"*2\r\n$3\r\nabc\r\n*2\r\n:1\r\n$-1\r\n+OK\r\n";
        let (parsed, next) = value(reply, 0).unwrap().unwrap();
        assert_eq!(
            parsed,
            Value::Array(vec![
                Value::Text(b"abc"),
                Value::Array(vec![Value::Int(1), Value::Nil])
            ])
        );
        assert_eq!(&reply[next..], b"+OK\r\n");
        for cut in 0..next {
            assert_eq!(value(&reply[..cut], 0), Ok(None), "cut at {cut}");
        }
        assert_eq!(value(b"-MOVED 1 a:1\r\n", 0).unwrap().unwrap().1, 14);
        assert_eq!(value(b"?\r\n", 0), Err(Malformed));
    }
}
