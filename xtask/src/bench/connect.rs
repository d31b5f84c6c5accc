//! What steering costs a connect.
//!
//! connect() latency from pod namespaces with and without the programs in
//! the way, three cases:
//! - a pod that is not enrolled, to any port: what every other pod on the
//!   node pays for the programs being there;
//! - an enrolled pod to a non-Redis port: the target lookup that misses;
//! - the Redis service, from an enrolled pod: steered to the node proxy
//!   instead of reaching Redis.
//!
//! Connects with and without alternate one by one: rounds that start and
//! stop the daemon spread by tens of percent on a shared VM, far more than
//! the few percent to resolve. The daemon attaches its programs to one of
//! two threaded cgroups; two measuring threads, one in each, pinned to the
//! same CPU, take turns, each pair in alternating order. Each side has its
//! own listener, created by a thread of the same cgroup, so the server's
//! half of a connect (which the client's `connect()` runs on loopback)
//! meets the programs on the "with" side only, as it would on a node.
//!
//! That leaves what the hooks cost a cgroup without programs once any
//! cgroup has them: the kernel skips a hook while no cgroup has a program
//! of its kind (a static key), and walks the cgroup's empty program list
//! once some cgroup has one. It is measured first, before the daemon runs,
//! in many short blocks of connects with the keys off and on (a program
//! that never runs attached to an empty cgroup), alternating. The two
//! ratios multiply into what the programs cost a connect.
//!
//! Each round also has the kernel account the programs' own run time (BPF
//! run-time statistics, in a pass of its own, since accounting slows every
//! run): which program runs how often per connect, and for how long.
//!
//! Each client socket closes with RST (SO_LINGER 0), and TIME_WAIT is
//! disabled inside the test namespaces only, so ephemeral ports never run out.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::{
    sched::{CloneFlags, CpuSet, sched_setaffinity, setns},
    sys::{
        socket::{setsockopt, sockopt},
        time::TimeVal,
    },
    unistd::{Pid, gettid},
};
use testbed::{
    bpfprog,
    bpfstats::{self, RunTimeStats},
    cgroup::Cgroup,
    topology::{REDIS_PORT, SERVICE_VIP, Topology},
};

/// Pairs of connects (one with, one without) per case and round.
const PAIRS_PER_ROUND: usize = 4000;
const WARMUP_PAIRS: usize = 200;
/// The sinks' ports: "another service", one listener per side.
const SINK_PORT_WITH: u16 = 9000;
const SINK_PORT_WITHOUT: u16 = 9001;
/// Connects per case in each round's accounting pass.
const ACCOUNTED_CONNECTS: usize = 2000;
/// Our programs' names start with this (`bpftool prog show`).
const PROGRAM_PREFIX: &str = "redir_";
/// The CPU both measuring threads run on.
const MEASURING_CPU: usize = 0;
/// Blocks per round of the hook-walk phase (half with the keys on), and
/// connects per block, after connects not recorded: turning a key on or
/// off patches kernel text, and the first connects after it pay for that
/// (blocks of 200 without them read 2.4% where blocks of 2000 read 1.3%).
const KEY_BLOCKS_PER_ROUND: usize = 16;
const CONNECTS_PER_KEY_BLOCK: usize = 2000;
const SETTLING_CONNECTS: usize = 200;

/// Fewest rounds for a median and a spread worth reading.
const MIN_ROUNDS: usize = 5;
/// What the programs may cost a connect that is not steered.
const TARGET_OVERHEAD: f64 = 1.03;

/// Per round: the median connect with the hooks skipped (no program of
/// their kind anywhere) and with them walking an empty program list.
#[derive(Default)]
struct HookWalk {
    skipped: Vec<Duration>,
    walked: Vec<Duration>,
}

#[derive(Default)]
struct Samples {
    /// Per round: the median connect without and with the programs.
    without: Vec<Duration>,
    with: Vec<Duration>,
    /// Per round: each program's run time and runs per connect.
    programs: Vec<BTreeMap<String, PerConnect>>,
}

/// A program's share of one connect, from the kernel's accounting.
#[derive(Clone, Copy, Default)]
struct PerConnect {
    nanos: f64,
    runs: f64,
}

