//! Idle clients cost almost nothing: 10k connections that each sent one
//! GET and went quiet, through the real proxy in front of a real Redis.
//! A regression guard with a generous margin over the figure README
//! documents (measured on the release build), not the benchmark.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::Duration,
};

use testbed::{TempDir, ports::free_port, process::Place, proxy::Proxy, redis::RedisServer};

const CLIENTS: usize = 10_000;
/// README: about 2.0 KiB per idle client (release and debug alike). Twice
/// that, so the guard catches what matters, such as a buffer or channel
/// per idle client coming back (they cost 14 KiB), or a session future or
/// per-client collection that doubles, not allocator noise.
const MAX_BYTES_PER_CLIENT: u64 = 4 * 1024;

/// Lets this process hold the clients: the soft open-files limit up to the
/// hard one, which must be high enough (fails loudly otherwise).
fn raise_fd_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= needed,
        "the hard open-files limit {hard} is below the {needed} this test needs"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

fn get(stream: &mut TcpStream) {
    stream
        .write_all(b"*2\r\n$3\r\nGET\r\n$4\r\nidle\r\n")
        .expect("send GET");
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).expect("reply");
    assert_eq!(&reply[..n], b"$1\r\nv\r\n");
}

#[test]
fn ten_thousand_idle_clients_stay_within_the_documented_memory() {
    raise_fd_limit(CLIENTS as u64 + 500);
    let dir = TempDir::new("rdr-idle-");
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let redis = RedisServer::start(
        &Place::default(),
        &[localhost],
        free_port(),
        dir.path(),
        &["--maxclients", "1000"],
    );
    redis.cli(&["SET", "idle", "v"]);
    let proxy = Proxy::start_standalone(
        redis.addr(),
        &[],
        &["--max-clients", "20000", "--max-clients-per-source", "0"],
    );
    // Warm: pools, the command table, the first allocations.
    let mut warm = TcpStream::connect(proxy.addr()).expect("connect");
    for _ in 0..100 {
        get(&mut warm);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = proxy.rss_kib();
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
        get(&mut stream);
        clients.push(stream);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = proxy.rss_kib();
    let per_client = (after.saturating_sub(before)) * 1024 / CLIENTS as u64;
    println!("{CLIENTS} idle clients: RSS {before} -> {after} KiB, {per_client} bytes each");
    assert!(
        per_client <= MAX_BYTES_PER_CLIENT,
        "{per_client} bytes of RSS per idle client (bound {MAX_BYTES_PER_CLIENT})"
    );
    // Idle, not stuck: each still gets an answer, and on the same
    // upstream connections (one shared connection, nothing per client).
    for stream in clients.iter_mut().step_by(1000) {
        get(stream);
    }
    let upstream = redis.cli(&["CLIENT", "LIST"]).lines().count();
    assert!(
        upstream < 20,
        "{upstream} upstream connections for idle clients"
    );
    drop(clients);
    drop(proxy);
}
