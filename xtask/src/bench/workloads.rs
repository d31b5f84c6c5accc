//! W1-W4: the proxy against direct Redis Cluster access, as
//! `../shared/notes/bench-method.md` prescribes.
//!
//! Everything runs inside a private network namespace (removed afterwards)
//! with `tcp_max_tw_buckets=0` set there only, so short-connection runs
//! measure the proxy and not TIME_WAIT. A 3+3 cluster listens on
//! 127.0.0.1:7000-7005 in it. The daemon (release build, one worker thread,
//! steering on, attached at a private cgroup v2 mount, the namespace
//! enrolled) listens on 10.200.0.1:7379 and steers 10.96.0.10:6379; both
//! addresses are on the namespace's loopback, which has no route out. Each
//! workload runs three ways:
//! - direct: `redis-benchmark --cluster` (or phpredis' `RedisCluster`);
//! - proxy over TCP: the client dials the proxy's address itself (the data
//!   path a steered pod has with the default `--accelerate off`);
//! - proxy, steered with the shortcut: the client dials the service address
//!   and the kernel steers it, and with `--accelerate on` its data takes the
//!   `sk_msg` shortcut both ways.
//!
//! Each is judged against the targets. Modes alternate (direct, TCP, steered, direct, ...) in every round and
//! medians are reported; a missed target is printed as such.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use testbed::{
    TempDir,
    cgroup::Cgroup2Mount,
    cluster::RedisCluster,
    daemon::{self, Daemon},
    netns::Netns,
    process::{Place, cpu_ticks},
    unique,
};

const PROXY: &str = "10.200.0.1:7379";
const SERVICE: &str = "10.96.0.10:6379";
const WORKERS: &str = "1";

/// How a client reaches Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    /// Dials the proxy's address: plain TCP both ways.
    Tcp,
    /// Dials the service address and is steered, with the sk_msg shortcut.
    Steered,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Direct, Mode::Tcp, Mode::Steered];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Tcp => "proxy over TCP",
            Mode::Steered => "proxy, steered with the shortcut",
        }
    }

    /// Where redis-benchmark and PHP connect.
    fn endpoint(self) -> (&'static str, &'static str) {
        let split = |addr: &'static str| addr.split_once(':').expect("host:port");
        match self {
            Mode::Direct => ("127.0.0.1", "7000"),
            Mode::Tcp => split(PROXY),
            Mode::Steered => split(SERVICE),
        }
    }
}

/// The daemon with steering on, uninstalled (pins, links) on drop.
struct SteeringDaemon {
    daemon: Option<Daemon>,
    pin_dir: std::path::PathBuf,
    _cgroup2: Cgroup2Mount,
}

impl Drop for SteeringDaemon {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        let out = daemon::cli(&self.pin_dir, &["uninstall"]);
        if !out.status.success() {
            eprintln!(
                "warning: uninstall of {} failed: {out:?}",
                self.pin_dir.display()
            );
        }
    }
}

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
    requests: u64,
    /// (test, target ratio to direct)
    targets: &'static [(&'static str, f64)],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "W1 -c 50 -P 1",
        args: &["-c", "50", "-P", "1", "--threads", "3", "-t", "set,get"],
        requests: 200_000,
        targets: &[("SET", 0.75), ("GET", 0.75)],
    },
    Workload {
        name: "W2 -c 50 -P 16",
        args: &["-c", "50", "-P", "16", "--threads", "3", "-t", "set,get"],
        requests: 1_000_000,
        targets: &[("SET", 0.85), ("GET", 0.60)],
    },
    Workload {
        name: "W3 -c 20 -k 0",
        args: &["-c", "20", "-k", "0", "--threads", "1", "-t", "get"],
        requests: 60_000,
        targets: &[("GET", 0.95)],
    },
];

/// Proxy CPU seconds per 100k requests of the best peer (predixy), W1 / W2.
const PEER_CPU: [(&str, f64); 2] = [("W1 -c 50 -P 1", 0.62), ("W2 -c 50 -P 16", 0.11)];

#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
}

#[derive(Default)]
struct Series {
    direct: Vec<Sample>,
    tcp: Vec<Sample>,
    steered: Vec<Sample>,
}

impl Series {
    fn of(&mut self, mode: Mode) -> &mut Vec<Sample> {
        match mode {
            Mode::Direct => &mut self.direct,
            Mode::Tcp => &mut self.tcp,
            Mode::Steered => &mut self.steered,
        }
    }
}

