//! Idle clients through the real proxy in front of a real `redis-server`:
//! connections that each sent one `GET` and went quiet (a PHP-FPM or
//! Node.js pool between requests), and the proxy RSS they cost. Shared by
//! the regression guard (`tests/tests/idle_clients.rs`) and the bench
//! (`cargo xtask bench --only idle`).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::{TempDir, proxy::Proxy, redis::RedisServer};

/// Sockets besides the clients' (the proxy's own, the harness's).
pub const SPARE_FDS: u64 = 500;

/// Raises this process's soft open-files limit to the hard one (as the
/// daemon does at start) and returns it: both ends need a socket per
/// client.
pub fn raise_open_files_limit() -> u64 {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// `count` idle clients, and what the proxy's RSS grew by for them. Fields
/// drop in order: the clients close before the proxy and Redis stop.
pub struct IdleClients {
    pub clients: Vec<TcpStream>,
    pub proxy: Proxy,
    pub redis: RedisServer,
    pub before_kib: u64,
    pub after_kib: u64,
    _dir: TempDir,
}

impl IdleClients {
    /// A fresh proxy, warmed, then `count` clients that each send one `GET`
    /// and go quiet.
    pub fn open(count: u64) -> Self {
        let dir = TempDir::new("rdr-idle-");
        let redis = RedisServer::start_local(dir.path(), &["--maxclients", "1000"]);
        redis.cli(&["SET", "idle", "v"]);
        let max = (count + SPARE_FDS).to_string();
        let proxy = Proxy::start_standalone(
            redis.addr(),
            &[],
            &["--max-clients", &max, "--max-clients-per-source", "0"],
        );
        // Warm: pools, the command table, the first allocations.
        let mut warm = TcpStream::connect(proxy.addr()).expect("connect");
        for _ in 0..100 {
            get(&mut warm);
        }
        std::thread::sleep(Duration::from_millis(300));
        let before_kib = proxy.rss_kib();
        let clients = (0..count)
            .map(|_| {
                let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
                get(&mut stream);
                stream
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let after_kib = proxy.rss_kib();
        Self {
            clients,
            proxy,
            redis,
            before_kib,
            after_kib,
            _dir: dir,
        }
    }

    /// Bytes of proxy RSS per idle client.
    pub fn bytes_per_client(&self) -> u64 {
        self.after_kib.saturating_sub(self.before_kib) * 1024 / self.clients.len().max(1) as u64
    }
}

/// One `GET idle` on `stream`, answered with the value set at start.
pub fn get(stream: &mut TcpStream) {
    stream
        .write_all(b"*2\r\n$3\r\nGET\r\n$4\r\nidle\r\n")
        .expect("send GET");
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).expect("reply");
    assert_eq!(&reply[..n], b"$1\r\nv\r\n");
}
