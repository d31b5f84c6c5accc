//! The chaos soak: mixed traffic through the real proxy into a real 3+3
//! Redis Cluster, each node in its own network namespace with a redirector
//! of its own serving HBONE, so every upstream connection of the proxy is
//! a stream in an mTLS tunnel to the node's peer. Faults arrive on a
//! schedule, some inside others (slot migration, manual failover, kill -9
//! of a master, SIGKILL of the proxy, SIGKILL of an HBONE peer, a node's
//! link down for 3 s). Every acknowledged write goes in a ledger and is
//! read back at the end through the proxy and from the owning master. A
//! direct cluster-aware client runs beside ours under the same faults, as
//! the yardstick for what a crash loses in Redis itself.
//!
//! `SOAK_MINUTES` (default 2) sets the load's length; `cargo xtask soak
//! --minutes N` runs this test with it. The report is printed and written
//! to `target/soak/`.
//!
//! Network: the nodes, their peers, the proxy and every client live in
//! namespaces made here (a hub with a bridge, one namespace per node) with
//! no route out.

use std::{
    collections::HashMap,
    fs::File,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use testbed::{
    TempDir,
    cluster::{RedisCluster, SLOTS, parse_cluster_nodes, slot_of},
    daemon::binary,
    netns::Netns,
    process::{Child, Place, path_str, run_ok, wait_for},
    resp::{RespClient, encode},
    soak::{
        self, ClientError, FaultKind, Lane, Ledger, Planned, Report, Resources, Window, check_leak,
    },
    two_nodes::mint_node_certs,
    unique,
};

/// The hub's bridge address: the proxy and the clients live there.
const HUB_IP: &str = "10.78.0.1";
const REDIS_PORT: u16 = 6379;
const PROXY_PORT: u16 = 16379;
const NODES: usize = 6;
/// Slots moved by each migration.
const MIGRATED_SLOTS: usize = 500;
/// How long a link stays down.
const LINK_DOWN: Duration = Duration::from_secs(3);
/// Keys per writer: each cycles over its own.
const KEYS_PER_WRITER: u64 = 2_000;
/// Commands per pipelined batch.
const BATCH: u64 = 20;
/// After the load stops, the proxy idles this long before the leak check.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
/// Latency is reported per bucket of this length.
const LATENCY_BUCKET: Duration = Duration::from_secs(10);
/// A sequential writer has at most one write in flight when a master dies,
/// so its count of writes lost in a crash can differ from another
/// sequential writer's by one per crash.
const CRASH_TOLERANCE: usize = 1;

fn node_ip(i: usize) -> String {
    format!("10.78.0.{}", 11 + i)
}

/// Joins the calling thread to a network namespace for good.
fn enter(netns: &Path) {
    let file = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// The hub namespace with a bridge, and one namespace per node joined to
/// it by a veth pair.
struct Net {
    hub: Netns,
    /// Per node: its namespace and the name of its veth end in it.
    nodes: Vec<(Netns, String)>,
}

impl Net {
    fn build() -> Self {
        let hub = Netns::create(&unique("soakhub"));
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let ns = Netns::create(&unique(&format!("soakn{i}-")));
            let inner = format!("eth{i}");
            let outer = unique("sk");
            let outer = &outer[..outer.len().min(15)];
            run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    &inner,
                    "netns",
                    ns.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    outer,
                    "netns",
                    hub.name(),
                ],
            );
            ns.ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", &inner]);
            ns.ip(&["link", "set", &inner, "up"]);
            hub.ip(&["link", "set", outer, "master", "br0"]);
            hub.ip(&["link", "set", outer, "up"]);
            nodes.push((ns, inner));
        }
        Self { hub, nodes }
    }

    fn node_addr(i: usize) -> SocketAddr {
        SocketAddr::new(node_ip(i).parse().expect("ip"), REDIS_PORT)
    }

    fn index_of(addr: SocketAddr) -> usize {
        (0..NODES)
            .find(|&i| Self::node_addr(i) == addr)
            .expect("a soak node")
    }

    fn set_link(&self, addr: SocketAddr, up: bool) {
        let (ns, dev) = &self.nodes[Self::index_of(addr)];
        ns.ip(&["link", "set", dev, if up { "up" } else { "down" }]);
    }
}

/// A redirector restartable on the same addresses: the proxy in the hub,
/// or an HBONE peer in a node's namespace.
struct Redirector {
    /// For messages: `soak proxy`, `HBONE peer 10.78.0.11`.
    what: String,
    place: Place,
    args: Vec<String>,
    dir: TempDir,
    starts: u32,
    child: Option<Child>,
    /// The running process, 0 while down: the sampler reads it.
    pid: Arc<AtomicU32>,
}

/// Where the proxy's upstream connections cross to: every node's
/// HBONE listener, on the node's own address (as Istio ambient does).
const HBONE_PORT: u16 = 15008;
/// The peers' admin listeners, on their node's address (for metrics).
const PEER_ADMIN_PORT: u16 = 15020;
/// The peers' own proxy listeners (idle): not 16379, Redis' cluster bus.
const PEER_PROXY_PORT: u16 = 15379;
/// How long a killed HBONE peer stays down before its restart.
const PEER_DOWN: Duration = Duration::from_secs(1);

