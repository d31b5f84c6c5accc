//! The Kubernetes node agent: which pods on this node are steered, and
//! which services count as Redis.
//!
//! - [`agent`] watches Namespaces (the opt-in label), the Pods of this node
//!   (`spec.nodeName`), Services and the targets ConfigMap, and keeps the
//!   enrollment and target maps equal to what the API says, after every
//!   change, every relist (410 Gone) and every restart.
//! - [`targets`] reads the operator's targets ConfigMap and resolves its
//!   services to ClusterIPs.
//! - [`workloads`] (with `--mesh-identities-from-api`) watches the whole
//!   cluster's Namespaces, Pods and Services for the ambient mesh's
//!   addresses and the identities that answer for them.
//! - The CNI plugin ([`crate::cni`]) asks the agent to enroll a pod before
//!   its containers start, so a pod's first connect is already steered.

pub mod agent;
pub mod metrics;
pub mod targets;
pub mod workloads;

use std::{collections::BTreeMap, fmt, path::PathBuf, str::FromStr};

/// The namespace label that opts every pod of a namespace in.
pub const DEFAULT_NAMESPACE_LABEL: &str = "redirector.io/steering=enabled";
/// The pod label that opts one pod out of an opted-in namespace.
pub const DEFAULT_POD_OPT_OUT_LABEL: &str = "redirector.io/steering=disabled";
/// Istio ambient's namespace label, honoured with `--ambient-label`.
pub const AMBIENT_NAMESPACE_LABEL: &str = "istio.io/dataplane-mode=ambient";
/// Istio ambient's pod opt-out, honoured with `--ambient-label`.
pub const AMBIENT_POD_OPT_OUT_LABEL: &str = "istio.io/dataplane-mode=none";
pub const DEFAULT_TARGETS_CONFIGMAP: &str = "redirector-system/redirector-targets";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes client configuration: {0}")]
    ClientConfig(String),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Steering(#[from] crate::steering::Error),
    #[error("cannot listen for the CNI plugin on {path}: {source}")]
    CniSocket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A `key=value` label requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

impl FromStr for Label {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((key, value)) if !key.is_empty() && !key.contains(char::is_whitespace) => {
                Ok(Self {
                    key: key.to_string(),
                    value: value.to_string(),
                })
            }
            _ => Err(format!("`{s}` is not a label KEY=VALUE")),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("`{s}` is not NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which pods are steered: those in a namespace carrying any opt-in label,
/// unless the pod carries an opt-out label or shares the host's network.
#[derive(Clone, Debug)]
pub struct Selection {
    pub namespace_labels: Vec<Label>,
    pub pod_opt_out_labels: Vec<Label>,
}

impl Selection {
    pub fn namespace_opted_in(&self, labels: &BTreeMap<String, String>) -> bool {
        self.namespace_labels.iter().any(|l| l.matches(labels))
    }

    pub fn pod_opted_out(&self, labels: &BTreeMap<String, String>) -> bool {
        self.pod_opt_out_labels.iter().any(|l| l.matches(labels))
    }
}

#[derive(Clone, Debug)]
pub struct K8sConfig {
    /// This node (`spec.nodeName` of the pods to manage).
    pub node_name: String,
    /// The API server; `None`: in-cluster service account (or kubeconfig).
    pub api_server: Option<String>,
    pub selection: Selection,
    pub targets_configmap: ObjectRef,
    /// Where the CNI plugin reaches the agent; `None`: no CNI socket.
    pub cni_socket: Option<PathBuf>,
    /// The host's `/proc` (mounted from the host: no hostPID needed), to map
    /// pod UIDs to processes.
    pub proc_root: PathBuf,
    /// Keep redirector-cni chained in the node's CNI config.
    pub cni_chain: Option<crate::cni::conf::InstallOptions>,
}

/// What a watch says, once its lists are whole.
pub(crate) enum Change<K> {
    /// A complete list (at start, and at every relist, 410 Gone included).
    Listed(Vec<K>),
    Applied(K),
    Deleted(K),
}

/// Follows a kube-runtime watch (list, then watch from the list's
/// resourceVersion, relist with backoff after any error), handing `apply`
/// each complete list and each change after it, every object first made
/// into what the caller keeps (`keep`: a list of the whole cluster's pods
/// is not held whole); counts lists and errors.
pub(crate) async fn follow<K, T>(
    api: kube::Api<K>,
    config: kube::runtime::watcher::Config,
    resource: &'static str,
    metrics: &metrics::AgentMetrics,
    keep: impl Fn(K) -> T,
    mut apply: impl FnMut(Change<T>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
{
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing: Vec<T> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            // The watcher relists by itself (410 Gone included).
            Err(e) => {
                tracing::warn!(resource, error = %e, "watch failed; retrying");
                metrics.watch_error(resource);
            }
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(object)) => listing.push(keep(object)),
            Ok(watcher::Event::InitDone) => {
                tracing::debug!(resource, objects = listing.len(), "listed");
                metrics.listed(resource);
                apply(Change::Listed(std::mem::take(&mut listing)));
            }
            Ok(watcher::Event::Apply(object)) => apply(Change::Applied(keep(object))),
            Ok(watcher::Event::Delete(object)) => apply(Change::Deleted(keep(object))),
        }
    }
}

/// A Service's ClusterIPs (both families); a headless one's `None` does
/// not parse, so it has none.
pub fn cluster_ips(service: &k8s_openapi::api::core::v1::Service) -> Vec<std::net::IpAddr> {
    service
        .spec
        .as_ref()
        .and_then(|s| {
            s.cluster_ips
                .clone()
                .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// A client for the configured API server.
pub async fn client(api_server: Option<&str>) -> Result<kube::Client, Error> {
    let config = match api_server {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| Error::ClientConfig(format!("API server `{url}`: {e}")))?,
        ),
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::ClientConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(Error::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_refs_parse_strictly() {
        let label: Label = "istio.io/dataplane-mode=ambient".parse().unwrap();
        assert_eq!(label.key, "istio.io/dataplane-mode");
        assert_eq!(label.value, "ambient");
        assert!("novalue".parse::<Label>().is_err());
        assert!("=x".parse::<Label>().is_err());
        let r: ObjectRef = "redirector-system/redirector-targets".parse().unwrap();
        assert_eq!(r.to_string(), "redirector-system/redirector-targets");
        assert!("justname".parse::<ObjectRef>().is_err());
        assert!("a/b/c".parse::<ObjectRef>().is_err());
    }

    #[test]
    fn selection_needs_the_namespace_label_and_no_pod_opt_out() {
        let selection = Selection {
            namespace_labels: vec![
                DEFAULT_NAMESPACE_LABEL.parse().unwrap(),
                AMBIENT_NAMESPACE_LABEL.parse().unwrap(),
            ],
            pod_opt_out_labels: vec![DEFAULT_POD_OPT_OUT_LABEL.parse().unwrap()],
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(selection.namespace_opted_in(&labels(&[("redirector.io/steering", "enabled")])));
        assert!(selection.namespace_opted_in(&labels(&[("istio.io/dataplane-mode", "ambient")])));
        assert!(!selection.namespace_opted_in(&labels(&[("redirector.io/steering", "disabled")])));
        assert!(!selection.namespace_opted_in(&labels(&[])));
        assert!(selection.pod_opted_out(&labels(&[("redirector.io/steering", "disabled")])));
        assert!(!selection.pod_opted_out(&labels(&[("app", "shop")])));
    }
}
