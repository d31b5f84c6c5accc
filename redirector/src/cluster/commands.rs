//! The Redis command table, loaded from the cluster's `COMMAND` reply, and
//! key extraction for routing by hash slot.
//!
//! The table comes from the cluster rather than a built-in list so module
//! commands and newer Redis versions route without a proxy release. Key
//! positions come from the key specifications (Redis 7+) when a command has
//! them, from the legacy (first, last, step) triple otherwise. The rules follow
//! Redis's own `getKeysUsingKeySpecs` (src/db.c), so the proxy finds the keys
//! the server checks for `CROSSSLOT`/`MOVED`.
//!
//! Gaps, each reported as [`Error::Unresolved`] by
//! [`CommandInfo::key_indices`] (the caller may ask Redis with
//! `COMMAND GETKEYS`, or use [`CommandInfo::key_indices_partial`]):
//! - key specs of type `unknown` or flagged `incomplete`, except for SORT,
//!   SORT_RO and MIGRATE, which get the same hand-written extraction Redis
//!   falls back to;
//! - `movablekeys` commands without key specs (pre-7.0 servers, module
//!   commands that only implement the getkeys API).
//!
//! Sharded pub/sub channels (`not_key` specs, e.g. SPUBLISH) are returned as
//! keys: the cluster routes them by slot the same way.
//!
//! As in Redis, a range that comes out empty is [`Error::OutOfRange`] even
//! where arity allows no keys (`SUNSUBSCRIBE` without channels): callers
//! forward such commands anywhere and let Redis answer.

