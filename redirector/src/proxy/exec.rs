//! Running commands against the cluster: picking the node, following
//! `MOVED`/`ASK`, retrying through failovers, and the commands that span
//! shards (split per slot, fan-out, SCAN).
//!
//! A session sends a command's first attempt itself (the hot path: no task,
//! no allocation beyond the job). Only when that attempt ends in anything
//! but a plain reply does [`complete`] take over, in a task of its own.

use std::{
    net::SocketAddr,
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use redis_protocol::{resp2, resp3};
use tokio::sync::oneshot;

use super::{
    ReadPolicy, Shared, UpstreamError,
    clients::ClientEntry,
    info,
    jobs::{Job, JobResult},
    merge::{self, Merge},
    own_config,
    plan::Nodes,
    tracking::PrivateConns,
};
use crate::{
    cluster::topology::View,
    resp::{
        Protocol,
        reply::{self, Encoder, Reply},
        request::{self, Request},
        value::Value,
    },
};

const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";
pub(super) const CLUSTERDOWN: &str = "CLUSTERDOWN Hash slot not served";

/// Where a command goes: a slot (or none: any master), and whether it may
/// be served by a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub slot: Option<u16>,
    pub readonly: bool,
}

/// Picks the node for `target` under the read policy. A keyless command
/// goes to the master of slot 0: always the same node, so that such
/// commands answer consistently (round-robin would not).
pub fn pick(shared: &Shared, view: &View, target: Target) -> Result<SocketAddr, Bytes> {
    let Some(slot) = target.slot else {
        return view
            .shard(0)
            .map(|s| s.master)
            .or_else(|| view.masters().next())
            .ok_or_else(|| reply::error(CLUSTERDOWN));
    };
    let Some(shard) = view.shard(slot) else {
        return Err(reply::error(CLUSTERDOWN));
    };
    if !target.readonly {
        return Ok(shard.master);
    }
    let replica = || {
        (!shard.replicas.is_empty())
            .then(|| shard.replicas[shared.next_index() % shard.replicas.len()])
    };
    let up = |addr: &SocketAddr| !shared.pools.is_down(*addr);
    Ok(match shared.settings.read_policy {
        ReadPolicy::Master => shard.master,
        ReadPolicy::PreferMaster => {
            if up(&shard.master) {
                shard.master
            } else {
                replica().filter(up).unwrap_or(shard.master)
            }
        }
        ReadPolicy::Replica => replica().ok_or_else(|| {
            reply::error(&format!(
                "ERR no replica serves slot {slot} (read policy: replica)"
            ))
        })?,
        ReadPolicy::PreferReplica => replica().filter(up).unwrap_or(shard.master),
        ReadPolicy::Any => {
            let n = shard.replicas.len() + 1;
            match shared.next_index() % n {
                0 => shard.master,
                i => shard.replicas[i - 1],
            }
        }
    })
}

/// Queues one attempt on a shared connection to `node`, or on the
/// client's private one (`via`: a tracking client's).
pub fn send(
    shared: &Arc<Shared>,
    via: Option<&Arc<PrivateConns>>,
    protocol: Protocol,
    node: SocketAddr,
    payload: Bytes,
    replies: usize,
) -> oneshot::Receiver<JobResult> {
    let (job, rx) = Job::new(payload, replies);
    let conn = match via {
        Some(private) => private.conn(shared, node),
        None => shared.pools.node(node, protocol).conn(),
    };
    if let Err(job) = conn.send(job) {
        job.fail(UpstreamError::NotSent(node, "connection closed".into()));
    }
    rx
}

/// What an attempt's result means for the command.
#[derive(Debug)]
pub enum Verdict {
    /// The answer for the client (possibly a Redis error).
    Done(Reply),
    /// Follow `MOVED` (`asking: false`) or `ASK` to `addr`.
    Redirect {
        slot: u16,
        addr: SocketAddr,
        asking: bool,
        reply: Reply,
    },
    /// Try again shortly (after a topology refresh); `reply` is what the
    /// client gets if retries run out.
    Retry { reply: Reply },
}

impl Verdict {
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Done(_))
    }
}

/// Judges an attempt. A command whose connection died after it was sent
/// is only retried when it is read-only: a write may already have run.
pub fn judge(result: JobResult, readonly: bool) -> Verdict {
    match result {
        Ok(mut replies) => match replies.pop() {
            Some(reply) => judge_one(Ok(reply), readonly),
            None => Verdict::Done(Reply::local(reply::error("ERR empty reply"))),
        },
        Err(e) => judge_one(Err(e), readonly),
    }
}

