//! What an idle client costs the proxy: RSS per connection that sent one
//! `GET` and went quiet (a PHP-FPM or Node.js pool between requests), at
//! 10k and 50k clients, release build, against one `redis-server`.
//!
//! `tests/tests/idle_clients.rs` guards the same figure loosely at 10k; this
//! is the measurement, with the target. Both ends need a socket per client:
//! a count above the hard open-files limit (which only `CAP_SYS_RESOURCE`
//! raises) is reported as not measurable, and counted as MISSED.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use testbed::{TempDir, ports::free_port, process::Place, proxy::Proxy, redis::RedisServer};

/// The bound: half predixy's 4.6 KiB.
const TARGET_BYTES: u64 = 2 * 1024;
const COUNTS: [u64; 2] = [10_000, 50_000];
/// Sockets besides the clients' (the proxy's own, the harness's).
const SPARE_FDS: u64 = 500;

const GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$4\r\nidle\r\n";
const VALUE: &[u8] = b"$1\r\nv\r\n";

/// Prints bytes of RSS per idle client for each count, with MISSED where
/// over the target or not measurable; `Ok` either way (a bench reports).
pub fn idle_clients() -> Result<()> {
    println!("\n== idle clients: proxy RSS per client that sent one GET and went quiet");
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    // The proxy raises its own soft limit to the hard one at start.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    for count in COUNTS {
        if count + SPARE_FDS > hard {
            println!(
                "  {count:>6} clients: not measurable here: the hard open-files limit is {hard} (raising it needs CAP_SYS_RESOURCE)  MISSED"
            );
            continue;
        }
        let per_client = measure(count)?;
        let verdict = if per_client <= TARGET_BYTES {
            "ok"
        } else {
            "MISSED"
        };
        println!(
            "  {count:>6} clients: {per_client} bytes each (target {TARGET_BYTES})  {verdict}"
        );
    }
    Ok(())
}

/// RSS growth of a fresh proxy over `count` idle clients, per client.
fn measure(count: u64) -> Result<u64> {
    let dir = TempDir::new("rdr-bench-idle-");
    let redis = RedisServer::start(
        &Place::default(),
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        free_port(),
        dir.path(),
        &["--maxclients", "1000"],
    );
    redis.cli(&["SET", "idle", "v"]);
    let max = (count + SPARE_FDS).to_string();
    let proxy = Proxy::start_standalone(
        redis.addr(),
        &[],
        &["--max-clients", &max, "--max-clients-per-source", "0"],
    );
    // Warm: pools, the command table, the first allocations.
    let mut warm = TcpStream::connect(proxy.addr()).context("connect")?;
    for _ in 0..100 {
        get(&mut warm)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = proxy.rss_kib();
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut stream = TcpStream::connect(proxy.addr()).context("connect")?;
        get(&mut stream)?;
        clients.push(stream);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = proxy.rss_kib();
    drop(clients);
    Ok(after.saturating_sub(before) * 1024 / count)
}

fn get(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(GET).context("send GET")?;
    let mut reply = [0u8; 16];
    let n = stream.read(&mut reply).context("read the reply")?;
    if &reply[..n] != VALUE {
        bail!(
            "GET idle answered {:?}",
            String::from_utf8_lossy(&reply[..n])
        );
    }
    Ok(())
}
