//! Free TCP ports on 127.0.0.1 for servers the tests start on the host.
//!
//! A port is checked by binding it, then released for the server to take, so
//! another process can still grab it in between. To make that rare, ports
//! come from below the kernel's ephemeral range (outgoing connects never pick
//! them), the scan starts at a point derived from the pid and the clock
//! (parallel test processes start far apart), and one process never hands
//! out the same port twice.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, TcpListener},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

/// Lowest port handed out: clear of well-known and registered defaults
/// tests tend to use (6379, 8080, ...).
const LOW: u16 = 10_000;
/// A cluster node's bus listens on port + 10000.
const BUS_OFFSET: u16 = 10_000;
/// Cluster ports stay below this so the bus port is a valid port.
const CLUSTER_MAX: u16 = 55_535;

/// A port on 127.0.0.1 nobody listens on, never returned before by this
/// process.
pub fn free_port() -> u16 {
    let high = ephemeral_low().max(LOW + 1000);
    pick(LOW, high, &[0])
}

/// Like [`free_port`], and port + 10000 (the cluster bus) is free too; below
/// 55535.
pub fn free_cluster_port() -> u16 {
    // Keep both the port and its bus port below the ephemeral range when
    // the range leaves room for that; otherwise fall back to the full span.
    let high = ephemeral_low().saturating_sub(BUS_OFFSET);
    let high = if high >= LOW + 1000 {
        high
    } else {
        CLUSTER_MAX
    };
    pick(LOW, high.min(CLUSTER_MAX), &[0, BUS_OFFSET])
}

/// Scans `[low, high)` from a per-process starting point for a port `p` such
/// that `p + o` is free for every offset `o`, and reserves all of them.
fn pick(low: u16, high: u16, offsets: &[u16]) -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut guard = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    let span = u32::from(high - low);
    let start = seed() % span;
    for i in 0..span {
        let port = low + u16::try_from((start + i) % span).expect("span fits u16");
        let all: Vec<u16> = offsets.iter().map(|o| port + o).collect();
        if all.iter().any(|p| handed_out.contains(p)) {
            continue;
        }
        // Bind every port at once so none is judged free while we hold
        // another; all are released when `held` drops.
        let held: Option<Vec<TcpListener>> = all
            .iter()
            .map(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).ok())
            .collect();
        if held.is_some() {
            handed_out.extend(all);
            return port;
        }
    }
    panic!("no free port in {low}..{high} with offsets {offsets:?}");
}

/// Differs between processes started at the same moment (pid) and between
/// runs of the same pid (clock).
fn seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos / 1000)
}

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let p = free_cluster_port();
            assert!((LOW..CLUSTER_MAX).contains(&p));
            assert!(seen.insert(p) && seen.insert(p + BUS_OFFSET), "{p} twice");
            let q = free_port();
            assert!(seen.insert(q), "{q} twice");
            TcpListener::bind((Ipv4Addr::LOCALHOST, q)).expect("free port binds");
        }
    }
}