/// [`judge`] for a single reply.
pub fn judge_one(result: Result<Reply, UpstreamError>, readonly: bool) -> Verdict {
    let reply = match result {
        Ok(reply) => reply,
        Err(e) if e.maybe_ran() && !readonly => {
            return Verdict::Done(Reply::local(reply::error(&format!(
                "ERR redirector: {e}; the command may or may not have been applied"
            ))));
        }
        Err(e) => {
            return Verdict::Retry {
                reply: Reply::local(reply::error(&format!("CLUSTERDOWN redirector: {e}"))),
            };
        }
    };
    let Some(message) = reply.error_message() else {
        return Verdict::Done(reply);
    };
    if let Some((slot, addr, asking)) = parse_redirect(message) {
        return Verdict::Redirect {
            slot,
            addr,
            asking,
            reply,
        };
    }
    let retryable = ["TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"]
        .iter()
        .any(|prefix| message.starts_with(prefix.as_bytes()));
    if retryable {
        Verdict::Retry { reply }
    } else {
        Verdict::Done(reply)
    }
}

/// `MOVED 3999 127.0.0.1:6381` / `ASK 3999 127.0.0.1:6381`.
pub(super) fn parse_redirect(message: &[u8]) -> Option<(u16, SocketAddr, bool)> {
    let text = std::str::from_utf8(message).ok()?;
    let mut words = text.split_ascii_whitespace();
    let asking = match words.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let slot = words.next()?.parse().ok()?;
    // `:port` (no endpoint known) does not parse: nothing we can dial.
    let addr: SocketAddr = words.next()?.parse().ok()?;
    Some((slot, addr, asking))
}

/// A command being executed: enough to send it again.
#[derive(Clone, Debug)]
pub struct Routed {
    pub payload: Bytes,
    pub target: Target,
    pub protocol: Protocol,
    /// A tracking client's private connections (None: shared ones).
    pub via: Option<Arc<PrivateConns>>,
}

/// Follows a first attempt's verdict to the end: redirects, retries while
/// the window lasts, and returns what the client should get.
pub async fn complete(shared: Arc<Shared>, routed: Routed, first: Verdict) -> Reply {
    let attempt = |node: SocketAddr, payload: Bytes, replies: usize| {
        let rx = send(
            &shared,
            routed.via.as_ref(),
            routed.protocol,
            node,
            payload,
            replies,
        );
        await_job(rx, node)
    };
    follow(&shared, &routed, first, attempt).await
}

/// The one redirect path: follows `MOVED` (patching the slot map) and `ASK`
/// (with `ASKING`), and retries through failovers while the retry window
/// lasts, making each attempt with `attempt(node, payload, replies)`: on a
/// shared connection for most commands, on a lease for blocking ones.
pub async fn follow<F, Fut>(
    shared: &Shared,
    routed: &Routed,
    first: Verdict,
    mut attempt: F,
) -> Reply
where
    F: FnMut(SocketAddr, Bytes, usize) -> Fut,
    Fut: Future<Output = JobResult>,
{
    let deadline = Instant::now() + shared.settings.retry_window;
    let mut verdict = first;
    let mut redirects = 0;
    let mut backoff = Duration::from_millis(5);
    loop {
        match verdict {
            Verdict::Done(reply) => return reply,
            Verdict::Redirect {
                slot,
                addr,
                asking,
                reply,
            } => {
                redirects += 1;
                if redirects > shared.settings.max_redirects {
                    return reply;
                }
                let (payload, replies) = if asking {
                    shared.metrics.ask();
                    let mut both = BytesMut::with_capacity(ASKING.len() + routed.payload.len());
                    both.extend_from_slice(ASKING);
                    both.extend_from_slice(&routed.payload);
                    (both.freeze(), 2)
                } else {
                    shared.metrics.moved();
                    shared.topology.moved(slot, addr);
                    (routed.payload.clone(), 1)
                };
                verdict = judge(
                    attempt(addr, payload, replies).await,
                    routed.target.readonly,
                );
            }
            Verdict::Retry { reply } => {
                if Instant::now() + backoff > deadline {
                    return reply;
                }
                shared.topology.request_refresh();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(250));
                let view = shared.topology.view();
                let node = match pick(shared, &view, routed.target) {
                    Ok(node) => node,
                    Err(_) => {
                        verdict = Verdict::Retry { reply };
                        continue;
                    }
                };
                let payload = routed.payload.clone();
                verdict = judge(attempt(node, payload, 1).await, routed.target.readonly);
            }
        }
    }
}