/// Where one side's connects come from and go to.
#[derive(Clone, Copy)]
struct Side<'a> {
    cgroup: &'a Path,
    with_programs: bool,
    dst: SocketAddr,
}

pub fn connect_latency(rounds: usize) -> Result<()> {
    let rounds = rounds.max(MIN_ROUNDS);
    let mut topo = Topology::build(2);
    for netns in [&topo.node, &topo.pod(0).netns, &topo.pod(1).netns] {
        netns.sysctl("net.ipv4.tcp_max_tw_buckets", "0");
    }
    topo.start_service_cluster();
    let id = std::process::id();
    let with_cgroup = ThreadedCgroup::create(
        topo.cgroup2_root()
            .join(format!("redirector-bench-{id}-with")),
    )?;
    let without_cgroup = ThreadedCgroup::create(
        topo.cgroup2_root()
            .join(format!("redirector-bench-{id}-without")),
    )?;
    let sink_with = SocketAddr::from((SERVICE_VIP, SINK_PORT_WITH));
    let sink_without = SocketAddr::from((SERVICE_VIP, SINK_PORT_WITHOUT));
    let _sinks = [
        Sink::spawn(&topo.node.path(), sink_with, with_cgroup.path())?,
        Sink::spawn(&topo.node.path(), sink_without, without_cgroup.path())?,
    ];
    let redis = SocketAddr::from((SERVICE_VIP, REDIS_PORT));
    let pod_netns = topo.pod(0).netns.path();
    // Never enrolled.
    let bystander = topo.pod(1).netns.path();

    let no_programs = Side {
        cgroup: without_cgroup.path(),
        with_programs: false,
        dst: sink_without,
    };
    let keys_cgroup = Cgroup::create(
        topo.cgroup2_root()
            .join(format!("redirector-bench-{id}-keys")),
    );
    let mut hook_walk = HookWalk::default();
    for round in 1..=rounds {
        eprintln!(
            "round {round}/{rounds}: connects with the kernel's hooks skipped and walked, in turn"
        );
        hook_walk_round(&bystander, no_programs, keys_cgroup.path(), &mut hook_walk)?;
    }

    let args = topo.daemon_args_at(with_cgroup.path());
    // Quiet, but for the ready line the testbed waits for.
    topo.start_daemon_logging(args, "warn,redirector::app=info");
    topo.enroll(&topo.pod(0).netns);

    let to_sinks = (
        Side {
            cgroup: with_cgroup.path(),
            with_programs: true,
            dst: sink_with,
        },
        Side {
            cgroup: without_cgroup.path(),
            with_programs: false,
            dst: sink_without,
        },
    );
    let to_redis = (
        Side {
            cgroup: with_cgroup.path(),
            with_programs: true,
            dst: redis,
        },
        Side {
            cgroup: without_cgroup.path(),
            with_programs: false,
            dst: redis,
        },
    );
    let (mut bystander_samples, mut other_samples) = (Samples::default(), Samples::default());
    let mut redis_samples = Samples::default();
    let result = (|| -> Result<()> {
        for round in 1..=rounds {
            eprintln!("round {round}/{rounds}: connects with and without the programs, in turn");
            paired_round(&bystander, to_sinks, &mut bystander_samples)?;
            paired_round(&pod_netns, to_sinks, &mut other_samples)?;
            let steered_before = topo.counters().steered;
            paired_round(&pod_netns, to_redis, &mut redis_samples)?;
            let steered = topo.counters().steered - steered_before;
            anyhow::ensure!(
                steered >= u64::try_from(PAIRS_PER_ROUND).unwrap_or(u64::MAX),
                "only {steered} connects were steered: the comparison would be meaningless"
            );

            eprintln!("round {round}/{rounds}: the programs' run time, as the kernel accounts it");
            let stats = RunTimeStats::enable().context("enable BPF run-time statistics")?;
            bystander_samples
                .programs
                .push(account_connects(&bystander, to_sinks.0)?);
            other_samples
                .programs
                .push(account_connects(&pod_netns, to_sinks.0)?);
            redis_samples
                .programs
                .push(account_connects(&pod_netns, to_redis.0)?);
            drop(stats);
        }
        Ok(())
    })();
    if let Some(mut daemon) = topo.daemon.take() {
        daemon.stop();
    }
    topo.cli(&["uninstall"]);
    result?;

    println!();
    println!(
        "connect() latency from a pod netns over veth, the kernel's hooks skipped (no program of their kind \
         anywhere) and walking an empty program list (some other cgroup has one), in turns of \
         {CONNECTS_PER_KEY_BLOCK} connects, median of {rounds} rounds"
    );
    println!(
        "{:<50} {:>14} {:>14} {:>7} {:>15}",
        "case", "skipped", "walked", "ratio", "rounds min-max"
    );
    let walk = Samples {
        without: hook_walk.skipped,
        with: hook_walk.walked,
        programs: Vec::new(),
    };
    let walk_ratio = report(&format!("pod not enrolled -> {sink_without}"), &walk);

    println!();
    println!(
        "connect() latency from a pod netns over veth, with and without the programs taking turns \
         ({PAIRS_PER_ROUND} pairs per round on one CPU), median of {rounds} rounds"
    );
    println!(
        "{:<50} {:>14} {:>14} {:>7} {:>15}",
        "case", "no programs", "programs", "ratio", "rounds min-max"
    );
    let mut totals = Vec::new();
    let cases = [
        (
            format!("pod not enrolled -> {sink_with}"),
            &bystander_samples,
            Some(TARGET_OVERHEAD),
        ),
        (
            format!("enrolled pod -> {sink_with} (not Redis)"),
            &other_samples,
            Some(TARGET_OVERHEAD),
        ),
        (
            format!("enrolled pod -> Redis {redis} (steered)"),
            &redis_samples,
            None,
        ),
    ];
    for (what, samples, _) in &cases {
        totals.push(report(what, samples) * walk_ratio);
    }

    println!();
    println!("what the programs cost a connect: the two ratios multiplied");
    for ((what, _, target), total) in cases.iter().zip(totals) {
        let verdict = match target {
            Some(t) if total <= *t => format!("  (target {t:.2}x) ok"),
            Some(t) => format!("  (target {t:.2}x) MISSED"),
            None => String::new(),
        };
        println!("{what:<50} {total:>6.3}x{verdict}");
    }

    println!();
    println!(
        "the programs' own run time per connect (BPF run-time statistics, {ACCOUNTED_CONNECTS} connects per case; \
         it includes the accounting's clock reads, ~70 ns a run here), median of {rounds} rounds, \
         against the same round's connect without programs"
    );
    println!(
        "{:<50} {:>14} {:>7} {:>15}  programs (runs per connect x ns per run)",
        "case", "accounted", "share", "rounds min-max"
    );
    for (what, samples, _) in &cases {
        report_programs(what, samples);
    }
    Ok(())
}

