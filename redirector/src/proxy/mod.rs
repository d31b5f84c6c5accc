//! The node proxy: a Redis Cluster proxy that steered (or direct) clients
//! talk to as if it were one Redis server.
//!
//! ```text
//! listener ─▶ session (one task per client; parses, routes, keeps reply order)
//!               │ single-slot commands ─▶ pool: shared multiplexed conns per node ─▶ Redis
//!               │ MGET/MSET/DEL/... split per slot, fan-outs, SCAN ─▶ exec (tasks)
//!               │ MULTI/EXEC, WATCH, blocking commands ─▶ leased conns (warm pool)
//!               │ SUBSCRIBE/PSUBSCRIBE/SSUBSCRIBE ─▶ pubsub actor (leased conns)
//!               └ PING, HELLO, INFO, CLUSTER SLOTS, ... answered locally
//! ```

pub mod dial;
pub mod discovery;
pub mod exec;
pub mod lease;
pub mod local;
pub mod pool;
pub mod pubsub;
pub mod session;
pub mod txn;
pub mod upstream;

use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tracing::{Instrument as _, debug_span};

use crate::{
    cluster::{commands::CommandTable, topology::Topology},
    metrics::Metrics,
    resp::request::Limits,
    steering::OrigDstTable,
};
pub use dial::{Dialer, UpstreamAuth};
use pool::Pools;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Why a command could not be completed upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("handshake with {0} failed: {1}")]
    Handshake(SocketAddr, String),
    #[error("malformed reply from {0}: {1}")]
    Protocol(SocketAddr, String),
    #[error("connection to {0} failed before the command was sent: {1}")]
    NotSent(SocketAddr, String),
    #[error("connection to {0} lost while awaiting the reply: {1}")]
    Lost(SocketAddr, String),
}

impl UpstreamError {
    /// Whether the command may have reached Redis (and run).
    pub fn maybe_ran(&self) -> bool {
        matches!(self, Self::Lost(..) | Self::Protocol(..))
    }
}

/// Where reads may go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadPolicy {
    /// Everything to masters.
    #[default]
    Master,
    /// Masters; replicas while the master is unreachable.
    PreferMaster,
    /// Reads only from replicas (error when a shard has none).
    Replica,
    /// Replicas when the shard has one, else the master.
    PreferReplica,
    /// Any node of the shard, round-robin.
    Any,
}

/// Downstream authentication, as Redis' `requirepass` and ACL users.
#[derive(Clone, Debug, Default)]
pub struct DownstreamAuth {
    /// Password of the `default` user (`AUTH <password>`).
    pub password: Option<String>,
    /// Further users (`AUTH <user> <password>`).
    pub users: Vec<(String, String)>,
}

impl DownstreamAuth {
    pub fn required(&self) -> bool {
        self.password.is_some() || !self.users.is_empty()
    }

    pub fn check(&self, user: Option<&[u8]>, password: &[u8]) -> bool {
        match user {
            None | Some(b"default") => self
                .password
                .as_ref()
                .is_some_and(|p| p.as_bytes() == password),
            Some(user) => self
                .users
                .iter()
                .any(|(u, p)| u.as_bytes() == user && p.as_bytes() == password),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub limits: Limits,
    pub max_clients: usize,
    /// Close clients idle this long (none: never). Subscribers and blocked
    /// clients are not idle.
    pub idle_timeout: Option<Duration>,
    /// Replies a client may have outstanding before the proxy stops reading
    /// from it (backpressure, not an error).
    pub max_pipeline: usize,
    pub read_policy: ReadPolicy,
    pub auth: DownstreamAuth,
    pub max_redirects: u32,
    /// How long to keep retrying a command through failovers and
    /// `TRYAGAIN`/`CLUSTERDOWN` before answering with an error.
    pub retry_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_clients: 10_000,
            idle_timeout: None,
            max_pipeline: 1024,
            read_policy: ReadPolicy::Master,
            auth: DownstreamAuth::default(),
            max_redirects: 5,
            retry_window: Duration::from_secs(5),
        }
    }
}

/// State every session shares.
pub struct Shared {
    pub settings: Settings,
    pub topology: Arc<Topology>,
    pub pools: Pools,
    pub commands: CommandTable,
    pub metrics: Arc<Metrics>,
    pub orig_dst: Option<OrigDstTable>,
    /// Version of the Redis servers behind the proxy, for HELLO and INFO.
    pub redis_version: String,
    pub started: Instant,
    clients: AtomicUsize,
    next_client_id: AtomicU64,
    total_connections: AtomicU64,
    total_commands: AtomicU64,
    round_robin: AtomicUsize,
}

impl Shared {
    pub fn new(
        settings: Settings,
        topology: Arc<Topology>,
        pools: Pools,
        commands: CommandTable,
        metrics: Arc<Metrics>,
        orig_dst: Option<OrigDstTable>,
        redis_version: String,
    ) -> Self {
        Self {
            settings,
            topology,
            pools,
            commands,
            metrics,
            orig_dst,
            redis_version,
            started: Instant::now(),
            clients: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
            total_connections: AtomicU64::new(0),
            total_commands: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
        }
    }

    pub fn connected_clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn total_connections(&self) -> u64 {
        self.total_connections.load(Ordering::Relaxed)
    }

    pub fn total_commands(&self) -> u64 {
        self.total_commands.load(Ordering::Relaxed)
    }

    pub fn count_command(&self) {
        self.total_commands.fetch_add(1, Ordering::Relaxed);
    }

    /// A rotating index, for spreading keyless commands and replica reads.
    pub fn next_index(&self) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct Proxy {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds every listener now, so a bind error surfaces before the daemon
    /// reports itself ready (and before the heartbeat turns steering on).
    pub fn bind(addrs: &[SocketAddr], shared: Arc<Shared>) -> Result<Self, Error> {
        let listeners = addrs
            .iter()
            .map(|&addr| {
                // The socket is created non-blocking, as tokio requires.
                let bind = || TcpListener::from_std(listener_socket(addr)?);
                bind().map_err(|source| Error::Bind { addr, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { listeners, shared })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until the task is dropped.
    pub async fn serve(self) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.listeners {
            tasks.spawn(accept_loop(listener, Arc::clone(&self.shared)));
        }
        while tasks.join_next().await.is_some() {}
    }
}

fn listener_socket(addr: SocketAddr) -> io::Result<StdTcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    // The node address may not be up yet when the daemon starts.
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    // Accepted sockets inherit it: one syscall here instead of one per client.
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(StdTcpListener::from(fd))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // A listener on a specific address accepts only connections to that
    // address: no getsockname per client then.
    let bound = listener
        .local_addr()
        .ok()
        .filter(|addr| !addr.ip().is_unspecified());
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.total_connections.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
        let clients = shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = ClientSlot(Arc::clone(&shared));
        if clients > shared.settings.max_clients {
            shared.metrics.client_rejected();
            tokio::spawn(session::reject(client, guard));
            continue;
        }
        shared.metrics.client_opened();
        let span = debug_span!("client", id, %peer);
        let local = bound.or_else(|| client.local_addr().ok()).unwrap_or(peer);
        let session = session::serve(Arc::clone(&shared), client, peer, local, id, guard);
        tokio::spawn(session.instrument(span));
    }
}

/// Holds a client's place in the client count until dropped.
pub struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
