//! The proxy presents a 3+3 cluster as ONE Redis: server-wide commands
//! (CONFIG SET, INFO, PUBLISH counts) reach or sum over every node, and the
//! connection-level commands (CLIENT KILL/REPLY/PAUSE/TRACKING/UNBLOCK,
//! MULTI's queue-time errors) behave as they do on a single server, for the
//! proxy's own clients. Where a node has state of its own, it is read from
//! that node directly and compared.

use std::{
    io,
    net::SocketAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use testbed::{
    cluster::{RedisCluster, slot_of},
    process::wait_for,
    proxy::Proxy,
    resp::{READ_TIMEOUT, RespClient},
};

/// The proxy first, so it stops before the nodes it fronts.
struct Setup {
    proxy: Proxy,
    cluster: RedisCluster,
}

fn setup() -> Setup {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    Setup { proxy, cluster }
}

fn text(reply: &Bytes) -> String {
    String::from_utf8_lossy(reply).into_owned()
}

fn connect(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// One command and its raw reply, as text.
fn call(c: &mut RespClient, args: &[&str]) -> String {
    c.call_str(args)
        .unwrap_or_else(|e| panic!("{args:?} through the proxy: {e}"))
}

/// The next frame (a reply or a push), waiting at most `timeout`.
fn read_within(c: &mut RespClient, timeout: Duration) -> io::Result<String> {
    c.stream().set_read_timeout(Some(timeout))?;
    let frame = c.read_reply();
    c.stream().set_read_timeout(Some(READ_TIMEOUT))?;
    frame.map(|f| text(&f))
}

/// Every frame that arrives until the connection stays quiet for `quiet`.
fn drain(c: &mut RespClient, quiet: Duration) -> Vec<String> {
    let mut frames = Vec::new();
    loop {
        match read_within(c, quiet) {
            Ok(frame) => frames.push(frame),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return frames;
            }
            Err(e) => panic!("connection failed while draining (after {frames:?}): {e}"),
        }
    }
}

/// Reads frames until one equals `wanted`; every other frame must satisfy
/// `tolerated`. Fails after `timeout`.
fn expect_frame(
    c: &mut RespClient,
    wanted: &str,
    tolerated: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {wanted:?} within {timeout:?}; got {seen:?}"
        );
        match read_within(c, left) {
            Ok(frame) if frame == wanted => return seen,
            Ok(frame) => {
                assert!(
                    tolerated(&frame),
                    "unexpected {frame:?} while waiting for {wanted:?}"
                );
                seen.push(frame);
            }
            Err(e) => panic!("no {wanted:?} within {timeout:?} (got {seen:?}): {e}"),
        }
    }
}

/// The text of a bulk-string (RESP2) or verbatim (RESP3) reply.
fn bulk_text(reply: &str) -> &str {
    let body = reply
        .split_once("\r\n")
        .map_or("", |(_, rest)| rest)
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("not a bulk reply: {reply:?}"));
    // Verbatim strings start with their format: `txt:`.
    if reply.starts_with('=') {
        body.get(4..).unwrap_or("")
    } else {
        body
    }
}

/// The value of `field` in INFO text (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(field)?.strip_prefix(':'))
}

/// A numeric INFO field; panics when absent.
fn info_num(info: &str, field: &str) -> f64 {
    info_field(info, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {field} in INFO:\n{info}"))
}

/// `name=value` in a comma-separated INFO value (`keys=3,expires=1,...`).
fn sub_field(value: &str, name: &str) -> u64 {
    value
        .split(',')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {value:?}"))
}

/// INFO through the proxy (RESP2 bulk string), as text.
fn proxy_info(c: &mut RespClient, sections: &[&str]) -> String {
    let mut args = vec!["INFO"];
    args.extend_from_slice(sections);
    let reply = call(c, &args);
    assert!(reply.starts_with('$'), "INFO {sections:?}: {reply}");
    bulk_text(&reply).to_string()
}

/// Section titles (`# Name`) of INFO text, in order.
fn sections(info: &str) -> Vec<&str> {
    info.lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("# "))
        .collect()
}

/// `CONFIG GET param` as one node itself answers it.
fn node_config(cluster: &RedisCluster, node: SocketAddr, param: &str) -> String {
    let out = cluster.cli(node, &["CONFIG", "GET", param]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(param), "CONFIG GET on {node}: {out:?}");
    lines.next().unwrap_or_default().to_string()
}

/// A master other than `than`.
fn other_master(cluster: &RedisCluster, than: SocketAddr) -> SocketAddr {
    cluster
        .masters()
        .into_iter()
        .find(|m| *m != than)
        .expect("another master")
}