/// One round of `PAIRS_PER_ROUND` connects from each side, taking turns
/// (with first in even pairs, without first in odd ones), after a warm-up;
/// records each side's median.
fn paired_round(netns: &Path, (with, without): (Side, Side), samples: &mut Samples) -> Result<()> {
    let pairs = WARMUP_PAIRS + PAIRS_PER_ROUND;
    std::thread::scope(|scope| -> Result<()> {
        let (with_go, with_times) = measuring_thread(scope, netns, with)?;
        let (without_go, without_times) = measuring_thread(scope, netns, without)?;
        let turn = |go: &mpsc::Sender<()>, times: &mpsc::Receiver<Result<Duration>>| {
            go.send(()).context("measuring thread gone")?;
            times.recv().context("measuring thread gone")?
        };
        let (mut a, mut b) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
        for i in 0..pairs {
            if i % 2 == 0 {
                a.push(turn(&with_go, &with_times)?);
                b.push(turn(&without_go, &without_times)?);
            } else {
                b.push(turn(&without_go, &without_times)?);
                a.push(turn(&with_go, &with_times)?);
            }
        }
        samples.with.push(median(&a[WARMUP_PAIRS..]));
        samples.without.push(median(&b[WARMUP_PAIRS..]));
        Ok(())
        // Dropping the senders ends both threads.
    })
}