/// Runs W1-W4; the daemon binary comes from `REDIRECTOR_BIN` (set by the
/// caller).
pub fn run(rounds: usize) -> Result<()> {
    let netns = Netns::create(&unique("rdr-bench"));
    netns.sysctl("net.ipv4.tcp_max_tw_buckets", "0");
    for addr in ["10.200.0.1/32", "10.96.0.10/32"] {
        netns.ip(&["addr", "add", addr, "dev", "lo"]);
    }
    let place = netns.place();
    let dir = TempDir::new("rdr-bench-");
    let nodes: Vec<SocketAddr> = (7000..7006)
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    eprintln!(
        "starting a 3+3 cluster and the daemon in netns {}",
        netns.name()
    );
    let cluster = RedisCluster::start(&place, &nodes, 1, dir.path());
    let steering = start_daemon(&place, &netns, dir.path())?;
    let proxy_pid = steering.daemon.as_ref().map_or(0, Daemon::pid);

    let mut series: BTreeMap<(&str, String), Series> = BTreeMap::new();
    // Proxy CPU seconds per 100k requests, per workload and mode.
    let mut cpu: BTreeMap<(&str, bool), Vec<f64>> = BTreeMap::new();
    for round in 1..=rounds {
        for w in WORKLOADS {
            for mode in Mode::ALL {
                eprintln!("round {round}/{rounds}: {} {}", w.name, mode.name());
                let before = cpu_ticks(proxy_pid);
                let results = benchmark(&place, w, mode)?;
                let ticks = cpu_ticks(proxy_pid) - before;
                if mode != Mode::Direct {
                    let requests = w.requests * u64::try_from(results.len()).unwrap_or(1);
                    // Clock ticks are 10 ms.
                    cpu.entry((w.name, mode == Mode::Steered))
                        .or_default()
                        .push(ticks as f64 * 0.01 / requests as f64 * 100_000.0);
                }
                for (test, sample) in results {
                    series
                        .entry((w.name, test))
                        .or_default()
                        .of(mode)
                        .push(sample);
                }
            }
        }
    }
    let w4 = php_w4(&place, dir.path(), rounds)?;
    drop(steering);
    drop(cluster);

    println!();
    println!(
        "Redis Cluster proxy vs direct, medians of {rounds} alternating rounds; 3+3 cluster on loopback, redis-benchmark -r 100000 -d 32, proxy with {WORKERS} worker thread"
    );
    println!(
        "TCP: the client dials the proxy (the default data path); shortcut: it dials the service, is steered, and its data takes sk_msg (--accelerate on)"
    );
    println!(
        "{:<16} {:<4} {:>10} {:>10} {:>6} {:>10} {:>6} {:>7}  {:>15}  {:>15}  result TCP / shortcut",
        "workload",
        "test",
        "direct",
        "TCP",
        "ratio",
        "shortcut",
        "ratio",
        "target",
        "p50/p99 direct",
        "p50/p99 shortcut"
    );
    for w in WORKLOADS {
        for &(test, target) in w.targets {
            let Some(s) = series.get(&(w.name, test.to_string())) else {
                continue;
            };
            let (direct, tcp, steered) = (median(&s.direct), median(&s.tcp), median(&s.steered));
            let (tcp_ratio, ratio) = (tcp.rps / direct.rps, steered.rps / direct.rps);
            let verdict = |r: f64| if r >= target { "ok" } else { "MISSED" };
            println!(
                "{:<16} {:<4} {:>10.0} {:>10.0} {:>6.2} {:>10.0} {:>6.2} {:>6.2}+  {:>6.2}/{:<6.2} ms  {:>6.2}/{:<6.2} ms  {} / {}",
                w.name,
                test,
                direct.rps,
                tcp.rps,
                tcp_ratio,
                steered.rps,
                ratio,
                target,
                direct.p50,
                direct.p99,
                steered.p50,
                steered.p99,
                verdict(tcp_ratio),
                verdict(ratio)
            );
        }
    }
    println!();
    for w in WORKLOADS {
        let spent = |steered: bool| {
            median_f(
                cpu.get(&(w.name, steered))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            )
        };
        let (tcp, steered) = (spent(false), spent(true));
        match PEER_CPU.iter().find(|(name, _)| *name == w.name) {
            Some((_, peer)) => println!(
                "proxy CPU per 100k requests, {:<16} TCP {tcp:.3} s, shortcut {steered:.3} s (best peer {peer:.2} s): {} / {}",
                w.name,
                if tcp < *peer { "ok" } else { "MISSED" },
                if steered < *peer { "ok" } else { "MISSED" }
            ),
            None => println!(
                "proxy CPU per 100k requests, {:<16} TCP {tcp:.3} s, shortcut {steered:.3} s",
                w.name
            ),
        }
    }
    if let Some([direct, tcp, steered]) = w4 {
        let ratio = steered / direct;
        println!();
        println!(
            "W4 PHP, phpredis, a fresh connection per request (SET+GET), 4 processes: direct (RedisCluster) {direct:.0} req/s; proxy (Redis class) over TCP {tcp:.0} req/s ({:.2}x), steered with the shortcut {steered:.0} req/s ({ratio:.2}x) (target 2.00x): {} / {}",
            tcp / direct,
            if tcp / direct >= 2.0 { "ok" } else { "MISSED" },
            if ratio >= 2.0 { "ok" } else { "MISSED" }
        );
    }
    Ok(())
}