/// The client's id from `CLIENT ID`.
fn client_id(c: &mut RespClient) -> u64 {
    let reply = call(c, &["CLIENT", "ID"]);
    reply
        .strip_prefix(':')
        .and_then(|r| r.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("CLIENT ID: {reply:?}"))
}

/// `CLIENT LIST` through the proxy, one line per client.
fn client_list(c: &mut RespClient) -> Vec<String> {
    let reply = call(c, &["CLIENT", "LIST"]);
    bulk_text(&reply).lines().map(str::to_string).collect()
}

fn list_has(lines: &[String], id: u64) -> bool {
    let prefix = format!("id={id} ");
    lines.iter().any(|l| l.starts_with(&prefix))
}

#[test]
fn config_set_reaches_all_six_nodes() {
    let s = setup();
    let nodes = s.cluster.nodes();
    assert_eq!(nodes.len(), 6);
    let mut c = connect(s.proxy.addr());
    for policy in ["allkeys-lru", "noeviction"] {
        assert_eq!(
            call(&mut c, &["CONFIG", "SET", "maxmemory-policy", policy]),
            "+OK\r\n",
            "CONFIG SET maxmemory-policy {policy}"
        );
        let masters = s.cluster.masters();
        let missed: Vec<String> = nodes
            .iter()
            .filter(|&&node| node_config(&s.cluster, node, "maxmemory-policy") != policy)
            .map(|node| {
                let role = if masters.contains(node) {
                    "master"
                } else {
                    "replica"
                };
                format!("{node} ({role})")
            })
            .collect();
        assert!(
            missed.is_empty(),
            "CONFIG SET maxmemory-policy {policy} answered +OK but did not reach {missed:?}"
        );
        assert_eq!(
            call(&mut c, &["CONFIG", "GET", "maxmemory-policy"]),
            format!(
                "*2\r\n$16\r\nmaxmemory-policy\r\n${}\r\n{policy}\r\n",
                policy.len()
            )
        );
    }
}

#[test]
fn a_node_that_refuses_config_set_is_named_in_the_reply() {
    let s = setup();
    let nodes = s.cluster.nodes();
    assert_eq!(nodes.len(), 6);
    let master = s.cluster.masters()[0];
    let refuser = s.cluster.replicas_of(master)[0];
    // Only this node's default user (the proxy's) loses CONFIG SET.
    assert_eq!(
        s.cluster
            .cli(refuser, &["ACL", "SETUSER", "default", "-config|set"])
            .trim(),
        "OK"
    );
    let mut c = connect(s.proxy.addr());
    let reply = call(
        &mut c,
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    );
    assert_eq!(
        reply,
        format!(
            "-NOPERM this user has no permissions to run the 'config|set' command \
             (refused by {refuser}; applied on 5 of 6 nodes)\r\n"
        )
    );
    for &node in &nodes {
        let expected = if node == refuser {
            "noeviction"
        } else {
            "allkeys-lru"
        };
        assert_eq!(
            node_config(&s.cluster, node, "maxmemory-policy"),
            expected,
            "{node}"
        );
    }
}

#[test]
fn publish_counts_every_subscriber_behind_two_proxies() {
    let s = setup();
    let second = Proxy::start(&s.cluster.seeds(), &[]);
    let (a, b) = (s.proxy.addr(), second.addr());
    let subscribe = "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n";
    let mut channel_subs = Vec::new();
    for addr in [a, a, b] {
        let mut sub = connect(addr);
        assert_eq!(call(&mut sub, &["SUBSCRIBE", "news"]), subscribe);
        channel_subs.push(sub);
    }
    let mut pattern_sub = connect(b);
    assert_eq!(
        call(&mut pattern_sub, &["PSUBSCRIBE", "n*"]),
        "*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:1\r\n"
    );

    for (via, payload) in [(a, "hello"), (b, "again")] {
        let mut publisher = connect(via);
        assert_eq!(
            call(&mut publisher, &["PUBLISH", "news", payload]),
            ":4\r\n",
            "PUBLISH through {via}: 3 channel subscribers and 1 pattern"
        );
        let message = format!(
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n${}\r\n{payload}\r\n",
            payload.len()
        );
        for sub in &mut channel_subs {
            assert_eq!(text(&sub.read_reply().expect("message")), message);
        }
        assert_eq!(
            text(&pattern_sub.read_reply().expect("pmessage")),
            format!(
                "*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n${}\r\n{payload}\r\n",
                payload.len()
            )
        );
    }
    // Exactly one copy each.
    for sub in channel_subs.iter_mut().chain([&mut pattern_sub]) {
        let extra = drain(sub, Duration::from_millis(300));
        assert!(extra.is_empty(), "duplicate deliveries: {extra:?}");
    }

    for via in [a, b] {
        let mut c = connect(via);
        assert_eq!(
            call(&mut c, &["PUBSUB", "NUMSUB", "news"]),
            "*2\r\n$4\r\nnews\r\n:3\r\n",
            "PUBSUB NUMSUB through {via}"
        );
        assert_eq!(
            call(&mut c, &["PUBSUB", "NUMPAT"]),
            ":1\r\n",
            "PUBSUB NUMPAT through {via}"
        );
    }
}

