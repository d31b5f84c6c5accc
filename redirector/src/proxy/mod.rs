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
//!
//! Whose rights a client's commands carry depends on the backend's auth
//! mode. In passthrough, Redis checks a client's `AUTH` itself ([`login`])
//! and the session then runs over that user's own pools (a client that has
//! not authenticated, over pools without credentials); in proxy mode all
//! clients share the proxy's `--upstream-*` identity, and the planner
//! refuses `@admin`/`@dangerous` commands unless they are allowed.

pub mod acl;
pub mod admission;
pub mod buffers;
pub mod client_cmd;
pub mod clients;
pub mod clock;
pub mod dial;
pub mod discovery;
pub mod exec;
pub mod front;
pub mod functions;
pub mod gather;
pub mod health;
pub mod host;
pub mod host_upstream;
pub mod info;
pub mod jobs;
pub mod lease;
pub mod local;
pub mod login;
pub mod merge;
pub mod metrics;
pub mod monitor;
pub mod output_limit;
pub mod own_config;
pub mod plan;
pub mod pool;
pub mod pubsub;
pub mod relay;
pub mod script_keys;
pub mod session;
pub mod shards;
pub mod slowlog;
pub mod tracking;
pub mod txn;
pub mod upstream;
pub mod wakeup;

/// A command's arguments from words, for the tests of the units that
/// read argv.
#[cfg(test)]
pub(crate) fn test_args(words: &[&str]) -> Vec<bytes::Bytes> {
    words
        .iter()
        .map(|w| bytes::Bytes::copy_from_slice(w.as_bytes()))
        .collect()
}

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    cluster::{commands::CommandTable, topology::Topology},
    resp::request::Limits,
};
use admission::Refusal;
pub use dial::{Dialer, UpstreamAuth};
use metrics::ProxyMetrics;
use pool::Pools;
use shards::{CounterShard, ShardedCounter};

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

/// Whose credentials a backend's clients use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// The backend checks each client's own AUTH; the client is served
    /// over connections authenticated as its own user.
    #[default]
    Passthrough,
    /// The proxy checks clients against its own `--auth-*` users and uses
    /// its `--upstream-*` credentials; `@admin`/`@dangerous` commands are
    /// refused unless allowed.
    Proxy,
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

    /// Passwords compare in constant time; user names are not secret.
    pub fn check(&self, user: Option<&[u8]>, password: &[u8]) -> bool {
        match user {
            None | Some(b"default") => self
                .password
                .as_ref()
                .is_some_and(|p| acl::same_secret(password, p.as_bytes())),
            Some(user) => self
                .users
                .iter()
                .any(|(u, p)| u.as_bytes() == user && acl::same_secret(password, p.as_bytes())),
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
    /// `client-output-buffer-limit` at start (CONFIG SET changes the
    /// backend's live copy, [`BackendCommon::output_limits`]).
    pub output_limits: output_limit::OutputLimits,
    pub read_policy: ReadPolicy,
    pub auth: DownstreamAuth,
    pub auth_mode: AuthMode,
    /// Proxy mode only: clients may run `@admin`/`@dangerous` commands.
    pub allow_admin_commands: bool,
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
            output_limits: output_limit::OutputLimits::default(),
            read_policy: ReadPolicy::Master,
            auth: DownstreamAuth::default(),
            auth_mode: AuthMode::Passthrough,
            allow_admin_commands: false,
            max_redirects: 5,
            retry_window: Duration::from_secs(5),
        }
    }
}

/// What a session reaches its backend through: the backend itself (its
/// topology, command table, clients, statistics: [`BackendCore`], which
/// this derefs to) and the pools of the identity the session's commands
/// run as. Every client of one identity shares its pools; in ACL
/// passthrough each user is an identity of its own (see
/// [`Shared::as_user`]), so different users never share a connection.
pub struct Shared {
    pub pools: Arc<Pools>,
    core: Arc<BackendCore>,
}

impl std::ops::Deref for Shared {
    type Target = BackendCore;

    fn deref(&self) -> &BackendCore {
        &self.core
    }
}

