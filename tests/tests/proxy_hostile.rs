//! Hostile clients against the proxy: garbage, absurd lengths, deep
//! nesting, half-sent frames, a pipeline nobody reads. Meanwhile a
//! well-behaved client keeps doing SET/GET and must see no error and no
//! stall; the proxy must stay up with bounded memory. Also the client
//! limits: `--idle-timeout` and `--max-clients`.
//! Real `redis-server` nodes and the real proxy on 127.0.0.1.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use testbed::{cluster::RedisCluster, proxy::Proxy, resp::RespClient};

/// The proxy's resident memory after all the abuse must stay below this.
const RSS_LIMIT_KIB: u64 = 100 * 1024;
/// Longest a well-behaved command may take while others misbehave.
const MAX_LATENCY: Duration = Duration::from_secs(2);

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s
}

/// Everything the peer sends until it closes (EOF or reset); panics if it
/// is still open after `timeout`.
fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return got;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "connection still open after {timeout:?}; received {} bytes: {:?}",
                    got.len(),
                    String::from_utf8_lossy(&got[..got.len().min(500)])
                );
            }
            Err(e) => panic!("read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "connection still open after {timeout:?}"
        );
    }
}

/// Splits a byte stream of simple replies into lines (without `\r\n`);
/// panics on a trailing partial line. Error text may hold any byte but CR
/// and LF (Redis echoes unknown command names as they came).
fn lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("partial reply: {:?}", String::from_utf8_lossy(rest)));
        out.push(&rest[..end]);
        rest = &rest[end + 2..];
    }
    out
}

/// xorshift64*: deterministic garbage without a dependency.
struct Garbage(u64);

impl Garbage {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }
}

/// A client doing SET then GET on its own keys until stopped, recording
/// every error and its slowest command.
struct WellBehaved {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    max_latency: Arc<Mutex<Duration>>,
    thread: Option<JoinHandle<()>>,
}

