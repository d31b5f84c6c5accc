//! The proxy's metrics: clients, commands, redirections, topology refreshes
//! and upstream connections (`redirector_*`, no sub-prefix).
//!
//! Hot-path handles (per-command counters) are looked up once per command
//! name and cached, so recording a command costs a map read and two atomic
//! adds, not a label allocation.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{
    admission::Refusal,
    output_limit::Class,
    shards::{
        CounterShard, GaugeShard, LatencyShard, ShardedCounter, ShardedGauge, ShardedLatency,
        Shards,
    },
};
use crate::fasthash::FnvHashMap;

/// Every series names the backend it measures (`backend="cart"`), so one
/// daemon's backends are told apart on a dashboard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    backend: String,
    command: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    backend: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    backend: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    backend: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    backend: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    backend: String,
    class: &'static str,
}

/// The client classes that can be over an output limit (the proxy has no
/// replicas).
const OUTPUT_CLASSES: [Class; 2] = [Class::Normal, Class::Pubsub];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    backend: String,
    direction: &'static str,
}

/// Series every worker records into, each in its own shard (see
/// [`super::shards`]): the request and connection paths.
type PerWorker<L, M> = Family<L, M, Shards>;

/// Counters of one command name, on one worker.
#[derive(Clone)]
pub struct CommandCounters {
    /// The name, shared by every client's copy (no allocation per client).
    name: Arc<[u8]>,
    ok: CounterShard,
    error: CounterShard,
}

impl CommandCounters {
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.inc_as_owner();
        } else {
            self.error.inc_as_owner();
        }
    }
}

/// Commands not in the table share one label, so clients cannot blow up
/// the metric's cardinality.
pub const UNKNOWN_COMMAND: &[u8] = b"unknown";

/// How well one upstream connection batches: its writes and the commands
/// they carried.
pub struct UpstreamBatching {
    writes: CounterShard,
    commands: CounterShard,
}

impl UpstreamBatching {
    pub fn wrote(&self, commands: usize) {
        self.writes.inc();
        self.commands.inc_by(commands as u64);
    }
}

/// The proxy's metric families, registered once; each backend records
/// into its own series of them ([`ProxyFamilies::backend`]).
#[derive(Clone)]
pub struct ProxyFamilies {
    clients_opened: PerWorker<BackendLabels, ShardedCounter>,
    clients_closed: PerWorker<BackendLabels, ShardedCounter>,
    clients_active: PerWorker<BackendLabels, ShardedGauge>,
    clients_rejected: Family<ReasonLabels, Counter>,
    output_limit_disconnections: Family<ClassLabels, Counter>,
    backend_up: Family<BackendLabels, Gauge>,
    commands: PerWorker<CommandLabels, ShardedCounter>,
    latency: PerWorker<BackendLabels, ShardedLatency>,
    redirections: Family<KindLabels, Counter>,
    topology_refreshes: Family<ResultLabels, Counter>,
    upstream_active: Family<NodeLabels, Gauge>,
    upstream_opened: Family<NodeLabels, Counter>,
    upstream_failed: Family<NodeLabels, Counter>,
    upstream_writes: PerWorker<NodeLabels, ShardedCounter>,
    upstream_commands: PerWorker<NodeLabels, ShardedCounter>,
    leases_reused: PerWorker<BackendLabels, ShardedCounter>,
    protocol_errors: PerWorker<BackendLabels, ShardedCounter>,
    relayed: PerWorker<DirectionLabels, ShardedCounter>,
    worker_accepted: Family<WorkerLabels, Counter>,
}

