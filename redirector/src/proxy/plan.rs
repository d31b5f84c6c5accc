//! The command planner: where a command runs and how its replies become
//! the one answer a single Redis would give. Pure: no sockets, no async.
//!
//! The source of truth is the live cluster's command table: key
//! specifications (which slots a command touches) and Redis 7's command
//! tips (`request_policy`, `response_policy`), which say how a command
//! spans a cluster. What the tips do not say, or say in a way one Redis
//! would not behave, is in [`OVERRIDES`], each with its reason. Commands
//! that depend on this client's own connection (transactions, pub/sub,
//! blocking, the CLIENT and CLUSTER views) are the proxy's.

use bytes::Bytes;

use super::{
    merge::Merge,
    script_keys::{ScriptKeys, script_keys},
};
use crate::{
    cluster::{
        commands::{AclCategories, CommandInfo, CommandTable, Flags, LastCommand},
        slot,
    },
    fasthash::FnvHashMap,
    resp::{Protocol, reply, request::Request},
};

const NOAUTH: &str = "NOAUTH Authentication required.";
pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// What the planner knows about the calling session.
#[derive(Clone, Copy, Debug)]
pub struct SessionState<'a> {
    pub protocol: Protocol,
    pub authed: bool,
    /// Between MULTI and EXEC.
    pub in_multi: bool,
    /// A RESP2 client with subscriptions: only pub/sub commands, PING,
    /// QUIT and RESET are allowed.
    pub subscribed_resp2: bool,
    /// The backend is one shard (a standalone primary): keys never span
    /// slots, and every slot is slot 0.
    pub one_shard: bool,
    /// Whether `@admin` and `@dangerous` commands may run.
    pub admin: Admin<'a>,
}

/// Who decides whether a client may run `@admin`/`@dangerous` commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin<'a> {
    /// Redis, by the client's own user (ACL passthrough), or the operator
    /// allowed them (`--allow-admin-commands`).
    Allowed,
    /// Proxy auth mode: clients would run them with the proxy's
    /// credentials, so backend `backend` refuses them.
    Refused { backend: &'a str },
}

/// Which nodes a fan-out reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes {
    /// Every master: one per shard (`request_policy:all_shards`).
    Masters,
    /// Masters and replicas (`request_policy:all_nodes`).
    All,
    /// The master of slot 0: one node, the same every time, for what every
    /// node answers alike (and the proxy then amends).
    First,
}

/// Commands answered by the proxy itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Ping,
    Echo,
    Time,
    Select,
    Quit,
    Auth,
    Hello,
    Reset,
    /// READONLY, READWRITE, ASKING: connection modes the proxy manages.
    Ok,
    /// CLIENT ...: about this proxy's clients.
    Client,
    /// CLUSTER ...: the one-node view.
    Cluster,
    /// MONITOR: this proxy's clients' commands.
    Monitor,
    /// ACL WHOAMI: the proxy knows who the client is.
    AclWhoami,
    /// SLOWLOG ...: this proxy's clients' slow commands.
    Slowlog,
}

/// Transaction steps, run on leased connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Txn {
    Multi,
    Exec,
    Discard,
    Watch { slot: u16 },
    Unwatch,
}

/// A command's plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Local(Local),
    /// One node: the owner of `slot` (a replica for reads, by the read
    /// policy), or, without a slot, the first master (deterministic, so
    /// keyless commands answer consistently).
    Route {
        slot: Option<u16>,
        readonly: bool,
    },
    /// Keys in several slots: one command per slot, run concurrently and
    /// merged. Each group is a slot and the argument ranges (a key and the
    /// arguments that belong to it, such as MSET's value) it carries.
    Split {
        groups: Vec<(u16, Vec<std::ops::Range<usize>>)>,
        merge: Merge,
        readonly: bool,
    },
    /// Every master or every node, merged.
    FanOut {
        nodes: Nodes,
        merge: Merge,
        readonly: bool,
    },
    /// SCAN: one cursor across the shards, filling COUNT across them.
    Scan,
    /// On a leased connection to the owner of `slot`, so it never holds up
    /// a shared one.
    Blocking {
        slot: Option<u16>,
    },
    /// WAIT: acknowledgement of this client's writes, on a lease.
    Wait,
    Txn(Txn),
    /// SUBSCRIBE and friends: the client's pub/sub actor.
    PubSub,
    /// PUBLISH to the master of the channel's slot, where the proxy keeps
    /// the channel's subscriptions: its receiver count is then complete.
    Publish {
        slot: u16,
    },
    /// Between MULTI and EXEC: checked, queued (`Err`: the error reply;
    /// EXEC then aborts).
    Queue(Result<Option<u16>, Bytes>),
    /// Refused here with this error reply.
    Refuse(Bytes),
}

/// How the tips' absence or their behaviour is corrected, per command
/// (`container|sub` for subcommands).
#[derive(Clone, Copy, Debug)]
enum Override {
    Local(Local),
    Route,
    FanOut(Nodes, Merge, bool),
    /// Keys must share a slot (never split).
    SameSlot,
    Publish,
    Refuse,
}