#[test]
fn info_fields_are_present_and_summed_over_the_masters() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    for i in 0..40 {
        let key = format!("info:{i}");
        let mut args = vec!["SET", key.as_str(), "v"];
        if i % 4 == 0 {
            args.extend(["EX", "1000"]);
        }
        assert_eq!(call(&mut c, &args), "+OK\r\n");
        assert_eq!(call(&mut c, &["GET", &key]), "$1\r\nv\r\n");
    }
    let masters = s.cluster.masters();
    assert_eq!(masters.len(), 3);
    let node_infos = |section: &str| -> Vec<String> {
        masters
            .iter()
            .map(|&m| s.cluster.cli(m, &["INFO", section]))
            .collect()
    };
    let sum =
        |infos: &[String], field: &str| -> f64 { infos.iter().map(|i| info_num(i, field)).sum() };

    let before = node_infos("default");
    let info = proxy_info(&mut c, &[]);
    let after = node_infos("default");

    let titles = sections(&info);
    for section in [
        "# Server",
        "# Clients",
        "# Memory",
        "# Persistence",
        "# Stats",
        "# Replication",
        "# CPU",
        "# Errorstats",
        "# Cluster",
        "# Keyspace",
        "# Proxy",
    ] {
        assert!(titles.contains(&section), "INFO lacks {section}:\n{info}");
    }
    for field in [
        "redis_git_sha1",
        "blocked_clients",
        "used_memory",
        "used_cpu_sys",
        "rdb_changes_since_last_save",
    ] {
        assert!(
            info_field(&info, field).is_some(),
            "INFO lacks {field}:\n{info}"
        );
    }

    // Keyspace: no writes between the reads, so the sums are exact.
    let db0 = info_field(&info, "db0").unwrap_or_else(|| panic!("no db0:\n{info}"));
    let node_db0 = |infos: &[String], name: &str| -> u64 {
        infos
            .iter()
            .map(|i| sub_field(info_field(i, "db0").unwrap_or("keys=0,expires=0"), name))
            .sum()
    };
    assert_eq!(sub_field(db0, "keys"), 40, "{db0}");
    assert_eq!(sub_field(db0, "keys"), node_db0(&after, "keys"), "{db0}");
    assert_eq!(sub_field(db0, "expires"), 10, "{db0}");
    assert_eq!(sub_field(db0, "expires"), node_db0(&after, "expires"));

    // Memory moves a little between calls: within the range read around it.
    let used = info_num(&info, "used_memory");
    let (lo, hi) = {
        let (x, y) = (sum(&before, "used_memory"), sum(&after, "used_memory"));
        (x.min(y) * 0.95, x.max(y) * 1.05)
    };
    assert!(
        (lo..=hi).contains(&used),
        "used_memory {used} is not the masters' sum ({lo}..={hi})"
    );
    let peak = before
        .iter()
        .map(|i| info_num(i, "used_memory_peak"))
        .fold(0.0, f64::max);
    assert!(
        info_num(&info, "used_memory_peak") >= peak,
        "used_memory_peak below a master's {peak}"
    );
    for counter in ["total_commands_processed", "keyspace_hits"] {
        let (low, high) = (sum(&before, counter), sum(&after, counter));
        let got = info_num(&info, counter);
        assert!(
            (low..=high).contains(&got),
            "{counter} {got}: not the masters' sum ({low}..={high})"
        );
    }
    assert!(info_num(&info, "keyspace_hits") >= 40.0);

    // Per-command statistics, summed: the masters read right after.
    let stats = proxy_info(&mut c, &["commandstats"]);
    let calls = |text: &str| -> u64 {
        let value =
            info_field(text, "cmdstat_set").unwrap_or_else(|| panic!("no cmdstat_set in\n{text}"));
        sub_field(value, "calls")
    };
    let node_calls: u64 = node_infos("commandstats").iter().map(|t| calls(t)).sum();
    assert_eq!(calls(&stats), node_calls, "{stats}");
    assert_eq!(sections(&stats), ["# Commandstats"]);

    assert_eq!(
        sections(&proxy_info(&mut c, &["server", "clients"])),
        ["# Server", "# Clients"]
    );
    let everything = sections(&proxy_info(&mut c, &["everything"]))
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    for section in ["# Commandstats", "# Latencystats", "# Keyspace", "# Proxy"] {
        assert!(
            everything.iter().any(|t| t == section),
            "INFO everything lacks {section}: {everything:?}"
        );
    }

    // The proxy's own clients.
    let clients = |c: &mut RespClient| info_num(&proxy_info(c, &["clients"]), "connected_clients");
    let base = clients(&mut c);
    assert!(base >= 1.0, "connected_clients {base}");
    let mut extra: Vec<RespClient> = (0..3).map(|_| connect(s.proxy.addr())).collect();
    for e in &mut extra {
        assert_eq!(call(e, &["PING"]), "+PONG\r\n");
    }
    assert_eq!(clients(&mut c), base + 3.0);
    drop(extra);
    wait_for(
        "connected_clients to fall back",
        Duration::from_secs(5),
        || (clients(&mut c) == base).then_some(()),
    );
}