pub async fn await_job(rx: oneshot::Receiver<JobResult>, node: SocketAddr) -> JobResult {
    rx.await
        .unwrap_or_else(|_| Err(UpstreamError::NotSent(node, "connection task ended".into())))
}

/// A tracking client's command after CLIENT CACHING: both in one job on
/// its private connection (so nothing comes between them), the command's
/// reply kept; then redirects and retries as usual.
pub async fn with_caching(shared: Arc<Shared>, routed: Routed, caching: Bytes) -> Reply {
    let node = match pick(&shared, &shared.topology.view(), routed.target) {
        Ok(node) => node,
        Err(e) => return complete(shared, routed, unpicked(e)).await,
    };
    let mut payload = BytesMut::with_capacity(caching.len() + routed.payload.len());
    payload.extend_from_slice(&caching);
    payload.extend_from_slice(&routed.payload);
    let rx = send(
        &shared,
        routed.via.as_ref(),
        routed.protocol,
        node,
        payload.freeze(),
        2,
    );
    let verdict = judge(await_job(rx, node).await, routed.target.readonly);
    complete(shared, routed, verdict).await
}

/// No node serves the target (yet): a first attempt that failed, so the
/// retry window applies.
fn unpicked(error: Bytes) -> Verdict {
    Verdict::Retry {
        reply: Reply::local(error),
    }
}

/// One command to one target, first attempt included.
pub async fn run(shared: Arc<Shared>, routed: Routed) -> Reply {
    let node = match pick(&shared, &shared.topology.view(), routed.target) {
        Ok(node) => node,
        Err(e) => return complete(shared, routed, unpicked(e)).await,
    };
    let rx = send(
        &shared,
        routed.via.as_ref(),
        routed.protocol,
        node,
        routed.payload.clone(),
        1,
    );
    let verdict = judge(await_job(rx, node).await, routed.target.readonly);
    complete(shared, routed, verdict).await
}

/// A multi-key command as one command per slot. `groups` holds, per
/// slot, the argument ranges it carries: a key and the arguments that
/// belong to it (MSET: its value). Arguments before the first key (the
/// command name) start every part.
pub fn split_parts(
    req: &Request,
    groups: &[(u16, Vec<Range<usize>>)],
    protocol: Protocol,
    readonly: bool,
    via: Option<&Arc<PrivateConns>>,
) -> Vec<Routed> {
    let head = groups
        .iter()
        .flat_map(|(_, ranges)| ranges.iter().map(|r| r.start))
        .min()
        .unwrap_or(1);
    groups
        .iter()
        .map(|(slot, ranges)| {
            let mut args: Vec<Bytes> = req.args()[..head].to_vec();
            for range in ranges {
                args.extend_from_slice(&req.args()[range.clone()]);
            }
            Routed {
                payload: request::encode(&args),
                target: Target {
                    slot: Some(*slot),
                    readonly,
                },
                protocol,
                via: via.cloned(),
            }
        })
        .collect()
}

/// Runs a split command's parts (see [`split_parts`]) concurrently and
/// merges the replies as a single Redis would have answered.
pub async fn split(
    shared: Arc<Shared>,
    protocol: Protocol,
    parts: Vec<Routed>,
    groups: Vec<(u16, Vec<Range<usize>>)>,
    how: Merge,
) -> Bytes {
    let replies = run_all(&shared, parts).await;
    merge_split(&groups, how, &replies, protocol)
}

/// A split command's reply from its parts' final replies (one per group,
/// in `groups` order).
pub fn merge_split(
    groups: &[(u16, Vec<Range<usize>>)],
    how: Merge,
    replies: &[Reply],
    protocol: Protocol,
) -> Bytes {
    if how != Merge::AllSucceeded
        && let Some(error) = replies.iter().find(|r| r.is_error())
    {
        return error.raw.clone();
    }
    if how == Merge::Values {
        return values_in_key_order(groups, replies, protocol);
    }
    merge::merge(how, &[], replies, protocol)
}

/// MGET-like parts' values, back in the caller's key order.
fn values_in_key_order(
    groups: &[(u16, Vec<Range<usize>>)],
    replies: &[Reply],
    protocol: Protocol,
) -> Bytes {
    let mut starts: Vec<usize> = groups
        .iter()
        .flat_map(|(_, ranges)| ranges.iter().map(|r| r.start))
        .collect();
    starts.sort_unstable();
    let mut values: Vec<Option<Bytes>> = vec![None; starts.len()];
    for ((_, ranges), reply) in groups.iter().zip(replies) {
        let Some(elements) = array_elements(&reply.raw, protocol) else {
            return reply::error("ERR redirector: unexpected reply to a split command");
        };
        for (range, element) in ranges.iter().zip(elements) {
            if let Ok(at) = starts.binary_search(&range.start) {
                values[at] = Some(element);
            }
        }
    }
    let mut out = BytesMut::new();
    let mut e = Encoder {
        out: &mut out,
        protocol,
    };
    e.array(values.len());
    for value in values {
        match value {
            Some(raw) => e.raw(&raw),
            None => e.null(),
        }
    }
    out.freeze()
}

