//! The eBPF programs' counters (`redirector_steering_*`), read from their
//! maps at each scrape: they live in the kernel, so there is nothing to
//! record here, only a collector [`crate::metrics`] registers.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

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

/// Encodes a fresh [`SteeringSnapshot`] at each scrape.
pub struct SteeringCollector {
    source: SnapshotSource,
}

impl SteeringCollector {
    /// `source` answers `None` when the maps cannot be read.
    pub fn new(source: impl Fn() -> Option<SteeringSnapshot> + Send + Sync + 'static) -> Self {
        Self {
            source: Box::new(source),
        }
    }
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

impl Collector for SteeringCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
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
            let counter = ConstCounter::new(value);
            counter.encode(connects.encode_family(&OutcomeLabels { outcome })?)?;
        }
        let enrolled = ConstGauge::new(i64::try_from(snapshot.enrolled).unwrap_or(i64::MAX));
        enrolled.encode(encoder.encode_descriptor(
            "steering_enrolled_namespaces",
            "Network namespaces enrolled for steering",
            None,
            MetricType::Gauge,
        )?)?;
        let awaiting = ConstGauge::new(i64::try_from(snapshot.awaiting_accept).unwrap_or(i64::MAX));
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
