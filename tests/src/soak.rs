//! The chaos soak's pure parts: the fault schedule, the write ledger and
//! the report. No sockets here; `tests/tests/soak.rs` drives the real
//! cluster and proxy and feeds these.
//!
//! Every acknowledged write carries a unique value `<key>=<seq>`, `seq`
//! growing per key (each key has one writer), so a read-back value tells
//! whether the last acknowledged write survived, a later unacknowledged
//! attempt landed (fine), or something older or foreign is there (lost or
//! wrong).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde::Serialize;

/// One kind of fault the soak injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A slot range moved between masters (`redis-cli --cluster reshard`).
    Migration,
    /// `CLUSTER FAILOVER` on a replica.
    ManualFailover,
    /// SIGKILL of a master; it comes back as a replica.
    MasterKill,
    /// SIGKILL of redirector, then a new one on the same address.
    ProxyRestart,
    /// A node's veth set down for 3 s.
    LinkDown,
    /// SIGKILL of the redirector serving a master's node's HBONE listener
    /// (the proxy's tunnel to it resets), then a new one on the same
    /// address.
    HbonePeerRestart,
}

impl FaultKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Migration => "migration",
            Self::ManualFailover => "manual-failover",
            Self::MasterKill => "master-kill",
            Self::ProxyRestart => "proxy-restart",
            Self::LinkDown => "link-down",
            Self::HbonePeerRestart => "hbone-peer-restart",
        }
    }

    /// Graceful faults must lose no acknowledged write. A crashed or cut-off
    /// master can: Redis replicates asynchronously. A killed HBONE peer is
    /// graceful although it is a SIGKILL: every Redis keeps running, so a
    /// write whose reply came back through the tunnel was applied and
    /// stays; the reset only fails writes in flight, which nobody saw
    /// acknowledged.
    pub fn graceful(self) -> bool {
        !matches!(self, Self::MasterKill | Self::LinkDown)
    }
}

/// A fault and when, from the start of the load, it should begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub kind: FaultKind,
    /// Its number among the faults of its kind, from 1: the window's name.
    pub n: usize,
    /// Lands inside the main-lane fault planned for the same time: waits
    /// for that one to start, then [`OVERLAP_DELAY`].
    pub inside: bool,
}

/// Which thread runs a planned fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// One fault after another, each leaving a healthy cluster (and every
    /// process up) for the next.
    Main,
    /// Faults of one kind landing inside main-lane faults.
    Overlay(FaultKind),
}

impl Planned {
    /// `migration#1`.
    pub fn name(&self) -> String {
        format!("{}#{}", self.kind.label(), self.n)
    }

    pub fn lane(&self) -> Lane {
        if self.inside {
            Lane::Overlay(self.kind)
        } else {
            Lane::Main
        }
    }
}

/// Where in a cycle each fault starts, in thousandths of the cycle, and
/// whether it lands inside the main-lane fault of the same start. The last
/// one starts before 3/4 so the load sees the cluster settle.
///
/// - a proxy restart inside a migration;
/// - the HBONE peer in front of the replica taking over restarted inside
///   a manual failover;
/// - an HBONE peer restart alone, for figures of its own;
/// - a master killed;
/// - another master's link down and a proxy restart, both inside a
///   second manual failover;
/// - a master's link down alone.
///
/// A link never goes down inside a migration: `redis-cli --cluster
/// reshard` sends `SETSLOT NODE` to the masters it knew at its start, and
/// one cut off and failed over meanwhile refuses it as a replica, which
/// can fail the reshard (the harness, not the proxy).
const CYCLE: [(u32, FaultKind, bool); 10] = [
    (100, FaultKind::Migration, false),
    (100, FaultKind::ProxyRestart, true),
    (250, FaultKind::ManualFailover, false),
    (250, FaultKind::HbonePeerRestart, true),
    (370, FaultKind::HbonePeerRestart, false),
    (480, FaultKind::MasterKill, false),
    (600, FaultKind::ManualFailover, false),
    (600, FaultKind::LinkDown, true),
    (600, FaultKind::ProxyRestart, true),
    (730, FaultKind::LinkDown, false),
];

