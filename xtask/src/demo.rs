//! `cargo xtask demo`: a node and two pods in network namespaces, a Redis
//! Cluster of 3 masters and 3 replicas behind a service address, the real
//! daemon, and plain (cluster-unaware) redis-cli run from the pods.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use nix::sys::signal::{SigSet, Signal};
use testbed::{
    cluster::slot_of,
    process::path_str,
    topology::{NODE_ADDR, PROXY_PORT, REDIS_PORT, SERVICE_VIP, Topology},
};

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
        "Building a node and two pods in network namespaces, and a Redis Cluster (3 masters, 3 replicas)..."
    );
    let mut topo = Topology::build(2);
    topo.start_service_cluster();
    // Attach at the root of cgroup v2, as on a real node, so anything run
    // in a pod namespace (for example with `ip netns exec`) is covered.
    let args = topo.daemon_args_at(topo.cgroup2_root());
    topo.start_daemon_logging(args, "info");
    let (pod_a, pod_b) = (topo.pod(0), topo.pod(1));
    topo.enroll(&pod_a.netns);

    println!();
    println!(
        "  node  {:<22} Redis Cluster on 10.96.0.10-15:{REDIS_PORT}; service address {SERVICE_VIP}:{REDIS_PORT}",
        topo.node.name()
    );
    println!(
        "        {:<22} redirector node proxy on {NODE_ADDR}:{PROXY_PORT}",
        ""
    );
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
    println!("$ redirector status");
    println!("{}", topo.node_cli(&["status"]));

    let pin = path_str(topo.pin_dir()).to_string();
    println!("Try it yourself while the demo runs:");
    println!(
        "  ip netns exec {} redis-cli -h {SERVICE_VIP} INFO cluster",
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
    drop(topo);
    println!(
        "Cleaned up: daemon and Redis stopped, programs detached, pins, namespaces and cgroups removed."
    );
    Ok(())
}
