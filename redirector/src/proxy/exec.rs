//! Running commands against the cluster: picking the node, following
//! `MOVED`/`ASK`, retrying through failovers, and the commands that span
//! shards (split per slot, fan-out, SCAN).
//!
//! A session sends a command's first attempt itself (the hot path: no task,
//! no allocation beyond the job). Only when that attempt ends in anything
//! but a plain reply does [`complete`] take over, in a task of its own.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use redis_protocol::{resp2, resp3};
use tokio::sync::oneshot;

use super::{
    ReadPolicy, Shared, UpstreamError,
    upstream::{Job, JobResult},
};
use crate::{
    cluster::topology::View,
    resp::{
        Protocol,
        reply::{self, Encoder, Reply, ReplyKind},
        request::{self, Request},
    },
};

const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";
const CLUSTERDOWN: &str = "CLUSTERDOWN Hash slot not served";

/// Where a command goes: a slot (or none: any master), and whether it may
/// be served by a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub slot: Option<u16>,
    pub readonly: bool,
}

/// Picks the node for `target` under the read policy.
pub fn pick(shared: &Shared, view: &View, target: Target) -> Result<SocketAddr, Bytes> {
    let Some(slot) = target.slot else {
        let masters: Vec<SocketAddr> = view.masters().collect();
        if masters.is_empty() {
            return Err(reply::error(CLUSTERDOWN));
        }
        return Ok(masters[shared.next_index() % masters.len()]);
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

/// Queues one attempt on a shared connection to `node`.
pub fn send(
    shared: &Shared,
    protocol: Protocol,
    node: SocketAddr,
    payload: Bytes,
    replies: usize,
) -> oneshot::Receiver<JobResult> {
    let (job, rx) = Job::new(payload, replies);
    if let Err(job) = shared.pools.node(node, protocol).conn().send(job) {
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
}

/// Follows a first attempt's verdict to the end: redirects, retries while
/// the window lasts, and returns what the client should get.
pub async fn complete(shared: Arc<Shared>, routed: Routed, first: Verdict) -> Reply {
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
                let rx = send(&shared, routed.protocol, addr, payload, replies);
                verdict = judge(await_job(rx, addr).await, routed.target.readonly);
            }
            Verdict::Retry { reply } => {
                if Instant::now() + backoff > deadline {
                    return reply;
                }
                shared.topology.request_refresh();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(250));
                let view = shared.topology.view();
                let node = match pick(&shared, &view, routed.target) {
                    Ok(node) => node,
                    Err(_) => {
                        verdict = Verdict::Retry { reply };
                        continue;
                    }
                };
                let rx = send(&shared, routed.protocol, node, routed.payload.clone(), 1);
                verdict = judge(await_job(rx, node).await, routed.target.readonly);
            }
        }
    }
}

pub async fn await_job(rx: oneshot::Receiver<JobResult>, node: SocketAddr) -> JobResult {
    rx.await
        .unwrap_or_else(|_| Err(UpstreamError::NotSent(node, "connection task ended".into())))
}

/// One command to one target, first attempt included.
pub async fn run(shared: Arc<Shared>, routed: Routed) -> Reply {
    let view = shared.topology.view();
    let node = match pick(&shared, &view, routed.target) {
        Ok(node) => node,
        Err(e) => {
            let retry = Verdict::Retry {
                reply: Reply::local(e),
            };
            return complete(shared, routed, retry).await;
        }
    };
    let rx = send(&shared, routed.protocol, node, routed.payload.clone(), 1);
    let verdict = judge(await_job(rx, node).await, routed.target.readonly);
    complete(shared, routed, verdict).await
}

/// How the replies of a command split per slot are put back together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// MGET: values back in the caller's key order.
    Values,
    /// DEL, UNLINK, EXISTS, TOUCH: the sum.
    Sum,
    /// MSET: OK when every part is.
    AllOk,
}

