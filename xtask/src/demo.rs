//! `cargo xtask demo`: a node and two pods in network namespaces, Redis on
//! a service address, the real daemon, and redis-cli run from the pods.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use nix::sys::signal::{SigSet, Signal};
use testbed::{
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

    println!("Building a node and two pods in network namespaces...");
    let mut topo = Topology::build(2);
    topo.start_service_redis();
    // Attach at the root of cgroup v2, as on a real node, so anything run
    // in a pod namespace (for example with `ip netns exec`) is covered.
    let args = topo.daemon_args_at(topo.cgroup2_root());
    topo.start_daemon_logging(args, "info");
    let (pod_a, pod_b) = (topo.pod(0), topo.pod(1));
    topo.enroll(&pod_a.netns);

    println!();
    println!(
        "  node  {:<28} redis-server on {SERVICE_VIP}:{REDIS_PORT} (the Redis service address)",
        topo.node.name()
    );
    println!(
        "        {:<28} redirector proxy on {NODE_ADDR}:{PROXY_PORT}",
        ""
    );
    println!("  pod A {:<28} {}  ENROLLED", pod_a.netns.name(), pod_a.ip);
    println!(
        "  pod B {:<28} {}  not enrolled",
        pod_b.netns.name(),
        pod_b.ip
    );
    println!();

    let greeting = "hello from pod A";
    println!("pod A $ redis-cli -h {SERVICE_VIP} -p {REDIS_PORT} SET greeting '{greeting}'");
    println!("        {}", pod_a.redis(&["SET", "greeting", greeting]));
    println!("pod B $ redis-cli -h {SERVICE_VIP} -p {REDIS_PORT} GET greeting");
    println!("        {}", pod_b.redis(&["GET", "greeting"]));
    println!();

    let seen_a = pod_a.seen_by_redis_as(vip);
    let seen_b = pod_b.seen_by_redis_as(vip);
    println!("Redis (CLIENT INFO) saw pod A's connection come from {seen_a}: the node proxy.");
    println!(
        "  Pod A dialled {SERVICE_VIP}:{REDIS_PORT}; connect4 rewrote it to {NODE_ADDR}:{PROXY_PORT},"
    );
    println!("  and the proxy relayed to the original destination it found in rdr_orig_dst.");
    println!("Redis saw pod B's connection come from {seen_b}: direct, untouched.");
    println!();
    println!("$ redirector status");
    println!("{}", topo.cli(&["status"]));

    let pin = path_str(topo.pin_dir()).to_string();
    println!("Try it yourself while the demo runs:");
    println!(
        "  ip netns exec {} redis-cli -h {SERVICE_VIP} CLIENT INFO",
        pod_a.netns.name()
    );
    println!(
        "  ip netns exec {} redis-cli -h {SERVICE_VIP} CLIENT INFO",
        pod_b.netns.name()
    );
    println!("  {} --pin-dir {pin} status", bin.display());
    println!("  bpftool map dump pinned {pin}/rdr_counters");
    println!("  bpftool cgroup tree {}", path_str(topo.cgroup2_root()));

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
