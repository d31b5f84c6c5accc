//! Upstream connections per Redis node: a few shared, multiplexed
//! connections that every client session uses, and a pool of warm dedicated
//! connections for leases.
//!
//! A backend has one [`Pools`] per identity its connections authenticate
//! as: the unauthenticated one and, in ACL passthrough, one per user (see
//! [`Pools::for_identity`]). They share the backend's node health and
//! metrics, never a connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::metrics::ProxyMetrics;
use super::{
    UpstreamError,
    dial::{Dialer, UpstreamAuth},
    health::Health,
    lease::Leased,
    upstream::Conn,
};
use crate::{fasthash::FnvHashMap, resp::Protocol};

#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// Shared connections per node and protocol.
    pub shared_per_node: usize,
    /// Idle leased connections kept per node and protocol.
    pub idle_leases_per_node: usize,
}

pub struct NodePool {
    pub addr: SocketAddr,
    protocol: Protocol,
    shared: Box<[Mutex<Option<Conn>>]>,
    next: AtomicUsize,
    idle: Mutex<Vec<Leased>>,
    max_idle: usize,
    dialer: Arc<Dialer>,
    metrics: Arc<ProxyMetrics>,
    health: Arc<Health>,
}

impl NodePool {
    /// A shared connection, round-robin; a dead one is replaced on the spot.
    pub fn conn(&self) -> Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shared.len();
        let mut slot = self.shared[i].lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(conn) if !conn.is_closed() => conn.clone(),
            _ => {
                let conn = Conn::spawn(
                    self.addr,
                    self.protocol,
                    Arc::clone(&self.dialer),
                    Arc::clone(&self.metrics),
                    Arc::clone(&self.health),
                );
                *slot = Some(conn.clone());
                conn
            }
        }
    }

    /// A dedicated connection: a warm idle one if any, else a new one.
    pub async fn lease(&self) -> Result<Leased, UpstreamError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut lease) = idle else {
                break;
            };
            if lease.is_reusable() {
                self.metrics.lease_reused();
                return Ok(lease);
            }
            self.metrics.upstream_closed(self.addr);
        }
        let lease = Leased::open(&self.dialer, self.addr, self.protocol).await;
        match &lease {
            Ok(_) => {
                self.metrics.upstream_opened(self.addr);
                self.health.connected(self.addr);
            }
            Err(_) => {
                self.metrics.upstream_connect_failed(self.addr);
                self.health.failed(self.addr);
            }
        }
        lease
    }

    /// Returns a lease; it is closed instead if it is not clean.
    pub fn release(&self, mut lease: Leased) {
        if lease.is_reusable() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.max_idle {
                idle.push(lease);
                return;
            }
        }
        self.metrics.upstream_closed(self.addr);
    }

    /// A lease that ends without being released (dropped, or handed to a
    /// pub/sub reader that finished).
    pub fn forget(&self) {
        self.metrics.upstream_closed(self.addr);
    }
}

pub struct Pools {
    nodes: RwLock<FnvHashMap<(SocketAddr, Protocol), Arc<NodePool>>>,
    dialer: Arc<Dialer>,
    metrics: Arc<ProxyMetrics>,
    health: Arc<Health>,
    config: PoolConfig,
    /// The same backend's pools for other identities, so that dropping a
    /// node that left the cluster reaches all of them.
    family: Arc<Mutex<Vec<Weak<Pools>>>>,
}

impl Pools {
    pub fn new(dialer: Dialer, metrics: Arc<ProxyMetrics>, config: PoolConfig) -> Self {
        Self {
            nodes: RwLock::new(FnvHashMap::default()),
            dialer: Arc::new(dialer),
            metrics,
            health: Arc::new(Health::default()),
            config,
            family: Arc::default(),
        }
    }

    /// Pools of the same backend whose connections authenticate as `auth`
    /// (none: no credentials at all), with their own connections.
    pub fn for_identity(&self, auth: Option<UpstreamAuth>) -> Arc<Self> {
        let pools = Arc::new(Self {
            nodes: RwLock::new(FnvHashMap::default()),
            dialer: Arc::new(Dialer {
                auth,
                ..(*self.dialer).clone()
            }),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            config: self.config,
            family: Arc::clone(&self.family),
        });
        let mut family = self.family.lock().unwrap_or_else(|e| e.into_inner());
        family.retain(|p| p.strong_count() > 0);
        family.push(Arc::downgrade(&pools));
        pools
    }

    pub fn is_down(&self, addr: SocketAddr) -> bool {
        self.health.is_down(addr)
    }

    pub fn dialer(&self) -> &Arc<Dialer> {
        &self.dialer
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    pub fn node(&self, addr: SocketAddr, protocol: Protocol) -> Arc<NodePool> {
        if let Some(pool) = self
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(addr, protocol))
        {
            return Arc::clone(pool);
        }
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(nodes.entry((addr, protocol)).or_insert_with(|| {
            Arc::new(NodePool {
                addr,
                protocol,
                shared: (0..self.config.shared_per_node.max(1))
                    .map(|_| Mutex::new(None))
                    .collect(),
                next: AtomicUsize::new(0),
                idle: Mutex::new(Vec::new()),
                max_idle: self.config.idle_leases_per_node,
                dialer: Arc::clone(&self.dialer),
                metrics: Arc::clone(&self.metrics),
                health: Arc::clone(&self.health),
            })
        }))
    }

    /// Drops pools of nodes no longer in the cluster, in every identity's
    /// pools of this backend.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.retain_own(live);
        let family: Vec<Arc<Self>> = self
            .family
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for pools in family
            .iter()
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), self))
        {
            pools.retain_own(live);
        }
    }

    fn retain_own(&self, live: &[SocketAddr]) {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(addr, _), _| live.contains(addr));
    }
}
