//! ACL passthrough's decisions, without I/O: which password checks are
//! fresh, how long a client address waits before its next AUTH, and which
//! users' pools are still wanted.
//!
//! Nothing here keeps a password. A successful check is remembered only
//! as an HMAC-SHA256 of user and password under a key drawn at random for
//! this process (a salted hash no other process can recompute), for a
//! short time. Comparisons go through `ring::hmac::verify`, which is
//! constant-time, so a reply's timing tells nothing about how much of a
//! guess was right.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use ring::{hmac, rand::SystemRandom};

/// How long a successful check stands before Redis is asked again.
pub const CHECK_TTL: Duration = Duration::from_secs(30);
/// Users whose last check is remembered (more: the oldest is dropped).
pub const MAX_CHECKS: usize = 1024;
/// Client addresses whose failures are remembered.
pub const MAX_ADDRESSES: usize = 4096;

/// The process's HMAC key: random, never written anywhere.
static KEY: LazyLock<hmac::Key> = LazyLock::new(|| {
    // Without an OS random source no salt can be trusted: nothing is
    // remembered rather than remembered guessably.
    hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
        .expect("the operating system's random source works")
});

/// A salted hash of a user and a password.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only a prefix: enough to tell two apart in a test's failure.
        write!(f, "Fingerprint({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// The HMAC's input: the user's length first, so `("ab", "c")` and
/// `("a", "bc")` differ.
fn message(user: &[u8], password: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(8 + user.len() + password.len());
    message.extend_from_slice(&(user.len() as u64).to_be_bytes());
    message.extend_from_slice(user);
    message.extend_from_slice(password);
    message
}

pub fn fingerprint(user: &[u8], password: &[u8]) -> Fingerprint {
    let tag = hmac::sign(&KEY, &message(user, password));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    Fingerprint(out)
}

/// Whether `user`/`password` is what `fingerprint` was made from, in
/// constant time.
fn matches(user: &[u8], password: &[u8], fingerprint: &Fingerprint) -> bool {
    hmac::verify(&KEY, &message(user, password), &fingerprint.0).is_ok()
}

/// Whether a password given equals the one expected, in constant time
/// (whatever their lengths: both are hashed first).
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let tag = hmac::sign(&KEY, expected);
    hmac::verify(&KEY, given, tag.as_ref()).is_ok()
}

/// Recent successful checks, per user: a client of a user whose password
/// Redis accepted moments ago is let in without asking Redis again.
pub struct Checks {
    by_user: HashMap<Box<[u8]>, (Fingerprint, Instant)>,
    ttl: Duration,
    cap: usize,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new(CHECK_TTL, MAX_CHECKS)
    }
}

impl Checks {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            by_user: HashMap::new(),
            ttl,
            cap: cap.max(1),
        }
    }

    /// Whether Redis accepted exactly this user and password less than the
    /// TTL ago.
    pub fn is_fresh(&self, user: &[u8], password: &[u8], now: Instant) -> bool {
        self.by_user.get(user).is_some_and(|(fp, at)| {
            now.duration_since(*at) < self.ttl && matches(user, password, fp)
        })
    }

    /// Redis accepted `user` with the password `fingerprint` was made of.
    pub fn remember(&mut self, user: &[u8], fingerprint: Fingerprint, now: Instant) {
        if !self.by_user.contains_key(user) && self.by_user.len() >= self.cap {
            let ttl = self.ttl;
            self.by_user
                .retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if self.by_user.len() >= self.cap
                && let Some(oldest) = self
                    .by_user
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(user, _)| user.clone())
            {
                self.by_user.remove(&oldest);
            }
        }
        self.by_user.insert(user.into(), (fingerprint, now));
    }

    pub fn clear(&mut self) {
        self.by_user.clear();
    }

    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

/// How failed AUTHs slow an address down.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Failures that cost nothing (typos happen).
    pub free: u32,
    /// The delay after the first failure beyond those; it doubles with
    /// each further one...
    pub first: Duration,
    /// ...up to this.
    pub max: Duration,
    /// An address quiet this long starts over.
    pub quiet: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            free: 3,
            first: Duration::from_millis(100),
            max: Duration::from_secs(2),
            quiet: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failed AUTHs per client address: a proxy every pod may reach must not
