//! Added latency at a realistic rate, not only at saturation: a fixed-rate,
//! open-loop load generator (issue 14, item 4).
//!
//! redis-benchmark is closed-loop: each connection sends its next request
//! only when the previous reply is back, so a stall delays the requests
//! that would have been sent meanwhile and they are never measured
//! ("coordinated omission"). Here every request has an intended send time
//! fixed in advance: request `j` (over all connections) is due at
//! `origin + j / rate`, on connection `j % connections`, so sends are evenly
//! spaced and each connection sends every `connections / rate` seconds.
//! A connection sends whatever is due when it wakes, pipelined when late,
//! without waiting for replies, and latency is measured from the INTENDED
//! send time: a connection that falls behind records its full delay, the
//! generator's own lateness included (the same for both targets).
//!
//! Timing: two threads, each running an epoll loop over its connections
//! with a `timerfd` armed for the next due send. The timerfd has nanosecond
//! resolution and no timer slack, unlike tokio's 1 ms timer wheel or a
//! millisecond `epoll_wait` timeout, which would add up to 1 ms to every
//! sample. Latencies go into one HDR histogram per connection (nanoseconds,
//! 3 significant digits), merged per target.
//!
//! The floor ([`relay`]): the same slices through a relay that only copies
//! bytes tell what any hop adds on this machine, and so what share of the
//! proxy's added latency is its own.
//!
//! Targets alternate in slices (direct, proxy, relay, direct, ...): the
//! measured time per target is split over as many slices as rounds, at
//! least [`MIN_SLICES`], and each slice opens fresh connections and discards
//! its first [`WARMUP`]. The added latency is taken per pair of adjacent
//! slices (proxy minus direct, per percentile), and the median over pairs
//! is held against the targets: like the medians of rounds elsewhere in the
//! bench, it keeps one stall of this shared machine from deciding the
//! figure. The percentiles of all slices merged are printed as well.

use std::{
    collections::VecDeque,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hdrhistogram::Histogram;
use nix::{
    errno::Errno,
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    },
};
use testbed::{
    cluster::{RedisCluster, slot_of},
    process::Place,
};

use super::relay;

/// The load: `rate` requests/s spread evenly over `connections`, for
/// `seconds` of measurement per target (split over the slices).
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub rate: u32,
    pub connections: usize,
    pub seconds: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            rate: 20_000,
            connections: 50,
            seconds: 10.0,
        }
    }
}

/// Added latency targets (proxy minus direct), p50 and p99, microseconds.
const TARGET_P50_US: f64 = 40.0;
const TARGET_P99_US: f64 = 150.0;
/// Threads driving the connections (round-robin): two, for two cores.
const THREADS: usize = 2;
/// Discarded at the start of every slice (connections just opened).
const WARMUP: Duration = Duration::from_millis(250);
/// Slices per target, at the least (more when `--rounds` asks for more).
const MIN_SLICES: usize = 5;
/// The percentiles reported.
const QUANTILES: [f64; 3] = [50.0, 99.0, 99.9];
/// How long replies may take after the last send before they count as lost.
const DRAIN: Duration = Duration::from_secs(2);
/// Keys as redis-benchmark's `-r 100000` makes them: `key:` + 12 digits.
const KEYS: u64 = 100_000;
const KEY_LEN: usize = 16;
type Key = [u8; KEY_LEN];
/// The `-d 32` value.
const VALUE: &[u8; 32] = b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// Histogram range: 1 ns to 60 s, 3 significant digits.
const HIST_MAX_NS: u64 = 60_000_000_000;
/// The relay floor's first listening port (one per master).
const RELAY_FIRST_PORT: u16 = 7390;
/// The epoll token of the timerfd; connections use their index.
const TIMER_TOKEN: u64 = u64::MAX;

