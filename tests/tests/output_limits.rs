//! `client-output-buffer-limit` for the proxy's own clients: a subscriber
//! that never reads, under a publishing flood, is dropped and counted, the
//! proxy's memory stays bounded and other clients are not slowed; the soft
//! limit drops a client after its seconds even when traffic stops; a
//! pipeliner over a normal-class limit set with CONFIG SET is dropped too.
//! Real `redis-server` nodes and the real proxy on 127.0.0.1.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use testbed::{
    cluster::RedisCluster,
    proxy::Proxy,
    resp::{RespClient, encode},
};

/// Bytes of one published message.
const MESSAGE: usize = 16 * 1024;

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// A client subscribed to `channel` that will not read again.
fn deaf_subscriber(addr: SocketAddr, channel: &str) -> TcpStream {
    let mut sub = client(addr);
    assert_eq!(
        sub.call_str(&["SUBSCRIBE", channel]).expect("SUBSCRIBE"),
        format!(
            "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
            channel.len()
        )
    );
    sub.stream().try_clone().expect("clone")
}

/// Receivers of one PUBLISH of `message` (the node's count).
fn publish(publisher: &mut RespClient, channel: &str, message: &str) -> i64 {
    let reply = publisher
        .call_str(&["PUBLISH", channel, message])
        .expect("PUBLISH");
    reply
        .strip_prefix(':')
        .and_then(|n| n.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("PUBLISH answered {reply:?}"))
}

/// Reads until the proxy closes the connection; panics if it is still open
/// after `timeout`. Returns the bytes read.
fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = Instant::now() + timeout;
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return total;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the connection is still open after {timeout:?} ({total} bytes read)"
        );
    }
}

/// A well-behaved client doing SET/GET in a loop: its slowest round trip
/// and any error.
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Duration, Vec<String>)>,
}