/// Where the tips are silent or wrong for one Redis, with the reason.
const OVERRIDES: &[(&str, Override, &str)] = &[
    // Statistics and ACLs are per node: 7.0 gives these no tips, yet one
    // Redis applies them to all of itself.
    (
        "config|resetstat",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "statistics are kept per node",
    ),
    (
        "config|rewrite",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "every node's config file",
    ),
    (
        "acl|setuser",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "Redis Cluster does not propagate ACLs",
    ),
    (
        "acl|deluser",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "Redis Cluster does not propagate ACLs",
    ),
    (
        "acl|load",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "Redis Cluster does not propagate ACLs",
    ),
    (
        "acl|save",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "Redis Cluster does not propagate ACLs",
    ),
    (
        "acl|whoami",
        Override::Local(Local::AclWhoami),
        "the proxy authenticates the client",
    ),
    // Persistence is per node.
    (
        "save",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "every node saves its own data",
    ),
    (
        "bgsave",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "every node saves its own data",
    ),
    (
        "bgrewriteaof",
        Override::FanOut(Nodes::All, Merge::AllSucceeded, false),
        "every node rewrites its own AOF",
    ),
    // No response policy in the tips: the merges one Redis implies.
    (
        "randomkey",
        Override::FanOut(Nodes::Masters, Merge::RandomKey, true),
        "a key whenever any master holds one",
    ),
    // A replica replays its master's writes and times them again: one
    // Redis's histograms are the masters'.
    (
        "latency|histogram",
        Override::FanOut(Nodes::Masters, Merge::SumPerKey, true),
        "replicas time their masters' commands again",
    ),
    // One Redis answers how many event series it reset.
    (
        "latency|reset",
        Override::FanOut(Nodes::All, Merge::AggSum, false),
        "the event series reset on every node",
    ),
    // The nodes' slow logs hold the proxy's own fan-outs and probes; a
    // client's slow log is its own commands, timed by the proxy.
    (
        "slowlog|get",
        Override::Local(Local::Slowlog),
        "this proxy's clients' commands, timed by the proxy",
    ),
    (
        "slowlog|len",
        Override::Local(Local::Slowlog),
        "this proxy's clients' commands, timed by the proxy",
    ),
    (
        "slowlog|reset",
        Override::Local(Local::Slowlog),
        "this proxy's clients' commands, timed by the proxy",
    ),
    (
        "slowlog|help",
        Override::Local(Local::Slowlog),
        "this proxy's clients' commands, timed by the proxy",
    ),
    (
        "pubsub|channels",
        Override::FanOut(Nodes::Masters, Merge::Union, true),
        "subscriptions live on the channel's master",
    ),
    (
        "pubsub|shardchannels",
        Override::FanOut(Nodes::Masters, Merge::Union, true),
        "sharded channels live on their slot's master",
    ),
    (
        "pubsub|numsub",
        Override::FanOut(Nodes::Masters, Merge::SumPerKey, true),
        "subscriptions live on the channel's master",
    ),
    (
        "pubsub|shardnumsub",
        Override::FanOut(Nodes::Masters, Merge::SumPerKey, true),
        "sharded channels live on their slot's master",
    ),
    (
        "pubsub|numpat",
        Override::FanOut(Nodes::Masters, Merge::AggMax, true),
        "the proxy subscribes patterns on every master",
    ),
    // Channels have no key spec, but their slot decides where the proxy
    // keeps subscriptions.
    (
        "publish",
        Override::Publish,
        "the channel's master has its subscribers",
    ),
    // The tips say multi_shard/agg_min: split, it is not all-or-nothing.
    (
        "msetnx",
        Override::SameSlot,
        "a split MSETNX would not be atomic",
    ),
    // Consistent answers from one node rather than round-robin.
    (
        "config|get",
        Override::FanOut(Nodes::First, Merge::AllSucceeded, true),
        "every node has the same settings, but the port is the proxy's",
    ),
    ("acl|list", Override::Route, "every node has the same users"),
    (
        "acl|getuser",
        Override::Route,
        "every node has the same users",
    ),
    (
        "acl|users",
        Override::Route,
        "every node has the same users",
    ),
    // Connection-level commands the proxy owns.
    (
        "monitor",
        Override::Local(Local::Monitor),
        "this proxy's clients",
    ),
    (
        "sync",
        Override::Refuse,
        "a replication stream is not a client's",
    ),
    (
        "psync",
        Override::Refuse,
        "a replication stream is not a client's",
    ),
    (
        "replicaof",
        Override::Refuse,
        "roles are the cluster's, not a client's",
    ),
    (
        "slaveof",
        Override::Refuse,
        "roles are the cluster's, not a client's",
    ),
    (
        "failover",
        Override::Refuse,
        "roles are the cluster's, not a client's",
    ),
    (
        "shutdown",
        Override::Refuse,
        "a client does not stop the cluster",
    ),
    (
        "debug",
        Override::Refuse,
        "DEBUG would reach one node's internals",
    ),
    ("swapdb", Override::Refuse, "Redis Cluster has one database"),
    ("move", Override::Refuse, "Redis Cluster has one database"),
];

fn find_override(name: &str) -> Option<Override> {
    // Looked up for every command: a scan of the list with a string
    // compare per entry was 2.4% of a pipelined GET's instructions.
    static BY_NAME: std::sync::LazyLock<FnvHashMap<&str, Override>> =
        std::sync::LazyLock::new(|| OVERRIDES.iter().map(|(n, o, _)| (*n, *o)).collect());
    BY_NAME.get(name).copied()
}

/// The planner's override list, for documentation: (command, reason).
pub fn overrides() -> impl Iterator<Item = (&'static str, &'static str)> {
    OVERRIDES.iter().map(|(name, _, why)| (*name, *why))
}

/// The table entry that governs `req` (a subcommand's, when its second
/// word names one), read from the frame in place.
pub fn lookup<'t>(table: &'t CommandTable, req: &Request) -> Option<&'t CommandInfo> {
    table.lookup_words(req.arg(0), req.arg(1))
}

/// [`lookup`], remembering the name in `last` for the next request of a
/// pipeline.
pub fn lookup_cached<'t>(
    table: &'t CommandTable,
    req: &Request,
    last: &mut LastCommand,
) -> Option<&'t CommandInfo> {
    table.lookup_words_cached(req.arg(0), req.arg(1), last)
}

/// Plans `req` for a session in `state`.
pub fn plan(table: &CommandTable, req: &Request, state: &SessionState) -> Plan {
    plan_known(table, lookup(table, req), req, state)
}

