//! The backends a daemon serves, each on its own: brought up (discovered,
//! retried while unreachable), kept (its topology refresher), and, when
//! its declaration goes away or changes kind, drained then dropped.
//!
//! Each Redis backend has its own topology, pools, leases, command table,
//! settings and metrics series (`backend="NAME"`): two backends never share
//! an upstream connection or a cached topology. The kernel's target map
//! carries each target's backend id, a hash of the backend's name
//! ([`backend_id`]): during an upgrade two daemons serve the node at once
//! and both write that map, so they must agree on every id without talking
//! to each other. A connection lands on whatever backend serves that name
//! now (a removed one's connections are relayed to where they were going).
//!
//! With several workers, each backend is discovered and refreshed once (on
//! the control runtime), and served on every worker by a copy of its own:
//! pools, leases and metric shards per worker, a follower of the slot map,
//! and, shared, what one Redis shows all its clients ([`BackendCommon`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::AbortHandle;
use tracing::{Instrument as _, info, info_span, warn};

use crate::{
    backend::{Declared, Kind},
    cluster::topology::Topology,
    proxy::{
        BackendCommon, Dialer, Settings, Shared, WorkerParts, discovery,
        front::Route,
        metrics::{ProxyFamilies, ProxyMetrics},
        pool::{PoolConfig, Pools},
        relay::TcpBackend,
    },
    steering::TargetSpec,
    workers::Worker,
};

/// How often an unreachable backend is tried again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(1);
/// Topology refreshes never come closer than this, however many MOVEDs.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);
/// How often a draining backend is checked for clients left.
const DRAIN_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
#[error("backend `{name}` ({kind} {addrs}) did not answer within {waited:?}: {reason}")]
pub struct NotUp {
    pub name: String,
    pub kind: &'static str,
    pub addrs: String,
    pub waited: Duration,
    pub reason: String,
}

/// What every backend starts from: the daemon's flags.
#[derive(Clone)]
pub struct Defaults {
    pub settings: Settings,
    pub pool: PoolConfig,
    /// Socket mark, timeouts, the mesh and the proxy's upstream credentials.
    pub dialer: Dialer,
    pub refresh_interval: Duration,
}

/// One backend's life.
struct Running {
    /// The kernel's id (shared with a replacement under the same name).
    id: u32,
    /// This daemon's own, never shared: which `Running` a drain is for.
    serial: u64,
    declared: Declared,
    health: Arc<BackendHealth>,
    /// One per worker, each recording into that worker's shards.
    metrics: Vec<Arc<ProxyMetrics>>,
    task: AbortHandle,
    draining: bool,
}

impl Running {
    /// Its clients, on every worker.
    fn clients(&self) -> i64 {
        self.metrics.first().map_or(0, |m| m.clients_active())
    }
}

#[derive(Default)]
struct BackendHealth {
    up: AtomicBool,
    /// Why it is not up (the last discovery error).
    last_error: Mutex<Option<String>>,
    topology: Mutex<Option<Arc<Topology>>>,
    /// Its clients registry, once up (Redis backends only).
    common: Mutex<Option<Arc<BackendCommon>>>,
}