impl Bystander {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut c = client(addr);
            let (mut ops, mut slowest, mut errors) = (0u64, Duration::ZERO, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let value = ops.to_string();
                match c
                    .call_str(&["SET", "bystander", &value])
                    .and_then(|_| c.call_str(&["GET", "bystander"]))
                {
                    Ok(got) if got == format!("${}\r\n{value}\r\n", value.len()) => {}
                    Ok(got) => errors.push(format!("GET gave {got:?}, wanted {value}")),
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
                slowest = slowest.max(started.elapsed());
                ops += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (ops, slowest, errors)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (u64, Duration, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("bystander")
    }
}

#[test]
fn a_subscriber_that_never_reads_is_dropped_under_a_publishing_flood_and_nobody_else_notices() {
    let cluster = RedisCluster::start_local(3, 0);
    let mut proxy = Proxy::start(
        &cluster.seeds(),
        &["--client-output-buffer-limit", "pubsub 4mb 0 0"],
    );
    let addr = proxy.addr();
    let mut deaf = deaf_subscriber(addr, "flood");
    // Keep the kernel's share small, so the proxy's own buffer is what fills.
    nix::sys::socket::setsockopt(&deaf, nix::sys::socket::sockopt::RcvBuf, &(64 * 1024))
        .expect("SO_RCVBUF");
    let rss_before = proxy.rss_kib();
    let bystander = Bystander::start(addr);

    let mut publisher = client(addr);
    let message = "m".repeat(MESSAGE);
    // Unbounded, the proxy would hold all of it: 512 MiB.
    const MAX_PUBLISHED: usize = 512 * 1024 * 1024;
    let mut published = 0;
    let mut rss_peak = rss_before;
    while publish(&mut publisher, "flood", &message) > 0 {
        published += MESSAGE;
        if published % (1024 * 1024) == 0 {
            rss_peak = rss_peak.max(proxy.rss_kib());
        }
        assert!(
            published < MAX_PUBLISHED,
            "a subscriber that reads nothing still subscribed after {published} bytes; \
             proxy RSS {} KiB",
            proxy.rss_kib()
        );
    }
    eprintln!(
        "dropped after {} MiB published; RSS {rss_before} KiB before, peak {rss_peak} KiB",
        published / (1024 * 1024)
    );
    let (ops, slowest, errors) = bystander.finish();
    assert!(errors.is_empty(), "the bystander saw errors: {errors:?}");
    assert!(ops > 0, "the bystander did nothing");
    assert!(
        slowest < Duration::from_secs(1),
        "a bystander's SET+GET took {slowest:?} during the flood"
    );
    assert!(
        rss_peak < rss_before + 48 * 1024,
        "proxy RSS grew from {rss_before} to {rss_peak} KiB over a 4 MiB limit"
    );
    // What was in the socket buffers arrives, then the close.
    let read = read_until_closed(&mut deaf, Duration::from_secs(10));
    assert!(read < published, "read {read} of {published} bytes");
    assert_eq!(
        proxy.metric(
            r#"redirector_client_output_buffer_limit_disconnections_total{class="pubsub"}"#
        ),
        1.0
    );
    assert_eq!(
        proxy.metric(
            r#"redirector_client_output_buffer_limit_disconnections_total{class="normal"}"#
        ),
        0.0
    );
    assert!(
        proxy
            .log()
            .contains("client closed for overcoming of output buffer limits"),
        "no log line for the drop"
    );
    // The channel still works for a subscriber that reads.
    let mut reader = client(addr);
    reader.call_str(&["SUBSCRIBE", "flood"]).expect("SUBSCRIBE");
    assert_eq!(publish(&mut publisher, "flood", "after"), 1);
    assert_eq!(
        reader.read_reply().expect("message").as_ref(),
        b"*3\r\n$7\r\nmessage\r\n$5\r\nflood\r\n$5\r\nafter\r\n"
    );
    assert!(proxy.is_running(), "proxy died:\n{}", proxy.log());
}

#[test]
fn a_subscriber_over_its_soft_limit_is_dropped_after_its_seconds_even_when_traffic_stops() {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(
        &cluster.seeds(),
        &["--client-output-buffer-limit", "pubsub 0 256kb 3"],
    );
    let addr = proxy.addr();
    let mut deaf = deaf_subscriber(addr, "soft");
    nix::sys::socket::setsockopt(&deaf, nix::sys::socket::sockopt::RcvBuf, &(64 * 1024))
        .expect("SO_RCVBUF");
    let mut publisher = client(addr);
    let message = "s".repeat(MESSAGE);
    // Far more than the socket buffers and the soft limit hold, quickly.
    let started = Instant::now();
    for _ in 0..(16 * 1024 * 1024 / MESSAGE) {
        assert_eq!(publish(&mut publisher, "soft", &message), 1);
    }
    let flood = started.elapsed();
    assert!(
        flood < Duration::from_secs(2),
        "the flood took {flood:?}: too slow to tell early from late"
    );
    // Over the soft limit, but not for 3 s yet: still subscribed.
    assert_eq!(publish(&mut publisher, "soft", "x"), 1, "dropped too early");
    // No more traffic: dropped once over it for more than 3 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dropped = || {
        proxy
            .metric(r#"redirector_client_output_buffer_limit_disconnections_total{class="pubsub"}"#)
    };
    while dropped() == 0.0 {
        assert!(
            Instant::now() < deadline,
            "still subscribed 10 s after going over the soft limit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = started.elapsed();
    assert!(
        after >= Duration::from_secs(3),
        "dropped after {after:?}, before its 3 soft seconds"
    );
    read_until_closed(&mut deaf, Duration::from_secs(10));
    assert_eq!(publish(&mut publisher, "soft", "x"), 0);
}

#[test]
fn a_pipeliner_not_reading_is_dropped_over_a_normal_limit_set_with_config_set_that_the_nodes_never_see()
 {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let addr = proxy.addr();
    let mut admin = client(addr);
    // Redis's defaults until set.
    assert_eq!(
        admin
            .call_str(&["CONFIG", "GET", "client-output-buffer-limit"])
            .expect("CONFIG GET"),
        "*2\r\n$26\r\nclient-output-buffer-limit\r\n$67\r\nnormal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60\r\n"
    );
    // The nodes validate it, with Redis's errors.
    let refused = admin
        .call_str(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "normal 1mbs 0 0",
        ])
        .expect("CONFIG SET");
    assert!(refused.starts_with("-ERR"), "{refused:?}");
    assert_eq!(
        admin
            .call_str(&[
                "CONFIG",
                "SET",
                "client-output-buffer-limit",
                "normal 1mb 0 0"
            ])
            .expect("CONFIG SET"),
        "+OK\r\n"
    );
    // The proxy's own setting: a node holding it would cut the proxy's
    // pooled connections, which carry many clients' replies together.
    assert_eq!(
        admin
            .call_str(&["CONFIG", "GET", "client-output-buffer-limit"])
            .expect("CONFIG GET"),
        "*2\r\n$26\r\nclient-output-buffer-limit\r\n$73\r\nnormal 1048576 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60\r\n"
    );
    for node in cluster.nodes() {
        assert_eq!(
            cluster
                .cli(node, &["CONFIG", "GET", "client-output-buffer-limit"])
                .trim(),
            "client-output-buffer-limit\nnormal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60",
            "{node} kept its own"
        );
    }
    let big = "b".repeat(100_000);
    admin.call_str(&["SET", "big", &big]).expect("SET big");
    // Clients that read their replies, each owed less than the limit and
    // together more: every one is served (on shared connections, which a
    // node holding the limit cut over and over).
    let readers: Vec<_> = (0..24)
        .map(|_| {
            let expected = format!("${}\r\n{big}\r\n", big.len());
            std::thread::spawn(move || {
                let mut c = client(addr);
                for _ in 0..3 {
                    assert_eq!(c.call_str(&["GET", "big"]).expect("GET big"), expected);
                }
            })
        })
        .collect();
    for reader in readers {
        reader
            .join()
            .expect("a client reading its replies got them all");
    }

    // 1000 GETs of 100 kB, none read: 100 MB owed, over 1 MiB.
    let mut s = TcpStream::connect(addr).expect("connect");
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &(64 * 1024))
        .expect("SO_RCVBUF");
    let pipeline = encode(&[b"GET", b"big"]).repeat(1000);
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&pipeline));
    // Not reading, while the replies pile up at the proxy.
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy
        .metric(r#"redirector_client_output_buffer_limit_disconnections_total{class="normal"}"#)
        == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "a client owed 100 MB is still connected after 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let read = read_until_closed(&mut s, Duration::from_secs(20));
    assert!(
        read < 100 * 1_000_000,
        "read {read} bytes: every reply came"
    );
    let _ = writer.join().expect("writer");
    assert_eq!(
        proxy.metric(
            r#"redirector_client_output_buffer_limit_disconnections_total{class="normal"}"#
        ),
        1.0
    );
    // A client that reads its replies is never near the limit.
    assert_eq!(
        admin.call_str(&["GET", "big"]).expect("GET big"),
        format!("${}\r\n{big}\r\n", big.len())
    );
}