/// How long after the main-lane fault it shares a start with an overlay
/// fault begins: a manual failover takes about a second, a migration
/// longer.
pub const OVERLAP_DELAY: Duration = Duration::from_millis(300);

/// One cycle of faults every two minutes of load (at least one cycle).
pub const CYCLE_LENGTH: Duration = Duration::from_secs(120);

/// The faults for a soak of `total` load, in start order (main-lane
/// first among those of the same start).
pub fn schedule(total: Duration) -> Vec<Planned> {
    let cycles = u32::try_from(total.as_secs() / CYCLE_LENGTH.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let cycle = total / cycles;
    let mut seen: HashMap<FaultKind, usize> = HashMap::new();
    (0..cycles)
        .flat_map(|c| {
            CYCLE.iter().map(move |&(permille, kind, inside)| {
                (cycle * c + cycle * permille / 1000, kind, inside)
            })
        })
        .map(|(at, kind, inside)| {
            let n = seen.entry(kind).or_insert(0);
            *n += 1;
            Planned {
                at,
                kind,
                n: *n,
                inside,
            }
        })
        .collect()
}

/// The plan of one lane, in start order.
pub fn lane(plan: &[Planned], lane: Lane) -> Vec<Planned> {
    plan.iter().copied().filter(|p| p.lane() == lane).collect()
}

/// Every lane the plan uses, the main lane first.
pub fn lanes(plan: &[Planned]) -> Vec<Lane> {
    let mut lanes: Vec<Lane> = plan.iter().map(Planned::lane).collect();
    lanes.sort_unstable();
    lanes.dedup();
    lanes
}

/// `Err` unless every overlay fault shares its start with exactly one
/// main-lane fault (the one it lands inside), and no lane has two faults
/// planned at once.
pub fn check_schedule(plan: &[Planned]) -> Result<(), String> {
    for l in lanes(plan) {
        let mine = lane(plan, l);
        if let Some(w) = mine.windows(2).find(|w| w[0].at >= w[1].at) {
            return Err(format!(
                "{} and {} at once on {l:?}",
                w[0].name(),
                w[1].name()
            ));
        }
    }
    for p in plan.iter().filter(|p| p.inside) {
        let hosts = plan.iter().filter(|m| !m.inside && m.at == p.at).count();
        if hosts != 1 {
            return Err(format!(
                "{} lands inside {hosts} main-lane faults",
                p.name()
            ));
        }
    }
    Ok(())
}

/// The main-lane fault an overlay fault lands inside.
pub fn host_of(plan: &[Planned], overlay: &Planned) -> Option<Planned> {
    plan.iter()
        .find(|m| !m.inside && overlay.inside && m.at == overlay.at)
        .copied()
}

/// A fault as it happened: from when it began to when the cluster (or the
/// proxy) was whole again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    pub kind: FaultKind,
    /// `kind` and a sequence number, e.g. `master-kill#1`.
    pub name: String,
    #[serde(serialize_with = "ms")]
    pub start: Duration,
    #[serde(serialize_with = "ms")]
    pub end: Duration,
    /// What was hit, e.g. the killed node.
    pub detail: String,
}

/// A window reaches this far either side of its fault: an acknowledged
/// write still replicating when a master dies belongs to the kill, and
/// clients notice a restart a little after it is over.
pub const WINDOW_MARGIN: Duration = Duration::from_secs(1);

impl Window {
    pub fn contains(&self, at: Duration) -> bool {
        self.start.saturating_sub(WINDOW_MARGIN) <= at && at <= self.end + WINDOW_MARGIN
    }
}

/// The windows containing `at`, by name.
pub fn windows_at(windows: &[Window], at: Duration) -> Vec<&Window> {
    windows.iter().filter(|w| w.contains(at)).collect()
}

/// The value written as the `seq`th write of `key`.
pub fn value(key: &str, seq: u64) -> String {
    format!("{key}={seq}")
}

/// The sequence number in a value read back for `key`; `None` when the
/// value is not one of `key`'s.
pub fn parse_value(key: &str, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let (k, seq) = text.rsplit_once('=')?;
    (k == key).then(|| seq.parse().ok()).flatten()
}

