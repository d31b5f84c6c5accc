//! Prometheus metrics (prometheus-client), served by the admin endpoint.
//!
//! Hot-path handles (per-command counters) are looked up once per command
//! name and cached, so recording a command costs a map read and two atomic
//! adds, not a label allocation.

use std::{net::SocketAddr, sync::RwLock, time::Duration};

use crate::fasthash::FnvHashMap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

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

pub struct Metrics {
    registry: Registry,
    tunnels: std::sync::Arc<TunnelMetrics>,
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

/// Commands not in the table share one label, so clients cannot blow up
/// the metric's cardinality.
pub const UNKNOWN_COMMAND: &[u8] = b"unknown";

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("redirector");
        let clients_opened = Counter::default();
        let clients_closed = Counter::default();
        let clients_active = Gauge::default();
        let clients_rejected = Family::<ReasonLabels, Counter>::default();
        for refusal in crate::proxy::admission::Refusal::ALL {
            let _ = clients_rejected.get_or_create(&ReasonLabels {
                reason: refusal.reason(),
            });
        }
        let backend_up = Gauge::default();
        let commands = Family::<CommandLabels, Counter>::default();
        // 25 µs .. ~0.8 s
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            25e-6, 2.0, 16,
        ));
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
        let tunnels = std::sync::Arc::new(TunnelMetrics::register(
            registry.sub_registry_with_prefix("hbone"),
        ));

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
            registry,
            tunnels,
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

    /// The HBONE tunnels' metrics (`redirector_hbone_*`).
    pub fn tunnels(&self) -> std::sync::Arc<TunnelMetrics> {
        std::sync::Arc::clone(&self.tunnels)
    }

    /// Registers the Kubernetes node agent's metrics (`redirector_k8s_*`).
    pub fn register_agent(&mut self) -> std::sync::Arc<AgentMetrics> {
        std::sync::Arc::new(AgentMetrics::register(
            self.registry.sub_registry_with_prefix("k8s"),
        ))
    }

    /// Exports the eBPF programs' counters, read from their maps at each
    /// scrape (they live in the kernel, not here).
    pub fn register_steering(
        &mut self,
        source: impl Fn() -> Option<SteeringSnapshot> + Send + Sync + 'static,
    ) {
        self.registry
            .register_collector(Box::new(SteeringCollector {
                source: Box::new(source),
            }));
    }

    /// The classic Prometheus text format (0.0.4), for scrapers that do not
    /// ask for OpenMetrics (curl, promtool, older agents): counters' HELP
    /// and TYPE lines name the `_total` samples, and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

/// HBONE tunnel metrics: connections (tunnels) by direction, CONNECT
/// streams, their answers and bytes, and TLS handshake failures by reason.
pub struct TunnelMetrics {
    opened: Family<DirectionLabels, Counter>,
    closed: Family<DirectionLabels, Counter>,
    active: Family<DirectionLabels, Gauge>,
    streams_active: Gauge,
    connect_status: Family<StatusLabels, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    handshake_failures: Family<ReasonLabels, Counter>,
}

