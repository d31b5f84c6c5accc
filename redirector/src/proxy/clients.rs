//! This proxy's clients, as Redis's CLIENT commands and INFO see a
//! server's: a registry of every session, each with the figures CLIENT
//! LIST prints; CLIENT KILL by every filter; CLIENT PAUSE holding this
//! proxy's clients; MONITOR feeds of their commands.
//!
//! Sessions update their entry with a few relaxed atomic stores per read,
//! so the registry costs the hot path next to nothing; only CLIENT LIST,
//! KILL and INFO walk it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::{clock::Stamp, wakeup::Wakeup};
use crate::resp::Protocol;

/// Client flags, as the `flags=` field of CLIENT LIST spells them.
pub mod flags {
    pub const BLOCKED: u32 = 1 << 0; // b
    pub const PUBSUB: u32 = 1 << 1; // P
    pub const MULTI: u32 = 1 << 2; // x
    pub const MONITOR: u32 = 1 << 3; // O
    pub const TRACKING: u32 = 1 << 4; // t
    pub const NO_EVICT: u32 = 1 << 5; // e
    pub const CLOSE_ASAP: u32 = 1 << 6; // A
    pub const READONLY: u32 = 1 << 7; // r
    pub const TRACKING_BROKEN_REDIR: u32 = 1 << 8; // R
    pub const NO_TOUCH: u32 = 1 << 9; // T
}

/// One client, as the registry shows it.
pub struct ClientEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    created: Stamp,
    /// Milliseconds after `created` of the last command.
    last_ms: AtomicU64,
    flags: AtomicU32,
    resp: AtomicU8,
    sub: AtomicU32,
    psub: AtomicU32,
    ssub: AtomicU32,
    /// Commands queued in MULTI; -1 outside a transaction.
    multi: AtomicI64,
    qbuf: AtomicUsize,
    /// What is not a number, under one lock: a lock per field cost every
    /// client 8 bytes each.
    said: Mutex<Said>,
    /// The tracking redirect target (0: none).
    redirect: AtomicU64,
    killed: AtomicBool,
    /// The daemon is stopping or handing over to its successor: close at
    /// a request boundary once the client is quiet (`handover`).
    leave_when_quiet: AtomicBool,
    /// Wakes the session: killed, or frames pushed.
    attention: Wakeup,
}

struct Said {
    /// CLIENT SETNAME's; boxed, as most clients never set one.
    name: Option<Box<Bytes>>,
    /// Shared, not copied: "default" is one allocation for every client.
    user: Arc<str>,
    /// The last command's name, shared with the command table (none:
    /// `NULL`, as Redis shows a client that has not run one).
    cmd: Option<Arc<str>>,
    /// Where a blocked command waits: the node and the upstream client id,
    /// for CLIENT UNBLOCK. Boxed: few clients are ever blocked.
    blocked_on: Option<Box<(SocketAddr, u64)>>,
    /// Frames for this client from elsewhere in the proxy (invalidations
    /// of tracking clients that redirect here), written by its session. A
    /// queue that allocates only when used: an idle client holds no
    /// channel.
    pushed: Vec<Bytes>,
}