impl ProxyFamilies {
    /// Registers into `registry` itself: the proxy's names carry only the
    /// root's `redirector` prefix. `workers` is how many shards the series
    /// recorded on the request path have.
    pub fn register(registry: &mut Registry, workers: usize) -> Self {
        let shards = Shards(workers.max(1));
        let families = Self {
            clients_opened: Family::new_with_constructor(shards),
            clients_closed: Family::new_with_constructor(shards),
            clients_active: Family::new_with_constructor(shards),
            clients_rejected: Family::default(),
            output_limit_disconnections: Family::default(),
            backend_up: Family::default(),
            commands: Family::new_with_constructor(shards),
            latency: Family::new_with_constructor(shards),
            redirections: Family::default(),
            topology_refreshes: Family::default(),
            upstream_active: Family::default(),
            upstream_opened: Family::default(),
            upstream_failed: Family::default(),
            upstream_writes: Family::new_with_constructor(shards),
            upstream_commands: Family::new_with_constructor(shards),
            leases_reused: Family::new_with_constructor(shards),
            protocol_errors: Family::new_with_constructor(shards),
            relayed: Family::new_with_constructor(shards),
            worker_accepted: Family::default(),
        };
        registry.register(
            "client_connections_opened",
            "Client connections accepted",
            families.clients_opened.clone(),
        );
        registry.register(
            "client_connections_closed",
            "Client connections closed",
            families.clients_closed.clone(),
        );
        registry.register(
            "client_connections_active",
            "Client connections open now",
            families.clients_active.clone(),
        );
        registry.register(
            "client_connections_rejected",
            "Client connections refused at accept, by reason: not_steered (dialled the proxy \
             directly from a source not allowed), max_clients (node-wide limit), pod_quota, \
             source_quota",
            families.clients_rejected.clone(),
        );
        registry.register(
            "client_output_buffer_limit_disconnections",
            "Clients disconnected for being owed more than client-output-buffer-limit \
             allows (a subscriber or pipeliner not reading its replies), by class",
            families.output_limit_disconnections.clone(),
        );
        registry.register(
            "backend_up",
            "1 while the Redis backend answers (its topology was refreshed recently), else 0; \
             readiness does not wait for it",
            families.backend_up.clone(),
        );
        registry.register(
            "commands",
            "Commands by name and outcome (error: the client got an error reply)",
            families.commands.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Time from a command's arrival to its reply being ready",
            families.latency.clone(),
        );
        registry.register(
            "redirections",
            "MOVED and ASK redirections followed",
            families.redirections.clone(),
        );
        registry.register(
            "topology_refreshes",
            "Cluster topology refreshes by result",
            families.topology_refreshes.clone(),
        );
        registry.register(
            "upstream_connections_active",
            "Open connections to each Redis node (shared and leased)",
            families.upstream_active.clone(),
        );
        registry.register(
            "upstream_connections_opened",
            "Connections opened to each Redis node",
            families.upstream_opened.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connection attempts to each Redis node",
            families.upstream_failed.clone(),
        );
        registry.register(
            "upstream_writes",
            "Writes to each Redis node on its shared connections; \
             upstream_commands_sent / upstream_writes is how many commands \
             (of any clients) one write carried",
            families.upstream_writes.clone(),
        );
        registry.register(
            "upstream_commands_sent",
            "Commands written to each Redis node on its shared connections \
             (counted by the replies they are owed)",
            families.upstream_commands.clone(),
        );
        registry.register(
            "leases_reused",
            "Dedicated connections (transactions, blocking, pub/sub) served from the warm pool",
            families.leases_reused.clone(),
        );
        registry.register(
            "client_protocol_errors",
            "Clients disconnected for malformed RESP",
            families.protocol_errors.clone(),
        );
        registry.register(
            "relay_bytes",
            "Bytes carried by tcp backends' relays, upstream (client to server) and downstream",
            families.relayed.clone(),
        );
        registry.register(
            "worker_connections_accepted",
            "Connections each proxy worker accepted (--workers: the kernel spreads them \
             over the workers' SO_REUSEPORT listeners)",
            families.worker_accepted.clone(),
        );
        families
    }

    /// Worker `worker`'s count of accepted connections.
    pub fn worker_accepted(&self, worker: usize) -> Counter {
        self.worker_accepted.get_or_create_owned(&WorkerLabels {
            worker: worker.to_string(),
        })
    }

    /// The handles one backend records with, on the first worker.
    pub fn backend(&self, name: &str) -> ProxyMetrics {
        self.backend_on(name, 0)
    }