/// Runs commands concurrently (all first attempts go out before any reply
/// is awaited) and returns their replies in order.
pub async fn run_all(shared: &Arc<Shared>, commands: Vec<Routed>) -> Vec<Reply> {
    let view = shared.topology.view();
    let mut attempts = Vec::with_capacity(commands.len());
    for routed in commands {
        let first = match pick(shared, &view, routed.target) {
            Ok(node) => Ok((
                send(
                    shared,
                    routed.via.as_ref(),
                    routed.protocol,
                    node,
                    routed.payload.clone(),
                    1,
                ),
                node,
            )),
            Err(e) => Err(e),
        };
        attempts.push((routed, first));
    }
    let mut replies = Vec::with_capacity(attempts.len());
    for (routed, first) in attempts {
        let verdict = match first {
            Ok((rx, node)) => judge(await_job(rx, node).await, routed.target.readonly),
            Err(e) => unpicked(e),
        };
        let reply = if verdict.is_done() {
            match verdict {
                Verdict::Done(reply) => reply,
                _ => unreachable!("checked"),
            }
        } else {
            complete(Arc::clone(shared), routed, verdict).await
        };
        replies.push(reply);
    }
    replies
}

/// Sends `payload` to every node in `nodes` (no slot: fan-outs are not
/// redirected) and returns the replies in order.
pub async fn broadcast(
    shared: &Arc<Shared>,
    protocol: Protocol,
    nodes: &[SocketAddr],
    payload: &Bytes,
    readonly: bool,
) -> Vec<Reply> {
    let receivers: Vec<_> = nodes
        .iter()
        .map(|&node| (node, send(shared, None, protocol, node, payload.clone(), 1)))
        .collect();
    let mut replies = Vec::with_capacity(receivers.len());
    for (node, rx) in receivers {
        let reply = match judge(await_job(rx, node).await, readonly) {
            Verdict::Done(reply) | Verdict::Retry { reply } | Verdict::Redirect { reply, .. } => {
                reply
            }
        };
        replies.push(reply);
    }
    replies
}

/// Like [`broadcast`], each node on a leased connection of its own.
async fn broadcast_leased(
    shared: &Arc<Shared>,
    protocol: Protocol,
    nodes: &[SocketAddr],
    payload: &Bytes,
) -> Vec<Reply> {
    let calls = nodes.iter().map(|&node| async move {
        match on_lease(shared, protocol, None, node, payload.clone(), 1).await {
            Ok(mut replies) => replies
                .pop()
                .unwrap_or_else(|| Reply::local(reply::error("ERR empty reply"))),
            Err(e) => Reply::local(reply::error(&format!("CLUSTERDOWN redirector: {e}"))),
        }
    });
    futures::future::join_all(calls).await
}

/// The nodes a fan-out reaches: every master, or every node.
pub fn fan_out_nodes(view: &View, nodes: Nodes) -> Vec<SocketAddr> {
    match nodes {
        Nodes::Masters => view.masters().collect(),
        Nodes::All => view.all_nodes(),
        Nodes::First => view
            .shard(0)
            .map(|s| s.master)
            .or_else(|| view.masters().next())
            .into_iter()
            .collect(),
    }
}