/// become a fast password oracle. Every AUTH from an address with recent
/// failures waits (a correct one too, or its speed would tell).
pub struct Limiter {
    by_ip: HashMap<IpAddr, Failures>,
    backoff: Backoff,
    cap: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(Backoff::default(), MAX_ADDRESSES)
    }
}

impl Limiter {
    pub fn new(backoff: Backoff, cap: usize) -> Self {
        Self {
            by_ip: HashMap::new(),
            backoff,
            cap: cap.max(1),
        }
    }

    /// How long the next AUTH from `ip` waits before it is checked.
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        let Some(failures) = self.by_ip.get(&ip) else {
            return Duration::ZERO;
        };
        if now.duration_since(failures.last) >= self.backoff.quiet {
            return Duration::ZERO;
        }
        let Some(beyond) = failures.count.checked_sub(self.backoff.free) else {
            return Duration::ZERO;
        };
        // 2^beyond, saturating well before it could overflow.
        let factor = 1u32 << beyond.min(20);
        self.backoff
            .first
            .saturating_mul(factor)
            .min(self.backoff.max)
    }

    /// An AUTH from `ip` failed.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= self.cap {
            let quiet = self.backoff.quiet;
            self.by_ip.retain(|_, f| now.duration_since(f.last) < quiet);
            if self.by_ip.len() >= self.cap
                && let Some(oldest) = self
                    .by_ip
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(ip, _)| *ip)
            {
                self.by_ip.remove(&oldest);
            }
        }
        let entry = self.by_ip.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.duration_since(entry.last) >= self.backoff.quiet {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// Values shared by whoever holds them (a user's pools, by the sessions
/// of that user), kept a while after the last holder lets go, so a client
/// that connects for one command at a time (PHP-FPM) finds them warm.
pub struct Lingering<K, T> {
    entries: HashMap<K, (Arc<T>, Option<Instant>)>,
    linger: Duration,
}

impl<K: Eq + Hash + Copy, T> Lingering<K, T> {
    pub fn new(linger: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            linger,
        }
    }

    /// The value under `key`, made by `make` if there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let (value, idle_since) = self.entries.entry(key).or_insert_with(|| (make(), None));
        *idle_since = None;
        Arc::clone(value)
    }

    /// Drops what nobody has held for the linger time. Returns how many
    /// entries are left.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let linger = self.linger;
        self.entries.retain(|_, (value, idle_since)| {
            if Arc::strong_count(value) > 1 {
                *idle_since = None;
                return true;
            }
            let since = *idle_since.get_or_insert(now);
            now.duration_since(since) < linger
        });
        self.entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What `ACL DRYRUN user command args...` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DryRun {
    Allowed,
    Denied,
    /// No answer about the user: the asker may not run ACL DRYRUN, or
    /// Redis predates it (7.0). The error, as Redis gave it.
    Unknown(String),
}

/// Reads ACL DRYRUN's raw reply: `+OK`, or a bulk string saying why not.
pub fn dry_run(raw: &[u8]) -> DryRun {
    match raw.first() {
        Some(b'+') if raw.starts_with(b"+OK") => DryRun::Allowed,
        Some(b'$' | b'+' | b'=') => DryRun::Denied,
        _ => DryRun::Unknown(
            String::from_utf8_lossy(raw)
                .trim_start_matches(['-', '!'])
                .trim_end()
                .to_string(),
        ),
    }
}

