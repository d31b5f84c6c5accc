//! Failovers under traffic: a coordinated `CLUSTER FAILOVER` and a master
//! killed with SIGKILL, while a client does SET/GET through the proxy on
//! keys of every shard. Measures the errors the client sees and how long
//! until it is served again, and asserts bounds on both; data written
//! (and replicated) before must survive.
//! Real `redis-server` nodes and the real proxy on 127.0.0.1, with the
//! proxy's defaults (`--retry-window 5s`, `--topology-refresh 5s`).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use testbed::{
    cluster::{NodeInfo, RedisCluster, slot_of},
    process::wait_for,
    proxy::Proxy,
    resp::{RespClient, encode},
};

/// Keys written before the failover, checked after it.
const PRELOADED: usize = 3_000;
/// Keys each traffic client cycles through: about a third on each shard.
const LIVE_KEYS: u64 = 3_000;
/// Traffic clients, each with its own connection and keys.
const CLIENTS: usize = 3;
/// A coordinated failover must not keep the client from being served for
/// longer than this.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// A crashed master: node timeout (1 s) + election + the proxy noticing.
const CRASH_BOUND: Duration = Duration::from_secs(15);
/// Traffic kept going after the cluster is healthy again.
const AFTERWARDS: Duration = Duration::from_secs(3);

/// The two tests both fail nodes over and time the outcome: one at a time,
/// so they do not compete for two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// One SET+GET round of the traffic.
struct Op {
    start: Instant,
    end: Instant,
    key: String,
    /// `None`: both replies as expected.
    error: Option<String>,
}

struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Op>>>,
}

