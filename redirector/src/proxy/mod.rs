//! The node proxy: a Redis Cluster proxy that steered (or direct) clients
//! talk to as if it were one Redis server.
//!
//! ```text
//! listener ─▶ session (one task per client; parses, plans, keeps reply order)
//!               │ plan::plan(command table + tips, request, session state) → Plan
//!               │ single-slot commands ─▶ pool: shared multiplexed conns per node ─▶ Redis
//!               │ MGET/MSET/DEL/... split per slot, fan-outs (merge, info), SCAN ─▶ exec (tasks)
//!               │ MULTI/EXEC, WATCH, blocking commands ─▶ leased conns (warm pool)
//!               │ SUBSCRIBE/PSUBSCRIBE/SSUBSCRIBE ─▶ pubsub actor (leased conns)
//!               │ CLIENT TRACKING ─▶ tracking: private conns to every shard
//!               └ HELLO, CLIENT, CLUSTER SLOTS, SLOWLOG, MONITOR, ... answered locally
//! ```

pub mod admission;
pub mod client_cmd;
pub mod clients;
pub mod dial;
pub mod discovery;
pub mod exec;
pub mod functions;
pub mod health;
pub mod info;
pub mod lease;
pub mod local;
pub mod merge;
pub mod metrics;
pub mod monitor;
pub mod own_config;
pub mod plan;
pub mod pool;
pub mod pubsub;
pub mod script_keys;
pub mod session;
pub mod slowlog;
pub mod tracking;
pub mod txn;
pub mod upstream;

use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::Notify};
use tracing::{Instrument as _, debug_span};

use crate::{
    cluster::{commands::CommandTable, topology::Topology},
    resp::request::Limits,
    steering::{OrigDstTable, orig_dst_addr},
};
use admission::{Origin, Refusal, Tally};
pub use dial::{Dialer, UpstreamAuth};
use metrics::ProxyMetrics;
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

    /// Whether `user` is a user clients may log in as.
    pub fn has_user(&self, user: &str) -> bool {
        user == "default" || self.users.iter().any(|(u, _)| u == user)
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
    /// Who may connect, and how many connections each may hold.
    pub admission: admission::Policy,
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
            admission: admission::Policy::default(),
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
    pub metrics: Arc<ProxyMetrics>,
    pub orig_dst: Option<OrigDstTable>,
    /// Version of the Redis servers behind the proxy, for HELLO and INFO.
    pub redis_version: String,
    pub started: Instant,
    /// Connections held, in total and per origin (admission quotas).
    tally: Mutex<Tally>,
    /// Every client, as CLIENT LIST and INFO show them.
    pub clients: clients::Clients,
    /// Which functions write nothing (CLIENT PAUSE WRITE lets them run).
    pub functions: functions::FunctionFlags,
    /// SLOWLOG of this proxy's clients.
    pub slowlog: slowlog::SlowLog,
    /// Error replies the proxy gave itself, by error code (INFO
    /// errorstats adds them to the nodes').
    local_errors: Mutex<std::collections::BTreeMap<String, u64>>,
    /// At the node-wide limit: the kernel should send new connects direct.
    full: AtomicBool,
    /// Woken when `full` flips, so the flag reaches the kernel at once.
    pub full_changed: Notify,
    /// The heartbeat's own probe connection, admitted without being steered.
    probe_peer: Mutex<Option<SocketAddr>>,
    next_client_id: AtomicU64,
    total_connections: AtomicU64,
    rejected_connections: AtomicU64,
    total_commands: AtomicU64,
    round_robin: AtomicUsize,
}