/// State every session of a backend shares on one worker, whoever it runs
/// as; what every worker's sessions share is in [`BackendCommon`], which
/// this derefs to.
pub struct BackendCore {
    pub settings: Settings,
    /// This worker's copy of the slot map (see [`Topology::follower`]).
    pub topology: Arc<Topology>,
    pub commands: CommandTable,
    /// This worker's shard of the backend's series.
    pub metrics: Arc<ProxyMetrics>,
    /// Version of the Redis servers behind the proxy, for HELLO and INFO.
    pub redis_version: String,
    /// The proxy's own identity (its `--upstream-*` credentials), for
    /// questions a client's user may not ask Redis itself (ACL DRYRUN).
    pub control: Arc<Dialer>,
    /// The users' pools (ACL passthrough), kept while they have clients.
    users: Arc<Mutex<acl::Lingering<acl::Fingerprint, Pools>>>,
    /// This worker's shards of the INFO counters.
    total_connections: CounterShard,
    rejected_connections: CounterShard,
    total_commands: CounterShard,
    round_robin: AtomicUsize,
    common: Arc<BackendCommon>,
}

impl std::ops::Deref for BackendCore {
    type Target = BackendCommon;

    fn deref(&self) -> &BackendCommon {
        &self.common
    }
}

/// What a backend's sessions share across workers, as one Redis would show
/// it: the clients (CLIENT LIST/KILL/PAUSE, MONITOR), the slow log, login
/// checks, client ids and INFO's counters. None of it is locked per
/// request: the counters are sharded, the rest is touched per connection,
/// per login, or when something is slow or monitored.
pub struct BackendCommon {
    pub started: Instant,
    /// Every client, as CLIENT LIST and INFO show them.
    pub clients: clients::Clients,
    /// Which functions write nothing (CLIENT PAUSE WRITE lets them run).
    pub functions: functions::FunctionFlags,
    /// SLOWLOG of this proxy's clients.
    pub slowlog: slowlog::SlowLog,
    /// ACL passthrough: recent checks and failures.
    pub logins: Logins,
    /// What clients may be owed before they are dropped, on every worker.
    pub output_limits: output_limit::LiveLimits,
    /// Error replies the proxy gave itself, by error code (INFO
    /// errorstats adds them to the nodes').
    local_errors: Mutex<std::collections::BTreeMap<String, u64>>,
    next_client_id: AtomicU64,
    total_connections: ShardedCounter,
    rejected_connections: ShardedCounter,
    total_commands: ShardedCounter,
}

impl BackendCommon {
    /// For a backend served by `workers` workers, its clients held to
    /// `output_limits` until a CONFIG SET changes them.
    pub fn new(workers: usize, output_limits: output_limit::OutputLimits) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            clients: clients::Clients::default(),
            functions: functions::FunctionFlags::default(),
            slowlog: slowlog::SlowLog::default(),
            logins: Logins::default(),
            output_limits: output_limit::LiveLimits::new(output_limits),
            local_errors: Mutex::new(std::collections::BTreeMap::new()),
            next_client_id: AtomicU64::new(1),
            total_connections: ShardedCounter::new(workers),
            rejected_connections: ShardedCounter::new(workers),
            total_commands: ShardedCounter::new(workers),
        })
    }
}

/// Password checks of one backend (see [`acl`]).
#[derive(Default)]
pub struct Logins {
    checks: Mutex<acl::Checks>,
    failures: Mutex<acl::Limiter>,
}

impl Logins {
    /// How long an AUTH from `ip` waits before it is checked.
    pub fn delay(&self, ip: std::net::IpAddr) -> Duration {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delay(ip, Instant::now())
    }

    pub fn failed(&self, ip: std::net::IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed(ip, Instant::now());
    }

    pub fn is_fresh(&self, user: &[u8], password: &[u8]) -> bool {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_fresh(user, password, Instant::now())
    }

    /// Passwords may have changed: every login asks Redis again.
    pub fn forget_checks(&self) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn remember(&self, user: &[u8], fingerprint: acl::Fingerprint) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(user, fingerprint, Instant::now());
    }
}

/// A session's turn, in requests: it parses at most this many of a
/// client's commands before the worker's other clients get a turn (a long
/// pipeline the proxy answers itself, PING, must not hold the thread), and
/// its inbox wakes it once this many replies are ready in a row even while
/// more are owed (a client that streams its commands gets replies a turn's
/// worth at a time, not only when its pipeline runs dry).
const TURN: usize = 128;

/// How often idle users' pools are looked at.
const USERS_SWEEP: Duration = Duration::from_secs(1);

/// What one worker serves a backend with, besides what all workers share.
pub struct WorkerParts {
    pub settings: Settings,
    /// The worker's own copy (a follower, past the first worker).
    pub topology: Arc<Topology>,
    pub pools: Pools,
    pub commands: CommandTable,
    /// The worker's shard of the backend's series.
    pub metrics: Arc<ProxyMetrics>,
    pub redis_version: String,
}

