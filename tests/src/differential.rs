//! Differential fuzzing, the pure part: a seeded generator of random but
//! valid command sequences, and the named rules that say which differences
//! between the proxy's reply and one standalone Redis's reply are expected.
//! No sockets here; [`driver`] sends the commands to both sides.
//!
//! Keys carry one of a few hash tags (`{a}`, `{b}`, `{c}`), so multi-key
//! commands mostly stay in one slot and cross-slot refusals do not drown
//! the signal. Cross-tag commands are generated on purpose, but only where
//! the refusal leaves both keyspaces equal: read-only commands, or a
//! transaction of reads, which the proxy aborts and Redis runs.

pub mod driver;

use redis_protocol::resp2::{decode::decode, types::OwnedFrame};

/// SplitMix64 (Steele, Lea, Flood 2014): the `rand` crates are not in
/// Cargo.lock, and a reproducible sequence from one `u64` seed is all the
/// generator needs; six lines, no dependency, the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (`n` is tiny next to 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below(hi.abs_diff(lo) + 1) as i64
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// [`Self::pick`] for words, by value.
    pub fn word(&mut self, words: &[&'static str]) -> &'static str {
        words[self.below(words.len() as u64) as usize]
    }
}

/// The hash tags keys are drawn from: three slots (15495, 3300, 7365) that
/// land on three different masters of an evenly split 3-master cluster.
pub const TAGS: [&str; 3] = ["a", "b", "c"];

/// How a reply from the proxy is compared with the reply from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// Decoded frames must be equal.
    Exact,
    /// `crossslot`: the command's keys span tags on purpose; the proxy
    /// answers Redis Cluster's `CROSSSLOT` where one Redis runs it. Only
    /// generated for commands that change nothing, so the keyspaces stay
    /// equal.
    CrossSlot,
    /// `crossslot_execabort`: `EXEC` of a transaction (of reads only) that
    /// queued a cross-tag command: the proxy answers `EXECABORT`, Redis runs
    /// it.
    CrossSlotExecAbort,
    /// `unordered`: set-like replies (`SMEMBERS`, `SUNION`, `HKEYS`, `KEYS`,
    /// ...) whose order follows the server's hash table, seeded per process
    /// (and, for `KEYS`, the proxy merges one list per master).
    Unordered,
    /// `unordered_pairs`: `HGETALL`: field-value pairs in hash-table order.
    UnorderedPairs,
    /// `random_pick`: `SRANDMEMBER`, `HRANDFIELD`, `ZRANDMEMBER`,
    /// `RANDOMKEY`: random by definition; the reply's shape (kind, length,
    /// nil or not, the error) must match.
    RandomPick,
    /// `clock`: `TTL`, `PTTL`, `EXPIRETIME`, `PEXPIRETIME`: each side set
    /// and read the expiry at its own instant; non-negative values may
    /// differ by `tolerance`, the `-1`/`-2` answers must not.
    Clock { tolerance: i64 },
    /// `info_keyspace`: `INFO keyspace`: only `keys=` and `expires=` of
    /// each db are compared (`avg_ttl` is a sampled estimate, and the proxy
    /// sums the masters').
    InfoKeyspace,
    /// `client_id`: `CLIENT ID` numbers connections per server; an integer
    /// on both sides is all that is the same.
    ClientId,
    /// `EXEC`: element by element, with the masks of the queued commands.
    Exec(Vec<Mask>),
}

impl Mask {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::CrossSlot => "crossslot",
            Self::CrossSlotExecAbort => "crossslot_execabort",
            Self::Unordered => "unordered",
            Self::UnorderedPairs => "unordered_pairs",
            Self::RandomPick => "random_pick",
            Self::Clock { .. } => "clock",
            Self::InfoKeyspace => "info_keyspace",
            Self::ClientId => "client_id",
            Self::Exec(_) => "exec",
        }
    }
}

/// The mask a command's reply is compared under, from the command alone.
/// Cross-tag and transaction masks are the generator's to set: they depend
/// on what it meant, not on the words.
pub fn mask_for(args: &[Vec<u8>]) -> Mask {
    let word = |i: usize| {
        args.get(i)
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
            .unwrap_or_default()
    };
    match word(0).as_str() {
        "SMEMBERS" | "SUNION" | "SINTER" | "SDIFF" | "HKEYS" | "HVALS" | "KEYS" => Mask::Unordered,
        "HGETALL" => Mask::UnorderedPairs,
        // A count at least the set's size takes every member: no choice.
        "SPOP" => Mask::Unordered,
        "SRANDMEMBER" | "HRANDFIELD" | "ZRANDMEMBER" | "RANDOMKEY" => Mask::RandomPick,
        "TTL" | "EXPIRETIME" => Mask::Clock { tolerance: 1 },
        "PTTL" | "PEXPIRETIME" => Mask::Clock { tolerance: 1000 },
        "INFO" => Mask::InfoKeyspace,
        "CLIENT" if word(1) == "ID" => Mask::ClientId,
        _ => Mask::Exact,
    }
}

/// The outcome of comparing one pair of replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Equal,
    /// Different bytes, accepted by the named rule.
    Masked(&'static str),
    /// A difference no rule accepts, and why.
    Differ(String),
}

/// Compares the proxy's reply with Redis's (each one whole RESP2 frame).
pub fn compare(mask: &Mask, proxy: &[u8], redis: &[u8]) -> Verdict {
    if proxy == redis {
        return Verdict::Equal;
    }
    match (frame(proxy), frame(redis)) {
        (Some(p), Some(r)) => compare_frames(mask, &p, &r),
        _ => Verdict::Differ("a reply is not one RESP2 frame".into()),
    }
}