impl Shared {
    pub fn new(
        settings: Settings,
        topology: Arc<Topology>,
        pools: Pools,
        commands: CommandTable,
        metrics: Arc<ProxyMetrics>,
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
            tally: Mutex::new(Tally::default()),
            clients: clients::Clients::default(),
            functions: functions::FunctionFlags::default(),
            slowlog: slowlog::SlowLog::default(),
            local_errors: Mutex::new(std::collections::BTreeMap::new()),
            full: AtomicBool::new(false),
            full_changed: Notify::new(),
            probe_peer: Mutex::new(None),
            next_client_id: AtomicU64::new(1),
            total_connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            total_commands: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
        }
    }

    pub fn connected_clients(&self) -> usize {
        self.tally().total()
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an error reply the proxy gave without asking a node (its
    /// code: the first word, as Redis's errorstats).
    pub fn count_local_error(&self, raw: &[u8]) {
        let Some(message) = raw.strip_prefix(b"-") else {
            return;
        };
        let code = message
            .split(|&b| b == b' ' || b == b'\r')
            .next()
            .unwrap_or_default();
        let code = String::from_utf8_lossy(code).into_owned();
        *self
            .local_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    pub fn local_errors(&self) -> std::collections::BTreeMap<String, u64> {
        self.local_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// CONFIG RESETSTAT: the proxy's own statistics too.
    pub fn reset_stats(&self) {
        self.local_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.total_commands.store(0, Ordering::Relaxed);
        self.total_connections.store(0, Ordering::Relaxed);
    }

    /// Whether the proxy is at its node-wide client limit (the kernel then
    /// sends new connects direct).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The local address of the heartbeat's probe connection, so that the
    /// accept path serves it without an original destination.
    pub fn set_probe_peer(&self, peer: Option<SocketAddr>) {
        *self.probe_peer.lock().unwrap_or_else(|e| e.into_inner()) = peer;
    }

    fn is_probe(&self, peer: SocketAddr) -> bool {
        *self.probe_peer.lock().unwrap_or_else(|e| e.into_inner()) == Some(peer)
    }

    /// Admits a connection from `origin` (or says why not), holding its
    /// place until the returned slot drops.
    fn admit(
        self: &Arc<Self>,
        origin: Origin,
        probe: bool,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ClientSlot, Refusal> {
        let mut tally = self.tally();
        if !probe {
            admission::decide(&self.settings.admission, &tally, origin)?;
        }
        tally.add(origin);
        self.update_full(&tally);
        // The heartbeat's probe is not a client anyone should see in the
        // connection figures (it comes every heartbeat).
        if !probe {
            self.metrics.client_opened();
        }
        drop(tally);
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let entry = if probe {
            clients::Clients::unlisted(id, peer, local)
        } else {
            self.clients.register(id, peer, local)
        };
        Ok(ClientSlot {
            shared: Arc::clone(self),
            origin,
            counted: !probe,
            entry,
        })
    }

    fn update_full(&self, tally: &Tally) {
        let was = self.full.load(Ordering::Relaxed);
        let now = admission::node_full(&self.settings.admission, tally.total(), was);
        if now != was {
            self.full.store(now, Ordering::Relaxed);
            self.full_changed.notify_one();
        }
    }

    pub fn total_connections(&self) -> u64 {
        self.total_connections.load(Ordering::Relaxed)
    }

    pub fn rejected_connections(&self) -> u64 {
        self.rejected_connections.load(Ordering::Relaxed)
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

/// The proxy's listeners, bound: connections wait in their backlog until
/// [`Proxy::serve`] runs.
pub struct Proxy {
    listeners: Vec<TcpListener>,
}

impl Proxy {
    /// Binds every listener now, so a bind error surfaces before the daemon
    /// reports itself ready (and before the heartbeat turns steering on).
    pub fn bind(addrs: &[SocketAddr]) -> Result<Self, Error> {
        let listeners = addrs
            .iter()
            .map(|&addr| {
                // The socket is created non-blocking, as tokio requires.
                let bind = || TcpListener::from_std(listener_socket(addr)?);
                bind().map_err(|source| Error::Bind { addr, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { listeners })
    }

    /// The listening sockets, with their addresses, for `rdr_listener`.
    pub fn sockets(&self) -> impl Iterator<Item = (SocketAddr, &TcpListener)> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok().map(|addr| (addr, l)))
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until the task is dropped.
    pub async fn serve(self, shared: Arc<Shared>) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.listeners {
            tasks.spawn(accept_loop(listener, Arc::clone(&shared)));
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
        let local = bound.or_else(|| client.local_addr().ok()).unwrap_or(peer);
        // Taken here, once: the entry is the proof that the kernel steered
        // this connection from an enrolled pod.
        let steered = shared
            .orig_dst
            .as_ref()
            .and_then(|table| table.take(peer, local));
        let origin = match &steered {
            Some(orig) => Origin::Steered {
                pod: orig.netns_cookie,
            },
            None => Origin::Direct { source: peer.ip() },
        };
        let probe = steered.is_none() && shared.is_probe(peer);
        let slot = match shared.admit(origin, probe, peer, local) {
            Ok(slot) => slot,
            Err(refusal) => {
                shared.metrics.client_rejected(refusal.reason());
                shared.rejected_connections.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, reason = refusal.reason(), "client refused");
                tokio::spawn(refuse(client, refusal));
                continue;
            }
        };
        let id = slot.entry.id;
        let span = debug_span!("client", id, %peer);
        // A steered client believes it talks to the address it dialled.
        let advertised = steered.as_ref().map_or(local, orig_dst_addr);
        let session = session::serve(
            Arc::clone(&shared),
            client,
            session::Addresses {
                peer,
                local,
                advertised,
            },
            id,
            slot,
        );
        tokio::spawn(session.instrument(span));
    }
}

/// Tells a refused client why, as Redis does, and closes.
async fn refuse(mut client: tokio::net::TcpStream, refusal: Refusal) {
    let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(refusal.reply())).await;
}

/// Holds a client's place in the admission tally (and the connection
/// metrics) until dropped.
pub struct ClientSlot {
    shared: Arc<Shared>,
    origin: Origin,
    counted: bool,
    entry: Arc<clients::ClientEntry>,
}

impl ClientSlot {
    /// The client's entry in the registry.
    pub fn entry(&self) -> &Arc<clients::ClientEntry> {
        &self.entry
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if self.counted {
            self.shared.clients.unregister(self.entry.id);
        }
        let mut tally = self.shared.tally();
        tally.remove(self.origin);
        self.shared.update_full(&tally);
        drop(tally);
        if self.counted {
            self.shared.metrics.client_closed();
        }
    }
}

/// The heartbeat's liveness probe: one connection through the proxy's own
/// listener and accept path, answered by a session. A proxy whose accept
/// loop or sessions no longer run fails it, and then stops beating, so the
/// kernel sends connects direct. `shared` learns the probe's address first,
/// so the accept path admits it without an original destination.
pub async fn probe(shared: &Shared, listener: SocketAddr, timeout: Duration) -> io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    // A wildcard listener (no steering) is reached on loopback.
    let listener = match listener.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, listener.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listener.port()))
        }
        _ => listener,
    };
    let exchange = async {
        let socket = match listener {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(listener.ip(), 0))?;
        shared.set_probe_peer(Some(socket.local_addr()?));
        let mut stream = socket.connect(listener).await?;
        // ECHO, which the session answers itself: PING reaches every
        // master, and the proxy's liveness must not hang on a busy or
        // unreachable Redis.
        stream
            .write_all(b"*2\r\n$4\r\nECHO\r\n$5\r\nprobe\r\n")
            .await?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await?;
        // Any reply proves a session ran (NOAUTH too, with client auth on).
        match reply[..n].first() {
            Some(b'$' | b'-') => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no RESP reply to the probe's ECHO",
            )),
        }
    };
    let result = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")));
    shared.set_probe_peer(None);
    result
}
