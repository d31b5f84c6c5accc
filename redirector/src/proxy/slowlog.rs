//! SLOWLOG of this proxy's clients. Every node keeps its own slow log,
//! full of the proxy's fan-outs, health probes and topology reads, in
//! another clock; a client of one Redis expects the log of its own
//! commands. The proxy times each command from its read to its reply
//! (the node's round trip included), and keeps entries as Redis does
//! (slowlog.c): the newest first, arguments trimmed and redacted, at most
//! `slowlog-max-len`, logged when at least `slowlog-log-slower-than`
//! microseconds (negative: never). Both settings follow CONFIG SET.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};

use crate::resp::{
    Protocol, reply,
    request::{self, Limits, Parsed},
};

/// Redis's SLOWLOG_ENTRY_MAX_ARGC and SLOWLOG_ENTRY_MAX_STRING.
const MAX_ARGC: usize = 32;
const MAX_STRING: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub time: u64,
    pub duration_us: u64,
    pub args: Vec<Bytes>,
    pub peer: String,
    pub name: Bytes,
}

#[derive(Default)]
struct Log {
    next_id: u64,
    entries: VecDeque<Entry>,
}

pub struct SlowLog {
    slower_than_us: AtomicI64,
    max_len: AtomicUsize,
    log: Mutex<Log>,
}

impl Default for SlowLog {
    /// Redis's defaults.
    fn default() -> Self {
        Self {
            slower_than_us: AtomicI64::new(10_000),
            max_len: AtomicUsize::new(128),
            log: Mutex::new(Log::default()),
        }
    }
}

impl SlowLog {
    /// Whether a command's arguments must be kept until its reply: the
    /// log is on.
    pub fn enabled(&self) -> bool {
        self.slower_than_us.load(Ordering::Relaxed) >= 0
    }

