//! Commands the proxy answers itself, as a single Redis server would.
//!
//! Cluster-aware clients see a one-node cluster: the proxy, owning all
//! 16384 slots, at the address the client dialled (the original
//! destination for a steered client), so their own slot routing always
//! leads back to the proxy.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};

use super::{Shared, exec};
use crate::{
    cluster::slot,
    resp::{
        Protocol,
        reply::{self, Encoder},
        request::Request,
    },
};

/// What local replies need to know about the calling client.
pub struct Caller<'a> {
    pub id: u64,
    pub protocol: Protocol,
    pub name: Option<&'a Bytes>,
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
    match (req.args.len(), subscribed && protocol == Protocol::Resp2) {
        (1, false) => Bytes::from_static(b"+PONG\r\n"),
        (2, false) => reply::build(protocol, |e| e.bulk(&req.args[1])),
        // A subscribed RESP2 client gets PING replies in pub/sub form.
        (1 | 2, true) => reply::build(protocol, |e| {
            e.array(2);
            e.bulk(b"pong");
            e.bulk(req.args.get(1).map_or(&b""[..], |m| &m[..]));
        }),
        _ => wrong_arity("ping"),
    }
}

pub fn echo(req: &Request, protocol: Protocol) -> Bytes {
    if req.args.len() != 2 {
        return wrong_arity("echo");
    }
    reply::build(protocol, |e| e.bulk(&req.args[1]))
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

pub fn select(req: &Request) -> Bytes {
    if req.args.len() != 2 {
        return wrong_arity("select");
    }
    match std::str::from_utf8(&req.args[1])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        Some(0) => reply::ok(),
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

/// `CLIENT <sub> ...` that a shared upstream connection cannot carry are
/// answered here; the rest are refused with a clear error.
pub enum ClientCommand {
    Reply(Bytes),
    SetName(Bytes),
}

pub fn client(req: &Request, caller: &Caller<'_>) -> ClientCommand {
    let sub = req
        .args
        .get(1)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    let reply = match sub.as_slice() {
        b"id" => reply::build(caller.protocol, |e| {
            e.integer(i64::try_from(caller.id).unwrap_or(i64::MAX));
        }),
        b"getname" => reply::build(caller.protocol, |e| match caller.name {
            Some(name) => e.bulk(name),
            None => e.null(),
        }),
        b"setname" => {
            let Some(name) = req.args.get(2).filter(|_| req.args.len() == 3) else {
                return ClientCommand::Reply(wrong_arity("client|setname"));
            };
            if name.iter().any(|&b| b <= b' ' || b > b'~') {
                return ClientCommand::Reply(reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            return ClientCommand::SetName(name.clone());
        }
        b"info" => reply::build(caller.protocol, |e| e.verbatim(&client_line(caller))),
        b"list" => reply::build(caller.protocol, |e| e.verbatim(&client_line(caller))),
        // Library identification (redis-py, phpredis send these).
        b"setinfo" | b"no-evict" | b"no-touch" => reply::ok(),
        b"" => wrong_arity("client"),
        other => unsupported(&format!(
            "CLIENT {}",
            String::from_utf8_lossy(other).to_uppercase()
        )),
    };
    ClientCommand::Reply(reply)
}

fn client_line(caller: &Caller<'_>) -> String {
    format!(
        "id={} addr={} laddr={} fd=0 name={} db=0 user={} resp={}\n",
        caller.id,
        caller.peer,
        caller.local,
        caller
            .name
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default(),
        caller.user,
        if caller.protocol == Protocol::Resp3 {
            3
        } else {
            2
        }
    )
}

/// `CLUSTER ...`: the one-node view, or `None` for subcommands that go to
/// the cluster (they carry a slot: COUNTKEYSINSLOT, GETKEYSINSLOT).
pub fn cluster(req: &Request, caller: &Caller<'_>) -> Option<Bytes> {
    let sub = req
        .args
        .get(1)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    let ip = caller.advertised.ip().to_string();
    let port = i64::from(caller.advertised.port());
    let id = node_id();
    let protocol = caller.protocol;
    Some(match sub.as_slice() {
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
            if req.args.len() != 3 {
                return Some(wrong_arity("cluster|keyslot"));
            }
            reply::build(protocol, |e| e.integer(i64::from(slot::slot(&req.args[2]))))
        }
        b"countkeysinslot" | b"getkeysinslot" => return None,
        b"" => wrong_arity("cluster"),
        other => unsupported(&format!(
            "CLUSTER {}",
            String::from_utf8_lossy(other).to_uppercase()
        )),
    })
}

/// `INFO`: the proxy's own view (documented in the README): server,
/// clients, stats, the upstream cluster, and the keyspace summed over
/// masters with DBSIZE.
pub async fn info(shared: Arc<Shared>, protocol: Protocol, section: Option<String>) -> Bytes {
    let wanted = |name: &str| {
        section
            .as_deref()
            .is_none_or(|s| s == "all" || s == "default" || s == "everything" || s == name)
    };
    let mut text = String::new();
    if wanted("server") {
        text.push_str(&format!(
            "# Server\r\nredis_version:{}\r\nredirector_version:{}\r\nredis_mode:standalone\r\nos:{}\r\nprocess_id:{}\r\nuptime_in_seconds:{}\r\n\r\n",
            shared.redis_version,
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            shared.started.elapsed().as_secs(),
        ));
    }
    if wanted("clients") {
        text.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
            shared.connected_clients(),
            shared.settings.admission.max_clients
        ));
    }
    if wanted("stats") {
        text.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
            shared.total_connections(),
            shared.total_commands()
        ));
    }
    let view = shared.topology.view();
    if wanted("cluster") {
        let replicas: usize = view.shards().iter().map(|s| s.replicas.len()).sum();
        let covered = view.covered_slots();
        text.push_str(&format!(
            "# Cluster\r\ncluster_enabled:1\r\nupstream_cluster_state:{}\r\nupstream_masters:{}\r\nupstream_replicas:{}\r\nupstream_slots_covered:{}\r\ntopology_version:{}\r\nread_policy:{:?}\r\n\r\n",
            if covered == slot::SLOTS { "ok" } else { "fail" },
            view.shards().len(),
            replicas,
            covered,
            view.version,
            shared.settings.read_policy,
        ));
    }
    if wanted("keyspace") {
        let dbsize = Request::from_args(vec![Bytes::from_static(b"DBSIZE")]);
        let keys = exec::fan_out(
            Arc::clone(&shared),
            Protocol::Resp2,
            dbsize,
            exec::FanOut::SumIntegers,
        )
        .await;
        let keys = std::str::from_utf8(&keys)
            .ok()
            .and_then(|s| s.strip_prefix(':'))
            .and_then(|s| s.trim_end().parse::<i64>().ok());
        text.push_str("# Keyspace\r\n");
        if let Some(keys) = keys.filter(|&k| k > 0) {
            text.push_str(&format!("db0:keys={keys},expires=0,avg_ttl=0\r\n"));
        }
    }
    let mut out = BytesMut::new();
    Encoder {
        out: &mut out,
        protocol,
    }
    .verbatim(&text);
    out.freeze()
}