fn frame(bytes: &[u8]) -> Option<OwnedFrame> {
    match decode(bytes) {
        Ok(Some((f, used))) if used == bytes.len() => Some(f),
        _ => None,
    }
}

fn compare_frames(mask: &Mask, p: &OwnedFrame, r: &OwnedFrame) -> Verdict {
    use OwnedFrame::{Array, Error, Integer, Null};
    if p == r {
        return Verdict::Equal;
    }
    let name = mask.name();
    let differ = || Verdict::Differ(format!("rule `{name}` does not accept it"));
    let accept = |ok: bool| {
        if ok { Verdict::Masked(name) } else { differ() }
    };
    match mask {
        Mask::Exact => Verdict::Differ("the replies differ".into()),
        Mask::CrossSlot => accept(matches!(p, Error(e) if e.starts_with("CROSSSLOT "))),
        Mask::CrossSlotExecAbort => {
            accept(matches!(p, Error(e) if e.starts_with("EXECABORT ")) && matches!(r, Array(_)))
        }
        Mask::Unordered => match (p, r) {
            (Array(a), Array(b)) => accept(sorted(a) == sorted(b)),
            _ => differ(),
        },
        Mask::UnorderedPairs => match (p, r) {
            (Array(a), Array(b)) if a.len() % 2 == 0 && b.len() % 2 == 0 => {
                accept(sorted_pairs(a) == sorted_pairs(b))
            }
            _ => differ(),
        },
        Mask::RandomPick => accept(same_shape(p, r)),
        Mask::Clock { tolerance } => match (p, r) {
            (Integer(a), Integer(b)) => accept(*a >= 0 && *b >= 0 && (a - b).abs() <= *tolerance),
            _ => differ(),
        },
        Mask::InfoKeyspace => match (p, r) {
            (OwnedFrame::BulkString(a), OwnedFrame::BulkString(b)) => {
                accept(keyspace_counts(a) == keyspace_counts(b))
            }
            _ => differ(),
        },
        Mask::ClientId => accept(matches!((p, r), (Integer(_), Integer(_)))),
        Mask::Exec(masks) => match (p, r) {
            (Array(a), Array(b)) if a.len() == b.len() && a.len() == masks.len() => {
                let mut verdict = Verdict::Equal;
                for ((m, x), y) in masks.iter().zip(a).zip(b) {
                    match compare_frames(m, x, y) {
                        Verdict::Equal => {}
                        Verdict::Masked(rule) => verdict = Verdict::Masked(rule),
                        Verdict::Differ(why) => {
                            return Verdict::Differ(format!("inside EXEC: {why}"));
                        }
                    }
                }
                verdict
            }
            (Null, Null) => Verdict::Equal,
            _ => Verdict::Differ("the EXEC replies differ".into()),
        },
    }
}

/// An order-free view of a list of frames.
fn sorted(items: &[OwnedFrame]) -> Vec<String> {
    let mut keys: Vec<String> = items.iter().map(|f| format!("{f:?}")).collect();
    keys.sort_unstable();
    keys
}

fn sorted_pairs(items: &[OwnedFrame]) -> Vec<String> {
    let mut keys: Vec<String> = items.chunks(2).map(|pair| format!("{pair:?}")).collect();
    keys.sort_unstable();
    keys
}

/// Same kind of frame, same length for arrays, same text for errors.
fn same_shape(p: &OwnedFrame, r: &OwnedFrame) -> bool {
    use OwnedFrame::{Array, BulkString, Error, Integer, Null, SimpleString};
    match (p, r) {
        (Array(a), Array(b)) => a.len() == b.len(),
        (Error(a), Error(b)) => a == b,
        (BulkString(_), BulkString(_))
        | (SimpleString(_), SimpleString(_))
        | (Integer(_), Integer(_))
        | (Null, Null) => true,
        _ => false,
    }
}

/// `(db, keys, expires)` from the `# Keyspace` section of an `INFO` reply.
fn keyspace_counts(info: &[u8]) -> Vec<(String, String, String)> {
    String::from_utf8_lossy(info)
        .lines()
        .filter_map(|line| {
            let (db, fields) = line.split_once(':')?;
            if !db.starts_with("db") {
                return None;
            }
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name))
                    .unwrap_or_default()
                    .to_string()
            };
            Some((db.to_string(), field("keys="), field("expires=")))
        })
        .collect()
}

/// One command and how its reply is compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub args: Vec<Vec<u8>>,
    pub mask: Mask,
    /// Sent by a second client (its own connection on each side): the
    /// write that breaks another client's `WATCH`.
    pub other: bool,
}

impl Command {
    fn new(args: Vec<Vec<u8>>) -> Self {
        let mask = mask_for(&args);
        Self {
            args,
            mask,
            other: false,
        }
    }

    /// `EXEC`, its reply compared under `mask`.
    fn exec(mask: Mask) -> Self {
        Self {
            args: vec![b"EXEC".to_vec()],
            mask,
            other: false,
        }
    }

