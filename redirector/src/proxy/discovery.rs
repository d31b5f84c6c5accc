//! Learning the cluster: the slot map (`CLUSTER SLOTS`), the command table
//! (`COMMAND`) and the server version, and keeping the slot map fresh. A
//! standalone primary has a fixed one-shard map; a refresh checks that it
//! still is a primary (`ROLE`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{
    UpstreamError,
    dial::{Dialer, UpstreamPath},
    lease::Leased,
    metrics::ProxyMetrics,
};
use crate::{
    cluster::{
        commands::CommandTable,
        topology::{Topology, View},
    },
    resp::{Protocol, reply, request},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{addr}: {message}")]
    Reply { addr: SocketAddr, message: String },
}

/// The connection discovery asks its questions on, kept from one question,
/// and one refresh, to the next while it is to the node asked. A connection
/// per question cost every node's proxy two connects to a seed per refresh
/// (every 5 s by default), each a handshake (and AUTH, and TLS) that Redis
/// counts in `total_connections_received`; a DaemonSet multiplies that by
/// the nodes. Reused only while Redis has not closed it, nothing is left
/// unread on it and the node is reached the way it was (a pod the API
/// meshes since is asked through its tunnel, as the account the API names);
/// a question that fails or goes unanswered drops it.
#[derive(Default)]
pub struct Control {
    conn: Option<(Leased, UpstreamPath)>,
}

/// The least time a discovery question is given (see [`Control::call`]).
const MIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

impl Control {
    async fn call(
        &mut self,
        dialer: &Dialer,
        addr: SocketAddr,
        args: &[&'static [u8]],
    ) -> Result<Bytes, Error> {
        let path = dialer.path_to(addr);
        if !self.conn.as_mut().is_some_and(|(conn, opened)| {
            conn.addr == addr && *opened == path && conn.is_reusable()
        }) {
            self.conn = None;
            let conn = Leased::open(dialer, addr, Protocol::Resp2).await?;
            self.conn = Some((conn, path));
        }
        let (conn, _) = self.conn.as_mut().expect("opened above");
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::from_static(a)).collect();
        // Bounded: a kept connection skips the handshake whose timeout used
        // to bound a node that accepts but never answers (stopped, hung),
        // and such a node must not hold the refresher, and every topology
        // change after it, until it recovers. At least a second: a connect
        // timeout tuned short for failover must not fail a `COMMAND` reply
        // (about 200 KiB) from a busy node.
        let limit = dialer.connect_timeout.max(MIN_ANSWER_TIMEOUT);
        let answered = tokio::time::timeout(limit, conn.call(&request::encode(&args), 1)).await;
        let mut replies = match answered {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(e.into());
            }
            Err(_) => {
                self.conn = None;
                return Err(Error::Reply {
                    addr,
                    message: format!("no answer within {limit:?}"),
                });
            }
        };
        let reply = replies.pop().ok_or_else(|| Error::Reply {
            addr,
            message: "no reply".into(),
        })?;
        if let Some(message) = reply.error_message() {
            return Err(Error::Reply {
                addr,
                message: String::from_utf8_lossy(message).into_owned(),
            });
        }
        Ok(reply.raw)
    }
}

/// Asks `addr` for the slot map.
pub async fn fetch_view(
    control: &mut Control,
    dialer: &Dialer,
    addr: SocketAddr,
) -> Result<View, Error> {
    let raw = control.call(dialer, addr, &[b"CLUSTER", b"SLOTS"]).await?;
    let frame = reply::frame2(&raw).ok_or_else(|| Error::Reply {
        addr,
        message: "undecodable CLUSTER SLOTS reply".into(),
    })?;
    let mut view = View::from_cluster_slots(&frame, addr).map_err(|e| Error::Reply {
        addr,
        message: e.to_string(),
    })?;
    // Best effort: without it, commands for every node miss only the
    // replicas that have not synced yet.
    if let Ok(raw) = control.call(dialer, addr, &[b"CLUSTER", b"NODES"]).await
        && let Some(crate::resp::value::Value::Bulk(text)) =
            crate::resp::value::Value::decode(&raw, Protocol::Resp2)
    {
        view.set_known_replicas(&replicas_in_cluster_nodes(&String::from_utf8_lossy(&text)));
    }
    Ok(view)
}

