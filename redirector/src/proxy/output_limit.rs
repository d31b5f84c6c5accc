//! Redis's `client-output-buffer-limit`, for the proxy's own clients.
//!
//! A client that does not read its replies (a subscriber under a publishing
//! flood, a pipeliner reading slowly) makes the proxy hold what it owes it.
//! As Redis does, each class of client has a hard limit (disconnect at once)
//! and a soft one (disconnect once over it for longer than some seconds);
//! 0 turns either off. The syntax, defaults and checks are Redis's own, so
//! `CONFIG SET client-output-buffer-limit` through the proxy sets the
//! proxy's, not the nodes' (`own_config` says why). The proxy has no
//! replicas: the replica class is kept and shown, and applies to nobody.
//! Pure: the session carries the verdicts out.

use std::{
    fmt,
    sync::RwLock,
    time::{Duration, Instant},
};

/// Which limit a client is held to (Redis's `getClientType`; MONITOR
/// clients count as normal there too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Normal,
    Replica,
    Pubsub,
}

impl Class {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Replica => "replica",
            Self::Pubsub => "pubsub",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word.to_ascii_lowercase().as_str() {
            "normal" => Some(Self::Normal),
            "replica" | "slave" => Some(Self::Replica),
            "pubsub" => Some(Self::Pubsub),
            _ => None,
        }
    }
}

/// One class's limits (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassLimit {
    pub hard_bytes: u64,
    pub soft_bytes: u64,
    pub soft_seconds: u64,
}

impl ClassLimit {
    const fn new(hard_bytes: u64, soft_bytes: u64, soft_seconds: u64) -> Self {
        Self {
            hard_bytes,
            soft_bytes,
            soft_seconds,
        }
    }
}

/// Every class's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputLimits {
    pub normal: ClassLimit,
    pub replica: ClassLimit,
    pub pubsub: ClassLimit,
}

const MB: u64 = 1024 * 1024;

impl Default for OutputLimits {
    /// Redis's defaults: normal clients unbounded (the proxy's
    /// `--max-pipeline` still bounds how many replies it holds for one),
    /// subscribers 32 MiB hard, 8 MiB for 60 s soft.
    fn default() -> Self {
        Self {
            normal: ClassLimit::new(0, 0, 0),
            replica: ClassLimit::new(256 * MB, 64 * MB, 60),
            pubsub: ClassLimit::new(32 * MB, 8 * MB, 60),
        }
    }
}

/// Why a `client-output-buffer-limit` value was refused, in Redis's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("Wrong number of arguments in buffer limit configuration.")]
    Arguments,
    #[error("Invalid client class specified in buffer limit configuration.")]
    Class,
    #[error("Error in hard, soft or soft_seconds setting in buffer limit configuration.")]
    Value,
}

impl OutputLimits {
    pub fn of(&self, class: Class) -> ClassLimit {
        match class {
            Class::Normal => self.normal,
            Class::Replica => self.replica,
            Class::Pubsub => self.pubsub,
        }
    }

    fn of_mut(&mut self, class: Class) -> &mut ClassLimit {
        match class {
            Class::Normal => &mut self.normal,
            Class::Replica => &mut self.replica,
            Class::Pubsub => &mut self.pubsub,
        }
    }

    /// These limits with `value`'s classes changed (`<class> <hard> <soft>
    /// <soft seconds>`, repeated), as `CONFIG SET` applies it: all or
    /// nothing, and classes not named keep theirs.
    pub fn with(mut self, value: &str) -> Result<Self, ParseError> {
        let words: Vec<&str> = value.split_ascii_whitespace().collect();
        if words.is_empty() || !words.len().is_multiple_of(4) {
            return Err(ParseError::Arguments);
        }
        for group in words.chunks_exact(4) {
            let class = Class::parse(group[0])
                .filter(|_| !group[0].eq_ignore_ascii_case("master"))
                .ok_or(ParseError::Class)?;
            let hard = memory(group[1]).ok_or(ParseError::Value)?;
            let soft = memory(group[2]).ok_or(ParseError::Value)?;
            let seconds = group[3].parse::<u64>().map_err(|_| ParseError::Value)?;
            *self.of_mut(class) = ClassLimit::new(hard, soft, seconds);
        }
        Ok(self)
    }
}

impl fmt::Display for OutputLimits {
    /// As `CONFIG GET` shows it (bytes; the replica class as `slave`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, l)) in [
            ("normal", self.normal),
            ("slave", self.replica),
            ("pubsub", self.pubsub),
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(
                f,
                "{name} {} {} {}",
                l.hard_bytes, l.soft_bytes, l.soft_seconds
            )?;
        }
        Ok(())
    }
}

impl std::str::FromStr for OutputLimits {
    type Err = ParseError;

    /// Over Redis's defaults (for `--client-output-buffer-limit`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::default().with(s)
    }
}