impl Redirector {
    fn new(what: String, place: Place, args: Vec<String>) -> Self {
        Self {
            what,
            place,
            args,
            dir: TempDir::new("rdr-soak-daemon-"),
            starts: 0,
            child: None,
            pid: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The proxy in the hub: every cluster node is meshed, so each
    /// upstream connection is a stream in a tunnel to that node's peer.
    fn proxy(place: Place, seeds: &[SocketAddr], certs: &Path) -> Self {
        let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
        let meshed: Vec<String> = (0..NODES).map(node_ip).collect();
        let args = [
            "run",
            "--steering",
            "off",
            "--proxy-addr",
            &proxy_addr().to_string(),
            "--admin-addr",
            "127.0.0.1:15021",
            "--cluster-seed",
            &seeds.join(","),
            // The load runs in the hub, unsteered: let it in.
            "--allow-direct-from",
            &format!("{HUB_IP}/32"),
            "--hbone-certs",
            path_str(certs),
            "--hbone-listen",
            "none",
            "--mesh-endpoints",
            &meshed.join(","),
        ];
        Self::new(
            "soak proxy".into(),
            place,
            args.iter().map(ToString::to_string).collect(),
        )
    }

    /// Node `i`'s redirector, there only for its HBONE listener: it
    /// admits the proxy's tunnels and connects each stream to the node's
    /// Redis. Its own proxy (a plain relay nobody dials) idles.
    fn peer(i: usize, place: Place, certs: &Path) -> Self {
        let ip = node_ip(i);
        let args = [
            "run",
            "--steering",
            "off",
            "--proxy-addr",
            &format!("{ip}:{PEER_PROXY_PORT}"),
            "--backend",
            "idle=tcp",
            "--admin-addr",
            &format!("{ip}:{PEER_ADMIN_PORT}"),
            "--hbone-certs",
            path_str(certs),
            "--hbone-listen",
            &format!("{ip}:{HBONE_PORT}"),
        ];
        Self::new(
            format!("HBONE peer {ip}"),
            place,
            args.iter().map(ToString::to_string).collect(),
        )
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("redirector-{n}.log"))
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = self.log_path(self.starts);
        let mut cmd = self.place.command(binary());
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("redirector log"));
        let mut child = Child::spawn(format!("redirector ({})", self.what), cmd);
        wait_for(
            &format!("the {} to be ready", self.what),
            Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(child.is_running(), "{} exited:\n{text}", self.what);
                text.contains("redirector ready").then_some(())
            },
        );
        self.pid.store(child.pid(), Ordering::Relaxed);
        self.child = Some(child);
    }

    /// SIGKILL: a crash, as far as the process knows.
    fn kill(&mut self) {
        self.pid.store(0, Ordering::Relaxed);
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn proxy_addr() -> SocketAddr {
    SocketAddr::new(HUB_IP.parse().expect("ip"), PROXY_PORT)
}

fn resources(pid: u32, at: Duration) -> Option<Resources> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Resources {
        at,
        pid,
        rss_kib,
        fds,
    })
}

/// What every load thread shares.
#[derive(Clone)]
struct Ctx {
    target: SocketAddr,
    netns: PathBuf,
    t0: Instant,
    stop: Arc<AtomicBool>,
}

impl Ctx {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// What one load thread did.
#[derive(Default)]
struct Outcome {
    ledger: Ledger,
    /// (ended at, took) of every successful request or batch.
    latencies: Vec<(Duration, Duration)>,
    errors: Vec<ClientError>,
    /// Things that must never happen: protocol errors, wrong values.
    fatal: Vec<String>,
    requests: u64,
    /// Free-form counters (messages received, items popped).
    counters: Vec<(String, u64)>,
}

impl Outcome {
    fn error(&mut self, ctx: &Ctx, client: &str, what: String) {
        self.errors.push(ClientError {
            at: ctx.now(),
            client: client.to_string(),
            what,
        });
    }

    /// An error reply: counted, or fatal when it can only mean a bug.
    fn reply_error(&mut self, ctx: &Ctx, client: &str, command: &str, reply: &[u8]) {
        let text = String::from_utf8_lossy(reply).trim().to_string();
        let never = [
            "Protocol error",
            "WRONGTYPE",
            "CROSSSLOT",
            "unknown command",
            "syntax error",
            "wrong number of arguments",
        ];
        if never.iter().any(|n| text.contains(n)) || !text.starts_with('-') {
            self.fatal
                .push(format!("{client}: {command} answered {text:?}"));
        } else {
            self.error(ctx, client, format!("{command}: {text}"));
        }
    }