/// [`plan`] with the command's table entry already looked up (`info`:
/// [`lookup`]), as the session has it.
pub fn plan_known(
    table: &CommandTable,
    info: Option<&CommandInfo>,
    req: &Request,
    state: &SessionState,
) -> Plan {
    // Most traffic: a ready session's plain command, routed by its keys as
    // the checks below would conclude, without reading its name again.
    if let Some(info) = info.filter(|i| i.plain)
        && state.authed
        && !state.in_multi
        && !state.subscribed_resp2
    {
        return plain_route(req, info, state);
    }
    // Lowercase on the stack: this runs for every request. A longer name
    // is no connection command; the table decides what it is.
    let mut lower = [0u8; 32];
    let raw = req.arg(0).unwrap_or_default();
    let name: &[u8] = match lower.get_mut(..raw.len()) {
        Some(buf) => {
            buf.copy_from_slice(raw);
            buf.make_ascii_lowercase();
            buf
        }
        None => b"",
    };
    if !state.authed && !matches!(name, b"auth" | b"hello" | b"quit" | b"reset") {
        return Plan::Refuse(reply::error(NOAUTH));
    }
    if let Some(refusal) = admin_refusal(info, state) {
        return if state.in_multi {
            Plan::Queue(Err(refusal))
        } else {
            Plan::Refuse(refusal)
        };
    }
    if state.in_multi && matches!(name, b"auth" | b"hello") {
        // Queued, it would run on a leased connection at EXEC and switch
        // that connection's user (or protocol) for whoever leases it next.
        return Plan::Queue(Err(reply::error(&format!(
            "ERR {} inside MULTI is not supported by redirector",
            String::from_utf8_lossy(name).to_uppercase()
        ))));
    }
    if state.in_multi
        && !matches!(
            name,
            b"exec" | b"discard" | b"multi" | b"watch" | b"quit" | b"reset"
        )
    {
        return Plan::Queue(
            check_queued(req, info, state)
                .map(|slot| slot.or_else(|| undeclared_keys_slot(table, req, info?))),
        );
    }
    if state.subscribed_resp2 && !is_pubsub(name) && !matches!(name, b"ping" | b"quit" | b"reset") {
        return Plan::Refuse(reply::error(&format!(
            "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            String::from_utf8_lossy(name)
        )));
    }
    // PING follows its tips (every master, all must answer), so a master
    // busy with a script answers BUSY as one Redis would; a RESP2
    // subscriber's PING is its subscription's.
    if name == b"ping" && state.subscribed_resp2 {
        return Plan::Local(Local::Ping);
    }
    if let Some(plan) = connection_command(name, req) {
        return plan;
    }
    let Some(info) = info else {
        return Plan::Refuse(unknown_command(req));
    };
    if !info.arity_ok(req.argc()) {
        return Plan::Refuse(wrong_arity(&info.name));
    }
    if name == b"watch" {
        if state.in_multi {
            return Plan::Refuse(reply::error("ERR WATCH inside MULTI is not allowed"));
        }
        return match slot_for(req, info, state) {
            Ok(Some(slot)) => Plan::Txn(Txn::Watch { slot }),
            Ok(None) => Plan::Refuse(wrong_arity("watch")),
            Err(e) => Plan::Refuse(e),
        };
    }
    if let Some(found) = find_override(&info.name) {
        return overridden(found, info, req, state);
    }
    let flags = info.flags;
    let readonly = flags.contains(Flags::READONLY) && !flags.contains(Flags::WRITE);
    if flags.contains(Flags::BLOCKING) && may_block(req) {
        return match slot_for(req, info, state) {
            Ok(slot) => Plan::Blocking { slot },
            Err(e) => Plan::Refuse(e),
        };
    }
    let (request_policy, response_policy) = policies(info);
    let merge = match response_policy {
        Some("special") => Merge::special(&info.name).unwrap_or(Merge::Concat),
        policy => Merge::from_tip(policy),
    };
    match request_policy {
        Some("all_shards") => Plan::FanOut {
            nodes: Nodes::Masters,
            merge,
            readonly,
        },
        Some("all_nodes") => Plan::FanOut {
            nodes: Nodes::All,
            merge,
            readonly,
        },
        Some("multi_shard") if state.one_shard => Plan::Route {
            slot: Some(0),
            readonly,
        },
        Some("multi_shard") => split_plan(req, info, Merge::for_split(response_policy), readonly),
        _ => match slot_for(req, info, state) {
            Ok(None) => Plan::Route {
                slot: undeclared_keys_slot(table, req, info),
                readonly,
            },
            Ok(slot) => Plan::Route { slot, readonly },
            Err(e) => Plan::Refuse(e),
        },
    }
}

/// A [`CommandInfo::plain`] command of a ready session: what the full
/// planner concludes for it, reached without its name checks.
fn plain_route(req: &Request, info: &CommandInfo, state: &SessionState) -> Plan {
    if !info.arity_ok(req.argc()) {
        return Plan::Refuse(wrong_arity(&info.name));
    }
    let readonly = info.flags.contains(Flags::READONLY) && !info.flags.contains(Flags::WRITE);
    match slot_for(req, info, state) {
        Ok(slot) => Plan::Route { slot, readonly },
        Err(e) => Plan::Refuse(e),
    }
}

/// Whether the planner has no rule of its own for `info`, whatever the
/// request's arguments: not a command the proxy answers or treats apart
/// by name, no override, not blocking, no request policy (fan-out or
/// split), not ACL-gated (`@admin`/`@dangerous`: refused in proxy auth
/// mode, permit-checked in passthrough), not a script whose body names
/// its keys. A ready session routes such a command by its keys alone
/// ([`CommandTable::mark_plain`]); the planner's tests check both paths
/// agree on every command of the table.
pub fn is_plain(info: &CommandInfo) -> bool {
    let word = info.container_name();
    let alone = Request::from_args(vec![Bytes::copy_from_slice(word.as_bytes())]);
    connection_command(word.as_bytes(), &alone).is_none()
        // WATCH is planned apart by name (it pins a transaction's slot);
        // the other names the planner treats apart answer to
        // `connection_command` or `find_override`.
        && word != "watch"
        && find_override(&info.name).is_none()
        && !info.flags.contains(Flags::BLOCKING)
        && policies(info).0.is_none()
        && !info
            .acl
            .intersects(AclCategories::ADMIN | AclCategories::DANGEROUS)
        && !matches!(word, "eval" | "eval_ro")
}

/// Proxy auth mode: an `@admin`/`@dangerous` command (by the server's
/// own ACL categories) would run with the proxy's credentials, so it is
/// refused unless the operator allowed it: a client must not lock the
/// proxy out (`CONFIG SET requirepass`) or act as it on the nodes.
fn admin_refusal(info: Option<&CommandInfo>, state: &SessionState) -> Option<Bytes> {
    let Admin::Refused { backend } = state.admin else {
        return None;
    };
    let info = info?;
    if !info
        .acl
        .intersects(AclCategories::ADMIN | AclCategories::DANGEROUS)
    {
        return None;
    }
    Some(reply::error(&format!(
        "NOPERM redirector: backend '{backend}' refuses @admin and @dangerous commands such as '{}' in proxy auth mode, where they would run with the proxy's own credentials (start redirector with --allow-admin-commands to allow them)",
        info.name
    )))
}

