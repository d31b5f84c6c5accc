//! Every command class through the proxy, against a real 3+3 cluster, with
//! replies compared byte for byte against a single standalone Redis where
//! the semantics are the same.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use testbed::{
    TempDir,
    cluster::{RedisCluster, slot_of},
    process::wait_for,
    proxy::Proxy,
    redis::RedisServer,
    resp::RespClient,
};

/// A proxy client and a standalone-Redis client, fed the same commands.
struct Pair {
    proxy: RespClient,
    redis: RespClient,
}

impl Pair {
    fn new(proxy: SocketAddr, redis: SocketAddr) -> Self {
        Self {
            proxy: RespClient::connect(proxy).expect("proxy"),
            redis: RespClient::connect(redis).expect("redis"),
        }
    }

    /// Both replies, which must be identical; returns the reply.
    fn same(&mut self, args: &[&str]) -> Bytes {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let through_proxy = self.proxy.call(&args).expect("proxy reply");
        let direct = self.redis.call(&args).expect("redis reply");
        assert_eq!(
            String::from_utf8_lossy(&through_proxy),
            String::from_utf8_lossy(&direct),
            "different replies to {:?}",
            args.iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
        );
        through_proxy
    }
}

fn text(reply: &Bytes) -> String {
    String::from_utf8_lossy(reply).into_owned()
}

struct Setup {
    cluster: RedisCluster,
    proxy: Proxy,
    redis: RedisServer,
    _dir: TempDir,
}

fn setup(proxy_args: &[&str]) -> Setup {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), proxy_args);
    let dir = TempDir::new("rdr-standalone-");
    let redis = RedisServer::start_local(dir.path(), &[]);
    Setup {
        cluster,
        proxy,
        redis,
        _dir: dir,
    }
}

/// A proxy with `workers` workers (`--workers`; 1 is the default).
fn setup_workers(workers: usize) -> Setup {
    setup(&["--workers", &workers.to_string()])
}

/// Keys on all three shards.
const SPREAD: [&str; 6] = ["a", "b", "c", "user:1", "user:2", "session:9"];

#[test]
fn single_key_commands_and_local_replies_match_redis() {
    single_key_commands_and_local_replies_match_redis_on(1);
}

#[test]
fn single_key_commands_match_redis_on_two_workers() {
    single_key_commands_and_local_replies_match_redis_on(2);
}