/// What one target gave over all its slices.
struct Outcome {
    hist: Histogram<u64>,
    /// How late the generator sent (actual minus intended send time).
    lag: Histogram<u64>,
    /// Replies to measured (not warm-up) requests.
    completed: u64,
    /// Sum over slices of the time from the end of warm-up to the last reply.
    window: Duration,
    /// Requests whose reply never came within [`DRAIN`]; recorded in the
    /// histogram with the delay they had reached.
    lost: u64,
    /// [`QUANTILES`] of each slice, microseconds.
    slices: Vec<[f64; 3]>,
    /// The whole machine's CPU over this target's slices (`/proc/stat`):
    /// busy and total clock ticks, over every core.
    machine: (u64, u64),
    /// This load generator's own CPU over them, clock ticks.
    generator: u64,
    /// Requests sent in them.
    sent: u64,
}

impl Outcome {
    fn new() -> Result<Self> {
        Ok(Self {
            hist: histogram()?,
            lag: histogram()?,
            completed: 0,
            window: Duration::ZERO,
            lost: 0,
            slices: Vec::new(),
            machine: (0, 0),
            generator: 0,
            sent: 0,
        })
    }

    /// Runs a slice and adds it, with the CPU it took.
    fn measure(&mut self, run: impl FnOnce() -> Result<Slice>) -> Result<()> {
        let (machine, generator) = (machine_ticks(), user_sys_ticks(std::process::id()));
        let slice = run()?;
        let (machine_after, generator_after) =
            (machine_ticks(), user_sys_ticks(std::process::id()));
        self.machine.0 += machine_after.0.saturating_sub(machine.0);
        self.machine.1 += machine_after.1.saturating_sub(machine.1);
        self.generator +=
            (generator_after.0 + generator_after.1).saturating_sub(generator.0 + generator.1);
        self.sent += slice.sent;
        self.add(slice)
    }

    /// Percent of the machine's CPU (all cores) busy during the slices.
    fn machine_busy(&self) -> f64 {
        100.0 * self.machine.0 as f64 / self.machine.1.max(1) as f64
    }

    /// The generator's CPU per request sent, microseconds (10 ms ticks).
    fn generator_us(&self) -> f64 {
        self.generator as f64 * 10_000.0 / self.sent.max(1) as f64
    }

    fn add(&mut self, slice: Slice) -> Result<()> {
        self.slices.push(QUANTILES.map(|q| us(&slice.hist, q)));
        self.hist.add(&slice.hist)?;
        self.lag.add(&slice.lag)?;
        self.completed += slice.completed;
        self.window += slice.window;
        self.lost += slice.lost;
        Ok(())
    }

    fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

pub struct Report {
    params: Params,
    slices: usize,
    direct: Outcome,
    proxy: Outcome,
    /// Through each [`relay`] model: what a hop costs here whoever makes it.
    floors: Vec<(relay::Model, Outcome)>,
    /// Proxy CPU at this rate, user and system, seconds per request.
    proxy_cpu: (f64, f64),
}

/// Measures direct and through the proxy at `proxy` (PID `proxy_pid`),
/// alternating, in `rounds` slices each (at least [`MIN_SLICES`]).
///
/// Direct connections: each talks to ONE master, and its keys are drawn
/// from the keys (of the 100k) whose slots that master owns; connection `i`
/// gets master `i % masters`. So no request is redirected (no MOVED), every
/// direct connection is one socket, as through the proxy, and no
/// client-side routing enters the direct figure. Proxy connection `i` draws
/// from the same keys as direct connection `i`, so the same requests reach
/// the same Redis node either way and the only difference is the hop
/// through the proxy.
pub fn measure(
    place: &Place,
    cluster: &RedisCluster,
    proxy: SocketAddr,
    proxy_pid: u32,
    params: Params,
    rounds: usize,
) -> Result<Report> {
    ensure!(
        params.rate > 0 && params.connections > 0 && params.seconds > 0.0,
        "latency bench: rate, connections and seconds must be positive"
    );
    let started = Instant::now();
    let masters = keyspace(cluster)?;
    eprintln!("latency: writing {KEYS} keys of {} bytes", VALUE.len());
    for (addr, keys) in &masters {
        prefill(place, *addr, keys)?;
    }
    // Each relay model listens once per master, for the same connections'
    // keys.
    let mut relays = Vec::new();
    for (n, model) in [
        relay::Model::Threads,
        relay::Model::EventLoop,
        relay::Model::Epoll,
    ]
    .into_iter()
    .enumerate()
    {
        let listeners: Vec<(SocketAddr, SocketAddr)> = masters
            .iter()
            .enumerate()
            .map(|(i, (addr, _))| {
                let port = RELAY_FIRST_PORT + u16::try_from(n * 10 + i).unwrap_or(0);
                (SocketAddr::from(([127, 0, 0, 1], port)), *addr)
            })
            .collect();
        let child = relay::start(place, model, &listeners)?;
        relays.push((model, listeners, child, Outcome::new()?));
    }
    let (mut direct, mut proxied) = (Outcome::new()?, Outcome::new()?);
    let mut ticks = (0, 0);
    let slices = rounds.max(MIN_SLICES);
    for slice in 1..=slices {
        eprintln!(
            "slice {slice}/{slices}: latency at {} req/s direct",
            params.rate
        );
        let targets = (0..params.connections)
            .map(|i| masters[i % masters.len()].clone())
            .collect();
        direct.measure(|| run_slice(place, targets, params, slices))?;

        eprintln!(
            "slice {slice}/{slices}: latency at {} req/s proxy",
            params.rate
        );
        let targets = (0..params.connections)
            .map(|i| (proxy, masters[i % masters.len()].1.clone()))
            .collect();
        let before = user_sys_ticks(proxy_pid);
        proxied.measure(|| run_slice(place, targets, params, slices))?;
        let after = user_sys_ticks(proxy_pid);
        ticks.0 += after.0.saturating_sub(before.0);
        ticks.1 += after.1.saturating_sub(before.1);

        for (model, listeners, _, outcome) in &mut relays {
            eprintln!(
                "slice {slice}/{slices}: latency at {} req/s through a relay that only copies bytes ({model:?})",
                params.rate
            );
            let targets = (0..params.connections)
                .map(|i| {
                    let m = i % masters.len();
                    (listeners[m].0, masters[m].1.clone())
                })
                .collect();
            outcome.measure(|| run_slice(place, targets, params, slices))?;
        }
    }
    eprintln!(
        "latency: measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let proxy_requests = proxied.sent.max(1) as f64;
    Ok(Report {
        params,
        slices,
        direct,
        proxy: proxied,
        floors: relays
            .into_iter()
            .map(|(model, _, _, outcome)| (model, outcome))
            .collect(),
        // Clock ticks are 10 ms.
        proxy_cpu: (
            ticks.0 as f64 * 0.01 / proxy_requests,
            ticks.1 as f64 * 0.01 / proxy_requests,
        ),
    })
}

impl Report {
    /// Every measured target with its row name: direct, proxy, the relays.
    fn targets(&self) -> impl Iterator<Item = (&'static str, &Outcome)> {
        [("direct", &self.direct), ("proxy", &self.proxy)]
            .into_iter()
            .chain(self.floors.iter().map(|(model, o)| (relay_name(*model), o)))
    }
}

pub fn print(report: &Report) {
    let Params {
        rate,
        connections,
        seconds,
    } = report.params;
    println!();
    println!(
        "Latency at a fixed rate, open loop (coordinated omission corrected: from each request's intended send time): {rate} req/s over {connections} connections, {seconds} s per target in {} alternating slices (+{} ms warm-up each), SET/GET 1:1, -d 32, {KEYS} keys, each connection's keys from one master's slots; rows: all slices merged",
        report.slices,
        WARMUP.as_millis()
    );
    println!(
        "{:<8} {:>14} {:>10} {:>10} {:>10} {:>10} {:>6}  send lag p50/p99 us",
        "target", "achieved rps", "p50 us", "p99 us", "p99.9 us", "max us", "lost",
    );
    for (name, o) in report.targets() {
        println!(
            "{name:<8} {:>14.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>6}  {:.1}/{:.1}",
            o.rate(),
            us(&o.hist, 50.0),
            us(&o.hist, 99.0),
            us(&o.hist, 99.9),
            o.hist.max() as f64 / 1000.0,
            o.lost,
            us(&o.lag, 50.0),
            us(&o.lag, 99.0)
        );
    }
    // Per pair of adjacent slices, proxy minus direct, per percentile.
    let pairs = slice_pairs(&report.direct, &report.proxy);
    let added = medians(&pairs);
    let verdict = |value: f64, target: f64| if value <= target { "ok" } else { "MISSED" };
    println!(
        "added latency (proxy - direct), median of {} slice pairs: p50 {:.1} us (target <= {TARGET_P50_US} us): {}, p99 {:.1} us (target <= {TARGET_P99_US} us): {}, p99.9 {:.1} us",
        pairs.len(),
        added[0],
        verdict(added[0], TARGET_P50_US),
        added[1],
        verdict(added[1], TARGET_P99_US),
        added[2]
    );
    let merged = QUANTILES.map(|q| us(&report.proxy.hist, q) - us(&report.direct.hist, q));
    println!(
        "added latency, all slices merged: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
        merged[0], merged[1], merged[2]
    );
    let per_pair: Vec<String> = pairs
        .iter()
        .map(|a| format!("{:.0}/{:.0}/{:.0}", a[0], a[1], a[2]))
        .collect();
    println!(
        "added p50/p99/p99.9 per slice pair, us: {}",
        per_pair.join(", ")
    );
    // The floor: what a hop that only copies bytes adds (the cheaper relay,
    // per percentile), and what the proxy adds beyond it.
    let mut floor = [f64::INFINITY; 3];
    for (model, o) in &report.floors {
        let hop = medians(&slice_pairs(&report.direct, o));
        let beyond = medians(&slice_pairs(o, &report.proxy));
        println!(
            "added by a relay that only copies bytes ({}), median of slice pairs: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us; the proxy beyond it: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            relay_about(*model),
            hop[0],
            hop[1],
            hop[2],
            beyond[0],
            beyond[1],
            beyond[2]
        );
        for i in 0..3 {
            floor[i] = floor[i].min(hop[i]);
        }
    }
    for (name, value, target) in [
        ("p50", floor[0], TARGET_P50_US),
        ("p99", floor[1], TARGET_P99_US),
    ] {
        if value > target {
            println!(
                "the added {name} target ({target} us) is below what the cheaper relay, which only copies bytes, adds on this machine ({value:.1} us): out of reach for a userspace hop here"
            );
        }
    }
    for (name, o) in report.targets() {
        if o.rate() < 0.95 * f64::from(rate) || o.lost > 0 {
            println!(
                "warning: {name} did not keep up with {rate} req/s ({:.0} achieved, {} lost): its latencies include the backlog",
                o.rate(),
                o.lost
            );
        }
    }
    let (user, sys) = report.proxy_cpu;
    println!(
        "proxy CPU at {rate} req/s: {:.3} s per 100k requests (user {:.2} us + sys {:.2} us per request)",
        (user + sys) * 100_000.0,
        user * 1e6,
        sys * 1e6
    );
    // Latency at a rate is queueing as much as work: on a small machine the
    // proxy's CPU may be what fills it (README, "latency at a fixed rate").
    println!(
        "machine CPU busy (all cores, every process) during the slices: direct {:.0}%, proxy {:.0}%; the load generator's own CPU per request: direct {:.1} us, proxy {:.1} us",
        report.direct.machine_busy(),
        report.proxy.machine_busy(),
        report.direct.generator_us(),
        report.proxy.generator_us()
    );
}

/// A relay model's row name.
fn relay_name(model: relay::Model) -> &'static str {
    match model {
        relay::Model::Threads => "relay-t",
        relay::Model::EventLoop => "relay-e",
        relay::Model::Epoll => "relay-p",
        relay::Model::Responder => "responder",
        relay::Model::SlotRouter => "router",
    }
}

fn relay_about(model: relay::Model) -> &'static str {
    match model {
        relay::Model::Threads => "relay-t: a thread per direction, blocking reads",
        relay::Model::EventLoop => {
            "relay-e: one tokio current-thread event loop, copy_bidirectional"
        }
        relay::Model::Epoll => "relay-p: one plain epoll loop, no runtime",
        relay::Model::Responder => "responder: answers itself, no upstream",
        relay::Model::SlotRouter => "router: routes by slot on one plain epoll loop",
    }
}