    /// An I/O error: counted; a reply that does not parse is fatal.
    fn io_error(&mut self, ctx: &Ctx, client: &str, command: &str, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::InvalidData {
            self.fatal.push(format!("{client}: {command}: {e}"));
        } else {
            self.error(ctx, client, format!("{command}: {e}"));
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<RespClient> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    RespClient::from_stream(stream)
}

/// The payload of a bulk string reply: `Some(None)` for nil, `None` when
/// the reply is not a bulk string.
fn bulk(reply: &[u8]) -> Option<Option<&[u8]>> {
    if reply.starts_with(b"$-1\r\n") {
        return Some(None);
    }
    let rest = reply.strip_prefix(b"$")?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&rest[..nl]).ok()?.trim().parse().ok()?;
    rest.get(nl + 1..nl + 1 + len).map(Some)
}

fn is_ok(reply: &[u8]) -> bool {
    reply == b"+OK\r\n"
}

/// A tiny deterministic PRNG (xorshift64).
fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// PHP-FPM style: connect, SET and GET a few keys, close.
fn short_connections(ctx: &Ctx, id: u64) -> Outcome {
    let name = format!("short-{id}");
    let mut out = Outcome::default();
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (id + 1);
    while ctx.running() {
        let mut c = match connect(ctx.target) {
            Ok(c) => c,
            Err(e) => {
                out.error(ctx, &name, format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for _ in 0..3 {
            let key = format!("soak:short{id}:{}", rand(&mut seed) % KEYS_PER_WRITER);
            let (seq, v) = out.ledger.attempt(&key);
            let start = ctx.now();
            out.requests += 2;
            match c.call(&[b"SET", key.as_bytes(), v.as_bytes()]) {
                Ok(r) if is_ok(&r) => out.ledger.ack(&key, seq, ctx.now()),
                Ok(r) => {
                    out.reply_error(ctx, &name, "SET", &r);
                    break;
                }
                Err(e) => {
                    out.io_error(ctx, &name, "SET", &e);
                    break;
                }
            }
            match c.call(&[b"GET", key.as_bytes()]) {
                Ok(r) => match bulk(&r) {
                    Some(Some(got)) if got == v.as_bytes() => {
                        out.latencies.push((ctx.now(), ctx.now() - start));
                    }
                    Some(got) => {
                        // A crash can lose the write just acknowledged;
                        // anything but an older value of this key is a bug.
                        match got.map(|g| soak::parse_value(&key, g)) {
                            None => out.error(ctx, &name, format!("GET {key}: nil")),
                            Some(Some(s)) if s < seq => {
                                out.error(ctx, &name, format!("GET {key}: older value {s}"));
                            }
                            _ => out.fatal.push(format!(
                                "{name}: GET {key} after SET {v}: {:?}",
                                String::from_utf8_lossy(&r)
                            )),
                        }
                        break;
                    }
                    None => {
                        out.reply_error(ctx, &name, "GET", &r);
                        break;
                    }
                },
                Err(e) => {
                    out.io_error(ctx, &name, "GET", &e);
                    break;
                }
            }
        }
        drop(c);
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

/// One long connection sending batches of SETs.
fn pipelined(ctx: &Ctx, id: u64) -> Outcome {
    let name = format!("pipeline-{id}");
    let mut out = Outcome::default();
    let mut c = None;
    let mut n = 0u64;
    while ctx.running() {
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, &name, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let mut sent = Vec::new();
        let mut bytes = Vec::new();
        for _ in 0..BATCH {
            let key = format!("soak:pipe{id}:{}", n % KEYS_PER_WRITER);
            n += 1;
            let (seq, v) = out.ledger.attempt(&key);
            bytes.extend(encode(&[b"SET", key.as_bytes(), v.as_bytes()]));
            sent.push((key, seq));
        }
        let start = ctx.now();
        out.requests += BATCH;
        if let Err(e) = conn.send_raw(&bytes) {
            out.io_error(ctx, &name, "send batch", &e);
            c = None;
            continue;
        }
        let mut broken = false;
        let mut clean = true;
        for (key, seq) in &sent {
            match conn.read_reply() {
                Ok(r) if is_ok(&r) => out.ledger.ack(key, *seq, ctx.now()),
                Ok(r) => {
                    clean = false;
                    out.reply_error(ctx, &name, "SET (pipelined)", &r);
                }
                Err(e) => {
                    out.io_error(ctx, &name, "SET (pipelined)", &e);
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            c = None;
        } else if clean {
            out.latencies.push((ctx.now(), ctx.now() - start));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

/// MULTI / two SETs on one hash tag / EXEC.
fn transactions(ctx: &Ctx, id: u64) -> Outcome {
    let name = format!("multi-{id}");
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut n = 0u64;
    while ctx.running() {
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, &name, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let tag = format!("{{soak:tx{id}:{}}}", n % (KEYS_PER_WRITER / 4));
        n += 1;
        let (ka, kb) = (format!("{tag}:a"), format!("{tag}:b"));
        let (sa, va) = out.ledger.attempt(&ka);
        let (sb, vb) = out.ledger.attempt(&kb);
        let mut bytes = encode(&[b"MULTI"]);
        bytes.extend(encode(&[b"SET", ka.as_bytes(), va.as_bytes()]));
        bytes.extend(encode(&[b"SET", kb.as_bytes(), vb.as_bytes()]));
        bytes.extend(encode(&[b"EXEC"]));
        let start = ctx.now();
        out.requests += 4;
        let replies: std::io::Result<Vec<bytes::Bytes>> = conn
            .send_raw(&bytes)
            .and_then(|()| (0..4).map(|_| conn.read_reply()).collect());
        match replies {
            Ok(r)
                if is_ok(&r[0])
                    && r[1][..] == *b"+QUEUED\r\n"
                    && r[2][..] == *b"+QUEUED\r\n"
                    && r[3][..] == *b"*2\r\n+OK\r\n+OK\r\n" =>
            {
                let now = ctx.now();
                out.ledger.ack(&ka, sa, now);
                out.ledger.ack(&kb, sb, now);
                out.latencies.push((now, now - start));
            }
            Ok(r) => {
                let bad = r
                    .iter()
                    .find(|r| r.starts_with(b"-"))
                    .cloned()
                    .unwrap_or_else(|| r[3].clone());
                out.reply_error(ctx, &name, "MULTI/EXEC", &bad);
                // Whatever state the transaction is in, start afresh.
                c = None;
            }
            Err(e) => {
                out.io_error(ctx, &name, "MULTI/EXEC", &e);
                c = None;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

/// A producer RPUSHing numbered items every 10 ms.
fn producer(ctx: &Ctx, id: u64) -> Outcome {
    let name = format!("rpush-{id}");
    let list = format!("soak:queue{id}");
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut pushed = 0u64;
    let mut seq = 0u64;
    while ctx.running() {
        std::thread::sleep(Duration::from_millis(10));
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, &name, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        seq += 1;
        let item = soak::value(&list, seq);
        let start = ctx.now();
        out.requests += 1;
        match conn.call(&[b"RPUSH", list.as_bytes(), item.as_bytes()]) {
            Ok(r) if r.starts_with(b":") => {
                pushed += 1;
                out.latencies.push((ctx.now(), ctx.now() - start));
            }
            Ok(r) => {
                out.reply_error(ctx, &name, "RPUSH", &r);
                c = None;
            }
            Err(e) => {
                out.io_error(ctx, &name, "RPUSH", &e);
                c = None;
            }
        }
    }
    out.counters.push((format!("{name} pushed"), pushed));
    out
}

/// A consumer BLPOPping the producer's list with a 1 s timeout.
fn consumer(ctx: &Ctx, id: u64) -> Outcome {
    let name = format!("blpop-{id}");
    let list = format!("soak:queue{id}");
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut popped = 0u64;
    while ctx.running() {
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, &name, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        out.requests += 1;
        match conn.call(&[b"BLPOP", list.as_bytes(), b"1"]) {
            Ok(r) if r.starts_with(b"*-1") => {}
            Ok(r) if r.starts_with(b"*2\r\n") => {
                // Two bulk strings: the list's name, then the item.
                let text = String::from_utf8_lossy(&r).into_owned();
                let item = text.lines().nth(4).unwrap_or_default();
                if soak::parse_value(&list, item.as_bytes()).is_none() {
                    out.fatal.push(format!("{name}: BLPOP gave {text:?}"));
                }
                popped += 1;
            }
            Ok(r) => {
                out.reply_error(ctx, &name, "BLPOP", &r);
                c = None;
            }
            Err(e) => {
                out.io_error(ctx, &name, "BLPOP", &e);
                c = None;
            }
        }
    }
    out.counters.push((format!("{name} popped"), popped));
    out
}

const CHANNEL: &str = "soak:news";

/// PUBLISH every 10 ms.
fn publisher(ctx: &Ctx) -> Outcome {
    let name = "publish";
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut seq = 0u64;
    while ctx.running() {
        std::thread::sleep(Duration::from_millis(10));
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, name, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        seq += 1;
        let message = soak::value(CHANNEL, seq);
        out.requests += 1;
        match conn.call(&[b"PUBLISH", CHANNEL.as_bytes(), message.as_bytes()]) {
            Ok(r) if r.starts_with(b":") => {}
            Ok(r) => {
                out.reply_error(ctx, name, "PUBLISH", &r);
                c = None;
            }
            Err(e) => {
                out.io_error(ctx, name, "PUBLISH", &e);
                c = None;
            }
        }
    }
    out.counters.push(("published".into(), seq));
    out
}

/// SUBSCRIBE and check every message; resubscribe after an error.
fn subscriber(ctx: &Ctx) -> Outcome {
    let name = "subscribe";
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut received = 0u64;
    let header = format!("*3\r\n$7\r\nmessage\r\n${}\r\n{CHANNEL}\r\n", CHANNEL.len());
    while ctx.running() {
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => {
                let subscribed = connect(ctx.target).and_then(|mut conn| {
                    let r = conn.call(&[b"SUBSCRIBE", CHANNEL.as_bytes()])?;
                    // Short reads let the thread notice the stop flag.
                    conn.stream()
                        .set_read_timeout(Some(Duration::from_millis(500)))?;
                    Ok((conn, r))
                });
                match subscribed {
                    Ok((conn, r)) if r.starts_with(b"*3\r\n$9\r\nsubscribe\r\n") => c.insert(conn),
                    Ok((_, r)) => {
                        out.reply_error(ctx, name, "SUBSCRIBE", &r);
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    Err(e) => {
                        out.io_error(ctx, name, "SUBSCRIBE", &e);
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
        };
        match conn.read_reply() {
            Ok(r) => {
                let text = String::from_utf8_lossy(&r);
                let payload = text
                    .strip_prefix(&header)
                    .and_then(|rest| rest.lines().nth(1));
                if payload.is_none_or(|p| soak::parse_value(CHANNEL, p.as_bytes()).is_none()) {
                    out.fatal.push(format!("{name}: got {text:?}"));
                }
                received += 1;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                out.io_error(ctx, name, "read message", &e);
                c = None;
            }
        }
    }
    out.counters.push(("messages received".into(), received));
    out
}

/// A write every 2 ms, one at a time, over keys on every shard: the same
/// loop for the twin (through the proxy) and the direct client.
const SEQUENTIAL_PACE: Duration = Duration::from_millis(2);

/// The twin: the direct client's loop, through the proxy.
fn twin(ctx: &Ctx) -> Outcome {
    let name = "twin";
    let mut out = Outcome::default();
    let mut c: Option<RespClient> = None;
    let mut n = 0u64;
    while ctx.running() {
        std::thread::sleep(SEQUENTIAL_PACE);
        let key = format!("soak:twin:{}", n % KEYS_PER_WRITER);
        n += 1;
        let conn = match c.as_mut() {
            Some(conn) => conn,
            None => match connect(ctx.target) {
                Ok(conn) => c.insert(conn),
                Err(e) => {
                    out.error(ctx, name, format!("connect: {e}"));
                    continue;
                }
            },
        };
        let (seq, v) = out.ledger.attempt(&key);
        let start = ctx.now();
        out.requests += 1;
        match conn.call(&[b"SET", key.as_bytes(), v.as_bytes()]) {
            Ok(r) if is_ok(&r) => {
                out.ledger.ack(&key, seq, ctx.now());
                out.latencies.push((ctx.now(), ctx.now() - start));
            }
            Ok(r) => out.reply_error(ctx, name, "SET", &r),
            Err(e) => {
                out.io_error(ctx, name, "SET", &e);
                c = None;
            }
        }
    }
    out
}

/// A simple cluster-aware client: a slot table from `CLUSTER NODES`,
/// following MOVED and ASK, refreshing the table after any error.
struct DirectClient {
    seeds: Vec<SocketAddr>,
    owners: Vec<Option<SocketAddr>>,
    conns: HashMap<SocketAddr, RespClient>,
}

impl DirectClient {
    fn new(seeds: Vec<SocketAddr>) -> Self {
        Self {
            seeds,
            owners: vec![None; usize::from(SLOTS)],
            conns: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        self.conns.clear();
        for seed in self.seeds.clone() {
            let Ok(mut c) = connect(seed) else { continue };
            let _ = c.stream().set_read_timeout(Some(Duration::from_secs(2)));
            let Ok(reply) = c.call(&[b"CLUSTER", b"NODES"]) else {
                continue;
            };
            let Some(Some(text)) = bulk(&reply) else {
                continue;
            };
            let nodes = parse_cluster_nodes(&String::from_utf8_lossy(text));
            let masters: Vec<_> = nodes
                .iter()
                .filter(|n| n.is_master() && !n.has_flag("fail"))
                .collect();
            if masters.is_empty() {
                continue;
            }
            for (slot, owner) in self.owners.iter_mut().enumerate() {
                let slot = u16::try_from(slot).expect("slot");
                *owner = masters.iter().find(|m| m.owns(slot)).map(|m| m.addr);
            }
            return;
        }
    }

    fn conn(&mut self, addr: SocketAddr) -> std::io::Result<&mut RespClient> {
        match self.conns.entry(addr) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let c = connect(addr)?;
                c.stream().set_read_timeout(Some(Duration::from_secs(2)))?;
                Ok(e.insert(c))
            }
        }
    }

    /// SET, following redirections; `Err` with what went wrong.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let slot = usize::from(slot_of(key.as_bytes()));
        let args: [&[u8]; 3] = [b"SET", key.as_bytes(), value.as_bytes()];
        let mut asking: Option<SocketAddr> = None;
        for _ in 0..5 {
            let (addr, ask) = match asking.take() {
                Some(to) => (to, true),
                None => match self.owners[slot] {
                    Some(owner) => (owner, false),
                    None => {
                        self.refresh();
                        return Err("no owner for the slot".into());
                    }
                },
            };
            let reply = self.conn(addr).and_then(|c| {
                if ask {
                    c.call(&[b"ASKING"])?;
                }
                c.call(&args)
            });
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    self.conns.remove(&addr);
                    self.refresh();
                    return Err(format!("{addr}: {e}"));
                }
            };
            if is_ok(&reply) {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&reply).trim().to_string();
            let target = text
                .split_whitespace()
                .nth(2)
                .and_then(|a| a.parse::<SocketAddr>().ok());
            match (text.split_whitespace().next(), target) {
                (Some("-MOVED"), Some(to)) => self.owners[slot] = Some(to),
                (Some("-ASK"), Some(to)) => asking = Some(to),
                _ => {
                    self.refresh();
                    return Err(text);
                }
            }
        }
        Err("too many redirections".into())
    }
}

fn direct(ctx: &Ctx, seeds: Vec<SocketAddr>) -> Outcome {
    let name = "direct";
    let mut out = Outcome::default();
    let mut client = DirectClient::new(seeds);
    client.refresh();
    let mut n = 0u64;
    while ctx.running() {
        std::thread::sleep(SEQUENTIAL_PACE);
        let key = format!("soak:direct:{}", n % KEYS_PER_WRITER);
        n += 1;
        let (seq, v) = out.ledger.attempt(&key);
        let start = ctx.now();
        out.requests += 1;
        match client.set(&key, &v) {
            Ok(()) => {
                out.ledger.ack(&key, seq, ctx.now());
                out.latencies.push((ctx.now(), ctx.now() - start));
            }
            Err(e) => out.error(ctx, name, format!("SET: {e}")),
        }
    }
    out
}

/// Sets the stop flag when dropped, so a panic anywhere in the scope
/// still lets every thread end.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sleeps until `at` after `t0`, or returns at once when it has passed.
fn sleep_until(t0: Instant, at: Duration) {
    let now = t0.elapsed();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// A master that has a live replica and is not in `avoid`, chosen by `n`
/// among those there are; and its replica.
fn pick_master(cluster: &RedisCluster, n: usize, avoid: &[SocketAddr]) -> (SocketAddr, SocketAddr) {
    let masters: Vec<SocketAddr> = cluster
        .masters()
        .into_iter()
        .filter(|m| !avoid.contains(m) && !cluster.replicas_of(*m).is_empty())
        .collect();
    assert!(
        !masters.is_empty(),
        "no master outside {avoid:?} has a live replica"
    );
    let master = masters[n % masters.len()];
    (master, cluster.replicas_of(master)[0])
}

/// A main-lane fault under way: its planned start, and the nodes it acts
/// on (the first is the one an overlay fault hits).
type Current = Option<(Duration, Vec<SocketAddr>)>;

/// Everything the fault lanes act on. The cluster's write lock is taken
/// only to kill or restart a node; the schedule never overlaps a kill with
/// another cluster fault.
struct Rig<'a> {
    plan: &'a [Planned],
    cluster: &'a RwLock<RedisCluster>,
    net: &'a Net,
    proxy: &'a Mutex<Redirector>,
    peers: &'a [Mutex<Redirector>],
    t0: Instant,
    current: Mutex<Current>,
}

impl Rig<'_> {
    fn cluster(&self) -> std::sync::RwLockReadGuard<'_, RedisCluster> {
        self.cluster.read().expect("cluster lock")
    }

    /// Runs the faults of one lane one after another.
    fn run_lane(&self, lane: Lane) -> Vec<Window> {
        let mut windows = Vec::new();
        for p in soak::lane(self.plan, lane) {
            sleep_until(self.t0, p.at);
            let host = if p.inside {
                self.wait_for_host(&p)
            } else {
                None
            };
            let name = p.name();
            let start = self.t0.elapsed();
            eprintln!("+{:.1}s {name} starts", start.as_secs_f64());
            let involved = host.as_ref().map_or(&[][..], |(_, nodes)| nodes);
            let mut detail = self.inflict(&p, involved);
            if let Some((h, _)) = &host {
                detail.push_str(&format!(" (inside {})", h.name()));
            }
            let end = self.t0.elapsed();
            eprintln!(
                "+{:.1}s {name} over in {:.1}s: {detail}",
                end.as_secs_f64(),
                (end - start).as_secs_f64()
            );
            windows.push(Window {
                kind: p.kind,
                name,
                start,
                end,
                detail,
            });
        }
        windows
    }

    /// A main-lane fault says what it acts on before it begins.
    fn announce(&self, p: &Planned, nodes: Vec<SocketAddr>) {
        if !p.inside {
            *self.current.lock().expect("current") = Some((p.at, nodes));
        }
    }

    /// Waits until the main-lane fault `overlay` lands inside has begun,
    /// then [`soak::OVERLAP_DELAY`]: that fault, and the nodes it acts on.
    /// A late main lane delays the overlay; a stuck one does not stop it.
    fn wait_for_host(&self, overlay: &Planned) -> Option<(Planned, Vec<SocketAddr>)> {
        let host = soak::host_of(self.plan, overlay)?;
        let waiting = Instant::now();
        let nodes = loop {
            if let Some((at, nodes)) = self.current.lock().expect("current").clone()
                && at >= host.at
            {
                break if at == host.at { nodes } else { Vec::new() };
            }
            if waiting.elapsed() > Duration::from_secs(120) {
                break Vec::new();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(soak::OVERLAP_DELAY);
        Some((host, nodes))
    }

    /// Injects `p`; `involved`: the nodes the fault it lands inside acts
    /// on, which a link-down spares and an HBONE restart hits. Returns what
    /// was done.
    fn inflict(&self, p: &Planned, involved: &[SocketAddr]) -> String {
        match p.kind {
            FaultKind::Migration => {
                let cluster = self.cluster();
                let masters = cluster.masters();
                let (from, to) = (
                    masters[p.n % masters.len()],
                    masters[(p.n + 1) % masters.len()],
                );
                self.announce(p, vec![from, to]);
                let moved = cluster.reshard(MIGRATED_SLOTS, from, to);
                format!("{} slots {from} -> {to}", moved.len())
            }
            FaultKind::ManualFailover => {
                let cluster = self.cluster();
                let (master, replica) = pick_master(&cluster, p.n, involved);
                self.announce(p, vec![replica, master]);
                cluster.failover(replica);
                format!("{replica} took over from {master}")
            }
            FaultKind::MasterKill => {
                let (master, replica) = pick_master(&self.cluster(), p.n + 1, involved);
                self.announce(p, vec![master, replica]);
                self.cluster.write().expect("cluster lock").kill(master);
                self.cluster().wait_healthy();
                self.cluster.write().expect("cluster lock").restart(master);
                self.cluster().wait_healthy();
                format!("{master} killed, {replica} took over, {master} back as a replica")
            }
            FaultKind::LinkDown => {
                let (master, _) = pick_master(&self.cluster(), p.n + 2, involved);
                self.announce(p, vec![master]);
                self.net.set_link(master, false);
                std::thread::sleep(LINK_DOWN);
                self.net.set_link(master, true);
                self.cluster().wait_healthy();
                format!("{master}'s link down for {LINK_DOWN:?}")
            }
            FaultKind::ProxyRestart => {
                self.announce(p, Vec::new());
                let mut proxy = self.proxy.lock().expect("proxy lock");
                let old = proxy.pid.load(Ordering::Relaxed);
                proxy.kill();
                proxy.start();
                format!(
                    "pid {old} SIGKILLed, pid {} ready",
                    proxy.pid.load(Ordering::Relaxed)
                )
            }
            FaultKind::HbonePeerRestart => {
                // Inside another fault: the peer of the node it acts on
                // first (the migration's source, the replica taking over).
                // Alone: a master's, so tunnelled traffic is cut (another
                // than the last one's, when the cluster did not change).
                let node = involved.first().copied().unwrap_or_else(|| {
                    let masters = self.cluster().masters();
                    masters[(p.n + 1) % masters.len()]
                });
                self.announce(p, vec![node]);
                let mut peer = self.peers[Net::index_of(node)].lock().expect("peer lock");
                let old = peer.pid.load(Ordering::Relaxed);
                peer.kill();
                std::thread::sleep(PEER_DOWN);
                peer.start();
                format!(
                    "{node}'s peer: pid {old} SIGKILLed, {PEER_DOWN:?} down, pid {} ready",
                    peer.pid.load(Ordering::Relaxed)
                )
            }
        }
    }
}

/// Values of `keys` read from `addr` with pipelined GETs.
fn read_all(addr: SocketAddr, keys: &[&String]) -> HashMap<String, Option<Vec<u8>>> {
    let mut c = connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut out = HashMap::new();
    for chunk in keys.chunks(500) {
        let mut bytes = Vec::new();
        for k in chunk {
            bytes.extend(encode(&[b"GET", k.as_bytes()]));
        }
        c.send_raw(&bytes).expect("send GETs");
        for k in chunk {
            let r = c.read_reply().expect("GET reply");
            let v = bulk(&r)
                .unwrap_or_else(|| panic!("GET {k} on {addr}: {:?}", String::from_utf8_lossy(&r)));
            out.insert((*k).clone(), v.map(<[u8]>::to_vec));
        }
    }
    out
}

/// A few connections' worth of traffic on every shard, so the idle
/// baseline counts warmed pools.
fn warm_up(addr: SocketAddr) {
    for round in 0..5 {
        let mut c = connect(addr).expect("connect for the warm-up");
        for i in 0..200 {
            let key = format!("soak:warm:{round}:{i}");
            let r = c
                .call(&[b"SET", key.as_bytes(), b"x"])
                .expect("warm-up SET");
            assert!(is_ok(&r), "warm-up SET: {r:?}");
        }
    }
}

/// The proxy's established connections (in the hub, where it runs) to
/// HBONE listeners, and to Redis ports: every node being meshed, there
/// must be tunnels and nothing else upstream.
fn proxy_upstreams(hub: &Place, pid: u32) -> (Vec<String>, Vec<String>) {
    let out = hub.output("ss", &["-Htnp", "state", "established"]);
    let mine = format!("pid={pid},");
    let text = String::from_utf8_lossy(&out.stdout);
    let to = |port: u16| -> Vec<String> {
        let port = format!(":{port} ");
        text.lines()
            .filter(|l| l.contains(&mine) && l.contains(&port))
            .map(str::to_string)
            .collect()
    };
    (to(HBONE_PORT), to(REDIS_PORT))
}

/// What crossed the tunnels, from the proxy's and the peers' metrics
/// (each process's since its last start); and the bytes the peers took in.
fn tunnel_figures(hub: &Place) -> (String, f64) {
    let metric = testbed::http::sample;
    let proxy = testbed::http::get_in(
        hub,
        SocketAddr::new([127, 0, 0, 1].into(), 15021),
        "/metrics",
    );
    let mut received = 0.0;
    let mut per_peer = Vec::new();
    for i in 0..NODES {
        let admin = SocketAddr::new(node_ip(i).parse().expect("ip"), PEER_ADMIN_PORT);
        let text = testbed::http::get_in(hub, admin, "/metrics");
        let bytes = metric(&text, "redirector_hbone_received_bytes_total");
        received += bytes;
        per_peer.push(format!(
            "{}: {:.1} MB in, {} streams accepted",
            node_ip(i),
            bytes / 1e6,
            metric(
                &text,
                "redirector_hbone_connect_responses_total{status=\"200\"}"
            )
        ));
    }
    let note = format!(
        "HBONE: the last proxy opened {} tunnels and sent {:.1} MB through them; peers since \
         their last start: {}",
        metric(
            &proxy,
            "redirector_hbone_tunnels_opened_total{direction=\"outbound\"}"
        ),
        metric(&proxy, "redirector_hbone_sent_bytes_total") / 1e6,
        per_peer.join("; ")
    );
    (note, received)
}

fn soak_minutes() -> f64 {
    std::env::var("SOAK_MINUTES")
        .ok()
        .map_or(2.0, |m| m.parse().expect("SOAK_MINUTES is a number"))
}

#[test]
fn a_chaos_soak_loses_no_write_acknowledged_through_a_graceful_fault() {
    testbed::require_kernel!();
    let load = Duration::from_secs_f64(soak_minutes() * 60.0);
    let plan = soak::schedule(load);
    soak::check_schedule(&plan).expect("a valid fault schedule");
    let dir = TempDir::new("rdr-soak-");
    let net = Net::build();
    let hub = net.hub.place();
    let spread: Vec<(Place, SocketAddr)> = net
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (ns, _))| (ns.place(), Net::node_addr(i)))
        .collect();
    let cluster = RedisCluster::start_across(&hub, &spread, 1, dir.path());
    let seeds = cluster.seeds();
    // One CA; `a` for the proxy, `b` for every node's peer (one identity,
    // the DaemonSet's).
    mint_node_certs(dir.path());
    let peers: Vec<Mutex<Redirector>> = spread
        .iter()
        .enumerate()
        .map(|(i, (place, _))| {
            let mut peer = Redirector::peer(i, place.clone(), &dir.path().join("b"));
            peer.start();
            Mutex::new(peer)
        })
        .collect();
    let mut proxy = Redirector::proxy(hub.clone(), &seeds, &dir.path().join("a"));
    proxy.start();

    let hub_path = net.hub.path();
    let baseline = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&hub_path);
            warm_up(proxy_addr());
        })
        .join()
        .expect("warm-up");
        std::thread::sleep(Duration::from_secs(2));
        let pid = proxy.pid.load(Ordering::Relaxed);
        resources(pid, Duration::ZERO)
    });
    eprintln!("idle baseline after the warm-up: {baseline:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let sampling = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let ctx = Ctx {
        target: proxy_addr(),
        netns: hub_path.clone(),
        t0,
        stop: Arc::clone(&stop),
    };
    let direct_ctx = Ctx {
        target: seeds[0],
        ..ctx.clone()
    };
    let samples = Arc::new(Mutex::new(Vec::new()));
    let pid = Arc::clone(&proxy.pid);
    let proxy = Mutex::new(proxy);
    let cluster = RwLock::new(cluster);
    let rig = Rig {
        plan: &plan,
        cluster: &cluster,
        net: &net,
        proxy: &proxy,
        peers: &peers,
        t0,
        current: Mutex::new(None),
    };
    let mut requests = 0u64;

    let (mut outcomes, direct_outcome, mut windows) = std::thread::scope(|s| {
        let _stop = StopOnDrop(Arc::clone(&stop));
        let _sampling = StopOnDrop(Arc::clone(&sampling));
        let spawn = |f: Box<dyn FnOnce(&Ctx) -> Outcome + Send>, ctx: &Ctx| {
            let ctx = ctx.clone();
            s.spawn(move || {
                enter(&ctx.netns);
                f(&ctx)
            })
        };
        let mut threads = Vec::new();
        for id in 0..4 {
            threads.push(spawn(Box::new(move |c| short_connections(c, id)), &ctx));
        }
        for id in 0..2 {
            threads.push(spawn(Box::new(move |c| pipelined(c, id)), &ctx));
            threads.push(spawn(Box::new(move |c| transactions(c, id)), &ctx));
        }
        threads.push(spawn(Box::new(|c| producer(c, 0)), &ctx));
        threads.push(spawn(Box::new(|c| consumer(c, 0)), &ctx));
        threads.push(spawn(Box::new(publisher), &ctx));
        threads.push(spawn(Box::new(subscriber), &ctx));
        let twin_thread = spawn(Box::new(twin), &ctx);
        let direct_seeds = seeds.clone();
        let direct_thread = spawn(Box::new(move |c| direct(c, direct_seeds)), &direct_ctx);
        let sampler = {
            let (samples, sampling, pid) = (
                Arc::clone(&samples),
                Arc::clone(&sampling),
                Arc::clone(&pid),
            );
            s.spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Some(r) = resources(pid.load(Ordering::Relaxed), t0.elapsed()) {
                        samples.lock().expect("samples").push(r);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        let rig = &rig;
        let lanes: Vec<_> = soak::lanes(&plan)
            .into_iter()
            .map(|lane| s.spawn(move || rig.run_lane(lane)))
            .collect();
        let mut windows = Vec::new();
        for lane in lanes {
            windows.extend(lane.join().expect("fault lane"));
        }
        sleep_until(t0, load);
        stop.store(true, Ordering::Relaxed);
        let mut outcomes: Vec<Outcome> = threads
            .into_iter()
            .map(|t| t.join().expect("load thread"))
            .collect();
        outcomes.push(twin_thread.join().expect("twin"));
        let direct_outcome = direct_thread.join().expect("direct");
        std::thread::sleep(IDLE_SETTLE);
        sampling.store(false, Ordering::Relaxed);
        sampler.join().expect("sampler");
        (outcomes, direct_outcome, windows)
    });
    let load_ran = t0.elapsed();
    windows.sort_by_key(|w| w.start);
    let cluster = cluster.into_inner().expect("cluster lock");
    let mut proxy = proxy.into_inner().expect("proxy lock");
    let after = resources(proxy.pid.load(Ordering::Relaxed), load_ran);
    assert!(
        proxy.is_running(),
        "the proxy died during the soak:\n{}",
        proxy.log_tail()
    );

    // Read every key back through the proxy and from its owning master.
    cluster.wait_healthy();
    // One more burst of connections on the same idle process: a leak per
    // connection grows it; a pool the soak already grew does not.
    let after_burst = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&hub_path);
            warm_up(proxy_addr());
        })
        .join()
        .expect("second burst");
        std::thread::sleep(IDLE_SETTLE);
        resources(proxy.pid.load(Ordering::Relaxed), t0.elapsed())
    });
    let mut twin_outcome = outcomes.pop().expect("twin outcome");
    let mut proxied = Ledger::default();
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let mut fatal = Vec::new();
    let mut notes = Vec::new();
    for o in outcomes {
        proxied.merge(o.ledger);
        latencies.extend(o.latencies);
        errors.extend(o.errors);
        fatal.extend(o.fatal);
        requests += o.requests;
        notes.extend(o.counters.iter().map(|(k, v)| format!("{k}: {v}")));
    }
    let twin_ledger = std::mem::take(&mut twin_outcome.ledger);
    latencies.extend(twin_outcome.latencies);
    errors.extend(twin_outcome.errors);
    fatal.extend(twin_outcome.fatal);
    requests += twin_outcome.requests;
    let direct_ledger = direct_outcome.ledger;

    let all_keys: Vec<&String> = proxied
        .keys()
        .chain(twin_ledger.keys())
        .chain(direct_ledger.keys())
        .map(|(k, _)| k)
        .collect();
    let view = cluster.view();
    let owner = |key: &str| {
        let slot = slot_of(key.as_bytes());
        view.iter()
            .find(|n| n.is_master() && n.owns(slot))
            .map(|n| n.addr)
            .unwrap_or_else(|| panic!("nobody owns slot {slot}"))
    };
    let (through_proxy, from_masters) = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&hub_path);
            let through = read_all(proxy_addr(), &all_keys);
            let mut by_owner: HashMap<SocketAddr, Vec<&String>> = HashMap::new();
            for k in &all_keys {
                by_owner.entry(owner(k)).or_default().push(k);
            }
            let mut direct_values = HashMap::new();
            for (addr, keys) in by_owner {
                direct_values.extend(read_all(addr, &keys));
            }
            (through, direct_values)
        })
        .join()
        .expect("read back")
    });
    let mut wrong = Vec::new();
    for k in &all_keys {
        if through_proxy[*k] != from_masters[*k] {
            wrong.push(format!(
                "{k}: proxy read {:?}, its master holds {:?}",
                through_proxy[*k].as_deref().map(String::from_utf8_lossy),
                from_masters[*k].as_deref().map(String::from_utf8_lossy)
            ));
        }
    }
    let read = |k: &str| from_masters.get(k).cloned().flatten();
    let proxied_losses = soak::losses(&proxied, &windows, read, &mut wrong);
    let twin_losses = soak::losses(&twin_ledger, &windows, read, &mut wrong);
    let direct_losses = soak::losses(&direct_ledger, &windows, read, &mut wrong);
    wrong.extend(fatal);