    /// The command as `redis-cli` would take it, for reports.
    pub fn display(&self) -> String {
        self.args
            .iter()
            .map(|a| {
                let text = a.escape_ascii().to_string();
                if text.is_empty() || text.contains([' ', '"', '\\']) {
                    format!("\"{}\"", text.replace('"', "\\\""))
                } else {
                    text
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the generator emits: one command, or a whole transaction (so a
/// shrinker never splits `MULTI` from its `EXEC`).
pub type Unit = Vec<Command>;

/// Scripts run with `EVAL`: keys all in one tag (`KEYS[2]` shares the tag
/// of `KEYS[1]`), numkeys, and the body.
const SCRIPTS: [(usize, &str); 9] = [
    (1, "return redis.call('INCR', KEYS[1])"),
    (
        1,
        "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])",
    ),
    (1, "return redis.call('RPUSH', KEYS[1], ARGV[1])"),
    (
        2,
        "return {redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', KEYS[2])}",
    ),
    (1, "return redis.pcall('HINCRBY', KEYS[1], 'f', 1)"),
    (
        1,
        "return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')",
    ),
    (0, "return tonumber(ARGV[1]) * 2"),
    (1, "return redis.call('NOSUCHCOMMAND', KEYS[1])"),
    (
        2,
        "local v = redis.call('GET', KEYS[1]); if v then redis.call('SET', KEYS[2], v) end; return v",
    ),
];

/// Read-only scripts, for `EVAL_RO`.
const RO_SCRIPTS: [&str; 2] = [
    "return redis.call('GET', KEYS[1])",
    "return redis.call('LRANGE', KEYS[1], 0, -1)",
];

/// The script the driver loads with `SCRIPT LOAD` before a run, so
/// `EVALSHA` has something to call.
pub const LOADED_SCRIPT: &str = "return {KEYS[1], redis.call('TYPE', KEYS[1])['ok'], ARGV[1]}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    List,
    Hash,
    Set,
    Zset,
    Stream,
}

const KINDS: [Kind; 6] = [
    Kind::Str,
    Kind::List,
    Kind::Hash,
    Kind::Set,
    Kind::Zset,
    Kind::Stream,
];

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Self::Str => "str",
            Self::List => "list",
            Self::Hash => "hash",
            Self::Set => "set",
            Self::Zset => "zset",
            Self::Stream => "stream",
        }
    }
}

/// A command being built: `b("SET").k(&key).s("v")`.
struct B(Vec<Vec<u8>>);

fn b(name: &str) -> B {
    B(vec![name.as_bytes().to_vec()])
}

impl B {
    fn s(mut self, word: &str) -> Self {
        self.0.push(word.as_bytes().to_vec());
        self
    }

    fn v(mut self, bytes: Vec<u8>) -> Self {
        self.0.push(bytes);
        self
    }

    fn n(self, n: i64) -> Self {
        self.s(&n.to_string())
    }

    fn cmd(self) -> Command {
        Command::new(self.0)
    }
}

/// The seeded generator. The same seed (and loaded script SHA) gives the
/// same units, forever: a failing seed is a reproducible bug report.
pub struct Generator {
    rng: SplitMix64,
    /// Stream IDs come from here, increasing over the whole run, so `XADD`
    /// never depends on the clock (`*` would give each side its own IDs).
    stream_seq: u64,
    loaded_sha: String,
    /// Inside `MULTI`: commands the proxy splits per slot stay in one tag,
    /// as a transaction runs on one master.
    in_multi: bool,
}

impl Generator {
    pub fn new(seed: u64, loaded_sha: &str) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            stream_seq: 1,
            loaded_sha: loaded_sha.to_string(),
            in_multi: false,
        }
    }

    /// The next unit: mostly single commands, sometimes a transaction.
    pub fn unit(&mut self) -> Unit {
        match self.rng.below(100) {
            0..=6 => self.transaction(),
            7..=9 => self.cross_tag(),
            // A pipeline: the driver sends a unit in one write.
            10..=17 => (0..self.rng.range(2, 6))
                .map(|_| {
                    let tag = self.tag();
                    self.command(tag)
                })
                .collect(),
            _ => {
                let tag = *self.rng.pick(&TAGS);
                vec![self.command(tag)]
            }
        }
    }