/// Runs a multi-key command as one command per slot, concurrently, and
/// merges the replies as a single Redis would have answered.
///
/// `groups` holds, per slot, the argument indices of each key (MSET: the
/// key; its value follows it).
pub async fn split(
    shared: Arc<Shared>,
    protocol: Protocol,
    req: Request,
    groups: Vec<(u16, Vec<usize>)>,
    merge: Merge,
    readonly: bool,
) -> Bytes {
    let name = req.args[0].clone();
    let parts: Vec<(Routed, Vec<usize>)> = groups
        .into_iter()
        .map(|(slot, keys)| {
            let mut args = Vec::with_capacity(keys.len() * 2 + 1);
            args.push(name.clone());
            for &i in &keys {
                args.push(req.args[i].clone());
                if merge == Merge::AllOk {
                    args.push(req.args[i + 1].clone());
                }
            }
            let routed = Routed {
                payload: request::encode(&args),
                target: Target {
                    slot: Some(slot),
                    readonly,
                },
                protocol,
            };
            (routed, keys)
        })
        .collect();
    let replies = run_all(&shared, parts.iter().map(|(r, _)| r.clone()).collect()).await;
    if let Some(error) = replies.iter().find(|r| r.is_error()) {
        return error.raw.clone();
    }
    match merge {
        Merge::Sum => reply::build(protocol, |e| e.integer(sum_integers(&replies))),
        Merge::AllOk => reply::ok(),
        Merge::Values => {
            let key_count = req.args.len() - 1;
            let mut values: Vec<Option<Bytes>> = vec![None; key_count];
            for ((_, keys), reply) in parts.iter().zip(&replies) {
                let Some(elements) = array_elements(&reply.raw, protocol) else {
                    return reply::error("ERR redirector: unexpected MGET reply");
                };
                for (&i, element) in keys.iter().zip(elements) {
                    values[i - 1] = Some(element);
                }
            }
            let mut out = BytesMut::new();
            let mut e = Encoder {
                out: &mut out,
                protocol,
            };
            e.array(key_count);
            for value in values {
                match value {
                    Some(raw) => e.raw(&raw),
                    None => e.null(),
                }
            }
            out.freeze()
        }
    }
}

/// The sum of integer replies (DEL, EXISTS, DBSIZE, ... parts).
fn sum_integers(replies: &[Reply]) -> i64 {
    replies
        .iter()
        .map(|r| match r.kind {
            ReplyKind::Integer(n) => n,
            _ => 0,
        })
        .sum()
}

