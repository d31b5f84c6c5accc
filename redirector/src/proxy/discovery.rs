//! Learning the cluster: the slot map (`CLUSTER SLOTS`), the command table
//! (`COMMAND`) and the server version, and keeping the slot map fresh.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{UpstreamError, dial::Dialer, lease::Leased};
use crate::{
    cluster::{
        commands::CommandTable,
        topology::{Topology, View},
    },
    metrics::Metrics,
    resp::{Protocol, reply, request},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{addr}: {message}")]
    Reply { addr: SocketAddr, message: String },
}

async fn call(dialer: &Dialer, addr: SocketAddr, args: &[&'static [u8]]) -> Result<Bytes, Error> {
    let mut conn = Leased::open(dialer, addr, Protocol::Resp2).await?;
    let args: Vec<Bytes> = args.iter().map(|a| Bytes::from_static(a)).collect();
    let mut replies = conn.call(&request::encode(&args), 1).await?;
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

/// Asks `addr` for the slot map.
pub async fn fetch_view(dialer: &Dialer, addr: SocketAddr) -> Result<View, Error> {
    let raw = call(dialer, addr, &[b"CLUSTER", b"SLOTS"]).await?;
    let frame = reply::frame2(&raw).ok_or_else(|| Error::Reply {
        addr,
        message: "undecodable CLUSTER SLOTS reply".into(),
    })?;
    View::from_cluster_slots(&frame, addr).map_err(|e| Error::Reply {
        addr,
        message: e.to_string(),
    })
}

/// The command table and the server version, from `addr`.
pub async fn fetch_commands(
    dialer: &Dialer,
    addr: SocketAddr,
) -> Result<(CommandTable, String), Error> {
    let raw = call(dialer, addr, &[b"COMMAND"]).await?;
    let frame = reply::frame2(&raw).ok_or_else(|| Error::Reply {
        addr,
        message: "undecodable COMMAND reply".into(),
    })?;
    let table = CommandTable::from_command_reply(&frame).map_err(|e| Error::Reply {
        addr,
        message: e.to_string(),
    })?;
    let info = call(dialer, addr, &[b"INFO", b"server"]).await?;
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
    dialer: &Dialer,
    metrics: &Metrics,
) -> Result<bool, Error> {
    let mut last = None;
    for addr in topology.candidates() {
        match fetch_view(dialer, addr).await {
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
    dialer: Arc<Dialer>,
    metrics: Arc<Metrics>,
    interval: Duration,
    min_gap: Duration,
    on_change: impl Fn(&View) + Send + 'static,
) {
    let mut last = Instant::now();
    loop {
        topology.wait_for_refresh(interval, last, min_gap).await;
        last = Instant::now();
        match refresh(&topology, &dialer, &metrics).await {
            Ok(true) => on_change(&topology.view()),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cluster topology refresh failed"),
        }
    }
}
