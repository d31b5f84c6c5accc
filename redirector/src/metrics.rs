//! The Prometheus registry (prometheus-client) the admin endpoint serves.
//!
//! Each subsystem defines its metrics next to the code it measures
//! (`proxy/metrics.rs`, `hbone::metrics`, `k8s::metrics`,
//! `steering::metrics`); this root only owns the registry, registers them
//! under their prefixes and encodes the text. Imports go one way, root to
//! subsystem, so no subsystem depends on another through its metrics.

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::{
    admin::metrics::AdminMetrics,
    hbone::metrics::TunnelMetrics,
    k8s::metrics::AgentMetrics,
    proxy::metrics::ProxyFamilies,
    steering::metrics::{SteeringCollector, SteeringSnapshot},
};

/// Every subsystem's metrics under the `redirector` prefix.
pub struct MetricsRegistry {
    registry: Registry,
    proxy: ProxyFamilies,
    tunnels: Arc<TunnelMetrics>,
    admin: AdminMetrics,
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self::with_workers(1)
    }

    /// For `--workers N`: the proxy's request-path series have N shards.
    pub fn with_workers(workers: usize) -> Self {
        let mut registry = Registry::with_prefix("redirector");
        // The proxy's names take no sub-prefix. Families are encoded in
        // registration order, sub-registries last, so /metrics keeps the
        // order it always had: proxy, steering, hbone, admin, k8s.
        let proxy = ProxyFamilies::register(&mut registry, workers);
        let tunnels = Arc::new(TunnelMetrics::register(
            registry.sub_registry_with_prefix("hbone"),
        ));
        let admin = AdminMetrics::register(registry.sub_registry_with_prefix("admin"));
        Self {
            registry,
            proxy,
            tunnels,
            admin,
        }
    }

    /// The proxy's metric families (`redirector_client_*`,
    /// `redirector_commands`, ...), each backend with its own series.
    pub fn proxy(&self) -> ProxyFamilies {
        self.proxy.clone()
    }

    /// The HBONE tunnels' metrics (`redirector_hbone_*`).
    pub fn tunnels(&self) -> Arc<TunnelMetrics> {
        Arc::clone(&self.tunnels)
    }

    /// The admin port's own metrics (`redirector_admin_*`).
    pub fn admin(&self) -> AdminMetrics {
        self.admin.clone()
    }

    /// Registers the Kubernetes node agent's metrics (`redirector_k8s_*`).
    pub fn register_agent(&mut self) -> Arc<AgentMetrics> {
        Arc::new(AgentMetrics::register(
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
            .register_collector(Box::new(SteeringCollector::new(source)));
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
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_counters_are_exported_when_readable() {
        let mut metrics = MetricsRegistry::new();
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
        // A backend's series exist once it is declared.
        let _cart = metrics.proxy().backend("cart");
        let text = metrics.encode();
        assert!(
            text.contains("redirector_client_connections_active{backend=\"cart\"} 0"),
            "{text}"
        );
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
        let mut unreadable = MetricsRegistry::new();
        unreadable.register_steering(|| None);
        assert!(!unreadable.encode().contains("steering_"));
    }
}