/// One round of the hook-walk phase: `KEY_BLOCKS_PER_ROUND` blocks of
/// connects from `side`, the hooks' keys off in even blocks and on in odd
/// ones (a program that never runs attached to `keys_cgroup`, which has no
/// process); records the median of each half.
fn hook_walk_round(
    netns: &Path,
    side: Side,
    keys_cgroup: &Path,
    walk: &mut HookWalk,
) -> Result<()> {
    let (mut skipped, mut walked) = (Vec::new(), Vec::new());
    std::thread::scope(|scope| -> Result<()> {
        let (go, times) = measuring_thread(scope, netns, side)?;
        let block = |into: &mut Vec<Duration>| -> Result<()> {
            for i in 0..SETTLING_CONNECTS + CONNECTS_PER_KEY_BLOCK {
                go.send(()).context("measuring thread gone")?;
                let time = times.recv().context("measuring thread gone")??;
                if i >= SETTLING_CONNECTS {
                    into.push(time);
                }
            }
            Ok(())
        };
        // A warm-up block, not recorded.
        block(&mut Vec::new())?;
        for i in 0..KEY_BLOCKS_PER_ROUND {
            if i % 2 == 0 {
                block(&mut skipped)?;
            } else {
                let _keys_on = [
                    bpfprog::attach_passthrough_connect4(keys_cgroup, "bench_keys4")
                        .context("attach a connect4 program to an empty cgroup")?,
                    // Answers only the receive-window callback, and never runs.
                    bpfprog::attach_rwnd_init(keys_cgroup, "bench_keysops", 10)
                        .context("attach a sock_ops program to an empty cgroup")?,
                ];
                block(&mut walked)?;
            }
        }
        Ok(())
    })?;
    walk.skipped.push(median(&skipped));
    walk.walked.push(median(&walked));
    Ok(())
}

type Turns = (mpsc::Sender<()>, mpsc::Receiver<Result<Duration>>);

/// A thread in `netns` and `side.cgroup`, on `MEASURING_CPU`, that times
/// one connect to `side.dst` per message until its sender drops.
fn measuring_thread<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    netns: &Path,
    side: Side,
) -> Result<Turns> {
    let netns = File::open(netns).context("open pod netns")?;
    let cgroup = side.cgroup.to_path_buf();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (times_tx, times_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    // Named for the side, so a profile (`perf report --comms`) tells them apart.
    let name = if side.with_programs {
        "connect-with"
    } else {
        "connect-without"
    };
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, move || {
            let setup = (|| -> Result<()> {
                setns(&netns, CloneFlags::CLONE_NEWNET).context("enter pod netns")?;
                join_cgroup(&cgroup)?;
                let mut cpus = CpuSet::new();
                cpus.set(MEASURING_CPU)?;
                sched_setaffinity(Pid::from_raw(0), &cpus).context("pin the measuring thread")?;
                Ok(())
            })();
            let failed = setup.is_err();
            if ready_tx.send(setup).is_err() || failed {
                return;
            }
            while go_rx.recv().is_ok() {
                if times_tx.send(time_connect(side.dst)).is_err() {
                    return;
                }
            }
        });
    spawned.context("spawn a measuring thread")?;
    ready_rx.recv().context("measuring thread")??;
    Ok((go_tx, times_rx))
}

/// The time of one `connect()` (socket creation included); the socket then
/// closes with RST.
fn time_connect(dst: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let stream = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
    let elapsed = start.elapsed();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&stream, sockopt::Linger, &linger)?;
    Ok(elapsed)
}

/// Moves the calling thread into a threaded cgroup (the sockets it creates
/// from then on belong to that cgroup).
fn join_cgroup(cgroup: &Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.threads"), gettid().to_string())
        .with_context(|| format!("move a thread into {}", cgroup.display()))
}

/// A cgroup of type "threaded" under the hierarchy's root, so that single
/// threads of this process can join it; removed on drop (its threads must
/// have ended).
struct ThreadedCgroup(Cgroup);

