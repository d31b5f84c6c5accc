//! The driver: sends each generated command to the proxy and to one
//! standalone Redis, compares the two replies under the command's mask,
//! and on a mismatch shrinks the unit sequence by replaying it, then
//! reports the seed, the step, the command and both replies.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{Command, Generator, LOADED_SCRIPT, Unit, Verdict, compare};
use crate::resp::RespClient;

/// Units one seed runs before the next seed starts from empty keyspaces:
/// small enough that replaying a failing prefix (to shrink it) is cheap.
pub const UNITS_PER_SEED: usize = 3000;

/// The two servers compared: the proxy and one standalone Redis.
#[derive(Debug, Clone, Copy)]
pub struct Sides {
    pub proxy: SocketAddr,
    pub redis: SocketAddr,
}

/// What a clean run did.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub seeds: Vec<u64>,
    pub units: u64,
    pub commands: u64,
    /// Commands accepted by each mask rule (replies that differed).
    pub masked: BTreeMap<&'static str, u64>,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (first, last) = (self.seeds.first(), self.seeds.last());
        write!(
            f,
            "{} commands in {} units over {} seeds ({}..={}); masked differences:",
            self.commands,
            self.units,
            self.seeds.len(),
            first.copied().unwrap_or_default(),
            last.copied().unwrap_or_default(),
        )?;
        for (rule, n) in &self.masked {
            write!(f, " {rule}={n}")?;
        }
        Ok(())
    }
}

/// A difference no rule accepts.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub seed: u64,
    /// Index of the command in the seed's sequence (0-based).
    pub step: u64,
    pub command: String,
    pub proxy: String,
    pub redis: String,
    pub why: String,
    /// The shrunk sequence that still fails on its last command (empty if
    /// the failure did not replay).
    pub shrunk: Vec<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} step {}: {}\n  command: {}\n  proxy:   {}\n  redis:   {}",
            self.seed, self.step, self.why, self.command, self.proxy, self.redis
        )?;
        if self.shrunk.is_empty() {
            writeln!(f, "  (the prefix did not fail again when replayed)")?;
        } else {
            writeln!(
                f,
                "  (replies above from the run) shrunk to {} commands that still fail on the last unit, from empty keyspaces:",
                self.shrunk.len()
            )?;
            for c in &self.shrunk {
                writeln!(f, "    {c}")?;
            }
        }
        write!(f, "  reproduce: DIFFERENTIAL_SEED={}", self.seed)
    }
}

/// Runs every seed of `seeds` in turn (each [`UNITS_PER_SEED`] units) and
/// stops at the first mismatch, or after the seed running at `deadline`.
pub fn run(
    sides: Sides,
    seeds: impl IntoIterator<Item = u64>,
    deadline: Option<Instant>,
) -> Result<Stats, Box<Mismatch>> {
    let mut stats = Stats::default();
    for seed in seeds {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        stats.seeds.push(seed);
        run_seed(sides, seed, &mut stats)?;
    }
    Ok(stats)
}

fn run_seed(sides: Sides, seed: u64, stats: &mut Stats) -> Result<(), Box<Mismatch>> {
    let mut pair = Pair::fresh(sides);
    let sha = pair.load_script();
    let mut generator = Generator::new(seed, &sha);
    let mut history: Vec<Unit> = Vec::with_capacity(UNITS_PER_SEED);
    let mut step = 0u64;
    for _ in 0..UNITS_PER_SEED {
        let unit = generator.unit();
        for (command, (proxy, redis)) in unit.iter().zip(pair.call_unit(&unit)) {
            match check(command, &proxy, &redis) {
                Ok(Some(rule)) => *stats.masked.entry(rule).or_default() += 1,
                Ok(None) => {}
                Err(why) => {
                    history.push(unit.clone());
                    let shrunk = shrink(sides, &sha, history);
                    return Err(Box::new(Mismatch {
                        seed,
                        step,
                        command: command.display(),
                        proxy: show(&proxy),
                        redis: show(&redis),
                        why,
                        shrunk,
                    }));
                }
            }
            step += 1;
            stats.commands += 1;
        }
        stats.units += 1;
        history.push(unit);
    }
    Ok(())
}

type Reply = Result<Bytes, String>;

/// `Ok(Some(rule))` when a rule accepted a difference.
fn check(command: &Command, proxy: &Reply, redis: &Reply) -> Result<Option<&'static str>, String> {
    match (proxy, redis) {
        (Ok(p), Ok(r)) => match compare(&command.mask, p, r) {
            Verdict::Equal => Ok(None),
            Verdict::Masked(rule) => Ok(Some(rule)),
            Verdict::Differ(why) => Err(why),
        },
        (Err(e), _) => Err(format!("the proxy did not answer: {e}")),
        (_, Err(e)) => Err(format!("redis did not answer: {e}")),
    }
}