    /// The handles one backend records with on worker `worker`: its own
    /// shard of every series. Series with a fixed label set exist from the
    /// start at zero, so a dashboard shows 0 rather than "no data" before
    /// the first event.
    pub fn backend_on(&self, name: &str, worker: usize) -> ProxyMetrics {
        let backend = || BackendLabels {
            backend: name.to_string(),
        };
        for refusal in Refusal::ALL {
            let _ = self.clients_rejected.get_or_create(&ReasonLabels {
                backend: name.to_string(),
                reason: refusal.reason(),
            });
        }
        for class in OUTPUT_CLASSES {
            let _ = self
                .output_limit_disconnections
                .get_or_create(&ClassLabels {
                    backend: name.to_string(),
                    class: class.label(),
                });
        }
        for kind in ["moved", "ask"] {
            let _ = self.redirections.get_or_create(&KindLabels {
                backend: name.to_string(),
                kind,
            });
        }
        let relayed = |direction| {
            self.relayed
                .get_or_create_owned(&DirectionLabels {
                    backend: name.to_string(),
                    direction,
                })
                .shard(worker)
        };
        ProxyMetrics {
            backend: name.to_string(),
            worker,
            clients_opened: self
                .clients_opened
                .get_or_create_owned(&backend())
                .shard(worker),
            clients_closed: self
                .clients_closed
                .get_or_create_owned(&backend())
                .shard(worker),
            clients_active: self
                .clients_active
                .get_or_create_owned(&backend())
                .shard(worker),
            backend_up: self.backend_up.get_or_create_owned(&backend()),
            latency: self.latency.get_or_create_owned(&backend()).shard(worker),
            leases_reused: self
                .leases_reused
                .get_or_create_owned(&backend())
                .shard(worker),
            protocol_errors: self
                .protocol_errors
                .get_or_create_owned(&backend())
                .shard(worker),
            relayed_upstream: relayed("upstream"),
            relayed_downstream: relayed("downstream"),
            command_cache: RwLock::new(FnvHashMap::default()),
            nodes_seen: Mutex::new(HashSet::new()),
            families: self.clone(),
        }
    }
}

/// One backend's metrics on one worker: hot-path handles resolved once,
/// into that worker's shards.
pub struct ProxyMetrics {
    backend: String,
    worker: usize,
    clients_opened: CounterShard,
    clients_closed: CounterShard,
    clients_active: GaugeShard,
    backend_up: Gauge,
    latency: LatencyShard,
    leases_reused: CounterShard,
    protocol_errors: CounterShard,
    relayed_upstream: CounterShard,
    relayed_downstream: CounterShard,
    command_cache: RwLock<FnvHashMap<Vec<u8>, CommandCounters>>,
    /// Nodes with series, so a removed backend's can be dropped.
    nodes_seen: Mutex<HashSet<SocketAddr>>,
    families: ProxyFamilies,
}

impl ProxyMetrics {
    /// Unregistered, for tests of the proxy alone.
    pub fn detached() -> Self {
        ProxyFamilies::register(&mut Registry::default(), 1).backend("test")
    }