impl BackendHealth {
    fn failed(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

pub struct Serving {
    workers: Vec<Worker>,
    families: ProxyFamilies,
    defaults: Defaults,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_serial: u64,
    running: Vec<Running>,
    /// Metrics of replaced backends whose name lives on: their series are
    /// dropped with the last backend of that name.
    retired: Vec<Vec<Arc<ProxyMetrics>>>,
}

impl Serving {
    /// `workers`: where backends are served (at least one).
    pub fn new(workers: Vec<Worker>, families: ProxyFamilies, defaults: Defaults) -> Arc<Self> {
        assert!(!workers.is_empty(), "a proxy has at least one worker");
        Arc::new(Self {
            workers,
            families,
            defaults,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the served backends exactly `wanted` (validated): new ones
    /// start, changed ones are replaced, removed ones drain. Returns the
    /// kernel's target map: each target with its backend's id.
    pub fn apply(self: &Arc<Self>, wanted: &[Declared]) -> Vec<(TargetSpec, u32)> {
        let mut state = self.state();
        let mut targets = Vec::new();
        let mut keep = Vec::new();
        for declared in wanted {
            let current = state
                .running
                .iter_mut()
                .find(|r| !r.draining && r.declared.spec.name == declared.spec.name);
            let (id, serial) = match current {
                Some(running) if same_backend(&running.declared, declared) => {
                    // Seeds follow the Services; the cluster stays.
                    if let (Kind::Cluster { seeds }, Some(topology)) = (
                        &declared.spec.kind,
                        running
                            .health
                            .topology
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_ref(),
                    ) && *seeds != topology.seeds()
                    {
                        info!(backend = %declared.spec.name, ?seeds, "cluster seeds changed");
                        topology.set_seeds(seeds.clone());
                    }
                    running.declared = declared.clone();
                    (running.id, running.serial)
                }
                _ => {
                    let taken: Vec<u32> = state
                        .running
                        .iter()
                        .filter(|r| !r.draining && r.declared.spec.name != declared.spec.name)
                        .map(|r| r.id)
                        .collect();
                    let id = backend_id(&declared.spec.name, &taken);
                    let serial = state.next_serial;
                    state.next_serial += 1;
                    let running = self.start(id, serial, declared.clone());
                    state.running.push(running);
                    (id, serial)
                }
            };
            keep.push(serial);
            targets.extend(declared.targets.iter().map(|t| (*t, id)));
        }
        let direct = wanted.first().and_then(|first| {
            state
                .running
                .iter()
                .find(|r| !r.draining && r.declared.spec.name == first.spec.name)
                .map(|r| r.id)
        });
        let mut gone = Vec::new();
        for running in &mut state.running {
            if !running.draining && !keep.contains(&running.serial) {
                running.draining = true;
                gone.push((running.id, running.serial));
                // Not up: no client to drain, and its discovery must not
                // route the id a replacement now owns.
                if !running.health.up.load(Ordering::Relaxed) {
                    running.task.abort();
                }
                info!(backend = %running.declared.spec.name, "backend removed: draining its clients");
            }
        }
        drop(state);
        for worker in &self.workers {
            worker.front.update(|routes| {
                routes.direct = direct;
                for (id, _) in &gone {
                    routes.by_id.remove(id);
                }
            });
        }
        for (_, serial) in gone {
            tokio::spawn(Arc::clone(self).drain(serial));
        }
        targets
    }

    fn start(self: &Arc<Self>, id: u32, serial: u64, declared: Declared) -> Running {
        let metrics: Vec<_> = self
            .workers
            .iter()
            .map(|w| Arc::new(self.families.backend_on(&declared.spec.name, w.index)))
            .collect();
        let health = Arc::new(BackendHealth::default());
        let span = info_span!("backend", backend = %declared.spec.name);
        let task = tokio::spawn(
            Arc::clone(self)
                .bring_up(id, declared.clone(), metrics.clone(), Arc::clone(&health))
                .instrument(span),
        )
        .abort_handle();
        info!(backend = %declared.spec.name, kind = declared.spec.kind.name(), id, "backend declared");
        Running {
            id,
            serial,
            declared,
            health,
            metrics,
            task,
            draining: false,
        }
    }

    /// Discovers the backend (retrying while it does not answer), routes
    /// its connections, and keeps its topology fresh.
    async fn bring_up(
        self: Arc<Self>,
        id: u32,
        declared: Declared,
        per_worker: Vec<Arc<ProxyMetrics>>,
        health: Arc<BackendHealth>,
    ) {
        // Discovery and refreshes record as the first worker.
        let metrics = Arc::clone(&per_worker[0]);
        let mut dialer = self.defaults.dialer.clone();
        dialer.cluster = matches!(declared.spec.kind, Kind::Cluster { .. });
        let options = &declared.options;
        if let Some(path) = &options.upstream_password_file {
            // Read once, at start: a rotated Secret takes a restart (or a
            // ConfigMap edit that re-declares the backend).
            match std::fs::read_to_string(path) {
                Ok(password) => {
                    dialer.auth = Some(crate::proxy::UpstreamAuth {
                        user: options.upstream_user.clone(),
                        password: password.trim_end_matches(['\r', '\n']).to_string(),
                    });
                }
                Err(e) => {
                    let why = format!("cannot read upstream_password_file {}: {e}", path.display());
                    warn!("{why}; the backend is not served");
                    health.failed(why);
                    return;
                }
            }
        }
        let topology = match &declared.spec.kind {
            Kind::Cluster { seeds } => Topology::new(seeds.clone()),
            Kind::Standalone { primary, replicas } => {
                Topology::standalone(*primary, replicas.clone())
            }
            Kind::Tcp => {
                metrics.set_backend_up(true);
                let dialer = Arc::new(dialer);
                for (worker, metrics) in self.workers.iter().zip(per_worker) {
                    let tcp = Arc::new(TcpBackend::new(
                        declared.spec.name.clone(),
                        Arc::clone(&dialer),
                        metrics,
                    ));
                    worker.front.update(|routes| {
                        routes.by_id.insert(id, Route::Tcp(tcp));
                    });
                }
                health.up.store(true, Ordering::Relaxed);
                info!("backend up (tcp relay)");
                return;
            }
        };
        let topology = Arc::new(topology);
        *health.topology.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&topology));
        // Discovery's one connection, kept for the refresher below.
        let mut control = discovery::Control::default();
        let (commands, redis_version) = loop {
            let discovered =
                async {
                    discovery::refresh(&topology, &mut control, &dialer, &metrics).await?;
                    // A refresh that succeeded installed a map with a master.
                    let master = topology.view().masters().next().ok_or_else(|| {
                        discovery::Error::Reply {
                            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                            message: "no master known yet".into(),
                        }
                    })?;
                    discovery::fetch_commands(&mut control, &dialer, master).await
                };
            match discovered.await {
                Ok(found) => break found,
                Err(e) => {
                    warn!(error = %e, "cannot discover the backend yet; retrying");
                    health.failed(e.to_string());
                    tokio::time::sleep(DISCOVERY_RETRY).await;
                }
            }
        };
        info!(
            commands = commands.len(),
            redis_version,
            masters = topology.view().shards().len(),
            "backend up"
        );
        let mut settings = self.defaults.settings.clone();
        let mut pool = self.defaults.pool;
        if let Some(window) = options.retry_window {
            settings.retry_window = window;
        }
        if let Some(idle) = options.idle_timeout {
            settings.idle_timeout = (!idle.is_zero()).then_some(idle);
        }
        if let Some(max) = options.max_pipeline {
            settings.max_pipeline = max.max(1);
        }
        if let Some(n) = options.upstream_connections {
            pool.shared_per_node = n.max(1);
        }
        if let Some(n) = options.idle_leases {
            pool.idle_leases_per_node = n;
        }
        if let Some(policy) = options.read_policy {
            settings.read_policy = policy;
        }
        if let Some(mode) = options.auth {
            settings.auth_mode = mode;
        }
        if let Some(allow) = options.allow_admin_commands {
            settings.allow_admin_commands = allow;
        }
        let common = BackendCommon::new(self.workers.len(), settings.output_limits);
        *health.common.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&common));
        let mut served = Vec::new();
        for (worker, metrics) in self.workers.iter().zip(per_worker) {
            let shared = Arc::new(Shared::on_worker(
                Arc::clone(&common),
                WorkerParts {
                    settings: settings.clone(),
                    // The first worker reads the refresher's own map.
                    topology: if worker.index == 0 {
                        Arc::clone(&topology)
                    } else {
                        topology.follower()
                    },
                    pools: Pools::new(dialer.clone(), Arc::clone(&metrics), pool),
                    commands: commands.clone(),
                    metrics,
                    redis_version: redis_version.clone(),
                },
            ));
            worker.front.update(|routes| {
                routes.by_id.insert(id, Route::Redis(Arc::clone(&shared)));
            });
            served.push(Arc::downgrade(&shared));
        }
        health.up.store(true, Ordering::Relaxed);
        *health.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        discovery::refresher(
            topology,
            control,
            Arc::new(dialer),
            metrics,
            self.defaults.refresh_interval,
            MIN_REFRESH_GAP,
            move |view| {
                for shared in served.iter().filter_map(std::sync::Weak::upgrade) {
                    shared.pools.retain(&view.nodes());
                }
            },
        )
        .await;
    }

    /// Waits for a removed backend's clients to leave, then stops it.
    async fn drain(self: Arc<Self>, serial: u64) {
        let started = Instant::now();
        loop {
            let clients = self
                .state()
                .running
                .iter()
                .find(|r| r.serial == serial)
                .map(Running::clients);
            match clients {
                Some(n) if n > 0 => tokio::time::sleep(DRAIN_CHECK).await,
                _ => break,
            }
        }
        let mut state = self.state();
        let Some(index) = state.running.iter().position(|r| r.serial == serial) else {
            return;
        };
        let running = state.running.remove(index);
        running.task.abort();
        // A replacement under the same name keeps the series.
        let name = &running.declared.spec.name;
        if state.running.iter().any(|r| &r.declared.spec.name == name) {
            state.retired.push(running.metrics.clone());
        } else {
            // Each worker knows the command series it made.
            forget(&running.metrics);
            state.retired.retain(|metrics| {
                let same = metrics.first().is_some_and(|m| m.backend() == name);
                if same {
                    forget(metrics);
                }
                !same
            });
        }
        info!(backend = %running.declared.spec.name, drained_in = ?started.elapsed(), "backend dropped");
    }

    /// The daemon is going away: every Redis client is closed once quiet
    /// at a request boundary (relayed and subscribed ones stay until they
    /// leave or the grace period ends).
    pub fn ask_clients_to_leave(&self) {
        let state = self.state();
        for running in &state.running {
            let common = running
                .health
                .common
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for client in common.iter().flat_map(|c| c.clients.all()) {
                client.leave_when_quiet();
            }
        }
    }

    /// Whether any backend serves (the heartbeat steers only then).
    pub fn any_up(&self) -> bool {
        self.state()
            .running
            .iter()
            .any(|r| !r.draining && r.health.up.load(Ordering::Relaxed))
    }

    /// Whether every declared backend serves.
    pub fn all_up(&self) -> bool {
        let state = self.state();
        !state.running.is_empty()
            && state
                .running
                .iter()
                .filter(|r| !r.draining)
                .all(|r| r.health.up.load(Ordering::Relaxed))
    }

    /// `--require-backends`: every backend up within `timeout`, or the
    /// first that is not, with why.
    pub async fn require_up(&self, timeout: Duration) -> Result<(), NotUp> {
        let started = Instant::now();
        while !self.all_up() && started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = self.state();
        match state
            .running
            .iter()
            .find(|r| !r.draining && !r.health.up.load(Ordering::Relaxed))
        {
            None => Ok(()),
            Some(r) => Err(NotUp {
                name: r.declared.spec.name.clone(),
                kind: r.declared.spec.kind.name(),
                addrs: r.declared.spec.kind.addresses().join(","),
                waited: started.elapsed(),
                reason: r
                    .health
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "no answer yet".into()),
            }),
        }
    }