/// EVAL without declared keys: the shard its literal keys name, if any
/// (see `script_keys`).
fn undeclared_keys_slot(table: &CommandTable, req: &Request, info: &CommandInfo) -> Option<u16> {
    if &*info.name != "eval" && &*info.name != "eval_ro" {
        return None;
    }
    match script_keys(req.args().get(1)?, table) {
        ScriptKeys::Slot(slot) => Some(slot),
        ScriptKeys::None | ScriptKeys::Unknown => None,
    }
}

/// Commands about the client's own connection, whatever the table says.
fn connection_command(name: &[u8], req: &Request) -> Option<Plan> {
    Some(match name {
        b"echo" => Plan::Local(Local::Echo),
        b"time" => Plan::Local(Local::Time),
        b"select" => Plan::Local(Local::Select),
        b"quit" => Plan::Local(Local::Quit),
        b"auth" => Plan::Local(Local::Auth),
        b"hello" => Plan::Local(Local::Hello),
        b"reset" => Plan::Local(Local::Reset),
        b"readonly" | b"readwrite" | b"asking" => Plan::Local(Local::Ok),
        b"client" => Plan::Local(Local::Client),
        b"cluster" => {
            // COUNTKEYSINSLOT / GETKEYSINSLOT carry a slot: to its owner.
            if req.arg_is(1, "countkeysinslot") || req.arg_is(1, "getkeysinslot") {
                let slot = req
                    .args()
                    .get(2)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u16>().ok())
                    .filter(|&s| usize::from(s) < slot::SLOTS);
                match slot {
                    Some(slot) => Plan::Route {
                        slot: Some(slot),
                        readonly: true,
                    },
                    None => Plan::Refuse(reply::error("ERR Invalid slot")),
                }
            } else {
                Plan::Local(Local::Cluster)
            }
        }
        b"multi" => Plan::Txn(Txn::Multi),
        b"exec" => Plan::Txn(Txn::Exec),
        b"discard" => Plan::Txn(Txn::Discard),
        b"unwatch" => Plan::Txn(Txn::Unwatch),
        b"scan" => Plan::Scan,
        b"wait" => Plan::Wait,
        b"info" => Plan::FanOut {
            nodes: Nodes::Masters,
            merge: Merge::Info,
            readonly: true,
        },
        name if is_pubsub(name) => Plan::PubSub,
        _ => return None,
    })
}

fn overridden(found: Override, info: &CommandInfo, req: &Request, state: &SessionState) -> Plan {
    let readonly = info.flags.contains(Flags::READONLY) && !info.flags.contains(Flags::WRITE);
    match found {
        Override::Local(local) => Plan::Local(local),
        Override::Route => Plan::Route {
            slot: None,
            readonly,
        },
        Override::FanOut(nodes, merge, readonly) => Plan::FanOut {
            nodes,
            merge,
            readonly,
        },
        Override::SameSlot => match slot_for(req, info, state) {
            Ok(slot) => Plan::Route { slot, readonly },
            Err(e) => Plan::Refuse(e),
        },
        Override::Publish => match req.args().get(1) {
            Some(channel) => Plan::Publish {
                slot: slot::slot(channel),
            },
            None => Plan::Refuse(wrong_arity(&info.name)),
        },
        Override::Refuse => Plan::Refuse(reply::error(&format!(
            "ERR {} is not supported by redirector",
            info.name.replace('|', " ").to_uppercase()
        ))),
    }
}

/// `(request_policy, response_policy)` from the command's tips.
fn policies(info: &CommandInfo) -> (Option<&str>, Option<&str>) {
    let tip = |prefix: &str| info.tips.iter().find_map(|t| t.strip_prefix(prefix));
    (tip("request_policy:"), tip("response_policy:"))
}

pub fn is_pubsub(name: &[u8]) -> bool {
    matches!(
        name,
        b"subscribe"
            | b"psubscribe"
            | b"ssubscribe"
            | b"unsubscribe"
            | b"punsubscribe"
            | b"sunsubscribe"
    )
}

/// A multi_shard command: one plan per slot, or a plain route when every
/// key shares one.
fn split_plan(req: &Request, info: &CommandInfo, merge: Merge, readonly: bool) -> Plan {
    let keys = match info.key_indices(req.args()) {
        Ok(keys) if !keys.is_empty() => keys,
        // Let Redis answer what the table cannot resolve.
        _ => {
            return Plan::Route {
                slot: None,
                readonly,
            };
        }
    };
    let mut groups: Vec<(u16, Vec<std::ops::Range<usize>>)> = Vec::new();
    for (n, &key) in keys.iter().enumerate() {
        // A key carries the arguments up to the next key (MSET's value).
        let end = keys.get(n + 1).copied().unwrap_or(req.argc());
        let s = slot::slot(&req.args()[key]);
        match groups.iter_mut().find(|(g, _)| *g == s) {
            Some((_, ranges)) => ranges.push(key..end),
            None => groups.push((s, std::iter::once(key..end).collect())),
        }
    }
    if groups.len() == 1 {
        return Plan::Route {
            slot: Some(groups[0].0),
            readonly,
        };
    }
    Plan::Split {
        groups,
        merge,
        readonly,
    }
}

/// What MULTI queues: the command's slot, or the error Redis would give
/// at queue time (EXEC then aborts).
fn check_queued(
    req: &Request,
    info: Option<&CommandInfo>,
    state: &SessionState,
) -> Result<Option<u16>, Bytes> {
    let Some(info) = info else {
        return Err(unknown_command(req));
    };
    if !info.arity_ok(req.argc()) {
        return Err(wrong_arity(&info.name));
    }
    if info.flags.contains(Flags::NO_MULTI) {
        return Err(reply::error("ERR Command not allowed inside a transaction"));
    }
    slot_for(req, info, state)
}