impl ThreadedCgroup {
    fn create(path: PathBuf) -> Result<Self> {
        let cgroup = Cgroup::create(path);
        fs::write(cgroup.path().join("cgroup.type"), "threaded")
            .with_context(|| format!("make {} threaded", cgroup.path().display()))?;
        Ok(Self(cgroup))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The programs' run time per connect over `ACCOUNTED_CONNECTS` connects
/// from `netns` on `side`, by program. Run-time statistics must be on.
fn account_connects(netns: &Path, side: Side) -> Result<BTreeMap<String, PerConnect>> {
    let before = bpfstats::program_runs(PROGRAM_PREFIX);
    std::thread::scope(|scope| -> Result<()> {
        let (go, times) = measuring_thread(scope, netns, side)?;
        for _ in 0..ACCOUNTED_CONNECTS {
            go.send(()).context("measuring thread gone")?;
            times.recv().context("measuring thread gone")??;
        }
        Ok(())
    })?;
    let after = bpfstats::program_runs(PROGRAM_PREFIX);
    anyhow::ensure!(
        !after.is_empty(),
        "no program named {PROGRAM_PREFIX}* is loaded: nothing to account"
    );
    let connects = ACCOUNTED_CONNECTS as f64;
    Ok(after
        .into_iter()
        .map(|(name, total)| {
            let ran = total.since(before.get(&name).copied().unwrap_or_default());
            let per_connect = PerConnect {
                nanos: ran.run_time_ns as f64 / connects,
                runs: ran.run_count as f64 / connects,
            };
            (name, per_connect)
        })
        .collect())
}

/// Prints the median of the per-round medians, their ratio, and the spread
/// of the per-round ratios (each round's with / without); returns the ratio.
fn report(what: &str, samples: &Samples) -> f64 {
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
    println!(
        "{what:<50} {:>11.1} us {:>11.1} us {ratio:>6.3}x {low:>7.3}-{high:.3}x",
        micros(without),
        micros(with),
    );
    ratio
}

/// The programs' accounted time per connect and its share of the connect
/// without them, medians over rounds, with the spread of the per-round
/// shares and each program's median runs and time per run.
fn report_programs(what: &str, samples: &Samples) {
    let added: Vec<f64> = samples
        .programs
        .iter()
        .map(|round| round.values().map(|p| p.nanos).sum())
        .collect();
    let shares: Vec<f64> = added
        .iter()
        .zip(&samples.without)
        .map(|(nanos, without)| nanos / (micros(*without) * 1e3))
        .collect();
    let low = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let high = shares.iter().copied().fold(0.0, f64::max);
    let mut names: Vec<&String> = samples.programs.iter().flat_map(BTreeMap::keys).collect();
    names.sort();
    names.dedup();
    let programs: Vec<String> = names
        .into_iter()
        .filter_map(|name| {
            let per: Vec<PerConnect> = samples
                .programs
                .iter()
                .filter_map(|round| round.get(name).copied())
                .collect();
            let runs = median_f64(&per.iter().map(|p| p.runs).collect::<Vec<_>>());
            let per_run = median_f64(
                &per.iter()
                    .filter(|p| p.runs > 0.0)
                    .map(|p| p.nanos / p.runs)
                    .collect::<Vec<_>>(),
            );
            (runs >= 0.005).then(|| format!("{name} {runs:.2} x {per_run:.0} ns"))
        })
        .collect();
    println!(
        "{what:<50} {:>11.0} ns {:>6.1}% {:>6.1}-{:.1}%  {}",
        median_f64(&added),
        median_f64(&shares) * 100.0,
        low * 100.0,
        high * 100.0,
        programs.join(", "),
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

/// The median of `values` (0 for none).
fn median_f64(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// A listener for "another service" that accepts and drops connections,
/// from a thread in the node netns and in `cgroup` (accepted sockets belong
/// to the listener's cgroup). The thread leaves on drop, so the cgroup can
/// go.
struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// How often the accepting thread looks at `stop`, in microseconds.
    const POLL_MICROS: libc::suseconds_t = 100_000;

    fn spawn(netns: &Path, addr: SocketAddr, cgroup: &Path) -> Result<Self> {
        let netns = File::open(netns).context("open node netns")?;
        let cgroup = cgroup.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let listener = (|| -> Result<TcpListener> {
                setns(&netns, CloneFlags::CLONE_NEWNET).context("enter node netns")?;
                join_cgroup(&cgroup)?;
                let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
                // accept() waits at most this long (SO_RCVTIMEO applies to it).
                setsockopt(
                    &listener,
                    sockopt::ReceiveTimeout,
                    &TimeVal::new(0, Self::POLL_MICROS),
                )?;
                Ok(listener)
            })();
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
            while !stopping.load(Ordering::Relaxed) {
                drop(listener.accept());
            }
        });
        ready_rx.recv().context("sink thread")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