/// A command for every master (or every node), merged as the planner said.
pub async fn fan_out(
    shared: Arc<Shared>,
    protocol: Protocol,
    req: Request,
    nodes: Nodes,
    how: Merge,
    readonly: bool,
    client: Arc<ClientEntry>,
) -> Bytes {
    let view = shared.topology.view();
    let targets = fan_out_nodes(&view, nodes);
    if targets.is_empty() {
        return reply::error(CLUSTERDOWN);
    }
    if how == Merge::Info {
        return info_reply(&shared, protocol, &req, &targets, &client).await;
    }
    // The proxy's own configs (port, client-output-buffer-limit) are
    // answered as the proxy's, and the settings it keeps (output limits,
    // slow log) are taken from the CONFIG SET as sent once the nodes accept
    // the rest (CONFIG SET is all or nothing).
    let mut req = req;
    let mut config_set = None;
    if req.arg_is(0, "config") && req.arg_is(1, "set") {
        let sent = req.args().clone();
        match own_config::strip_own_set(&sent, client.laddr.port()) {
            Ok(Some(args)) if args.len() != sent.len() => req = Request::from_args(args),
            Ok(Some(_)) => {}
            Ok(None) => {
                keep_settings(&shared, &sent);
                return reply::ok();
            }
            Err(e) => return e,
        }
        config_set = Some(sent);
    }
    // What Redis runs while a script is busy (SCRIPT KILL, FUNCTION KILL,
    // FUNCTION STATS) must not wait on a shared connection queued behind
    // that very script: it goes on leases.
    let allow_busy = super::plan::lookup(&shared.commands, &req).is_some_and(|i| {
        i.flags
            .contains(crate::cluster::commands::Flags::ALLOW_BUSY)
    });
    let replies = if allow_busy {
        broadcast_leased(&shared, protocol, &targets, req.raw()).await
    } else {
        broadcast(&shared, protocol, &targets, req.raw(), readonly).await
    };
    let merged = fan_out_merged(&shared, &req, &targets, how, &replies, protocol, &client);
    if let Some(sent) = config_set
        && !merged.starts_with(b"-")
    {
        keep_settings(&shared, &sent);
    }
    merged
}

/// An accepted `CONFIG SET`'s settings that are the proxy's too.
fn keep_settings(shared: &Shared, args: &[Bytes]) {
    shared.slowlog.configured(args);
    shared.output_limits.configured(args);
}

/// A fan-out's reply from every target's, and what the proxy learns from
/// it (loaded scripts and functions, its own settings).
pub fn fan_out_merged(
    shared: &Shared,
    req: &Request,
    targets: &[SocketAddr],
    how: Merge,
    replies: &[Reply],
    protocol: Protocol,
    client: &ClientEntry,
) -> Bytes {
    let mut merged = merge::merge(how, targets, replies, protocol);
    if req.arg_is(0, "config")
        && req.arg_is(1, "get")
        && let Some(value) = Value::decode(&merged, protocol)
    {
        let own = own_config::Own {
            port: client.laddr.port(),
            output_limits: shared.output_limits.get(),
        };
        merged = own_config::rewrite_get(value, &own).encode(protocol);
    }
    // A loaded script's flags, for EVALSHA under CLIENT PAUSE WRITE.
    if req.arg_is(0, "script")
        && req.arg_is(1, "load")
        && let (Some(body), Some(Value::Bulk(sha))) =
            (req.args().get(2), Value::decode(&merged, protocol))
    {
        let slot = match super::script_keys::script_keys(body, &shared.commands) {
            super::script_keys::ScriptKeys::Slot(slot) => Some(slot),
            _ => None,
        };
        shared
            .functions
            .script_loaded(&sha, super::plan::script_declares_no_writes(body), slot);
    }
    if req.arg_is(0, "script") && req.arg_is(1, "flush") && !merged.starts_with(b"-") {
        shared.functions.scripts_flushed();
    }
    if req.arg_is(0, "function") && !merged.starts_with(b"-") {
        if req.arg_is(1, "load")
            && let Some(code) = req.args().last()
        {
            shared.functions.library_loaded(code, &shared.commands);
        } else if req.arg_is(1, "flush") || req.arg_is(1, "restore") {
            shared.functions.forget_libraries();
        }
    }
    // The functions changed: their flags are learnt again when needed.
    if req.arg_is(0, "function")
        && ["load", "delete", "flush", "restore"]
            .iter()
            .any(|sub| req.arg_is(1, sub))
    {
        shared.functions.forget();
    }
    // CONFIG RESETSTAT resets the proxy's own statistics too.
    if req.arg_is(0, "config") && req.arg_is(1, "resetstat") && !merged.starts_with(b"-") {
        shared.reset_stats();
    }
    merged
}