/// One key's history as its writer saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The highest sequence number sent (acknowledged or not).
    pub attempted: u64,
    /// The last acknowledged write: its sequence number and when it was
    /// acknowledged, from the start of the load.
    pub acked: Option<(u64, Duration)>,
}

/// Key -> what its (single) writer sent and had acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    keys: HashMap<String, Entry>,
}

impl Ledger {
    /// The next value to write to `key`, recorded as attempted.
    pub fn attempt(&mut self, key: &str) -> (u64, String) {
        let entry = self.keys.entry(key.to_string()).or_default();
        entry.attempted += 1;
        (entry.attempted, value(key, entry.attempted))
    }

    /// The write `seq` of `key` was acknowledged at `at`.
    pub fn ack(&mut self, key: &str, seq: u64, at: Duration) {
        let entry = self.keys.entry(key.to_string()).or_default();
        if entry.acked.is_none_or(|(s, _)| s < seq) {
            entry.acked = Some((seq, at));
        }
    }

    /// Keys of other ledgers join this one (writers own disjoint keys).
    pub fn merge(&mut self, other: Self) {
        self.keys.extend(other.keys);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn acked(&self) -> usize {
        self.keys.values().filter(|e| e.acked.is_some()).count()
    }

    pub fn keys(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.keys.iter()
    }
}

/// What a key read back says about its writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The last acknowledged value, or a later attempt, or nothing ever
    /// acknowledged and nothing there.
    Kept,
    /// The last acknowledged write is gone (older value or none); when it
    /// was acknowledged.
    Lost(Duration),
    /// A value never written to this key: must never happen.
    Wrong(String),
}

/// Judges `read` (the key's value, `None` when absent) against `entry`.
pub fn judge(key: &str, entry: &Entry, read: Option<&[u8]>) -> Verdict {
    let seq = match read {
        None => None,
        Some(v) => match parse_value(key, v) {
            Some(seq) if (1..=entry.attempted).contains(&seq) => Some(seq),
            _ => return Verdict::Wrong(String::from_utf8_lossy(v).into_owned()),
        },
    };
    match entry.acked {
        Some((acked, at)) if seq.is_none_or(|s| s < acked) => Verdict::Lost(at),
        _ => Verdict::Kept,
    }
}

/// Where a lost write (acknowledged at `at`) is charged: the windows it
/// fell in, or `none`.
pub fn charge(windows: &[Window], at: Duration) -> Vec<String> {
    let names: Vec<String> = windows_at(windows, at)
        .into_iter()
        .map(|w| w.name.clone())
        .collect();
    if names.is_empty() {
        vec!["none".to_string()]
    } else {
        names
    }
}

/// Whether a write lost at `at` is allowed: only inside a window of a
/// fault that is not graceful.
pub fn loss_allowed(windows: &[Window], at: Duration) -> bool {
    windows_at(windows, at).iter().any(|w| !w.kind.graceful())
}

/// Losses per window name (`none` for outside every window).
pub fn losses_by_fault(windows: &[Window], lost_at: &[Duration]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for &at in lost_at {
        for name in charge(windows, at) {
            *out.entry(name).or_insert(0) += 1;
        }
    }
    out
}

/// An error a client saw (it reconnects and goes on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientError {
    #[serde(serialize_with = "ms")]
    pub at: Duration,
    pub client: String,
    pub what: String,
}

/// Errors seen during one fault, and how long until they stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultErrors {
    pub fault: String,
    pub errors: usize,
    /// From the start of the fault to its last error: how long clients
    /// were not served normally. Zero without errors.
    #[serde(serialize_with = "ms")]
    pub recovery: Duration,
    /// A few of them, for the reader.
    pub examples: Vec<String>,
    /// The latest: what kept clients from being served longest.
    pub last: Option<String>,
}

