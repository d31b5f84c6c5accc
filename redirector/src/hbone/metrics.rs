//! HBONE tunnel metrics (`redirector_hbone_*`), registered by
//! [`crate::metrics`] under its `hbone` prefix.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::HANDSHAKE_FAILURE_REASONS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    how: &'static str,
}

/// How a peer can end a stream this node reads (`stream_ends_received`).
pub const STREAM_ENDS: [&str; 3] = ["end_stream", "reset", "error"];

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
    ends_received: Family<EndLabels, Counter>,
}

impl TunnelMetrics {
    /// Registers into `registry`, which the root gives the `hbone` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            streams_active: Gauge::default(),
            connect_status: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            handshake_failures: Family::default(),
            ends_received: Family::default(),
        };
        for how in STREAM_ENDS {
            let _ = this.ends_received.get_or_create(&EndLabels { how });
        }
        for direction in ["inbound", "outbound"] {
            let labels = DirectionLabels { direction };
            let _ = this.opened.get_or_create(&labels);
            let _ = this.closed.get_or_create(&labels);
            let _ = this.active.get_or_create(&labels);
        }
        for status in [200, 400, 401, 503] {
            let _ = this.connect_status.get_or_create(&StatusLabels { status });
        }
        for reason in HANDSHAKE_FAILURE_REASONS {
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
            "stream_ends_received",
            "How peers ended the CONNECT streams this node read: end_stream \
             (END_STREAM, graceful), reset (RST_STREAM) or error (the tunnel died)",
            this.ends_received.clone(),
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

    /// A peer ended a stream this node read, `how` (one of [`STREAM_ENDS`]).
    pub fn stream_end_received(&self, how: &'static str) {
        self.ends_received.get_or_create(&EndLabels { how }).inc();
    }

    /// Streams peers ended `how` so far.
    pub fn stream_ends_received(&self, how: &'static str) -> u64 {
        self.ends_received.get_or_create(&EndLabels { how }).get()
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
