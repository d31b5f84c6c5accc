//! Resharding under load: clients keep writing and reading through the
//! proxy while slots move between masters, in both directions, both with
//! `redis-cli --cluster reshard` and by hand (`SETSLOT`/`MIGRATE`). The
//! clients must see no error at all (the proxy follows MOVED and ASK), and
//! every key written must read back afterwards.
//! Real `redis-server` nodes and the real proxy on 127.0.0.1.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use testbed::{
    cluster::{RedisCluster, SLOTS, key_in_slot, slot_of},
    proxy::Proxy,
    resp::{RespClient, encode},
};

/// Keys written before the resharding starts: most slots hold some.
const PRELOADED: u64 = 30_000;
/// Threads writing new keys during the resharding.
const WRITERS: u64 = 4;
/// Slots moved by hand, each preloaded with this many keys, so a reader
/// hammering them meets keys already moved (ASK) while the slot migrates.
const HOT_SLOTS: usize = 6;
const HOT_KEYS: usize = 300;
/// Slots moved by each `redis-cli --cluster reshard`.
const RESHARD: usize = 500;
/// Pipelined batches stay below the proxy's default `--max-pipeline`.
const BATCH: usize = 1_000;
/// No hot slot is migrating.
const NONE: u32 = u32::MAX;

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

fn value(key: &str) -> String {
    format!("value-of-{key}")
}

fn hot_key(slot: u16, j: usize) -> String {
    format!("{{{}}}:{j}", key_in_slot(slot))
}

/// SETs `key -> value(key)` for all keys, pipelined.
fn preload(c: &mut RespClient, keys: &[String]) {
    for batch in keys.chunks(BATCH) {
        let mut out = Vec::new();
        for k in batch {
            out.extend(encode(&[b"SET", k.as_bytes(), value(k).as_bytes()]));
        }
        c.send_raw(&out).expect("send SETs");
        for k in batch {
            let reply = c.read_reply().expect("SET reply");
            assert_eq!(&reply[..], b"+OK\r\n", "SET {k}");
        }
    }
}

/// GETs all keys, pipelined; returns the ones not holding `value(key)`.
fn check_all(c: &mut RespClient, keys: &[String]) -> Vec<String> {
    let mut bad = Vec::new();
    for batch in keys.chunks(BATCH) {
        let mut out = Vec::new();
        for k in batch {
            out.extend(encode(&[b"GET", k.as_bytes()]));
        }
        c.send_raw(&out).expect("send GETs");
        for k in batch {
            let reply = c.read_reply().expect("GET reply");
            let v = value(k);
            if reply[..] != *format!("${}\r\n{v}\r\n", v.len()).as_bytes() {
                bad.push(format!("{k}: {:?}", String::from_utf8_lossy(&reply)));
            }
        }
    }
    bad
}

struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            ops: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        }
    }

    /// A client thread: each round, `next(round)` gives a new key to SET
    /// then GET, and an existing key to GET. Returns the keys it wrote.
    fn spawn(
        &mut self,
        addr: SocketAddr,
        mut next: impl FnMut(u64) -> (Option<String>, Option<String>) + Send + 'static,
    ) {
        let (stop, ops, errors) = (
            Arc::clone(&self.stop),
            Arc::clone(&self.ops),
            Arc::clone(&self.errors),
        );
        self.threads.push(std::thread::spawn(move || {
            let mut c = client(addr);
            let mut written = Vec::new();
            let mut round = 0;
            let fail = |c: &mut RespClient, what: String| {
                errors.lock().expect("lock").push(what);
                // Carry on over a fresh connection.
                if let Ok(fresh) = RespClient::connect(addr) {
                    *c = fresh;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let (new, old) = next(round);
                round += 1;
                if let Some(k) = new {
                    let v = value(&k);
                    let want = format!("${}\r\n{v}\r\n", v.len());
                    match c.call_str(&["SET", &k, &v]) {
                        Ok(r) if r == "+OK\r\n" => written.push(k.clone()),
                        other => {
                            fail(&mut c, format!("SET {k}: {other:?}"));
                            continue;
                        }
                    }
                    match c.call_str(&["GET", &k]) {
                        Ok(r) if r == want => {}
                        other => fail(&mut c, format!("GET {k} right after SET: {other:?}")),
                    }
                }
                if let Some(k) = old {
                    let v = value(&k);
                    let want = format!("${}\r\n{v}\r\n", v.len());
                    match c.call_str(&["GET", &k]) {
                        Ok(r) if r == want => {}
                        other => fail(&mut c, format!("GET {k}: {other:?}")),
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            written
        }));
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("lock").clone()
    }

    /// Stops every thread; returns the keys they wrote.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .flat_map(|t| t.join().expect("load thread panicked"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A tiny deterministic PRNG (xorshift64).
fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn resharding_under_load_loses_nothing() {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);

    // Preload: k:0.. over most slots, plus the hot slots' keys, spread
    // over all three masters.
    let mut preloaded: Vec<String> = (0..PRELOADED).map(|i| format!("k:{i}")).collect();
    let hot: Vec<u16> = (0..HOT_SLOTS)
        .map(|j| u16::try_from(1000 + j * 2500).expect("slot"))
        .collect();
    for &slot in &hot {
        preloaded.extend((0..HOT_KEYS).map(|j| hot_key(slot, j)));
    }
    let mut c = client(proxy.addr());
    let started = Instant::now();
    preload(&mut c, &preloaded);
    let slots_with_keys: std::collections::BTreeSet<u16> =
        preloaded.iter().map(|k| slot_of(k.as_bytes())).collect();
    eprintln!(
        "preloaded {} keys over {} of {SLOTS} slots in {:?}",
        preloaded.len(),
        slots_with_keys.len(),
        started.elapsed()
    );

    // Load: writers add k:<i> beyond the preloaded ones and read random
    // old keys; a hot client works on whichever slot is migrating by hand.
    let preloaded = Arc::new(preloaded);
    let migrating = Arc::new(AtomicU32::new(NONE));
    let mut load = Load::new();
    for w in 0..WRITERS {
        let old = Arc::clone(&preloaded);
        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
        load.spawn(proxy.addr(), move |round| {
            let i = PRELOADED + w + round * WRITERS;
            let pick = usize::try_from(rand(&mut seed) % old.len() as u64).expect("index");
            (Some(format!("k:{i}")), Some(old[pick].clone()))
        });
    }
    {
        let migrating = Arc::clone(&migrating);
        let mut seed = 0x1234_5678_u64;
        load.spawn(proxy.addr(), move |round| {
            let slot = migrating.load(Ordering::Relaxed);
            let Ok(slot) = u16::try_from(slot) else {
                std::thread::sleep(Duration::from_millis(1));
                return (None, None);
            };
            let j = usize::try_from(rand(&mut seed) % HOT_KEYS as u64).expect("index");
            let new = format!("{{{}}}:new:{round}", key_in_slot(slot));
            (Some(new), Some(hot_key(slot, j)))
        });
    }
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(load.ops() > 0, "no load: {:?}", load.errors());

    // Moves: redis-cli reshard one way and back, and by hand.
    let (a, b, m3) = (masters[0], masters[1], masters[2]);
    let mut moved_slots = 0;
    for (from, to) in [(a, b), (b, a), (m3, a)] {
        let started = Instant::now();
        let moved = cluster.reshard(RESHARD, from, to);
        let with_keys = moved.iter().filter(|s| slots_with_keys.contains(s)).count();
        eprintln!(
            "reshard {RESHARD} slots {from} -> {to}: {} moved ({with_keys} holding keys) in {:?}, \
             {} ops so far",
            moved.len(),
            started.elapsed(),
            load.ops()
        );
        assert_eq!(moved.len(), RESHARD, "{from} -> {to}");
        moved_slots += moved.len();
    }
    for &slot in &hot {
        let home = cluster.owner_of_slot(slot);
        let away = *masters
            .iter()
            .find(|m| **m != home)
            .expect("another master");
        for to in [away, home] {
            let started = Instant::now();
            migrating.store(u32::from(slot), Ordering::Relaxed);
            cluster.migrate_slot(slot, to);
            migrating.store(NONE, Ordering::Relaxed);
            assert_eq!(cluster.owner_of_slot(slot), to);
            eprintln!(
                "slot {slot} ({HOT_KEYS}+ keys) moved by hand to {to} in {:?}",
                started.elapsed()
            );
            moved_slots += 1;
        }
    }
    // A little more traffic on the final layout, then stop.
    std::thread::sleep(Duration::from_millis(500));
    let errors = load.errors();
    let ops = load.ops();
    let written = load.finish();
    let elapsed = load_started.elapsed();

    let moved = proxy.metric(r#"redirector_redirections_total{kind="moved"}"#);
    let ask = proxy.metric(r#"redirector_redirections_total{kind="ask"}"#);
    eprintln!(
        "{ops} client rounds in {elapsed:?}, {} new keys written, {} errors; {moved_slots} slot \
         moves; proxy followed {moved} MOVED and {ask} ASK",
        written.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} client errors during resharding, first ones: {:#?}\nproxy log tail:\n{}",
        errors.len(),
        &errors[..errors.len().min(20)],
        tail(&proxy.log(), 30)
    );
    assert!(written.len() > 1000, "only {} keys written", written.len());
    assert!(
        moved + ask > 0.0,
        "no redirection followed: the test did not exercise MOVED/ASK"
    );
    assert!(
        ask > 0.0,
        "no ASK followed: the hot slots' migration was missed"
    );

    // Everything reads back, through the proxy, on the final layout.
    cluster.wait_healthy();
    let mut all: Vec<String> = preloaded.iter().cloned().collect();
    all.extend(written);
    let mut c = client(proxy.addr());
    let bad = check_all(&mut c, &all);
    assert!(
        bad.is_empty(),
        "{} of {} keys do not read back, e.g. {:?}",
        bad.len(),
        all.len(),
        &bad[..bad.len().min(20)]
    );
    // And nothing extra: the masters hold exactly these keys.
    assert_eq!(
        cluster.total_keys(),
        all.len() as u64,
        "keys on the masters"
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
