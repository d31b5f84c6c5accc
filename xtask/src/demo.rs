//! `cargo xtask demo`: a node and two pods in network namespaces, two
//! backends behind one daemon (a Redis Cluster of 3 masters and 3 replicas,
//! and a standalone primary with one replica, each behind its own service
//! address), and plain (cluster-unaware) redis-cli run from the pods.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::Result;
use nix::sys::signal::{SigSet, Signal};
use testbed::{
    cluster::slot_of,
    process::{path_str, wait_for},
    redis::RedisServer,
    topology::{
        NODE_ADDR, PROXY_PORT, REDIS_PORT, SERVICE_VIP, SERVICE_VIP6, Topology, proxy_addr,
        proxy_addr6,
    },
};

/// The session store's service address: its primary, as a Kubernetes
/// service leads to the primary's pod.
const SESSIONS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const SESSIONS_REPLICA: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);

/// The daemon's arguments: the cluster as backend `cart` behind the usual
/// service address, the standalone Redis as backend `sessions` behind its
/// own, and the programs attached at `cgroup_root`.
fn daemon_args(cgroup_root: &Path) -> Vec<String> {
    let cart = SocketAddr::from((SERVICE_VIP, REDIS_PORT));
    let cart6 = SocketAddr::from((SERVICE_VIP6, REDIS_PORT));
    let primary = SocketAddr::from((SESSIONS_VIP, REDIS_PORT));
    let replica = SocketAddr::from((SESSIONS_REPLICA, REDIS_PORT));
    [
        "--proxy-addr".to_string(),
        format!("{},{}", proxy_addr(), proxy_addr6()),
        "--cgroup-root".into(),
        path_str(cgroup_root).into(),
        "--backend".into(),
        format!("cart=cluster:{cart}"),
        "--backend".into(),
        format!("sessions=standalone:{primary},{replica}"),
        "--redis-target".into(),
        format!("cart={cart}"),
        "--redis-target".into(),
        format!("cart={cart6}"),
        "--redis-target".into(),
        format!("sessions={primary}"),
    ]
    .into()
}

pub fn run(bin: &Path, once: bool) -> Result<()> {
    testbed::require::missing().map_or(Ok(()), |why| Err(anyhow::anyhow!(why)))?;
    // Block the stop signals before any thread or child exists, then wait
    // for them below: cleanup runs in order instead of dying mid-way.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()?;

    // SAFETY: single-threaded here; the testbed reads it to find the daemon.
    unsafe { std::env::set_var("REDIRECTOR_BIN", bin) };
    let vip = IpAddr::V4(SERVICE_VIP);

    println!(
        "Building a node and two pods in network namespaces, a Redis Cluster (3 masters, 3 replicas) and a standalone Redis (a primary, one replica)..."
    );
    let mut topo = Topology::build(2);
    topo.start_service_cluster();
    // Declared after the topology, so dropped (stopped) before it removes
    // the node's cgroup they run in.
    let sessions = start_sessions(&topo);
    // Attach at the root of cgroup v2, as on a real node, so anything run
    // in a pod namespace (for example with `ip netns exec`) is covered.
    let args = daemon_args(topo.cgroup2_root());
    // The flags that declare the backends, one line per flag name.
    let flag_lines: Vec<String> = ["--backend", "--redis-target"]
        .iter()
        .map(|flag| {
            let given: Vec<String> = args
                .chunks(2)
                .filter(|pair| pair[0] == *flag)
                .map(|pair| format!("{flag} {}", pair[1]))
                .collect();
            given.join(" ")
        })
        .collect();
    topo.start_daemon_logging(args, "info");
    let (pod_a, pod_b) = (topo.pod(0), topo.pod(1));
    topo.enroll(&pod_a.netns);

    println!();
    println!(
        "  node  {:<22} Redis Cluster on 10.96.0.10-15:{REDIS_PORT}; service address {SERVICE_VIP}:{REDIS_PORT}",
        topo.node.name()
    );
    println!(
        "        {:<22} standalone Redis: primary {SESSIONS_VIP}:{REDIS_PORT} (service address), replica {SESSIONS_REPLICA}:{REDIS_PORT}",
        ""
    );
    println!(
        "        {:<22} redirector node proxy on {NODE_ADDR}:{PROXY_PORT}, run with",
        ""
    );
    for line in &flag_lines {
        println!("        {:<22}   {line}", "");
    }
    println!("  pod A {:<22} {}  ENROLLED", pod_a.netns.name(), pod_a.ip);
    println!(
        "  pod B {:<22} {}  not enrolled",
        pod_b.netns.name(),
        pod_b.ip
    );
    println!();

    let keys = [
        "user:1",
        "user:2",
        "user:3",
        "cart:7",
        "session:abc",
        "page:home",
    ];
    println!("pod A, a cluster-unaware client, writes through {SERVICE_VIP}:{REDIS_PORT}:");
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value-{i}");
        let reply = pod_a.redis(&["SET", key, &value]);
        let slot = slot_of(key.as_bytes());
        let owner = topo.cluster().owner_of_slot(slot);
        let stored = topo.cluster().cli(owner, &["GET", key]);
        println!(
            "  SET {key:<12} -> {reply:<3} slot {slot:>5}  stored on master {owner} (reads back \"{}\")",
            stored.trim()
        );
    }
    println!();
    let mut mget = vec!["MGET"];
    mget.extend(keys);
    println!("pod A $ redis-cli -h {SERVICE_VIP} MGET {}", keys.join(" "));
    println!("  (keys on every shard: the proxy splits it per slot and merges the replies)");
    for line in pod_a.redis(&mget).lines() {
        println!("  {line}");
    }
    println!();
    println!("pod A $ redis-cli -h {SERVICE_VIP} --scan   (one cursor across all masters)");
    let out = pod_a.place().output(
        "redis-cli",
        &[
            "-h",
            &SERVICE_VIP.to_string(),
            "-p",
            &REDIS_PORT.to_string(),
            "--scan",
        ],
    );
    let mut scanned: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    scanned.sort();
    println!("  {}", scanned.join(" "));
    println!();
    println!(
        "pod B (not enrolled) $ redis-cli -h {SERVICE_VIP} GET user:2   (straight to one node)"
    );
    let out = pod_b.redis_cli(vip, REDIS_PORT, &["GET", "user:2"]);
    println!(
        "  {}  <- what a cluster-unaware app gets without redirector",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    println!();
    show_sessions(&topo, &sessions);
    println!();
    println!("$ redirector status");
    println!("{}", topo.node_cli(&["status"]));

    let pin = path_str(topo.pin_dir()).to_string();
    println!("Try it yourself while the demo runs:");
    println!(
        "  ip netns exec {} redis-cli -h {SERVICE_VIP} INFO cluster",
        pod_a.netns.name()
    );
    println!(
        "  ip netns exec {} redis-cli -h {SESSIONS_VIP} GET sess:42",
        pod_a.netns.name()
    );
    println!(
        "  ip netns exec {} redis-cli -h {SERVICE_VIP} GET user:2",
        pod_b.netns.name()
    );
    println!(
        "  ip netns exec {} {} --pin-dir {pin} status",
        topo.node.name(),
        bin.display()
    );
    println!(
        "  bpftool map dump pinned {}/rdr_counters",
        path_str(&topo.maps_dir())
    );

    if !once {
        println!();
        println!("Running. Press Ctrl-C to stop and clean up.");
        let signal = stop.wait()?;
        println!("{signal:?}: cleaning up...");
    }
    drop(sessions);
    drop(topo);
    println!(
        "Cleaned up: daemon and Redis stopped, programs detached, pins, namespaces and cgroups removed."
    );
    Ok(())
}

