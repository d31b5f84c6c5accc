//! The node agent's metrics (`redirector_k8s_*`), registered by
//! [`crate::metrics`] under its `k8s` prefix.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

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
    mesh_addresses: Gauge,
}

impl AgentMetrics {
    pub const RESOURCES: [&'static str; 4] = ["namespaces", "pods", "services", "configmaps"];

    /// Registers into `registry`, which the root gives the `k8s` prefix.
    pub fn register(registry: &mut Registry) -> Self {
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
        registry.register(
            "mesh_addresses",
            "Pod and Service addresses in the ambient mesh, with the identities that must answer \
             for them (--mesh-identities-from-api)",
            this.mesh_addresses.clone(),
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

    pub fn mesh_addresses(&self, n: usize) {
        self.mesh_addresses
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn cni_request(&self, command: &'static str, outcome: &'static str) {
        self.cni_requests
            .get_or_create(&CniLabels { command, outcome })
            .inc();
    }
}
