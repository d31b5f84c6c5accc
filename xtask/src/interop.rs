//! `cargo xtask interop --ztunnel PATH`: redirector against a real ztunnel
//! (Istio ambient's node proxy), both directions of HBONE, in two network
//! namespaces joined by one veth pair and nothing else (no route out).
//!
//! ```text
//! netns "node" (redirector's node)                 netns "pod" (a Redis pod behind ztunnel)
//!   10.77.0.1   redirector: proxy :7379,  ◀─veth─▶  10.77.0.2   ztunnel, dedicated mode, FAKE_CA
//!               HBONE listener :15008                            Redis :6379 (shop/orders-redis)
//!   10.77.0.7   Redis :6379, fronted by redirector               iptables: the pod's connects to
//!               with shop/cart-redis's certificate               10.77.0.7-8:6379 go to ztunnel's
//!   10.77.0.8   the same Redis, fronted with the                 outbound listener (:15001)
//!               node's certificate only
//! ```
//!
//! redirector → ztunnel: commands through redirector's proxy reach the pod's
//! Redis over HBONE (ztunnel's inbound), ztunnel proving the pod's identity;
//! a wrong expected identity is refused. ztunnel → redirector: the pod's
//! commands to 10.77.0.7 go through ztunnel's outbound to redirector's
//! listener, which presents cart-redis's certificate on that address
//! (`--hbone-workload-certs`); on 10.77.0.8 it has only the node's, which
//! ztunnel must refuse. Then ztunnel's own access log says how every
//! stream ended. Certificates on both sides come from ztunnel's fake CA
//! (its test root and key, `src/tls` in its source), so each side trusts
//! the other's.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use testbed::{
    netns::Netns,
    process::{Child, Place, path_str},
    redis::RedisServer,
    resp::RespClient,
    two_nodes::{NODE_A, NODE_B, link_nodes},
    unique,
};

/// The ztunnel to run: its binary and its fake CA's directory.
pub struct Ztunnel {
    binary: PathBuf,
    /// `root-cert.pem` and `ca-key.pem` (its `src/tls`).
    ca: PathBuf,
}

impl Ztunnel {
    /// Checks `--ztunnel` and `--ztunnel-ca` (derived from the binary's
    /// checkout when not given) before anything is built.
    pub fn find(binary: &Path, ca: Option<PathBuf>) -> Result<Self> {
        let binary = fs::canonicalize(binary)
            .map_err(|e| anyhow!("--ztunnel {} does not exist: {e}", binary.display()))?;
        let ca = match ca {
            Some(dir) => dir,
            None => default_ca(&binary).with_context(|| {
                format!(
                    "{} is not in a ztunnel checkout's build directory: \
                     give --ztunnel-ca DIR (its src/tls: root-cert.pem, ca-key.pem)",
                    binary.display()
                )
            })?,
        };
        for file in ["root-cert.pem", "ca-key.pem"] {
            ensure!(
                ca.join(file).exists(),
                "--ztunnel-ca {}: no {file} (ztunnel's FAKE_CA root and key live in its src/tls)",
                ca.display()
            );
        }
        Ok(Self { binary, ca })
    }
}

const REDIS_PORT: u16 = 6379;
const PROXY_PORT: u16 = 7379;
const ADMIN_PORT: u16 = 15020;
/// ztunnel's ports (fixed in its config): outbound capture, readiness.
const ZTUNNEL_OUTBOUND_PORT: u16 = 15001;
const ZTUNNEL_READY_PORT: u16 = 15021;
/// Idle time before redirector is stopped, for its topology refreshes.
const SETTLE: Duration = Duration::from_secs(3);

/// A workload on redirector's node that redirector fronts with its own
/// certificate, and one it fronts with the node's certificate only.
const FRONTED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 7);
const UNCERTIFIED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 8);

const NODE_IDENTITY: &str = "spiffe://cluster.local/ns/redirector-system/sa/redirector";
const POD_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/orders-redis";
const FRONTED_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/cart-redis";
const WRONG_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/not-orders-redis";