    /// Each backend as `/status` and `redirector status` show it.
    pub fn report(&self) -> Vec<serde_json::Value> {
        let state = self.state();
        state
            .running
            .iter()
            .map(|r| {
                let up = r.health.up.load(Ordering::Relaxed);
                let topology = r
                    .health
                    .topology
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let topology_state = match (&r.declared.spec.kind, topology) {
                    (Kind::Tcp, _) => "relay".to_string(),
                    // A standalone Redis has no slots to speak of.
                    (Kind::Standalone { primary, .. }, Some(t)) if up => {
                        let replicas: usize =
                            t.view().shards().iter().map(|s| s.replicas.len()).sum();
                        format!("primary {primary}, {replicas} replicas")
                    }
                    (_, Some(t)) if up => {
                        let view = t.view();
                        format!(
                            "{} masters, {} of 16384 slots covered",
                            view.shards().len(),
                            view.covered_slots()
                        )
                    }
                    _ => "not discovered".to_string(),
                };
                serde_json::json!({
                    "name": r.declared.spec.name,
                    "kind": r.declared.spec.kind.name(),
                    "addresses": r.declared.spec.kind.addresses(),
                    "targets": r.declared.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "state": if r.draining { "draining" } else if up { "up" } else { "down" },
                    "topology": topology_state,
                    "clients": r.clients(),
                    "last_error": r.health.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                })
            })
            .collect()
    }
}