/// Per pair of adjacent slices, `later` minus `base`, per percentile.
fn slice_pairs(base: &Outcome, later: &Outcome) -> Vec<[f64; 3]> {
    base.slices
        .iter()
        .zip(&later.slices)
        .map(|(b, l)| [0, 1, 2].map(|i| l[i] - b[i]))
        .collect()
}

/// The median over pairs, per percentile.
fn medians(pairs: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|i| median(pairs.iter().map(|pair| pair[i]).collect()))
}

/// The machine's busy and total CPU clock ticks over every core: the
/// first line of `/proc/stat` (idle and iowait are not busy).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// utime and stime of a process, in clock ticks (`/proc/<pid>/stat`).
fn user_sys_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces; fields are counted after ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let field = |i: usize| {
        after
            .split_whitespace()
            .nth(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    (field(11), field(12))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Value at `quantile` percent, microseconds.
fn us(hist: &Histogram<u64>, quantile: f64) -> f64 {
    hist.value_at_quantile(quantile / 100.0) as f64 / 1000.0
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, HIST_MAX_NS, 3)?)
}

/// The masters and, for each, the keys (of the 100k) in the slots it owns.
fn keyspace(cluster: &RedisCluster) -> Result<Vec<(SocketAddr, Arc<[Key]>)>> {
    let mut masters: Vec<_> = cluster
        .view()
        .into_iter()
        .filter(|n| n.is_master() && !n.is_failing() && n.slot_count() > 0)
        .collect();
    masters.sort_by_key(|n| n.addr);
    let mut owner = vec![usize::MAX; 16_384];
    for (m, node) in masters.iter().enumerate() {
        for &(first, last) in &node.slots {
            owner[usize::from(first)..=usize::from(last)].fill(m);
        }
    }
    let mut keys = vec![Vec::new(); masters.len()];
    for n in 0..KEYS {
        let key: Key = format!("key:{n:012}")
            .into_bytes()
            .try_into()
            .map_err(|_| anyhow::anyhow!("key length"))?;
        let slot = slot_of(&key);
        let m = owner[usize::from(slot)];
        ensure!(m != usize::MAX, "no master owns slot {slot}");
        keys[m].push(key);
    }
    Ok(masters
        .iter()
        .zip(keys)
        .map(|(node, keys)| (node.addr, keys.into()))
        .collect())
}