#[test]
fn client_kill_id_closes_that_client() {
    let s = setup();
    let mut a = connect(s.proxy.addr());
    let mut b = connect(s.proxy.addr());
    let a_id = client_id(&mut a);
    let b_id = client_id(&mut b);
    assert_ne!(a_id, b_id);
    assert!(list_has(&client_list(&mut b), a_id));

    let kill = a_id.to_string();
    assert_eq!(call(&mut b, &["CLIENT", "KILL", "ID", &kill]), ":1\r\n");
    match a.call(&[b"PING"]) {
        Err(_) => {}
        Ok(reply) => panic!("a killed client was still served: {:?}", text(&reply)),
    }

    let lines = client_list(&mut b);
    assert!(
        !list_has(&lines, a_id),
        "killed client still listed:\n{lines:#?}"
    );
    assert!(list_has(&lines, b_id), "{lines:#?}");
    let mine = lines
        .iter()
        .find(|l| l.starts_with(&format!("id={b_id} ")))
        .expect("own line");
    for field in [
        "id", "addr", "laddr", "fd", "name", "age", "idle", "flags", "db", "sub", "psub", "multi",
        "qbuf", "cmd", "user", "redir", "resp",
    ] {
        assert!(
            mine.starts_with(&format!("{field}=")) || mine.contains(&format!(" {field}=")),
            "CLIENT LIST line lacks {field}=: {mine}"
        );
    }
    let b_addr = b.stream().local_addr().expect("local addr");
    assert!(mine.contains(&format!(" addr={b_addr} ")), "{mine}");
    assert!(
        mine.contains(&format!(" laddr={} ", s.proxy.addr())),
        "{mine}"
    );
    assert!(mine.contains(" cmd=client|list "), "{mine}");

    assert_eq!(call(&mut b, &["CLIENT", "KILL", "ID", "999999"]), ":0\r\n");
    assert_eq!(
        call(&mut b, &["CLIENT", "KILL", "1.2.3.4:5"]),
        "-ERR No such client\r\n"
    );
    assert_eq!(call(&mut b, &["PING"]), "+PONG\r\n");
}

#[test]
fn client_reply_off_silences_replies_until_on() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    c.send(&[b"CLIENT", b"REPLY", b"OFF"]).expect("send");
    c.send(&[b"SET", b"k", b"v"]).expect("send");
    c.send(&[b"CLIENT", b"REPLY", b"ON"]).expect("send");
    // The first bytes back are CLIENT REPLY ON's: nothing for the others.
    assert_eq!(text(&c.read_reply().expect("reply")), "+OK\r\n");
    assert_eq!(call(&mut c, &["GET", "k"]), "$1\r\nv\r\n");

    // SKIP: exactly the next command's reply is dropped.
    c.send(&[b"CLIENT", b"REPLY", b"SKIP"]).expect("send");
    c.send(&[b"SET", b"k2", b"v2"]).expect("send");
    c.send(&[b"GET", b"k2"]).expect("send");
    assert_eq!(text(&c.read_reply().expect("reply")), "$2\r\nv2\r\n");
    assert_eq!(call(&mut c, &["PING"]), "+PONG\r\n");
    let key = slot_of(b"k2");
    assert_eq!(
        s.cluster
            .cli(s.cluster.owner_of_slot(key), &["GET", "k2"])
            .trim(),
        "v2",
        "the silenced SET must still have run"
    );
    assert!(drain(&mut c, Duration::from_millis(200)).is_empty());
}

