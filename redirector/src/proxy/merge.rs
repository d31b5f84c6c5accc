//! Putting several nodes' replies back together as one Redis would have
//! answered: Redis 7's response policies (`response_policy:` tips), and the
//! named merges of commands whose policy is `special` or absent. Pure: the
//! replies in, the client's reply out.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::resp::{
    Protocol,
    reply::{self, Reply},
    value::Value,
};

/// How replies combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// OK when every node succeeded; a refusal names its node.
    AllSucceeded,
    /// The first success; an error only when every node failed.
    OneSucceeded,
    AggSum,
    AggMin,
    AggMax,
    AggLogicalAnd,
    AggLogicalOr,
    /// Arrays concatenated (no response policy: KEYS).
    Concat,
    /// A split command's values back in the caller's key order (MGET).
    Values,
    /// INFO: sections merged field by field (see `info`).
    Info,
    /// RANDOMKEY: a key whenever any node has one.
    RandomKey,
    /// Arrays as a set (PUBSUB CHANNELS).
    Union,
    /// `[name, count, ...]` pairs summed per name (PUBSUB NUMSUB).
    SumPerKey,
    /// MEMORY STATS: numbers summed (peaks: the largest), nested maps too.
    MemoryStats,
    /// LATENCY LATEST: per event, the latest sample and the worst.
    LatencyLatest,
    /// LATENCY HISTORY: every node's samples, by time.
    LatencyHistory,
    /// Text reports (MEMORY DOCTOR, LATENCY DOCTOR/GRAPH): each node's,
    /// under its address.
    PerNode,
    /// FUNCTION STATS: a running function anywhere; the engines of one
    /// node (every master loads the same libraries).
    FunctionStats,
}

impl Merge {
    /// The merge a fan-out's `response_policy` tip names, for the command
    /// `name` when the policy is `special`.
    pub fn from_tip(policy: Option<&str>) -> Self {
        match policy {
            Some("all_succeeded") => Self::AllSucceeded,
            Some("one_succeeded") => Self::OneSucceeded,
            Some("agg_sum") => Self::AggSum,
            Some("agg_min") => Self::AggMin,
            Some("agg_max") => Self::AggMax,
            Some("agg_logical_and") => Self::AggLogicalAnd,
            Some("agg_logical_or") => Self::AggLogicalOr,
            _ => Self::Concat,
        }
    }

    /// The named merge of a `special` command.
    pub fn special(name: &str) -> Option<Self> {
        Some(match name {
            "info" => Self::Info,
            "memory|stats" => Self::MemoryStats,
            "memory|doctor" | "memory|malloc-stats" | "latency|doctor" | "latency|graph" => {
                Self::PerNode
            }
            "latency|latest" => Self::LatencyLatest,
            "latency|history" => Self::LatencyHistory,
            "latency|histogram" => Self::SumPerKey,
            "function|stats" => Self::FunctionStats,
            _ => return None,
        })
    }

    /// The merge of a command split per slot (`request_policy:multi_shard`).
    pub fn for_split(policy: Option<&str>) -> Self {
        match policy {
            None => Self::Values,
            Some(policy) => Self::from_tip(Some(policy)),
        }
    }
}

/// Merges the replies of `nodes` (in the same order), in the client's
/// protocol. (`Values` and `Info` have their own merges with more
/// context: the split groups, and the proxy's own figures.)
pub fn merge(how: Merge, nodes: &[SocketAddr], replies: &[Reply], protocol: Protocol) -> Bytes {
    if replies.is_empty() {
        return reply::error("CLUSTERDOWN Hash slot not served");
    }
    match how {
        Merge::AllSucceeded => all_succeeded(nodes, replies),
        Merge::OneSucceeded => replies
            .iter()
            .find(|r| !r.is_error())
            .unwrap_or(&replies[0])
            .raw
            .clone(),
        _ => {
            if let Some(error) = replies.iter().find(|r| r.is_error()) {
                return error.raw.clone();
            }
            let values: Option<Vec<Value>> = replies
                .iter()
                .map(|r| Value::decode(&r.raw, protocol))
                .collect();
            let Some(values) = values else {
                return reply::error("ERR redirector: a node's reply could not be read");
            };
            merge_values(how, nodes, values).map_or_else(
                || reply::error("ERR redirector: the nodes' replies do not merge"),
                |v| v.encode(protocol),
            )
        }
    }
}