/// [`keys_slot`] for this session's backend: on one shard, any keys are
/// in slot 0 (a standalone Redis has no CROSSSLOT).
fn slot_for(req: &Request, info: &CommandInfo, state: &SessionState) -> Result<Option<u16>, Bytes> {
    let slot = keys_slot(req, info);
    if !state.one_shard {
        return slot;
    }
    match slot {
        Ok(None) => Ok(None),
        Ok(Some(_)) | Err(_) => Ok(Some(0)),
    }
}

/// The one slot of a command's keys (`None`: no keys), or CROSSSLOT.
pub fn keys_slot(req: &Request, info: &CommandInfo) -> Result<Option<u16>, Bytes> {
    // Fixed key positions (most commands): walk them without building an
    // index list. Movable keys need the key specs.
    let fixed = !info.flags.contains(Flags::MOVABLEKEYS) && info.first_key > 0;
    if fixed {
        let argc = req.argc() as i64;
        let last = if info.last_key < 0 {
            argc + info.last_key
        } else {
            info.last_key
        };
        let step = info.step.max(1) as usize;
        let (first, last) = (info.first_key as usize, last.min(argc - 1).max(0) as usize);
        if first == last {
            // One key (GET, SET, INCR, ...).
            return Ok(req.arg(first).map(slot::slot));
        }
        let mut slots = (first..=last)
            .step_by(step)
            .filter_map(|i| req.arg(i).map(slot::slot));
        let Some(head) = slots.next() else {
            return Ok(None);
        };
        if slots.any(|s| s != head) {
            return Err(reply::error(CROSSSLOT));
        }
        return Ok(Some(head));
    }
    let keys = info
        .key_indices(req.args())
        .or_else(|_| info.key_indices_partial(req.args()))
        .unwrap_or_default();
    let mut slots = keys.iter().map(|&i| slot::slot(&req.args()[i]));
    let Some(first) = slots.next() else {
        return Ok(None);
    };
    if slots.any(|s| s != first) {
        return Err(reply::error(CROSSSLOT));
    }
    Ok(Some(first))
}

/// XREAD/XREADGROUP only block with BLOCK (before STREAMS); the rest of
/// the `blocking` commands always may.
pub fn may_block(req: &Request) -> bool {
    let name = req.name_lower();
    if name != b"xread" && name != b"xreadgroup" {
        return true;
    }
    req.args()
        .iter()
        .take_while(|a| !a.eq_ignore_ascii_case(b"streams"))
        .any(|a| a.eq_ignore_ascii_case(b"block"))
}

/// Commands Redis 7.0 flags `may_replicate` but hides the flag from
/// `COMMAND` ("hidden on purpose", server.c): CLIENT PAUSE WRITE holds
/// them all the same.
const MAY_REPLICATE: &[&str] = &["eval", "evalsha", "fcall", "pfcount", "publish", "spublish"];

/// Whether a command writes or may replicate, as CLIENT PAUSE WRITE sees
/// it. A script whose shebang says `no-writes` does neither.
pub fn may_replicate(info: &CommandInfo, req: &Request) -> bool {
    if info.flags.intersects(Flags::WRITE | Flags::MAY_REPLICATE) {
        return true;
    }
    if !MAY_REPLICATE.contains(&&*info.name) {
        return false;
    }
    !(&*info.name == "eval"
        && req
            .args()
            .get(1)
            .is_some_and(|body| script_declares_no_writes(body)))
}

/// `#!lua flags=no-writes,...` on a script's first line.
pub fn script_declares_no_writes(body: &[u8]) -> bool {
    let first = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(shebang) = first.strip_prefix(b"#!") else {
        return false;
    };
    String::from_utf8_lossy(shebang)
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("flags="))
        .any(|flags| flags.split(',').any(|f| f == "no-writes"))
}

/// Whether MONITOR shows a command: Redis feeds neither admin commands nor
/// those that skip it, but feeds scripts' own calls (eval.c, functions.c)
/// and EXEC (multi.c).
pub fn monitored(info: &CommandInfo) -> bool {
    if info.flags.contains(Flags::ADMIN) {
        return false;
    }
    !info.flags.contains(Flags::SKIP_MONITOR) || is_script(&info.name) || &*info.name == "exec"
}

/// Whether a command may change which passwords Redis accepts: the
/// proxy then forgets the checks it remembers (see `acl::Checks`), so the
/// change holds at once for logins through it.
pub fn changes_credentials(info: &CommandInfo) -> bool {
    info.acl.contains(AclCategories::ADMIN)
        && matches!(
            &*info.name,
            "acl|setuser" | "acl|deluser" | "acl|load" | "config|set"
        )
}

/// Commands that run a script or a function.
pub fn is_script(name: &str) -> bool {
    matches!(
        name,
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
    )
}

/// Redis's own words for a command it does not know (processCommand).
pub fn unknown_command(req: &Request) -> Bytes {
    let mut args = String::new();
    for arg in req.args().iter().skip(1) {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        let text = String::from_utf8_lossy(arg);
        let shown: String = text.chars().take(room).collect();
        args.push_str(&format!("'{shown}' "));
    }
    let name: String = String::from_utf8_lossy(&req.args()[0])
        .chars()
        .take(128)
        .collect();
    reply::error(&format!(
        "ERR unknown command '{name}', with args beginning with: {args}"
    ))
}