/// Runs commands concurrently (all first attempts go out before any reply
/// is awaited) and returns their replies in order.
pub async fn run_all(shared: &Arc<Shared>, commands: Vec<Routed>) -> Vec<Reply> {
    let view = shared.topology.view();
    let mut attempts = Vec::with_capacity(commands.len());
    for routed in commands {
        let first = match pick(shared, &view, routed.target) {
            Ok(node) => Ok((
                send(shared, routed.protocol, node, routed.payload.clone(), 1),
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
            Err(e) => Verdict::Retry {
                reply: Reply::local(e),
            },
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
        .map(|&node| (node, send(shared, protocol, node, payload.clone(), 1)))
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

/// How fan-out replies combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanOut {
    /// DBSIZE.
    SumIntegers,
    /// KEYS.
    ConcatArrays,
    /// SCRIPT EXISTS: a script exists when it exists on every master.
    AndArrays,
    /// FLUSHALL, SCRIPT LOAD, FUNCTION LOAD, ...: the first reply when all
    /// succeed.
    First,
}

/// A command for every master, combined.
pub async fn fan_out(shared: Arc<Shared>, protocol: Protocol, req: Request, how: FanOut) -> Bytes {
    let masters: Vec<SocketAddr> = shared.topology.view().masters().collect();
    if masters.is_empty() {
        return reply::error(CLUSTERDOWN);
    }
    let readonly = matches!(
        how,
        FanOut::SumIntegers | FanOut::ConcatArrays | FanOut::AndArrays
    );
    let replies = broadcast(&shared, protocol, &masters, &req.raw, readonly).await;
    if let Some(error) = replies.iter().find(|r| r.is_error()) {
        return error.raw.clone();
    }
    match how {
        FanOut::First => replies[0].raw.clone(),
        FanOut::SumIntegers => reply::build(protocol, |e| e.integer(sum_integers(&replies))),
        FanOut::ConcatArrays => {
            let mut all = Vec::new();
            for r in &replies {
                match array_elements(&r.raw, protocol) {
                    Some(elements) => all.extend(elements),
                    None => return reply::error("ERR redirector: unexpected reply to merge"),
                }
            }
            let mut out = BytesMut::new();
            let mut e = Encoder {
                out: &mut out,
                protocol,
            };
            e.array(all.len());
            for element in all {
                e.raw(&element);
            }
            out.freeze()
        }
        FanOut::AndArrays => {
            let mut flags: Option<Vec<bool>> = None;
            for r in &replies {
                let Some(elements) = array_elements(&r.raw, protocol) else {
                    return reply::error("ERR redirector: unexpected reply to merge");
                };
                let these: Vec<bool> = elements.iter().map(|e| &e[..] == b":1\r\n").collect();
                flags = Some(match flags {
                    None => these,
                    Some(prev) => prev.iter().zip(&these).map(|(a, b)| *a && *b).collect(),
                });
            }
            let flags = flags.unwrap_or_default();
            reply::build(protocol, |e| {
                e.array(flags.len());
                for f in flags {
                    e.integer(i64::from(f));
                }
            })
        }
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
/// single Redis guarantees), whatever COUNT is.
pub async fn scan(shared: Arc<Shared>, protocol: Protocol, req: Request) -> Bytes {
    const SHARD_BITS: u32 = 14;
    let Some(cursor) = req
        .args
        .get(1)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return reply::error("ERR invalid cursor");
    };
    let view = shared.topology.view();
    let mut firsts: Vec<u16> = view.shards().iter().map(|s| s.first_slot()).collect();
    firsts.sort_unstable();
    if firsts.is_empty() {
        return reply::error(CLUSTERDOWN);
    }
    let (shard_slot, node_cursor) = if cursor == 0 {
        (firsts[0], 0)
    } else {
        (
            (cursor & ((1 << SHARD_BITS) - 1)) as u16,
            cursor >> SHARD_BITS,
        )
    };
    if node_cursor >= 1 << (64 - SHARD_BITS) {
        return reply::error("ERR invalid cursor");
    }
    let mut args = req.args.clone();
    args[1] = Bytes::from(node_cursor.to_string());
    let routed = Routed {
        payload: request::encode(&args),
        target: Target {
            slot: Some(shard_slot),
            readonly: true,
        },
        protocol,
    };
    let reply = run(Arc::clone(&shared), routed).await;
    if reply.is_error() {
        return reply.raw;
    }
    let Some(parts) = array_elements(&reply.raw, protocol) else {
        return reply::error("ERR redirector: unexpected SCAN reply");
    };
    let [next, keys] = parts.as_slice() else {
        return reply::error("ERR redirector: unexpected SCAN reply");
    };
    let next: u64 = bulk_text(next).and_then(|t| t.parse().ok()).unwrap_or(0);
    let next_cursor = if next != 0 {
        (next << SHARD_BITS) | u64::from(shard_slot)
    } else {
        match firsts.iter().find(|&&f| f > shard_slot) {
            // Node cursor 0 on the next shard. Its first slot may be 0 only
            // for the first shard, which never comes next.
            Some(&f) => u64::from(f),
            None => 0,
        }
    };
    let mut out = BytesMut::new();
    let mut e = Encoder {
        out: &mut out,
        protocol,
    };
    e.array(2);
    e.bulk(next_cursor.to_string().as_bytes());
    e.raw(keys);
    out.freeze()
}

fn bulk_text(raw: &Bytes) -> Option<&str> {
    // `$<len>\r\n<data>\r\n`
    let start = raw.iter().position(|&b| b == b'\n')? + 1;
    std::str::from_utf8(raw.get(start..raw.len().checked_sub(2)?)?).ok()
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