fn forget(per_worker: &[Arc<ProxyMetrics>]) {
    for metrics in per_worker {
        metrics.forget();
    }
}

/// The kernel's id of the backend named `name`: FNV-1a of the name, so
/// every daemon on the node (an upgrade's old and new one) gives the same
/// name the same id. Should another backend's id in `taken` collide, the
/// name is hashed again with a counter.
pub fn backend_id(name: &str, taken: &[u32]) -> u32 {
    fn fnv1a(parts: &[&[u8]]) -> u32 {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in parts.iter().flat_map(|p| p.iter()) {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        hash
    }
    let mut id = fnv1a(&[name.as_bytes()]);
    let mut round: u32 = 0;
    while taken.contains(&id) {
        round += 1;
        id = fnv1a(&[name.as_bytes(), b"#", &round.to_le_bytes()]);
    }
    id
}

/// Whether a new declaration is the backend already running (same kind and
/// settings; a cluster's seeds may change, they only help find it).
fn same_backend(running: &Declared, new: &Declared) -> bool {
    let kinds = match (&running.spec.kind, &new.spec.kind) {
        (Kind::Cluster { .. }, Kind::Cluster { .. }) => true,
        (a, b) => a == b,
    };
    kinds && running.options == new.options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(arg: &str) -> Declared {
        Declared {
            spec: arg.parse().unwrap(),
            targets: Vec::new(),
            options: Default::default(),
            source: "test".into(),
        }
    }

    #[test]
    fn a_backend_id_depends_on_its_name_alone_so_two_daemons_agree() {
        // The FNV-1a test vectors: the id is stable across builds.
        assert_eq!(backend_id("", &[]), 0x811c_9dc5);
        assert_eq!(backend_id("a", &[]), 0xe40c_292c);
        assert_eq!(backend_id("foobar", &[]), 0xbf9c_f968);
        assert_ne!(backend_id("cart", &[]), backend_id("shop", &[]));
        let cart = backend_id("cart", &[]);
        let again = backend_id("cart", &[cart]);
        assert_ne!(again, cart, "a collision is hashed again");
        assert_eq!(
            again,
            backend_id("cart", &[cart]),
            "and still the same everywhere"
        );
    }

    #[test]
    fn a_cluster_whose_seeds_move_is_the_same_backend_but_a_new_kind_is_not() {
        let cart = declared("cart=cluster:10.0.0.1:6379");
        assert!(same_backend(&cart, &declared("cart=cluster:10.0.0.2:6379")));
        assert!(!same_backend(
            &cart,
            &declared("cart=standalone:10.0.0.1:6379")
        ));
        let sessions = declared("s=standalone:10.0.0.1:6379");
        assert!(!same_backend(
            &sessions,
            &declared("s=standalone:10.0.0.1:6379,10.0.0.2:6379")
        ));
        let mut proxied = declared("cart=cluster:10.0.0.1:6379");
        proxied.options.auth = Some(crate::proxy::AuthMode::Proxy);
        assert!(!same_backend(&cart, &proxied));
    }
}