impl WellBehaved {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let max_latency = Arc::new(Mutex::new(Duration::ZERO));
        let thread = {
            let (stop, ops, errors, max_latency) = (
                Arc::clone(&stop),
                Arc::clone(&ops),
                Arc::clone(&errors),
                Arc::clone(&max_latency),
            );
            std::thread::spawn(move || {
                let mut c = client(addr);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (k, v) = (format!("good:{}", i % 5000), format!("value-{i}"));
                    let started = Instant::now();
                    let set = c.call_str(&["SET", &k, &v]);
                    let get = c.call_str(&["GET", &k]);
                    let took = started.elapsed();
                    {
                        let mut max = max_latency.lock().expect("lock");
                        *max = (*max).max(took);
                    }
                    let want_get = format!("${}\r\n{v}\r\n", v.len());
                    match (set, get) {
                        (Ok(s), Ok(g)) if s == "+OK\r\n" && g == want_get => {}
                        (set, get) => {
                            errors
                                .lock()
                                .expect("lock")
                                .push(format!("op {i} ({k}): SET {set:?}, GET {get:?}"));
                            // Keep going on a fresh connection.
                            if let Ok(fresh) = RespClient::connect(addr) {
                                c = fresh;
                            }
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        };
        Self {
            stop,
            ops,
            errors,
            max_latency,
            thread: Some(thread),
        }
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Waits until the client has done `n` more commands pairs (proof it is
    /// not stuck), at most `timeout`.
    fn progresses(&self, what: &str, n: u64, timeout: Duration) {
        let start = self.ops();
        let deadline = Instant::now() + timeout;
        while self.ops() < start + n {
            assert!(
                Instant::now() < deadline,
                "{what}: the well-behaved client did only {} SET/GET in {timeout:?}; errors: {:?}",
                self.ops() - start,
                self.errors.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the client; returns (operations, errors, slowest operation).
    fn finish(mut self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("well-behaved client panicked");
        }
        let errors = std::mem::take(&mut *self.errors.lock().expect("lock"));
        let max = *self.max_latency.lock().expect("lock");
        (self.ops(), errors, max)
    }
}

impl Drop for WellBehaved {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn assert_alive(proxy: &mut Proxy, what: &str) {
    assert!(
        proxy.is_running(),
        "proxy died after {what}:\n{}",
        proxy.log()
    );
    let mut c = client(proxy.addr());
    assert_eq!(
        c.call_str(&["PING"])
            .unwrap_or_else(|e| panic!("PING after {what}: {e}")),
        "+PONG\r\n",
        "after {what}"
    );
}

fn protocol_errors(proxy: &Proxy) -> f64 {
    proxy.metric("redirector_client_protocol_errors_total")
}

#[test]
fn hostile_clients_do_not_hurt_others() {
    let cluster = RedisCluster::start_local(3, 1);
    let mut proxy = Proxy::start(&cluster.seeds(), &[]);
    let addr = proxy.addr();
    let good = WellBehaved::start(addr);
    good.progresses("warm-up", 100, Duration::from_secs(10));
    let rss_start = proxy.rss_kib();
    eprintln!("proxy RSS at start: {rss_start} KiB");

    // (a) 1 MB of random garbage: only error replies, ending in a protocol
    // error and a closed connection.
    let errors_before = protocol_errors(&proxy);
    for seed in [0x5eed_u64, 0xdead_beef, 42] {
        let mut s = raw(addr);
        let garbage = Garbage(seed).bytes(1024 * 1024);
        let mut w = s.try_clone().expect("clone");
        let writer = std::thread::spawn(move || {
            // The proxy may close before taking it all.
            let _ = w.write_all(&garbage);
        });
        let got = read_until_closed(&mut s, Duration::from_secs(20));
        writer.join().expect("garbage writer");
        let replies = lines(&got);
        for r in &replies {
            assert!(
                r.starts_with(b"-"),
                "garbage (seed {seed:#x}) got a non-error reply {:?}",
                String::from_utf8_lossy(r)
            );
        }
        let last = replies.last().map(|r| String::from_utf8_lossy(r));
        if let Some(last) = &last {
            assert!(
                last.starts_with("-ERR Protocol error") || last.starts_with("-ERR unknown command"),
                "garbage (seed {seed:#x}): last reply {last:?}"
            );
        }
        eprintln!(
            "(a) garbage seed {seed:#x}: {} error replies, last {:?}, then closed",
            replies.len(),
            last.map(|l| l.chars().take(60).collect::<String>())
        );
        good.progresses("(a) garbage", 20, Duration::from_secs(10));
    }
    assert!(
        protocol_errors(&proxy) >= errors_before + 3.0,
        "each garbage client counts as a protocol error: {} -> {}",
        errors_before,
        protocol_errors(&proxy)
    );
    assert_alive(&mut proxy, "(a) garbage");

    // (b) A 2 GiB bulk length: Redis' error, then the connection closes,
    // and nothing is allocated for it.
    let rss_before = proxy.rss_kib();
    for _ in 0..50 {
        let mut s = raw(addr);
        s.write_all(b"*1\r\n$2147483648\r\n").expect("send");
        let got = read_until_closed(&mut s, Duration::from_secs(10));
        assert_eq!(
            String::from_utf8_lossy(&got),
            "-ERR Protocol error: invalid bulk length\r\n"
        );
    }
    // Also a multibulk count no one could send.
    let mut s = raw(addr);
    s.write_all(b"*2147483648\r\n").expect("send");
    let got = read_until_closed(&mut s, Duration::from_secs(10));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    let rss_after = proxy.rss_kib();
    eprintln!("(b) 2 GiB bulk x50: RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 10 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    good.progresses("(b) huge bulk length", 20, Duration::from_secs(10));
    assert_alive(&mut proxy, "(b) huge bulk length");

    // (c) 10,000-deep nested arrays: a protocol error, no recursion.
    let mut s = raw(addr);
    s.write_all(&b"*1\r\n".repeat(10_000)).expect("send");
    let got = read_until_closed(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    eprintln!("(c) nested arrays: {text:?}");
    assert!(
        text.starts_with("-ERR Protocol error"),
        "nested arrays: {text:?}"
    );
    good.progresses("(c) nested arrays", 20, Duration::from_secs(10));
    assert_alive(&mut proxy, "(c) nested arrays");

    // (d) 200 half-sent SETs of a 100 kB value, idling; and a few promising
    // ~500 MB (under the 512 MB limit) to see the proxy does not allocate
    // on a promise.
    let mut half: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = raw(addr);
            s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nabc")
                .expect("send");
            s
        })
        .collect();
    for _ in 0..10 {
        let mut s = raw(addr);
        s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$500000000\r\nabc")
            .expect("send");
        half.push(s);
    }
    good.progresses("(d) half-sent frames", 200, Duration::from_secs(10));
    let rss_half = proxy.rss_kib();
    eprintln!("(d) 210 half-sent frames open: RSS {rss_half} KiB");
    assert!(
        rss_half < RSS_LIMIT_KIB,
        "RSS {rss_half} KiB with half-sent frames"
    );
    assert_alive(&mut proxy, "(d) half-sent frames");
    // Nobody got a reply to a command they did not finish.
    for s in &half {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        match (&*s).read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("half-sent frame got {other:?}"),
        }
    }
    drop(half);
    good.progresses("(d) after closing", 20, Duration::from_secs(10));

    // (e) 200k PINGs nobody reads: the proxy stops reading instead of
    // buffering replies, and everyone else carries on.
    const PINGS: usize = 200_000;
    let mut s = raw(addr);
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&b"*1\r\n$4\r\nPING\r\n".repeat(PINGS)));
    std::thread::sleep(Duration::from_secs(1));
    good.progresses("(e) unread pipeline", 200, Duration::from_secs(10));
    let rss_pipe = proxy.rss_kib();
    eprintln!("(e) unread pipeline of {PINGS} PINGs: RSS {rss_pipe} KiB");
    assert!(
        rss_pipe < RSS_LIMIT_KIB,
        "RSS {rss_pipe} KiB with an unread pipeline"
    );
    // Now read it all: every PING answered, in order, nothing lost.
    let want = b"+PONG\r\n".len() * PINGS;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    while got < want {
        let n = s.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "read PONGs: {e}: {} of {PINGS} PONGs arrived; the proxy answered {} PINGs in \
                 all and has stopped, with the rest of the pipeline already sent (writer done: {})",
                got / 7,
                proxy.metric(r#"redirector_commands_total{command="ping",outcome="ok"}"#),
                writer.is_finished(),
            )
        });
        assert!(n > 0, "closed after {got} of {want} bytes of PONGs");
        assert!(
            buf[..n]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == b"+PONG\r\n"[(got + i) % 7]),
            "not just PONGs"
        );
        got += n;
    }
    writer
        .join()
        .expect("pipeline writer")
        .expect("pipeline written");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let rest = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(rest.is_empty(), "extra bytes after the PONGs: {rest:?}");
    drop(s);
    assert_alive(&mut proxy, "(e) unread pipeline");

    // The same with replies far larger than any socket buffer: a million
    // GETs of a 10 kB value would be 10 GB of replies. The proxy must stop
    // reading (the writer blocks) instead of queueing them.
    const GETS: usize = 1_000_000;
    let mut c = client(addr);
    let big = "x".repeat(10_000);
    assert_eq!(
        c.call_str(&["SET", "big", &big]).expect("SET big"),
        "+OK\r\n"
    );
    drop(c);
    let s = raw(addr);
    let mut w = s.try_clone().expect("clone");
    let writer =
        std::thread::spawn(move || w.write_all(&b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(GETS)));
    std::thread::sleep(Duration::from_secs(2));
    good.progresses("(e) unread big replies", 200, Duration::from_secs(10));
    let rss_big = proxy.rss_kib();
    eprintln!("(e) unread pipeline of {GETS} GETs of 10 kB: RSS {rss_big} KiB");
    assert!(
        rss_big < RSS_LIMIT_KIB,
        "RSS {rss_big} KiB with an unread pipeline of big replies"
    );
    assert!(
        !writer.is_finished(),
        "the proxy read a 24 MB pipeline whose replies nobody reads: no backpressure"
    );
    // Hang up; the blocked writer fails, the proxy drops what it queued.
    s.shutdown(Shutdown::Both).expect("shutdown");
    assert!(
        writer.join().expect("pipeline writer").is_err(),
        "the whole pipeline was written"
    );
    drop(s);
    assert_alive(&mut proxy, "(e) unread big replies");

    let (ops, errors, max_latency) = good.finish();
    let rss_end = proxy.rss_kib();
    eprintln!(
        "well-behaved client: {ops} SET/GET pairs, {} errors, slowest pair {max_latency:?}; \
         proxy RSS {rss_start} -> {rss_end} KiB",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "well-behaved client saw errors: {errors:#?}"
    );
    assert!(
        max_latency < MAX_LATENCY,
        "a well-behaved SET/GET took {max_latency:?}"
    );
    assert!(
        rss_end < RSS_LIMIT_KIB,
        "proxy RSS {rss_end} KiB at the end"
    );
    assert!(proxy.is_running(), "proxy died:\n{}", proxy.log());
}

#[test]
fn idle_timeout_and_max_clients() {
    let cluster = RedisCluster::start_local(3, 0);

    // --idle-timeout 1s: an idle client is closed after about a second, a
    // busy one is not.
    let idle_proxy = Proxy::start(&cluster.seeds(), &["--idle-timeout", "1s"]);
    let mut idle = client(idle_proxy.addr());
    let mut busy = client(idle_proxy.addr());
    assert_eq!(idle.call_str(&["PING"]).expect("PING"), "+PONG\r\n");
    let started = Instant::now();
    let mut idle_stream = idle.stream().try_clone().expect("clone");
    for i in 0..10 {
        let k = format!("busy:{i}");
        assert_eq!(busy.call_str(&["SET", &k, "v"]).expect("SET"), "+OK\r\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    // By now (3 s) the idle client must be gone; the busy one is not.
    let got = read_until_closed(&mut idle_stream, Duration::from_millis(100));
    assert!(got.is_empty(), "idle client got {got:?}");
    eprintln!("idle client closed within {:?}", started.elapsed());
    assert_eq!(
        busy.call_str(&["GET", "busy:9"]).expect("busy GET"),
        "$1\r\nv\r\n"
    );
    // And it is closed after the timeout, not at once.
    let mut fresh = raw(idle_proxy.addr());
    let started = Instant::now();
    let got = read_until_closed(&mut fresh, Duration::from_secs(5));
    let after = started.elapsed();
    assert!(got.is_empty(), "idle client got {got:?}");
    eprintln!("a silent new client was closed after {after:?}");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "idle client closed after {after:?}, want about 1 s"
    );
    drop(idle_proxy);

    // --max-clients 5: the 6th gets Redis' error and is closed; once one
    // leaves, a new client is served again.
    let proxy = Proxy::start(&cluster.seeds(), &["--max-clients", "5"]);
    let mut five: Vec<RespClient> = (0..5).map(|_| client(proxy.addr())).collect();
    for c in &mut five {
        assert_eq!(c.call_str(&["PING"]).expect("PING"), "+PONG\r\n");
    }
    for _ in 0..3 {
        let mut sixth = raw(proxy.addr());
        let got = read_until_closed(&mut sixth, Duration::from_secs(5));
        assert_eq!(
            String::from_utf8_lossy(&got),
            "-ERR max number of clients reached\r\n"
        );
    }
    assert!(
        proxy.metric("redirector_client_connections_rejected_total{reason=\"max_clients\"}") >= 3.0,
        "{}",
        proxy.metrics()
    );
    // The five are unaffected.
    for c in &mut five {
        assert_eq!(c.call_str(&["PING"]).expect("PING"), "+PONG\r\n");
    }
    drop(five.pop());
    let mut replaced =
        testbed::process::wait_for("a client slot to free up", Duration::from_secs(5), || {
            let mut c = client(proxy.addr());
            match c.call_str(&["PING"]) {
                Ok(r) if r == "+PONG\r\n" => Some(c),
                _ => None,
            }
        });
    assert_eq!(
        replaced.call_str(&["SET", "after", "limit"]).expect("SET"),
        "+OK\r\n"
    );
}