/// INFO: the masters' sections merged, with the proxy's own figures.
async fn info_reply(
    shared: &Arc<Shared>,
    protocol: Protocol,
    req: &Request,
    masters: &[SocketAddr],
    client: &ClientEntry,
) -> Bytes {
    let args: Vec<String> = req.args()[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let sections = info::requested(&args);
    let node_sections = info::node_args(&sections);
    let mut texts = Vec::new();
    if !node_sections.is_empty() {
        let mut node_req = vec![Bytes::from_static(b"INFO")];
        node_req.extend(node_sections.iter().map(|s| Bytes::from(s.clone())));
        let payload = request::encode(&node_req);
        // Asked in RESP2: plain bulk text whatever the client speaks.
        let replies = broadcast(shared, Protocol::Resp2, masters, &payload, true).await;
        if let Some(error) = replies.iter().find(|r| r.is_error()) {
            return error.raw.clone();
        }
        for reply in &replies {
            match Value::decode(&reply.raw, Protocol::Resp2) {
                Some(Value::Bulk(text)) => texts.push(String::from_utf8_lossy(&text).into_owned()),
                _ => return reply::error("ERR redirector: unexpected INFO reply"),
            }
        }
    }
    let figures = figures(shared, client);
    let text = info::merge(&sections, &texts, &figures);
    reply::build(protocol, |e| e.verbatim(&text))
}

/// The proxy's own figures for INFO.
fn figures(shared: &Shared, client: &ClientEntry) -> info::ProxyFigures {
    let (connected, blocked, tracking, pubsub) = shared.clients.counts();
    let view = shared.topology.view();
    let replicas: usize = view.shards().iter().map(|s| s.replicas.len()).sum();
    let covered = view.covered_slots();
    info::ProxyFigures {
        process_id: std::process::id(),
        tcp_port: client.laddr.port(),
        uptime_secs: shared.started.elapsed().as_secs(),
        connected_clients: connected,
        blocked_clients: blocked,
        tracking_clients: tracking,
        pubsub_clients: pubsub,
        maxclients: shared.settings.admission.max_clients,
        total_connections: shared.total_connections(),
        rejected_connections: shared.rejected_connections(),
        proxy_section: vec![
            (
                "redirector_version".into(),
                env!("CARGO_PKG_VERSION").into(),
            ),
            (
                "upstream_cluster_state".into(),
                if covered == crate::cluster::slot::SLOTS {
                    "ok".into()
                } else {
                    "fail".into()
                },
            ),
            ("upstream_masters".into(), view.shards().len().to_string()),
            ("upstream_replicas".into(), replicas.to_string()),
            ("upstream_slots_covered".into(), covered.to_string()),
            ("topology_version".into(), view.version.to_string()),
            (
                "read_policy".into(),
                format!("{:?}", shared.settings.read_policy).to_ascii_lowercase(),
            ),
            (
                "total_commands_processed".into(),
                shared.total_commands().to_string(),
            ),
        ],
        local_errors: shared.local_errors(),
    }
}

/// The raw elements of an array reply, each re-encoded on its own, in the
/// reply's own protocol.
pub fn array_elements(raw: &Bytes, protocol: Protocol) -> Option<Vec<Bytes>> {
    match protocol {
        Protocol::Resp2 => {
            let resp2::types::BytesFrame::Array(items) = reply::frame2(raw)? else {
                return None;
            };
            items
                .iter()
                .map(|item| {
                    let mut out = BytesMut::new();
                    resp2::encode::extend_encode(&mut out, item, false).ok()?;
                    Some(out.freeze())
                })
                .collect()
        }
        Protocol::Resp3 => {
            let resp3::types::BytesFrame::Array { data, .. } = reply::frame3(raw)? else {
                return None;
            };
            data.iter()
                .map(|item| {
                    let mut out = BytesMut::new();
                    resp3::encode::complete::extend_encode(&mut out, item, false).ok()?;
                    Some(out.freeze())
                })
                .collect()
        }
    }
}

/// SCAN across every master with one cursor.
///
/// The cursor carries the shard in its low 14 bits (the first slot of the
/// shard, which stays put across failovers) and that node's own cursor
/// above them. When a node's cursor comes back 0 the scan moves on to the
/// shard with the next first slot; 0 after the last shard ends the scan.
/// With a stable topology every key is returned exactly once (as SCAN on a
/// single Redis guarantees), whatever COUNT is. One call goes on across
/// shards until it holds COUNT keys (or has asked every shard about once):
/// a small keyspace comes back whole, with cursor 0, as from one Redis.
pub async fn scan(shared: Arc<Shared>, protocol: Protocol, req: Request) -> Bytes {
    let Some(cursor) = req
        .args()
        .get(1)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return reply::error("ERR invalid cursor");
    };
    let count = scan_count(req.args()).unwrap_or(10);
    let view = shared.topology.view();
    let mut firsts: Vec<u16> = view.shards().iter().map(|s| s.first_slot()).collect();
    firsts.sort_unstable();
    if firsts.is_empty() {
        return reply::error(CLUSTERDOWN);
    }
    let Some(mut position) = scan_cursor::decode(cursor, &firsts) else {
        return reply::error("ERR invalid cursor");
    };
    let mut keys: Vec<Bytes> = Vec::new();
    let mut calls = 0;
    loop {
        let (shard_slot, node_cursor) = position;
        let mut args = req.args().clone();
        args[1] = Bytes::from(node_cursor.to_string());
        let routed = Routed {
            payload: request::encode(&args),
            target: Target {
                slot: Some(shard_slot),
                readonly: true,
            },
            protocol,
            via: None,
        };
        let reply = run(Arc::clone(&shared), routed).await;
        calls += 1;
        if reply.is_error() {
            return reply.raw;
        }
        let Some(parts) = array_elements(&reply.raw, protocol) else {
            return reply::error("ERR redirector: unexpected SCAN reply");
        };
        let [next, found] = parts.as_slice() else {
            return reply::error("ERR redirector: unexpected SCAN reply");
        };
        let Some(found) = array_elements(found, protocol) else {
            return reply::error("ERR redirector: unexpected SCAN reply");
        };
        keys.extend(found);
        let next: u64 = bulk_text(next).and_then(|t| t.parse().ok()).unwrap_or(0);
        let cursor = scan_cursor::next(shard_slot, next, &firsts);
        let done = cursor == 0 || keys.len() >= count || calls > firsts.len();
        if done {
            let mut out = BytesMut::new();
            let mut e = Encoder {
                out: &mut out,
                protocol,
            };
            e.array(2);
            e.bulk(cursor.to_string().as_bytes());
            e.array(keys.len());
            for key in &keys {
                e.raw(key);
            }
            return out.freeze();
        }
        position = match scan_cursor::decode(cursor, &firsts) {
            Some(position) => position,
            None => return reply::error("ERR invalid cursor"),
        };
    }
}