/// Redis's arity error; subcommands are named `container|sub`.
pub fn wrong_arity(name: &str) -> Bytes {
    reply::error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Whether a command runs as a barrier: dispatched only once the
/// client's earlier commands have answered, its later ones held until it
/// has (Redis runs one client's commands one at a time). So are commands
/// on leases or over several steps, which the session's own jobs cannot
/// carry in order: blocking ones, WAIT, SCAN (shard after shard), WATCH
/// and EXEC (on the watch's lease) and the fan-outs not sent in turn.
/// Single-slot, split and other fan-out commands go out in the session's
/// turn instead, in order on the client's connections (`gather`).
pub fn waits_for_earlier(plan: &Plan, info: Option<&CommandInfo>, req: &Request) -> bool {
    match plan {
        Plan::Blocking { .. }
        | Plan::Wait
        | Plan::Scan
        | Plan::Txn(Txn::Watch { .. } | Txn::Exec) => true,
        Plan::FanOut { merge, .. } => !fan_out_in_turn(info, req, *merge),
        _ => false,
    }
}

/// Whether a fan-out goes on the client's connections in the session's own
/// turn (`gather`): all but INFO (asked in RESP2, with the proxy's own
/// figures), CONFIG SET (the proxy's own settings are taken out first) and
/// what Redis runs while a script is busy (on leases, so as not to queue
/// behind that very script).
pub fn fan_out_in_turn(info: Option<&CommandInfo>, req: &Request, how: Merge) -> bool {
    how != Merge::Info
        && !(req.arg_is(0, "config") && req.arg_is(1, "set"))
        && !info.is_some_and(|i| i.flags.contains(Flags::ALLOW_BUSY))
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use bytes::BytesMut;
    use redis_protocol::resp2::decode::decode_bytes_mut;

    use super::*;

    const COMMAND_7_0: &[u8] = include_bytes!("../cluster/testdata/command-7.0.resp");

    static TABLE: LazyLock<CommandTable> = LazyLock::new(|| {
        let mut buf = BytesMut::from(COMMAND_7_0);
        let (frame, _, _) = decode_bytes_mut(&mut buf)
            .expect("valid RESP")
            .expect("complete reply");
        let mut table = CommandTable::from_command_reply(&frame).expect("parses");
        table.mark_plain(is_plain);
        table
    });

    /// The table as the full planner alone reads it.
    static UNMARKED: LazyLock<CommandTable> = LazyLock::new(|| {
        let mut table = TABLE.clone();
        table.mark_plain(|_| false);
        table
    });

    const READY: SessionState<'static> = SessionState {
        protocol: Protocol::Resp2,
        authed: true,
        in_multi: false,
        subscribed_resp2: false,
        one_shard: false,
        admin: Admin::Allowed,
    };

    fn req(args: &[&str]) -> Request {
        Request::from_args(
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect::<Vec<_>>(),
        )
    }

    fn plan_of(args: &[&str]) -> Plan {
        plan(&TABLE, &req(args), &READY)
    }

    #[test]
    fn plain_commands_are_planned_as_the_full_planner_plans_them() {
        let states = [
            READY,
            SessionState {
                one_shard: true,
                ..READY
            },
            SessionState {
                authed: false,
                ..READY
            },
            SessionState {
                in_multi: true,
                ..READY
            },
            SessionState {
                subscribed_resp2: true,
                ..READY
            },
            SessionState {
                admin: Admin::Refused { backend: "b" },
                ..READY
            },
        ];
        let mut plain = 0;
        for info in TABLE
            .iter()
            .flat_map(|i| std::iter::once(i).chain(&i.subcommands))
        {
            plain += usize::from(info.plain);
            let words: Vec<&str> = info.name.split('|').collect();
            for tail in [
                &[][..],
                &["k"],
                &["k", "v"],
                &["{t}a", "{t}b", "{t}c", "1"],
                &["a", "b", "c"],
                &["k", "0", "5", "STORE", "d"],
            ] {
                let r = req(&[&words[..], tail].concat());
                for state in &states {
                    assert_eq!(
                        plan(&TABLE, &r, state),
                        plan(&UNMARKED, &r, state),
                        "{} {tail:?} in {state:?}",
                        info.name
                    );
                }
            }
        }
        // The fast path is taken by the traffic it is for, and not by
        // what the proxy treats apart.
        let marked = |name: &str| TABLE.lookup(req(&[name]).args()).is_some_and(|i| i.plain);
        assert!(plain > 100, "{plain} plain commands");
        for name in ["get", "set", "incr", "hset", "lpush", "zadd", "expire"] {
            assert!(marked(name), "{name} is plain");
        }
        for name in [
            "ping",
            "client",
            "watch",
            "blpop",
            "keys",
            "mget",
            "eval",
            "flushall",
            "subscribe",
            "publish",
            "info",
            "scan",
            "exec",
        ] {
            assert!(!marked(name), "{name} is not plain");
        }
    }

    #[test]
    fn pause_write_holds_what_may_replicate() {
        let held = |args: &[&str]| {
            let r = req(args);
            may_replicate(lookup(&TABLE, &r).expect("known"), &r)
        };
        assert!(held(&["SET", "k", "v"]));
        assert!(held(&["PFCOUNT", "hll"]), "hidden may_replicate");
        assert!(held(&["PUBLISH", "ch", "m"]));
        assert!(held(&["EVAL", "return 1", "0"]));
        assert!(!held(&["EVAL", "#!lua flags=no-writes\nreturn 1", "0"]));
        assert!(!held(&["GET", "k"]));
        assert!(!held(&["EVAL_RO", "return 1", "0"]));
    }

    #[test]
    fn monitor_shows_scripts_but_not_admin_commands() {
        let shown = |args: &[&str]| monitored(TABLE.lookup(req(args).args()).expect("known"));
        assert!(shown(&["EVAL", "return 1", "0"]));
        assert!(shown(&["SET", "k", "v"]));
        assert!(!shown(&["CONFIG", "SET", "a", "b"]));
    }

    #[test]
    fn keyed_commands_go_to_their_slot() {
        assert_eq!(
            plan_of(&["GET", "user:1"]),
            Plan::Route {
                slot: Some(slot::slot(b"user:1")),
                readonly: true
            }
        );
        assert_eq!(
            plan_of(&["SET", "{t}a", "1"]),
            Plan::Route {
                slot: Some(slot::slot(b"t")),
                readonly: false
            }
        );
        match plan_of(&["SINTER", "a", "b"]) {
            Plan::Refuse(e) => assert!(e.starts_with(b"-CROSSSLOT")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_on_leases_or_over_several_steps_wait_for_the_earlier_ones() {
        let waits = |args: &[&str], state: &SessionState<'_>| {
            let r = req(args);
            waits_for_earlier(&plan(&TABLE, &r, state), lookup(&TABLE, &r), &r)
        };
        for args in [
            &["BLPOP", "q", "0"][..],
            &["WAIT", "1", "0"],
            &["SCAN", "0"],
            &["WATCH", "k"],
            &["INFO", "keyspace"],
            &["CONFIG", "SET", "maxmemory", "0"],
            &["SCRIPT", "KILL"],
        ] {
            assert!(waits(args, &READY), "{args:?} is a barrier");
        }
        let in_multi = SessionState {
            in_multi: true,
            ..READY
        };
        assert!(waits(&["EXEC"], &in_multi), "EXEC is a barrier");
        // Sent in the session's own turn, in order with the others.
        for args in [
            &["GET", "k"][..],
            &["MGET", "a", "b", "c"],
            &["DEL", "a", "b"],
            &["DBSIZE"],
            &["PING"],
            &["KEYS", "*"],
            &["FLUSHALL"],
            &["CONFIG", "GET", "maxmemory"],
            &["MULTI"],
            &["UNWATCH"],
        ] {
            assert!(!waits(args, &READY), "{args:?} goes in turn");
        }
    }

    #[test]
    fn tips_decide_how_commands_span_the_cluster() {
        assert_eq!(
            plan_of(&["CONFIG", "SET", "maxmemory", "0"]),
            Plan::FanOut {
                nodes: Nodes::All,
                merge: Merge::AllSucceeded,
                readonly: false
            }
        );
        assert_eq!(
            plan_of(&["DBSIZE"]),
            Plan::FanOut {
                nodes: Nodes::Masters,
                merge: Merge::AggSum,
                readonly: true
            }
        );
        // The slow log is the proxy's clients' own; histograms are the
        // masters' (replicas replay their writes).
        assert_eq!(plan_of(&["SLOWLOG", "GET"]), Plan::Local(Local::Slowlog));
        assert_eq!(plan_of(&["SLOWLOG", "LEN"]), Plan::Local(Local::Slowlog));
        assert!(matches!(
            plan_of(&["LATENCY", "HISTOGRAM", "set"]),
            Plan::FanOut {
                nodes: Nodes::Masters,
                merge: Merge::SumPerKey,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["SCRIPT", "EXISTS", "abc"]),
            Plan::FanOut {
                merge: Merge::AggLogicalAnd,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["INFO"]),
            Plan::FanOut {
                merge: Merge::Info,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["CONFIG", "RESETSTAT"]),
            Plan::FanOut {
                nodes: Nodes::All,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["ACL", "SETUSER", "bob", "on"]),
            Plan::FanOut {
                nodes: Nodes::All,
                merge: Merge::AllSucceeded,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["CONFIG", "GET", "maxmemory"]),
            Plan::FanOut {
                nodes: Nodes::First,
                ..
            }
        ));
        assert_eq!(
            plan_of(&["ACL", "USERS"]),
            Plan::Route {
                slot: None,
                readonly: false
            }
        );
    }

    #[test]
    fn multi_key_commands_split_by_slot() {
        match plan_of(&["MSET", "a", "1", "b", "2", "{a}c", "3"]) {
            Plan::Split { groups, merge, .. } => {
                assert_eq!(merge, Merge::AllSucceeded);
                let a = slot::slot(b"a");
                let (_, ranges) = groups.iter().find(|(s, _)| *s == a).expect("a's slot");
                assert_eq!(ranges, &vec![1..3, 5..7]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_of(&["DEL", "a", "b"]),
            Plan::Split {
                merge: Merge::AggSum,
                readonly: false,
                ..
            }
        ));
        assert!(matches!(
            plan_of(&["MGET", "a", "b"]),
            Plan::Split {
                merge: Merge::Values,
                readonly: true,
                ..
            }
        ));
        // Not all-or-nothing if split: refused across slots, as a cluster.
        assert!(matches!(
            plan_of(&["MSETNX", "a", "1", "b", "2"]),
            Plan::Refuse(_)
        ));
        assert!(matches!(
            plan_of(&["MSETNX", "{x}a", "1", "{x}b", "2"]),
            Plan::Route { .. }
        ));
    }

    #[test]
    fn connection_commands_are_the_proxys() {
        assert!(matches!(
            plan_of(&["PING"]),
            Plan::FanOut {
                nodes: Nodes::Masters,
                merge: Merge::AllSucceeded,
                ..
            }
        ));
        let subscribed = SessionState {
            subscribed_resp2: true,
            ..READY
        };
        assert_eq!(
            plan(&TABLE, &req(&["PING"]), &subscribed),
            Plan::Local(Local::Ping)
        );
        assert_eq!(plan_of(&["CLIENT", "LIST"]), Plan::Local(Local::Client));
        assert_eq!(plan_of(&["MONITOR"]), Plan::Local(Local::Monitor));
        assert_eq!(plan_of(&["SUBSCRIBE", "a"]), Plan::PubSub);
        assert_eq!(
            plan_of(&["PUBLISH", "news", "hi"]),
            Plan::Publish {
                slot: slot::slot(b"news")
            }
        );
        assert!(matches!(
            plan_of(&["BLPOP", "q", "0"]),
            Plan::Blocking { slot: Some(_) }
        ));
        assert!(matches!(
            plan_of(&["XREAD", "STREAMS", "s", "0"]),
            Plan::Route { .. }
        ));
        assert!(matches!(plan_of(&["DEBUG", "SLEEP", "0"]), Plan::Refuse(_)));
    }

    #[test]
    fn errors_are_redis_own_words() {
        match plan_of(&["NOSUCH", "a", "b"]) {
            Plan::Refuse(e) => assert_eq!(
                &e[..],
                b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n"
            ),
            other => panic!("{other:?}"),
        }
        match plan_of(&["GET"]) {
            Plan::Refuse(e) => assert_eq!(
                &e[..],
                b"-ERR wrong number of arguments for 'get' command\r\n"
            ),
            other => panic!("{other:?}"),
        }
        let noauth = SessionState {
            authed: false,
            ..READY
        };
        assert!(matches!(
            plan(&TABLE, &req(&["GET", "a"]), &noauth),
            Plan::Refuse(_)
        ));
        assert_eq!(
            plan(&TABLE, &req(&["AUTH", "pw"]), &noauth),
            Plan::Local(Local::Auth)
        );
    }

    #[test]
    fn proxy_mode_refuses_admin_and_dangerous_commands() {
        let proxy = SessionState {
            admin: Admin::Refused { backend: "cart" },
            ..READY
        };
        let refusal =
            |args: &[&str], state: &SessionState<'_>| match plan(&TABLE, &req(args), state) {
                Plan::Refuse(e) | Plan::Queue(Err(e)) if e.starts_with(b"-NOPERM") => {
                    Some(String::from_utf8_lossy(&e).into_owned())
                }
                _ => None,
            };
        let message = refusal(&["CONFIG", "SET", "requirepass", "x"], &proxy).expect("refused");
        assert!(message.contains("backend 'cart'"), "{message}");
        assert!(message.contains("'config|set'"), "{message}");
        assert!(message.contains("--allow-admin-commands"), "{message}");
        for args in [
            &["FLUSHALL"][..],
            &["KEYS", "*"],
            &["CLIENT", "LIST"],
            &["CLIENT", "KILL", "ID", "1"],
            &["MONITOR"],
            &["ACL", "SETUSER", "bob", "on"],
            &["INFO"],
            &["SHUTDOWN"],
            &["CONFIG", "GET", "maxmemory"],
        ] {
            assert!(refusal(args, &proxy).is_some(), "{args:?}");
            // Allowed, or in passthrough: Redis decides.
            assert!(refusal(args, &READY).is_none(), "{args:?}");
        }
        for args in [
            &["GET", "k"][..],
            &["SET", "k", "v"],
            &["CLIENT", "SETNAME", "x"],
            &["CLIENT", "ID"],
            &["PING"],
            &["AUTH", "pw"],
            &["HELLO", "3"],
            &["ACL", "WHOAMI"],
            &["CLUSTER", "SLOTS"],
            &["SUBSCRIBE", "a"],
            &["EVAL", "return 1", "0"],
        ] {
            assert!(refusal(args, &proxy).is_none(), "{args:?}");
        }
        // In a transaction: a queue-time error, and EXEC aborts.
        let queued = SessionState {
            in_multi: true,
            ..proxy
        };
        assert!(matches!(
            plan(
                &TABLE,
                &req(&["CONFIG", "SET", "requirepass", "x"]),
                &queued
            ),
            Plan::Queue(Err(_))
        ));
    }

    #[test]
    fn credential_changes_are_recognised() {
        let changes =
            |args: &[&str]| changes_credentials(TABLE.lookup(req(args).args()).expect("known"));
        assert!(changes(&["ACL", "SETUSER", "app", "resetpass"]));
        assert!(changes(&["ACL", "DELUSER", "app"]));
        assert!(changes(&["CONFIG", "SET", "requirepass", "x"]));
        assert!(!changes(&["ACL", "WHOAMI"]));
        assert!(!changes(&["SET", "k", "v"]));
    }

    #[test]
    fn auth_and_hello_are_never_queued() {
        let multi = SessionState {
            in_multi: true,
            ..READY
        };
        for args in [&["AUTH", "app", "pw"][..], &["HELLO", "3"]] {
            match plan(&TABLE, &req(args), &multi) {
                Plan::Queue(Err(e)) => assert!(e.starts_with(b"-ERR"), "{e:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn transactions_queue_with_queue_time_errors() {
        let multi = SessionState {
            in_multi: true,
            ..READY
        };
        let queued = |args: &[&str]| plan(&TABLE, &req(args), &multi);
        assert_eq!(
            queued(&["SET", "a", "1"]),
            Plan::Queue(Ok(Some(slot::slot(b"a"))))
        );
        assert!(matches!(queued(&["NOSUCH"]), Plan::Queue(Err(_))));
        assert!(matches!(queued(&["GET"]), Plan::Queue(Err(_))));
        assert!(matches!(queued(&["MGET", "a", "b"]), Plan::Queue(Err(_))));
        assert_eq!(queued(&["EXEC"]), Plan::Txn(Txn::Exec));
    }

    /// Every command (and subcommand) of the 7.0 table gets a plan, with
    /// arguments that satisfy its arity, and none panics.
    #[test]
    fn a_standalone_backend_has_no_crossslot() {
        let one = SessionState {
            one_shard: true,
            ..READY
        };
        for args in [
            &["MSETNX", "a", "1", "b", "2"][..],
            &["MGET", "a", "b"],
            &["BLPOP", "a", "b", "0"],
            &["EVAL", "return 1", "2", "a", "b"],
        ] {
            let planned = plan(&TABLE, &req(args), &one);
            assert!(
                matches!(
                    planned,
                    Plan::Route { slot: Some(0), .. } | Plan::Blocking { slot: Some(0) }
                ),
                "{args:?}: {planned:?}"
            );
        }
        assert_eq!(
            plan(&TABLE, &req(&["WATCH", "a", "b"]), &one),
            Plan::Txn(Txn::Watch { slot: 0 })
        );
        let queued = SessionState {
            in_multi: true,
            ..one
        };
        assert_eq!(
            plan(&TABLE, &req(&["MSET", "a", "1", "b", "2"]), &queued),
            Plan::Queue(Ok(Some(0)))
        );
    }

    #[test]
    fn readme_names_every_override() {
        // README's command table is written from these rules: an override
        // it does not mention is behaviour a user cannot find.
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## What the proxy does with each command")
            .expect("README has the command table");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
        for (name, why) in overrides() {
            let shown = name.rsplit('|').next().unwrap_or(name).to_ascii_uppercase();
            assert!(
                section.contains(&shown),
                "README's command table does not mention {name} ({why})"
            );
        }
    }

    #[test]
    fn every_command_of_the_7_0_table_gets_a_plan() {
        let mut planned = 0;
        for info in TABLE.iter() {
            for info in std::iter::once(info).chain(info.subcommands.iter()) {
                let words: Vec<&str> = info.name.split('|').collect();
                let needed = usize::try_from(info.arity.unsigned_abs()).unwrap_or(1);
                let mut args: Vec<String> = words.iter().map(ToString::to_string).collect();
                while args.len() < needed.max(args.len()) {
                    args.push(format!("k{}", args.len()));
                }
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                for state in [
                    READY,
                    SessionState {
                        protocol: Protocol::Resp3,
                        ..READY
                    },
                    SessionState {
                        in_multi: true,
                        ..READY
                    },
                ] {
                    let _ = plan(&TABLE, &req(&argv), &state);
                }
                planned += 1;
            }
        }
        assert!(planned > 350, "only {planned} commands planned");
    }
}