    /// Whether a command that took `took` goes into the log.
    pub fn is_slow(&self, took: Duration) -> bool {
        let threshold = self.slower_than_us.load(Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        threshold >= 0 && micros >= threshold.unsigned_abs()
    }

    /// Logs the command in `raw` (as the client sent it) if it took long
    /// enough.
    pub fn record(&self, raw: &Bytes, took: Duration, peer: SocketAddr, name: Option<Bytes>) {
        if !self.is_slow(took) {
            return;
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut buf = BytesMut::from(&raw[..]);
        let Ok(Parsed::Request(req)) = request::parse(&mut buf, &Limits::default()) else {
            return;
        };
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let id = log.next_id;
        log.next_id += 1;
        log.entries.push_front(Entry {
            id,
            time,
            duration_us: micros,
            args: logged_args(req.args()),
            peer: peer.to_string(),
            name: name.unwrap_or_default(),
        });
        let max = self.max_len.load(Ordering::Relaxed);
        log.entries.truncate(max);
    }

    /// CONFIG SET went through: keep the slow log's own settings.
    pub fn configured(&self, args: &[Bytes]) {
        for pair in args.get(2..).unwrap_or_default().chunks_exact(2) {
            let Some(value) = std::str::from_utf8(&pair[1]).ok() else {
                continue;
            };
            if pair[0].eq_ignore_ascii_case(b"slowlog-log-slower-than") {
                if let Ok(v) = value.parse() {
                    self.slower_than_us.store(v, Ordering::Relaxed);
                }
            } else if pair[0].eq_ignore_ascii_case(b"slowlog-max-len")
                && let Ok(v) = value.parse::<usize>()
            {
                self.max_len.store(v, Ordering::Relaxed);
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                log.entries.truncate(v);
            }
        }
    }

    /// SLOWLOG GET/LEN/RESET/HELP, as Redis answers them.
    pub fn command(&self, args: &[Bytes], protocol: Protocol) -> Bytes {
        let sub = args
            .get(1)
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        match (sub.as_slice(), args.len()) {
            (b"reset", 2) => {
                log.entries.clear();
                reply::ok()
            }
            (b"len", 2) => reply::build(protocol, |e| e.integer(log.entries.len() as i64)),
            (b"get", 2 | 3) => {
                let count = match args
                    .get(2)
                    .map(|c| std::str::from_utf8(c).map(str::parse::<i64>))
                {
                    None => 10,
                    Some(Ok(Ok(c))) if c >= -1 => c,
                    Some(Ok(Ok(_))) => {
                        return reply::error("ERR count should be greater than or equal to -1");
                    }
                    Some(_) => return reply::error("ERR value is not an integer or out of range"),
                };
                let count = usize::try_from(count).unwrap_or(log.entries.len());
                reply::build(protocol, |e| {
                    let shown: Vec<&Entry> = log.entries.iter().take(count).collect();
                    e.array(shown.len());
                    for entry in shown {
                        e.array(6);
                        e.integer(entry.id as i64);
                        e.integer(entry.time as i64);
                        e.integer(entry.duration_us as i64);
                        e.array(entry.args.len());
                        for arg in &entry.args {
                            e.bulk(arg);
                        }
                        e.bulk(entry.peer.as_bytes());
                        e.bulk(&entry.name);
                    }
                })
            }
            (b"help", 2) => reply::build(protocol, |e| {
                let lines = [
                    "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GET [<count>]",
                    "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
                    "    Entries are made of:",
                    "    id, timestamp, time in microseconds, arguments array, client IP and port,",
                    "    client name",
                    "LEN",
                    "    Return the length of the slowlog.",
                    "RESET",
                    "    Reset the slowlog.",
                    "HELP",
                    "    Prints this help.",
                ];
                e.array(lines.len());
                for line in lines {
                    e.simple(line);
                }
            }),
            _ => reply::error(&format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try SLOWLOG HELP.",
                String::from_utf8_lossy(args.get(1).map_or(&b""[..], |s| &s[..]))
            )),
        }
    }
}

/// The arguments as Redis logs them: redacted where Redis redacts, at most
/// 32 (the last saying how many more), strings cut at 128 bytes.
pub fn logged_args(args: &[Bytes]) -> Vec<Bytes> {
    let redacted = super::clients::redacted(args);
    let argc = args.len().min(MAX_ARGC);
    (0..argc)
        .map(|j| {
            if argc != args.len() && j == argc - 1 {
                return Bytes::from(format!("... ({} more arguments)", args.len() - argc + 1));
            }
            if redacted.contains(&j) {
                return Bytes::from_static(b"(redacted)");
            }
            let arg = &args[j];
            if arg.len() > MAX_STRING {
                let mut cut = arg[..MAX_STRING].to_vec();
                cut.extend_from_slice(
                    format!("... ({} more bytes)", arg.len() - MAX_STRING).as_bytes(),
                );
                return Bytes::from(cut);
            }
            arg.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_args as args;

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn entries_are_trimmed_and_redacted_as_redis_logs_them() {
        let many: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let mut words = vec!["sadd", "set"];
        words.extend(many.iter().map(String::as_str));
        let logged = logged_args(&args(&words));
        assert_eq!(logged.len(), 32);
        assert_eq!(logged[31], "... (11 more arguments)");
        let long = "A".repeat(129);
        assert_eq!(
            logged_args(&args(&["sadd", "set", &long]))[2],
            format!("{}... (1 more bytes)", "A".repeat(128))
        );
        assert_eq!(
            logged_args(&args(&[
                "config",
                "set",
                "masterauth",
                "x",
                "maxmemory",
                "1"
            ])),
            args(&[
                "config",
                "set",
                "masterauth",
                "(redacted)",
                "maxmemory",
                "1"
            ])
        );
        assert_eq!(
            logged_args(&args(&["acl", "setuser", "u", "on", ">pw"])),
            args(&["acl", "setuser", "(redacted)", "(redacted)", "(redacted)"])
        );
    }

    #[test]
    fn the_log_keeps_what_is_slow_enough_newest_first_up_to_its_length() {
        let log = SlowLog::default();
        let raw = |words: &[&str]| request::encode(&args(words));
        log.record(
            &raw(&["get", "fast"]),
            Duration::from_millis(1),
            peer(),
            None,
        );
        assert_eq!(
            log.command(&args(&["slowlog", "len"]), Protocol::Resp2),
            ":0\r\n"
        );
        log.configured(&args(&[
            "config",
            "set",
            "slowlog-log-slower-than",
            "0",
            "slowlog-max-len",
            "2",
        ]));
        for key in ["a", "b", "c"] {
            log.record(
                &raw(&["get", key]),
                Duration::from_micros(5),
                peer(),
                Some("app".into()),
            );
        }
        assert_eq!(
            log.command(&args(&["slowlog", "len"]), Protocol::Resp2),
            ":2\r\n"
        );
        let got = log.command(&args(&["slowlog", "get", "1"]), Protocol::Resp2);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("*1\r\n*6\r\n:2\r\n"), "{text}");
        assert!(
            text.contains(
                ":5\r\n*2\r\n$3\r\nget\r\n$1\r\nc\r\n$14\r\n127.0.0.1:5000\r\n$3\r\napp\r\n"
            ),
            "{text}"
        );
        assert_eq!(
            log.command(&args(&["slowlog", "get", "-2"]), Protocol::Resp2),
            reply::error("ERR count should be greater than or equal to -1")
        );
        log.configured(&args(&["config", "set", "slowlog-log-slower-than", "-1"]));
        log.record(&raw(&["get", "d"]), Duration::from_secs(1), peer(), None);
        assert_eq!(
            log.command(&args(&["slowlog", "reset"]), Protocol::Resp2),
            reply::ok()
        );
        assert_eq!(
            log.command(&args(&["slowlog", "len"]), Protocol::Resp2),
            ":0\r\n"
        );
    }
}