/// Sends `SET key 1` on a fresh thread; reports the reply and how long it
/// took from the moment it was sent.
fn writer(mut c: RespClient, key: &'static str) -> mpsc::Receiver<(String, Duration)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let sent = Instant::now();
        let reply = c
            .call_str(&["SET", key, "1"])
            .unwrap_or_else(|e| format!("error: {e}"));
        let _ = tx.send((reply, sent.elapsed()));
    });
    rx
}

#[test]
fn client_pause_write_holds_writers_while_readers_go_on() {
    let s = setup();
    let mut pauser = connect(s.proxy.addr());
    let mut reader = connect(s.proxy.addr());
    assert_eq!(call(&mut reader, &["SET", "k2", "r"]), "+OK\r\n");

    // A timed pause ends by itself.
    assert_eq!(
        call(&mut pauser, &["CLIENT", "PAUSE", "2000", "WRITE"]),
        "+OK\r\n"
    );
    let paused = Instant::now();
    let done = writer(connect(s.proxy.addr()), "k");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(call(&mut reader, &["GET", "k2"]), "$1\r\nr\r\n");
    let read_took = started.elapsed();
    assert!(
        read_took < Duration::from_millis(200),
        "a read took {read_took:?} during a WRITE pause"
    );
    assert!(
        done.try_recv().is_err(),
        "a write went through during the pause"
    );
    let (reply, took) = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer never returned");
    assert_eq!(reply, "+OK\r\n");
    assert!(
        took >= Duration::from_secs(1) && paused.elapsed() >= Duration::from_millis(1900),
        "the writer returned after {took:?}, {:?} into a 2 s pause",
        paused.elapsed()
    );

    // UNPAUSE ends a long pause early.
    assert_eq!(
        call(&mut pauser, &["CLIENT", "PAUSE", "10000", "WRITE"]),
        "+OK\r\n"
    );
    let done = writer(connect(s.proxy.addr()), "k3");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        done.try_recv().is_err(),
        "a write went through during the pause"
    );
    assert_eq!(call(&mut pauser, &["CLIENT", "UNPAUSE"]), "+OK\r\n");
    let unpaused = Instant::now();
    let (reply, _) = done
        .recv_timeout(Duration::from_secs(5))
        .expect("UNPAUSE did not release the writer");
    assert_eq!(reply, "+OK\r\n");
    let released = unpaused.elapsed();
    assert!(
        released < Duration::from_secs(1),
        "the writer returned {released:?} after UNPAUSE"
    );
    assert_eq!(call(&mut reader, &["GET", "k3"]), "$1\r\n1\r\n");
}

/// RESP3 invalidation push for `key`.
fn push_for(key: &str) -> String {
    format!(
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    )
}

/// RESP3 "flush everything" invalidation.
const PUSH_FLUSH: &str = ">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// A GET on a tracking RESP3 client: its reply, after any pushes that came
/// first (returned too).
fn tracked_get(c: &mut RespClient, key: &str) -> (String, Vec<String>) {
    c.send(&[b"GET", key.as_bytes()]).expect("send GET");
    let mut pushes = Vec::new();
    loop {
        let frame = text(&c.read_reply().expect("GET reply"));
        if frame.starts_with('>') {
            pushes.push(frame);
        } else {
            return (frame, pushes);
        }
    }
}