    let (tunnels, direct_to_redis) = proxy_upstreams(&hub, proxy.pid.load(Ordering::Relaxed));
    let (tunnel_note, peer_bytes) = tunnel_figures(&hub);
    notes.push(tunnel_note);
    let report = Report {
        load: load_ran,
        faults: windows.clone(),
        proxied: proxied_losses,
        twin: twin_losses,
        direct: direct_losses,
        requests,
        errors_by_fault: soak::errors_by_fault(&windows, &errors),
        direct_errors_by_fault: soak::errors_by_fault(&windows, &direct_outcome.errors),
        wrong,
        latency: soak::p99_over_time(&latencies, LATENCY_BUCKET),
        resources: samples.lock().expect("samples").clone(),
        baseline,
        after,
        after_burst,
        notes,
    };
    eprintln!("{}", report.text());
    let out_dir = testbed::workspace_root().join("target").join("soak");
    std::fs::create_dir_all(&out_dir).expect("target/soak");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = out_dir.join(format!("soak-{stamp}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("report JSON"),
    )
    .expect("write the report");
    eprintln!("report written to {}", path.display());

    // What the soak promises.
    assert!(
        !tunnels.is_empty() && direct_to_redis.is_empty(),
        "the proxy's upstream connections: tunnels {tunnels:?}, straight to Redis \
         {direct_to_redis:?}"
    );
    assert!(
        peer_bytes > 0.0,
        "no upstream traffic crossed the HBONE tunnels"
    );
    assert!(
        report.wrong.is_empty(),
        "values that were never written, or errors that must never happen: {:#?}",
        &report.wrong[..report.wrong.len().min(20)]
    );
    assert!(
        report.proxied.acked > 1_000 && report.twin.acked > 100 && report.direct.acked > 100,
        "too little load to judge: {} / {} / {} keys acknowledged",
        report.proxied.acked,
        report.twin.acked,
        report.direct.acked
    );
    assert_eq!(
        report.proxied.lost_unexplained + report.twin.lost_unexplained,
        0,
        "acknowledged writes lost outside any crash window: {:?} {:?}",
        report.proxied.examples,
        report.twin.examples
    );
    let crashes = windows.iter().filter(|w| !w.kind.graceful()).count();
    assert!(
        report.twin.lost <= report.direct.lost + CRASH_TOLERANCE * crashes,
        "through the proxy {} acknowledged writes were lost in crashes, going direct {} \
         (tolerance {CRASH_TOLERANCE} per crash)",
        report.twin.lost,
        report.direct.lost
    );
    let (Some(baseline), Some(after)) = (baseline, after) else {
        panic!("no resource figures: baseline {baseline:?}, after {after:?}");
    };
    if let Err(leak) = check_leak(&baseline, &after) {
        panic!("the proxy did not return to its idle baseline: {leak}");
    }
    let Some(after_burst) = after_burst else {
        panic!("no resource figures after the second burst");
    };
    if let Err(leak) = soak::check_steady(&after, &after_burst) {
        panic!("another burst of connections grew the idle proxy: {leak}");
    }
}