/// Errors per window (and `none`), with recovery times.
pub fn errors_by_fault(windows: &[Window], errors: &[ClientError]) -> Vec<FaultErrors> {
    let mut out: Vec<FaultErrors> = windows
        .iter()
        .map(|w| {
            let mine: Vec<&ClientError> = errors.iter().filter(|e| w.contains(e.at)).collect();
            let recovery = mine
                .iter()
                .map(|e| e.at.saturating_sub(w.start))
                .max()
                .unwrap_or_default();
            FaultErrors {
                fault: w.name.clone(),
                errors: mine.len(),
                recovery,
                examples: examples(&mine),
                last: latest(&mine),
            }
        })
        .collect();
    let outside: Vec<&ClientError> = errors
        .iter()
        .filter(|e| windows_at(windows, e.at).is_empty())
        .collect();
    out.push(FaultErrors {
        fault: "none".to_string(),
        errors: outside.len(),
        recovery: Duration::ZERO,
        examples: examples(&outside),
        last: latest(&outside),
    });
    out
}

fn describe(e: &ClientError) -> String {
    format!("+{:.1}s {}: {}", e.at.as_secs_f64(), e.client, e.what)
}

fn examples(errors: &[&ClientError]) -> Vec<String> {
    errors.iter().take(5).map(|e| describe(e)).collect()
}

fn latest(errors: &[&ClientError]) -> Option<String> {
    errors.iter().max_by_key(|e| e.at).map(|e| describe(e))
}

/// p99 (and count) of request latencies per `bucket` of time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LatencyBucket {
    #[serde(serialize_with = "ms")]
    pub from: Duration,
    pub requests: usize,
    #[serde(serialize_with = "ms")]
    pub p99: Duration,
}

/// `samples`: (when it ended, how long it took), any order.
pub fn p99_over_time(samples: &[(Duration, Duration)], bucket: Duration) -> Vec<LatencyBucket> {
    let mut by_bucket: BTreeMap<u128, Vec<Duration>> = BTreeMap::new();
    for &(at, took) in samples {
        by_bucket
            .entry(at.as_nanos() / bucket.as_nanos().max(1))
            .or_default()
            .push(took);
    }
    by_bucket
        .into_iter()
        .map(|(i, mut took)| {
            took.sort_unstable();
            // Nearest rank: the smallest value with 99% at or below it.
            let rank = (took.len() * 99).div_ceil(100).max(1);
            LatencyBucket {
                from: bucket * u32::try_from(i).unwrap_or(u32::MAX),
                requests: took.len(),
                p99: took[rank - 1],
            }
        })
        .collect()
}

/// The proxy's resident memory and open descriptors at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Resources {
    #[serde(serialize_with = "ms")]
    pub at: Duration,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
}

/// After the load, the proxy must be back near its idle baseline.
pub const FD_MARGIN: u64 = 16;
/// RSS margin: the allocator keeps some of what peaks used.
pub const RSS_MARGIN_KIB: u64 = 32 * 1024;