#[test]
fn client_tracking_invalidates_in_resp3_and_after_a_slot_migration() {
    let s = setup();
    let mut other = connect(s.proxy.addr());
    let mut t = connect(s.proxy.addr());
    let hello = call(&mut t, &["HELLO", "3"]);
    assert!(hello.starts_with('%'), "{hello}");
    assert_eq!(call(&mut t, &["CLIENT", "TRACKING", "ON"]), "+OK\r\n");
    assert_eq!(call(&mut other, &["SET", "k", "1"]), "+OK\r\n");
    let (reply, _) = tracked_get(&mut t, "k");
    assert_eq!(reply, "$1\r\n1\r\n");
    assert_eq!(call(&mut other, &["SET", "k", "2"]), "+OK\r\n");
    let early = expect_frame(
        &mut t,
        &push_for("k"),
        |f| f == PUSH_FLUSH,
        Duration::from_secs(5),
    );
    assert!(early.is_empty(), "before any move: {early:?}");

    // Tracked again on the slot's new owner.
    let slot = slot_of(b"k");
    let from = s.cluster.owner_of_slot(slot);
    let to = other_master(&s.cluster, from);
    s.cluster.migrate_slot(slot, to);
    let invalidation = |f: &str| f == PUSH_FLUSH || f == push_for("k");
    let (reply, pushes) = tracked_get(&mut t, "k");
    assert_eq!(reply, "$1\r\n2\r\n");
    assert!(pushes.iter().all(|p| invalidation(p)), "{pushes:?}");
    // Invalidations of the move itself (the source deleting k) come now.
    let late = drain(&mut t, Duration::from_millis(500));
    assert!(late.iter().all(|p| invalidation(p)), "{late:?}");

    assert_eq!(call(&mut other, &["SET", "k", "3"]), "+OK\r\n");
    expect_frame(
        &mut t,
        &push_for("k"),
        |f| f == PUSH_FLUSH,
        Duration::from_secs(5),
    );
    assert_eq!(
        s.cluster.cli(to, &["GET", "k"]).trim(),
        "3",
        "k must live on {to} now"
    );
    // Tracking still works on the connection's replies.
    let (reply, _) = tracked_get(&mut t, "k");
    assert_eq!(reply, "$1\r\n3\r\n");
}

/// Sends `commands` in one write; their replies, and the pushes that came
/// among them.
fn pipelined(c: &mut RespClient, commands: &[&[&str]]) -> (Vec<String>, Vec<String>) {
    let bytes: Vec<u8> = commands
        .iter()
        .flat_map(|args| {
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            testbed::resp::encode(&args)
        })
        .collect();
    c.send_raw(&bytes).expect("send");
    let (mut replies, mut pushes) = (Vec::new(), Vec::new());
    while replies.len() < commands.len() {
        let frame = text(&c.read_reply().expect("reply"));
        if frame.starts_with('>') {
            pushes.push(frame);
        } else {
            replies.push(frame);
        }
    }
    (replies, pushes)
}

#[test]
fn client_caching_yes_tracks_the_read_right_after_it_in_a_pipeline() {
    let s = setup();
    let mut other = connect(s.proxy.addr());
    let mut t = connect(s.proxy.addr());
    let hello = call(&mut t, &["HELLO", "3"]);
    assert!(hello.starts_with('%'), "{hello}");
    assert_eq!(
        call(&mut t, &["CLIENT", "TRACKING", "ON", "OPTIN"]),
        "+OK\r\n"
    );
    for key in ["cached", "untracked"] {
        assert_eq!(call(&mut other, &["SET", key, "1"]), "+OK\r\n");
    }
    let only_cached = |f: &str| f == push_for("cached");
    // One write: CACHING YES applies to the GET right after it only, and
    // that GET runs before the client's own SET after it.
    let (replies, pushes) = pipelined(
        &mut t,
        &[
            &["CLIENT", "CACHING", "YES"],
            &["GET", "cached"],
            &["SET", "cached", "2"],
            &["GET", "untracked"],
        ],
    );
    assert_eq!(
        replies,
        ["+OK\r\n", "$1\r\n1\r\n", "+OK\r\n", "$1\r\n1\r\n"]
    );
    assert!(pushes.iter().all(|p| only_cached(p)), "{pushes:?}");
    // The untracked key's change must not be pushed; the tracked one's is.
    assert_eq!(call(&mut other, &["SET", "untracked", "2"]), "+OK\r\n");
    let (replies, pushes) = pipelined(&mut t, &[&["CLIENT", "CACHING", "YES"], &["GET", "cached"]]);
    assert_eq!(replies, ["+OK\r\n", "$1\r\n2\r\n"]);
    assert!(pushes.iter().all(|p| only_cached(p)), "{pushes:?}");
    assert_eq!(call(&mut other, &["SET", "cached", "3"]), "+OK\r\n");
    expect_frame(
        &mut t,
        &push_for("cached"),
        only_cached,
        Duration::from_secs(5),
    );
    let late = drain(&mut t, Duration::from_millis(300));
    assert!(late.iter().all(|p| only_cached(p)), "{late:?}");
}

/// What a RESP2 subscriber of `__redis__:invalidate` gets for `key`.
fn message_for(key: &str) -> String {
    format!(
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    )
}

