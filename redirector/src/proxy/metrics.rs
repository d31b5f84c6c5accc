//! The proxy's metrics: clients, commands, redirections, topology refreshes
//! and upstream connections (`redirector_*`, no sub-prefix).
//!
//! Hot-path handles (per-command counters) are looked up once per command
//! name and cached, so recording a command costs a map read and two atomic
//! adds, not a label allocation.

use std::{net::SocketAddr, sync::RwLock, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::admission::Refusal;
use crate::fasthash::FnvHashMap;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Counters of one command name.
#[derive(Clone)]
pub struct CommandCounters {
    ok: Counter,
    error: Counter,
}

impl CommandCounters {
    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.inc();
        } else {
            self.error.inc();
        }
    }
}

/// Commands not in the table share one label, so clients cannot blow up
/// the metric's cardinality.
pub const UNKNOWN_COMMAND: &[u8] = b"unknown";

pub struct ProxyMetrics {
    clients_opened: Counter,
    clients_closed: Counter,
    clients_active: Gauge,
    clients_rejected: Family<ReasonLabels, Counter>,
    backend_up: Gauge,
    commands: Family<CommandLabels, Counter>,
    command_cache: RwLock<FnvHashMap<Vec<u8>, CommandCounters>>,
    latency: Histogram,
    redirections: Family<KindLabels, Counter>,
    topology_refreshes: Family<ResultLabels, Counter>,
    upstream_active: Family<NodeLabels, Gauge>,
    upstream_opened: Family<NodeLabels, Counter>,
    upstream_failed: Family<NodeLabels, Counter>,
    leases_reused: Counter,
    protocol_errors: Counter,
}

impl ProxyMetrics {
    /// Registers into `registry` itself: the proxy's names carry only the
    /// root's `redirector` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let clients_opened = Counter::default();
        let clients_closed = Counter::default();
        let clients_active = Gauge::default();
        let clients_rejected = Family::<ReasonLabels, Counter>::default();
        for refusal in Refusal::ALL {
            let _ = clients_rejected.get_or_create(&ReasonLabels {
                reason: refusal.reason(),
            });
        }
        let backend_up = Gauge::default();
        let commands = Family::<CommandLabels, Counter>::default();
        // 25 µs .. ~0.8 s
        let latency = Histogram::new(exponential_buckets(25e-6, 2.0, 16));
        let redirections = Family::<KindLabels, Counter>::default();
        // Series with a fixed label set exist from the start at zero, so a
        // dashboard shows 0 rather than "no data" before the first event.
        for kind in ["moved", "ask"] {
            let _ = redirections.get_or_create(&KindLabels { kind });
        }
        let topology_refreshes = Family::<ResultLabels, Counter>::default();
        let upstream_active = Family::<NodeLabels, Gauge>::default();
        let upstream_opened = Family::<NodeLabels, Counter>::default();
        let upstream_failed = Family::<NodeLabels, Counter>::default();
        let leases_reused = Counter::default();
        let protocol_errors = Counter::default();

        registry.register(
            "client_connections_opened",
            "Client connections accepted",
            clients_opened.clone(),
        );
        registry.register(
            "client_connections_closed",
            "Client connections closed",
            clients_closed.clone(),
        );
        registry.register(
            "client_connections_active",
            "Client connections open now",
            clients_active.clone(),
        );
        registry.register(
            "client_connections_rejected",
            "Client connections refused at accept, by reason: not_steered (dialled the proxy \
             directly from a source not allowed), max_clients (node-wide limit), pod_quota, \
             source_quota",
            clients_rejected.clone(),
        );
        registry.register(
            "backend_up",
            "1 while the Redis backend answers (its topology was refreshed recently), else 0; \
             readiness does not wait for it",
            backend_up.clone(),
        );
        registry.register(
            "commands",
            "Commands by name and outcome (error: the client got an error reply)",
            commands.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Time from a command's arrival to its reply being ready",
            latency.clone(),
        );
        registry.register(
            "redirections",
            "MOVED and ASK redirections followed",
            redirections.clone(),
        );
        registry.register(
            "topology_refreshes",
            "Cluster topology refreshes by result",
            topology_refreshes.clone(),
        );
        registry.register(
            "upstream_connections_active",
            "Open connections to each Redis node (shared and leased)",
            upstream_active.clone(),
        );
        registry.register(
            "upstream_connections_opened",
            "Connections opened to each Redis node",
            upstream_opened.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connection attempts to each Redis node",
            upstream_failed.clone(),
        );
        registry.register(
            "leases_reused",
            "Dedicated connections (transactions, blocking, pub/sub) served from the warm pool",
            leases_reused.clone(),
        );
        registry.register(
            "client_protocol_errors",
            "Clients disconnected for malformed RESP",
            protocol_errors.clone(),
        );
        Self {
            clients_opened,
            clients_closed,
            clients_active,
            clients_rejected,
            backend_up,
            commands,
            command_cache: RwLock::new(FnvHashMap::default()),
            latency,
            redirections,
            topology_refreshes,
            upstream_active,
            upstream_opened,
            upstream_failed,
            leases_reused,
            protocol_errors,
        }
    }

    /// Unregistered, for tests of the proxy alone.
    pub fn detached() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn client_opened(&self) {
        self.clients_opened.inc();
        self.clients_active.inc();
    }

    pub fn client_closed(&self) {
        self.clients_closed.inc();
        self.clients_active.dec();
    }

    pub fn client_rejected(&self, reason: &'static str) {
        self.clients_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
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
        let counters = CommandCounters {
            ok: self.commands.get_or_create_owned(&CommandLabels {
                command: command.clone(),
                outcome: "ok",
            }),
            error: self.commands.get_or_create_owned(&CommandLabels {
                command,
                outcome: "error",
            }),
        };
        self.command_cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_vec(), counters.clone());
        counters
    }

    pub fn latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    pub fn moved(&self) {
        self.redirections
            .get_or_create(&KindLabels { kind: "moved" })
            .inc();
    }

    pub fn ask(&self) {
        self.redirections
            .get_or_create(&KindLabels { kind: "ask" })
            .inc();
    }

    /// A topology refresh's result, which is also the backend's health.
    pub fn topology_refresh(&self, ok: bool) {
        self.set_backend_up(ok);
        let result = if ok { "ok" } else { "error" };
        self.topology_refreshes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn node(addr: SocketAddr) -> NodeLabels {
        NodeLabels {
            node: addr.to_string(),
        }
    }

    pub fn upstream_opened(&self, addr: SocketAddr) {
        let labels = Self::node(addr);
        self.upstream_opened.get_or_create(&labels).inc();
        self.upstream_active.get_or_create(&labels).inc();
        // Zero until it happens, so dashboards see a series, not nothing.
        let _ = self.upstream_failed.get_or_create(&labels);
    }

    pub fn upstream_closed(&self, addr: SocketAddr) {
        self.upstream_active.get_or_create(&Self::node(addr)).dec();
    }

    pub fn upstream_connect_failed(&self, addr: SocketAddr) {
        self.upstream_failed.get_or_create(&Self::node(addr)).inc();
    }

    pub fn lease_reused(&self) {
        self.leases_reused.inc();
    }
}