/// The session store: a primary on the service address and one replica,
/// in the node netns; (primary, replica), replication established.
fn start_sessions(topo: &Topology) -> (RedisServer, RedisServer) {
    let place = |ip: Ipv4Addr| {
        topo.node
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        let dir = topo.workdir().join(format!("sessions-{ip}"));
        std::fs::create_dir_all(&dir).expect("sessions dir");
        dir
    };
    // Redis 7 waits 5 s for more replicas before a diskless full sync.
    let primary = RedisServer::start(
        &topo.node_place(),
        &[SESSIONS_VIP.into()],
        REDIS_PORT,
        &place(SESSIONS_VIP),
        &["--repl-diskless-sync-delay", "0"],
    );
    let replica = RedisServer::start_replica(
        &topo.node_place(),
        &[SESSIONS_REPLICA.into()],
        REDIS_PORT,
        &place(SESSIONS_REPLICA),
        std::net::SocketAddr::from((SESSIONS_VIP, REDIS_PORT)),
    );
    (primary, replica)
}

/// Pod A through the session store's service address (the standalone
/// backend), where its key lands, that the two backends do not share keys,
/// and the per-backend connection counters.
fn show_sessions(topo: &Topology, (primary, replica): &(RedisServer, RedisServer)) {
    let pod_a = topo.pod(0);
    let cli = |host: Ipv4Addr, args: &[&str]| {
        let out = pod_a.redis_cli(IpAddr::V4(host), REDIS_PORT, args);
        assert!(
            out.status.success(),
            "redis-cli {args:?} to {host}: {out:?}"
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let nil = |reply: String| {
        if reply.is_empty() {
            "(nil)".into()
        } else {
            reply
        }
    };
    println!(
        "pod A writes through the session store's service {SESSIONS_VIP}:{REDIS_PORT} (backend \"sessions\", standalone):"
    );
    let (key, value) = ("sess:42", "alice");
    let reply = cli(SESSIONS_VIP, &["SET", key, value]);
    let read = cli(SESSIONS_VIP, &["GET", key]);
    let replicated = wait_for(
        "the write to reach the replica",
        Duration::from_secs(5),
        || Some(replica.cli(&["GET", key]).trim().to_string()).filter(|v| !v.is_empty()),
    );
    let owner = topo.cluster().owner_of_slot(slot_of(key.as_bytes()));
    let in_cluster = nil(topo.cluster().cli(owner, &["GET", key]).trim().to_string());
    println!(
        "  SET {key} {value} -> {reply}, GET -> \"{read}\": on primary {} \"{}\", replica {} \"{replicated}\", cluster {in_cluster}",
        primary.addr(),
        primary.cli(&["GET", key]).trim(),
        replica.addr(),
    );
    println!(
        "  GET {key} through the cart service {SERVICE_VIP}: {}; GET user:1 through sessions: {}   (backends share nothing)",
        nil(cli(SERVICE_VIP, &["GET", key])),
        nil(cli(SESSIONS_VIP, &["GET", "user:1"])),
    );
    println!(
        "  CLUSTER INFO through sessions: {}",
        cli(SESSIONS_VIP, &["CLUSTER", "INFO"])
            .lines()
            .next()
            .unwrap_or_default()
    );
    println!();
    println!("$ curl -s 127.0.0.1:15020/metrics | grep client_connections_opened_total");
    let metrics = topo.metrics();
    let mut opened: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("redirector_client_connections_opened_total"))
        .collect();
    opened.sort_unstable();
    for line in opened {
        println!("  {line}");
    }
}
