//! The admin port's own metrics (`redirector_admin_*`), registered by
//! [`crate::metrics`] under its `admin` prefix.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Why the admin port turned a connection or a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The listener already had its maximum of connections: closed at once.
    MaxConnections,
    /// The request line and headers outgrew the limit: 431.
    HeaderTooLarge,
    /// The headers did not arrive within the header-read timeout.
    HeaderTimeout,
    /// The whole exchange outlasted the request timeout.
    RequestTimeout,
    /// A POST body over the limit: 413.
    BodyTooLarge,
    /// Not HTTP/1: 400.
    BadRequest,
}

impl Rejected {
    pub const ALL: [Self; 6] = [
        Self::MaxConnections,
        Self::HeaderTooLarge,
        Self::HeaderTimeout,
        Self::RequestTimeout,
        Self::BodyTooLarge,
        Self::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::HeaderTooLarge => "header_too_large",
            Self::HeaderTimeout => "header_timeout",
            Self::RequestTimeout => "request_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::BadRequest => "bad_request",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Connections open and turned away, per listener (`admin`, `metrics`).
#[derive(Clone, Debug, Default)]
pub struct AdminMetrics {
    active: Family<ListenerLabels, Gauge>,
    rejected: Family<RejectedLabels, Counter>,
}

impl AdminMetrics {
    pub const LISTENERS: [&'static str; 2] = ["admin", "metrics"];

    /// Registers into `registry`, which the root gives the `admin` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        // Fixed label sets start at zero, so an alert sees the first one.
        for listener in Self::LISTENERS {
            let _ = this.active.get_or_create(&ListenerLabels { listener });
            for reason in Rejected::ALL {
                let _ = this.rejected.get_or_create(&RejectedLabels {
                    listener,
                    reason: reason.as_str(),
                });
            }
        }
        registry.register(
            "connections_active",
            "Connections open on the admin port, by listener",
            this.active.clone(),
        );
        registry.register(
            "rejected",
            "Connections or requests the admin port's limits turned away, by listener and reason",
            this.rejected.clone(),
        );
        this
    }

    pub fn rejected(&self, listener: &'static str, reason: Rejected) {
        let _ = self
            .rejected
            .get_or_create(&RejectedLabels {
                listener,
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self, listener: &'static str) -> Open {
        let gauge = self
            .active
            .get_or_create(&ListenerLabels { listener })
            .clone();
        let _ = gauge.inc();
        Open(gauge)
    }
}

/// One open admin connection, in `connections_active` while it lives.
pub struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        let _ = self.0.dec();
    }
}