/// `Err` describing the leak when `after` is not within the margins of
/// `baseline`.
pub fn check_leak(baseline: &Resources, after: &Resources) -> Result<(), String> {
    let mut problems = Vec::new();
    if after.fds > baseline.fds + FD_MARGIN {
        problems.push(format!(
            "{} fds open after the load, baseline {} (+{FD_MARGIN} allowed)",
            after.fds, baseline.fds
        ));
    }
    if after.rss_kib > baseline.rss_kib + RSS_MARGIN_KIB {
        problems.push(format!(
            "RSS {} KiB after the load, baseline {} KiB (+{RSS_MARGIN_KIB} KiB allowed)",
            after.rss_kib, baseline.rss_kib
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A second burst of connections on the same, idle proxy may move its
/// figures this much: the pool is already as large as the soak made it.
pub const STEADY_FD_MARGIN: u64 = 4;
pub const STEADY_RSS_MARGIN_KIB: u64 = 8 * 1024;

/// `Err` when a burst of connections left the same idle process holding
/// more than before (`before` and `after` are both idle samples): a leak
/// per connection rather than a larger pool.
pub fn check_steady(before: &Resources, after: &Resources) -> Result<(), String> {
    if before.pid != after.pid {
        return Err(format!(
            "samples of two processes: {} and {}",
            before.pid, after.pid
        ));
    }
    let mut problems = Vec::new();
    if after.fds > before.fds + STEADY_FD_MARGIN {
        problems.push(format!(
            "{} fds after another burst, {} before (+{STEADY_FD_MARGIN} allowed)",
            after.fds, before.fds
        ));
    }
    if after.rss_kib > before.rss_kib + STEADY_RSS_MARGIN_KIB {
        problems.push(format!(
            "RSS {} KiB after another burst, {} KiB before (+{STEADY_RSS_MARGIN_KIB} KiB allowed)",
            after.rss_kib, before.rss_kib
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The losses of one client family, allowed or not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    pub keys: usize,
    pub acked: usize,
    pub lost: usize,
    /// Lost outside any kill or link-down window: must be zero.
    pub lost_unexplained: usize,
    pub by_fault: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

/// Judges every key of `ledger` against what was read back (`read` gives
/// the value of a key). Wrong values go to `wrong`.
pub fn losses(
    ledger: &Ledger,
    windows: &[Window],
    mut read: impl FnMut(&str) -> Option<Vec<u8>>,
    wrong: &mut Vec<String>,
) -> Losses {
    let mut lost_at = Vec::new();
    let mut out = Losses {
        keys: ledger.len(),
        acked: ledger.acked(),
        ..Losses::default()
    };
    for (key, entry) in ledger.keys() {
        match judge(key, entry, read(key).as_deref()) {
            Verdict::Kept => {}
            Verdict::Lost(at) => {
                lost_at.push(at);
                if !loss_allowed(windows, at) {
                    out.lost_unexplained += 1;
                }
                if out.examples.len() < 5 {
                    out.examples.push(format!(
                        "{key} (acked +{:.3}s in {:?})",
                        at.as_secs_f64(),
                        charge(windows, at)
                    ));
                }
            }
            Verdict::Wrong(v) => wrong.push(format!("{key}: read {v:?}")),
        }
    }
    out.lost = lost_at.len();
    out.by_fault = losses_by_fault(windows, &lost_at);
    out
}

/// Everything the soak prints and writes to `target/soak/`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(serialize_with = "ms")]
    pub load: Duration,
    pub faults: Vec<Window>,
    /// Every load client through the proxy.
    pub proxied: Losses,
    /// The sequential writer through the proxy that mirrors the direct one.
    pub twin: Losses,
    /// The direct cluster-aware client.
    pub direct: Losses,
    pub requests: u64,
    pub errors_by_fault: Vec<FaultErrors>,
    /// The same for the direct client, side by side.
    pub direct_errors_by_fault: Vec<FaultErrors>,
    pub wrong: Vec<String>,
    pub latency: Vec<LatencyBucket>,
    pub resources: Vec<Resources>,
    pub baseline: Option<Resources>,
    pub after: Option<Resources>,
    /// The same process idle again after one more burst of connections.
    pub after_burst: Option<Resources>,
    pub notes: Vec<String>,
}

impl Report {
    /// A human-readable summary.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "soak: {:.0}s of load, {} requests",
            self.load.as_secs_f64(),
            self.requests
        );
        for w in &self.faults {
            let _ = writeln!(
                s,
                "  fault {:<18} +{:>6.1}s .. +{:>6.1}s  {}",
                w.name,
                w.start.as_secs_f64(),
                w.end.as_secs_f64(),
                w.detail
            );
        }
        for (name, l) in [
            ("proxied", &self.proxied),
            ("twin (proxied)", &self.twin),
            ("direct", &self.direct),
        ] {
            let _ = writeln!(
                s,
                "  {name:<15} keys {:>6} acked {:>6} lost {:>3} (unexplained {}) by fault {:?}",
                l.keys, l.acked, l.lost, l.lost_unexplained, l.by_fault
            );
        }
        let _ = writeln!(
            s,
            "  errors by fault (proxied clients | direct client), last error after the start:"
        );
        for (f, d) in self
            .errors_by_fault
            .iter()
            .zip(&self.direct_errors_by_fault)
        {
            let _ = writeln!(
                s,
                "    {:<18} {:>5} errors, last +{:>5.1}s | {:>5} errors, last +{:>5.1}s",
                f.fault,
                f.errors,
                f.recovery.as_secs_f64(),
                d.errors,
                d.recovery.as_secs_f64(),
            );
            if let (Some(first), Some(last)) = (f.examples.first(), &f.last) {
                let _ = writeln!(s, "      first {first}\n      last  {last}");
            }
        }
        let _ = writeln!(s, "  wrong values: {}", self.wrong.len());
        let _ = writeln!(s, "  p99 latency per bucket (ms):");
        let line: Vec<String> = self
            .latency
            .iter()
            .map(|b| format!("+{}s {}", b.from.as_secs(), b.p99.as_millis()))
            .collect();
        let _ = writeln!(s, "    {}", line.join(", "));
        let rss: Vec<String> = self
            .resources
            .iter()
            .step_by(10)
            .map(|r| format!("+{}s {}MiB/{}fd", r.at.as_secs(), r.rss_kib / 1024, r.fds))
            .collect();
        let _ = writeln!(s, "  proxy RSS/fds (every 10th sample): {}", rss.join(", "));
        let _ = writeln!(
            s,
            "  idle baseline {:?}\n  idle after load {:?}\n  idle after one more burst {:?}",
            self.baseline, self.after, self.after_burst
        );
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

/// Durations in JSON as milliseconds.
fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn window(kind: FaultKind, start: u64, end: u64) -> Window {
        Window {
            kind,
            name: format!("{}#1", kind.label()),
            start: secs(start),
            end: secs(end),
            detail: String::new(),
        }
    }

    fn kinds(plan: &[Planned]) -> Vec<FaultKind> {
        plan.iter().map(|p| p.kind).collect()
    }

    #[test]
    fn a_two_minute_schedule_has_every_fault_and_overlaps_them() {
        use FaultKind::*;
        let plan = schedule(secs(120));
        assert_eq!(
            kinds(&plan),
            [
                Migration,
                ProxyRestart,
                ManualFailover,
                HbonePeerRestart,
                HbonePeerRestart,
                MasterKill,
                ManualFailover,
                LinkDown,
                ProxyRestart,
                LinkDown
            ]
        );
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(plan[0].at, secs(12));
        assert!(check_schedule(&plan).is_ok());
        // Not only proxy restarts overlap: an HBONE peer restart lands in
        // a failover, and a link goes down in another.
        let overlays: Vec<(FaultKind, FaultKind)> = plan
            .iter()
            .filter(|p| p.inside)
            .map(|p| (host_of(&plan, p).expect("a host").kind, p.kind))
            .collect();
        assert_eq!(
            overlays,
            [
                (Migration, ProxyRestart),
                (ManualFailover, HbonePeerRestart),
                (ManualFailover, LinkDown),
                (ManualFailover, ProxyRestart)
            ]
        );
        // Each of the two faults new to the overlap also happens alone,
        // for figures of its own.
        for kind in [HbonePeerRestart, LinkDown] {
            assert!(plan.iter().any(|p| p.kind == kind && !p.inside));
        }
        assert!(plan.last().is_some_and(|p| p.at < secs(90)));
    }

    #[test]
    fn windows_are_named_by_kind_and_number_across_lanes() {
        let plan = schedule(secs(120));
        let names: Vec<String> = plan
            .iter()
            .filter(|p| p.kind == FaultKind::HbonePeerRestart)
            .map(Planned::name)
            .collect();
        assert_eq!(names, ["hbone-peer-restart#1", "hbone-peer-restart#2"]);
        // The first runs inside a failover, the second on the main lane.
        assert_eq!(plan[3].lane(), Lane::Overlay(FaultKind::HbonePeerRestart));
        assert_eq!(plan[4].lane(), Lane::Main);
        assert_eq!(
            lanes(&plan),
            [
                Lane::Main,
                Lane::Overlay(FaultKind::ProxyRestart),
                Lane::Overlay(FaultKind::LinkDown),
                Lane::Overlay(FaultKind::HbonePeerRestart)
            ]
        );
        assert_eq!(lane(&plan, Lane::Main).len(), 6);
    }

    #[test]
    fn a_longer_soak_repeats_the_cycle_within_its_length() {
        let plan = schedule(secs(600));
        assert_eq!(plan.len(), 5 * CYCLE.len());
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(plan.iter().all(|p| p.at < secs(600)));
        assert!(check_schedule(&plan).is_ok());
        let last = plan.last().expect("faults");
        assert_eq!(last.name(), "link-down#10");
        // Shorter than a cycle still gets one.
        assert_eq!(schedule(secs(30)).len(), CYCLE.len());
    }

    #[test]
    fn an_overlay_without_its_host_or_two_faults_at_once_on_a_lane_are_refused() {
        let p = |at, kind, inside| Planned {
            at: secs(at),
            kind,
            n: 1,
            inside,
        };
        let orphan = [
            p(10, FaultKind::Migration, false),
            p(11, FaultKind::LinkDown, true),
        ];
        assert!(check_schedule(&orphan).is_err());
        let crowded = [
            p(10, FaultKind::Migration, false),
            p(10, FaultKind::MasterKill, false),
        ];
        assert!(check_schedule(&crowded).is_err());
        let fine = [
            p(10, FaultKind::ManualFailover, false),
            p(10, FaultKind::LinkDown, true),
            p(10, FaultKind::ProxyRestart, true),
        ];
        assert!(check_schedule(&fine).is_ok());
        assert_eq!(host_of(&fine, &fine[1]), Some(fine[0]));
    }

    #[test]
    fn an_hbone_peer_restart_is_graceful_and_a_cut_off_master_is_not() {
        assert!(FaultKind::HbonePeerRestart.graceful());
        assert!(FaultKind::ProxyRestart.graceful());
        assert!(!FaultKind::LinkDown.graceful());
        assert!(!FaultKind::MasterKill.graceful());
    }

    #[test]
    fn values_name_their_key_and_sequence() {
        assert_eq!(value("a:1", 7), "a:1=7");
        assert_eq!(parse_value("a:1", b"a:1=7"), Some(7));
        assert_eq!(parse_value("a:1", b"a:2=7"), None);
        assert_eq!(parse_value("a:1", b"garbage"), None);
    }

    #[test]
    fn the_last_acknowledged_value_or_a_later_attempt_is_kept() {
        let mut l = Ledger::default();
        let (s1, _) = l.attempt("k");
        l.ack("k", s1, secs(1));
        let (s2, _) = l.attempt("k"); // not acknowledged
        let e = l.keys().next().map(|(_, e)| *e).expect("entry");
        assert_eq!(judge("k", &e, Some(b"k=1")), Verdict::Kept);
        assert_eq!(
            judge("k", &e, Some(format!("k={s2}").as_bytes())),
            Verdict::Kept
        );
        assert_eq!(judge("k", &e, None), Verdict::Lost(secs(1)));
        assert_eq!(
            judge("k", &e, Some(b"k=3")),
            Verdict::Wrong("k=3".to_string())
        );
        assert_eq!(
            judge("k", &e, Some(b"other=1")),
            Verdict::Wrong("other=1".to_string())
        );
    }

    #[test]
    fn an_older_value_than_the_acknowledged_one_is_a_loss() {
        let mut l = Ledger::default();
        for t in 1..=3 {
            let (s, _) = l.attempt("k");
            l.ack("k", s, secs(t));
        }
        let e = l.keys().next().map(|(_, e)| *e).expect("entry");
        assert_eq!(judge("k", &e, Some(b"k=2")), Verdict::Lost(secs(3)));
        // Nothing acknowledged, nothing there: fine.
        assert_eq!(judge("k", &Entry::default(), None), Verdict::Kept);
    }

    #[test]
    fn losses_are_charged_to_the_windows_they_fell_in() {
        let ws = [
            window(FaultKind::Migration, 10, 20),
            window(FaultKind::MasterKill, 18, 25),
        ];
        // 9.5 is inside the migration's margin.
        assert_eq!(charge(&ws, Duration::from_millis(9_500)), ["migration#1"]);
        assert_eq!(charge(&ws, secs(19)), ["migration#1", "master-kill#1"]);
        assert_eq!(charge(&ws, secs(40)), ["none"]);
        assert!(!loss_allowed(&ws, secs(12)));
        assert!(loss_allowed(&ws, secs(19)));
        assert!(!loss_allowed(&ws, secs(40)));
        let by = losses_by_fault(&ws, &[secs(12), secs(24), secs(40)]);
        assert_eq!(by["migration#1"], 1);
        assert_eq!(by["master-kill#1"], 1);
        assert_eq!(by["none"], 1);
    }

    #[test]
    fn losses_judge_a_whole_ledger() {
        let mut l = Ledger::default();
        for key in ["a", "b", "c"] {
            let (s, _) = l.attempt(key);
            l.ack(key, s, secs(19));
        }
        let ws = [window(FaultKind::MasterKill, 18, 25)];
        let mut wrong = Vec::new();
        let out = losses(
            &l,
            &ws,
            |k| match k {
                "a" => Some(b"a=1".to_vec()),
                "b" => None,
                _ => Some(b"zzz".to_vec()),
            },
            &mut wrong,
        );
        assert_eq!((out.keys, out.acked, out.lost), (3, 3, 1));
        assert_eq!(out.lost_unexplained, 0);
        assert_eq!(wrong.len(), 1);
    }

    #[test]
    fn errors_are_grouped_by_fault_with_the_time_to_the_last_one() {
        let ws = [window(FaultKind::ProxyRestart, 10, 11)];
        let e = |ms: u64| ClientError {
            at: Duration::from_millis(ms),
            client: "short-0".into(),
            what: "refused".into(),
        };
        let out = errors_by_fault(&ws, &[e(10_900), e(10_100), e(50_000)]);
        assert_eq!(out[0].errors, 2);
        assert_eq!(out[0].recovery, Duration::from_millis(900));
        assert_eq!(out[0].last.as_deref(), Some("+10.9s short-0: refused"));
        assert_eq!(out[1].fault, "none");
        assert_eq!(out[1].errors, 1);
    }

    #[test]
    fn p99_is_the_nearest_rank_per_bucket() {
        let mut samples: Vec<(Duration, Duration)> = (1..=100)
            .map(|i| (Duration::from_millis(100), Duration::from_millis(i)))
            .collect();
        samples.push((secs(12), Duration::from_millis(5)));
        let out = p99_over_time(&samples, secs(10));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].requests, 100);
        assert_eq!(out[0].p99, Duration::from_millis(99));
        assert_eq!(out[1].from, secs(10));
        assert_eq!(out[1].p99, Duration::from_millis(5));
    }

    #[test]
    fn a_proxy_back_near_its_baseline_has_not_leaked() {
        let r = |rss_kib, fds| Resources {
            at: Duration::ZERO,
            pid: 1,
            rss_kib,
            fds,
        };
        assert!(check_leak(&r(10_000, 20), &r(20_000, 30)).is_ok());
        assert!(check_leak(&r(10_000, 20), &r(10_000, 20 + FD_MARGIN + 1)).is_err());
        assert!(check_leak(&r(10_000, 20), &r(10_001 + RSS_MARGIN_KIB, 20)).is_err());
    }

    #[test]
    fn another_burst_on_the_same_idle_proxy_must_not_grow_it() {
        let r = |pid, rss_kib, fds| Resources {
            at: Duration::ZERO,
            pid,
            rss_kib,
            fds,
        };
        assert!(check_steady(&r(1, 30_000, 27), &r(1, 31_000, 27 + STEADY_FD_MARGIN)).is_ok());
        assert!(check_steady(&r(1, 30_000, 27), &r(1, 30_000, 28 + STEADY_FD_MARGIN)).is_err());
        assert!(
            check_steady(&r(1, 30_000, 27), &r(1, 30_001 + STEADY_RSS_MARGIN_KIB, 27)).is_err()
        );
        assert!(check_steady(&r(1, 30_000, 27), &r(2, 30_000, 27)).is_err());
    }
}