/// SCAN's COUNT option.
fn scan_count(args: &[Bytes]) -> Option<usize> {
    args.windows(2)
        .skip(2)
        .find(|w| w[0].eq_ignore_ascii_case(b"count"))
        .and_then(|w| std::str::from_utf8(&w[1]).ok()?.parse().ok())
}

/// The proxy's SCAN cursor: a shard (its first slot) in the low 14 bits,
/// that shard's own cursor above them.
pub mod scan_cursor {
    const SHARD_BITS: u32 = 14;

    /// `(shard's first slot, node cursor)` of a client's cursor; 0 starts
    /// at the first shard. `None`: not a cursor this proxy gave.
    pub fn decode(cursor: u64, firsts: &[u16]) -> Option<(u16, u64)> {
        if cursor == 0 {
            return Some((*firsts.first()?, 0));
        }
        let node_cursor = cursor >> SHARD_BITS;
        if node_cursor >= 1 << (64 - SHARD_BITS) {
            return None;
        }
        Some(((cursor & ((1 << SHARD_BITS) - 1)) as u16, node_cursor))
    }

    /// The client's cursor after a node of `shard` answered `next`: the
    /// same shard further on, the next shard, or 0 when every shard is done.
    pub fn next(shard: u16, next: u64, firsts: &[u16]) -> u64 {
        if next != 0 {
            return (next << SHARD_BITS) | u64::from(shard);
        }
        match firsts.iter().find(|&&f| f > shard) {
            // Node cursor 0 on the next shard. Its first slot may be 0 only
            // for the first shard, which never comes next.
            Some(&f) => u64::from(f),
            None => 0,
        }
    }
}

fn bulk_text(raw: &Bytes) -> Option<&str> {
    // `$<len>\r\n<data>\r\n`
    let start = raw.iter().position(|&b| b == b'\n')? + 1;
    std::str::from_utf8(raw.get(start..raw.len().checked_sub(2)?)?).ok()
}