/// Redis's memory units: `k`/`m`/`g` are powers of 1000, `kb`/`mb`/`gb`
/// of 1024, case-insensitive; a bare number is bytes.
fn memory(word: &str) -> Option<u64> {
    let lower = word.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let scale: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => MB,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * MB,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

/// The limits every worker's sessions read: set at start, and by `CONFIG
/// SET` through any client. Read only while a client is backed up.
pub struct LiveLimits(RwLock<OutputLimits>);

impl LiveLimits {
    pub fn new(limits: OutputLimits) -> Self {
        Self(RwLock::new(limits))
    }

    pub fn get(&self) -> OutputLimits {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A `CONFIG SET` accepted: keep the limits it names. A value the
    /// proxy cannot read changes nothing (`own_config` refused it first,
    /// with the same rules).
    pub fn configured(&self, args: &[bytes::Bytes]) {
        for pair in args.get(2..).unwrap_or_default().chunks_exact(2) {
            if !pair[0].eq_ignore_ascii_case(b"client-output-buffer-limit") {
                continue;
            }
            let Ok(value) = std::str::from_utf8(&pair[1]) else {
                continue;
            };
            let mut limits = self.0.write().unwrap_or_else(|e| e.into_inner());
            if let Ok(new) = limits.with(value) {
                *limits = new;
            }
        }
    }
}

/// How long a client has been over its soft limit.
#[derive(Default)]
pub struct SoftClock(Option<Instant>);

impl SoftClock {
    /// The client owes nothing: it is under every limit.
    pub fn reset(&mut self) {
        self.0 = None;
    }

    /// Whether the client is over its soft limit.
    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// When a client still over its soft limit must be checked again
    /// (Redis checks in its cron too, so a client with no more traffic is
    /// still dropped).
    pub fn deadline(&self, limit: ClassLimit) -> Option<Instant> {
        self.0
            .map(|since| since + Duration::from_secs(limit.soft_seconds) + Duration::from_secs(1))
    }
}

/// Whether a client that owes `owed` bytes is over `limit` at `now`
/// (Redis's `checkClientOutputBufferLimits`): at or over the hard limit,
/// or at or over the soft one continuously for more than its seconds.
pub fn over_limit(limit: ClassLimit, owed: usize, clock: &mut SoftClock, now: Instant) -> bool {
    let owed = owed as u64;
    let hard = limit.hard_bytes != 0 && owed >= limit.hard_bytes;
    let soft = limit.soft_bytes != 0 && owed >= limit.soft_bytes;
    if !soft {
        clock.reset();
        return hard;
    }
    match clock.0 {
        None => {
            clock.0 = Some(now);
            hard
        }
        Some(since) => hard || now.duration_since(since).as_secs() > limit.soft_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_show_as_redis_does() {
        let limits: OutputLimits = "normal 1mb 2mb 60 replica 3mb 4mb 70 pubsub 5mb 6mb 80"
            .parse()
            .unwrap();
        assert_eq!(
            limits.to_string(),
            "normal 1048576 2097152 60 slave 3145728 4194304 70 pubsub 5242880 6291456 80"
        );
        assert_eq!(
            OutputLimits::default().to_string(),
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"
        );
        // Classes not named keep their values; k is 1000, kb 1024.
        let limits: OutputLimits = "PUBSUB 100k 1KB 5".parse().unwrap();
        assert_eq!(limits.pubsub, ClassLimit::new(100_000, 1024, 5));
        assert_eq!(limits.normal, OutputLimits::default().normal);
    }

    #[test]
    fn bad_limits_are_refused_with_redis_errors() {
        let parse = |s: &str| s.parse::<OutputLimits>();
        assert_eq!(parse("wrong number"), Err(ParseError::Arguments));
        assert_eq!(parse(""), Err(ParseError::Arguments));
        assert_eq!(parse("invalid_class 10mb 10mb 60"), Err(ParseError::Class));
        assert_eq!(parse("master 10mb 10mb 60"), Err(ParseError::Class));
        assert_eq!(parse("normal 10mbs 10mb 60"), Err(ParseError::Value));
        assert_eq!(parse("replica 10mb 10mbs 60"), Err(ParseError::Value));
        assert_eq!(parse("pubsub 10mb 10mb 60s"), Err(ParseError::Value));
        // All or nothing: a bad second group leaves the first unapplied.
        let live = LiveLimits::new(OutputLimits::default());
        let set = |v: &str| {
            ["config", "set", "client-output-buffer-limit", v]
                .map(|w| bytes::Bytes::copy_from_slice(w.as_bytes()))
        };
        live.configured(&set("normal 1mb 0 0 pubsub x 0 0"));
        assert_eq!(live.get(), OutputLimits::default());
        live.configured(&set("normal 1mb 0 0"));
        assert_eq!(live.get().normal.hard_bytes, MB);
    }

    #[test]
    fn the_hard_limit_drops_a_client_at_once_and_zero_means_none() {
        let now = Instant::now();
        let mut clock = SoftClock::default();
        let hard = ClassLimit::new(100, 0, 0);
        assert!(!over_limit(hard, 99, &mut clock, now));
        assert!(over_limit(hard, 100, &mut clock, now));
        let none = ClassLimit::new(0, 0, 0);
        assert!(!over_limit(none, usize::MAX, &mut clock, now));
    }

    #[test]
    fn the_soft_limit_drops_a_client_only_once_over_it_for_longer_than_its_seconds() {
        let t0 = Instant::now();
        let soft = ClassLimit::new(0, 100, 3);
        let mut clock = SoftClock::default();
        assert!(!over_limit(soft, 150, &mut clock, t0));
        assert_eq!(clock.deadline(soft), Some(t0 + Duration::from_secs(4)));
        assert!(!over_limit(
            soft,
            150,
            &mut clock,
            t0 + Duration::from_secs(3)
        ));
        assert!(over_limit(
            soft,
            150,
            &mut clock,
            t0 + Duration::from_secs(4)
        ));
        // Dipping under the soft limit starts the count again.
        let mut clock = SoftClock::default();
        assert!(!over_limit(soft, 150, &mut clock, t0));
        assert!(!over_limit(
            soft,
            50,
            &mut clock,
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(clock.deadline(soft), None);
        assert!(!over_limit(
            soft,
            150,
            &mut clock,
            t0 + Duration::from_secs(5)
        ));
        assert!(!over_limit(
            soft,
            150,
            &mut clock,
            t0 + Duration::from_secs(8)
        ));
        assert!(over_limit(
            soft,
            150,
            &mut clock,
            t0 + Duration::from_secs(9)
        ));
    }
}