/// SETs every key of `keys` on `master`, pipelined, so GETs hit values.
fn prefill(place: &Place, master: SocketAddr, keys: &[Key]) -> Result<()> {
    let mut stream = place
        .connect(master, Duration::from_secs(5))
        .with_context(|| format!("connect {master}"))?;
    let mut input = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    for batch in keys.chunks(1000) {
        let mut out = Vec::with_capacity(batch.len() * 64);
        for key in batch {
            encode(&mut out, true, key);
        }
        stream.write_all(&out)?;
        let mut replies = 0;
        while replies < batch.len() {
            let n = stream.read(&mut buf)?;
            ensure!(n > 0, "{master} closed the connection");
            input.extend_from_slice(&buf[..n]);
            let mut pos = 0;
            while let Some((len, error)) = reply_len(&input[pos..])? {
                ensure!(
                    !error,
                    "prefill on {master}: {}",
                    String::from_utf8_lossy(&input[pos..pos + len])
                );
                pos += len;
                replies += 1;
            }
            input.drain(..pos);
        }
    }
    Ok(())
}

/// `SET key VALUE` or `GET key`, in RESP.
fn encode(out: &mut Vec<u8>, set: bool, key: &Key) {
    if set {
        out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$16\r\n");
    } else {
        out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$16\r\n");
    }
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n");
    if set {
        out.extend_from_slice(b"$32\r\n");
        out.extend_from_slice(VALUE);
        out.extend_from_slice(b"\r\n");
    }
}

