//! Who answers for a meshed address, from the API, as ztunnel keys it: a
//! pod address is answered by the pod's own identity (its namespace and
//! `serviceAccountName`), a Service address by the identities of the pods
//! its selector picks, plus the service accounts Istio's
//! `alpha.istio.io/kubernetes-serviceaccounts` annotation names (the
//! Service's `subjectAltNames`).
//!
//! In the mesh means in Istio ambient: a pod in a namespace labelled
//! `istio.io/dataplane-mode=ambient`, not opted out, not on the host's
//! network (whose address is its node's). Such an address is dialled through
//! the HBONE listener on it (the pod's ztunnel) and must prove one of those
//! identities. [`address_identities`] is the pure decision; [`follow`] keeps
//! it equal to the API with three watches (Namespaces, Pods, Services of
//! the whole cluster) and publishes each new map.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{Api, Resource, ResourceExt as _, runtime::watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::{
    AMBIENT_NAMESPACE_LABEL, AMBIENT_POD_OPT_OUT_LABEL, Change, Label, metrics::AgentMetrics,
};
pub use crate::identity::AddressIdentities;
use crate::identity::{Identity, PeerIdentities};

/// The Service annotation whose service accounts (of the Service's own
/// namespace, comma-separated) Istio adds to the Service's SANs.
pub const SERVICE_ACCOUNTS_ANNOTATION: &str = "alpha.istio.io/kubernetes-serviceaccounts";
/// Events arriving together are folded into one new map.
const SETTLE: Duration = Duration::from_millis(100);

/// What a Pod says about its place in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPod {
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be someone else's.
    pub finished: bool,
}

/// What a Service says: its addresses, the pods it selects, extra SANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshService {
    pub namespace: String,
    pub cluster_ips: Vec<IpAddr>,
    /// `None` or empty: endpoints managed by hand, no pod picked here.
    pub selector: Option<BTreeMap<String, String>>,
    /// Service accounts of the Service's namespace named by annotation.
    pub san_accounts: Vec<String>,
}