/// Every node must have succeeded. When all refused alike, the refusal is
/// Redis's own; otherwise it names the nodes that refused.
fn all_succeeded(nodes: &[SocketAddr], replies: &[Reply]) -> Bytes {
    let failed: Vec<(SocketAddr, &[u8])> = nodes
        .iter()
        .zip(replies)
        .filter_map(|(node, r)| Some((*node, r.error_message()?)))
        .collect();
    let Some((_, first)) = failed.first() else {
        return replies[0].raw.clone();
    };
    if failed.len() == replies.len() && failed.iter().all(|(_, m)| m == first) {
        return replies[0].raw.clone();
    }
    let names: Vec<String> = failed.iter().map(|(n, _)| n.to_string()).collect();
    reply::error(&format!(
        "{} (refused by {}; applied on {} of {} nodes)",
        String::from_utf8_lossy(first),
        names.join(", "),
        replies.len() - failed.len(),
        replies.len()
    ))
}

fn merge_values(how: Merge, nodes: &[SocketAddr], values: Vec<Value>) -> Option<Value> {
    match how {
        Merge::AggSum => aggregate(values, |a, b| a.checked_add(b).unwrap_or(i64::MAX)),
        Merge::AggMin => aggregate(values, i64::min),
        Merge::AggMax => aggregate(values, i64::max),
        Merge::AggLogicalAnd => aggregate(values, |a, b| i64::from(a != 0 && b != 0)),
        Merge::AggLogicalOr => aggregate(values, |a, b| i64::from(a != 0 || b != 0)),
        Merge::Concat => {
            let mut all = Vec::new();
            for v in values {
                match v {
                    Value::Array(items) => all.extend(items),
                    other => return Some(other),
                }
            }
            Some(Value::Array(all))
        }
        Merge::Union => {
            let mut all: Vec<Value> = Vec::new();
            for v in values {
                for item in v.into_items()? {
                    if !all.contains(&item) {
                        all.push(item);
                    }
                }
            }
            Some(Value::Array(all))
        }
        Merge::SumPerKey => sum_per_key(values),
        Merge::RandomKey => {
            let keys: Vec<Value> = values.into_iter().filter(|v| *v != Value::Null).collect();
            if keys.is_empty() {
                return Some(Value::Null);
            }
            Some(keys[random_index(keys.len())].clone())
        }
        Merge::MemoryStats => {
            let mut it = values.into_iter();
            let first = it.next()?;
            Some(it.fold(first, |acc, v| sum_maps("", acc, v)))
        }
        Merge::LatencyLatest => latency_latest(values),
        Merge::LatencyHistory => {
            let mut samples: Vec<Value> = Vec::new();
            for v in values {
                samples.extend(v.into_items()?);
            }
            samples.sort_by_key(|s| sample_time(s).unwrap_or(0));
            Some(Value::Array(samples))
        }
        Merge::PerNode => {
            let mut text = String::new();
            for (node, v) in nodes.iter().zip(values) {
                let body = v
                    .as_bytes()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                text.push_str(&format!("# {node}\n{body}\n"));
            }
            Some(Value::Verbatim(Bytes::from(text)))
        }
        Merge::FunctionStats => {
            let mut it = values.into_iter();
            let first = it.next()?.into_pairs()?;
            let running = std::iter::once(first.clone())
                .chain(it.filter_map(Value::into_pairs))
                .filter_map(|pairs| {
                    pairs
                        .into_iter()
                        .find(|(k, _)| k.as_bytes() == Some(b"running_script"))
                        .map(|(_, v)| v)
                })
                .find(|v| *v != Value::Null)
                .unwrap_or(Value::Null);
            Some(Value::Map(
                first
                    .into_iter()
                    .map(|(k, v)| {
                        if k.as_bytes() == Some(b"running_script") {
                            (k, running.clone())
                        } else {
                            (k, v)
                        }
                    })
                    .collect(),
            ))
        }
        // Merged with more context by their callers.
        Merge::AllSucceeded | Merge::OneSucceeded | Merge::Values | Merge::Info => None,
    }
}