/// The length of the complete reply at the start of `buf` and whether it is
/// an error; `None` while incomplete. Only what SET and GET answer: simple
/// strings, errors, integers and bulk strings.
fn reply_len(buf: &[u8]) -> Result<Option<(usize, bool)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = end + 2;
    match buf[0] {
        b'+' | b':' => Ok(Some((line, false))),
        b'-' => Ok(Some((line, true))),
        b'$' => {
            let len: i64 = std::str::from_utf8(&buf[1..end])?.parse()?;
            if len < 0 {
                return Ok(Some((line, false)));
            }
            let total = line + usize::try_from(len)? + 2;
            Ok((buf.len() >= total).then_some((total, false)))
        }
        other => bail!("unexpected reply type {:?}", char::from(other)),
    }
}

/// The schedule of one slice.
#[derive(Clone, Copy)]
struct Plan {
    rate: u64,
    connections: u64,
    /// Requests per connection, warm-up included.
    per_conn: u64,
    /// The first `warmup` requests of each connection are not recorded.
    warmup: u64,
}

impl Plan {
    /// When request `k` of connection `conn` is due.
    fn due(&self, origin: Instant, conn: u64, k: u64) -> Instant {
        let j = k * self.connections + conn;
        origin + Duration::from_nanos(j * 1_000_000_000 / self.rate)
    }
}

/// One slice's figures.
struct Slice {
    hist: Histogram<u64>,
    lag: Histogram<u64>,
    completed: u64,
    window: Duration,
    lost: u64,
    /// Requests sent, warm-up included.
    sent: u64,
}

/// One connection of the generator.
struct Conn {
    stream: TcpStream,
    /// Index among all connections of the slice.
    index: u64,
    keys: Arc<[Key]>,
    rng: u64,
    /// Next request to send.
    next: u64,
    out: Vec<u8>,
    written: usize,
    /// Whether EPOLLOUT is registered (only while `out` is not all written).
    want_write: bool,
    /// Intended send times of the requests awaiting replies, and whether
    /// each is recorded (not warm-up).
    inflight: VecDeque<(Instant, bool)>,
    input: Vec<u8>,
    hist: Histogram<u64>,
    lag: Histogram<u64>,
    completed: u64,
    last_reply: Option<Instant>,
}

impl Conn {
    fn queue(&mut self, due: Instant, recorded: bool, now: Instant) {
        if recorded {
            self.lag.saturating_record(nanos(now - due));
        }
        // xorshift64*: a key drawn uniformly from this connection's keys.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        let key = self.keys[usize::try_from(r).unwrap_or(0) % self.keys.len()];
        encode(&mut self.out, self.next.is_multiple_of(2), &key);
        self.inflight.push_back((due, recorded));
        self.next += 1;
    }