/// ztunnel's workloads (`LOCAL_XDS_PATH`): the pod it serves (dedicated
/// mode), and the two addresses on redirector's node, all HBONE.
fn local_xds() -> String {
    let workload = |name: &str, ip: &str, node: &str| {
        format!(
            "- uid: Kubernetes//Pod/shop/{name}\n  name: {name}\n  namespace: shop\n  \
             serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  services: {{}}\n"
        )
    };
    format!(
        "# Written by `cargo xtask interop`.\nworkloads:\n{}{}{}policies: []\nservices: []\n",
        workload("orders-redis", NODE_B, "pod-node"),
        workload("cart-redis", &FRONTED.to_string(), "redirector-node"),
        workload("session-redis", &UNCERTIFIED.to_string(), "redirector-node"),
    )
}

/// Where the CA is when `--ztunnel-ca` is not given: a binary built in a
/// checkout (`out/rust/<profile>/`, its cargo config's target directory, or
/// `target/<profile>/`) has it at `<checkout>/src/tls`.
fn default_ca(ztunnel: &Path) -> Option<PathBuf> {
    ztunnel
        .ancestors()
        .skip(1)
        .take(4)
        .map(|dir| dir.join("src").join("tls"))
        .find(|tls| tls.join("root-cert.pem").exists() && tls.join("ca-key.pem").exists())
}