/// A RESP2 "flush everything" invalidation message (Redis sends a null).
fn is_flush_message(frame: &str) -> bool {
    frame.starts_with("*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n")
        && (frame.ends_with("$-1\r\n") || frame.ends_with("*-1\r\n"))
}

#[test]
fn client_tracking_redirect_delivers_to_a_resp2_subscriber() {
    let s = setup();
    let mut r = connect(s.proxy.addr());
    let mut t = connect(s.proxy.addr());
    let mut other = connect(s.proxy.addr());
    let r_id = client_id(&mut r);
    assert_eq!(
        call(&mut r, &["SUBSCRIBE", "__redis__:invalidate"]),
        "*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
    );
    let redirect = r_id.to_string();
    assert_eq!(
        call(&mut t, &["CLIENT", "TRACKING", "ON", "REDIRECT", &redirect]),
        "+OK\r\n"
    );
    assert_eq!(call(&mut t, &["GET", "k"]), "$-1\r\n");
    assert_eq!(call(&mut other, &["SET", "k", "9"]), "+OK\r\n");
    let early = expect_frame(
        &mut r,
        &message_for("k"),
        is_flush_message,
        Duration::from_secs(5),
    );
    assert!(early.is_empty(), "before any move: {early:?}");

    assert_eq!(
        call(&mut t, &["CLIENT", "GETREDIR"]),
        format!(":{r_id}\r\n")
    );
    assert_eq!(
        call(&mut t, &["CLIENT", "TRACKINGINFO"]),
        format!(
            "*6\r\n$5\r\nflags\r\n*1\r\n$2\r\non\r\n$8\r\nredirect\r\n:{r_id}\r\n$8\r\nprefixes\r\n*0\r\n"
        )
    );

    // After the slot moved, k is tracked on its new owner.
    let slot = slot_of(b"k");
    let from = s.cluster.owner_of_slot(slot);
    let to = other_master(&s.cluster, from);
    s.cluster.migrate_slot(slot, to);
    assert_eq!(call(&mut t, &["GET", "k"]), "$1\r\n9\r\n");
    let late = drain(&mut r, Duration::from_millis(500));
    assert!(
        late.iter()
            .all(|f| *f == message_for("k") || is_flush_message(f)),
        "{late:?}"
    );
    assert_eq!(call(&mut other, &["SET", "k", "10"]), "+OK\r\n");
    expect_frame(
        &mut r,
        &message_for("k"),
        is_flush_message,
        Duration::from_secs(5),
    );
    assert_eq!(s.cluster.cli(to, &["GET", "k"]).trim(), "10");
    assert_eq!(
        call(&mut t, &["CLIENT", "GETREDIR"]),
        format!(":{r_id}\r\n")
    );
}

#[test]
fn a_queue_time_error_aborts_exec() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    let execabort = "-EXECABORT Transaction discarded because of previous errors.\r\n";
    let cases: [(&[&str], &str); 3] = [
        (
            &["NOSUCHCOMMAND"],
            "-ERR unknown command 'NOSUCHCOMMAND', with args beginning with: \r\n",
        ),
        (
            &["GET"],
            "-ERR wrong number of arguments for 'get' command\r\n",
        ),
        (
            &["SET", "{y}1", "1"],
            "-CROSSSLOT Keys in request don't hash to the same slot\r\n",
        ),
    ];
    for (bad, error) in cases {
        assert_eq!(call(&mut c, &["MULTI"]), "+OK\r\n");
        assert_eq!(call(&mut c, &["SET", "{x}a", "1"]), "+QUEUED\r\n");
        assert_eq!(
            call(&mut c, &["SET", "{x}1", "1"]),
            "+QUEUED\r\n",
            "{bad:?}"
        );
        assert_eq!(call(&mut c, bad), error, "queued {bad:?}");
        assert_eq!(call(&mut c, &["EXEC"]), execabort, "after {bad:?}");
        assert_eq!(call(&mut c, &["GET", "{x}a"]), "$-1\r\n", "after {bad:?}");
        assert_eq!(call(&mut c, &["GET", "{x}1"]), "$-1\r\n", "after {bad:?}");
        // No transaction is left open.
        assert_eq!(
            call(&mut c, &["EXEC"]),
            "-ERR EXEC without MULTI\r\n",
            "after {bad:?}"
        );
    }
    for key in ["{x}a", "{x}1", "{y}1"] {
        let owner = s.cluster.owner_of_slot(slot_of(key.as_bytes()));
        assert_eq!(
            s.cluster.cli(owner, &["EXISTS", key]).trim(),
            "0",
            "{key} was written on {owner}"
        );
    }
}