impl TunnelMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            streams_active: Gauge::default(),
            connect_status: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            handshake_failures: Family::default(),
        };
        for direction in ["inbound", "outbound"] {
            let labels = DirectionLabels { direction };
            let _ = this.opened.get_or_create(&labels);
            let _ = this.closed.get_or_create(&labels);
            let _ = this.active.get_or_create(&labels);
        }
        for status in [200, 400, 401, 503] {
            let _ = this.connect_status.get_or_create(&StatusLabels { status });
        }
        for reason in crate::hbone::HANDSHAKE_FAILURE_REASONS {
            let _ = this
                .handshake_failures
                .get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "tunnels_opened",
            "mTLS HTTP/2 tunnel connections established, by direction",
            this.opened.clone(),
        );
        registry.register(
            "tunnels_closed",
            "Tunnel connections ended, by direction",
            this.closed.clone(),
        );
        registry.register(
            "tunnels_active",
            "Tunnel connections open now, by direction",
            this.active.clone(),
        );
        registry.register(
            "streams_active",
            "CONNECT streams open now (both directions)",
            this.streams_active.clone(),
        );
        registry.register(
            "connect_responses",
            "CONNECT requests answered by this node, by status code",
            this.connect_status.clone(),
        );
        registry.register(
            "received_bytes",
            "Stream bytes received through tunnels",
            this.bytes_in.clone(),
        );
        registry.register(
            "sent_bytes",
            "Stream bytes sent through tunnels",
            this.bytes_out.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed tunnel TLS handshakes, by reason",
            this.handshake_failures.clone(),
        );
        this
    }

    /// Unregistered, for tests of the tunnel code alone.
    pub fn detached() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn tunnel_opened(&self, direction: &'static str) {
        let labels = DirectionLabels { direction };
        self.opened.get_or_create(&labels).inc();
        self.active.get_or_create(&labels).inc();
    }

    pub fn tunnel_closed(&self, direction: &'static str) {
        let labels = DirectionLabels { direction };
        self.closed.get_or_create(&labels).inc();
        self.active.get_or_create(&labels).dec();
    }

    pub fn stream_opened(&self) {
        self.streams_active.inc();
    }

    pub fn stream_closed(&self) {
        self.streams_active.dec();
    }

    pub fn connect_status(&self, status: u16) {
        self.connect_status
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    /// CONNECT requests answered with `status` so far.
    pub fn connect_status_count(&self, status: u16) -> u64 {
        self.connect_status
            .get_or_create(&StatusLabels { status })
            .get()
    }

    /// TLS handshakes refused for `reason` so far.
    pub fn handshake_failure_count(&self, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    pub fn bytes_in(&self, n: usize) {
        self.bytes_in.inc_by(n as u64);
    }

    pub fn bytes_out(&self, n: usize) {
        self.bytes_out.inc_by(n as u64);
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line tells whether names change.
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let renamed = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(help) = help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.split_once(' '))
                    .map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {renamed} {text}\n"));
            }
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodStateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    command: &'static str,
    outcome: &'static str,
}

/// The node agent: what it enrolled, how its watches fare, what the CNI
/// plugin asked.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pods: Family<PodStateLabels, Gauge>,
    lists: Family<ResourceLabels, Counter>,
    watch_errors: Family<ResourceLabels, Counter>,
    reconciles: Counter,
    cni_requests: Family<CniLabels, Counter>,
}

impl AgentMetrics {
    pub const RESOURCES: [&'static str; 4] = ["namespaces", "pods", "services", "configmaps"];

    fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        // Fixed label sets start at zero, so dashboards see them at once.
        for state in ["enrolled", "waiting"] {
            let _ = this.pods.get_or_create(&PodStateLabels { state });
        }
        for command in ["ADD", "DEL"] {
            for outcome in ["enrolled", "skipped", "unenrolled", "failed"] {
                let _ = this
                    .cni_requests
                    .get_or_create(&CniLabels { command, outcome });
            }
        }
        for resource in Self::RESOURCES {
            let _ = this.lists.get_or_create(&ResourceLabels { resource });
            let _ = this
                .watch_errors
                .get_or_create(&ResourceLabels { resource });
        }
        registry.register(
            "pods",
            "Pods of this node the agent wants steered: enrolled, or waiting for their network \
             namespace to be found",
            this.pods.clone(),
        );
        registry.register(
            "lists",
            "Complete lists received (start, relist after 410 Gone or a watch error), by resource",
            this.lists.clone(),
        );
        registry.register(
            "watch_errors",
            "Failed list or watch requests (retried with backoff), by resource",
            this.watch_errors.clone(),
        );
        registry.register(
            "reconciles",
            "Reconcile passes of enrollment and targets",
            this.reconciles.clone(),
        );
        registry.register(
            "cni_requests",
            "Requests from the CNI plugin, by command and outcome",
            this.cni_requests.clone(),
        );
        this
    }