/// Redis's own refusal of a command to a user.
pub fn no_permission(command: &str) -> String {
    format!("NOPERM this user has no permissions to run the '{command}' command")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn dry_runs_read_as_redis_answers_them() {
        assert_eq!(dry_run(b"+OK\r\n"), DryRun::Allowed);
        assert_eq!(
            dry_run(b"$60\r\nThis user has no permissions to run the 'client|list' command\r\n"),
            DryRun::Denied
        );
        assert_eq!(
            dry_run(b"-NOPERM this user has no permissions to run the 'acl|dryrun' command\r\n"),
            DryRun::Unknown(
                "NOPERM this user has no permissions to run the 'acl|dryrun' command".into()
            )
        );
    }

    #[test]
    fn secrets_compare_whatever_their_length() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn fingerprints_separate_user_from_password() {
        assert_eq!(fingerprint(b"app", b"pw"), fingerprint(b"app", b"pw"));
        assert_ne!(fingerprint(b"ab", b"c"), fingerprint(b"a", b"bc"));
        assert_ne!(fingerprint(b"app", b"pw"), fingerprint(b"app", b"pW"));
    }

    #[test]
    fn a_check_is_fresh_for_its_password_and_its_ttl_only() {
        let start = Instant::now();
        let mut checks = Checks::new(Duration::from_secs(30), 8);
        assert!(!checks.is_fresh(b"app", b"s3cret", start));
        checks.remember(b"app", fingerprint(b"app", b"s3cret"), start);
        assert!(checks.is_fresh(b"app", b"s3cret", start + Duration::from_secs(29)));
        assert!(!checks.is_fresh(b"app", b"wrong", start));
        assert!(!checks.is_fresh(b"ro", b"s3cret", start));
        assert!(!checks.is_fresh(b"app", b"s3cret", start + Duration::from_secs(30)));
    }

    #[test]
    fn checks_stay_within_their_cap() {
        let start = Instant::now();
        let mut checks = Checks::new(Duration::from_secs(30), 2);
        for (i, user) in [&b"a"[..], b"b", b"c"].into_iter().enumerate() {
            checks.remember(user, fingerprint(user, b"p"), start + MS * i as u32);
        }
        assert_eq!(checks.len(), 2);
        // The oldest went.
        assert!(!checks.is_fresh(b"a", b"p", start + MS * 3));
        assert!(checks.is_fresh(b"c", b"p", start + MS * 3));
    }

    #[test]
    fn failures_slow_an_address_down_growing_then_capped() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let start = Instant::now();
        let mut limiter = Limiter::default();
        let mut delays = Vec::new();
        for i in 0..10 {
            let now = start + MS * i;
            delays.push(limiter.delay(ip, now));
            limiter.failed(ip, now);
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 0, 0, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(limiter.delay(other, start), Duration::ZERO);
    }

    #[test]
    fn a_quiet_minute_forgives() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        let start = Instant::now();
        let mut limiter = Limiter::default();
        for _ in 0..6 {
            limiter.failed(ip, start);
        }
        assert!(limiter.delay(ip, start + Duration::from_secs(59)) > Duration::ZERO);
        let later = start + Duration::from_secs(60);
        assert_eq!(limiter.delay(ip, later), Duration::ZERO);
        // And counts from scratch.
        limiter.failed(ip, later);
        assert_eq!(limiter.delay(ip, later), Duration::ZERO);
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_addresses() {
        let start = Instant::now();
        let mut limiter = Limiter::new(Backoff::default(), 3);
        for i in 0..10u8 {
            limiter.failed([10, 0, 0, i].into(), start + MS * u32::from(i));
        }
        assert_eq!(limiter.len(), 3);
        // The most recent are kept.
        for _ in 0..4 {
            limiter.failed([10, 0, 0, 9].into(), start + MS * 10);
        }
        assert!(limiter.delay([10, 0, 0, 9].into(), start + MS * 10) > Duration::ZERO);
    }

    #[test]
    fn lingering_values_outlive_their_holders_for_a_while() {
        let start = Instant::now();
        let mut kept: Lingering<u8, String> = Lingering::new(Duration::from_secs(30));
        let held = kept.get_or_insert_with(1, || Arc::new("app".into()));
        let again = kept.get_or_insert_with(1, || Arc::new("other".into()));
        assert!(Arc::ptr_eq(&held, &again));
        drop(again);
        assert_eq!(kept.sweep(start + Duration::from_secs(100)), 1, "held");
        drop(held);
        assert_eq!(
            kept.sweep(start + Duration::from_secs(100)),
            1,
            "idle from now"
        );
        assert_eq!(kept.sweep(start + Duration::from_secs(129)), 1);
        // Taken again: the idle clock stops.
        let held = kept.get_or_insert_with(1, || Arc::new("other".into()));
        assert_eq!(*held, "app");
        drop(held);
        assert_eq!(kept.sweep(start + Duration::from_secs(130)), 1);
        assert_eq!(kept.sweep(start + Duration::from_secs(160)), 0);
        assert!(kept.is_empty());
    }
}
