//! The Redis Cluster harness and the raw RESP client, against real
//! `redis-server` nodes on 127.0.0.1. No root needed; a missing
//! `redis-server` fails the tests rather than skipping them.

use std::net::{Ipv4Addr, SocketAddr};

use testbed::{
    TempDir,
    cluster::{RedisCluster, SLOTS, key_in_slot, slot_of},
    netns::Netns,
    require_kernel,
    resp::RespClient,
    unique,
};

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

fn call(c: &mut RespClient, args: &[&str]) -> String {
    c.call_str(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn topology_slots_and_raw_replies() {
    let cluster = RedisCluster::start_local(3, 1);

    // Shape: 3 masters, one replica each, 6 distinct nodes, all slots.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let mut all: Vec<SocketAddr> = masters.clone();
    for m in &masters {
        let replicas = cluster.replicas_of(*m);
        assert_eq!(replicas.len(), 1, "replicas of {m}: {replicas:?}");
        all.extend(replicas);
    }
    all.sort();
    let mut nodes = cluster.nodes();
    nodes.sort();
    assert_eq!(all, nodes);
    assert_eq!(cluster.seeds().len(), 6);
    assert!(nodes.iter().all(|n| cluster.pid(*n) > 0));
    let covered: usize = cluster
        .view()
        .iter()
        .filter(|n| n.is_master())
        .map(testbed::cluster::NodeInfo::slot_count)
        .sum();
    assert_eq!(covered, usize::from(SLOTS));
    for slot in [0, 5460, 5461, 10922, 10923, 16383] {
        assert!(masters.contains(&cluster.owner_of_slot(slot)));
    }

    // Our slot function agrees with the server's, hash tags included.
    let any = nodes[0];
    for key in [
        "{user1}:a",
        "user1",
        "a{}b",
        "{}",
        "{a",
        "a}",
        "{a}{b}",
        "foo{bar}{zap}",
        "",
        "123456789",
    ] {
        let theirs = cluster.cli(any, &["CLUSTER", "KEYSLOT", key]);
        assert_eq!(
            theirs.trim().parse::<u16>().ok(),
            Some(slot_of(key.as_bytes())),
            "slot of {key:?}"
        );
    }
    let k = key_in_slot(777);
    assert_eq!(cluster.cli(any, &["CLUSTER", "KEYSLOT", &k]).trim(), "777");

    // Raw replies: the owner serves, anyone else redirects.
    let key = "{user1}:a";
    let slot = slot_of(key.as_bytes());
    let owner = cluster.owner_of_slot(slot);
    let mut c = client(owner);
    assert_eq!(call(&mut c, &["SET", key, "v"]), "+OK\r\n");
    assert_eq!(call(&mut c, &["GET", key]), "$1\r\nv\r\n");
    assert_eq!(call(&mut c, &["GET", "{user1}:missing"]), "$-1\r\n");
    let other = *masters
        .iter()
        .find(|m| **m != owner)
        .expect("another master");
    let moved = call(&mut client(other), &["GET", key]);
    assert_eq!(moved, format!("-MOVED {slot} {owner}\r\n"));

    // A pipeline sent in pieces comes back as one frame per command.
    c.send_raw(b"*2\r\n$3\r\nGET\r\n$9\r\n{user1}")
        .expect("send");
    c.send_raw(b":a\r\nPING\r\n*1\r\n$4\r\nPI").expect("send");
    c.send_raw(b"NG\r\n").expect("send");
    assert_eq!(&c.read_reply().expect("GET")[..], b"$1\r\nv\r\n");
    assert_eq!(&c.read_reply().expect("inline PING")[..], b"+PONG\r\n");
    assert_eq!(&c.read_reply().expect("PING")[..], b"+PONG\r\n");

    // HELLO 3 switches the parser: the reply is a map, nil becomes `_`.
    let hello = call(&mut c, &["HELLO", "3"]);
    assert!(hello.starts_with('%'), "{hello:?}");
    assert!(c.is_resp3());
    assert_eq!(call(&mut c, &["GET", "{user1}:missing"]), "_\r\n");
    let err = call(&mut c, &["HELLO", "4"]);
    assert!(err.starts_with("-NOPROTO"), "{err:?}");
    assert!(c.is_resp3());
    assert!(call(&mut c, &["HELLO", "2"]).starts_with("*"));
    assert!(!c.is_resp3());
    assert_eq!(call(&mut c, &["GET", "{user1}:missing"]), "$-1\r\n");

    // A closed connection is an error, not a hang.
    c.send(&[b"QUIT"]).expect("send QUIT");
    assert_eq!(&c.read_reply().expect("QUIT")[..], b"+OK\r\n");
    let eof = c.read_reply().expect_err("closed");
    assert_eq!(eof.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn migrate_slot_and_reshard_move_keys() {
    let cluster = RedisCluster::start_local(3, 0);
    let slot = 4242;
    let tag = key_in_slot(slot);
    let keys: Vec<String> = (0..5).map(|i| format!("{{{tag}}}:{i}")).collect();
    let from = cluster.owner_of_slot(slot);
    let mut c = client(from);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(call(&mut c, &["SET", k, &i.to_string()]), "+OK\r\n");
    }
    let to = *cluster
        .masters()
        .iter()
        .find(|m| **m != from)
        .expect("another master");

    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.owner_of_slot(slot), to);
    let mut c2 = client(to);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(call(&mut c2, &["GET", k]), format!("$1\r\n{i}\r\n"));
    }
    assert_eq!(
        call(&mut c, &["GET", &keys[0]]),
        format!("-MOVED {slot} {to}\r\n")
    );

    let moved = cluster.reshard(10, from, to);
    assert_eq!(moved.len(), 10, "{moved:?}");
    for s in moved {
        assert_eq!(cluster.owner_of_slot(s), to);
    }
}

#[test]
fn failover_and_crash_promote_replicas() {
    let mut cluster = RedisCluster::start_local(3, 1);
    let master = cluster.masters()[0];
    let replica = cluster.replicas_of(master)[0];
    let slot = {
        let view = cluster.view();
        let me = view
            .iter()
            .find(|n| n.addr == master)
            .expect("master in view");
        me.slots[0].0
    };
    let key = format!("{{{}}}:k", key_in_slot(slot));
    let mut c = client(master);
    assert_eq!(call(&mut c, &["SET", &key, "before"]), "+OK\r\n");
    assert_eq!(call(&mut c, &["WAIT", "1", "5000"]), ":1\r\n");

    // Coordinated failover: roles swap, data stays.
    cluster.failover(replica);
    assert!(cluster.masters().contains(&replica));
    assert!(!cluster.masters().contains(&master));
    assert_eq!(cluster.replicas_of(replica), vec![master]);
    assert_eq!(cluster.owner_of_slot(slot), replica);
    assert_eq!(
        call(&mut client(replica), &["GET", &key]),
        "$6\r\nbefore\r\n"
    );

    // Crash of the new master: the old one takes over after the node timeout.
    cluster.kill(replica);
    assert_eq!(cluster.pid(replica), 0);
    cluster.wait_healthy();
    assert!(cluster.masters().contains(&master));
    assert!(!cluster.masters().contains(&replica));
    assert_eq!(cluster.owner_of_slot(slot), master);
    assert_eq!(
        call(&mut client(master), &["GET", &key]),
        "$6\r\nbefore\r\n"
    );

    // The crashed node comes back as a replica of whoever has its slots.
    cluster.restart(replica);
    cluster.wait_healthy();
    assert_eq!(cluster.replicas_of(master), vec![replica]);
}

#[test]
fn cluster_in_a_namespace_shares_one_port() {
    require_kernel!();
    let netns = Netns::create(&unique("rdr-cl"));
    let addrs: Vec<SocketAddr> = (10..16)
        .map(|i| SocketAddr::from((Ipv4Addr::new(10, 96, 0, i), 6379)))
        .collect();
    for a in &addrs {
        netns.ip(&["addr", "add", &format!("{}/32", a.ip()), "dev", "lo"]);
    }
    let dir = TempDir::new("rdr-cl");
    let cluster = RedisCluster::start(&netns.place(), &addrs, 1, dir.path());
    assert_eq!(cluster.masters().len(), 3);
    assert_eq!(cluster.nodes(), addrs);

    let key = "{ns}:k";
    let owner = cluster.owner_of_slot(slot_of(key.as_bytes()));
    let mut c = RespClient::connect_in(cluster.place(), owner).expect("connect in netns");
    assert_eq!(call(&mut c, &["SET", key, "v"]), "+OK\r\n");
    assert_eq!(cluster.cli(owner, &["GET", key]).trim(), "v");
}