    fn tag(&mut self) -> &'static str {
        self.rng.word(&TAGS)
    }

    /// A tag for one key of a command the proxy splits per slot: any tag,
    /// except in a transaction.
    fn spread_tag(&mut self, tag: &'static str) -> &'static str {
        if self.in_multi { tag } else { self.tag() }
    }

    /// A key of `kind` (sometimes of another kind, for `WRONGTYPE`) in `tag`.
    fn key(&mut self, tag: &str, kind: Kind) -> Vec<u8> {
        let kind = if self.rng.chance(5) {
            *self.rng.pick(&KINDS)
        } else {
            kind
        };
        format!("{{{tag}}}:{}:{}", kind.word(), self.rng.below(3)).into_bytes()
    }

    /// A value: mostly short words and small numbers (so `INCR` works, and
    /// fails on words), sometimes binary, sometimes long.
    fn value(&mut self) -> Vec<u8> {
        match self.rng.below(20) {
            0..=7 => self
                .rng
                .word(&["a", "b", "c", "d", "e", "hello", "x y", ""])
                .into(),
            8..=14 => self.rng.range(-5, 40).to_string().into_bytes(),
            15 => self
                .rng
                .word(&["1.5", "-0.25", "3e2", "inf"])
                .as_bytes()
                .to_vec(),
            16 => vec![0, b'\r', b'\n', 0xff, b'$'],
            17 => vec![b'z'; self.rng.range(65, 300) as usize],
            _ => format!("v{}", self.rng.below(1000)).into_bytes(),
        }
    }

    /// A set or hash member: a small pool, so members repeat; sometimes a
    /// number, which keeps sets as intsets.
    fn member(&mut self) -> String {
        if self.rng.chance(40) {
            self.rng.below(200).to_string()
        } else {
            format!("m{}", self.rng.below(12))
        }
    }

    fn score(&mut self) -> String {
        match self.rng.below(10) {
            0 => "-inf".into(),
            1 => "+inf".into(),
            2 => "0.5".into(),
            _ => self.rng.range(-10, 30).to_string(),
        }
    }

    fn index(&mut self) -> i64 {
        self.rng.range(-6, 8)
    }

    fn command(&mut self, tag: &'static str) -> Command {
        match self.rng.below(100) {
            0..=17 => self.string(tag),
            18..=31 => self.list(tag),
            32..=45 => self.hash(tag),
            46..=58 => self.set(tag),
            59..=72 => self.zset(tag),
            73..=81 => self.stream(tag),
            82..=91 => self.generic(tag),
            _ => self.script(tag),
        }
    }

    fn string(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::Str);
        let v = self.value();
        let r = &mut self.rng;
        match r.below(22) {
            0 => b("SET").v(k).v(v).cmd(),
            1 => b("SET").v(k).v(v).s(r.word(&["NX", "XX", "GET"])).cmd(),
            2 => b("SET").v(k).v(v).s("EX").n(r.range(100, 10_000)).cmd(),
            3 => b("SET").v(k).v(v).s("KEEPTTL").cmd(),
            4 | 5 => b("GET").v(k).cmd(),
            6 => b("INCR").v(k).cmd(),
            7 => b("INCRBY").v(k).n(r.range(-100, 100)).cmd(),
            8 => b("DECR").v(k).cmd(),
            9 => b("INCRBYFLOAT")
                .v(k)
                .s(r.word(&["1.5", "-2", "0.1", "1e3"]))
                .cmd(),
            10 => b("APPEND").v(k).v(v).cmd(),
            11 => b("STRLEN").v(k).cmd(),
            12 => b("GETRANGE")
                .v(k)
                .n(r.range(-5, 5))
                .n(r.range(-5, 10))
                .cmd(),
            13 => b("SETRANGE").v(k).n(r.range(0, 20)).v(v).cmd(),
            14 => b("GETDEL").v(k).cmd(),
            15 => b("GETEX").v(k).s(r.word(&["PERSIST", "EX"])).n(500).cmd(),
            16 => b("SETNX").v(k).v(v).cmd(),
            17 => b("GETSET").v(k).v(v).cmd(),
            18 => b("SETEX").v(k).n(r.range(100, 1000)).v(v).cmd(),
            19 => {
                let k2 = self.key(tag, Kind::Str);
                b("LCS").v(k).v(k2).cmd()
            }
            20 => {
                let (k2, v2) = (self.key(tag, Kind::Str), self.value());
                b("MSETNX").v(k).v(v).v(k2).v(v2).cmd()
            }
            _ => {
                // MGET/MSET are split per slot by the proxy: any tags.
                let mut c = b(if self.rng.chance(50) { "MGET" } else { "MSET" });
                let set = c.0[0] == b"MSET";
                for _ in 0..self.rng.range(1, 4) {
                    let t = self.spread_tag(tag);
                    c = c.v(self.key(t, Kind::Str));
                    if set {
                        c = c.v(self.value());
                    }
                }
                c.cmd()
            }
        }
    }

    fn list(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::List);
        let v = self.value();
        let i = self.index();
        let j = self.index();
        let r = &mut self.rng;
        match r.below(18) {
            0..=2 => {
                let mut c = b(r.word(&["LPUSH", "RPUSH", "LPUSHX", "RPUSHX"])).v(k).v(v);
                for _ in 0..r.below(3) {
                    c = c.s(r.word(&["p", "q", "7"]));
                }
                c.cmd()
            }
            3 => b("LPOP").v(k).cmd(),
            4 => b("RPOP").v(k).n(r.range(0, 3)).cmd(),
            5 | 6 => b("LRANGE").v(k).n(i).n(j).cmd(),
            7 => b("LLEN").v(k).cmd(),
            8 => b("LINDEX").v(k).n(i).cmd(),
            9 => b("LSET").v(k).n(i).v(v).cmd(),
            10 => b("LREM").v(k).n(r.range(-2, 2)).v(v).cmd(),
            11 => b("LTRIM").v(k).n(i).n(j).cmd(),
            12 => b("LINSERT")
                .v(k)
                .s(r.word(&["BEFORE", "AFTER"]))
                .s("p")
                .v(v)
                .cmd(),
            13 => b("LPOS")
                .v(k)
                .s(r.word(&["p", "a", "7"]))
                .s("COUNT")
                .n(0)
                .cmd(),
            14 => {
                let k2 = self.key(tag, Kind::List);
                b("LMOVE").v(k).v(k2).s("LEFT").s("RIGHT").cmd()
            }
            15 => {
                let k2 = self.key(tag, Kind::List);
                b("RPOPLPUSH").v(k).v(k2).cmd()
            }
            16 => {
                let k2 = self.key(tag, Kind::List);
                b("LMPOP").n(2).v(k).v(k2).s("LEFT").s("COUNT").n(2).cmd()
            }
            _ => b("SORT").v(k).s("ALPHA").s("LIMIT").n(0).n(5).cmd(),
        }
    }

    fn hash(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::Hash);
        let f = self.member();
        let v = self.value();
        let r = &mut self.rng;
        match r.below(16) {
            0..=2 => {
                let mut c = b("HSET").v(k).s(&f).v(v);
                for n in 0..r.below(4) {
                    c = c.s(&format!("f{n}")).n(n as i64);
                }
                c.cmd()
            }
            3 | 4 => b("HGET").v(k).s(&f).cmd(),
            5 => b("HDEL").v(k).s(&f).s("f1").cmd(),
            6 => b("HEXISTS").v(k).s(&f).cmd(),
            7 => b("HINCRBY").v(k).s(&f).n(r.range(-5, 5)).cmd(),
            8 => b("HINCRBYFLOAT").v(k).s(&f).s("0.5").cmd(),
            9 => b("HLEN").v(k).cmd(),
            10 => b("HMGET").v(k).s(&f).s("f0").s("f2").cmd(),
            11 => b("HSETNX").v(k).s(&f).v(v).cmd(),
            12 => b("HSTRLEN").v(k).s(&f).cmd(),
            13 => b("HGETALL").v(k).cmd(),
            14 => b(r.word(&["HKEYS", "HVALS"])).v(k).cmd(),
            _ => b("HRANDFIELD").v(k).n(r.range(-3, 3)).cmd(),
        }
    }

    fn set(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::Set);
        let k2 = self.key(tag, Kind::Set);
        let m = self.member();
        match self.rng.below(16) {
            0..=3 => {
                let mut c = b("SADD").v(k).s(&m);
                // Now and then enough members for a hash table encoding.
                let many = if self.rng.chance(10) { 150 } else { 3 };
                for _ in 0..self.rng.below(many) {
                    c = c.s(&self.member());
                }
                c.cmd()
            }
            4 => b("SREM").v(k).s(&m).s("m1").cmd(),
            5 => b("SCARD").v(k).cmd(),
            6 => b("SISMEMBER").v(k).s(&m).cmd(),
            7 => b("SMISMEMBER").v(k).s(&m).s("m2").cmd(),
            8 | 9 => b("SMEMBERS").v(k).cmd(),
            10 => b("SMOVE").v(k).v(k2).s(&m).cmd(),
            11 => b(self.rng.word(&["SINTERSTORE", "SUNIONSTORE", "SDIFFSTORE"]))
                .v(k)
                .v(k2)
                .v(self.key(tag, Kind::Set))
                .cmd(),
            12 => b(self.rng.word(&["SUNION", "SINTER", "SDIFF"]))
                .v(k)
                .v(k2)
                .cmd(),
            13 => b("SINTERCARD").n(2).v(k).v(k2).cmd(),
            14 => b("SRANDMEMBER").v(k).n(self.rng.range(-3, 3)).cmd(),
            // Larger than any set built here: all members, no random pick.
            _ => b("SPOP").v(k).n(100_000).cmd(),
        }
    }

    fn zset(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::Zset);
        let k2 = self.key(tag, Kind::Zset);
        let m = self.member();
        let s = self.score();
        let (i, j) = (self.index(), self.index());
        let r = &mut self.rng;
        match r.below(18) {
            0..=3 => {
                let mut c = b("ZADD").v(k);
                if r.chance(20) {
                    c = c.s(r.word(&["NX", "XX", "GT", "LT", "CH"]));
                }
                c.s(&s).s(&m).n(r.range(0, 9)).s("m3").cmd()
            }
            4 => b("ZINCRBY")
                .v(k)
                .s(r.word(&["1", "-2.5", "10"]))
                .s(&m)
                .cmd(),
            5 => b("ZSCORE").v(k).s(&m).cmd(),
            6 => b(r.word(&["ZRANK", "ZREVRANK"])).v(k).s(&m).cmd(),
            7 | 8 => {
                let c = b("ZRANGE").v(k).n(i).n(j);
                if r.chance(50) {
                    c.s("WITHSCORES").cmd()
                } else {
                    c.cmd()
                }
            }
            9 => b("ZRANGE")
                .v(k)
                .s(r.word(&["-inf", "(0", "1"]))
                .s(r.word(&["+inf", "5", "(20"]))
                .s("BYSCORE")
                .s("LIMIT")
                .n(0)
                .n(r.range(1, 5))
                .cmd(),
            10 => b("ZCARD").v(k).cmd(),
            11 => b("ZCOUNT").v(k).s("-inf").s(&s).cmd(),
            12 => b("ZREM").v(k).s(&m).cmd(),
            13 => b(r.word(&["ZPOPMIN", "ZPOPMAX"]))
                .v(k)
                .n(r.range(1, 3))
                .cmd(),
            14 => b(r.word(&["ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"]))
                .v(k)
                .n(2)
                .v(k2)
                .v(self.key(tag, Kind::Zset))
                .cmd(),
            15 => b("ZMSCORE").v(k).s(&m).s("m3").cmd(),
            16 => b("ZRANGESTORE").v(k).v(k2).n(0).n(-1).cmd(),
            _ => b("ZREMRANGEBYRANK").v(k).n(i).n(j).cmd(),
        }
    }

    fn stream(&mut self, tag: &'static str) -> Command {
        let k = self.key(tag, Kind::Stream);
        let v = self.value();
        let r = &mut self.rng;
        match r.below(12) {
            0..=3 => {
                self.stream_seq += self.rng.below(3) + 1;
                let id = format!("{}-{}", self.stream_seq, self.rng.below(2));
                b("XADD").v(k).s(&id).s("f").v(v).cmd()
            }
            4 => b("XLEN").v(k).cmd(),
            5 => b("XRANGE")
                .v(k)
                .s("-")
                .s("+")
                .s("COUNT")
                .n(r.range(1, 10))
                .cmd(),
            6 => b("XREVRANGE").v(k).s("+").s("-").cmd(),
            7 => b("XDEL")
                .v(k)
                .s(&format!("{}-0", r.below(self.stream_seq + 1)))
                .cmd(),
            8 => b("XTRIM").v(k).s("MAXLEN").n(r.range(0, 5)).cmd(),
            9 => b("XREAD").s("COUNT").n(3).s("STREAMS").v(k).s("0").cmd(),
            10 => b("XGROUP")
                .s("CREATE")
                .v(k)
                .s("g")
                .s("0")
                .s("MKSTREAM")
                .cmd(),
            _ => match r.below(3) {
                0 => b("XREADGROUP")
                    .s("GROUP")
                    .s("g")
                    .s("c1")
                    .s("COUNT")
                    .n(2)
                    .s("STREAMS")
                    .v(k)
                    .s(">")
                    .cmd(),
                1 => b("XACK")
                    .v(k)
                    .s("g")
                    .s(&format!("{}-0", self.stream_seq))
                    .cmd(),
                _ => b("XPENDING").v(k).s("g").cmd(),
            },
        }
    }

    fn generic(&mut self, tag: &'static str) -> Command {
        let kind = *self.rng.pick(&KINDS);
        let k = self.key(tag, kind);
        let k2 = self.key(tag, kind);
        let r = &mut self.rng;
        match r.below(24) {
            0 => b("DEL").v(k).cmd(),
            1 => b("EXISTS").v(k).v(k2).cmd(),
            2 | 3 => b("TYPE").v(k).cmd(),
            4 => b("RENAME").v(k).v(k2).cmd(),
            5 => b("RENAMENX").v(k).v(k2).cmd(),
            6 => b("COPY").v(k).v(k2).s("REPLACE").cmd(),
            7 => {
                let c = b("EXPIRE").v(k).n(r.range(100, 100_000));
                if r.chance(30) {
                    c.s(r.word(&["NX", "XX", "GT", "LT"])).cmd()
                } else {
                    c.cmd()
                }
            }
            // Expiring at once: deterministic on both sides.
            8 => b(r.word(&["EXPIRE", "PEXPIRE"]))
                .v(k)
                .n(r.range(-5, 0))
                .cmd(),
            9 => b("PEXPIRE").v(k).n(r.range(100_000, 10_000_000)).cmd(),
            10 => b("EXPIREAT")
                .v(k)
                .n(r.range(4_000_000_000, 4_000_001_000))
                .cmd(),
            11 => b("PERSIST").v(k).cmd(),
            12 | 13 => b(r.word(&["TTL", "PTTL"])).v(k).cmd(),
            14 => b(r.word(&["EXPIRETIME", "PEXPIRETIME"])).v(k).cmd(),
            15 => b("OBJECT").s("ENCODING").v(k).cmd(),
            16 => b("DBSIZE").cmd(),
            17 => b("KEYS").s(&format!("{{{tag}}}:*")).cmd(),
            18 => b("RANDOMKEY").cmd(),
            19 => b("INFO").s("keyspace").cmd(),
            20 => b("CLIENT").s("ID").cmd(),
            // Split by slot in the proxy: any tags.
            21 => {
                let mut c = b(r.word(&["DEL", "EXISTS", "UNLINK", "TOUCH"]));
                for _ in 0..self.rng.range(1, 4) {
                    let (t, kind) = (self.spread_tag(tag), *self.rng.pick(&KINDS));
                    c = c.v(self.key(t, kind));
                }
                c.cmd()
            }
            22 => b("PING").cmd(),
            _ if r.chance(5) => b(r.word(&["FLUSHALL", "FLUSHDB"])).cmd(),
            _ => b("ECHO").v(k).cmd(),
        }
    }

    fn script(&mut self, tag: &'static str) -> Command {
        let k1 = self.key(tag, Kind::Str);
        let k2 = self.key(tag, Kind::Str);
        let arg = self.value();
        let r = &mut self.rng;
        match r.below(10) {
            0..=6 => {
                let (numkeys, body) = *r.pick(&SCRIPTS);
                let keys = [k1, k2].into_iter().take(numkeys);
                let mut c = b("EVAL").s(body).n(numkeys as i64);
                for k in keys {
                    c = c.v(k);
                }
                c.v(if numkeys == 0 { b"21".to_vec() } else { arg }).cmd()
            }
            7 | 8 => b("EVAL_RO").s(r.word(&RO_SCRIPTS)).n(1).v(k1).cmd(),
            _ => b("EVALSHA").s(&self.loaded_sha).n(1).v(k1).v(arg).cmd(),
        }
    }

    /// `[WATCH k] [a write to k] MULTI cmd... EXEC|DISCARD`, in one tag.
    fn transaction(&mut self) -> Unit {
        let tag = self.tag();
        let mut unit = Vec::new();
        if self.rng.chance(40) {
            let k = self.key(tag, Kind::Str);
            unit.push(b("WATCH").v(k.clone()).cmd());
            match self.rng.below(3) {
                // Touching the watched key, this client or another, aborts
                // EXEC on both sides.
                0 => unit.push(b("SET").v(k).s("touched").cmd()),
                1 => unit.push(Command {
                    other: true,
                    ..b("SET").v(k).s("touched").cmd()
                }),
                _ => {}
            }
        }
        unit.push(b("MULTI").cmd());
        self.in_multi = true;
        let mut masks = Vec::new();
        for _ in 0..self.rng.range(1, 6) {
            let mut c = self.command(tag);
            // A transaction runs on one master: keyspace-wide commands in
            // it see that master only (a known difference, see README).
            while is_keyspace_wide(&c) {
                c = self.command(tag);
            }
            masks.push(c.mask.clone());
            c.mask = Mask::Exact; // the reply is +QUEUED
            unit.push(c);
        }
        self.in_multi = false;
        if self.rng.chance(15) {
            unit.push(b("DISCARD").cmd());
        } else {
            unit.push(Command::exec(Mask::Exec(masks)));
        }
        unit
    }

    /// A read-only command across two tags (`CROSSSLOT` through the proxy),
    /// or a transaction of reads holding one (`EXECABORT` there).
    fn cross_tag(&mut self) -> Unit {
        let (t1, t2) = (self.tag(), self.tag());
        let t2 = if t1 == t2 {
            if t1 == "a" { "b" } else { "a" }
        } else {
            t2
        };
        let (s1, s2) = (self.key(t1, Kind::Set), self.key(t2, Kind::Set));
        let (z1, z2) = (self.key(t1, Kind::Zset), self.key(t2, Kind::Zset));
        let (k1, k2) = (self.key(t1, Kind::Str), self.key(t2, Kind::Str));
        let mut read = match self.rng.below(5) {
            0 => b(self.rng.word(&["SUNION", "SINTER", "SDIFF"]))
                .v(s1)
                .v(s2)
                .cmd(),
            1 => b("SINTERCARD").n(2).v(s1).v(s2).cmd(),
            2 => b(self.rng.word(&["ZUNION", "ZINTER", "ZDIFF"]))
                .n(2)
                .v(z1)
                .v(z2)
                .cmd(),
            3 => b("LCS").v(k1).v(k2).cmd(),
            _ => b("EVAL_RO")
                .s("return redis.call('GET', KEYS[1])")
                .n(2)
                .v(k1)
                .v(k2)
                .cmd(),
        };
        read.mask = Mask::CrossSlot;
        if self.rng.chance(70) {
            return vec![read];
        }
        let get = b("GET").v(self.key(t1, Kind::Str)).cmd();
        let exists = b("EXISTS").v(self.key(t1, Kind::Set)).cmd();
        let mut multi = vec![b("MULTI").cmd(), get, read, exists];
        multi.push(Command::exec(Mask::CrossSlotExecAbort));
        multi
    }
}