fn show(reply: &Reply) -> String {
    match reply {
        Ok(bytes) => bytes.escape_ascii().to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// At most this long is spent shrinking one failure.
const SHRINK_BUDGET: Duration = Duration::from_secs(90);

/// Drops chunks of units (halving the chunk size down to one) while the
/// sequence, replayed from empty keyspaces, still fails on its last unit.
/// Returns the commands left, or nothing when the full prefix does not fail
/// again (a timing-dependent failure).
fn shrink(sides: Sides, sha: &str, mut units: Vec<Unit>) -> Vec<String> {
    let started = Instant::now();
    if !fails_last(sides, sha, &units) {
        return Vec::new();
    }
    let mut chunk = units.len() / 2;
    while chunk >= 1 && started.elapsed() < SHRINK_BUDGET {
        let mut i = 0;
        while i + 1 < units.len() && started.elapsed() < SHRINK_BUDGET {
            let end = (i + chunk).min(units.len() - 1);
            let candidate: Vec<Unit> = units[..i].iter().chain(&units[end..]).cloned().collect();
            if fails_last(sides, sha, &candidate) {
                units = candidate;
            } else {
                i = end;
            }
        }
        chunk /= 2;
    }
    units.iter().flatten().map(Command::display).collect()
}

/// Whether replaying `units` from empty keyspaces fails on the last unit
/// (and nowhere before it).
fn fails_last(sides: Sides, sha: &str, units: &[Unit]) -> bool {
    let mut pair = Pair::fresh(sides);
    let loaded = pair.load_script();
    debug_assert_eq!(loaded, sha);
    for (n, unit) in units.iter().enumerate() {
        for (command, (p, r)) in unit.iter().zip(pair.call_unit(unit)) {
            if check(command, &p, &r).is_err() {
                return n + 1 == units.len();
            }
        }
    }
    false
}

/// One connection to each side, and one more each for another client.
struct Pair {
    proxy: RespClient,
    redis: RespClient,
    other_proxy: RespClient,
    other_redis: RespClient,
}

impl Pair {
    /// New connections, and both keyspaces emptied.
    fn fresh(sides: Sides) -> Self {
        let mut pair = Self {
            proxy: RespClient::connect(sides.proxy).expect("connect to the proxy"),
            redis: RespClient::connect(sides.redis).expect("connect to redis"),
            other_proxy: RespClient::connect(sides.proxy).expect("connect to the proxy"),
            other_redis: RespClient::connect(sides.redis).expect("connect to redis"),
        };
        for client in [&mut pair.proxy, &mut pair.redis] {
            let reply = client.call(&[b"FLUSHALL"]).expect("FLUSHALL");
            assert_eq!(&reply[..], b"+OK\r\n", "FLUSHALL");
        }
        pair
    }

    /// Loads [`LOADED_SCRIPT`] on both sides; its SHA1, the same on both.
    fn load_script(&mut self) -> String {
        let args: [&[u8]; 3] = [b"SCRIPT", b"LOAD", LOADED_SCRIPT.as_bytes()];
        let p = self
            .proxy
            .call(&args)
            .expect("SCRIPT LOAD through the proxy");
        let r = self.redis.call(&args).expect("SCRIPT LOAD on redis");
        assert_eq!(p, r, "SCRIPT LOAD");
        let text = String::from_utf8_lossy(&r).into_owned();
        text.lines().nth(1).expect("a SHA1").to_string()
    }

    /// The replies to a unit's commands, in order. A unit of one client
    /// is one pipeline, in one write (Redis runs it in order, and so must
    /// the proxy); one with another client's command goes a command at a
    /// time, as the interleaving matters. Each side is sent to before
    /// either is read, so the two round trips overlap.
    fn call_unit(&mut self, unit: &[Command]) -> Vec<(Reply, Reply)> {
        if unit.iter().any(|c| c.other) {
            return unit
                .iter()
                .map(|c| {
                    let (p, r) = if c.other {
                        (&mut self.other_proxy, &mut self.other_redis)
                    } else {
                        (&mut self.proxy, &mut self.redis)
                    };
                    exchange(p, r, std::slice::from_ref(c)).remove(0)
                })
                .collect();
        }
        exchange(&mut self.proxy, &mut self.redis, unit)
    }
}

/// Sends `commands` to both sides in one write each, then reads every
/// reply; after a failed read, the rest fail with the same error.
fn exchange(
    proxy: &mut RespClient,
    redis: &mut RespClient,
    commands: &[Command],
) -> Vec<(Reply, Reply)> {
    let bytes: Vec<u8> = commands
        .iter()
        .flat_map(|c| {
            let args: Vec<&[u8]> = c.args.iter().map(Vec::as_slice).collect();
            crate::resp::encode(&args)
        })
        .collect();
    let sent_p = proxy.send_raw(&bytes).map_err(|e| e.to_string());
    let sent_r = redis.send_raw(&bytes).map_err(|e| e.to_string());
    let read_all = |client: &mut RespClient, sent: Result<(), String>| {
        let mut last = sent;
        commands
            .iter()
            .map(|_| {
                let reply = last
                    .clone()
                    .and_then(|()| client.read_reply().map_err(|e| e.to_string()));
                if let Err(e) = &reply {
                    last = Err(e.clone());
                }
                reply
            })
            .collect::<Vec<Reply>>()
    };
    let p = read_all(proxy, sent_p);
    let r = read_all(redis, sent_r);
    p.into_iter().zip(r).collect()
}