/// A standalone backend's primary must be one: a replica refuses writes,
/// and a cluster node would answer MOVED the proxy is not looking for.
async fn standalone_role(
    control: &mut Control,
    dialer: &Dialer,
    primary: SocketAddr,
) -> Result<(), Error> {
    let raw = control.call(dialer, primary, &[b"ROLE"]).await?;
    let role = match crate::resp::value::Value::decode(&raw, Protocol::Resp2) {
        Some(crate::resp::value::Value::Array(items)) => items.first().and_then(|r| {
            r.as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        }),
        _ => None,
    };
    match role.as_deref() {
        Some("master") => Ok(()),
        other => Err(Error::Reply {
            addr: primary,
            message: format!(
                "a standalone backend's primary must be a master, not a {}",
                other.unwrap_or("server that does not answer ROLE")
            ),
        }),
    }
}

/// Replicas in a `CLUSTER NODES` text that are up: `<id> <ip:port@cport>
/// <flags> ...` with `slave` among the flags and no failure.
pub fn replicas_in_cluster_nodes(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            let down = ["fail", "fail?", "noaddr", "handshake"];
            if !flags.contains(&"slave") || flags.iter().any(|f| down.contains(f)) {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let endpoint = addr.split(['@', ',']).next()?;
            endpoint.parse().ok()
        })
        .collect()
}