impl ClientEntry {
    fn touch(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Commands were read at `at`: the client is not idle. (The session's
    /// own clock reading: no clock call per command.)
    pub fn active_at(&self, at: Stamp) {
        let ms = u64::try_from(at.since(self.created).as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// This is the client's last command (`container|sub` as Redis names
    /// it); the session calls it only when the command changes.
    pub fn command(&self, cmd: &Arc<str>) {
        self.said().cmd = Some(Arc::clone(cmd));
    }

    fn said(&self) -> std::sync::MutexGuard<'_, Said> {
        self.said.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_flag(&self, flag: u32, on: bool) {
        if on {
            self.flags.fetch_or(flag, Ordering::Relaxed);
        } else {
            self.flags.fetch_and(!flag, Ordering::Relaxed);
        }
    }

    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags.load(Ordering::Relaxed) & flag != 0
    }

    pub fn set_protocol(&self, protocol: Protocol) {
        let resp = if protocol == Protocol::Resp3 { 3 } else { 2 };
        self.resp.store(resp, Ordering::Relaxed);
    }

    pub fn set_name(&self, name: Option<Bytes>) {
        self.said().name = name.map(Box::new);
    }

    pub fn name(&self) -> Option<Bytes> {
        self.said().name.as_deref().cloned()
    }

    pub fn set_user(&self, user: &Arc<str>) {
        self.said().user = Arc::clone(user);
    }

    pub fn user(&self) -> String {
        self.said().user.to_string()
    }

    pub fn set_subscriptions(&self, sub: u32, psub: u32, ssub: u32) {
        self.sub.store(sub, Ordering::Relaxed);
        self.psub.store(psub, Ordering::Relaxed);
        self.ssub.store(ssub, Ordering::Relaxed);
        self.set_flag(flags::PUBSUB, sub + psub + ssub > 0);
    }

    pub fn set_multi(&self, queued: Option<usize>) {
        let n = queued.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        self.multi.store(n, Ordering::Relaxed);
        self.set_flag(flags::MULTI, queued.is_some());
    }

    pub fn set_qbuf(&self, bytes: usize) {
        self.qbuf.store(bytes, Ordering::Relaxed);
    }

    pub fn set_blocked_on(&self, on: Option<(SocketAddr, u64)>) {
        self.set_flag(flags::BLOCKED, on.is_some());
        self.said().blocked_on = on.map(Box::new);
    }

    pub fn blocked_on(&self) -> Option<(SocketAddr, u64)> {
        self.said().blocked_on.as_deref().copied()
    }

    pub fn set_redirect(&self, id: u64) {
        self.redirect.store(id, Ordering::Relaxed);
    }

    pub fn redirect(&self) -> u64 {
        self.redirect.load(Ordering::Relaxed)
    }

    pub fn protocol(&self) -> Protocol {
        if self.resp.load(Ordering::Relaxed) == 3 {
            Protocol::Resp3
        } else {
            Protocol::Resp2
        }
    }

    /// The client's protocol when pushes reach it (RESP3).
    pub fn protocol_if_resp3(&self) -> Option<Protocol> {
        Some(self.protocol()).filter(|p| *p == Protocol::Resp3)
    }

    /// Sends a frame to the client, after the replies already queued.
    pub fn push(&self, frame: Bytes) {
        self.said().pushed.push(frame);
        self.call_attention();
    }

    /// Wakes the session: something (a kill, pushed frames) needs it.
    fn call_attention(&self) {
        self.attention.wake();
    }

    /// The frames pushed since the last call.
    pub fn take_pushed(&self) -> Vec<Bytes> {
        std::mem::take(&mut self.said().pushed)
    }

    pub fn is_pubsub(&self) -> bool {
        self.has_flag(flags::PUBSUB)
    }

    /// Marks the client killed; its session closes the connection.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        self.set_flag(flags::CLOSE_ASAP, true);
        self.call_attention();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// Asks the session to close the connection once the client has been
    /// quiet for a while with nothing owed or half-sent (and not in
    /// MULTI): the daemon is going away, and a client closed between two
    /// requests reconnects to whoever serves next.
    pub fn leave_when_quiet(&self) {
        // Woken once: each wake-up would restart its quiet time.
        if !self.leave_when_quiet.swap(true, Ordering::Relaxed) {
            self.call_attention();
        }
    }

    pub fn leaves_when_quiet(&self) -> bool {
        self.leave_when_quiet.load(Ordering::Relaxed) && !self.has_flag(flags::MULTI)
    }

    /// Ready once the client was killed or had frames pushed since the
    /// last time it was (polled at every turn of the session's loop).
    pub fn poll_attention(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.attention.poll(cx)
    }

    /// The session polls its attention with `waker` alone from now on.
    pub fn attention_polled_with(&self, waker: &std::task::Waker) {
        self.attention.polled_with(waker);
    }

    /// Seconds since the connection was accepted.
    pub fn age(&self) -> u64 {
        self.created.elapsed().as_secs()
    }

    /// Seconds since the last command.
    pub fn idle(&self) -> u64 {
        self.touch()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed))
            / 1000
    }

    fn flag_letters(&self) -> String {
        let f = self.flags.load(Ordering::Relaxed);
        let mut out = String::new();
        for (bit, letter) in [
            (flags::CLOSE_ASAP, 'A'),
            (flags::BLOCKED, 'b'),
            (flags::TRACKING_BROKEN_REDIR, 'R'),
            (flags::TRACKING, 't'),
            (flags::NO_EVICT, 'e'),
            (flags::NO_TOUCH, 'T'),
            (flags::MULTI, 'x'),
            (flags::MONITOR, 'O'),
            (flags::PUBSUB, 'P'),
            (flags::READONLY, 'r'),
        ] {
            if f & bit != 0 {
                out.push(letter);
            }
        }
        if out.is_empty() {
            out.push('N');
        }
        out
    }

    /// The CLIENT LIST / CLIENT INFO line (Redis 7.0's fields; figures of
    /// memory Redis keeps per client are the proxy's estimates).
    pub fn line(&self) -> String {
        let qbuf = self.qbuf.load(Ordering::Relaxed);
        // One lock for the line (and no other taken while it is held).
        let said = self.said();
        let name = said
            .name
            .as_deref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        // Redis: the redirect while tracking (0: none), else -1.
        let redirect = if self.has_flag(flags::TRACKING) {
            i64::try_from(self.redirect.load(Ordering::Relaxed)).unwrap_or(-1)
        } else {
            -1
        };
        format!(
            "id={} addr={} laddr={} fd=0 name={} age={} idle={} flags={} db=0 sub={} psub={} ssub={} multi={} qbuf={} qbuf-free={} argv-mem=0 multi-mem=0 rbs=4096 rbp=0 obl=0 oll=0 omem=0 tot-mem={} events=r cmd={} user={} redir={} resp={}",
            self.id,
            self.addr,
            self.laddr,
            name,
            self.age(),
            self.idle(),
            self.flag_letters(),
            self.sub.load(Ordering::Relaxed),
            self.psub.load(Ordering::Relaxed),
            self.ssub.load(Ordering::Relaxed),
            self.multi.load(Ordering::Relaxed),
            qbuf,
            4096usize.saturating_sub(qbuf),
            8192 + qbuf,
            said.cmd.as_deref().unwrap_or("NULL"),
            said.user,
            redirect,
            self.resp.load(Ordering::Relaxed),
        )
    }
}

/// What CLIENT PAUSE holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseMode {
    /// Commands that write (and may replicate): EVAL, PUBLISH, ...
    Write,
    All,
}

