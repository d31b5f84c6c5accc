//! Which upstream nodes recently refused connections: read policies that
//! prefer a healthy node look here. Its own module, so that the pool and
//! the connections it holds both use it without importing each other.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Nodes that recently refused connections, for read policies that
/// prefer a healthy node.
#[derive(Default)]
pub struct Health {
    down_until: Mutex<HashMap<SocketAddr, Instant>>,
}

/// How long a node counts as down after a failed connect.
const DOWN_FOR: Duration = Duration::from_secs(2);

impl Health {
    pub fn failed(&self, addr: SocketAddr) {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, Instant::now() + DOWN_FOR);
    }

    pub fn connected(&self, addr: SocketAddr) {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
    }

    pub fn is_down(&self, addr: SocketAddr) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .is_some_and(|&until| Instant::now() < until)
    }
}
