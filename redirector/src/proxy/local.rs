//! Commands the proxy answers itself, as a single Redis server would.
//!
//! Cluster-aware clients see a one-node cluster: the proxy, owning all
//! 16384 slots, at the address the client dialled (the original
//! destination for a steered client), so their own slot routing always
//! leads back to the proxy.

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;

use super::Shared;
use crate::{
    cluster::slot,
    resp::{Protocol, reply, request::Request},
};

/// What local replies need to know about the calling client.
pub struct Caller<'a> {
    pub id: u64,
    pub protocol: Protocol,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The address to present as the one-node cluster.
    pub advertised: SocketAddr,
    pub user: &'a str,
}

pub fn wrong_arity(name: &str) -> Bytes {
    reply::error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

pub fn unsupported(what: &str) -> Bytes {
    reply::error(&format!("ERR {what} is not supported by redirector"))
}

/// The proxy's node id in cluster views: stable for the process.
pub fn node_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id()) << 64;
        // Two rounds of a 128-bit mix are plenty for an identifier.
        let mixed = seed.wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15);
        let hex = format!("{:032x}{:08x}", mixed, (mixed >> 96) as u32);
        hex[..40].to_string()
    })
}

pub fn ping(req: &Request, protocol: Protocol, subscribed: bool) -> Bytes {
    match (req.argc(), subscribed && protocol == Protocol::Resp2) {
        (1, false) => Bytes::from_static(b"+PONG\r\n"),
        (2, false) => reply::build(protocol, |e| e.bulk(&req.args()[1])),
        // A subscribed RESP2 client gets PING replies in pub/sub form.
        (1 | 2, true) => reply::build(protocol, |e| {
            e.array(2);
            e.bulk(b"pong");
            e.bulk(req.args().get(1).map_or(&b""[..], |m| &m[..]));
        }),
        _ => wrong_arity("ping"),
    }
}

pub fn echo(req: &Request, protocol: Protocol) -> Bytes {
    if req.argc() != 2 {
        return wrong_arity("echo");
    }
    reply::build(protocol, |e| e.bulk(&req.args()[1]))
}

pub fn time(protocol: Protocol) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    reply::build(protocol, |e| {
        e.array(2);
        e.bulk(now.as_secs().to_string().as_bytes());
        e.bulk(now.subsec_micros().to_string().as_bytes());
    })
}

/// SELECT: database 0 only. A cluster has no other; a standalone Redis
/// does, but the proxy's pooled connections all use 0.
pub fn select(req: &Request, standalone: bool) -> Bytes {
    if req.argc() != 2 {
        return wrong_arity("select");
    }
    match std::str::from_utf8(&req.args()[1])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        Some(0) => reply::ok(),
        Some(_) if standalone => reply::error(
            "ERR redirector serves database 0 only: its pooled connections are shared by every client",
        ),
        Some(_) => reply::error("ERR SELECT is not allowed in cluster mode"),
        None => reply::error("ERR value is not an integer or out of range"),
    }
}

/// The HELLO reply (the map Redis sends), in `protocol`.
pub fn hello_reply(shared: &Shared, caller: &Caller<'_>) -> Bytes {
    reply::build(caller.protocol, |e| {
        e.map(7);
        e.bulk(b"server");
        e.bulk(b"redis");
        e.bulk(b"version");
        e.bulk(shared.redis_version.as_bytes());
        e.bulk(b"proto");
        e.integer(if caller.protocol == Protocol::Resp3 {
            3
        } else {
            2
        });
        e.bulk(b"id");
        e.integer(i64::try_from(caller.id).unwrap_or(i64::MAX));
        e.bulk(b"mode");
        e.bulk(b"standalone");
        e.bulk(b"role");
        e.bulk(b"master");
        e.bulk(b"modules");
        e.array(0);
    })
}

/// `CLUSTER ...`: the one-node view (the planner routes the subcommands
/// that carry a slot: COUNTKEYSINSLOT, GETKEYSINSLOT).
pub fn cluster(req: &Request, caller: &Caller<'_>) -> Bytes {
    let sub = req
        .args()
        .get(1)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    let ip = caller.advertised.ip().to_string();
    let port = i64::from(caller.advertised.port());
    let id = node_id();
    let protocol = caller.protocol;
    match sub.as_slice() {
        b"slots" => reply::build(protocol, |e| {
            e.array(1);
            e.array(3);
            e.integer(0);
            e.integer(16383);
            e.array(3);
            e.bulk(ip.as_bytes());
            e.integer(port);
            e.bulk(id.as_bytes());
        }),
        b"shards" => reply::build(protocol, |e| {
            e.array(1);
            e.map(2);
            e.bulk(b"slots");
            e.array(2);
            e.integer(0);
            e.integer(16383);
            e.bulk(b"nodes");
            e.array(1);
            e.map(7);
            e.bulk(b"id");
            e.bulk(id.as_bytes());
            e.bulk(b"port");
            e.integer(port);
            e.bulk(b"ip");
            e.bulk(ip.as_bytes());
            e.bulk(b"endpoint");
            e.bulk(ip.as_bytes());
            e.bulk(b"role");
            e.bulk(b"master");
            e.bulk(b"replication-offset");
            e.integer(0);
            e.bulk(b"health");
            e.bulk(b"online");
        }),
        b"nodes" => {
            let line = format!("{id} {ip}:{port}@{port} myself,master - 0 0 1 connected 0-16383\n");
            reply::build(protocol, |e| e.verbatim(&line))
        }
        b"info" => reply::build(protocol, |e| {
            e.verbatim(concat!(
                "cluster_state:ok\r\n",
                "cluster_slots_assigned:16384\r\n",
                "cluster_slots_ok:16384\r\n",
                "cluster_slots_pfail:0\r\n",
                "cluster_slots_fail:0\r\n",
                "cluster_known_nodes:1\r\n",
                "cluster_size:1\r\n",
                "cluster_current_epoch:1\r\n",
                "cluster_my_epoch:1\r\n",
            ));
        }),
        b"myid" => reply::build(protocol, |e| e.bulk(id.as_bytes())),
        b"keyslot" => {
            if req.argc() != 3 {
                return wrong_arity("cluster|keyslot");
            }
            reply::build(protocol, |e| {
                e.integer(i64::from(slot::slot(&req.args()[2])))
            })
        }
        b"" => wrong_arity("cluster"),
        other => unsupported(&format!(
            "CLUSTER {}",
            String::from_utf8_lossy(other).to_uppercase()
        )),
    }
}