/// The name CLIENT LIST gives commands the table does not know.
pub fn unknown_command() -> Arc<str> {
    static UNKNOWN: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from("unknown"));
    Arc::clone(&UNKNOWN)
}

/// The `default` user's name, shared by every client that has it.
pub fn default_user() -> Arc<str> {
    static DEFAULT: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from("default"));
    Arc::clone(&DEFAULT)
}

/// The registry, one per proxy.
#[derive(Default)]
pub struct Clients {
    by_id: Mutex<BTreeMap<u64, Arc<ClientEntry>>>,
    pause: Mutex<Option<(PauseMode, Instant)>>,
    /// Whether `pause` may hold anything (checked before locking it).
    paused: AtomicBool,
    unpaused: Notify,
    monitors: Mutex<Vec<mpsc::UnboundedSender<Bytes>>>,
    monitoring: AtomicBool,
}

impl Clients {
    /// Adds a client to the registry.
    pub fn register(&self, id: u64, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientEntry> {
        let entry = Self::entry(id, addr, laddr);
        self.lock().insert(id, Arc::clone(&entry));
        entry
    }

    /// An entry no one sees (the heartbeat's probe).
    pub fn unlisted(id: u64, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientEntry> {
        Self::entry(id, addr, laddr)
    }

    fn entry(id: u64, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientEntry> {
        Arc::new(ClientEntry {
            id,
            addr,
            laddr,
            created: Stamp::now(),
            last_ms: AtomicU64::new(0),
            flags: AtomicU32::new(0),
            resp: AtomicU8::new(2),
            sub: AtomicU32::new(0),
            psub: AtomicU32::new(0),
            ssub: AtomicU32::new(0),
            multi: AtomicI64::new(-1),
            qbuf: AtomicUsize::new(0),
            said: Mutex::new(Said {
                name: None,
                user: default_user(),
                cmd: None,
                blocked_on: None,
                pushed: Vec::new(),
            }),
            redirect: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            leave_when_quiet: AtomicBool::new(false),
            attention: Wakeup::default(),
        })
    }

    pub fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ClientEntry>>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientEntry>> {
        self.lock().get(&id).cloned()
    }

    /// Every client, by id.
    pub fn all(&self) -> Vec<Arc<ClientEntry>> {
        self.lock().values().cloned().collect()
    }

    /// (connected, blocked, tracking, pubsub) counts for INFO.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let all = self.lock();
        let count = |flag| all.values().filter(|c| c.has_flag(flag)).count();
        (
            all.len(),
            count(flags::BLOCKED),
            count(flags::TRACKING),
            count(flags::PUBSUB),
        )
    }

    /// CLIENT PAUSE: holds `mode`'s commands of every client until
    /// `until`, or CLIENT UNPAUSE. A longer or stricter pause wins.
    pub fn pause(&self, mode: PauseMode, until: Instant) {
        let mut pause = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        *pause = Some(match *pause {
            Some((old, old_until)) if old_until > Instant::now() => {
                let mode = if old == PauseMode::All { old } else { mode };
                (mode, old_until.max(until))
            }
            _ => (mode, until),
        });
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn unpause(&self) {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.paused.store(false, Ordering::Relaxed);
        self.unpaused.notify_waiters();
    }

    /// Makes every held client look at its command again.
    pub fn wake_held(&self) {
        self.unpaused.notify_waiters();
    }

    /// Until when a command must wait, if a pause holds it; `writes` says
    /// whether it writes (asked only while a pause lasts).
    pub fn held_until(&self, writes: impl FnOnce() -> bool) -> Option<Instant> {
        // One load per command when nothing is paused (the usual case).
        if !self.paused.load(Ordering::Relaxed) {
            return None;
        }
        let pause = *self.pause.lock().unwrap_or_else(|e| e.into_inner());
        let (mode, until) = pause?;
        if until <= Instant::now() {
            return None;
        }
        (mode == PauseMode::All || writes()).then_some(until)
    }

    /// Resolves when the pause ends (its deadline, or CLIENT UNPAUSE).
    pub async fn wait_unpaused(&self, until: Instant) {
        let notified = self.unpaused.notified();
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(until.into()) => {}
        }
    }

    /// A new MONITOR feed: every client's commands go to `tx`.
    pub fn monitor(&self, tx: mpsc::UnboundedSender<Bytes>) {
        let mut monitors = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        monitors.push(tx);
        self.monitoring.store(true, Ordering::Relaxed);
    }

    /// Whether any client runs MONITOR (one load per command otherwise).
    pub fn is_monitored(&self) -> bool {
        self.monitoring.load(Ordering::Relaxed)
    }

    /// Sends a command to every MONITOR client, in Redis's format.
    pub fn feed(&self, client: SocketAddr, args: &[Bytes]) {
        let line = monitor_line(SystemTime::now(), client, args);
        let mut monitors = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        monitors.retain(|tx| tx.send(line.clone()).is_ok());
        self.monitoring
            .store(!monitors.is_empty(), Ordering::Relaxed);
    }
}

/// `+1339518083.107412 [0 127.0.0.1:60866] "keys" "*"`, with the secrets
/// Redis redacts (AUTH's arguments, HELLO's and MIGRATE's AUTH/AUTH2
/// values) shown as `"(redacted)"`.
pub fn monitor_line(at: SystemTime, client: SocketAddr, args: &[Bytes]) -> Bytes {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let mut line = format!(
        "+{}.{:06} [0 {client}]",
        since.as_secs(),
        since.subsec_micros()
    );
    let redacted = redacted(args);
    for (i, arg) in args.iter().enumerate() {
        line.push(' ');
        if redacted.contains(&i) {
            line.push_str("\"(redacted)\"");
        } else {
            line.push_str(&repr(arg));
        }
    }
    line.push_str("\r\n");
    Bytes::from(line)
}

/// The argument positions Redis redacts (redactClientCommandArgument) in
/// MONITOR's feed and the slow log.
pub fn redacted(args: &[Bytes]) -> Vec<usize> {
    let Some(name) = args.first().map(|a| a.to_ascii_lowercase()) else {
        return Vec::new();
    };
    let after = |keyword: &[u8], count: usize, from: usize| {
        args.iter()
            .enumerate()
            .skip(from)
            .find(|(_, a)| a.eq_ignore_ascii_case(keyword))
            .map(|(i, _)| (i + 1..=i + count).filter(|&j| j < args.len()).collect())
            .unwrap_or_default()
    };
    match name.as_slice() {
        b"auth" => (1..args.len()).collect(),
        b"acl"
            if args
                .get(1)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"setuser")) =>
        {
            (2..args.len()).collect()
        }
        // Sensitive configs' values (config.c: SENSITIVE_CONFIG).
        b"config" if args.get(1).is_some_and(|s| s.eq_ignore_ascii_case(b"set")) => args
            .iter()
            .enumerate()
            .skip(2)
            .step_by(2)
            .filter(|(_, name)| {
                [&b"masteruser"[..], b"masterauth", b"requirepass"]
                    .iter()
                    .any(|s| name.eq_ignore_ascii_case(s))
            })
            .map(|(i, _)| i + 1)
            .filter(|&i| i < args.len())
            .collect(),
        b"hello" => after(b"auth", 2, 2),
        b"migrate" => {
            let mut out: Vec<usize> = after(b"auth", 1, 6);
            out.extend(after(b"auth2", 2, 6));
            out
        }
        _ => Vec::new(),
    }
}