/// Runs `BLPOP key 0` on a thread; its reply arrives on the channel.
fn blpop(mut c: RespClient, key: &'static str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let reply = c
            .call_str(&["BLPOP", key, "0"])
            .unwrap_or_else(|e| format!("error: {e}"));
        let _ = tx.send(reply);
    });
    rx
}

fn blocked_clients(c: &mut RespClient) -> f64 {
    info_num(&proxy_info(c, &["clients"]), "blocked_clients")
}

#[test]
fn client_unblock_releases_a_blocked_client() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    for how in ["TIMEOUT", "ERROR"] {
        let mut blocked = connect(s.proxy.addr());
        let id = client_id(&mut blocked).to_string();
        let reply = blpop(blocked, "queue");
        wait_for("the BLPOP to block", Duration::from_secs(5), || {
            let line = client_list(&mut c)
                .into_iter()
                .find(|l| l.starts_with(&format!("id={id} ")))?;
            line.contains(" cmd=blpop ").then_some(())
        });
        // Blocked on the node, not merely sent.
        wait_for(
            "the node to see a blocked client",
            Duration::from_secs(5),
            || {
                let owner = s.cluster.owner_of_slot(slot_of(b"queue"));
                let info = s.cluster.cli(owner, &["INFO", "clients"]);
                (info_field(&info, "blocked_clients") == Some("1")).then_some(())
            },
        );
        assert_eq!(call(&mut c, &["CLIENT", "UNBLOCK", &id, how]), ":1\r\n");
        let got = reply
            .recv_timeout(Duration::from_secs(5))
            .expect("CLIENT UNBLOCK did not release the BLPOP");
        let expected = if how == "TIMEOUT" {
            "*-1\r\n"
        } else {
            "-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n"
        };
        assert_eq!(got, expected, "CLIENT UNBLOCK {how}");
        // Not blocked any more.
        assert_eq!(call(&mut c, &["CLIENT", "UNBLOCK", &id]), ":0\r\n");
    }
    assert_eq!(call(&mut c, &["CLIENT", "UNBLOCK", "999999"]), ":0\r\n");
}

#[test]
fn info_blocked_clients_counts_a_blocked_client() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    assert_eq!(blocked_clients(&mut c), 0.0);
    let reply = blpop(connect(s.proxy.addr()), "jobs");
    wait_for(
        "blocked_clients:1 through the proxy",
        Duration::from_secs(5),
        || (blocked_clients(&mut c) == 1.0).then_some(()),
    );
    assert_eq!(call(&mut c, &["RPUSH", "jobs", "j1"]), ":1\r\n");
    assert_eq!(
        reply
            .recv_timeout(Duration::from_secs(5))
            .expect("BLPOP released"),
        "*2\r\n$4\r\njobs\r\n$2\r\nj1\r\n"
    );
    wait_for(
        "blocked_clients:0 through the proxy",
        Duration::from_secs(5),
        || (blocked_clients(&mut c) == 0.0).then_some(()),
    );
}

#[test]
fn a_clients_commands_after_a_blocking_one_wait_for_it_as_in_redis() {
    let s = setup();
    let mut c = connect(s.proxy.addr());
    // Pipelined: one Redis runs RPUSH only once BLPOP has timed out, so
    // BLPOP gets nothing and the element stays. A proxy that sent RPUSH on
    // another connection meanwhile would hand it to the BLPOP.
    c.send_raw(&testbed::resp::encode(&[b"BLPOP", b"pipelined{q}", b"1"]))
        .expect("send");
    c.send_raw(&testbed::resp::encode(&[b"RPUSH", b"pipelined{q}", b"v"]))
        .expect("send");
    assert_eq!(text(&c.read_reply().expect("BLPOP reply")), "*-1\r\n");
    assert_eq!(text(&c.read_reply().expect("RPUSH reply")), ":1\r\n");
    assert_eq!(call(&mut c, &["LLEN", "pipelined{q}"]), ":1\r\n");
    // And the other way round: BLPOP after RPUSH finds the element.
    c.send_raw(&testbed::resp::encode(&[b"RPUSH", b"after{q}", b"w"]))
        .expect("send");
    c.send_raw(&testbed::resp::encode(&[b"BLPOP", b"after{q}", b"1"]))
        .expect("send");
    assert_eq!(text(&c.read_reply().expect("RPUSH reply")), ":1\r\n");
    assert_eq!(
        text(&c.read_reply().expect("BLPOP reply")),
        "*2\r\n$8\r\nafter{q}\r\n$1\r\nw\r\n"
    );
}