/// The command table and the server version, from `addr`.
pub async fn fetch_commands(
    control: &mut Control,
    dialer: &Dialer,
    addr: SocketAddr,
) -> Result<(CommandTable, String), Error> {
    let raw = control.call(dialer, addr, &[b"COMMAND"]).await?;
    let frame = reply::frame2(&raw).ok_or_else(|| Error::Reply {
        addr,
        message: "undecodable COMMAND reply".into(),
    })?;
    let table = CommandTable::from_command_reply(&frame).map_err(|e| Error::Reply {
        addr,
        message: e.to_string(),
    })?;
    let info = control.call(dialer, addr, &[b"INFO", b"server"]).await?;
    let version = String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| {
            l.strip_prefix("redis_version:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "7.0.0".into());
    Ok((table, version))
}

/// Tries every candidate until one answers; installs the view.
pub async fn refresh(
    topology: &Topology,
    control: &mut Control,
    dialer: &Dialer,
    metrics: &ProxyMetrics,
) -> Result<bool, Error> {
    if let Some((primary, replicas)) = topology.standalone_nodes() {
        let checked = standalone_role(control, dialer, primary).await;
        metrics.topology_refresh(checked.is_ok());
        checked?;
        let changed = topology.install(View::standalone(primary, replicas.to_vec()));
        if changed {
            info!(%primary, replicas = replicas.len(), "standalone primary ready");
        }
        return Ok(changed);
    }
    let mut last = None;
    for addr in topology.candidates() {
        match fetch_view(control, dialer, addr).await {
            // A node that lost its slots (or is still joining) answers with
            // a partial map; only a covered map is trusted.
            Ok(view) if view.covered_slots() == crate::cluster::slot::SLOTS => {
                metrics.topology_refresh(true);
                let changed = topology.install(view);
                if changed {
                    info!(
                        from = %addr,
                        version = topology.version(),
                        masters = topology.view().shards().len(),
                        "cluster topology updated"
                    );
                }
                return Ok(changed);
            }
            Ok(view) => {
                debug!(%addr, covered = view.covered_slots(), "partial slot map, asking elsewhere");
            }
            Err(e) => {
                debug!(%addr, error = %e, "topology refresh failed");
                last = Some(e);
            }
        }
    }
    metrics.topology_refresh(false);
    Err(last.unwrap_or_else(|| Error::Reply {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        message: "no node has a complete slot map".into(),
    }))
}

/// Keeps the slot map fresh until dropped.
pub async fn refresher(
    topology: Arc<Topology>,
    mut control: Control,
    dialer: Arc<Dialer>,
    metrics: Arc<ProxyMetrics>,
    interval: Duration,
    min_gap: Duration,
    on_change: impl Fn(&View) + Send + 'static,
) {
    let mut last = Instant::now();
    let mut outage = Outage::default();
    loop {
        topology.wait_for_refresh(interval, last, min_gap).await;
        last = Instant::now();
        let result = refresh(&topology, &mut control, &dialer, &metrics).await;
        match outage.record(result.is_ok(), last) {
            Report::Quiet => {}
            Report::Failing { failures, since } => {
                if let Err(e) = &result {
                    warn!(
                        error = %e,
                        failures,
                        failing_for = ?since,
                        "topology refresh failed"
                    );
                }
            }
            Report::Recovered { failures, after } => {
                info!(failures, after = ?after, "topology refresh succeeds again");
            }
        }
        if let Ok(true) = result {
            on_change(&topology.view());
        }
    }
}

/// How often a refresh that keeps failing is logged again. Refreshes are
/// asked for at each failed command (every `min_gap` under load), so a dead
/// backend would otherwise log five warnings a second; the metric
/// `redirector_topology_refreshes_total` counts every one.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(30);

/// What to log for one refresh outcome.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    Quiet,
    /// A warning: the first failure of an outage, then one per
    /// [`OUTAGE_REPORT_EVERY`], with the failures so far.
    Failing {
        failures: u64,
        since: Duration,
    },
    /// The first success after an outage.
    Recovered {
        failures: u64,
        after: Duration,
    },
}

/// A run of failed refreshes, for logging it without flooding.
#[derive(Debug, Default)]
struct Outage {
    /// (first failure, last warning, failures so far) while failing.
    current: Option<(Instant, Instant, u64)>,
}

impl Outage {
    fn record(&mut self, ok: bool, now: Instant) -> Report {
        match (ok, &mut self.current) {
            (true, None) => Report::Quiet,
            (true, Some((first, _, failures))) => {
                let report = Report::Recovered {
                    failures: *failures,
                    after: now.duration_since(*first),
                };
                self.current = None;
                report
            }
            (false, None) => {
                self.current = Some((now, now, 1));
                Report::Failing {
                    failures: 1,
                    since: Duration::ZERO,
                }
            }
            (false, Some((first, warned, failures))) => {
                *failures += 1;
                if now.duration_since(*warned) < OUTAGE_REPORT_EVERY {
                    return Report::Quiet;
                }
                *warned = now;
                Report::Failing {
                    failures: *failures,
                    since: now.duration_since(*first),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_once_then_every_thirty_seconds_and_reports_its_end() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut outage = Outage::default();
        assert_eq!(outage.record(true, at(0)), Report::Quiet);
        assert_eq!(
            outage.record(false, at(100)),
            Report::Failing {
                failures: 1,
                since: Duration::ZERO
            }
        );
        // Five a second for half a minute: silent.
        for i in 1..150 {
            assert_eq!(outage.record(false, at(100 + i * 200)), Report::Quiet);
        }
        assert_eq!(
            outage.record(false, at(30_100)),
            Report::Failing {
                failures: 151,
                since: Duration::from_secs(30)
            }
        );
        assert_eq!(outage.record(false, at(30_300)), Report::Quiet);
        assert_eq!(
            outage.record(true, at(30_500)),
            Report::Recovered {
                failures: 152,
                after: Duration::from_millis(30_400)
            }
        );
        assert_eq!(outage.record(true, at(30_700)), Report::Quiet);
        // A new outage warns at once.
        assert!(matches!(
            outage.record(false, at(30_900)),
            Report::Failing { failures: 1, .. }
        ));
    }

    #[test]
    fn replicas_that_are_up_are_read_from_cluster_nodes() {
        let text = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7003@17003 slave a 0 1 1 connected
c 127.0.0.1:7004@17004,host4 slave a 0 1 1 connected
d 127.0.0.1:7005@17005 slave,fail a 0 1 1 disconnected
e :0@0 slave,noaddr a 0 1 1 disconnected
";
        assert_eq!(
            replicas_in_cluster_nodes(text),
            vec![
                "127.0.0.1:7003".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:7004".parse().unwrap()
            ]
        );
    }
}
