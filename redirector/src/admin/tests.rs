//! The admin server and client over real loopback sockets, in process.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Instant,
};

use super::*;

struct Running {
    addrs: Vec<SocketAddr>,
    registry: Arc<MetricsRegistry>,
    health: Arc<Health>,
    _server: AdminServer,
}

fn start(scopes: &[Scope], limits: Limits) -> Running {
    let registry = Arc::new(MetricsRegistry::new());
    let health = Arc::new(Health::default());
    let listeners: Vec<_> = scopes
        .iter()
        .map(|scope| (bind(([127, 0, 0, 1], 0).into()).expect("bind"), *scope))
        .collect();
    let addrs = listeners
        .iter()
        .map(|(l, _)| l.local_addr().expect("local addr"))
        .collect();
    let server = AdminServer::start(
        listeners,
        limits,
        Arc::clone(&registry),
        Arc::clone(&health),
    )
    .expect("start the admin server");
    Running {
        addrs,
        registry,
        health,
        _server: server,
    }
}

fn get(addr: SocketAddr, method: Method, path: &str) -> client::Reply {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(client::request(addr, method, path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn rejected(running: &Running, listener: &str, reason: &str) -> f64 {
    let wanted =
        format!("redirector_admin_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}} ");
    running
        .registry
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&wanted)?.parse().ok())
        .unwrap_or_else(|| panic!("no {wanted}"))
}

/// Reads until the server closes; the whole reply.
fn read_all(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn every_endpoint_answers_through_hyper_as_before() {
    let running = start(&[Scope::Full, Scope::MetricsOnly], Limits::default());
    let (full, metrics_only) = (running.addrs[0], running.addrs[1]);

    let live = get(full, Method::GET, "/healthz/live");
    assert_eq!(
        (live.status, live.body.as_str()),
        (StatusCode::OK, "live\n")
    );
    let installing = get(full, Method::GET, "/healthz/ready");
    assert_eq!(installing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(installing.body, "not ready: installing\n");
    running.health.set_ready();
    assert_eq!(
        get(full, Method::GET, "/healthz/ready").status,
        StatusCode::OK
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(full, Method::GET, "/status").body).expect("JSON");
    assert_eq!(status["ready"], true);
    assert_eq!(status["draining"], false);
    let metrics = get(full, Method::GET, "/metrics");
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.body.contains("redirector_admin_connections_active"));
    assert!(get(full, Method::GET, "/dashboard").body.contains("<html"));
    assert_eq!(
        get(full, Method::GET, "/nothing").status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(full, Method::PUT, "/metrics").status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // The network-facing listener: /metrics, and nothing else.
    assert_eq!(
        get(metrics_only, Method::GET, "/metrics").status,
        StatusCode::OK
    );
    let refused = get(metrics_only, Method::POST, "/drain");
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert!(!running.health.is_draining());

    let drained = get(full, Method::POST, "/drain");
    assert_eq!(
        (drained.status, drained.body.as_str()),
        (StatusCode::OK, "draining\n")
    );
    let ready = get(full, Method::GET, "/healthz/ready");
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
}

#[test]
fn an_oversized_header_gets_431_and_is_counted() {
    let running = start(&[Scope::Full], Limits::default());
    let mut stream = TcpStream::connect(running.addrs[0]).expect("connect");
    let filler = "a".repeat(20 * 1024);
    // The server may answer and close before the whole header is sent.
    let _ = write!(
        stream,
        "GET /healthz/live HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n"
    );
    let reply = read_all(&mut stream);
    assert!(
        reply.starts_with("HTTP/1.1 431 "),
        "an oversized header got {reply:?}"
    );
    // Counted once hyper's connection ends, which may be just after the
    // client read the close.
    wait_until(|| rejected(&running, "admin", "header_too_large") == 1.0);
    // A header under the limit is served.
    let mut stream = TcpStream::connect(running.addrs[0]).expect("connect");
    let filler = "a".repeat(12 * 1024);
    write!(
        stream,
        "GET /healthz/live HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n"
    )
    .expect("send");
    assert!(read_all(&mut stream).starts_with("HTTP/1.1 200 "));
}

#[test]
fn a_connection_over_the_cap_is_closed_at_once_and_counted() {
    let running = start(
        &[Scope::Full],
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    let addr = running.addrs[0];
    let _idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    // The two idle ones are accepted and hold both slots.
    wait_until(|| active(&running) == 2.0);
    let mut third = TcpStream::connect(addr).expect("the kernel accepts it");
    let started = Instant::now();
    assert_eq!(read_all(&mut third), "", "closed without a reply");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(rejected(&running, "admin", "max_connections"), 1.0);
}

#[test]
fn a_slowloris_client_is_closed_at_the_header_timeout() {
    let running = start(
        &[Scope::Full],
        Limits {
            header_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
    );
    let mut stream = TcpStream::connect(running.addrs[0]).expect("connect");
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /healthz/live HTTP/1.1\r\nHost: slow\r\n"
        .iter()
        .cycle()
        .take(10)
    {
        if stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let reply = read_all(&mut stream);
    assert!(closed || !reply.contains(" 200 "), "got {reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        started.elapsed()
    );
    wait_until(|| rejected(&running, "admin", "header_timeout") == 1.0);
}

#[test]
fn a_post_body_over_the_limit_gets_413() {
    let running = start(&[Scope::Full], Limits::default());
    let mut stream = TcpStream::connect(running.addrs[0]).expect("connect");
    let body = "x".repeat(64 * 1024);
    let _ = write!(
        stream,
        "POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = read_all(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 413 "), "got {reply:?}");
    assert!(!running.health.is_draining(), "refused, so not drained");
    assert_eq!(rejected(&running, "admin", "body_too_large"), 1.0);
}

#[test]
fn a_request_whose_body_never_comes_is_closed_at_the_request_timeout() {
    let running = start(
        &[Scope::Full],
        Limits {
            request_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
    );
    let mut stream = TcpStream::connect(running.addrs[0]).expect("connect");
    // Headers complete (the header timeout is met), the body promised and
    // never sent.
    write!(
        stream,
        "POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    )
    .expect("send");
    let started = Instant::now();
    let reply = read_all(&mut stream);
    let took = started.elapsed();
    assert!(!reply.contains(" 200 "), "got {reply:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(!running.health.is_draining());
    wait_until(|| rejected(&running, "admin", "request_timeout") == 1.0);
}

fn active(running: &Running) -> f64 {
    running
        .registry
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix("redirector_admin_connections_active{listener=\"admin\"} ")?
                .parse()
                .ok()
        })
        .unwrap_or_default()
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "not within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}