/// Commands about the whole keyspace, which the proxy answers from every
/// master, except inside a transaction, which runs on one.
fn is_keyspace_wide(c: &Command) -> bool {
    matches!(
        &c.args[0][..],
        b"DBSIZE" | b"KEYS" | b"RANDOMKEY" | b"INFO" | b"FLUSHALL" | b"FLUSHDB"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_of(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| a.as_bytes().to_vec()).collect())
    }

    #[test]
    fn the_same_seed_generates_the_same_sequence_and_another_does_not() {
        let run = |seed| {
            let mut g = Generator::new(seed, "sha");
            (0..500).map(|_| g.unit()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn splitmix_matches_its_reference_output() {
        // First outputs for seed 0 from the reference implementation.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn generated_keys_of_a_command_share_one_tag_unless_cross_tag_is_meant() {
        let mut g = Generator::new(1, "sha");
        let split = [
            "MGET", "MSET", "DEL", "EXISTS", "UNLINK", "TOUCH", "KEYS", "EVAL", "EVAL_RO",
        ];
        let mut commands = 0;
        for unit in (0..3000).map(|_| g.unit()) {
            for c in unit {
                commands += 1;
                let name = String::from_utf8_lossy(&c.args[0]).to_string();
                if c.mask == Mask::CrossSlot || split.contains(&name.as_str()) {
                    continue;
                }
                let tags: std::collections::BTreeSet<&str> = c
                    .args
                    .iter()
                    .filter_map(|a| {
                        let a = std::str::from_utf8(a).ok()?;
                        TAGS.iter()
                            .copied()
                            .find(|t| a.starts_with(&format!("{{{t}}}:")))
                    })
                    .collect();
                assert!(tags.len() <= 1, "{} spans tags", c.display());
            }
        }
        assert!(commands > 3000);
    }

    #[test]
    fn every_family_and_transactions_and_cross_tag_reads_are_generated() {
        let mut g = Generator::new(42, "sha");
        let names: std::collections::BTreeSet<String> = (0..5000)
            .flat_map(|_| g.unit())
            .map(|c| String::from_utf8_lossy(&c.args[0]).to_string())
            .collect();
        for name in [
            "SET", "RPUSH", "HSET", "SADD", "ZADD", "XADD", "EXPIRE", "TTL", "MULTI", "EXEC",
            "DISCARD", "WATCH", "EVAL", "EVALSHA", "SUNION", "MGET", "SPOP",
        ] {
            assert!(names.contains(name), "{name} never generated");
        }
    }

    #[test]
    fn transactions_carry_the_masks_of_their_queued_commands() {
        let mut g = Generator::new(3, "sha");
        let unit = (0..2000)
            .map(|_| g.unit())
            .find(|u| u.last().is_some_and(|c| matches!(c.mask, Mask::Exec(_))))
            .expect("a transaction");
        let multi = unit
            .iter()
            .position(|c| c.args[0] == b"MULTI")
            .expect("MULTI");
        let Mask::Exec(masks) = &unit.last().expect("EXEC").mask else {
            unreachable!("found above");
        };
        assert_eq!(masks.len(), unit.len() - multi - 2);
    }

    #[test]
    fn another_client_breaks_a_watch_now_and_then() {
        let mut g = Generator::new(5, "sha");
        let units: Vec<Unit> = (0..3000).map(|_| g.unit()).collect();
        let other = units
            .iter()
            .find(|u| u.iter().any(|c| c.other))
            .expect("a WATCH broken by another client");
        assert_eq!(other[0].args[0], b"WATCH");
        assert_eq!(other[1].args[1], other[0].args[1], "the watched key");
        assert!(
            units
                .iter()
                .any(|u| u.len() > 1 && u[0].args[0] != b"MULTI" && u[0].args[0] != b"WATCH"),
            "pipelines"
        );
    }

    #[test]
    fn identical_replies_are_equal_under_any_mask() {
        assert_eq!(
            compare(&Mask::Exact, b"+OK\r\n", b"+OK\r\n"),
            Verdict::Equal
        );
        assert_eq!(
            compare(&Mask::ClientId, b":3\r\n", b":3\r\n"),
            Verdict::Equal
        );
    }

    #[test]
    fn an_unmasked_difference_fails() {
        assert!(matches!(
            compare(&Mask::Exact, b"$1\r\na\r\n", b"$1\r\nb\r\n"),
            Verdict::Differ(_)
        ));
        assert!(matches!(
            compare(&Mask::Exact, b"+OK\r\n", b"garbage"),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn crossslot_masks_only_the_clusters_refusal() {
        let redis = b"*1\r\n$1\r\na\r\n";
        let refusal = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
        assert_eq!(
            compare(&Mask::CrossSlot, refusal, redis),
            Verdict::Masked("crossslot")
        );
        assert!(matches!(
            compare(&Mask::CrossSlot, b"*0\r\n", redis),
            Verdict::Differ(_)
        ));
        // The same refusal where no cross-tag command was meant fails.
        assert!(matches!(
            compare(&Mask::Exact, refusal, redis),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn crossslot_execabort_masks_only_an_execabort_against_results() {
        let abort = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
        assert_eq!(
            compare(&Mask::CrossSlotExecAbort, abort, b"*1\r\n$-1\r\n"),
            Verdict::Masked("crossslot_execabort")
        );
        assert!(matches!(
            compare(&Mask::CrossSlotExecAbort, b"*-1\r\n", b"*1\r\n$-1\r\n"),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn unordered_replies_compare_as_multisets() {
        let (p, r) = (
            b"*2\r\n$1\r\na\r\n$1\r\nb\r\n",
            b"*2\r\n$1\r\nb\r\n$1\r\na\r\n",
        );
        assert_eq!(
            compare(&Mask::Unordered, p, r),
            Verdict::Masked("unordered")
        );
        let missing = b"*2\r\n$1\r\na\r\n$1\r\na\r\n";
        assert!(matches!(
            compare(&Mask::Unordered, missing, r),
            Verdict::Differ(_)
        ));
        assert!(matches!(compare(&Mask::Exact, p, r), Verdict::Differ(_)));
    }

    #[test]
    fn hgetall_pairs_move_together() {
        let r = b"*4\r\n$1\r\nf\r\n$1\r\n1\r\n$1\r\ng\r\n$1\r\n2\r\n";
        let swapped = b"*4\r\n$1\r\ng\r\n$1\r\n2\r\n$1\r\nf\r\n$1\r\n1\r\n";
        let crossed = b"*4\r\n$1\r\nf\r\n$1\r\n2\r\n$1\r\ng\r\n$1\r\n1\r\n";
        assert_eq!(
            compare(&Mask::UnorderedPairs, swapped, r),
            Verdict::Masked("unordered_pairs")
        );
        assert!(matches!(
            compare(&Mask::UnorderedPairs, crossed, r),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn random_picks_must_keep_their_shape() {
        let m = Mask::RandomPick;
        assert_eq!(
            compare(&m, b"$1\r\na\r\n", b"$1\r\nb\r\n"),
            Verdict::Masked("random_pick")
        );
        assert!(matches!(
            compare(&m, b"$-1\r\n", b"$1\r\nb\r\n"),
            Verdict::Differ(_)
        ));
        assert!(matches!(
            compare(&m, b"*1\r\n$1\r\na\r\n", b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn clock_readings_may_differ_by_the_tolerance_only() {
        let m = Mask::Clock { tolerance: 1 };
        assert_eq!(
            compare(&m, b":99\r\n", b":100\r\n"),
            Verdict::Masked("clock")
        );
        assert!(matches!(
            compare(&m, b":97\r\n", b":100\r\n"),
            Verdict::Differ(_)
        ));
        // No expiry and no key are facts, not clock readings.
        assert!(matches!(
            compare(&m, b":-1\r\n", b":0\r\n"),
            Verdict::Differ(_)
        ));
        assert_eq!(
            mask_for(&unit_of(&["pttl", "k"]).args),
            Mask::Clock { tolerance: 1000 }
        );
    }

    #[test]
    fn info_keyspace_compares_key_and_expiry_counts() {
        let info = |s: &str| format!("${}\r\n{s}\r\n", s.len()).into_bytes();
        let r = info("# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=100");
        let p = info("# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=250");
        let off = info("# Keyspace\r\ndb0:keys=4,expires=1,avg_ttl=100");
        assert_eq!(
            compare(&Mask::InfoKeyspace, &p, &r),
            Verdict::Masked("info_keyspace")
        );
        assert!(matches!(
            compare(&Mask::InfoKeyspace, &off, &r),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn client_ids_differ_but_must_be_integers() {
        assert_eq!(
            compare(&Mask::ClientId, b":12\r\n", b":4\r\n"),
            Verdict::Masked("client_id")
        );
        assert!(matches!(
            compare(&Mask::ClientId, b"-ERR x\r\n", b":4\r\n"),
            Verdict::Differ(_)
        ));
    }

    #[test]
    fn exec_replies_apply_each_queued_commands_mask() {
        let m = Mask::Exec(vec![Mask::Exact, Mask::Unordered]);
        let r = b"*2\r\n+OK\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n";
        let p = b"*2\r\n+OK\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n";
        assert_eq!(compare(&m, p, r), Verdict::Masked("unordered"));
        let wrong = b"*2\r\n$2\r\nOK\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n";
        assert!(matches!(compare(&m, wrong, r), Verdict::Differ(_)));
        assert_eq!(compare(&m, b"*-1\r\n", b"*-1\r\n"), Verdict::Equal);
    }
}