    /// Unregistered, for tests of the agent alone.
    pub fn detached() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn pods(&self, enrolled: usize, waiting: usize) {
        for (state, n) in [("enrolled", enrolled), ("waiting", waiting)] {
            self.pods
                .get_or_create(&PodStateLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn listed(&self, resource: &'static str) {
        self.lists.get_or_create(&ResourceLabels { resource }).inc();
    }

    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn cni_request(&self, command: &'static str, outcome: &'static str) {
        self.cni_requests
            .get_or_create(&CniLabels { command, outcome })
            .inc();
    }
}

/// What the connect programs counted, summed over CPUs, and how many
/// network namespaces are enrolled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringSnapshot {
    pub counters: redirector_ebpf::Counters,
    pub enrolled: u64,
    /// Established steered connections the proxy has not accepted yet.
    pub awaiting_accept: u64,
}

type SnapshotSource = Box<dyn Fn() -> Option<SteeringSnapshot> + Send + Sync>;

struct SteeringCollector {
    source: SnapshotSource,
}

impl std::fmt::Debug for SteeringCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SteeringCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl prometheus_client::collector::Collector for SteeringCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric as _, metrics::MetricType};
        // Maps unreadable (uninstalled under us): export nothing rather
        // than zeros that would read as resets.
        let Some(snapshot) = (self.source)() else {
            return Ok(());
        };
        let mut connects = encoder.encode_descriptor(
            "steering_connects",
            "Connects to Redis targets seen by the eBPF programs, by outcome: steered (to the \
             proxy), passed (namespace not enrolled), proxy_own (the proxy's own), proxy_down \
             (enrolled, proxy not alive: sent direct), proxy_full (enrolled, proxy at its client \
             limit: sent direct), loopback (a pod's own Redis: left alone), foreign_mark (the \
             proxy's mark set outside its namespace: ignored), error (sent direct)",
            None,
            MetricType::Counter,
        )?;
        let c = &snapshot.counters;
        for (outcome, value) in [
            ("steered", c.steered),
            ("passed", c.passed),
            ("proxy_own", c.proxy_own),
            ("proxy_down", c.proxy_down),
            ("proxy_full", c.proxy_full),
            ("loopback", c.loopback),
            ("foreign_mark", c.foreign_mark),
            ("error", c.errors),
        ] {
            let counter = prometheus_client::metrics::counter::ConstCounter::new(value);
            counter.encode(connects.encode_family(&OutcomeLabels { outcome })?)?;
        }
        let enrolled = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(snapshot.enrolled).unwrap_or(i64::MAX),
        );
        enrolled.encode(encoder.encode_descriptor(
            "steering_enrolled_namespaces",
            "Network namespaces enrolled for steering",
            None,
            MetricType::Gauge,
        )?)?;
        let awaiting = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(snapshot.awaiting_accept).unwrap_or(i64::MAX),
        );
        awaiting.encode(encoder.encode_descriptor(
            "steering_awaiting_accept",
            "Steered connections established but not yet accepted by the proxy (entries of \
             rdr_orig_dst); near 0 when healthy",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_counters_are_exported_when_readable() {
        let mut metrics = Metrics::new();
        metrics.register_steering(|| {
            Some(SteeringSnapshot {
                counters: redirector_ebpf::Counters {
                    steered: 7,
                    passed: 3,
                    ..Default::default()
                },
                enrolled: 2,
                ..SteeringSnapshot::default()
            })
        });
        let text = metrics.encode();
        assert!(
            text.contains("redirector_steering_connects_total{outcome=\"steered\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("redirector_steering_connects_total{outcome=\"passed\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("redirector_steering_enrolled_namespaces 2"),
            "{text}"
        );
        let classic = metrics.encode_prometheus_text();
        assert!(
            classic.contains("# TYPE redirector_steering_connects_total counter\n"),
            "{classic}"
        );
        assert!(
            classic
                .contains("# HELP redirector_client_connections_opened_total Client connections"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
        let mut unreadable = Metrics::new();
        unreadable.register_steering(|| None);
        assert!(!unreadable.encode().contains("steering_"));
    }
}