impl Shared {
    /// A backend served by one worker.
    pub fn new(
        settings: Settings,
        topology: Arc<Topology>,
        pools: Pools,
        commands: CommandTable,
        metrics: Arc<ProxyMetrics>,
        redis_version: String,
    ) -> Self {
        Self::on_worker(
            BackendCommon::new(1, settings.output_limits),
            WorkerParts {
                settings,
                topology,
                pools,
                commands,
                metrics,
                redis_version,
            },
        )
    }

    /// The backend on one worker (the metrics' worker), sharing `common`
    /// with the others.
    pub fn on_worker(common: Arc<BackendCommon>, parts: WorkerParts) -> Self {
        let WorkerParts {
            settings,
            topology,
            pools,
            mut commands,
            metrics,
            redis_version,
        } = parts;
        commands.mark_plain(plan::is_plain);
        let worker = metrics.worker();
        let control = Arc::clone(pools.dialer());
        // In passthrough a client that has not authenticated is served
        // without credentials: it never gets the proxy's own rights.
        let pools = match settings.auth_mode {
            AuthMode::Passthrough => pools.for_identity(None),
            AuthMode::Proxy => Arc::new(pools),
        };
        Self {
            pools,
            core: Arc::new(BackendCore {
                settings,
                topology,
                commands,
                metrics,
                redis_version,
                control,
                users: Arc::new(Mutex::new(acl::Lingering::new(acl::CHECK_TTL))),
                total_connections: common.total_connections.shard(worker),
                rejected_connections: common.rejected_connections.shard(worker),
                total_commands: common.total_commands.shard(worker),
                round_robin: AtomicUsize::new(0),
                common,
            }),
        }
    }

    /// This backend as `user` (ACL passthrough, after Redis accepted the
    /// password `fingerprint` was made of): that user's pools, made with
    /// `auth` if the user has none yet. They, and the password they hold
    /// to open connections, go some seconds after the user's last client.
    pub fn as_user(&self, fingerprint: acl::Fingerprint, auth: UpstreamAuth) -> Arc<Self> {
        let (pools, first) = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let first = users.is_empty();
            let pools =
                users.get_or_insert_with(fingerprint, || self.pools.for_identity(Some(auth)));
            (pools, first)
        };
        if first {
            let users = Arc::clone(&self.users);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(USERS_SWEEP).await;
                    let mut users = users.lock().unwrap_or_else(|e| e.into_inner());
                    if users.sweep(Instant::now()) == 0 {
                        return;
                    }
                }
            });
        }
        Arc::new(Self {
            pools,
            core: Arc::clone(&self.core),
        })
    }

    /// Whether both run as the same identity (share pools).
    pub fn same_identity(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.pools, &other.pools)
    }

    /// Registers an admitted client of this backend.
    pub fn register_client(
        self: &Arc<Self>,
        place: front::Place,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> ClientSlot {
        self.metrics.client_opened();
        self.core.total_connections.inc();
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let entry = self.clients.register(id, peer, local);
        ClientSlot {
            shared: Arc::clone(self),
            _place: place,
            entry,
        }
    }
}

impl BackendCore {
    /// This backend's client connections.
    pub fn connected_clients(&self) -> usize {
        usize::try_from(self.metrics.clients_active()).unwrap_or(0)
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

    /// CONFIG RESETSTAT: the proxy's own statistics too, on every worker.
    pub fn reset_stats(&self) {
        self.local_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.common.total_commands.reset();
        self.common.total_connections.reset();
    }

    /// A client of this backend refused at the door.
    pub fn count_refused(&self, refusal: &Refusal) {
        self.metrics.client_rejected(refusal.reason());
        self.rejected_connections.inc();
    }

    /// Every worker's, as INFO shows them.
    pub fn total_connections(&self) -> u64 {
        self.total_connections.total()
    }

    pub fn rejected_connections(&self) -> u64 {
        self.rejected_connections.total()
    }

    pub fn total_commands(&self) -> u64 {
        self.total_commands.total()
    }

    /// Called by the worker's own sessions only (`inc_as_owner`).
    pub fn count_command(&self) {
        self.total_commands.inc_as_owner();
    }

    /// A rotating index, for spreading keyless commands and replica reads.
    pub fn next_index(&self) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }
}

/// Holds a client's place in the node's admission tally and its entry in
/// its backend's registry (and connection metrics) until dropped.
pub struct ClientSlot {
    shared: Arc<Shared>,
    _place: front::Place,
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
        self.shared.clients.unregister(self.entry.id);
        self.shared.metrics.client_closed();
        tracing::debug!("client closed");
    }
}