/// Integers combined; arrays element by element (SCRIPT EXISTS).
fn aggregate(values: Vec<Value>, f: impl Fn(i64, i64) -> i64) -> Option<Value> {
    let mut it = values.into_iter();
    let mut acc = it.next()?;
    for v in it {
        acc = match (acc, v) {
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => Value::Array(
                a.into_iter()
                    .zip(b)
                    .map(|(x, y)| Some(Value::Int(f(x.as_int()?, y.as_int()?))))
                    .collect::<Option<Vec<_>>>()?,
            ),
            (a, b) => Value::Int(f(a.as_int()?, b.as_int()?)),
        };
    }
    Some(acc)
}

/// `[name, n, name, n, ...]` (or a map) summed per name, in first-seen order.
fn sum_per_key(values: Vec<Value>) -> Option<Value> {
    let mut sums: Vec<(Value, Value)> = Vec::new();
    let mut was_map = false;
    for v in values {
        was_map |= matches!(v, Value::Map(_));
        for (k, n) in v.into_pairs()? {
            match sums.iter_mut().find(|(key, _)| *key == k) {
                Some((_, total)) => *total = add_values(total.clone(), n),
                None => sums.push((k, n)),
            }
        }
    }
    Some(if was_map {
        Value::Map(sums)
    } else {
        Value::Array(sums.into_iter().flat_map(|(k, v)| [k, v]).collect())
    })
}

/// Numbers added; maps added field by field; anything else: the first.
fn add_values(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Value::Int(x.saturating_add(y)),
        (Value::Double(x), Value::Double(y)) => Value::Double(x + y),
        (a @ (Value::Map(_) | Value::Array(_)), b) => sum_maps("", a, b),
        (a, _) => a,
    }
}

/// MEMORY STATS-like maps: integers summed (peaks and the like: the
/// largest), ratios averaged, nested maps recursively, strings: the first.
fn sum_maps(key: &str, a: Value, b: Value) -> Value {
    let peak = key.contains("peak") || key.contains("max");
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => {
            Value::Int(if peak { x.max(y) } else { x.saturating_add(y) })
        }
        (Value::Double(x), Value::Double(y)) => {
            Value::Double(if peak { x.max(y) } else { (x + y) / 2.0 })
        }
        (a @ (Value::Map(_) | Value::Array(_)), b) => {
            let was_map = matches!(a, Value::Map(_));
            let (Some(pa), Some(pb)) = (a.clone().into_pairs(), b.into_pairs()) else {
                return a;
            };
            let mut out = pa;
            for (k, v) in pb {
                match out.iter_mut().find(|(key, _)| *key == k) {
                    Some((key, total)) => {
                        let name = key
                            .as_bytes()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .unwrap_or_default();
                        *total = sum_maps(&name, total.clone(), v);
                    }
                    None => out.push((k, v)),
                }
            }
            if was_map {
                Value::Map(out)
            } else {
                Value::Array(out.into_iter().flat_map(|(k, v)| [k, v]).collect())
            }
        }
        (a, _) => a,
    }
}

/// LATENCY LATEST: `[event, time, latest ms, max ms]` per event and node,
/// merged per event.
fn latency_latest(values: Vec<Value>) -> Option<Value> {
    let mut events: Vec<(Value, i64, i64, i64)> = Vec::new();
    for v in values {
        for entry in v.into_items()? {
            let fields = entry.into_items()?;
            let [event, time, latest, max] = <[Value; 4]>::try_from(fields).ok()?;
            let (time, latest, max) = (time.as_int()?, latest.as_int()?, max.as_int()?);
            match events.iter_mut().find(|(e, ..)| *e == event) {
                Some((_, t, l, m)) => {
                    if time > *t {
                        (*t, *l) = (time, latest);
                    }
                    *m = (*m).max(max);
                }
                None => events.push((event, time, latest, max)),
            }
        }
    }
    Some(Value::Array(
        events
            .into_iter()
            .map(|(event, t, l, m)| {
                Value::Array(vec![event, Value::Int(t), Value::Int(l), Value::Int(m)])
            })
            .collect(),
    ))
}

fn sample_time(sample: &Value) -> Option<i64> {
    match sample {
        Value::Array(fields) => fields.first()?.as_int(),
        _ => None,
    }
}