fn start_daemon(place: &Place, netns: &Netns, dir: &Path) -> Result<SteeringDaemon> {
    let cgroup2 = Cgroup2Mount::new(dir.join("cgroup2"));
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("rdr-bench"));
    let args: Vec<String> = [
        "--proxy-addr",
        PROXY,
        "--redis-target",
        SERVICE,
        "--cluster-seed",
        "127.0.0.1:7000",
        "--admin-addr",
        "none",
        "--workers",
        WORKERS,
        "--accelerate",
        "on",
        "--cgroup-root",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([cgroup2.path().display().to_string()])
    .collect();
    let mut steering = SteeringDaemon {
        daemon: None,
        pin_dir: pin_dir.clone(),
        _cgroup2: cgroup2,
    };
    steering.daemon = Some(Daemon::start(
        place,
        &pin_dir,
        args,
        vec![("RUST_LOG".into(), "warn,redirector::app=info".into())],
        dir.join("redirector.log"),
    ));
    daemon::cli_ok(
        &pin_dir,
        &["enroll", "--netns", &netns.path().display().to_string()],
    );
    Ok(steering)
}

/// One redis-benchmark run; (test, sample) per CSV row.
fn benchmark(place: &Place, w: &Workload, mode: Mode) -> Result<Vec<(String, Sample)>> {
    let (host, port) = mode.endpoint();
    let mut cmd = place.command("redis-benchmark");
    cmd.args(["-h", host, "-p", port, "--csv", "-r", "100000", "-d", "32"])
        .args(["-n", &w.requests.to_string()])
        .args(w.args);
    if mode == Mode::Direct {
        cmd.arg("--cluster");
    }
    let out = cmd.output().context("redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with("\"test\"")) {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.len() < 7 {
            continue;
        }
        let num = |i: usize| fields[i].parse::<f64>().unwrap_or(0.0);
        rows.push((
            fields[0].to_string(),
            Sample {
                rps: num(1),
                p50: num(4),
                p99: num(6),
            },
        ));
    }
    if rows.is_empty() {
        bail!(
            "redis-benchmark ({}) printed no results: {}{}",
            mode.name(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(rows)
}

const PHP_W4: &str = r#"<?php
// A PHP-FPM request: connect, SET, GET, close. argv: mode host port seconds
[$_, $mode, $host, $port, $seconds] = $argv;
$end = microtime(true) + (float)$seconds;
$n = 0;
while (microtime(true) < $end) {
    if ($mode === 'proxy') {
        $r = new Redis();
        $r->connect($host, (int)$port);
    } else {
        $r = new RedisCluster(NULL, ["$host:$port"]);
    }
    $key = 'w4:' . getmypid() . ':' . ($n % 1000);
    $r->set($key, "v$n");
    if ($r->get($key) !== "v$n") {
        fwrite(STDERR, "wrong value for $key\n");
        exit(1);
    }
    $r->close();
    $n++;
}
echo $n, "\n";
"#;

/// W4, medians over rounds: req/s direct, over TCP, steered; `None` when
/// PHP with phpredis is not installed.
fn php_w4(place: &Place, dir: &Path, rounds: usize) -> Result<Option<[f64; 3]>> {
    let has_phpredis = Command::new("php")
        .args(["-r", "exit(extension_loaded('redis') ? 0 : 1);"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_phpredis {
        println!(
            "W4 not measured: php with the redis extension is missing (cargo xtask setup installs it)"
        );
        return Ok(None);
    }
    let script = dir.join("w4.php");
    std::fs::write(&script, PHP_W4)?;
    let seconds = 4.0;
    let run = |mode: Mode| -> Result<f64> {
        let (host, port) = mode.endpoint();
        let class = if mode == Mode::Direct {
            "cluster"
        } else {
            "proxy"
        };
        let started = Instant::now();
        let children: Vec<_> = (0..4)
            .map(|_| {
                place
                    .command("php")
                    .arg(&script)
                    .args([class, host, port, &seconds.to_string()])
                    .stdout(Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        let mut total = 0.0;
        for child in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("php W4 ({}) failed", mode.name());
            }
            total += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .unwrap_or(0.0);
        }
        Ok(total / started.elapsed().as_secs_f64())
    };
    let mut samples: [Vec<f64>; 3] = Default::default();
    for round in 1..=rounds {
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            eprintln!("round {round}/{rounds}: W4 php {}", mode.name());
            samples[i].push(run(mode)?);
        }
    }
    Ok(Some(samples.map(|s| median_f(&s))))
}

fn median(samples: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| median_f(&samples.iter().map(f).collect::<Vec<_>>());
    Sample {
        rps: pick(|s| s.rps),
        p50: pick(|s| s.p50),
        p99: pick(|s| s.p99),
    }
}

fn median_f(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