    /// Writes what it can without blocking.
    fn flush(&mut self) -> Result<()> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("write"),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    /// Reads what has arrived and records every complete reply.
    fn receive(&mut self, buf: &mut [u8]) -> Result<()> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => bail!("the server closed connection {}", self.index),
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    // Drained (epoll is level-triggered, so anything that
                    // arrives later wakes us again): saves the read that
                    // would only say EAGAIN.
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("read"),
            }
        }
        let now = Instant::now();
        let mut pos = 0;
        while let Some((len, error)) = reply_len(&self.input[pos..])? {
            ensure!(
                !error,
                "error reply: {}",
                String::from_utf8_lossy(&self.input[pos..pos + len]).trim_end()
            );
            pos += len;
            let (due, recorded) = self.inflight.pop_front().context("a reply to no request")?;
            if recorded {
                self.hist.saturating_record(nanos(now - due));
                self.completed += 1;
            }
            self.last_reply = Some(now);
        }
        self.input.drain(..pos);
        Ok(())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Runs one slice: connection `i` to `targets[i].0`, drawing keys from
/// `targets[i].1`.
fn run_slice(
    place: &Place,
    targets: Vec<(SocketAddr, Arc<[Key]>)>,
    params: Params,
    slices: usize,
) -> Result<Slice> {
    let connections = u64::try_from(targets.len())?;
    let rate = u64::from(params.rate);
    let per_conn_rate = f64::from(params.rate) / connections as f64;
    let measured = params.seconds / slices as f64;
    let warmup = (WARMUP.as_secs_f64() * per_conn_rate).round() as u64;
    let plan = Plan {
        rate,
        connections,
        warmup,
        per_conn: warmup + (measured * per_conn_rate).round().max(1.0) as u64,
    };
    let mut groups: Vec<Vec<Conn>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, (addr, keys)) in targets.into_iter().enumerate() {
        let stream = place
            .connect(addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let index = u64::try_from(i)?;
        groups[i % THREADS].push(Conn {
            stream,
            index,
            keys,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (index + 1),
            next: 0,
            out: Vec::with_capacity(4096),
            written: 0,
            want_write: false,
            inflight: VecDeque::new(),
            input: Vec::with_capacity(4096),
            hist: histogram()?,
            lag: histogram()?,
            completed: 0,
            last_reply: None,
        });
    }
    groups.retain(|g| !g.is_empty());
    let barrier = Barrier::new(groups.len());
    let origin = OnceLock::new();
    let done: Vec<Result<(Vec<Conn>, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|conns| scope.spawn(|| drive(conns, plan, &barrier, &origin)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
            })
            .collect()
    });
    let origin = *origin.get().context("no load thread started")?;
    let measure_from = plan.due(origin, 0, plan.warmup);
    let mut slice = Slice {
        hist: histogram()?,
        lag: histogram()?,
        completed: 0,
        window: Duration::ZERO,
        lost: 0,
        sent: plan.per_conn * plan.connections,
    };
    let mut last = measure_from;
    for result in done {
        let (conns, lost) = result?;
        slice.lost += lost;
        for conn in conns {
            slice.hist.add(&conn.hist)?;
            slice.lag.add(&conn.lag)?;
            slice.completed += conn.completed;
            last = last.max(conn.last_reply.unwrap_or(last));
        }
    }
    slice.window = last - measure_from;
    Ok(slice)
}

