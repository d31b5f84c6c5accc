//! What steering costs.
//!
//! connect() latency from pod namespaces, with and without the programs
//! attached, in alternating rounds (without, with, without, ...), medians
//! reported as ratios with their spread across rounds. Three cases:
//! - a pod that is not enrolled, to any port: what every other pod on the
//!   node pays for the programs being there;
//! - an enrolled pod to a non-Redis port: the target lookup that misses;
//! - the Redis service, from an enrolled pod: steered to the node proxy
//!   instead of reaching Redis.
//!
//! Each client socket closes with RST (SO_LINGER 0), and TIME_WAIT is
//! disabled inside the test namespaces only, so ephemeral ports never run out.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{setsockopt, sockopt},
};
use testbed::topology::{REDIS_PORT, SERVICE_VIP, Topology};

const CONNECTS_PER_RUN: usize = 4000;
const WARMUP: usize = 200;
const OTHER_PORT: u16 = 9000;

/// Fewest rounds for a median and a spread worth reading.
const MIN_ROUNDS: usize = 5;
/// What the programs may cost a connect that is not steered.
const TARGET_OVERHEAD: f64 = 1.03;

#[derive(Default)]
struct Samples {
    without: Vec<Duration>,
    with: Vec<Duration>,
}

pub fn connect_latency(rounds: usize) -> Result<()> {
    let rounds = rounds.max(MIN_ROUNDS);
    let mut topo = Topology::build(2);
    for netns in [&topo.node, &topo.pod(0).netns, &topo.pod(1).netns] {
        netns.sysctl("net.ipv4.tcp_max_tw_buckets", "0");
    }
    topo.start_service_cluster();
    let other = SocketAddr::from((SERVICE_VIP, OTHER_PORT));
    spawn_sink(&topo.node.path(), other)?;
    let redis = SocketAddr::from((SERVICE_VIP, REDIS_PORT));
    let pod_netns = topo.pod(0).netns.path();
    // Never enrolled.
    let bystander = topo.pod(1).netns.path();

    let (mut other_samples, mut redis_samples) = (Samples::default(), Samples::default());
    let mut bystander_samples = Samples::default();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: without programs");
        bystander_samples
            .without
            .push(median_connect(&bystander, other)?);
        other_samples
            .without
            .push(median_connect(&pod_netns, other)?);
        redis_samples
            .without
            .push(median_connect(&pod_netns, redis)?);

        eprintln!("round {round}/{rounds}: with programs, pod enrolled");
        let args = topo.daemon_args_at(topo.cgroup2_root());
        // Quiet, but for the ready line the testbed waits for.
        topo.start_daemon_logging(args, "warn,redirector::app=info");
        topo.enroll(&topo.pod(0).netns);
        let steered_before = topo.counters().steered;
        bystander_samples
            .with
            .push(median_connect(&bystander, other)?);
        other_samples.with.push(median_connect(&pod_netns, other)?);
        redis_samples.with.push(median_connect(&pod_netns, redis)?);
        let steered = topo.counters().steered - steered_before;
        anyhow::ensure!(
            steered >= u64::try_from(CONNECTS_PER_RUN).unwrap_or(u64::MAX),
            "only {steered} connects were steered: the comparison would be meaningless"
        );
        if let Some(mut daemon) = topo.daemon.take() {
            daemon.stop();
        }
        topo.cli(&["uninstall"]);
    }

    println!();
    println!(
        "connect() latency from a pod netns over veth, median of {rounds} alternating rounds x {CONNECTS_PER_RUN} connects"
    );
    println!(
        "{:<50} {:>14} {:>14} {:>7} {:>15}",
        "case", "no programs", "programs", "ratio", "rounds min-max"
    );
    report(
        &format!("pod not enrolled -> {other}"),
        &bystander_samples,
        Some(TARGET_OVERHEAD),
    );
    report(
        &format!("enrolled pod -> {other} (not Redis)"),
        &other_samples,
        Some(TARGET_OVERHEAD),
    );
    report(
        &format!("enrolled pod -> Redis {redis} (steered)"),
        &redis_samples,
        None,
    );
    Ok(())
}

/// The median of the per-round medians, their ratio, and the spread of the
/// per-round ratios (each round's with / without).
fn report(what: &str, samples: &Samples, target: Option<f64>) {
    let without = median(&samples.without);
    let with = median(&samples.with);
    let ratio = micros(with) / micros(without);
    let per_round: Vec<f64> = samples
        .without
        .iter()
        .zip(&samples.with)
        .map(|(a, b)| micros(*b) / micros(*a))
        .collect();
    let low = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let high = per_round.iter().copied().fold(0.0, f64::max);
    let verdict = match target {
        Some(t) if ratio <= t => format!("  (target {t:.2}x) ok"),
        Some(t) => format!("  (target {t:.2}x) MISSED"),
        None => String::new(),
    };
    println!(
        "{what:<50} {:>11.1} us {:>11.1} us {ratio:>6.2}x {low:>7.2}-{high:.2}x{verdict}",
        micros(without),
        micros(with),
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// Median time of `connect()` (socket creation included) from `netns` to
/// `dst`, measured in a thread that enters the namespace.
fn median_connect(netns: &Path, dst: SocketAddr) -> Result<Duration> {
    let netns = File::open(netns).context("open pod netns")?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Duration> {
                setns(&netns, CloneFlags::CLONE_NEWNET).context("enter pod netns")?;
                let mut times = Vec::with_capacity(CONNECTS_PER_RUN);
                for i in 0..WARMUP + CONNECTS_PER_RUN {
                    let start = Instant::now();
                    let stream =
                        TcpStream::connect(dst).with_context(|| format!("connect {dst} (#{i})"))?;
                    let elapsed = start.elapsed();
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    setsockopt(&stream, sockopt::Linger, &linger)?;
                    drop(stream);
                    if i >= WARMUP {
                        times.push(elapsed);
                    }
                }
                Ok(median(&times))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("measuring thread panicked"))?
    })
}

/// A listener for "another service" that accepts and drops connections.
fn spawn_sink(netns: &Path, addr: SocketAddr) -> Result<()> {
    let netns = File::open(netns).context("open node netns")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listener = setns(&netns, CloneFlags::CLONE_NEWNET)
            .map_err(anyhow::Error::from)
            .and_then(|()| TcpListener::bind(addr).map_err(anyhow::Error::from));
        let listener = match listener {
            Ok(listener) => {
                let _ = ready_tx.send(Ok(()));
                listener
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    ready_rx.recv().context("sink thread")?
}