/// A string quoted as Redis's `sdscatrepr` does.
pub fn repr(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            7 => out.push_str("\\a"),
            8 => out.push_str("\\b"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// CLIENT KILL's filters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KillFilter {
    pub id: Option<u64>,
    pub addr: Option<String>,
    pub laddr: Option<String>,
    pub user: Option<String>,
    /// `normal`, `pubsub`, `master`, `replica`/`slave`.
    pub kind: Option<String>,
    pub skipme: bool,
    /// The old form (`CLIENT KILL ip:port`): one client, OK or an error.
    pub legacy: bool,
}

impl KillFilter {
    /// Parses the arguments after `CLIENT KILL`.
    pub fn parse(args: &[Bytes]) -> Result<Self, &'static str> {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        if args.len() == 1 {
            return Ok(Self {
                addr: Some(text(&args[0])),
                legacy: true,
                ..Self::default()
            });
        }
        if args.is_empty() || !args.len().is_multiple_of(2) {
            return Err("ERR syntax error");
        }
        let mut filter = Self {
            skipme: true,
            ..Self::default()
        };
        for pair in args.chunks(2) {
            let (key, value) = (pair[0].to_ascii_lowercase(), text(&pair[1]));
            match key.as_slice() {
                b"id" => {
                    let id = value
                        .parse::<u64>()
                        .ok()
                        .filter(|&id| id > 0 && i64::try_from(id).is_ok())
                        .ok_or("ERR client-id should be greater than 0")?;
                    filter.id = Some(id);
                }
                b"addr" => filter.addr = Some(value),
                b"laddr" => filter.laddr = Some(value),
                b"user" => filter.user = Some(value),
                b"type" => {
                    let kind = value.to_ascii_lowercase();
                    if !matches!(
                        kind.as_str(),
                        "normal" | "pubsub" | "master" | "replica" | "slave"
                    ) {
                        return Err("ERR Unknown client type");
                    }
                    filter.kind = Some(kind);
                }
                b"skipme" => {
                    filter.skipme = match value.to_ascii_lowercase().as_str() {
                        "yes" => true,
                        "no" => false,
                        _ => return Err("ERR syntax error"),
                    };
                }
                _ => return Err("ERR syntax error"),
            }
        }
        Ok(filter)
    }

    /// Whether `client` matches, `me` being the caller.
    pub fn matches(&self, client: &ClientEntry, me: u64) -> bool {
        if self.skipme && client.id == me {
            return false;
        }
        if self.id.is_some_and(|id| id != client.id) {
            return false;
        }
        if self
            .addr
            .as_ref()
            .is_some_and(|a| *a != client.addr.to_string())
        {
            return false;
        }
        if self
            .laddr
            .as_ref()
            .is_some_and(|a| *a != client.laddr.to_string())
        {
            return false;
        }
        if self.user.as_ref().is_some_and(|u| *u != client.user()) {
            return false;
        }
        match self.kind.as_deref() {
            Some("pubsub") => client.is_pubsub(),
            Some("normal") => !client.is_pubsub(),
            // The proxy has no replica or master clients.
            Some(_) => false,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn client_lines_have_redis_fields() {
        let clients = Clients::default();
        let c = clients.register(
            7,
            "10.0.0.2:5000".parse().unwrap(),
            "10.0.0.1:15379".parse().unwrap(),
        );
        c.command(&Arc::from("client|list"));
        c.set_name(Some(b("web")));
        c.set_subscriptions(2, 1, 0);
        let line = c.line();
        for field in [
            "id=7 ",
            "addr=10.0.0.2:5000 ",
            "laddr=10.0.0.1:15379 ",
            "name=web ",
            "age=0 ",
            "idle=0 ",
            "flags=P ",
            "db=0 ",
            "sub=2 ",
            "psub=1 ",
            "ssub=0 ",
            "multi=-1 ",
            "qbuf=0 ",
            "cmd=client|list ",
            "user=default ",
            "redir=-1 ",
            "resp=2",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
        c.set_multi(Some(3));
        c.set_flag(flags::BLOCKED, true);
        assert!(c.line().contains("flags=bxP "), "{}", c.line());
        assert!(c.line().contains("multi=3 "));
        assert_eq!(clients.counts(), (1, 1, 0, 1));
    }

    #[test]
    fn kill_filters_parse_and_match_as_redis() {
        let clients = Clients::default();
        let me = clients.register(
            1,
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
        );
        let other = clients.register(
            2,
            "10.0.0.3:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
        );
        let filter = KillFilter::parse(&[b("ID"), b("2")]).unwrap();
        assert!(filter.matches(&other, 1) && !filter.matches(&me, 1));
        let by_addr = KillFilter::parse(&[b("10.0.0.2:1")]).unwrap();
        assert!(
            by_addr.legacy && by_addr.matches(&me, 1),
            "the old form does not skip me"
        );
        let all = KillFilter::parse(&[b("TYPE"), b("normal"), b("SKIPME"), b("no")]).unwrap();
        assert!(all.matches(&me, 1) && all.matches(&other, 1));
        let pubsub = KillFilter::parse(&[b("TYPE"), b("pubsub")]).unwrap();
        assert!(!pubsub.matches(&other, 1));
        assert!(KillFilter::parse(&[b("TYPE"), b("nope")]).is_err());
        assert!(
            KillFilter::parse(&[b("ID")]).is_err() || KillFilter::parse(&[b("ID")]).unwrap().legacy
        );
        assert!(KillFilter::parse(&[b("FOO"), b("1")]).is_err());
    }

    #[test]
    fn pauses_hold_writes_or_everything_until_their_end() {
        let clients = Clients::default();
        assert_eq!(clients.held_until(|| true), None);
        let until = Instant::now() + Duration::from_secs(60);
        clients.pause(PauseMode::Write, until);
        assert_eq!(clients.held_until(|| false), None, "reads go on");
        assert_eq!(clients.held_until(|| true), Some(until));
        clients.pause(PauseMode::All, Instant::now() + Duration::from_secs(1));
        assert!(clients.held_until(|| false).is_some(), "ALL wins");
        clients.unpause();
        assert_eq!(clients.held_until(|| true), None);
    }

    #[test]
    fn monitor_lines_quote_and_redact_as_redis() {
        let at = UNIX_EPOCH + Duration::from_micros(1_339_518_083_107_412);
        let line = monitor_line(
            at,
            "127.0.0.1:60866".parse().unwrap(),
            &[b("set"), b("k\"1"), b("a\nb")],
        );
        assert_eq!(
            &line[..],
            b"+1339518083.107412 [0 127.0.0.1:60866] \"set\" \"k\\\"1\" \"a\\nb\"\r\n"
        );
        let auth = monitor_line(
            at,
            "127.0.0.1:1".parse().unwrap(),
            &[b("AUTH"), b("secret")],
        );
        assert!(String::from_utf8_lossy(&auth).ends_with("\"AUTH\" \"(redacted)\"\r\n"));
    }
}
