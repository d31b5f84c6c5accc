//! SCAN through the proxy: one cursor walks every master, and every key of
//! the cluster comes back exactly once, whatever COUNT is, with and without
//! MATCH. Real `redis-server` nodes and the real proxy on 127.0.0.1.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Instant,
};

use redis_protocol::resp2::{decode::decode, types::OwnedFrame};
use testbed::{
    cluster::{RedisCluster, slot_of},
    proxy::Proxy,
    resp::{RespClient, encode},
};

const KEYS: usize = 10_000;
/// Batch size of the pipelined writes.
const BATCH: usize = 1_000;

fn client(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

fn key(i: usize) -> String {
    format!("scan:{i}")
}

/// One reply, decoded.
fn frame(raw: &[u8]) -> OwnedFrame {
    match decode(raw) {
        Ok(Some((frame, used))) if used == raw.len() => frame,
        other => panic!(
            "not one RESP2 frame ({other:?}): {:?}",
            String::from_utf8_lossy(raw)
        ),
    }
}

/// Checks the reply shape `[cursor, [keys...]]` and returns both parts.
fn scan_page(
    c: &mut RespClient,
    cursor: &str,
    count: usize,
    pattern: Option<&str>,
) -> (String, Vec<String>) {
    let count_s = count.to_string();
    let mut args = vec!["SCAN", cursor, "COUNT", &count_s];
    if let Some(p) = pattern {
        args.extend(["MATCH", p]);
    }
    let raw = c
        .call_str(&args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let OwnedFrame::Array(parts) = frame(raw.as_bytes()) else {
        panic!("{args:?}: not an array: {raw:?}");
    };
    let [OwnedFrame::BulkString(next), OwnedFrame::Array(keys)] = parts.as_slice() else {
        panic!("{args:?}: not [cursor, [keys...]]: {raw:?}");
    };
    let next = String::from_utf8(next.clone()).expect("cursor is text");
    assert!(
        next.parse::<u64>().is_ok(),
        "{args:?}: cursor {next:?} is not an unsigned integer"
    );
    let keys = keys
        .iter()
        .map(|k| match k {
            OwnedFrame::BulkString(k) => String::from_utf8(k.clone()).expect("keys are text"),
            other => panic!("{args:?}: key is not a bulk string: {other:?} in {raw:?}"),
        })
        .collect();
    (next, keys)
}

/// A full iteration from cursor 0 back to 0; every key returned, with
/// how many times, and how many calls it took.
fn full_scan(
    c: &mut RespClient,
    count: usize,
    pattern: Option<&str>,
) -> (BTreeMap<String, usize>, usize) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let (next, keys) = scan_page(c, &cursor, count, pattern);
        calls += 1;
        for k in keys {
            *seen.entry(k).or_default() += 1;
        }
        if next == "0" {
            return (seen, calls);
        }
        assert!(
            calls < 1_000_000,
            "SCAN COUNT {count} never ends (cursor {next})"
        );
        cursor = next;
    }
}

fn assert_exactly_once(what: &str, seen: &BTreeMap<String, usize>, expected: &BTreeSet<String>) {
    let dups: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|k| !seen.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<&String> = seen
        .keys()
        .filter(|k| !expected.contains(*k))
        .take(10)
        .collect();
    let missing_n = expected.iter().filter(|k| !seen.contains_key(*k)).count();
    let dup_n = seen.values().filter(|n| **n > 1).count();
    assert!(
        dups.is_empty() && missing.is_empty() && extra.is_empty(),
        "{what}: {missing_n} missing (e.g. {missing:?}), {dup_n} returned more than once \
         (e.g. {dups:?}), unexpected {extra:?}"
    );
}

#[test]
fn scan_returns_every_key_exactly_once() {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let mut c = client(proxy.addr());

    // 10,000 keys, pipelined in batches through the proxy.
    let all: BTreeSet<String> = (0..KEYS).map(key).collect();
    let started = Instant::now();
    for batch in (0..KEYS).collect::<Vec<_>>().chunks(BATCH) {
        let mut out = Vec::new();
        for &i in batch {
            let (k, v) = (key(i), format!("v{i}"));
            out.extend(encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
        }
        c.send_raw(&out).expect("send SET pipeline");
        for &i in batch {
            let reply = c.read_reply().expect("SET reply");
            assert_eq!(&reply[..], b"+OK\r\n", "SET {}", key(i));
        }
    }
    eprintln!("wrote {KEYS} keys in {:?}", started.elapsed());

    // Spread over every shard: each master holds its share, no more.
    let slots: BTreeSet<u16> = all.iter().map(|k| slot_of(k.as_bytes())).collect();
    eprintln!("keys cover {} distinct slots", slots.len());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let mut total = 0;
    for m in &masters {
        let n: usize = cluster.cli(*m, &["DBSIZE"]).trim().parse().expect("DBSIZE");
        assert!(n > KEYS / 10, "master {m} holds only {n} keys");
        total += n;
    }
    assert_eq!(total, KEYS, "keys on the masters");

    // MATCH scan:1* selects 1, 10-19, 100-199, 1000-1999.
    let pattern = "scan:1*";
    let subset: BTreeSet<String> = all
        .iter()
        .filter(|k| k.starts_with("scan:1"))
        .cloned()
        .collect();
    assert_eq!(subset.len(), 1_111);

    for count in [1, 10, 100, 1_000, 10_000] {
        let started = Instant::now();
        let (seen, calls) = full_scan(&mut c, count, None);
        assert_exactly_once(&format!("SCAN COUNT {count}"), &seen, &all);
        let plain = started.elapsed();

        let started = Instant::now();
        let (seen, match_calls) = full_scan(&mut c, count, Some(pattern));
        assert_exactly_once(
            &format!("SCAN COUNT {count} MATCH {pattern}"),
            &seen,
            &subset,
        );
        eprintln!(
            "COUNT {count}: {calls} calls in {plain:?}; with MATCH {match_calls} calls in {:?}",
            started.elapsed()
        );
    }

    // A MATCH nothing satisfies still walks to cursor 0, with empty pages.
    let (seen, _) = full_scan(&mut c, 1_000, Some("nothing:*"));
    assert!(seen.is_empty(), "{seen:?}");

    // Invalid cursors are errors, as on Redis, and the connection lives on.
    for bad in ["abc", "-1", "", "1.5", "18446744073709551616"] {
        let reply = c
            .call_str(&["SCAN", bad])
            .unwrap_or_else(|e| panic!("SCAN {bad:?}: {e}"));
        assert!(
            reply.starts_with("-ERR"),
            "SCAN {bad:?} should be an error, got {reply:?}"
        );
    }
    // The same through Redis directly, for the wording.
    let direct = cluster.cli(masters[0], &["SCAN", "abc"]);
    eprintln!("redis says for SCAN abc: {}", direct.trim());
    assert_eq!(
        c.call_str(&["PING"]).expect("PING after errors"),
        "+PONG\r\n"
    );

    // Nothing was lost or added by all that.
    assert_eq!(
        c.call_str(&["DBSIZE"]).expect("DBSIZE"),
        format!(":{KEYS}\r\n")
    );
}