/// A pseudo-random index below `n` (no need for a generator's quality).
fn random_index(n: usize) -> usize {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(n);
    (h.finish() % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(raw: &'static str) -> Reply {
        let bytes = Bytes::from_static(raw.as_bytes());
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        reply::decode(&mut buf, Protocol::Resp2)
            .expect("valid")
            .expect("complete")
    }

    fn nodes(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 6379)))
            .collect()
    }

    fn merged(how: Merge, replies: &[&'static str]) -> String {
        let replies: Vec<Reply> = replies.iter().map(|raw| r(raw)).collect();
        let out = merge(how, &nodes(replies.len()), &replies, Protocol::Resp2);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn all_succeeded_names_the_nodes_that_refused() {
        assert_eq!(
            merged(Merge::AllSucceeded, &["+OK\r\n", "+OK\r\n"]),
            "+OK\r\n"
        );
        assert_eq!(
            merged(Merge::AllSucceeded, &["-ERR bad\r\n", "-ERR bad\r\n"]),
            "-ERR bad\r\n",
            "a refusal everywhere is Redis's own"
        );
        assert_eq!(
            merged(
                Merge::AllSucceeded,
                &["+OK\r\n", "-ERR denied\r\n", "+OK\r\n"]
            ),
            "-ERR denied (refused by 10.0.0.2:6379; applied on 2 of 3 nodes)\r\n"
        );
        assert_eq!(
            merged(Merge::OneSucceeded, &["-NOTBUSY x\r\n", "+OK\r\n"]),
            "+OK\r\n"
        );
    }

    #[test]
    fn aggregates_follow_the_response_policy() {
        assert_eq!(merged(Merge::AggSum, &[":2\r\n", ":3\r\n"]), ":5\r\n");
        assert_eq!(merged(Merge::AggMin, &[":2\r\n", ":1\r\n"]), ":1\r\n");
        assert_eq!(merged(Merge::AggMax, &[":2\r\n", ":7\r\n"]), ":7\r\n");
        assert_eq!(
            merged(
                Merge::AggLogicalAnd,
                &["*2\r\n:1\r\n:1\r\n", "*2\r\n:1\r\n:0\r\n"]
            ),
            "*2\r\n:1\r\n:0\r\n"
        );
        assert_eq!(
            merged(Merge::AggLogicalOr, &["*1\r\n:0\r\n", "*1\r\n:1\r\n"]),
            "*1\r\n:1\r\n"
        );
        assert_eq!(
            merged(Merge::AggSum, &[":1\r\n", "-ERR no\r\n"]),
            "-ERR no\r\n"
        );
    }

    #[test]
    fn named_merges_answer_as_one_redis() {
        assert_eq!(
            merged(Merge::Concat, &["*1\r\n$1\r\na\r\n", "*1\r\n$1\r\nb\r\n"]),
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(
            merged(
                Merge::Union,
                &["*1\r\n$1\r\na\r\n", "*2\r\n$1\r\na\r\n$1\r\nb\r\n"]
            ),
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(
            merged(
                Merge::SumPerKey,
                &[
                    "*4\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:0\r\n",
                    "*4\r\n$1\r\na\r\n:2\r\n$1\r\nb\r\n:3\r\n"
                ]
            ),
            "*4\r\n$1\r\na\r\n:3\r\n$1\r\nb\r\n:3\r\n"
        );
        assert_eq!(merged(Merge::RandomKey, &["$-1\r\n", "$-1\r\n"]), "$-1\r\n");
        assert_eq!(
            merged(Merge::RandomKey, &["$-1\r\n", "$1\r\nk\r\n"]),
            "$1\r\nk\r\n"
        );
        let stats = merged(
            Merge::MemoryStats,
            &[
                "*4\r\n$14\r\npeak.allocated\r\n:100\r\n$10\r\nkeys.count\r\n:2\r\n",
                "*4\r\n$14\r\npeak.allocated\r\n:300\r\n$10\r\nkeys.count\r\n:5\r\n",
            ],
        );
        assert_eq!(
            stats,
            "*4\r\n$14\r\npeak.allocated\r\n:300\r\n$10\r\nkeys.count\r\n:7\r\n"
        );
        let latest = merged(
            Merge::LatencyLatest,
            &[
                "*1\r\n*4\r\n$7\r\ncommand\r\n:10\r\n:5\r\n:50\r\n",
                "*1\r\n*4\r\n$7\r\ncommand\r\n:20\r\n:7\r\n:9\r\n",
            ],
        );
        assert_eq!(latest, "*1\r\n*4\r\n$7\r\ncommand\r\n:20\r\n:7\r\n:50\r\n");
    }
}