fn single_key_commands_and_local_replies_match_redis_on(workers: usize) {
    let s = setup_workers(workers);
    let mut p = Pair::new(s.proxy.addr(), s.redis.addr());
    let masters: Vec<_> = SPREAD
        .iter()
        .map(|k| s.cluster.owner_of_slot(slot_of(k.as_bytes())))
        .collect();
    assert!(
        masters
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 3,
        "keys must cover every shard"
    );

    for cmd in [
        &["SET", "k1", "v1"][..],
        &["GET", "k1"],
        &["GET", "nokey"],
        &["SET", "k1", "v2", "NX"],
        &["SET", "k1", "v3", "XX", "GET"],
        &["INCR", "cnt"],
        &["INCRBY", "cnt", "5"],
        &["APPEND", "k1", "xyz"],
        &["STRLEN", "k1"],
        &["GETRANGE", "k1", "0", "1"],
        &["HSET", "h", "f1", "v1", "f2", "v2"],
        &["HGET", "h", "f1"],
        &["HGETALL", "h"],
        &["HDEL", "h", "f1"],
        &["LPUSH", "l", "a", "b", "c"],
        &["LRANGE", "l", "0", "-1"],
        &["RPOP", "l"],
        &["SADD", "s", "m"],
        &["SISMEMBER", "s", "m"],
        &["ZADD", "z", "1", "a", "2", "b"],
        &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
        &["ZINCRBY", "z", "2", "a"],
        &["XADD", "st", "1-1", "f", "v"],
        &["XRANGE", "st", "-", "+"],
        &["EXPIRE", "k1", "100"],
        &["TTL", "k1"],
        &["TYPE", "h"],
        &["OBJECT", "ENCODING", "h"],
        &["EVAL", "return {KEYS[1], ARGV[1]}", "1", "key", "arg"],
        &["EVAL", "return redis.call('incr', KEYS[1])", "1", "evc"],
        &["PING"],
        &["PING", "hello"],
        &["ECHO", "hi"],
        &["SELECT", "0"],
        &["GET"],
        &["SET", "onlykey"],
        &["NOSUCHCOMMAND", "x"],
        &["HGET", "k1", "f"],
    ] {
        p.same(cmd);
    }
    // Scripts and functions are loaded on every master.
    let sha = text(&p.same(&["SCRIPT", "LOAD", "return 42"]));
    let sha = sha.lines().nth(1).expect("sha").to_string();
    p.same(&["EVALSHA", &sha, "0"]);
    p.same(&[
        "SCRIPT",
        "EXISTS",
        &sha,
        "0000000000000000000000000000000000000000",
    ]);
    for master in s.cluster.masters() {
        assert_eq!(
            s.cluster.cli(master, &["SCRIPT", "EXISTS", &sha]).trim(),
            "1"
        );
    }
    let library = "#!lua name=lib\nredis.register_function('echo_key', function(keys, args) return keys[1] end)";
    p.same(&["FUNCTION", "LOAD", library]);
    p.same(&["FCALL", "echo_key", "1", "user:2"]);
    p.same(&["FCALL", "echo_key", "1", "session:9"]);

    // In cluster mode, SELECT of another db is refused (as Redis Cluster does).
    let reply = p.proxy.call(&[b"SELECT", b"1"]).expect("select");
    assert_eq!(
        text(&reply),
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    let time = text(&p.proxy.call(&[b"TIME"]).expect("time"));
    assert!(time.starts_with("*2\r\n$10\r\n"), "{time}");
    let reply = p.proxy.call(&[b"QUIT"]).expect("quit");
    assert_eq!(text(&reply), "+OK\r\n");
    assert!(
        p.proxy.read_reply().is_err(),
        "QUIT must close the connection"
    );
}

#[test]
fn multi_key_commands_split_and_merge_like_one_redis() {
    multi_key_commands_split_and_merge_like_one_redis_on(1);
}

#[test]
fn multi_key_commands_split_and_merge_like_one_redis_on_two_workers() {
    multi_key_commands_split_and_merge_like_one_redis_on(2);
}

fn multi_key_commands_split_and_merge_like_one_redis_on(workers: usize) {
    let s = setup_workers(workers);
    let mut p = Pair::new(s.proxy.addr(), s.redis.addr());
    let mut mset = vec!["MSET"];
    for k in SPREAD {
        mset.extend([k, k]);
    }
    p.same(&mset);
    let mut mget = vec!["MGET"];
    mget.extend(SPREAD);
    mget.insert(3, "missing");
    p.same(&mget);
    p.same(&["EXISTS", "a", "b", "missing", "a", "user:1"]);
    p.same(&["TOUCH", "a", "user:2", "missing"]);
    p.same(&["DEL", "a", "missing", "user:1"]);
    p.same(&["UNLINK", "b", "session:9"]);
    p.same(&["MGET", "a", "b", "c", "user:2"]);
    p.same(&["MSET", "odd"]);
    p.same(&["MGET"]);
    // Same slot: runs as one command, as on one Redis.
    p.same(&["MSETNX", "{t}x", "1", "{t}y", "2"]);
    p.same(&["MSETNX", "{t}x", "1", "{t}z", "2"]);
    // Atomic multi-key writes across slots: Redis Cluster's own error.
    let reply = p
        .proxy
        .call(&[b"MSETNX", b"a", b"1", b"user:1", b"2"])
        .expect("msetnx");
    assert_eq!(
        text(&reply),
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    let reply = p.proxy.call(&[b"RENAME", b"c", b"user:2"]).expect("rename");
    assert!(text(&reply).starts_with("-CROSSSLOT"), "{}", text(&reply));

    // Whole-cluster commands.
    p.same(&["DBSIZE"]);
    let keys = |c: &mut RespClient| {
        let reply = text(&c.call(&[b"KEYS", b"*"]).expect("keys"));
        let mut keys: Vec<String> = reply
            .lines()
            .skip(1)
            .filter(|l| !l.starts_with('$'))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&mut p.proxy), keys(&mut p.redis));
    // Replicas appear in CLUSTER SLOTS once they have synced; the periodic
    // refresh picks them up.
    let info = wait_for(
        "the proxy to see every replica",
        Duration::from_secs(15),
        || {
            let info = text(&p.proxy.call(&[b"INFO"]).ok()?);
            info.contains("upstream_replicas:3").then_some(info)
        },
    );
    for field in [
        "# Server",
        "redirector_version:",
        "cluster_enabled:1",
        "upstream_masters:3",
        "db0:keys=",
    ] {
        assert!(info.contains(field), "INFO lacks {field}:\n{info}");
    }
    p.same(&["FLUSHALL"]);
    for master in s.cluster.masters() {
        assert_eq!(
            s.cluster.cli(master, &["DBSIZE"]).trim(),
            "0",
            "{master} not flushed"
        );
    }
    p.same(&["DBSIZE"]);
}

/// Sends `commands` in one write and reads one reply per command, as text.
fn pipeline(c: &mut RespClient, commands: &[&[&str]]) -> Vec<String> {
    let bytes: Vec<u8> = commands
        .iter()
        .flat_map(|args| {
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            testbed::resp::encode(&args)
        })
        .collect();
    c.send_raw(&bytes).expect("send the pipeline");
    commands
        .iter()
        .map(|args| text(&c.read_reply().unwrap_or_else(|e| panic!("{args:?}: {e}"))))
        .collect()
}

/// Two keys owned by different masters.
fn keys_on_two_masters(cluster: &RedisCluster) -> (&'static str, &'static str) {
    let owner = |k: &str| cluster.owner_of_slot(slot_of(k.as_bytes()));
    let first = SPREAD[0];
    let second = SPREAD
        .iter()
        .copied()
        .find(|k| owner(k) != owner(first))
        .expect("keys on two masters");
    (first, second)
}

fn bulk(value: &str) -> String {
    format!("${}\r\n{value}\r\n", value.len())
}

#[test]
fn a_pipelined_write_after_a_split_mget_is_not_seen_by_it() {
    let s = setup(&[]);
    let (a, b) = keys_on_two_masters(&s.cluster);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    // One Redis runs a client's commands in order: each MGET sees the SET
    // before it and none after it, whichever master holds the key.
    for round in 1..=50 {
        let (now, before) = (round.to_string(), (round - 1).to_string());
        let replies = pipeline(
            &mut c,
            &[
                &["SET", a, &now],
                &["MGET", a, b],
                &["SET", b, &now],
                &["MGET", b, a],
                &["DEL", a, b],
                &["EXISTS", a, b],
                &["MSET", a, &now, b, &now],
            ],
        );
        let old_b = if round == 1 {
            "$-1\r\n".to_string()
        } else {
            bulk(&before)
        };
        assert_eq!(
            replies,
            [
                "+OK\r\n".to_string(),
                format!("*2\r\n{}{old_b}", bulk(&now)),
                "+OK\r\n".to_string(),
                format!("*2\r\n{}{}", bulk(&now), bulk(&now)),
                ":2\r\n".to_string(),
                ":0\r\n".to_string(),
                "+OK\r\n".to_string(),
            ],
            "round {round}"
        );
    }
}

#[test]
fn a_pipelined_write_after_a_fan_out_is_not_counted_by_it() {
    let s = setup(&[]);
    let (a, b) = keys_on_two_masters(&s.cluster);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    for round in 1..=20 {
        let replies = pipeline(
            &mut c,
            &[
                &["FLUSHALL"],
                &["DBSIZE"],
                &["SET", a, "1"],
                &["DBSIZE"],
                &["SET", b, "1"],
                &["KEYS", "*"],
                &["DBSIZE"],
            ],
        );
        assert_eq!(
            &replies[..5],
            ["+OK\r\n", ":0\r\n", "+OK\r\n", ":1\r\n", "+OK\r\n"],
            "round {round}"
        );
        assert!(
            replies[5].starts_with("*2\r\n"),
            "round {round}: {}",
            replies[5]
        );
        assert_eq!(replies[6], ":2\r\n", "round {round}");
    }
}

#[test]
fn exec_sees_the_pipelined_writes_before_it_and_a_pipelined_write_breaks_a_watch() {
    let s = setup(&[]);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    for round in 1..=20 {
        let value = format!("v{round}");
        // The client's own SET, pipelined after its WATCH was answered,
        // breaks the watch: Redis aborts the EXEC.
        assert_eq!(c.call_str(&["WATCH", "w"]).expect("watch"), "+OK\r\n");
        let replies = pipeline(
            &mut c,
            &[
                &["SET", "w", "touched"],
                &["MULTI"],
                &["SET", "w", "in-exec"],
                &["EXEC"],
                &["GET", "w"],
            ],
        );
        assert_eq!(
            replies,
            [
                "+OK\r\n",
                "+OK\r\n",
                "+QUEUED\r\n",
                "*-1\r\n",
                "$7\r\ntouched\r\n"
            ],
            "round {round}: a write after WATCH"
        );
        // The same, WATCH pipelined too.
        let replies = pipeline(
            &mut c,
            &[
                &["WATCH", "w"],
                &["SET", "w", "touched"],
                &["MULTI"],
                &["SET", "w", "in-exec"],
                &["EXEC"],
            ],
        );
        assert_eq!(replies[4], "*-1\r\n", "round {round}: WATCH pipelined");
        // Without WATCH, EXEC runs after the SET before it and before the
        // GET after it.
        let replies = pipeline(
            &mut c,
            &[
                &["SET", "w", &value],
                &["MULTI"],
                &["GET", "w"],
                &["SET", "w", "from-exec"],
                &["EXEC"],
                &["GET", "w"],
            ],
        );
        assert_eq!(
            replies[4..],
            [format!("*2\r\n{}+OK\r\n", bulk(&value)), bulk("from-exec")],
            "round {round}: EXEC in order"
        );
    }
}

#[test]
fn cluster_aware_clients_see_a_single_node_owning_every_slot() {
    let s = setup(&[]);
    let mut client = RespClient::connect(s.proxy.addr()).expect("proxy");
    let port = s.proxy.addr().port();
    let slots = text(&client.call(&[b"CLUSTER", b"SLOTS"]).expect("slots"));
    assert!(
        slots.starts_with(&format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{port}\r\n"
        )),
        "{slots}"
    );
    let nodes = text(&client.call(&[b"CLUSTER", b"NODES"]).expect("nodes"));
    assert!(
        nodes.contains(&format!("127.0.0.1:{port}@{port} myself,master")),
        "{nodes}"
    );
    assert!(nodes.contains("connected 0-16383"), "{nodes}");
    let shards = text(&client.call(&[b"CLUSTER", b"SHARDS"]).expect("shards"));
    assert!(
        shards.contains("16383") && shards.contains("online"),
        "{shards}"
    );
    let info = text(&client.call(&[b"CLUSTER", b"INFO"]).expect("info"));
    assert!(info.contains("cluster_state:ok"), "{info}");
    let keyslot = text(
        &client
            .call(&[b"CLUSTER", b"KEYSLOT", b"{user1}:a"])
            .expect("keyslot"),
    );
    assert_eq!(keyslot, format!(":{}\r\n", slot_of(b"user1")));
    client.call(&[b"SET", b"{counted}k", b"v"]).expect("set");
    let slot = slot_of(b"counted").to_string();
    let count = text(
        &client
            .call(&[b"CLUSTER", b"COUNTKEYSINSLOT", slot.as_bytes()])
            .expect("count"),
    );
    assert_eq!(count, ":1\r\n");
}