/// The meshed addresses, from namespace labels, pods and services (pure).
pub fn address_identities<'a>(
    trust_domain: &str,
    namespaces: &HashMap<String, BTreeMap<String, String>>,
    pods: impl IntoIterator<Item = &'a MeshPod>,
    services: impl IntoIterator<Item = &'a MeshService>,
) -> AddressIdentities {
    let ambient: Label = AMBIENT_NAMESPACE_LABEL.parse().expect("a label");
    let opted_out: Label = AMBIENT_POD_OPT_OUT_LABEL.parse().expect("a label");
    let identity = |namespace: &str, account: &str| Identity::new(trust_domain, namespace, account);
    // Meshed pods by namespace: the only ones a Service may pick here.
    let mut meshed: HashMap<&str, Vec<&MeshPod>> = HashMap::new();
    for pod in pods {
        let in_mesh = namespaces
            .get(&pod.namespace)
            .is_some_and(|labels| ambient.matches(labels))
            && !opted_out.matches(&pod.labels)
            && !pod.host_network
            && !pod.finished
            && !pod.ips.is_empty();
        if in_mesh {
            meshed.entry(&pod.namespace).or_default().push(pod);
        }
    }
    let mut named: HashMap<IpAddr, Vec<Identity>> = HashMap::new();
    for pod in meshed.values().flatten() {
        for ip in &pod.ips {
            named
                .entry(*ip)
                .or_default()
                .push(identity(&pod.namespace, &pod.service_account));
        }
    }
    for service in services {
        let Some(selector) = service.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let picked: Vec<Identity> = meshed
            .get(service.namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|pod| selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
            .map(|pod| identity(&pod.namespace, &pod.service_account))
            .collect();
        // A Service none of whose pods is in the mesh is dialled directly.
        if picked.is_empty() {
            continue;
        }
        let sans = service
            .san_accounts
            .iter()
            .map(|account| identity(&service.namespace, account));
        let all: Vec<Identity> = picked.into_iter().chain(sans).collect();
        for ip in &service.cluster_ips {
            named.entry(*ip).or_default().extend(all.iter().cloned());
        }
    }
    named
        .into_iter()
        .map(|(ip, ids)| (ip, PeerIdentities::new(ids)))
        .collect()
}

impl MeshPod {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| {
                s.pod_ips
                    .as_ref()
                    .map(|ips| ips.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
                    .or_else(|| s.pod_ip.clone().map(|ip| vec![ip]))
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        Self {
            namespace: pod.namespace().unwrap_or_default(),
            // The API server sets it; "default" is what it would set.
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".into()),
            ips,
            labels: pod.labels().clone(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        }
    }
}

impl MeshService {
    pub fn from_service(service: &Service) -> Self {
        let spec = service.spec.as_ref();
        let san_accounts = service
            .annotations()
            .get(SERVICE_ACCOUNTS_ANNOTATION)
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|sa| !sa.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            namespace: service.namespace().unwrap_or_default(),
            cluster_ips: super::cluster_ips(service),
            selector: spec.and_then(|s| s.selector.clone()),
            san_accounts,
        }
    }
}

/// The API's objects, as the three watches last said.
#[derive(Default)]
struct Directory {
    namespaces: HashMap<String, BTreeMap<String, String>>,
    pods: HashMap<String, MeshPod>,
    services: HashMap<String, MeshService>,
    /// How many of the three watches have their first list in.
    listed: u8,
}

/// Starts the watches; the receiver holds the map (empty until every
/// first list is in, so no address is meshed from half a picture).
pub fn follow(
    client: kube::Client,
    trust_domain: String,
    metrics: Arc<AgentMetrics>,
) -> watch::Receiver<Arc<AddressIdentities>> {
    let (publish, receiver) = watch::channel(Arc::new(AddressIdentities::new()));
    let each = Watch {
        directory: Arc::new(Mutex::new(Directory::default())),
        changed: Arc::new(Notify::new()),
        metrics: Arc::clone(&metrics),
    };
    tokio::spawn(each.clone().run(
        Api::<Namespace>::all(client.clone()),
        "mesh_namespaces",
        |d| &mut d.namespaces,
        |ns: &Namespace| Some((ns.name_any(), ns.labels().clone())),
    ));
    tokio::spawn(each.clone().run(
        Api::<Pod>::all(client.clone()),
        "mesh_pods",
        |d| &mut d.pods,
        |pod: &Pod| Some((pod.metadata.uid.clone()?, MeshPod::from_pod(pod))),
    ));
    tokio::spawn(each.clone().run(
        Api::<Service>::all(client),
        "mesh_services",
        |d| &mut d.services,
        |svc: &Service| Some((svc.metadata.uid.clone()?, MeshService::from_service(svc))),
    ));
    tokio::spawn(async move {
        loop {
            each.changed.notified().await;
            tokio::time::sleep(SETTLE).await;
            let map = {
                let d = each.lock();
                if d.listed < 3 {
                    continue;
                }
                address_identities(
                    &trust_domain,
                    &d.namespaces,
                    d.pods.values(),
                    d.services.values(),
                )
            };
            metrics.mesh_addresses(map.len());
            if **publish.borrow() != map {
                debug!(addresses = map.len(), "meshed addresses changed");
                publish.send_replace(Arc::new(map));
            }
            if publish.is_closed() {
                return;
            }
        }
    });
    info!("meshed addresses and their identities follow the API");
    receiver
}

/// One watch's handles on the shared directory.
#[derive(Clone)]
struct Watch {
    directory: Arc<Mutex<Directory>>,
    changed: Arc<Notify>,
    metrics: Arc<AgentMetrics>,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps one map of the directory equal to the API's objects of `K`.
    async fn run<K, V>(
        self,
        api: Api<K>,
        resource: &'static str,
        slot: fn(&mut Directory) -> &mut HashMap<String, V>,
        entry: fn(&K) -> Option<(String, V)>,
    ) where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        V: Send,
    {
        let mut first = true;
        let config = watcher::Config::default();
        let keep = |object: K| entry(&object);
        super::follow(api, config, resource, &self.metrics, keep, |change| {
            {
                let mut directory = self.lock();
                match change {
                    Change::Listed(objects) => {
                        *slot(&mut directory) = objects.into_iter().flatten().collect();
                        if std::mem::take(&mut first) {
                            directory.listed += 1;
                        }
                    }
                    Change::Applied(Some((key, value))) => {
                        slot(&mut directory).insert(key, value);
                    }
                    Change::Deleted(Some((key, _))) => {
                        slot(&mut directory).remove(&key);
                    }
                    // No key (no UID): nothing kept for it.
                    Change::Applied(None) | Change::Deleted(None) => {}
                }
            }
            self.changed.notify_one();
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(namespace: &str, account: &str, ip: &str, pairs: &[(&str, &str)]) -> MeshPod {
        MeshPod {
            namespace: namespace.into(),
            service_account: account.into(),
            ips: vec![ip.parse().unwrap()],
            labels: labels(pairs),
            host_network: false,
            finished: false,
        }
    }

    fn ambient_namespaces(names: &[&str]) -> HashMap<String, BTreeMap<String, String>> {
        let mut all: HashMap<_, _> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    labels(&[("istio.io/dataplane-mode", "ambient")]),
                )
            })
            .collect();
        all.insert("plain".into(), labels(&[]));
        all
    }

    fn ids(list: &[&str]) -> PeerIdentities {
        PeerIdentities::new(list.iter().map(|s| s.parse::<Identity>().unwrap()))
    }

    #[test]
    fn a_pod_address_is_answered_by_its_service_account_in_ambient_namespaces_only() {
        let namespaces = ambient_namespaces(&["shop"]);
        let mut opted_out = pod("shop", "legacy", "10.0.1.3", &[]);
        opted_out
            .labels
            .insert("istio.io/dataplane-mode".into(), "none".into());
        let mut host = pod("shop", "node-exporter", "10.0.0.1", &[]);
        host.host_network = true;
        let mut done = pod("shop", "job", "10.0.1.4", &[]);
        done.finished = true;
        let pods = [
            pod("shop", "cart", "10.0.1.2", &[]),
            opted_out,
            host,
            done,
            pod("plain", "web", "10.0.2.2", &[]),
            pod("unknown", "web", "10.0.2.3", &[]),
        ];
        let map = address_identities("cluster.local", &namespaces, &pods, []);
        assert_eq!(
            map,
            HashMap::from([(
                "10.0.1.2".parse().unwrap(),
                ids(&["spiffe://cluster.local/ns/shop/sa/cart"])
            )]),
            "only the ambient pod is meshed"
        );
    }

    #[test]
    fn a_service_address_is_answered_by_its_meshed_pods_and_annotated_accounts() {
        let namespaces = ambient_namespaces(&["shop", "other"]);
        let pods = [
            pod("shop", "redis-a", "10.0.1.2", &[("app", "redis")]),
            pod(
                "shop",
                "redis-b",
                "10.0.1.3",
                &[("app", "redis"), ("x", "y")],
            ),
            pod("shop", "web", "10.0.1.4", &[("app", "web")]),
            // Same labels, another namespace: not the Service's.
            pod("other", "redis-c", "10.0.3.2", &[("app", "redis")]),
        ];
        let service = |ip: &str, selector: Option<&[(&str, &str)]>, sans: &[&str]| MeshService {
            namespace: "shop".into(),
            cluster_ips: vec![ip.parse().unwrap()],
            selector: selector.map(labels),
            san_accounts: sans.iter().map(|s| s.to_string()).collect(),
        };
        let services = [
            service("10.96.0.10", Some(&[("app", "redis")]), &["redis-svc"]),
            service("10.96.0.11", None, &["manual"]),
            service("10.96.0.12", Some(&[("app", "absent")]), &[]),
        ];
        let map = address_identities("td.example", &namespaces, &pods, &services);
        assert_eq!(
            map.get(&"10.96.0.10".parse().unwrap()),
            Some(&ids(&[
                "spiffe://td.example/ns/shop/sa/redis-a",
                "spiffe://td.example/ns/shop/sa/redis-b",
                "spiffe://td.example/ns/shop/sa/redis-svc",
            ]))
        );
        assert_eq!(map.get(&"10.96.0.11".parse().unwrap()), None, "no selector");
        assert_eq!(
            map.get(&"10.96.0.12".parse().unwrap()),
            None,
            "no meshed pod"
        );
        assert_eq!(map.len(), 5, "four pods and one Service: {map:?}");
    }

    #[test]
    fn pods_and_services_read_from_api_objects() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop", "uid": "u1"},
            "spec": {"containers": [], "serviceAccountName": "cart"},
            "status": {"podIP": "10.0.1.2", "podIPs": [{"ip": "10.0.1.2"}, {"ip": "fd00::2"}]}
        }))
        .unwrap();
        let read = MeshPod::from_pod(&pod);
        assert_eq!(read.service_account, "cart");
        assert_eq!(
            read.ips,
            [
                "10.0.1.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        let unnamed: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"containers": []}
        }))
        .unwrap();
        assert_eq!(MeshPod::from_pod(&unnamed).service_account, "default");
        assert!(MeshPod::from_pod(&unnamed).ips.is_empty());
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "shop", "annotations": {
                SERVICE_ACCOUNTS_ANNOTATION: "a, b,,"
            }},
            "spec": {"clusterIP": "None", "selector": {"app": "redis"}}
        }))
        .unwrap();
        let read = MeshService::from_service(&service);
        assert!(read.cluster_ips.is_empty(), "headless");
        assert_eq!(read.san_accounts, ["a", "b"]);
        assert_eq!(read.selector, Some(labels(&[("app", "redis")])));
    }
}
