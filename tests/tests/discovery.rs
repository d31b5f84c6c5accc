//! How the proxy keeps learning a cluster's slot map, as Redis sees it.
//! Real `redis-server` nodes and the real proxy on 127.0.0.1.

use std::{net::SocketAddr, time::Duration};

use testbed::{cluster::RedisCluster, process::Stopped, proxy::Proxy, resp::RespClient};

/// How many times each node was asked for the slot map.
fn slot_map_asks(nodes: &mut [RespClient]) -> Vec<u64> {
    nodes
        .iter_mut()
        .map(|node| {
            info_sum(
                std::slice::from_mut(node),
                "commandstats",
                "cmdstat_cluster|slots",
            )
        })
        .collect()
}

/// Sums `field` (`name:value` lines, or `name:calls=N,...` in
/// `commandstats`) of `INFO section` over `nodes`.
fn info_sum(nodes: &mut [RespClient], section: &str, field: &str) -> u64 {
    nodes
        .iter_mut()
        .map(|node| {
            let info = node.call_str(&["INFO", section]).expect("INFO");
            info.lines()
                .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
                .map_or(0, |value| {
                    let value = value.strip_prefix("calls=").unwrap_or(value);
                    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().expect("a count")
                })
        })
        .sum()
}

#[test]
fn periodic_topology_refreshes_ask_on_one_kept_connection() {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(&cluster.seeds(), &["--topology-refresh", "100ms"]);
    // Opened before the window, so they are not counted in it.
    let mut masters: Vec<RespClient> = cluster
        .masters()
        .into_iter()
        .map(|addr| RespClient::connect(addr).expect("connect to a master"))
        .collect();
    // Serving: startup's questions (the first map, the command table) are
    // asked, and a shared connection is open to the node this key is on.
    let mut client = RespClient::connect(proxy.addr()).expect("connect to the proxy");
    assert_eq!(client.call_str(&["SET", "k", "v"]).expect("SET"), "+OK\r\n");
    std::thread::sleep(Duration::from_millis(300));

    let connects_before = info_sum(&mut masters, "stats", "total_connections_received");
    let asked_before = info_sum(&mut masters, "commandstats", "cmdstat_cluster|slots");
    std::thread::sleep(Duration::from_secs(2));
    let connects = info_sum(&mut masters, "stats", "total_connections_received") - connects_before;
    let asked = info_sum(&mut masters, "commandstats", "cmdstat_cluster|slots") - asked_before;

    eprintln!("{asked} refreshes in 2 s, {connects} connections opened to the masters");
    // About 10 (a refresh runs at most every 200 ms); fewer than a few
    // would mean the refreshes stalled, and this would prove nothing.
    assert!(
        asked >= 5,
        "the slot map was asked for {asked} times in 2 s at a 100 ms period"
    );
    assert!(
        connects <= 1,
        "{connects} connections opened to the masters for {asked} refreshes (one kept connection expected)"
    );
    // Still serving, on the map the refreshes keep.
    assert_eq!(client.call_str(&["GET", "k"]).expect("GET"), "$1\r\nv\r\n");
}

/// The kept connection skips the handshake whose timeout used to bound a
/// node that accepts and never answers: its questions need their own.
#[test]
fn a_node_that_stops_answering_does_not_hold_the_refreshes() {
    let cluster = RedisCluster::start_local(3, 0);
    let proxy = Proxy::start(
        &cluster.seeds(),
        &["--topology-refresh", "100ms", "--connect-timeout", "1s"],
    );
    let addrs: Vec<SocketAddr> = cluster.masters();
    let mut masters: Vec<RespClient> = addrs
        .iter()
        .map(|&addr| RespClient::connect(addr).expect("connect to a master"))
        .collect();
    let mut client = RespClient::connect(proxy.addr()).expect("connect to the proxy");
    assert_eq!(client.call_str(&["SET", "k", "v"]).expect("SET"), "+OK\r\n");
    // The node the refresher keeps its connection to: the one asked.
    let before = slot_map_asks(&mut masters);
    std::thread::sleep(Duration::from_millis(600));
    let after = slot_map_asks(&mut masters);
    let kept = (0..addrs.len())
        .max_by_key(|&i| after[i] - before[i])
        .expect("masters");
    assert!(after[kept] > before[kept], "no refresh in 600 ms");

    // Counted on the nodes that still answer.
    let mut answering: Vec<RespClient> = masters
        .into_iter()
        .enumerate()
        .filter_map(|(i, node)| (i != kept).then_some(node))
        .collect();
    let stopped = Stopped::stop(cluster.pid(addrs[kept]));
    // Past the kept connection's question, which goes unanswered.
    std::thread::sleep(Duration::from_millis(1500));
    let asked_before: u64 = slot_map_asks(&mut answering).iter().sum();
    std::thread::sleep(Duration::from_secs(4));
    let asked = slot_map_asks(&mut answering).iter().sum::<u64>() - asked_before;
    drop(stopped);
    // Each refresh spends up to the 1 s timeout on the stopped node (the
    // first candidate), then asks the next: two or more in 4 s. A refresh
    // held by the stopped node would ask none.
    assert!(
        asked >= 2,
        "with {} stopped, the other masters were asked for the slot map {asked} times in 4 s",
        addrs[kept]
    );
}