pub fn run(bin: &Path, zt: &Ztunnel, round_trips: usize) -> Result<()> {
    if let Some(why) = testbed::require::missing() {
        bail!("{why}");
    }
    ensure!(
        testbed::require::on_path("iptables"),
        "`iptables` is not installed: the pod's connects reach ztunnel through an iptables REDIRECT"
    );
    ensure!(round_trips > 0, "--round-trips must be at least 1");
    let (ztunnel, ca_src) = (&zt.binary, &zt.ca);

    let dir = crate::root().join("target").join("interop");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "== interop: redirector {} and ztunnel {}",
        bin.display(),
        ztunnel.display()
    );
    println!("   ztunnel {}", ztunnel_version(ztunnel));
    println!(
        "   logs, certificates and ztunnel's workloads in {}",
        dir.display()
    );

    let certs = Certs::mint(bin, ca_src, &dir)?;
    let node = Netns::create(&unique("rdr-iz-node"));
    let pod = Netns::create(&unique("rdr-iz-pod"));
    link_nodes(&node, &pod);
    for ip in [FRONTED, UNCERTIFIED] {
        node.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let node_ip: IpAddr = NODE_A.parse()?;
    let pod_ip: IpAddr = NODE_B.parse()?;
    // Declared after the namespaces: dropped (stopped) before them.
    let pod_redis = start_redis(&pod.place(), &[pod_ip], &dir.join("pod-redis"))?;
    let fronted_redis = start_redis(
        &node.place(),
        &[FRONTED.into(), UNCERTIFIED.into()],
        &dir.join("fronted-redis"),
    )?;

    let ztunnel_log = dir.join("ztunnel.log");
    let mut zt = start_ztunnel(ztunnel, &pod, &dir, &ztunnel_log)?;
    // The pod's connects to redirector's workloads go to ztunnel, as
    // istio-cni's rules send them (ztunnel dials port 15008: no loop).
    for ip in [FRONTED, UNCERTIFIED] {
        iptables_redirect(&pod, ip)?;
    }
    let redirector_log = dir.join("redirector.log");
    let mut rd = start_redirector(bin, &node, &certs, &redirector_log)
        .map_err(|e| e.context(format!("ztunnel's log: {}", ztunnel_log.display())))?;

    let admin = SocketAddr::new(node_ip, ADMIN_PORT);
    let outbound = redirector_to_ztunnel(bin, &node, &certs, &pod_redis, round_trips);
    let inbound = ztunnel_to_redirector(&pod, &fronted_redis, round_trips);
    // Topology refreshes (one a second) meanwhile: discovery streams
    // redirector opens and ends.
    std::thread::sleep(SETTLE);
    let metrics = testbed::http::get_in(&node.place(), admin, "/metrics");

    // A graceful stop ends redirector's pooled streams; then ztunnel has
    // logged how every stream of the run ended.
    let stopped = rd.terminate(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let zt_running = zt.is_running();
    drop(zt);
    let log = read_log(&ztunnel_log);
    let access = Access::parse(&log, node_ip);

    let line1 = outbound.map_or_else(
        |e| Verdict::fail(format!("{e:#}")),
        |o| o.verdict(&access, stopped.is_some_and(|s| s.success())),
    );
    let line2 = inbound.map_or_else(
        |e| Verdict::fail(format!("{e:#}")),
        |i| i.verdict(&access, &metrics),
    );
    let line2 = if zt_running {
        line2
    } else {
        Verdict::fail(format!("ztunnel exited during the run: {}", tail(&log, 10)))
    };
    for line in access.unexpected.iter().take(5) {
        println!("   ztunnel logged: {line}");
    }
    println!("redirector -> ztunnel: {line1}");
    println!("ztunnel -> redirector: {line2}");
    if line1.passed() && line2.passed() {
        Ok(())
    } else {
        bail!("interop failed; logs in {}", dir.display())
    }
}

/// `ztunnel version`'s first line, or why there is none.
fn ztunnel_version(ztunnel: &Path) -> String {
    match Command::new(ztunnel).arg("version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("(no version)")
            .to_string(),
        Err(e) => format!("(version: {e})"),
    }
}

/// Certificate directories for `redirector run`, from ztunnel's fake CA.
struct Certs {
    node: PathBuf,
    fronted: PathBuf,
}

impl Certs {
    fn mint(bin: &Path, ca_src: &Path, dir: &Path) -> Result<Self> {
        // `redirector certs issue --ca` reads ca.pem and ca-key.pem.
        let ca = dir.join("ca");
        fs::create_dir_all(&ca)?;
        for (from, to) in [("root-cert.pem", "ca.pem"), ("ca-key.pem", "ca-key.pem")] {
            fs::copy(ca_src.join(from), ca.join(to))
                .with_context(|| format!("cannot copy {}", ca_src.join(from).display()))?;
        }
        let issue = |identity: &str, out: &Path| -> Result<()> {
            let output = Command::new(bin)
                .args([
                    "certs",
                    "issue",
                    "--ca",
                    path_str(&ca),
                    "--identity",
                    identity,
                ])
                .args(["--out", path_str(out)])
                .output()
                .context("cannot run redirector certs issue")?;
            ensure!(
                output.status.success(),
                "redirector certs issue --identity {identity} with ztunnel's CA: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            Ok(())
        };
        let certs = Self {
            node: dir.join("node-certs"),
            fronted: dir.join("cart-redis-certs"),
        };
        issue(NODE_IDENTITY, &certs.node)?;
        issue(FRONTED_IDENTITY, &certs.fronted)?;
        Ok(certs)
    }
}

fn start_redis(place: &Place, binds: &[IpAddr], dir: &Path) -> Result<RedisServer> {
    fs::create_dir_all(dir)?;
    Ok(RedisServer::start(place, binds, REDIS_PORT, dir, &[]))
}

/// ztunnel in the pod's namespace, dedicated to that pod (as a sidecar-less
/// in-pod ztunnel would be), with the fake CA and a static workload file.
fn start_ztunnel(ztunnel: &Path, pod: &Netns, dir: &Path, log: &Path) -> Result<Child> {
    let xds = dir.join("ztunnel-workloads.yaml");
    fs::write(&xds, local_xds())?;
    let out = fs::File::create(log)?;
    let mut cmd = pod.place().command(ztunnel);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("FAKE_CA", "true")
        // No istiod: workloads come from the file, certificates from the fake CA.
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &xds)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "shop/orders-redis/orders-redis")
        .env("NODE_NAME", "pod-node")
        // Connect to the pod's Redis from ztunnel's own address: spoofing
        // the caller's needs the transparent-proxy routing of a real node.
        .env("ENABLE_ORIG_SRC", "false")
        .env("IPV6_ENABLED", "false")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(out.try_clone()?)
        .stderr(out);
    let mut child = Child::spawn("ztunnel", cmd);
    let ready = SocketAddr::new(NODE_B.parse()?, ZTUNNEL_READY_PORT);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !child.is_running() {
            bail!("ztunnel exited: {}", tail(&read_log(log), 15));
        }
        if http_status(&pod.place(), ready, "/healthz/ready") == Some(200) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!(
                "ztunnel not ready within 30 s ({ready}/healthz/ready): {}",
                tail(&read_log(log), 15)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status code of `GET path`, or `None` when nothing answers yet.
fn http_status(place: &Place, to: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = testbed::http::connect_in(place, to).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn iptables_redirect(pod: &Netns, ip: Ipv4Addr) -> Result<()> {
    let out = pod.place().output(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &ip.to_string(),
            "--dport",
            &REDIS_PORT.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &ZTUNNEL_OUTBOUND_PORT.to_string(),
        ],
    );
    ensure!(
        out.status.success(),
        "iptables REDIRECT in the pod's namespace: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The proxy (no steering: dialled directly from the node) in front of the
/// pod's Redis, reached through ztunnel; the HBONE listener fronting the
/// node's workloads.
fn start_redirector(bin: &Path, node: &Netns, certs: &Certs, log: &Path) -> Result<Child> {
    let pins = log.with_file_name("pins");
    let out = fs::File::create(log)?;
    let mut cmd = node.place().command(bin);
    cmd.arg("--pin-dir")
        .arg(&pins)
        .arg("run")
        .args(["--steering", "off", "--allow-direct-from", NODE_A])
        .args(["--proxy-addr", &format!("{NODE_A}:{PROXY_PORT}")])
        .args(["--admin-addr", &format!("{NODE_A}:{ADMIN_PORT}")])
        .args([
            "--backend",
            &format!("orders=standalone:{NODE_B}:{REDIS_PORT}"),
        ])
        // Frequent refreshes: each is a stream redirector opens and ends.
        .args(["--topology-refresh", "1s"])
        .args(["--hbone-listen", "0.0.0.0:15008"])
        .args(["--hbone-certs", path_str(&certs.node)])
        .args(["--mesh-endpoints", &format!("{NODE_B}={POD_IDENTITY}")])
        .args([
            "--hbone-workload-certs",
            &format!("{FRONTED}={}", path_str(&certs.fronted)),
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out);
    let mut child = Child::spawn("redirector run", cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = read_log(log);
        if text.contains(testbed::daemon::READY) {
            return Ok(child);
        }
        if !child.is_running() {
            bail!("redirector run exited: {}", tail(&text, 15));
        }
        if Instant::now() > deadline {
            bail!(
                "redirector not ready within 30 s (its backend is the pod's Redis, through ztunnel): {}",
                tail(&text, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The last `n` lines of `text`, on one line each, for an error message.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!("\n  {}", lines[from..].join("\n  "))
}

/// Round trips alternating `SET key value` and `GET key` on one connection,
/// each reply checked; the latency of each.
fn round_trips(client: &mut RespClient, prefix: &str, n: usize) -> Result<Latencies> {
    let mut took = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let key = format!("{prefix}:{}", i / 2);
        let value = format!("v{}", i / 2);
        let (args, want) = if i % 2 == 0 {
            (
                vec!["SET", key.as_str(), value.as_str()],
                "+OK\r\n".to_string(),
            )
        } else {
            (
                vec!["GET", key.as_str()],
                format!("${}\r\n{value}\r\n", value.len()),
            )
        };
        let sent = Instant::now();
        let reply = client
            .call_str(&args)
            .with_context(|| format!("round trip {i} ({})", args.join(" ")))?;
        took.push(sent.elapsed());
        ensure!(
            reply == want,
            "round trip {i} ({}): {reply:?}, expected {want:?}",
            args.join(" ")
        );
    }
    Ok(Latencies {
        took,
        total: started.elapsed(),
    })
}

struct Latencies {
    took: Vec<Duration>,
    total: Duration,
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sorted = self.took.clone();
        sorted.sort_unstable();
        let at = |q: f64| {
            // Nearest rank.
            let rank = (q * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
        };
        write!(
            f,
            "{} round trips (SET/GET) in {:.2} s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            sorted.len(),
            self.total.as_secs_f64(),
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }
}

/// What redirector → ztunnel measured before ztunnel's log is read.
struct Outbound {
    latencies: Latencies,
    /// How the tunnel expecting the wrong identity was refused.
    refused: String,
}

/// Commands through redirector's proxy to the pod's Redis behind ztunnel,
/// and a tunnel that expects the wrong identity.
/// `n` SET/GET round trips from `place` to `to` (`what`), then the last
/// key read back from the Redis they must land in, directly.
fn round_trips_landing(
    place: &Place,
    to: SocketAddr,
    what: &str,
    (redis, redis_name): (&RedisServer, &str),
    prefix: &str,
    n: usize,
) -> Result<Latencies> {
    let mut client =
        RespClient::connect_in(place, to).with_context(|| format!("connect to {what} {to}"))?;
    let latencies = round_trips(&mut client, prefix, n)?;
    drop(client);
    let last = (n - 1) / 2;
    let stored = redis.cli(&["GET", &format!("{prefix}:{last}")]);
    ensure!(
        stored.trim() == format!("v{last}"),
        "{redis_name} has {:?} for {prefix}:{last}, not v{last}",
        stored.trim()
    );
    Ok(latencies)
}

fn redirector_to_ztunnel(
    bin: &Path,
    node: &Netns,
    certs: &Certs,
    pod_redis: &RedisServer,
    n: usize,
) -> Result<Outbound> {
    let proxy = SocketAddr::new(NODE_A.parse()?, PROXY_PORT);
    let latencies = round_trips_landing(
        &node.place(),
        proxy,
        "redirector's proxy",
        (pod_redis, "the pod's Redis"),
        "via-redirector",
        n,
    )?;
    // The same endpoint, expecting another identity: refused before any byte.
    let out = node
        .place()
        .command(bin)
        .args(["tunnel-check", "--hbone-certs", path_str(&certs.node)])
        .args(["--hbone-peer-identity", WRONG_IDENTITY])
        .args(["--send", "*1\\r\\n$4\\r\\nPING\\r\\n"])
        .arg(format!("{NODE_B}:{REDIS_PORT}"))
        .output()
        .context("cannot run redirector tunnel-check")?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "a tunnel expecting {WRONG_IDENTITY} was not refused: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    ensure!(
        said.contains(POD_IDENTITY),
        "a tunnel expecting {WRONG_IDENTITY} failed, but not for the pod's identity: {}",
        said.trim()
    );
    let refused = said
        .lines()
        .find(|l| l.contains(POD_IDENTITY))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Outbound { latencies, refused })
}

impl Outbound {
    fn verdict(&self, access: &Access, stopped_cleanly: bool) -> Verdict {
        let mut verdict = Verdict::pass(format!(
            "{} through redirector's proxy to {NODE_B}:{REDIS_PORT} over HBONE via ztunnel (pod identity {POD_IDENTITY} proven); \
             wrong identity refused ({}); ztunnel's access log: {} of redirector's streams complete, {} with an error",
            self.latencies, self.refused, access.inbound, access.inbound_errors
        ));
        if access.inbound == 0 {
            verdict.fail_because("ztunnel logged no inbound stream from redirector");
        }
        if access.inbound_errors > 0 {
            verdict.fail_because("ztunnel logged errors for redirector's streams");
        }
        if !stopped_cleanly {
            verdict.fail_because("redirector did not stop cleanly");
        }
        verdict
    }
}

/// What ztunnel → redirector measured before ztunnel's log is read.
struct Inbound {
    latencies: Latencies,
    /// What the pod's client saw of the refused tunnel.
    refused: String,
}

/// The pod's commands to the workload redirector fronts, through ztunnel;
/// then to the address redirector holds no workload certificate for.
fn ztunnel_to_redirector(pod: &Netns, fronted_redis: &RedisServer, n: usize) -> Result<Inbound> {
    let fronted = SocketAddr::new(FRONTED.into(), REDIS_PORT);
    let latencies = round_trips_landing(
        &pod.place(),
        fronted,
        "the fronted workload (through ztunnel)",
        (fronted_redis, "the fronted Redis"),
        "via-ztunnel",
        n,
    )?;
    // ztunnel accepts the pod's connect, then must refuse the tunnel: the
    // certificate on 10.77.0.8 is the node's, not session-redis's.
    let uncertified = SocketAddr::new(UNCERTIFIED.into(), REDIS_PORT);
    let refused = match RespClient::connect_in(&pod.place(), uncertified)
        .and_then(|mut c| c.call_str(&["PING"]))
    {
        Ok(reply) => {
            bail!("{uncertified}, fronted with the node's certificate, answered {reply:?}")
        }
        Err(e) => e.to_string(),
    };
    Ok(Inbound { latencies, refused })
}

impl Inbound {
    fn verdict(&self, access: &Access, metrics: &str) -> Verdict {
        let sample =
            |name: &str| testbed::http::sample(metrics, &format!("redirector_hbone_{name}"));
        let answered = sample("connect_responses_total{status=\"200\"}");
        let ends = sample("stream_ends_received_total{how=\"end_stream\"}");
        let resets = sample("stream_ends_received_total{how=\"reset\"}");
        let mut verdict = Verdict::pass(format!(
            "{} from the pod to {FRONTED}:{REDIS_PORT} through ztunnel to redirector, which presented {FRONTED_IDENTITY}; \
             {UNCERTIFIED} (node certificate only) refused by ztunnel ({}: {}); \
             ztunnel's access log: {} of its streams to redirector complete, {} with an error; \
             redirector's metrics: CONNECTs answered 200: {answered}, streams ztunnel ended (both directions) with END_STREAM: {ends}, with a reset: {resets}",
            self.latencies,
            self.refused,
            access.refusal.as_deref().unwrap_or("no reason logged"),
            access.outbound,
            access.outbound_errors
        ));
        if let Some(first) = access.tunnel_errors.first() {
            verdict.fail_because(&format!(
                "tunnel errors in ztunnel's log: {}, the first: {first}",
                access.tunnel_errors.len()
            ));
        }
        if resets > 0.0 {
            verdict.fail_because("ztunnel reset streams");
        }
        if access.outbound == 0 {
            verdict.fail_because("ztunnel logged no outbound stream to redirector");
        }
        if access.outbound_errors > 0 {
            verdict.fail_because("ztunnel logged errors for streams to redirector");
        }
        if access.refusal.is_none() {
            verdict.fail_because("ztunnel logged no refusal for the node certificate");
        }
        verdict
    }
}

/// ztunnel's log, read for the streams and tunnels of this run.
#[derive(Default)]
struct Access {
    /// Inbound streams (redirector → the pod) complete, and those with an error.
    inbound: usize,
    inbound_errors: usize,
    /// Outbound streams (the pod → redirector's fronted workload).
    outbound: usize,
    outbound_errors: usize,
    /// Errors of ztunnel's HTTP/2 connections to redirector (its client).
    tunnel_errors: Vec<String>,
    /// Why ztunnel refused the node certificate on `UNCERTIFIED`.
    refusal: Option<String>,
    /// Warnings and errors not explained by the refusal.
    unexpected: Vec<String>,
}

impl Access {
    /// Lines are tab-separated: time, level, target, message, fields.
    fn parse(log: &str, node_ip: IpAddr) -> Self {
        let mut access = Self::default();
        let uncertified = format!("dst.addr={UNCERTIFIED}:");
        for line in log.lines() {
            let mut columns = line.split('\t');
            let (Some(_), Some(level), Some(target)) =
                (columns.next(), columns.next(), columns.next())
            else {
                continue;
            };
            let bad = matches!(level, "warn" | "error");
            let complete = target == "access" && line.contains("\tconnection complete\t");
            if complete
                && line.contains("direction=\"inbound\"")
                && line.contains(&format!("src.addr={node_ip}:"))
            {
                access.inbound += 1;
                access.inbound_errors += usize::from(bad);
            } else if complete
                && line.contains("direction=\"outbound\"")
                && line.contains(&format!("dst.addr={FRONTED}:"))
            {
                access.outbound += 1;
                access.outbound_errors += usize::from(bad);
            } else if bad && line.contains(&uncertified) {
                access.refusal = access
                    .refusal
                    .or_else(|| field(line, "error").map(str::to_string));
            } else if bad && target.starts_with("proxy::h2::client") {
                access
                    .tunnel_errors
                    .push(columns.next().unwrap_or_default().trim().to_string());
            } else if bad {
                access.unexpected.push(line.to_string());
            }
        }
        access
    }
}

/// A `key="value"` (or `key=value`) field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split_whitespace().next()
    }
}

/// One direction's line: it passes when nothing failed it.
struct Verdict {
    what: String,
    why: Vec<String>,
}

impl Verdict {
    fn pass(what: String) -> Self {
        Self {
            what,
            why: Vec::new(),
        }
    }

    fn fail(why: String) -> Self {
        Self {
            what: String::new(),
            why: vec![why],
        }
    }

    fn fail_because(&mut self, why: &str) {
        self.why.push(why.to_string());
    }

    fn passed(&self) -> bool {
        self.why.is_empty()
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.passed() {
            write!(f, "PASS  {}", self.what)
        } else {
            write!(f, "FAIL  {}", self.why.join("; "))?;
            if !self.what.is_empty() {
                write!(f, " ({})", self.what)?;
            }
            Ok(())
        }
    }
}