use std::{
    fmt,
    ops::{BitOr, BitOrAssign},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use bytes::Bytes;

use crate::fasthash::{FnvHashMap, WordHashMap};
use redis_protocol::resp2::types::BytesFrame;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed COMMAND reply: {0}")]
    Reply(String),
    #[error("argument {index} is not a valid number of keys")]
    Numkeys { index: usize },
    #[error("the command's key positions fall outside its arguments")]
    OutOfRange,
    #[error("the command's key specification cannot be applied: {0}")]
    BadSpec(&'static str),
    #[error("the command table cannot tell where this command's keys are")]
    Unresolved,
}

/// Declares a bitset of named flags, parsed from the names Redis replies with.
macro_rules! named_flags {
    ($(#[$meta:meta])* $ty:ident($repr:ty) {
        $($(#[$fmeta:meta])* $flag:ident = $bit:literal, $text:literal;)*
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $ty($repr);

        impl $ty {
            $($(#[$fmeta])* pub const $flag: Self = Self(1 << $bit);)*

            const NAMES: &[(&str, Self)] = &[$(($text, Self::$flag)),*];

            pub const fn empty() -> Self {
                Self(0)
            }

            pub const fn bits(self) -> $repr {
                self.0
            }

            /// Whether every flag of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether any flag of `other` is set.
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            /// The flag Redis calls `name` (case-insensitive); empty when
            /// unknown, so newer servers' flags are ignored, not rejected.
            pub fn from_name(name: &[u8]) -> Self {
                Self::NAMES
                    .iter()
                    .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
                    .map_or(Self(0), |&(_, f)| f)
            }
        }

        impl BitOr for $ty {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $ty {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($ty))?;
                let mut sep = "";
                for (name, flag) in Self::NAMES {
                    if self.contains(*flag) {
                        write!(f, "{sep}{name}")?;
                        sep = " | ";
                    }
                }
                f.write_str(")")
            }
        }
    };
}

named_flags! {
    /// Command flags (the third field of a `COMMAND` entry).
    Flags(u32) {
        WRITE = 0, "write";
        READONLY = 1, "readonly";
        DENYOOM = 2, "denyoom";
        MODULE = 3, "module";
        ADMIN = 4, "admin";
        PUBSUB = 5, "pubsub";
        NOSCRIPT = 6, "noscript";
        BLOCKING = 7, "blocking";
        LOADING = 8, "loading";
        STALE = 9, "stale";
        SKIP_MONITOR = 10, "skip_monitor";
        SKIP_SLOWLOG = 11, "skip_slowlog";
        ASKING = 12, "asking";
        FAST = 13, "fast";
        NO_AUTH = 14, "no_auth";
        MAY_REPLICATE = 15, "may_replicate";
        NO_MANDATORY_KEYS = 16, "no_mandatory_keys";
        NO_ASYNC_LOADING = 17, "no_async_loading";
        NO_MULTI = 18, "no_multi";
        MOVABLEKEYS = 19, "movablekeys";
        ALLOW_BUSY = 20, "allow_busy";
        MODULE_NO_CLUSTER = 21, "module_no_cluster";
    }
}

named_flags! {
    /// ACL categories (the seventh field of a `COMMAND` entry, without the
    /// `@`): what Redis's ACLs, and the proxy's own refusals, go by.
    AclCategories(u32) {
        KEYSPACE = 0, "keyspace";
        READ = 1, "read";
        WRITE = 2, "write";
        SET = 3, "set";
        SORTEDSET = 4, "sortedset";
        LIST = 5, "list";
        HASH = 6, "hash";
        STRING = 7, "string";
        BITMAP = 8, "bitmap";
        HYPERLOGLOG = 9, "hyperloglog";
        GEO = 10, "geo";
        STREAM = 11, "stream";
        PUBSUB = 12, "pubsub";
        ADMIN = 13, "admin";
        FAST = 14, "fast";
        SLOW = 15, "slow";
        BLOCKING = 16, "blocking";
        DANGEROUS = 17, "dangerous";
        CONNECTION = 18, "connection";
        TRANSACTION = 19, "transaction";
        SCRIPTING = 20, "scripting";
    }
}

named_flags! {
    /// Key specification flags.
    KeySpecFlags(u16) {
        RO = 0, "RO";
        RW = 1, "RW";
        OW = 2, "OW";
        RM = 3, "RM";
        ACCESS = 4, "access";
        UPDATE = 5, "update";
        INSERT = 6, "insert";
        DELETE = 7, "delete";
        /// Not a key but hashed like one (sharded pub/sub channels).
        NOT_KEY = 8, "not_key";
        /// The spec may miss keys.
        INCOMPLETE = 9, "incomplete";
        VARIABLE_FLAGS = 10, "variable_flags";
    }
}

/// Where a key spec starts looking for keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginSearch {
    /// The first key is at this argument index.
    Index(i64),
    /// The first key follows `keyword` (case-insensitive), searched from
    /// `startfrom` forwards, or backwards from the end when it is negative.
    Keyword { keyword: Bytes, startfrom: i64 },
    /// A type this proxy does not know (or `unknown` itself).
    Unknown,
}

/// How a key spec finds the keys after [`BeginSearch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FindKeys {
    /// Keys up to `lastkey` (relative to the first key; negative counts from
    /// the end), every `keystep`; with `lastkey == -1` a `limit` above 1 keeps
    /// only 1/`limit` of the remaining arguments.
    Range {
        lastkey: i64,
        keystep: i64,
        limit: i64,
    },
    /// The number of keys is at `keynumidx`, the keys start at `firstkey`
    /// (both relative to the begin-search position), every `keystep`.
    Keynum {
        keynumidx: i64,
        firstkey: i64,
        keystep: i64,
    },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub flags: KeySpecFlags,
    pub begin_search: BeginSearch,
    pub find_keys: FindKeys,
}

impl KeySpec {
    /// Whether this spec alone finds all of its keys.
    pub fn is_complete(&self) -> bool {
        self.begin_search != BeginSearch::Unknown
            && self.find_keys != FindKeys::Unknown
            && !self.flags.contains(KeySpecFlags::INCOMPLETE)
    }

    /// Appends this spec's key indices to `out`, as `getKeysUsingKeySpecs`.
    fn find(&self, args: &[Bytes], out: &mut Vec<usize>) -> Result<(), Error> {
        // i128 so sums of server-supplied i64 values cannot overflow.
        let argc = args.len() as i128;
        let begin = match &self.begin_search {
            BeginSearch::Index(i) => i128::from(*i),
            BeginSearch::Keyword { keyword, startfrom } => {
                match find_keyword(args, keyword, *startfrom) {
                    Some(i) => i as i128 + 1,
                    // An optional clause that is absent (e.g. no STORE).
                    None => return Ok(()),
                }
            }
            BeginSearch::Unknown => return Err(Error::Unresolved),
        };
        let (first, last, step) = match self.find_keys {
            FindKeys::Range {
                lastkey,
                keystep,
                limit,
            } => {
                let lastkey = i128::from(lastkey);
                let last = if lastkey >= 0 {
                    begin + lastkey
                } else if limit == 0 {
                    argc + lastkey
                } else if limit > 0 {
                    // Redis only defines this for lastkey == -1 (XREAD's
                    // STREAMS keys then ids); the formula is the same.
                    begin + ((argc - begin) / i128::from(limit) + lastkey)
                } else {
                    return Err(Error::BadSpec("negative range limit"));
                };
                (begin, last, keystep)
            }
            FindKeys::Keynum {
                keynumidx,
                firstkey,
                keystep,
            } => {
                let idx = begin + i128::from(keynumidx);
                if idx < 1 || idx >= argc {
                    return Err(Error::OutOfRange);
                }
                let idx = idx as usize;
                let numkeys = parse_count(&args[idx]).ok_or(Error::Numkeys { index: idx })?;
                if numkeys == 0 {
                    // EVAL "..." 0: valid, just keyless.
                    return Ok(());
                }
                let first = begin + i128::from(firstkey);
                // As Redis: numkeys spans argument positions, so a keystep
                // above 1 yields fewer keys (no Redis command does that).
                (first, first + i128::from(numkeys) - 1, keystep)
            }
            FindKeys::Unknown => return Err(Error::Unresolved),
        };
        push_range(first, last, step, argc, out)
    }
}

/// Appends `first..=last` by `step`, refusing positions outside the
/// arguments (a syntax or arity error Redis will report itself).
fn push_range(
    first: i128,
    last: i128,
    step: i64,
    argc: i128,
    out: &mut Vec<usize>,
) -> Result<(), Error> {
    if step < 1 {
        return Err(Error::BadSpec("key step below 1"));
    }
    if first < 1 || last < first || last >= argc {
        return Err(Error::OutOfRange);
    }
    // In range of usize: 1 <= first <= last < argc.
    out.extend((first as usize..=last as usize).step_by(step as usize));
    Ok(())
}

/// Index of `keyword` in `args`, searched as Redis does: forwards from
/// `startfrom` up to the second-to-last argument, or (`startfrom <= 0`)
/// backwards from `argc + startfrom` down to index 2.
fn find_keyword(args: &[Bytes], keyword: &[u8], startfrom: i64) -> Option<usize> {
    let argc = args.len() as i128;
    let startfrom = i128::from(startfrom);
    let hit = |i: &i128| args[*i as usize].eq_ignore_ascii_case(keyword);
    if startfrom > 0 {
        (startfrom..argc - 1).find(hit).map(|i| i as usize)
    } else {
        let start = argc + startfrom;
        if start >= argc {
            return None;
        }
        (2..=start).rev().find(hit).map(|i| i as usize)
    }
}

/// Parses a key count with Redis's `string2ll` strictness (no sign, spaces or
/// leading zeros); negative counts are invalid anyway.
fn parse_count(arg: &[u8]) -> Option<i64> {
    match arg {
        [b'0'] => Some(0),
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(arg).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// How [`CommandInfo::key_indices`] finds a command's keys, fixed at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyMethod {
    /// Every key spec is known and complete.
    Specs,
    /// Some spec is `unknown` or `incomplete`.
    PartialSpecs,
    /// No key specs: the legacy triple, which is exact without movablekeys.
    Legacy,
    /// movablekeys without key specs: the triple may miss keys.
    Unresolved,
    // Redis's hand-written fallbacks for its commands with unknown or
    // incomplete specs (sortGetKeys, sortROGetKeys, migrateGetKeys).
    Sort,
    SortRo,
    Migrate,
}

#[derive(Clone, Debug)]
pub struct CommandInfo {
    /// Lowercase; `container|sub` for subcommands.
    pub name: Arc<str>,
    /// N: exactly N arguments, -N: at least N (counting the name, and for
    /// subcommands both words).
    pub arity: i64,
    pub flags: Flags,
    /// The legacy key triple: positions are absolute, `last_key` negative
    /// counts from the end; `first_key == 0` means no keys.
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
    /// ACL categories (`@admin`, `@dangerous`, ...).
    pub acl: AclCategories,
    /// Command tips, e.g. `request_policy:all_shards`.
    pub tips: Vec<String>,
    pub key_specs: Vec<KeySpec>,
    pub subcommands: Vec<CommandInfo>,
    method: KeyMethod,
    /// Length of the top-level command's name within `name` (found once:
    /// a search per request was 2% of a pipelined GET's instructions).
    container_len: usize,
    /// Set by the proxy's planner ([`CommandTable::mark_plain`]): it has no
    /// rule of its own for this command, so a ready session routes it by
    /// its keys alone, without the planner's name checks.
    pub plain: bool,
}

impl CommandInfo {
    /// Whether `argc` (number of args including the command name) satisfies
    /// arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i128;
        let arity = i128::from(self.arity);
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }

    /// The subcommand named `name` (the word after the container,
    /// case-insensitive).
    /// The entry that governs a command whose next word is `next`: the
    /// subcommand it names, if any, else this one.
    fn resolve(&self, next: Option<&[u8]>) -> &Self {
        next.and_then(|sub| self.subcommand(sub)).unwrap_or(self)
    }

    pub fn subcommand(&self, name: &[u8]) -> Option<&CommandInfo> {
        self.subcommands.iter().find(|sub| {
            sub.name
                .rsplit_once('|')
                .is_some_and(|(_, s)| s.as_bytes().eq_ignore_ascii_case(name))
        })
    }

    /// Whether [`Self::key_indices`] can answer for this command (it returns
    /// [`Error::Unresolved`] otherwise).
    pub fn keys_resolvable(&self) -> bool {
        !matches!(self.method, KeyMethod::PartialSpecs | KeyMethod::Unresolved)
    }

    /// Indices into `args` (args[0] = name) of every key, in order, using key
    /// specs when present and the legacy triple otherwise. Out-of-range or
    /// malformed numkeys yields an error (the proxy then lets Redis answer).
    pub fn key_indices(&self, args: &[Bytes]) -> Result<Vec<usize>, Error> {
        match self.method {
            KeyMethod::Specs => self.spec_keys(args, false),
            KeyMethod::PartialSpecs | KeyMethod::Unresolved => Err(Error::Unresolved),
            KeyMethod::Legacy => self.legacy_keys(args),
            KeyMethod::Sort => sort_keys(args),
            KeyMethod::SortRo => first_arg_key(args),
            KeyMethod::Migrate => migrate_keys(args),
        }
    }

    /// Like [`Self::key_indices`], but where that fails with
    /// [`Error::Unresolved`] returns the keys it can find: those of the known
    /// key specs (incomplete ones included), or the legacy triple's. Enough
    /// to route when all keys share a slot; Redis redirects otherwise.
    pub fn key_indices_partial(&self, args: &[Bytes]) -> Result<Vec<usize>, Error> {
        match self.method {
            KeyMethod::PartialSpecs => self.spec_keys(args, true),
            KeyMethod::Unresolved => self.legacy_keys(args),
            _ => self.key_indices(args),
        }
    }

    fn spec_keys(&self, args: &[Bytes], partial: bool) -> Result<Vec<usize>, Error> {
        let mut keys = Vec::new();
        for spec in &self.key_specs {
            match spec.find(args, &mut keys) {
                Err(Error::Unresolved) if partial => {}
                other => other?,
            }
        }
        Ok(keys)
    }

    fn legacy_keys(&self, args: &[Bytes]) -> Result<Vec<usize>, Error> {
        let mut keys = Vec::new();
        if self.first_key == 0 {
            return Ok(keys);
        }
        let argc = args.len() as i128;
        let last = i128::from(self.last_key);
        let last = if last < 0 { argc + last } else { last };
        push_range(i128::from(self.first_key), last, self.step, argc, &mut keys)?;
        Ok(keys)
    }

    fn parse(frame: &BytesFrame) -> Result<Self, Error> {
        let fields = array(frame).ok_or_else(|| reply_err("a command entry is not an array"))?;
        let name = fields
            .first()
            .and_then(text)
            .ok_or_else(|| reply_err("a command entry has no name"))?
            .to_ascii_lowercase();
        let field_err = |what: &str| Error::Reply(format!("{name}: {what}"));
        if fields.len() < 6 {
            return Err(field_err("fewer than 6 fields"));
        }
        let int = |i: usize, what: &str| integer(&fields[i]).ok_or_else(|| field_err(what));
        let arity = int(1, "arity is not an integer")?;
        let first_key = int(3, "first key is not an integer")?;
        let last_key = int(4, "last key is not an integer")?;
        let step = int(5, "step is not an integer")?;
        let flags = array(&fields[2])
            .ok_or_else(|| field_err("flags are not an array"))?
            .iter()
            .filter_map(bytes)
            .fold(Flags::empty(), |acc, f| acc | Flags::from_name(f));
        // Fields 6 on (ACL categories, tips, key specs, subcommands) are
        // absent before Redis 6 / 7: missing means none.
        let acl = match fields.get(6) {
            Some(f) => array(f)
                .ok_or_else(|| field_err("ACL categories are not an array"))?
                .iter()
                .filter_map(bytes)
                .fold(AclCategories::empty(), |acc, c| {
                    acc | AclCategories::from_name(c.strip_prefix(b"@").unwrap_or(&c[..]))
                }),
            None => AclCategories::empty(),
        };
        let tips = match fields.get(7) {
            Some(f) => array(f)
                .ok_or_else(|| field_err("tips are not an array"))?
                .iter()
                .filter_map(text)
                .collect(),
            None => Vec::new(),
        };
        let key_specs = match fields.get(8) {
            Some(f) => array(f)
                .ok_or_else(|| field_err("key specs are not an array"))?
                .iter()
                .map(parse_key_spec)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| field_err("malformed key spec"))?,
            None => Vec::new(),
        };
        let subcommands = match fields.get(9) {
            Some(f) => array(f)
                .ok_or_else(|| field_err("subcommands are not an array"))?
                .iter()
                .map(CommandInfo::parse)
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let method = match name.as_str() {
            "sort" => KeyMethod::Sort,
            "sort_ro" => KeyMethod::SortRo,
            "migrate" => KeyMethod::Migrate,
            _ if key_specs.is_empty() => {
                if flags.contains(Flags::MOVABLEKEYS) {
                    KeyMethod::Unresolved
                } else {
                    KeyMethod::Legacy
                }
            }
            _ if key_specs.iter().all(KeySpec::is_complete) => KeyMethod::Specs,
            _ => KeyMethod::PartialSpecs,
        };
        let container_len = name.find('|').unwrap_or(name.len());
        Ok(Self {
            container_len,
            name: name.into(),
            arity,
            flags,
            first_key,
            last_key,
            step,
            acl,
            tips,
            key_specs,
            subcommands,
            method,
            plain: false,
        })
    }

    /// The top-level command's name (`config` for `config|get`).
    pub fn container_name(&self) -> &str {
        &self.name[..self.container_len]
    }
}

/// SORT key [BY p] [LIMIT o c] [GET p ...] [ASC|DESC] [ALPHA] [STORE dst]:
/// the sorted key and the last STORE destination. BY/GET patterns name keys
/// by content and are not returned (Redis refuses them in cluster mode
/// unless they hash to the key's slot).
fn sort_keys(args: &[Bytes]) -> Result<Vec<usize>, Error> {
    let mut keys = first_arg_key(args)?;
    let mut store = None;
    let mut i = 2;
    while i < args.len() {
        let arg = &args[i];
        if arg.eq_ignore_ascii_case(b"limit") {
            i += 2;
        } else if arg.eq_ignore_ascii_case(b"get") || arg.eq_ignore_ascii_case(b"by") {
            i += 1;
        } else if arg.eq_ignore_ascii_case(b"store") && i + 1 < args.len() {
            store = Some(i + 1);
            // Skip the destination as SORT itself does (sortGetKeys would
            // read a destination named e.g. "limit" as an option).
            i += 1;
        }
        i += 1;
    }
    keys.extend(store);
    Ok(keys)
}

fn first_arg_key(args: &[Bytes]) -> Result<Vec<usize>, Error> {
    if args.len() < 2 {
        return Err(Error::OutOfRange);
    }
    Ok(vec![1])
}

/// MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH pw |
/// AUTH2 user pw] [KEYS key ...]: the key at 3, or with an empty key at 3 the
/// keys after KEYS, as Redis's migrateGetKeys.
fn migrate_keys(args: &[Bytes]) -> Result<Vec<usize>, Error> {
    if args.len() < 4 {
        return Err(Error::OutOfRange);
    }
    let mut i = 6;
    while i < args.len() {
        let arg = &args[i];
        if arg.eq_ignore_ascii_case(b"keys") {
            if !args[3].is_empty() {
                // A syntax error MIGRATE reports itself.
                return Ok(Vec::new());
            }
            return Ok((i + 1..args.len()).collect());
        }
        // Skip option values so a password "keys" is not taken for KEYS.
        if arg.eq_ignore_ascii_case(b"auth") {
            i += 1;
        } else if arg.eq_ignore_ascii_case(b"auth2") {
            i += 2;
        }
        i += 1;
    }
    Ok(vec![3])
}

/// Every command the cluster knows, by lowercase name.
#[derive(Clone, Debug, Default)]
pub struct CommandTable {
    /// Names of up to 15 bytes (all but a few), by [`packed_name`]: one
    /// word to hash and compare, to an index in `entries`. A lookup per
    /// request was 4% of a pipelined GET's instructions as bytes.
    short: WordHashMap<u32>,
    /// The entries of the short names, where a [`LastCommand`] points.
    entries: Vec<CommandInfo>,
    /// The longer names.
    long: FnvHashMap<Box<[u8]>, CommandInfo>,
    /// Tells tables apart, so that a [`LastCommand`] one table filled
    /// finds nothing in another (a clone is the same table).
    id: u32,
}

/// Table ids, from 1: 0 is a default table's and an empty
/// [`LastCommand`]'s, and a default table has no entries, so what such a
/// cache points to is never found.
static TABLE_IDS: AtomicU32 = AtomicU32::new(1);

/// The last short name [`CommandTable::get_cached`] found, packed, and
/// where its entry is: kept by a session from request to request, as a
/// client mostly repeats one command (a pipeline's, or a request-reply
/// client's next one). No reference, so a session can hold it; 24 bytes
/// (a `u128` would align it to 16), as every idle client keeps one.
#[derive(Clone, Copy, Debug, Default)]
pub struct LastCommand {
    word: [u64; 2],
    /// The table's id, 0 while empty.
    table: u32,
    index: u32,
}

/// A name of at most 15 bytes, lowercased, its length in the last byte
/// (so `get` and `get\0` differ).
fn packed_name(name: &[u8]) -> Option<u128> {
    let mut word = [0u8; 16];
    if name.len() >= word.len() {
        return None;
    }
    word[..name.len()].copy_from_slice(name);
    word[15] = name.len() as u8;
    let word = u128::from_le_bytes(word);
    let (low, high) = (lowercase8(word as u64), lowercase8((word >> 64) as u64));
    Some(u128::from(low) | (u128::from(high) << 64))
}

/// ASCII lowercase of eight bytes at once (`A`..=`Z` gain 0x20): a byte
/// loop was as dear as the whole hash lookup.
fn lowercase8(bytes: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Each byte's top bit: set where the byte is ASCII, where its low
    // seven bits reach 'A', where they pass 'Z' (no carry crosses bytes).
    let ascii = !bytes & (0x80 * ONES);
    let seven = bytes & (0x7f * ONES);
    let from_a = seven + (0x80 - u64::from(b'A')) * ONES;
    let past_z = seven + (0x7f - u64::from(b'Z')) * ONES;
    let upper = ascii & from_a & !past_z;
    bytes | (upper >> 2)
}

impl CommandTable {
    /// Parses the RESP2 reply of `COMMAND` (an array with one entry per
    /// command).
    pub fn from_command_reply(reply: &BytesFrame) -> Result<Self, Error> {
        let entries = match reply {
            BytesFrame::Array(entries) => entries,
            BytesFrame::Error(msg) => return Err(Error::Reply(format!("error reply: {msg}"))),
            _ => return Err(reply_err("not an array")),
        };
        let mut table = Self {
            id: TABLE_IDS.fetch_add(1, Ordering::Relaxed),
            ..Self::default()
        };
        for entry in entries {
            let info = CommandInfo::parse(entry)?;
            match packed_name(info.name.as_bytes()) {
                Some(word) => match table.short.get(&word) {
                    // COMMAND lists each name once; a repeat replaces it.
                    Some(&index) => table.entries[index as usize] = info,
                    None => {
                        let index = u32::try_from(table.entries.len())
                            .map_err(|_| reply_err("too many commands"))?;
                        table.short.insert(word, index);
                        table.entries.push(info);
                    }
                },
                None => {
                    table.long.insert(info.name.as_bytes().into(), info);
                }
            }
        }
        Ok(table)
    }

    /// Case-insensitive lookup by name (e.g. b"get", b"GET").
    pub fn get(&self, name: &[u8]) -> Option<&CommandInfo> {
        match packed_name(name) {
            Some(word) => self.entries.get(*self.short.get(&word)? as usize),
            None => self.long.get(name.to_ascii_lowercase().as_slice()),
        }
    }

    /// [`Self::get`], answered from `last` when it holds the same name: a
    /// pipeline mostly repeats one command, and comparing a word costs a
    /// tenth of the map's probe (callgrind: ~85 of a pipelined GET's ~2,760
    /// instructions).
    pub fn get_cached(&self, name: &[u8], last: &mut LastCommand) -> Option<&CommandInfo> {
        let Some(word) = packed_name(name) else {
            // A long name: not kept.
            return self.get(name);
        };
        let split = [word as u64, (word >> 64) as u64];
        if last.word == split && last.table == self.id {
            return self.entries.get(last.index as usize);
        }
        let index = *self.short.get(&word)?;
        *last = LastCommand {
            word: split,
            table: self.id,
            index,
        };
        self.entries.get(index as usize)
    }

    /// [`Self::lookup_words`], its name looked up by [`Self::get_cached`].
    #[inline]
    pub fn lookup_words_cached(
        &self,
        name: Option<&[u8]>,
        next: Option<&[u8]>,
        last: &mut LastCommand,
    ) -> Option<&CommandInfo> {
        Some(self.get_cached(name?, last)?.resolve(next))
    }

    /// Resolves the entry that governs `args` (args[0] = command name): a
    /// container command with subcommands (e.g. `OBJECT ENCODING key`)
    /// resolves to the subcommand entry when args[1] names one
    /// (case-insensitive), to the container otherwise.
    pub fn lookup(&self, args: &[Bytes]) -> Option<&CommandInfo> {
        self.lookup_words(args.first().map(|a| &a[..]), args.get(1).map(|a| &a[..]))
    }

    /// [`Self::lookup`], from the name and the word after it.
    #[inline]
    pub fn lookup_words(&self, name: Option<&[u8]>, next: Option<&[u8]>) -> Option<&CommandInfo> {
        Some(self.get(name?)?.resolve(next))
    }

    /// Sets every command's (and subcommand's) [`CommandInfo::plain`] to
    /// `is_plain`'s verdict on it.
    pub fn mark_plain(&mut self, is_plain: impl Fn(&CommandInfo) -> bool) {
        for info in self.entries.iter_mut().chain(self.long.values_mut()) {
            info.plain = is_plain(info);
            for sub in &mut info.subcommands {
                sub.plain = is_plain(sub);
            }
        }
    }

    /// Number of top-level commands.
    pub fn len(&self) -> usize {
        self.entries.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Top-level commands, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &CommandInfo> {
        self.entries.iter().chain(self.long.values())
    }
}

fn reply_err(what: &str) -> Error {
    Error::Reply(what.to_owned())
}

fn array(frame: &BytesFrame) -> Option<&[BytesFrame]> {
    match frame {
        BytesFrame::Array(items) => Some(items),
        _ => None,
    }
}

fn bytes(frame: &BytesFrame) -> Option<&Bytes> {
    match frame {
        BytesFrame::SimpleString(b) | BytesFrame::BulkString(b) => Some(b),
        _ => None,
    }
}

fn text(frame: &BytesFrame) -> Option<String> {
    bytes(frame).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn integer(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

/// The value under `key` in a RESP2 map, which arrives as a flat
/// [key, value, ...] array.
fn map_get<'a>(fields: &'a [BytesFrame], key: &str) -> Option<&'a BytesFrame> {
    fields
        .chunks_exact(2)
        .find(|kv| bytes(&kv[0]).is_some_and(|k| k.eq_ignore_ascii_case(key.as_bytes())))
        .map(|kv| &kv[1])
}

/// Parses one key spec map. A spec whose parts are missing or of a type not
/// known here becomes `Unknown` rather than failing the table: only that
/// command is affected.
fn parse_key_spec(frame: &BytesFrame) -> Option<KeySpec> {
    let fields = array(frame)?;
    let flags = map_get(fields, "flags")
        .and_then(array)
        .map_or(&[][..], |f| f)
        .iter()
        .filter_map(bytes)
        .fold(KeySpecFlags::empty(), |acc, f| {
            acc | KeySpecFlags::from_name(f)
        });
    let begin_search = typed_spec(fields, "begin_search")
        .and_then(|(kind, spec)| match kind {
            b"index" => Some(BeginSearch::Index(int(spec, "index")?)),
            b"keyword" => Some(BeginSearch::Keyword {
                // Copied so the table does not pin the whole reply buffer.
                keyword: Bytes::copy_from_slice(bytes(map_get(spec, "keyword")?)?),
                startfrom: int(spec, "startfrom")?,
            }),
            _ => None,
        })
        .unwrap_or(BeginSearch::Unknown);
    let find_keys = typed_spec(fields, "find_keys")
        .and_then(|(kind, spec)| match kind {
            b"range" => Some(FindKeys::Range {
                lastkey: int(spec, "lastkey")?,
                keystep: int(spec, "keystep")?,
                limit: int(spec, "limit")?,
            }),
            b"keynum" => Some(FindKeys::Keynum {
                keynumidx: int(spec, "keynumidx")?,
                firstkey: int(spec, "firstkey")?,
                keystep: int(spec, "keystep")?,
            }),
            _ => None,
        })
        .unwrap_or(FindKeys::Unknown);
    Some(KeySpec {
        flags,
        begin_search,
        find_keys,
    })
}

/// The `type` and `spec` of a `begin_search` or `find_keys` map.
fn typed_spec<'a>(fields: &'a [BytesFrame], key: &str) -> Option<(&'a [u8], &'a [BytesFrame])> {
    let map = array(map_get(fields, key)?)?;
    let kind = bytes(map_get(map, "type")?)?;
    let spec = array(map_get(map, "spec")?)?;
    Some((kind, spec))
}

fn int(spec: &[BytesFrame], key: &str) -> Option<i64> {
    map_get(spec, key).and_then(integer)
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use bytes::BytesMut;
    use redis_protocol::resp2::decode::decode_bytes_mut;

    use super::*;

    /// `COMMAND` of redis-server 7.0.15, captured raw.
    const COMMAND_7_0: &[u8] = include_bytes!("testdata/command-7.0.resp");
    /// `COMMAND GETKEYS` answers of the same server.
    const GETKEYS_7_0: &str = include_str!("testdata/getkeys-7.0.tsv");

    static TABLE: LazyLock<CommandTable> =
        LazyLock::new(|| CommandTable::from_command_reply(&command_reply()).expect("parses"));

    fn command_reply() -> BytesFrame {
        let mut buf = BytesMut::from(COMMAND_7_0);
        let (frame, used, _) = decode_bytes_mut(&mut buf)
            .expect("valid RESP")
            .expect("complete reply");
        assert_eq!(used, COMMAND_7_0.len());
        frame
    }

    fn args(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|a| match a {
                "\"\"" => Bytes::new(),
                a => Bytes::copy_from_slice(a.as_bytes()),
            })
            .collect()
    }

    fn keys(line: &str) -> Result<Vec<usize>, Error> {
        let args = args(line);
        TABLE
            .lookup(&args)
            .unwrap_or_else(|| panic!("{line}: unknown command"))
            .key_indices(&args)
    }

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn status(s: &str) -> BytesFrame {
        BytesFrame::SimpleString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn map(pairs: Vec<(&str, BytesFrame)>) -> BytesFrame {
        BytesFrame::Array(pairs.into_iter().flat_map(|(k, v)| [bulk(k), v]).collect())
    }

    fn spec(flags: &[&str], begin: BytesFrame, find: BytesFrame) -> BytesFrame {
        map(vec![
            (
                "flags",
                BytesFrame::Array(flags.iter().map(|f| status(f)).collect()),
            ),
            ("begin_search", begin),
            ("find_keys", find),
        ])
    }

    fn typed(kind: &str, spec: Vec<(&str, BytesFrame)>) -> BytesFrame {
        map(vec![("type", bulk(kind)), ("spec", map(spec))])
    }

    fn entry(
        name: &str,
        arity: i64,
        flags: &[&str],
        triple: [i64; 3],
        specs: Vec<BytesFrame>,
    ) -> BytesFrame {
        BytesFrame::Array(vec![
            bulk(name),
            BytesFrame::Integer(arity),
            BytesFrame::Array(flags.iter().map(|f| status(f)).collect()),
            BytesFrame::Integer(triple[0]),
            BytesFrame::Integer(triple[1]),
            BytesFrame::Integer(triple[2]),
            BytesFrame::Array(vec![]),
            BytesFrame::Array(vec![]),
            BytesFrame::Array(specs),
            BytesFrame::Array(vec![]),
        ])
    }

    fn table_of(entries: Vec<BytesFrame>) -> CommandTable {
        CommandTable::from_command_reply(&BytesFrame::Array(entries)).expect("parses")
    }

    #[test]
    fn parses_the_whole_7_0_table() {
        assert_eq!(TABLE.len(), 240);
        assert!(!TABLE.is_empty());
        let get = TABLE.get(b"GET").expect("get");
        assert_eq!(&*get.name, "get");
        assert_eq!(get.arity, 2);
        assert_eq!(get.flags, Flags::READONLY | Flags::FAST);
        assert_eq!((get.first_key, get.last_key, get.step), (1, 1, 1));
        assert_eq!(
            get.key_specs,
            vec![KeySpec {
                flags: KeySpecFlags::RO | KeySpecFlags::ACCESS,
                begin_search: BeginSearch::Index(1),
                find_keys: FindKeys::Range {
                    lastkey: 0,
                    keystep: 1,
                    limit: 0
                },
            }]
        );
        assert!(TABLE.get(b"gEt").is_some());
        let ping = TABLE.get(b"ping").expect("ping");
        assert!(ping.tips.iter().any(|t| t == "request_policy:all_shards"));
        assert_eq!(ping.acl, AclCategories::FAST | AclCategories::CONNECTION);
        let config_set = TABLE
            .lookup(&[Bytes::from_static(b"CONFIG"), Bytes::from_static(b"SET")])
            .expect("config|set");
        assert_eq!(
            config_set.acl,
            AclCategories::ADMIN | AclCategories::SLOW | AclCategories::DANGEROUS
        );
        assert!(
            TABLE
                .get(b"keys")
                .expect("keys")
                .acl
                .contains(AclCategories::DANGEROUS)
        );
        // Every command but SORT/SORT_RO/MIGRATE has usable specs in 7.0.
        let unresolved: Vec<_> = TABLE
            .iter()
            .flat_map(|c| std::iter::once(c).chain(&c.subcommands))
            .filter(|c| !c.keys_resolvable())
            .map(|c| &*c.name)
            .collect();
        assert!(unresolved.is_empty(), "{unresolved:?}");
    }

    #[test]
    fn flags() {
        let xrg = TABLE.get(b"xreadgroup").expect("xreadgroup");
        assert!(
            xrg.flags
                .contains(Flags::WRITE | Flags::BLOCKING | Flags::MOVABLEKEYS)
        );
        assert!(!xrg.flags.intersects(Flags::READONLY | Flags::ADMIN));
        assert!(
            TABLE
                .get(b"sync")
                .expect("sync")
                .flags
                .contains(Flags::NO_MULTI)
        );
        assert!(
            TABLE
                .get(b"eval")
                .expect("eval")
                .flags
                .contains(Flags::NOSCRIPT)
        );
        assert!(
            TABLE
                .get(b"publish")
                .expect("publish")
                .flags
                .contains(Flags::PUBSUB)
        );
        assert!(
            TABLE
                .get(b"shutdown")
                .expect("shutdown")
                .flags
                .contains(Flags::ADMIN)
        );
        assert!(
            TABLE
                .get(b"ping")
                .expect("ping")
                .flags
                .contains(Flags::FAST)
        );
        assert!(
            TABLE
                .get(b"set")
                .expect("set")
                .flags
                .contains(Flags::DENYOOM)
        );
        let script_kill = TABLE.lookup(&args("SCRIPT KILL")).expect("script|kill");
        assert_eq!(&*script_kill.name, "script|kill");
        assert!(script_kill.flags.contains(Flags::ALLOW_BUSY));
        assert_eq!(Flags::from_name(b"no_such_flag"), Flags::empty());
        assert_eq!(
            format!("{:?}", Flags::WRITE | Flags::FAST),
            "Flags(write | fast)"
        );
    }

    #[test]
    fn arity() {
        let get = TABLE.get(b"get").expect("get");
        assert!(get.arity_ok(2));
        assert!(!get.arity_ok(1));
        assert!(!get.arity_ok(3));
        let set = TABLE.get(b"set").expect("set");
        assert!(!set.arity_ok(2));
        assert!(set.arity_ok(3));
        assert!(set.arity_ok(7));
        let encoding = TABLE.lookup(&args("object encoding k")).expect("sub");
        assert_eq!(encoding.arity, 3);
        assert!(encoding.arity_ok(3));
    }

    #[test]
    fn lookup_resolves_subcommands() {
        let cases = [
            ("OBJECT ENCODING k", "object|encoding"),
            ("object Encoding k", "object|encoding"),
            ("XINFO STREAM s", "xinfo|stream"),
            ("MEMORY USAGE k", "memory|usage"),
            ("CLUSTER KEYSLOT x", "cluster|keyslot"),
            // No such subcommand, or none given: the container answers.
            ("OBJECT NOPE k", "object"),
            ("OBJECT", "object"),
            // Not a container: args[1] is just an argument.
            ("GET help", "get"),
        ];
        for (line, name) in cases {
            assert_eq!(
                &*TABLE.lookup(&args(line)).expect(line).name,
                name,
                "{line}"
            );
        }
        assert!(TABLE.lookup(&args("NOSUCHCOMMAND k")).is_none());
        assert!(TABLE.get(b"nosuchcommand").is_none());
        assert!(TABLE.lookup(&[]).is_none());
        let object = TABLE.get(b"object").expect("object");
        assert!(object.subcommand(b"FREQ").is_some());
        assert!(object.subcommand(b"object|freq").is_none());
        // Longer than the stack buffer: still looked up, still unknown.
        assert!(TABLE.get(&[b'a'; 100]).is_none());
    }

    #[test]
    fn packed_names_are_lowercased_byte_by_byte() {
        for byte in 0..=255u8 {
            for at in 0..15 {
                let mut name = *b"abcdefghijklmno";
                name[at] = byte;
                let mut expected = [0u8; 16];
                expected[..15].copy_from_slice(&name.to_ascii_lowercase());
                expected[15] = 15;
                assert_eq!(
                    packed_name(&name),
                    Some(u128::from_le_bytes(expected)),
                    "{byte:#x} at {at}"
                );
            }
        }
        assert_eq!(packed_name(&[b'a'; 16]), None);
    }

    #[test]
    fn every_name_is_found_in_any_case_and_only_as_itself() {
        let mut long = 0;
        for info in TABLE.iter() {
            let name = info.name.as_bytes();
            long += usize::from(name.len() >= 16);
            for spelt in [
                name.to_vec(),
                name.to_ascii_uppercase(),
                name.iter()
                    .enumerate()
                    .map(|(i, b)| {
                        if i % 2 == 0 {
                            b.to_ascii_uppercase()
                        } else {
                            *b
                        }
                    })
                    .collect(),
            ] {
                let found = TABLE.get(&spelt).map(|i| &*i.name);
                assert_eq!(
                    found,
                    Some(&*info.name),
                    "{}",
                    String::from_utf8_lossy(&spelt)
                );
            }
            // A NUL, a byte more or less: another name.
            for other in [
                [name, b"\0"].concat(),
                [name, b"x"].concat(),
                name[..name.len() - 1].to_vec(),
            ] {
                let found = TABLE.get(&other).map(|i| &*i.name);
                assert!(
                    found != Some(&*info.name),
                    "{}",
                    String::from_utf8_lossy(&other)
                );
            }
        }
        assert!(long > 0, "long names are looked up too");
        assert!(TABLE.get(b"").is_none());
    }

    #[test]
    fn a_cached_lookup_finds_what_the_map_finds_whatever_came_before() {
        // Every name after every spelling of the one before it, each name
        // twice in a row (the second from the cache), and near misses
        // (a NUL, a byte more or less) right after the name they resemble.
        let mut last = LastCommand::default();
        let mut hits = 0;
        for info in TABLE.iter() {
            let name = info.name.as_bytes();
            for spelt in [
                name.to_vec(),
                name.to_ascii_uppercase(),
                [name, b"\0"].concat(),
                [name, b"x"].concat(),
                name[..name.len() - 1].to_vec(),
                name.to_vec(),
            ] {
                let cached = TABLE.get_cached(&spelt, &mut last).map(|i| &*i.name);
                let fresh = TABLE.get(&spelt).map(|i| &*i.name);
                assert_eq!(cached, fresh, "{}", String::from_utf8_lossy(&spelt));
                hits += usize::from(cached.is_some());
            }
        }
        assert!(hits > 2 * TABLE.iter().count(), "names are found");
        assert!(TABLE.get_cached(b"", &mut last).is_none());
    }

    #[test]
    fn a_name_cached_from_one_table_is_looked_up_afresh_in_another() {
        // The same commands, listed in reverse: every short name sits at
        // another index, so an index taken from the first table would
        // answer with the wrong entry in the second.
        let BytesFrame::Array(entries) = command_reply() else {
            panic!("COMMAND is an array");
        };
        let reversed = BytesFrame::Array(entries.into_iter().rev().collect());
        let other = CommandTable::from_command_reply(&reversed).expect("parses");
        let mut last = LastCommand::default();
        for name in [&b"get"[..], b"set", b"GET", b"hset", b"get"] {
            let first = TABLE.get_cached(name, &mut last).map(|i| &*i.name);
            let second = other.get_cached(name, &mut last).map(|i| &*i.name);
            let expected = std::str::from_utf8(name).unwrap().to_ascii_lowercase();
            assert_eq!(first, Some(&*expected));
            assert_eq!(second, Some(&*expected));
        }
        // An empty cache and a default table share id 0, and the empty
        // name packs to the cache's empty word: still nothing is found.
        assert!(
            CommandTable::default()
                .get_cached(b"", &mut LastCommand::default())
                .is_none()
        );
        // A clone is the same table: what one filled, the other may use.
        let clone = other.clone();
        other.get_cached(b"incr", &mut last);
        assert_eq!(
            clone.get_cached(b"incr", &mut last).map(|i| &*i.name),
            Some("incr")
        );
    }

    #[test]
    fn brief_examples() {
        let cases: &[(&str, &[usize])] = &[
            ("GET k", &[1]),
            ("MSET k1 v1 k2 v2", &[1, 3]),
            ("MGET a b c", &[1, 2, 3]),
            ("DEL a b", &[1, 2]),
            ("EVAL script 2 k1 k2 a1", &[3, 4]),
            ("EVALSHA sha 0", &[]),
            ("FCALL f 1 k a", &[3]),
            ("XREAD COUNT 2 STREAMS s1 s2 0 0", &[4, 5]),
            ("XREADGROUP GROUP g c BLOCK 0 STREAMS s 0", &[7]),
            ("ZUNIONSTORE dst 2 a b WEIGHTS 1 2", &[1, 3, 4]),
            ("LMOVE a b LEFT RIGHT", &[1, 2]),
            ("BLPOP a b 0", &[1, 2]),
            ("OBJECT ENCODING k", &[2]),
            ("SPUBLISH ch msg", &[1]),
            ("PUBLISH ch msg", &[]),
            ("PING", &[]),
            ("SET k v EX 10", &[1]),
            ("GEORADIUS k 0 0 10 km STORE dst", &[1, 7]),
            ("GEORADIUSBYMEMBER k m 10 km STOREDIST dst", &[1, 6]),
            ("MIGRATE host 6379 \"\" 0 5000 KEYS a b", &[7, 8]),
            ("SORT k STORE dst", &[1, 3]),
            ("BITOP AND dest a b", &[2, 3, 4]),
        ];
        for (line, want) in cases {
            assert_eq!(keys(line).as_deref(), Ok(*want), "{line}");
        }
    }

    /// Every case the real server answered with `COMMAND GETKEYS`.
    #[test]
    fn agrees_with_redis_getkeys() {
        let mut checked = 0;
        for line in GETKEYS_7_0.lines().filter(|l| !l.starts_with('#')) {
            let (want, cmd) = line.split_once('\t').expect("tab");
            let want: Vec<usize> = want
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("index"))
                .collect();
            assert_eq!(keys(cmd), Ok(want), "{cmd}");
            checked += 1;
        }
        assert!(checked > 80);
    }

    #[test]
    fn more_examples() {
        let cases: &[(&str, &[usize])] = &[
            // Sharded pub/sub channels hash like keys.
            ("SSUBSCRIBE c1 c2", &[1, 2]),
            ("SUNSUBSCRIBE c1", &[1]),
            ("SUBSCRIBE c1", &[]),
            ("CLUSTER KEYSLOT x", &[]),
            ("XINFO STREAM s FULL", &[2]),
            ("MEMORY USAGE k SAMPLES 0", &[2]),
            ("xread count 1 streams s1 0", &[4]),
            // STREAMS is found case-insensitively, and only from startfrom.
            ("XREADGROUP GROUP streams c STREAMS s 0", &[5]),
            // Optional clause absent: just the first spec.
            ("GEORADIUS k 0 0 10 km", &[1]),
            ("SORT k", &[1]),
            (
                "SORT k BY w_* LIMIT 0 10 GET # GET o_* ALPHA STORE dst",
                &[1, 13],
            ),
            ("SORT k STORE d1 STORE d2", &[1, 5]),
            // The destination is not read as an option.
            ("SORT k STORE limit", &[1, 3]),
            ("SORT_RO k BY nosort", &[1]),
            ("MIGRATE host 6379 k 0 5000", &[3]),
            ("MIGRATE host 6379 k 0 5000 COPY REPLACE", &[3]),
            ("MIGRATE host 6379 \"\" 0 5000 AUTH keys KEYS a", &[9]),
            (
                "MIGRATE host 6379 \"\" 0 5000 AUTH2 u keys KEYS a b",
                &[10, 11],
            ),
            // KEYS with a non-empty key is an error MIGRATE reports.
            ("MIGRATE host 6379 k 0 5000 KEYS a", &[]),
            ("EVAL script 0", &[]),
            // XREAD without STREAMS (a trailing one does not count): no
            // keys; Redis reports the syntax error.
            ("XREAD COUNT 1", &[]),
            ("XREAD STREAMS", &[]),
        ];
        for (line, want) in cases {
            assert_eq!(keys(line).as_deref(), Ok(*want), "{line}");
        }
    }

    #[test]
    fn malformed_arguments_are_errors() {
        let cases = [
            ("EVAL script x k1", Error::Numkeys { index: 2 }),
            ("EVAL script -1 k1", Error::Numkeys { index: 2 }),
            ("EVAL script 01 k1", Error::Numkeys { index: 2 }),
            ("EVAL script +1 k1", Error::Numkeys { index: 2 }),
            (
                "EVAL script 99999999999999999999 k1",
                Error::Numkeys { index: 2 },
            ),
            ("ZUNIONSTORE dst abc a", Error::Numkeys { index: 2 }),
            // More keys than arguments.
            ("EVAL script 3 k1 k2", Error::OutOfRange),
            ("ZUNIONSTORE dst 9223372036854775807 a", Error::OutOfRange),
            // No numkeys at all.
            ("EVAL script", Error::OutOfRange),
            // Arity errors: the key is missing.
            ("GET", Error::OutOfRange),
            ("DEL", Error::OutOfRange),
            ("SORT", Error::OutOfRange),
            ("MIGRATE host", Error::OutOfRange),
            // A stream without an id.
            ("XREAD STREAMS s1", Error::OutOfRange),
            // As in Redis: an empty range is an error even where arity
            // allows it; the caller forwards such commands anywhere.
            ("SUNSUBSCRIBE", Error::OutOfRange),
        ];
        for (line, want) in cases {
            assert_eq!(keys(line), Err(want), "{line}");
        }
    }

    #[test]
    fn legacy_triple_without_specs() {
        let table = table_of(vec![
            // A module command like MSET, registered without key specs.
            entry("mod.mset", -3, &["write"], [1, -1, 2], vec![]),
            entry("mod.get", 2, &["readonly"], [1, 1, 1], vec![]),
            entry("mod.info", 1, &[], [0, 0, 0], vec![]),
            // getkeys-API only: the triple cannot be trusted.
            entry("mod.dyn", -2, &["movablekeys"], [0, 0, 0], vec![]),
        ]);
        let k = |line: &str| {
            let a = args(line);
            table.lookup(&a).expect(line).key_indices(&a)
        };
        assert_eq!(k("MOD.MSET a 1 b 2"), Ok(vec![1, 3]));
        assert_eq!(k("mod.get a"), Ok(vec![1]));
        assert_eq!(k("mod.get"), Err(Error::OutOfRange));
        assert_eq!(k("mod.info"), Ok(vec![]));
        assert_eq!(k("mod.dyn a b"), Err(Error::Unresolved));
        let dynamic = table.get(b"mod.dyn").expect("mod.dyn");
        assert!(!dynamic.keys_resolvable());
        assert_eq!(
            dynamic.key_indices_partial(&args("mod.dyn a b")),
            Ok(vec![])
        );
    }

    #[test]
    fn unknown_and_incomplete_specs_are_unresolved() {
        let index1 = || typed("index", vec![("index", BytesFrame::Integer(1))]);
        let range0 = || {
            typed(
                "range",
                vec![
                    ("lastkey", BytesFrame::Integer(0)),
                    ("keystep", BytesFrame::Integer(1)),
                    ("limit", BytesFrame::Integer(0)),
                ],
            )
        };
        let table = table_of(vec![
            entry(
                "mod.unknown",
                -2,
                &["movablekeys"],
                [1, 1, 1],
                vec![
                    spec(&["RO"], index1(), range0()),
                    spec(&["RW"], typed("unknown", vec![]), typed("unknown", vec![])),
                ],
            ),
            entry(
                "mod.incomplete",
                -2,
                &["movablekeys"],
                [1, 1, 1],
                vec![spec(&["RW", "incomplete"], index1(), range0())],
            ),
            // A begin_search type from a future Redis.
            entry(
                "mod.future",
                -2,
                &[],
                [1, 1, 1],
                vec![spec(&["RW"], typed("regex", vec![]), range0())],
            ),
        ]);
        for name in ["mod.unknown", "mod.incomplete", "mod.future"] {
            let a = args(&format!("{name} k x"));
            let cmd = table.lookup(&a).expect(name);
            assert!(!cmd.keys_resolvable(), "{name}");
            assert_eq!(cmd.key_indices(&a), Err(Error::Unresolved), "{name}");
        }
        let partial = |name: &str| {
            let a = args(&format!("{name} k x"));
            table.lookup(&a).expect(name).key_indices_partial(&a)
        };
        assert_eq!(partial("mod.unknown"), Ok(vec![1]));
        assert_eq!(partial("mod.incomplete"), Ok(vec![1]));
        assert_eq!(partial("mod.future"), Ok(vec![]));
    }

    #[test]
    fn keyword_search_backwards_and_limits() {
        let keyword = |kw: &str, from: i64| {
            typed(
                "keyword",
                vec![
                    ("keyword", bulk(kw)),
                    ("startfrom", BytesFrame::Integer(from)),
                ],
            )
        };
        let range = |lastkey: i64, keystep: i64, limit: i64| {
            typed(
                "range",
                vec![
                    ("lastkey", BytesFrame::Integer(lastkey)),
                    ("keystep", BytesFrame::Integer(keystep)),
                    ("limit", BytesFrame::Integer(limit)),
                ],
            )
        };
        let table = table_of(vec![
            // The last KEYS wins when searching backwards.
            entry(
                "mod.back",
                -2,
                &["movablekeys"],
                [0, 0, 0],
                vec![spec(&["RW"], keyword("KEYS", -1), range(-1, 1, 0))],
            ),
            // One key in three of what follows the keyword.
            entry(
                "mod.third",
                -2,
                &["movablekeys"],
                [0, 0, 0],
                vec![spec(&["RW"], keyword("ON", 1), range(-1, 1, 3))],
            ),
            entry(
                "mod.step0",
                -2,
                &[],
                [1, 1, 1],
                vec![spec(
                    &["RW"],
                    typed("index", vec![("index", BytesFrame::Integer(1))]),
                    range(0, 0, 0),
                )],
            ),
        ]);
        let k = |line: &str| {
            let a = args(line);
            table.lookup(&a).expect(line).key_indices(&a)
        };
        assert_eq!(k("mod.back x KEYS a keys b c"), Ok(vec![5, 6]));
        // Backwards search stops before index 1, as Redis.
        assert_eq!(k("mod.back keys a"), Ok(vec![]));
        // Backwards search starts at the last argument, so a trailing
        // keyword is found, and has no key after it.
        assert_eq!(k("mod.back a KEYS"), Err(Error::OutOfRange));
        assert_eq!(k("mod.third on a b c x y z"), Ok(vec![2, 3]));
        assert_eq!(k("mod.step0 a"), Err(Error::BadSpec("key step below 1")));
    }

    #[test]
    fn malformed_replies_are_rejected() {
        let bad = [
            BytesFrame::Integer(1),
            BytesFrame::Error("ERR unknown command 'COMMAND'".into()),
            BytesFrame::Array(vec![BytesFrame::Integer(1)]),
            BytesFrame::Array(vec![BytesFrame::Array(vec![bulk("get")])]),
            BytesFrame::Array(vec![BytesFrame::Array(vec![
                bulk("get"),
                bulk("two"),
                BytesFrame::Array(vec![]),
                BytesFrame::Integer(1),
                BytesFrame::Integer(1),
                BytesFrame::Integer(1),
            ])]),
        ];
        for reply in bad {
            assert!(
                matches!(
                    CommandTable::from_command_reply(&reply),
                    Err(Error::Reply(_))
                ),
                "{reply:?}"
            );
        }
        // Pre-7.0 entries have only the first six or seven fields.
        let table = table_of(vec![BytesFrame::Array(vec![
            bulk("GET"),
            BytesFrame::Integer(2),
            BytesFrame::Array(vec![status("readonly"), status("fast")]),
            BytesFrame::Integer(1),
            BytesFrame::Integer(1),
            BytesFrame::Integer(1),
        ])]);
        let get = table.get(b"get").expect("get");
        assert_eq!(&*get.name, "get");
        assert_eq!(get.key_indices(&args("GET k")), Ok(vec![1]));
    }
}