    /// The worker whose shards these handles record into.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The backend these metrics are labelled with.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    pub fn client_opened(&self) {
        self.clients_opened.inc();
        self.clients_active.inc();
    }

    pub fn client_closed(&self) {
        self.clients_closed.inc();
        self.clients_active.dec();
    }

    /// Clients open now, on every worker.
    pub fn clients_active(&self) -> i64 {
        self.clients_active.total()
    }

    pub fn client_rejected(&self, reason: &'static str) {
        self.families
            .clients_rejected
            .get_or_create(&ReasonLabels {
                backend: self.backend.clone(),
                reason,
            })
            .inc();
    }

    /// A client was owed more than its class's output limit allows.
    pub fn output_limit_disconnected(&self, class: Class) {
        self.families
            .output_limit_disconnections
            .get_or_create(&ClassLabels {
                backend: self.backend.clone(),
                class: class.label(),
            })
            .inc();
    }

    /// For connections relayed without a backend (`unrouted`): no
    /// `backend_up` series, which would read as a backend down.
    pub fn without_health(self) -> Self {
        self.families.backend_up.remove(&BackendLabels {
            backend: self.backend.clone(),
        });
        self
    }

    pub fn set_backend_up(&self, up: bool) {
        self.backend_up.set(i64::from(up));
    }

    pub fn backend_up(&self) -> bool {
        self.backend_up.get() == 1
    }

    pub fn protocol_error(&self) {
        self.protocol_errors.inc();
    }

    /// Bytes a tcp backend's relay carried, each way.
    pub fn relayed(&self, upstream: u64, downstream: u64) {
        self.relayed_upstream.inc_by(upstream);
        self.relayed_downstream.inc_by(downstream);
    }

    /// Counters for a lowercase command name (or [`UNKNOWN_COMMAND`]).
    pub fn command(&self, name: &[u8]) -> CommandCounters {
        if let Some(c) = self
            .command_cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return c.clone();
        }
        let command = String::from_utf8_lossy(name).into_owned();
        let labels = |outcome| CommandLabels {
            backend: self.backend.clone(),
            command: command.clone(),
            outcome,
        };
        let counters = CommandCounters {
            name: Arc::from(name),
            ok: self
                .families
                .commands
                .get_or_create_owned(&labels("ok"))
                .shard(self.worker),
            error: self
                .families
                .commands
                .get_or_create_owned(&labels("error"))
                .shard(self.worker),
        };
        self.command_cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_vec(), counters.clone());
        counters
    }

    /// `n` commands that each took `elapsed` (one pipelined read's).
    pub fn latencies(&self, elapsed: Duration, n: u64) {
        self.latency.observe_many(elapsed, n);
    }

    fn redirection(&self, kind: &'static str) {
        self.families
            .redirections
            .get_or_create(&KindLabels {
                backend: self.backend.clone(),
                kind,
            })
            .inc();
    }

    pub fn moved(&self) {
        self.redirection("moved");
    }

    pub fn ask(&self) {
        self.redirection("ask");
    }

    /// A topology refresh's result, which is also the backend's health.
    pub fn topology_refresh(&self, ok: bool) {
        self.set_backend_up(ok);
        let result = if ok { "ok" } else { "error" };
        self.families
            .topology_refreshes
            .get_or_create(&ResultLabels {
                backend: self.backend.clone(),
                result,
            })
            .inc();
    }

    /// Drops this backend's series (it was removed), so a dashboard does
    /// not keep showing a backend that is gone.
    pub fn forget(&self) {
        let f = &self.families;
        let backend = BackendLabels {
            backend: self.backend.clone(),
        };
        for family in [
            &f.clients_opened,
            &f.clients_closed,
            &f.leases_reused,
            &f.protocol_errors,
        ] {
            family.remove(&backend);
        }
        f.clients_active.remove(&backend);
        f.backend_up.remove(&backend);
        f.latency.remove(&backend);
        for refusal in Refusal::ALL {
            f.clients_rejected.remove(&ReasonLabels {
                backend: self.backend.clone(),
                reason: refusal.reason(),
            });
        }
        for class in OUTPUT_CLASSES {
            f.output_limit_disconnections.remove(&ClassLabels {
                backend: self.backend.clone(),
                class: class.label(),
            });
        }
        for kind in ["moved", "ask"] {
            f.redirections.remove(&KindLabels {
                backend: self.backend.clone(),
                kind,
            });
        }
        for result in ["ok", "error"] {
            f.topology_refreshes.remove(&ResultLabels {
                backend: self.backend.clone(),
                result,
            });
        }
        for direction in ["upstream", "downstream"] {
            f.relayed.remove(&DirectionLabels {
                backend: self.backend.clone(),
                direction,
            });
        }
        let commands = self.command_cache.read().unwrap_or_else(|e| e.into_inner());
        for name in commands.keys() {
            for outcome in ["ok", "error"] {
                f.commands.remove(&CommandLabels {
                    backend: self.backend.clone(),
                    command: String::from_utf8_lossy(name).into_owned(),
                    outcome,
                });
            }
        }
        let nodes = self.nodes_seen.lock().unwrap_or_else(|e| e.into_inner());
        for &addr in nodes.iter() {
            let labels = self.node(addr);
            f.upstream_active.remove(&labels);
            f.upstream_opened.remove(&labels);
            f.upstream_failed.remove(&labels);
            f.upstream_writes.remove(&labels);
            f.upstream_commands.remove(&labels);
        }
    }

    fn node(&self, addr: SocketAddr) -> NodeLabels {
        NodeLabels {
            backend: self.backend.clone(),
            node: addr.to_string(),
        }
    }

    pub fn upstream_opened(&self, addr: SocketAddr) {
        self.seen(addr);
        let labels = self.node(addr);
        self.families.upstream_opened.get_or_create(&labels).inc();
        self.families.upstream_active.get_or_create(&labels).inc();
        // Zero until it happens, so dashboards see a series, not nothing.
        let _ = self.families.upstream_failed.get_or_create(&labels);
    }

    pub fn upstream_closed(&self, addr: SocketAddr) {
        self.families
            .upstream_active
            .get_or_create(&self.node(addr))
            .dec();
    }

    /// What a connection to `addr` counts its writes with, on this worker.
    pub fn upstream_batching(&self, addr: SocketAddr) -> UpstreamBatching {
        self.seen(addr);
        let labels = self.node(addr);
        UpstreamBatching {
            writes: self
                .families
                .upstream_writes
                .get_or_create(&labels)
                .shard(self.worker),
            commands: self
                .families
                .upstream_commands
                .get_or_create(&labels)
                .shard(self.worker),
        }
    }

    pub fn upstream_connect_failed(&self, addr: SocketAddr) {
        self.seen(addr);
        self.families
            .upstream_failed
            .get_or_create(&self.node(addr))
            .inc();
    }

    fn seen(&self, addr: SocketAddr) {
        self.nodes_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr);
    }

    pub fn lease_reused(&self) {
        self.leases_reused.inc();
    }
}