#[test]
fn transactions_run_on_leased_connections_without_connect_churn() {
    transactions_run_on_leased_connections_without_connect_churn_on(1);
}

#[test]
fn transactions_run_on_leased_connections_on_two_workers() {
    transactions_run_on_leased_connections_without_connect_churn_on(2);
}

fn transactions_run_on_leased_connections_without_connect_churn_on(workers: usize) {
    let s = setup_workers(workers);
    let mut p = Pair::new(s.proxy.addr(), s.redis.addr());
    for cmd in [
        &["MULTI"][..],
        &["SET", "{tx}a", "1"],
        &["INCR", "{tx}a"],
        &["GET", "{tx}a"],
        &["EXEC"],
        &["EXEC"],
        &["DISCARD"],
        &["MULTI"],
        &["MULTI"],
        &["SET", "{tx}b", "1"],
        &["DISCARD"],
        &["GET", "{tx}b"],
        &["MULTI"],
        &["INCR"],
        &["EXEC"],
    ] {
        p.same(cmd);
    }
    // Keys of different slots in one transaction: CROSSSLOT, then EXECABORT.
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    c.call(&[b"MULTI"]).expect("multi");
    c.call(&[b"SET", b"{tx}a", b"1"]).expect("queued");
    let reply = text(&c.call(&[b"SET", b"{other}a", b"1"]).expect("crossslot"));
    assert!(reply.starts_with("-CROSSSLOT"), "{reply}");
    let reply = text(&c.call(&[b"EXEC"]).expect("exec"));
    assert!(reply.starts_with("-EXECABORT"), "{reply}");

    // WATCH: a concurrent write aborts the transaction, as on one Redis.
    let mut other_proxy = RespClient::connect(s.proxy.addr()).expect("proxy");
    let mut other_redis = RespClient::connect(s.redis.addr()).expect("redis");
    p.same(&["SET", "{w}k", "0"]);
    p.same(&["WATCH", "{w}k"]);
    other_proxy.call(&[b"SET", b"{w}k", b"x"]).expect("set");
    other_redis.call(&[b"SET", b"{w}k", b"x"]).expect("set");
    p.same(&["MULTI"]);
    p.same(&["SET", "{w}k", "y"]);
    p.same(&["EXEC"]);
    p.same(&["GET", "{w}k"]);
    // Untouched: it commits.
    p.same(&["WATCH", "{w}k"]);
    p.same(&["MULTI"]);
    p.same(&["SET", "{w}k", "z"]);
    p.same(&["EXEC"]);
    p.same(&["UNWATCH"]);

    // 200 transactions, each on a fresh client connection, reuse the warm
    // leases: no connect per transaction.
    let opened = |proxy: &Proxy| -> f64 {
        proxy
            .metrics()
            .lines()
            .filter(|l| l.starts_with("redirector_upstream_connections_opened_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let before = opened(&s.proxy);
    for i in 0..200 {
        let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
        c.call(&[b"MULTI"]).expect("multi");
        c.call(&[b"INCR", b"{tx}n"]).expect("incr");
        let reply = text(&c.call(&[b"EXEC"]).expect("exec"));
        assert_eq!(reply, format!("*1\r\n:{}\r\n", i + 1));
    }
    // Each worker warms leases of its own.
    let grown = opened(&s.proxy) - before;
    assert!(
        grown <= 2.0 * workers as f64,
        "{grown} upstream connections opened for 200 transactions on {workers} workers"
    );
    assert!(s.proxy.metric("redirector_leases_reused_total") >= 200.0 - 10.0 * workers as f64);
}

#[test]
fn blocking_commands_do_not_stall_other_clients() {
    blocking_commands_do_not_stall_other_clients_on(1);
}

#[test]
fn blocking_commands_do_not_stall_other_clients_on_two_workers() {
    blocking_commands_do_not_stall_other_clients_on(2);
}

fn blocking_commands_do_not_stall_other_clients_on(workers: usize) {
    let s = setup_workers(workers);
    let addr = s.proxy.addr();
    let blocked = std::thread::spawn(move || {
        let mut c = RespClient::connect(addr).expect("proxy");
        let started = Instant::now();
        let reply = c.call(&[b"BLPOP", b"queue", b"10"]).expect("blpop");
        (text(&reply), started.elapsed())
    });
    // Another client on the same shard keeps being served at once.
    std::thread::sleep(Duration::from_millis(200));
    let mut c = RespClient::connect(addr).expect("proxy");
    let started = Instant::now();
    for i in 0..200 {
        let key = format!("{{queue}}k{i}");
        c.call(&[b"SET", key.as_bytes(), b"v"]).expect("set");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "200 SETs took {:?} behind a blocked client",
        started.elapsed()
    );
    c.call(&[b"RPUSH", b"queue", b"job"]).expect("rpush");
    let (reply, waited) = blocked.join().expect("blpop thread");
    assert_eq!(reply, "*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n");
    assert!(waited < Duration::from_secs(5));
    // XREAD BLOCK too.
    let addr2 = s.proxy.addr();
    let reader = std::thread::spawn(move || {
        let mut c = RespClient::connect(addr2).expect("proxy");
        text(
            &c.call(&[b"XREAD", b"BLOCK", b"5000", b"STREAMS", b"events", b"$"])
                .expect("xread"),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    c.call(&[b"XADD", b"events", b"*", b"f", b"v"])
        .expect("xadd");
    let got = reader.join().expect("xread thread");
    assert!(got.contains("events") && got.contains('f'), "{got}");
}

#[test]
fn pubsub_messages_reach_subscribers_on_any_proxy() {
    pubsub_messages_reach_subscribers_on_any_proxy_on(1);
}

#[test]
fn pubsub_messages_reach_subscribers_on_any_proxy_on_two_workers() {
    pubsub_messages_reach_subscribers_on_any_proxy_on(2);
}

fn pubsub_messages_reach_subscribers_on_any_proxy_on(workers: usize) {
    let s = setup_workers(workers);
    let second = Proxy::start(&s.cluster.seeds(), &[]);
    let mut sub = RespClient::connect(s.proxy.addr()).expect("proxy");
    let reply = text(&sub.call(&[b"SUBSCRIBE", b"news"]).expect("subscribe"));
    assert_eq!(reply, "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    let reply = text(&sub.call(&[b"PSUBSCRIBE", b"n*"]).expect("psubscribe"));
    assert_eq!(reply, "*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n");
    // RESP2 subscribers may only run pub/sub commands.
    let reply = text(&sub.call(&[b"GET", b"x"]).expect("refused"));
    assert!(reply.starts_with("-ERR Can't execute 'get'"), "{reply}");

    let mut publisher = RespClient::connect(second.addr()).expect("second proxy");
    publisher
        .call(&[b"PUBLISH", b"news", b"hello"])
        .expect("publish");
    let mut got = vec![
        text(&sub.read_reply().expect("message")),
        text(&sub.read_reply().expect("pmessage")),
    ];
    got.sort();
    assert_eq!(
        got,
        vec![
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n".to_string(),
            "*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$5\r\nhello\r\n".to_string(),
        ]
    );

    // Sharded pub/sub follows the channel's slot.
    let mut ssub = RespClient::connect(s.proxy.addr()).expect("proxy");
    let reply = text(&ssub.call(&[b"SSUBSCRIBE", b"orders"]).expect("ssubscribe"));
    assert_eq!(reply, "*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n");
    let reply = text(
        &publisher
            .call(&[b"SPUBLISH", b"orders", b"o1"])
            .expect("spublish"),
    );
    assert_eq!(reply, ":1\r\n");
    let message = text(&ssub.read_reply().expect("smessage"));
    assert_eq!(
        message,
        "*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$2\r\no1\r\n"
    );

    // Leaving pub/sub mode lifts the restriction.
    sub.call(&[b"UNSUBSCRIBE"]).expect("unsubscribe");
    let reply = text(&sub.call(&[b"PUNSUBSCRIBE"]).expect("punsubscribe"));
    assert!(reply.ends_with(":0\r\n"), "{reply}");
    wait_for("pub/sub mode to end", Duration::from_secs(5), || {
        let reply = text(&sub.call(&[b"PING"]).ok()?);
        (reply == "+PONG\r\n").then_some(())
    });
}

#[test]
fn resp3_after_hello_3_matches_redis() {
    let s = setup(&[]);
    let mut p = Pair::new(s.proxy.addr(), s.redis.addr());
    p.same(&["HSET", "h3", "f", "v"]);
    let hello = text(&p.proxy.call(&[b"HELLO", b"3"]).expect("hello"));
    p.redis.call(&[b"HELLO", b"3"]).expect("hello");
    assert!(
        hello.starts_with("%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "{hello}"
    );
    assert!(hello.contains("$5\r\nproto\r\n:3\r\n"), "{hello}");
    for cmd in [
        &["HGETALL", "h3"][..],
        &["GET", "missing"],
        &["SET", "d", "1.5"],
        &["INCRBYFLOAT", "d", "1"],
        &["ZADD", "z3", "1", "a"],
        &["ZSCORE", "z3", "a"],
        &["MGET", "h3x", "d", "user:1"],
        &["PING"],
    ] {
        p.same(cmd);
    }
    let reply = text(&p.proxy.call(&[b"HELLO", b"4"]).expect("hello 4"));
    assert_eq!(reply, "-NOPROTO unsupported protocol version\r\n");
}

#[test]
fn downstream_auth_users_and_passwords() {
    let s = setup(&["--auth-password", "s3cret", "--auth-user", "alice:wonder"]);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    let reply = text(&c.call(&[b"GET", b"k"]).expect("noauth"));
    assert_eq!(reply, "-NOAUTH Authentication required.\r\n");
    let reply = text(&c.call(&[b"AUTH", b"wrong"]).expect("wrongpass"));
    assert!(reply.starts_with("-WRONGPASS"), "{reply}");
    assert_eq!(
        text(&c.call(&[b"AUTH", b"s3cret"]).expect("auth")),
        "+OK\r\n"
    );
    assert_eq!(
        text(&c.call(&[b"SET", b"k", b"v"]).expect("set")),
        "+OK\r\n"
    );
    let mut alice = RespClient::connect(s.proxy.addr()).expect("proxy");
    let reply = text(&alice.call(&[b"AUTH", b"alice", b"nope"]).expect("wrong"));
    assert!(reply.starts_with("-WRONGPASS"), "{reply}");
    let reply = text(
        &alice
            .call(&[b"HELLO", b"3", b"AUTH", b"alice", b"wonder"])
            .expect("hello"),
    );
    assert!(reply.starts_with('%'), "{reply}");
    assert_eq!(
        text(&alice.call(&[b"GET", b"k"]).expect("get")),
        "$1\r\nv\r\n"
    );
}

#[test]
fn upstream_auth_is_presented_to_redis() {
    let cluster = RedisCluster::start_local(3, 0);
    for node in cluster.nodes() {
        assert_eq!(
            cluster
                .cli(node, &["CONFIG", "SET", "requirepass", "up"])
                .trim(),
            "OK"
        );
    }
    let proxy = Proxy::start(&cluster.seeds(), &["--upstream-password", "up"]);
    let mut c = RespClient::connect(proxy.addr()).expect("proxy");
    for key in SPREAD {
        let reply = text(&c.call(&[b"SET", key.as_bytes(), b"v"]).expect("set"));
        assert_eq!(reply, "+OK\r\n", "{key}");
    }
    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    mget.extend(SPREAD.iter().map(|k| k.as_bytes()));
    let reply = text(&c.call(&mget).expect("mget"));
    assert_eq!(
        reply.matches("$1\r\nv\r\n").count(),
        SPREAD.len(),
        "{reply}"
    );
}

#[test]
fn replica_read_policy_serves_reads_from_replicas() {
    let s = setup(&["--read-policy", "replica"]);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    for key in SPREAD {
        c.call(&[b"SET", key.as_bytes(), b"v"]).expect("set");
    }
    let gets = |node: SocketAddr| -> u64 {
        let stats = s.cluster.cli(node, &["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let masters = s.cluster.masters();
    let replicas: Vec<_> = masters
        .iter()
        .flat_map(|m| s.cluster.replicas_of(*m))
        .collect();
    let before: u64 = masters.iter().map(|&m| gets(m)).sum();
    for key in SPREAD {
        // Replicas catch up asynchronously.
        wait_for(
            "the replica to have the key",
            Duration::from_secs(5),
            || {
                let reply = text(&c.call(&[b"GET", key.as_bytes()]).ok()?);
                (reply == "$1\r\nv\r\n").then_some(())
            },
        );
    }
    assert_eq!(
        masters.iter().map(|&m| gets(m)).sum::<u64>(),
        before,
        "a GET reached a master"
    );
    assert!(replicas.iter().map(|&r| gets(r)).sum::<u64>() >= SPREAD.len() as u64);
    // Writes still go to masters.
    let reply = text(&c.call(&[b"SET", b"w", b"1"]).expect("set"));
    assert_eq!(reply, "+OK\r\n");
}

#[test]
fn two_workers_share_every_connection_and_look_like_one_redis_whose_metrics_add_up() {
    let s = setup_workers(2);
    let addr = s.proxy.addr();
    // Enough connections that the kernel's SO_REUSEPORT hash gives both
    // workers some (each lands on one at random: 2^-39 that all share one).
    let mut clients: Vec<RespClient> = (0..40)
        .map(|_| RespClient::connect(addr).expect("proxy"))
        .collect();
    let mut ids = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let id = c.call_str(&["CLIENT", "ID"]).expect("client id");
        ids.push(id.trim_start_matches(':').trim().to_string());
        let key = format!("w{i}");
        assert_eq!(c.call_str(&["SET", &key, "v"]).expect("set"), "+OK\r\n");
        assert_eq!(
            c.call_str(&["INCR", "{workers}n"]).expect("incr"),
            format!(":{}\r\n", i + 1)
        );
    }
    let metrics = s.proxy.metrics();
    let accepted: Vec<f64> = (0..2)
        .map(|w| {
            s.proxy.metric(&format!(
                r#"redirector_worker_connections_accepted_total{{worker="{w}"}}"#
            ))
        })
        .collect();
    assert!(
        accepted.iter().all(|&n| n >= 1.0),
        "both workers accept: {accepted:?}
{metrics}"
    );
    // One series per backend, each worker's shard summed at scrape time.
    assert_eq!(
        s.proxy.metric("redirector_client_connections_opened_total"),
        accepted.iter().sum::<f64>(),
        "{metrics}"
    );
    assert_eq!(s.proxy.metric("redirector_client_connections_active"), 40.0);
    assert_eq!(
        s.proxy
            .metric(r#"redirector_commands_total{command="incr",outcome="ok"}"#),
        40.0,
        "{metrics}"
    );
    assert_eq!(
        s.proxy.metric("redirector_command_duration_seconds_count"),
        120.0,
        "{metrics}"
    );

    // One Redis: client ids are unique node-wide, CLIENT LIST shows every
    // worker's clients, and INFO counts every worker's commands.
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "client ids {ids:?}");
    let list = clients[0]
        .call_str(&["CLIENT", "LIST"])
        .expect("client list");
    for id in &ids {
        assert!(list.contains(&format!("id={id} ")), "id {id} in {list}");
    }
    let info = clients[0].call_str(&["INFO", "stats"]).expect("info stats");
    let processed: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed");
    assert!(processed >= 121, "{info}");

    // CLIENT KILL reaches a client on whichever worker holds it.
    for (victim, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(
            clients[0]
                .call_str(&["CLIENT", "KILL", "ID", id])
                .expect("kill"),
            ":1\r\n",
            "CLIENT KILL ID {id}: one client killed"
        );
        // Closed as soon as its session notices, as on Redis.
        let victim = &mut clients[victim];
        wait_for(
            &format!("client {id} to be closed"),
            Duration::from_secs(5),
            || victim.call_str(&["PING"]).is_err().then_some(()),
        );
    }
    wait_for("killed clients to be gone", Duration::from_secs(5), || {
        (s.proxy.metric("redirector_client_connections_active") == 1.0).then_some(())
    });

    // A SCAN cursor from one connection continues on another (PHP-FPM
    // makes a new one per request), whichever worker each lands on.
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = "0".to_string();
    loop {
        let mut c = RespClient::connect(addr).expect("proxy");
        let page = c
            .call_str(&["SCAN", &cursor, "MATCH", "w*", "COUNT", "5"])
            .expect("scan");
        let mut lines = page.lines().skip(2);
        cursor = lines.next().expect("cursor").to_string();
        // `*K`, then `$len` and the key, K times.
        for line in lines.skip(2).step_by(2) {
            seen.insert(line.to_string());
        }
        if cursor == "0" {
            break;
        }
    }
    let expected: std::collections::BTreeSet<String> = (0..40).map(|i| format!("w{i}")).collect();
    assert_eq!(seen, expected);
}

#[test]
fn metrics_cover_clients_commands_latency_and_upstreams() {
    metrics_cover_clients_commands_latency_and_upstreams_on(1);
}

#[test]
fn metrics_cover_clients_commands_latency_and_upstreams_on_two_workers() {
    metrics_cover_clients_commands_latency_and_upstreams_on(2);
}

fn metrics_cover_clients_commands_latency_and_upstreams_on(workers: usize) {
    let s = setup_workers(workers);
    let mut c = RespClient::connect(s.proxy.addr()).expect("proxy");
    for i in 0..50 {
        let key = format!("m{i}");
        c.call(&[b"SET", key.as_bytes(), b"v"]).expect("set");
        c.call(&[b"GET", key.as_bytes()]).expect("get");
    }
    c.call(&[b"GET"]).expect("arity error");
    let metrics = s.proxy.metrics();
    assert!(
        s.proxy
            .metric(r#"redirector_commands_total{command="get",outcome="ok"}"#)
            >= 50.0,
        "{metrics}"
    );
    assert!(
        s.proxy
            .metric(r#"redirector_commands_total{command="get",outcome="error"}"#)
            >= 1.0
    );
    assert!(
        s.proxy.metric("redirector_command_duration_seconds_count") >= 101.0,
        "{metrics}"
    );
    assert!(s.proxy.metric("redirector_client_connections_opened_total") >= 1.0);
    assert_eq!(s.proxy.metric("redirector_client_connections_active"), 1.0);
    assert!(
        s.proxy
            .metric(r#"redirector_topology_refreshes_total{result="ok"}"#)
            >= 1.0
    );
    for master in s.cluster.masters() {
        let sample = format!(r#"redirector_upstream_connections_active{{node="{master}"}}"#);
        assert!(
            s.proxy.metric(&sample) >= 1.0,
            "no upstream to {master}:\n{metrics}"
        );
    }
    assert!(s.proxy.get("/healthz/ready").starts_with("HTTP/1.1 200"));
    // A MOVED, caused by moving a slot behind the proxy's back, is counted.
    let slot = slot_of(b"m1");
    let owner = s.cluster.owner_of_slot(slot);
    let target = s
        .cluster
        .masters()
        .into_iter()
        .find(|m| *m != owner)
        .expect("another master");
    s.cluster.migrate_slot(slot, target);
    let reply = text(&c.call(&[b"GET", b"m1"]).expect("get after move"));
    assert_eq!(reply, "$1\r\nv\r\n");
    assert!(
        s.proxy
            .metric(r#"redirector_redirections_total{kind="moved"}"#)
            >= 1.0
    );
}