impl Traffic {
    /// [`CLIENTS`] clients, each doing SET `live:<client>:<i>` to a fresh
    /// value and GET it back, cycling over its keys.
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS).map(|t| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut c = client(addr);
                let mut ops = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("live:{t}:{}", n % LIVE_KEYS);
                    let v = format!("v{n}");
                    let want = format!("${}\r\n{v}\r\n", v.len());
                    let start = Instant::now();
                    let error = match c.call_str(&["SET", &key, &v]) {
                        Ok(r) if r == "+OK\r\n" => match c.call_str(&["GET", &key]) {
                            Ok(r) if r == want => None,
                            other => Some(format!("GET: {other:?}")),
                        },
                        other => Some(format!("SET: {other:?}")),
                    };
                    if error.is_some() {
                        // An I/O error leaves the stream in an unknown
                        // state: carry on over a fresh connection.
                        if let Ok(fresh) = RespClient::connect(addr) {
                            c = fresh;
                        }
                    }
                    ops.push(Op {
                        start,
                        end: Instant::now(),
                        key,
                        error,
                    });
                    n += 1;
                }
                ops
            })
        });
        let threads = threads.collect();
        Self { stop, threads }
    }

    /// Stops the clients; every round of all of them, by start time.
    fn finish(mut self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops: Vec<Op> = self
            .threads
            .drain(..)
            .flat_map(|t| t.join().expect("traffic thread panicked"))
            .collect();
        ops.sort_by_key(|o| o.start);
        ops
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the clients went through from `event` on.
struct Outcome {
    ops: usize,
    errors: Vec<String>,
    /// Errors on keys of shards that did not fail over.
    bystander_errors: Vec<String>,
    /// From the event to the end of the first success on the failing
    /// shard after its last error; zero without errors.
    recovery: Duration,
    /// The slowest round that ended after the event (retries inside the
    /// proxy show up here, not as errors).
    slowest: Duration,
    /// From the event to the end of the first fast, successful round on
    /// the failing shard started after every failed or stalled one ended:
    /// the time it was not served normally, stalls included.
    disruption: Duration,
}

/// A round slower than this was held up by the failover.
const STALLED: Duration = Duration::from_millis(500);

/// `shard`: the master that fails over, as it was before.
fn outcome(ops: &[Op], event: Instant, shard: &NodeInfo) -> Outcome {
    let all: Vec<&Op> = ops.iter().filter(|o| o.end >= event).collect();
    let on_shard = |o: &&&Op| shard.owns(slot_of(o.key.as_bytes()));
    let describe = |o: &&Op| {
        o.error.as_ref().map(|e| {
            format!(
                "+{:?} {} (took {:?}): {e}",
                o.start.saturating_duration_since(event),
                o.key,
                o.end - o.start
            )
        })
    };
    let errors: Vec<String> = all.iter().filter_map(describe).collect();
    let bystander_errors: Vec<String> = all
        .iter()
        .filter(|o| !on_shard(o))
        .filter_map(describe)
        .collect();
    let slowest = all
        .iter()
        .map(|o| o.end - o.start)
        .max()
        .unwrap_or_default();
    let after: Vec<&Op> = all.iter().filter(on_shard).copied().collect();
    let last_error = after.iter().rfind(|o| o.error.is_some()).map(|o| o.end);
    let recovery = match last_error {
        None => Duration::ZERO,
        Some(last) => after
            .iter()
            .find(|o| o.error.is_none() && o.start >= last)
            .map_or(Duration::MAX, |o| o.end - event),
    };
    let disrupted_until = after
        .iter()
        .filter(|o| o.error.is_some() || o.end - o.start > STALLED)
        .map(|o| o.end)
        .max();
    let disruption = match disrupted_until {
        None => Duration::ZERO,
        Some(until) => after
            .iter()
            .find(|o| o.error.is_none() && o.end - o.start <= STALLED && o.start >= until)
            .map_or(Duration::MAX, |o| o.end - event),
    };
    Outcome {
        ops: all.len(),
        errors,
        bystander_errors,
        recovery,
        slowest,
        disruption,
    }
}

/// Writes `pre:<i>` through the proxy and waits until every replica holds
/// as many keys as its master, so a failover cannot lose them.
fn preload(cluster: &RedisCluster, proxy: &Proxy) -> Vec<String> {
    let keys: Vec<String> = (0..PRELOADED).map(|i| format!("pre:{i}")).collect();
    let mut c = client(proxy.addr());
    for chunk in keys.chunks(1_000) {
        let mut out = Vec::new();
        for k in chunk {
            out.extend(encode(&[b"SET", k.as_bytes(), k.as_bytes()]));
        }
        c.send_raw(&out).expect("send SETs");
        for k in chunk {
            assert_eq!(&c.read_reply().expect("SET")[..], b"+OK\r\n", "SET {k}");
        }
    }
    for master in cluster.masters() {
        let want = cluster.cli(master, &["DBSIZE"]);
        assert_ne!(want.trim(), "0", "{master} holds no preloaded key");
        for replica in cluster.replicas_of(master) {
            wait_for(
                &format!("{replica} to catch up with {master}"),
                Duration::from_secs(10),
                || (cluster.cli(replica, &["DBSIZE"]) == want).then_some(()),
            );
        }
    }
    keys
}

fn assert_preloaded(proxy: &Proxy, keys: &[String]) {
    let mut c = client(proxy.addr());
    for chunk in keys.chunks(1_000) {
        let mut out = Vec::new();
        for k in chunk {
            out.extend(encode(&[b"GET", k.as_bytes()]));
        }
        c.send_raw(&out).expect("send GETs");
        for k in chunk {
            let reply = c.read_reply().expect("GET");
            assert_eq!(
                String::from_utf8_lossy(&reply),
                format!("${}\r\n{k}\r\n", k.len()),
                "preloaded {k} after the failover"
            );
        }
    }
}

/// After the dust settles every command succeeds, on a fresh client too.
fn assert_all_served(proxy: &Proxy, ops: &[Op], healthy: Instant) {
    let late: Vec<&Op> = ops
        .iter()
        .filter(|o| o.start >= healthy + Duration::from_secs(1))
        .collect();
    assert!(
        late.len() > 100,
        "only {} rounds after recovery",
        late.len()
    );
    let late_errors: Vec<&String> = late.iter().filter_map(|o| o.error.as_ref()).collect();
    assert!(
        late_errors.is_empty(),
        "{} errors after the cluster was healthy again: {late_errors:?}",
        late_errors.len()
    );
    let mut c = client(proxy.addr());
    for i in 0..LIVE_KEYS {
        let (k, v) = (format!("after:{i}"), format!("a{i}"));
        assert_eq!(c.call_str(&["SET", &k, &v]).expect("SET"), "+OK\r\n");
        assert_eq!(
            c.call_str(&["GET", &k]).expect("GET"),
            format!("${}\r\n{v}\r\n", v.len())
        );
    }
}

/// `master`'s line of `CLUSTER NODES`, with its slots.
fn shard(cluster: &RedisCluster, master: SocketAddr) -> NodeInfo {
    cluster
        .view()
        .into_iter()
        .find(|n| n.addr == master)
        .expect("master in the view")
}

fn report(what: &str, o: &Outcome) {
    eprintln!(
        "{what}: {} rounds after the event, {} errors, first success after the last error \
         {:?} after the event, slowest round {:?}, served normally again after {:?}",
        o.ops,
        o.errors.len(),
        o.recovery,
        o.slowest,
        o.disruption
    );
    for e in o.errors.iter().take(10) {
        eprintln!("  {e}");
    }
    assert!(
        o.bystander_errors.is_empty(),
        "{what}: errors on shards that did not fail over: {:#?}",
        o.bystander_errors
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn coordinated_failover_under_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let keys = preload(&cluster, &proxy);

    let master = cluster.masters()[0];
    let replica = cluster.replicas_of(master)[0];
    let me = shard(&cluster, master);
    let live_on_master = (0..LIVE_KEYS)
        .filter(|i| me.owns(slot_of(format!("live:0:{i}").as_bytes())))
        .count();
    let owned = me.slot_count();
    eprintln!(
        "failing over {master} ({owned} slots, {live_on_master} of the live keys) to {replica}"
    );
    assert!(live_on_master > 0);

    let traffic = Traffic::start(proxy.addr());
    std::thread::sleep(Duration::from_secs(1));
    let event = Instant::now();
    cluster.failover(replica);
    let healthy = Instant::now();
    eprintln!(
        "CLUSTER FAILOVER done, cluster healthy after {:?}",
        healthy - event
    );
    assert!(cluster.masters().contains(&replica));
    std::thread::sleep(AFTERWARDS);
    let ops = traffic.finish();

    let o = outcome(&ops, event, &me);
    report("coordinated failover", &o);
    assert!(
        o.recovery <= FAILOVER_BOUND,
        "clients served again only after {:?} (bound {FAILOVER_BOUND:?}); errors: {:#?}\n{}",
        o.recovery,
        o.errors,
        tail(&proxy.log(), 30)
    );
    assert!(
        o.slowest <= FAILOVER_BOUND && o.disruption <= FAILOVER_BOUND,
        "a round took {:?}, normal service after {:?} (bound {FAILOVER_BOUND:?})",
        o.slowest,
        o.disruption
    );
    assert_all_served(&proxy, &ops, healthy);
    assert_preloaded(&proxy, &keys);
}

#[test]
fn master_crash_under_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let keys = preload(&cluster, &proxy);

    let master = cluster.masters()[1];
    let replica = cluster.replicas_of(master)[0];
    let me = shard(&cluster, master);
    eprintln!(
        "killing {master} ({} slots); {replica} should take over",
        me.slot_count()
    );

    let traffic = Traffic::start(proxy.addr());
    std::thread::sleep(Duration::from_secs(1));
    let event = Instant::now();
    cluster.kill(master);
    cluster.wait_healthy();
    let healthy = Instant::now();
    eprintln!(
        "{replica} promoted, cluster healthy after {:?}",
        healthy - event
    );
    assert!(cluster.masters().contains(&replica));
    std::thread::sleep(AFTERWARDS);
    let ops = traffic.finish();

    let o = outcome(&ops, event, &me);
    report("master crash", &o);
    assert!(
        o.recovery <= CRASH_BOUND,
        "clients served again only after {:?} (bound {CRASH_BOUND:?}); errors: {:#?}\n{}",
        o.recovery,
        o.errors,
        tail(&proxy.log(), 30)
    );
    assert!(
        o.slowest <= CRASH_BOUND && o.disruption <= CRASH_BOUND,
        "a round took {:?}, normal service after {:?} (bound {CRASH_BOUND:?})",
        o.slowest,
        o.disruption
    );
    assert_all_served(&proxy, &ops, healthy);
    assert_preloaded(&proxy, &keys);
}