/// A command that may block, on a leased connection to the owner of
/// `slot`. While it waits, `client` shows as blocked (INFO, CLIENT LIST),
/// with the node and upstream client id that CLIENT UNBLOCK needs.
/// Redirects and retries take the same path as every command
/// ([`follow`]), each attempt on a lease of its own.
pub async fn blocking_call(
    shared: Arc<Shared>,
    protocol: Protocol,
    req: Request,
    slot: Option<u16>,
    client: &ClientEntry,
    blocks: bool,
) -> Bytes {
    // One Redis has one script cache: a script EVAL brings is loaded on
    // every master the first time, so EVALSHA and SCRIPT EXISTS find it
    // whichever shard they reach.
    if (req.arg_is(0, "eval") || req.arg_is(0, "eval_ro"))
        && let Some(body) = req.args().get(1)
        && shared.functions.first_eval(body)
    {
        let masters: Vec<SocketAddr> = shared.topology.view().masters().collect();
        let load = request::encode(&[
            Bytes::from_static(b"SCRIPT"),
            Bytes::from_static(b"LOAD"),
            body.clone(),
        ]);
        broadcast_leased(&shared, Protocol::Resp2, &masters, &load).await;
    }
    let routed = Routed {
        payload: req.into_raw(),
        target: Target {
            slot,
            readonly: false,
        },
        protocol,
        via: None,
    };
    let blocked = blocks.then_some(client);
    let attempt = |node: SocketAddr, payload: Bytes, replies: usize| {
        on_lease(&shared, protocol, blocked, node, payload, replies)
    };
    let first = match pick(&shared, &shared.topology.view(), routed.target) {
        Ok(node) => judge(
            on_lease(&shared, protocol, blocked, node, routed.payload.clone(), 1).await,
            false,
        ),
        Err(e) => unpicked(e),
    };
    follow(&shared, &routed, first, attempt).await.raw
}

/// One attempt of a blocking command on a lease of `node`'s.
async fn on_lease(
    shared: &Shared,
    protocol: Protocol,
    blocked: Option<&ClientEntry>,
    node: SocketAddr,
    payload: Bytes,
    replies: usize,
) -> JobResult {
    let pool = shared.pools.node(node, protocol);
    let mut lease = pool.lease().await?;
    let result = async {
        // A blocked client is shown blocked, on the node CLIENT UNBLOCK
        // then reaches.
        if let Some(client) = blocked {
            match lease.client_id().await {
                Ok(upstream_id) => {
                    lease.write(&payload).await?;
                    client.set_blocked_on(Some((node, upstream_id)));
                }
                // Refused (an ACL user without CLIENT ID), the connection
                // intact: it blocks all the same, out of CLIENT UNBLOCK's
                // reach.
                Err(UpstreamError::Protocol(..)) if lease.is_reusable() => {
                    lease.write(&payload).await?;
                }
                Err(e) => return Err(e),
            }
        } else {
            lease.write(&payload).await?;
        }
        let mut out = Vec::with_capacity(replies);
        while out.len() < replies {
            out.push(lease.read().await?);
        }
        Ok(out)
    }
    .await;
    if let Some(client) = blocked {
        client.set_blocked_on(None);
    }
    match &result {
        Ok(_) => pool.release(lease),
        Err(_) => pool.forget(),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_parse() {
        assert_eq!(
            parse_redirect(b"MOVED 3999 127.0.0.1:6381"),
            Some((3999, "127.0.0.1:6381".parse().unwrap(), false))
        );
        assert_eq!(
            parse_redirect(b"ASK 1 [::1]:7000"),
            Some((1, "[::1]:7000".parse().unwrap(), true))
        );
        assert_eq!(parse_redirect(b"MOVED 1 :7000"), None);
        assert_eq!(parse_redirect(b"ERR nope"), None);
    }

    #[test]
    fn verdicts_follow_redis_errors() {
        let reply = |raw: &'static [u8]| Ok(vec![Reply::local(Bytes::from_static(raw))]);
        assert!(matches!(
            judge(reply(b"$1\r\nx\r\n"), false),
            Verdict::Done(_)
        ));
        assert!(matches!(
            judge(reply(b"-MOVED 1 127.0.0.1:1\r\n"), false),
            Verdict::Redirect { asking: false, .. }
        ));
        assert!(matches!(
            judge(reply(b"-TRYAGAIN x\r\n"), false),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            judge(reply(b"-ERR x\r\n"), false),
            Verdict::Done(_)
        ));
        let lost = || {
            Err(UpstreamError::Lost(
                "127.0.0.1:1".parse().unwrap(),
                "x".into(),
            ))
        };
        assert!(matches!(judge(lost(), false), Verdict::Done(_)));
        assert!(matches!(judge(lost(), true), Verdict::Retry { .. }));
        let not_sent = Err(UpstreamError::NotSent(
            "127.0.0.1:1".parse().unwrap(),
            "x".into(),
        ));
        assert!(matches!(judge(not_sent, false), Verdict::Retry { .. }));
    }

    #[test]
    fn array_elements_are_split_and_reencoded() {
        let raw = Bytes::from_static(b"*3\r\n$1\r\na\r\n$-1\r\n:5\r\n");
        let parts = array_elements(&raw, Protocol::Resp2).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"$1\r\na\r\n"),
                Bytes::from_static(b"$-1\r\n"),
                Bytes::from_static(b":5\r\n"),
            ]
        );
        assert_eq!(bulk_text(&parts[0]), Some("a"));
    }
}
