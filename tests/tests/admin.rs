//! The admin port under hostile clients. A slowloris client and an
//! oversized header on the admin listener, and one idle connection more
//! than the network-facing metrics listener allows, neither slow
//! `/healthz/live` nor Redis commands through the proxy, and each is turned
//! away by its limit and counted. Real redis-server, the real proxy binary,
//! loopback sockets only.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use testbed::{TempDir, ports::free_port, proxy::Proxy, redis::RedisServer, resp::RespClient};

/// The daemon's limits (`admin::Limits::default()`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;
/// What "promptly" means on a shared 2-core machine: far below the
/// header timeout a stalled admin port would show.
const PROMPT: Duration = Duration::from_secs(1);

/// The proxy first, so it stops before the server it fronts.
struct Setup {
    proxy: Proxy,
    metrics_addr: SocketAddr,
    _server: RedisServer,
    _dir: TempDir,
}

fn setup() -> Setup {
    let dir = TempDir::new("rdr-admin-");
    let server = RedisServer::start_local(dir.path(), &[]);
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Proxy::start_standalone(
        server.addr(),
        &[],
        &["--metrics-addr", &metrics_addr.to_string()],
    );
    Setup {
        proxy,
        metrics_addr,
        _server: server,
        _dir: dir,
    }
}

/// `GET path` as the kubelet's probes send it: the time to the whole reply,
/// and the reply.
fn timed_get(addr: SocketAddr, path: &str) -> (Duration, String) {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    (started.elapsed(), reply)
}

/// Sends a request's header one byte a second, never ending it, until the
/// server closes: how long that took, and what it answered (if anything).
fn slowloris(addr: SocketAddr) -> thread::JoinHandle<(Duration, String)> {
    thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).expect("slowloris connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("read timeout");
        let started = Instant::now();
        let head = b"GET /healthz/live HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the slowloris connection was never closed"
            );
            if stream.write_all(&[*byte]).is_err() {
                return (started.elapsed(), String::new());
            }
            let mut reply = [0u8; 1024];
            match stream.read(&mut reply) {
                Ok(n) => {
                    return (
                        started.elapsed(),
                        String::from_utf8_lossy(&reply[..n]).into_owned(),
                    );
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // Reset: closed too.
                Err(_) => return (started.elapsed(), String::new()),
            }
        }
        unreachable!("the header never ends")
    })
}

/// Whether the server has closed `stream` (without reading past a reply).
fn is_closed(mut stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(index).copied().unwrap_or_default()
}

#[test]
fn slowloris_oversized_headers_and_a_connection_flood_leave_healthz_and_the_data_path_prompt() {
    let setup = setup();
    let proxy = &setup.proxy;
    let admin = proxy.admin_addr();

    // Served on its own thread, beside the data path's.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).expect("tasks");
    let names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    // The kernel keeps 15 bytes of a thread's name.
    assert!(
        names.iter().any(|n| n == &"redirector-admin"[..15]),
        "no redirector-admin thread among {names:?}"
    );

    // One connection more than the metrics listener allows, all idle: the
    // last is closed at once, the others hold their slots until the header
    // timeout.
    let flood_started = Instant::now();
    let flood: Vec<TcpStream> = (0..=MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(setup.metrics_addr).expect("flood connect"))
        .collect();
    let slowloris = slowloris(admin);

    // A header over 16 KiB on the admin listener.
    let mut big = TcpStream::connect(admin).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let filler = "a".repeat(32 * 1024);
    // The server may answer and close before the whole header is sent.
    let _ = write!(
        big,
        "GET /healthz/live HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n"
    );
    let mut oversized = Vec::new();
    let _ = big.read_to_end(&mut oversized);
    let oversized = String::from_utf8_lossy(&oversized);
    assert!(
        oversized.starts_with("HTTP/1.1 431 "),
        "an oversized header got {oversized:?}"
    );

    // While the hostile clients hold on: probes and Redis commands.
    let mut redis = RespClient::connect(proxy.addr()).expect("connect to the proxy");
    let (mut healthz, mut pings) = (Vec::new(), Vec::new());
    let mut refused_at_once = None;
    while !slowloris.is_finished() {
        let (took, reply) = timed_get(admin, "/healthz/live");
        assert!(
            reply.starts_with("HTTP/1.1 200 ") && reply.ends_with("live\n"),
            "/healthz/live: {reply:?}"
        );
        healthz.push(took);
        let started = Instant::now();
        assert_eq!(redis.call_str(&["PING"]).expect("PING"), "+PONG\r\n");
        pings.push(started.elapsed());
        if refused_at_once.is_none() {
            let closed = flood.iter().filter(|s| is_closed(s)).count();
            if closed > 0 {
                refused_at_once = Some((closed, flood_started.elapsed()));
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let (slowloris_closed_after, slowloris_reply) = slowloris.join().expect("slowloris thread");

    let (healthz_p50, healthz_max) = (percentile(&mut healthz, 0.5), percentile(&mut healthz, 1.0));
    let (ping_p50, ping_max) = (percentile(&mut pings, 0.5), percentile(&mut pings, 1.0));
    eprintln!(
        "under attack: /healthz/live p50 {healthz_p50:?} max {healthz_max:?} ({} probes), \
         PING p50 {ping_p50:?} max {ping_max:?}; slowloris closed after {slowloris_closed_after:?}; \
         flood: {refused_at_once:?} closed at once",
        healthz.len()
    );
    assert!(
        healthz.len() >= 10,
        "only {} probes ran while the slowloris client held on",
        healthz.len()
    );
    assert!(
        healthz_max < PROMPT,
        "/healthz/live took {healthz_max:?} under attack"
    );
    assert!(ping_max < PROMPT, "PING took {ping_max:?} under attack");

    // The slowloris connection: closed by the header timeout, unanswered.
    assert!(
        slowloris_closed_after >= HEADER_TIMEOUT - Duration::from_millis(500)
            && slowloris_closed_after < HEADER_TIMEOUT + Duration::from_secs(2),
        "slowloris closed after {slowloris_closed_after:?}"
    );
    assert!(
        !slowloris_reply.contains(" 200 "),
        "slowloris got {slowloris_reply:?}"
    );

    // The flood: exactly one closed at once, the rest at the header timeout.
    let (closed_at_once, when) = refused_at_once.expect("no flood connection was closed");
    assert_eq!(closed_at_once, 1, "closed at once");
    assert!(
        when < PROMPT,
        "the extra connection was closed after {when:?}"
    );
    let deadline = flood_started + HEADER_TIMEOUT + Duration::from_secs(3);
    while !flood.iter().all(is_closed) {
        assert!(
            Instant::now() < deadline,
            "idle connections outlived the header timeout"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Slots free again: the metrics listener serves.
    let (_, scrape) = timed_get(setup.metrics_addr, "/metrics");
    assert!(scrape.starts_with("HTTP/1.1 200 "), "scrape: {scrape:?}");

    // Each turned away by its limit, and counted.
    let metrics = proxy.metrics();
    let counted = |listener: &str, reason: &str| {
        testbed::http::sample(
            &metrics,
            &format!(
                "redirector_admin_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(counted("metrics", "max_connections"), 1.0);
    assert_eq!(counted("metrics", "header_timeout"), MAX_CONNECTIONS as f64);
    assert_eq!(counted("admin", "header_too_large"), 1.0);
    assert_eq!(counted("admin", "header_timeout"), 1.0);
    assert_eq!(counted("admin", "max_connections"), 0.0);
}
