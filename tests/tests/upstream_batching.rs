//! How many clients' commands one write to a Redis node carries. Real
//! `redis-server` nodes and the real proxy on 127.0.0.1; the proxy is held
//! with SIGSTOP so that every client's command and a node's reply are ready
//! together, in a known order, when it continues.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use testbed::{
    cluster::{RedisCluster, slot_of},
    process::{Stopped, wait_for},
    proxy::Proxy,
    resp::RespClient,
};

const SECONDS_10: Duration = Duration::from_secs(10);

/// Keeps Redis busy for 500 ms (a script blocks the server: it answers no
/// other connection meanwhile), then answers 1. Scripts go on a leased
/// connection of their own, not the shared one counted here.
const BUSY_500MS: &str = "local t0 = redis.call('TIME') \
    repeat local t = redis.call('TIME') \
    until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 500000 \
    return 1";

/// Whether `node` leaves a `PING` unanswered for 100 ms (a script runs).
fn is_busy(node: SocketAddr) -> bool {
    let mut probe = TcpStream::connect(node).expect("connect to the node");
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    probe.write_all(b"PING\r\n").expect("send PING");
    let mut pong = [0u8; 7];
    match probe.read_exact(&mut pong) {
        Ok(()) => false,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
        Err(e) => panic!("PING {node}: {e}"),
    }
}

/// The proxy's shared connection to a node used to write a job as soon as
/// its task ran. Woken by a reply from Redis in the middle of a turn, it
/// wrote the jobs of the clients that had run before it and left the rest
/// of the turn for another write (and Redis another read). Now it waits for
/// the turn's queued clients: ten commands ready before the node's reply
/// and ten after it go out in one write.
#[test]
fn commands_ready_in_one_turn_go_to_a_node_in_one_write_around_its_replies() {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(
        &cluster.seeds(),
        &["--workers", "1", "--topology-refresh", "60m"],
    );
    let node = cluster.owner_of_slot(slot_of(b"{batch}"));
    let writes = format!(r#"redirector_upstream_writes_total{{node="{node}"}}"#);
    let commands = format!(r#"redirector_upstream_commands_sent_total{{node="{node}"}}"#);

    let mut busy = RespClient::connect(proxy.addr()).expect("connect");
    let mut waiting = RespClient::connect(proxy.addr()).expect("connect");
    let mut clients: Vec<RespClient> = (0..20)
        .map(|_| RespClient::connect(proxy.addr()).expect("connect"))
        .collect();
    // Every session is set up and idle, the node's connection open.
    for client in clients.iter_mut().chain([&mut busy, &mut waiting]) {
        assert_eq!(
            client.call_str(&["GET", "{batch}warm"]).expect("GET"),
            "$-1\r\n"
        );
    }
    let writes_before = proxy.metric(&writes);
    let commands_before = proxy.metric(&commands);
    assert!(writes_before >= 22.0, "the warm-up GETs were counted");

    busy.send(&[b"EVAL", BUSY_500MS.as_bytes(), b"1", b"{batch}busy"])
        .expect("send EVAL");
    wait_for("the script to run", SECONDS_10, || {
        is_busy(node).then_some(())
    });
    // Written on the shared connection; answered once the script ends.
    waiting
        .send(&[b"GET", b"{batch}waiting"])
        .expect("send GET");
    wait_for("the waiting GET to be written", SECONDS_10, || {
        (proxy.metric(&writes) == writes_before + 1.0).then_some(())
    });
    let held = Stopped::stop(proxy.pid());
    for (i, client) in clients[..10].iter_mut().enumerate() {
        client
            .send(&[b"GET", format!("{{batch}}{i}").as_bytes()])
            .expect("send GET");
    }
    // Once the script has ended, Redis answers the waiting GET in the same
    // loop as a new PING: the answer waits for the proxy behind the first
    // ten commands.
    wait_for("the script to end", SECONDS_10, || {
        (!is_busy(node)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(20));
    for (i, client) in clients[10..].iter_mut().enumerate() {
        client
            .send(&[b"GET", format!("{{batch}}{}", i + 10).as_bytes()])
            .expect("send GET");
    }
    drop(held);

    assert_eq!(busy.read_reply().expect("EVAL's reply"), &b":1\r\n"[..]);
    assert_eq!(waiting.read_reply().expect("GET's reply"), &b"$-1\r\n"[..]);
    for client in &mut clients {
        assert_eq!(client.read_reply().expect("GET's reply"), &b"$-1\r\n"[..]);
    }
    assert_eq!(
        proxy.metric(&commands) - commands_before,
        21.0,
        "twenty-one GETs were written to {node}"
    );
    assert_eq!(
        proxy.metric(&writes) - writes_before,
        2.0,
        "one write for the waiting GET, one for the twenty sent while it waited"
    );
}