/// One load thread: sends on schedule, reads replies, until every reply is
/// in or [`DRAIN`] after the last send. Returns its connections (with
/// their histograms) and how many replies never came.
fn drive(
    mut conns: Vec<Conn>,
    plan: Plan,
    barrier: &Barrier,
    origin: &OnceLock<Instant>,
) -> Result<(Vec<Conn>, u64)> {
    let setup = || -> Result<(Epoll, TimerFd)> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN))?;
        for (token, conn) in (0u64..).zip(&conns) {
            epoll.add(&conn.stream, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        }
        Ok((epoll, timer))
    };
    let setup = setup();
    // Past the barrier even on failure, so no other thread waits forever.
    barrier.wait();
    let (epoll, timer) = setup?;
    // One origin for all threads, a little ahead so none starts late.
    let origin = *origin.get_or_init(|| Instant::now() + Duration::from_millis(20));
    let last_due = conns
        .iter()
        .map(|c| plan.due(origin, c.index, plan.per_conn - 1))
        .max()
        .unwrap_or(origin);
    let deadline = last_due + DRAIN;
    let mut events = [EpollEvent::empty(); 64];
    let mut buf = vec![0; 64 * 1024];
    // When the timerfd is armed to fire (None once it has fired): it is
    // re-armed only when the next wake-up changes.
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut wake = deadline;
        let mut idle = true;
        for (token, conn) in (0u64..).zip(conns.iter_mut()) {
            while conn.next < plan.per_conn {
                let due = plan.due(origin, conn.index, conn.next);
                if due > now {
                    wake = wake.min(due);
                    break;
                }
                conn.queue(due, conn.next >= plan.warmup, now);
            }
            if !conn.out.is_empty() {
                conn.flush()?;
            }
            let want_write = !conn.out.is_empty();
            if want_write != conn.want_write {
                let mut flags = EpollFlags::EPOLLIN;
                if want_write {
                    flags |= EpollFlags::EPOLLOUT;
                }
                epoll.modify(&conn.stream, &mut EpollEvent::new(flags, token))?;
                conn.want_write = want_write;
            }
            idle &= conn.next == plan.per_conn && conn.inflight.is_empty();
        }
        if idle || now >= deadline {
            break;
        }
        if armed != Some(wake) {
            // Re-arming also clears an expiry not yet read.
            let wait = TimeSpec::from_duration((wake - now).max(Duration::from_nanos(1)));
            timer.set(Expiration::OneShot(wait), TimerSetTimeFlags::empty())?;
            armed = Some(wake);
        }
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        for event in &events[..ready] {
            if event.data() == TIMER_TOKEN {
                armed = None;
                continue;
            }
            let Some(conn) = usize::try_from(event.data())
                .ok()
                .and_then(|token| conns.get_mut(token))
            else {
                continue;
            };
            if event.events().contains(EpollFlags::EPOLLOUT) {
                conn.flush()?;
            }
            conn.receive(&mut buf)?;
        }
    }
    // Replies that never came count with the delay they had reached.
    let now = Instant::now();
    let mut lost = 0;
    for conn in &mut conns {
        for (due, recorded) in conn.inflight.drain(..) {
            lost += 1;
            if recorded {
                conn.hist.saturating_record(nanos(now - due));
            }
        }
    }
    Ok((conns, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_framed() {
        assert_eq!(reply_len(b"+OK\r\n").unwrap(), Some((5, false)));
        assert_eq!(reply_len(b"+OK\r").unwrap(), None);
        assert_eq!(reply_len(b"$-1\r\n+OK").unwrap(), Some((5, false)));
        assert_eq!(reply_len(b"$3\r\nabc\r\n").unwrap(), Some((9, false)));
        assert_eq!(reply_len(b"$3\r\nabc\r").unwrap(), None);
        assert_eq!(reply_len(b"-MOVED 1 x\r\n").unwrap(), Some((12, true)));
        assert!(reply_len(b"*1\r\n").is_err());
    }

    #[test]
    fn requests_are_resp() {
        let mut out = Vec::new();
        encode(&mut out, false, b"key:000000000042");
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000000042\r\n");
    }

    #[test]
    fn the_machine_is_read_busy_part_of_the_time() {
        let (busy, total) = machine_ticks();
        assert!(total > 0, "no CPU ticks read from /proc/stat");
        assert!(busy <= total);
    }

    #[test]
    fn schedule_is_evenly_spaced() {
        let plan = Plan {
            rate: 20_000,
            connections: 50,
            per_conn: 10,
            warmup: 1,
        };
        let origin = Instant::now();
        // 50 us apart overall; 2.5 ms apart on one connection.
        assert_eq!(plan.due(origin, 1, 0) - origin, Duration::from_micros(50));
        assert_eq!(
            plan.due(origin, 3, 1) - plan.due(origin, 3, 0),
            Duration::from_micros(2500)
        );
    }
}
