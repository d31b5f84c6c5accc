//! The node agent: keeps the enrollment map equal to "the pods on this node
//! in opted-in namespaces, minus opted-out and hostNetwork pods", and the
//! target map equal to the targets ConfigMap resolved against Services.
//!
//! Four watches (kube-runtime watchers: list, then watch from the list's
//! resourceVersion, relist on 410 Gone) feed caches; every change wakes
//! one reconcile loop that diffs desired against enrolled. Nothing is
//! removed before the first complete lists of Namespaces and Pods, so a
//! restarting agent never unenrolls pods it simply has not seen yet.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt::Debug,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::{Api, Resource, ResourceExt as _, runtime::watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::{
    Change, Error, K8sConfig, ObjectRef,
    metrics::AgentMetrics,
    targets::{self, Resolved, ServiceInfo},
};
use crate::{
    cni::wire::{Command, Reply, Request},
    netns::{self, Netns, NetnsRef},
    pods,
    steering::{Maps, TargetSpec},
};

/// While a wanted pod has no process yet, look again this often.
const PENDING_RETRY: Duration = Duration::from_millis(500);
/// Otherwise a full pass this often, for what no event announces (a pod's
/// first process appearing, a process restarted into a new sandbox).
const RESYNC: Duration = Duration::from_secs(10);
/// Enrolled namespaces nobody claims are removed only once every wanted pod
/// is found, or after this long: one of them may be a pod between its CNI
/// ADD and its first process, enrolled before the agent restarted.
const STALE_GRACE: Duration = Duration::from_secs(15);
/// How long a CNI ADD waits for the first lists before deciding alone.
const CNI_SYNC_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
struct PodInfo {
    key: ObjectRef,
    labels: BTreeMap<String, String>,
    host_network: bool,
    /// Succeeded or Failed: its sandbox is gone.
    finished: bool,
}

impl PodInfo {
    fn from_pod(pod: &Pod) -> Option<(String, Self)> {
        let uid = pod.metadata.uid.clone()?.to_ascii_lowercase();
        let spec = pod.spec.as_ref();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Some((
            uid,
            Self {
                key: ObjectRef {
                    namespace: pod.namespace().unwrap_or_default(),
                    name: pod.name_any(),
                },
                labels: pod.labels().clone(),
                host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
                finished: matches!(phase, Some("Succeeded" | "Failed")),
            },
        ))
    }
}

#[derive(Default)]
struct Synced {
    namespaces: bool,
    pods: bool,
    services: bool,
    configmap: bool,
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// This node's pods, by UID.
    pods: HashMap<String, PodInfo>,
    services: HashMap<ObjectRef, ServiceInfo>,
    /// The ConfigMap's `targets` text; `None` while it does not exist.
    targets_text: Option<String>,
    synced: Synced,
    /// Pods this agent enrolled, by UID: their network namespace.
    enrolled: HashMap<String, Netns>,
    /// When the enrolled pods' namespaces were last checked against their
    /// processes.
    last_verified: Option<Instant>,
    /// Network namespaces the CNI plugin named, by pod UID.
    cni_netns: HashMap<String, PathBuf>,
    /// Since when some wanted pod has had no namespace found.
    pending_since: Option<Instant>,
    /// The last targets written to the map.
    applied_targets: Option<BTreeSet<TargetSpec>>,
    targets_error: Option<String>,
}

impl State {
    /// This node's pod `key`, by namespace and name, with its UID.
    fn pod_named(&self, key: &ObjectRef) -> Option<(&String, &PodInfo)> {
        self.pods.iter().find(|(_, p)| &p.key == key)
    }
}

pub struct Agent {
    config: K8sConfig,
    client: kube::Client,
    state: Mutex<State>,
    maps: Mutex<Maps>,
    changed: Notify,
    resolved: watch::Sender<Resolved>,
    /// The host's own namespace, never enrolled whatever a lookup says.
    host_netns: Option<u64>,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// Connects to the API server and starts the watches and the reconcile
    /// loop. `maps` is the agent's own handle on the pinned maps.
    pub async fn start(
        config: K8sConfig,
        maps: Maps,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Arc<Self>, Error> {
        let client = super::client(config.api_server.as_deref()).await?;
        let host_netns = netns::resolve(&NetnsRef::Path(config.proc_root.join("1/ns/net")))
            .ok()
            .map(|n| n.cookie);
        let agent = Arc::new(Self {
            config,
            client,
            state: Mutex::new(State::default()),
            maps: Mutex::new(maps),
            changed: Notify::new(),
            resolved: watch::Sender::new(Resolved::default()),
            host_netns,
            metrics,
        });
        let node_pods =
            watcher::Config::default().fields(&format!("spec.nodeName={}", agent.config.node_name));
        let configmap = watcher::Config::default().fields(&format!(
            "metadata.name={}",
            agent.config.targets_configmap.name
        ));
        tokio::spawn(
            Arc::clone(&agent)
                .watch::<Namespace>(Api::all(agent.client.clone()), watcher::Config::default()),
        );
        tokio::spawn(Arc::clone(&agent).watch::<Pod>(Api::all(agent.client.clone()), node_pods));
        tokio::spawn(
            Arc::clone(&agent)
                .watch::<Service>(Api::all(agent.client.clone()), watcher::Config::default()),
        );
        tokio::spawn(Arc::clone(&agent).watch::<ConfigMap>(
            Api::namespaced(
                agent.client.clone(),
                &agent.config.targets_configmap.namespace,
            ),
            configmap,
        ));
        tokio::spawn(Arc::clone(&agent).reconcile_loop());
        info!(node = %agent.config.node_name, "Kubernetes agent started");
        Ok(agent)
    }

    /// The targets as last resolved; changes as Services and the ConfigMap do.
    pub fn resolved(&self) -> watch::Receiver<Resolved> {
        self.resolved.subscribe()
    }

    /// The ambient mesh's addresses and identities, from watches of the
    /// whole cluster started now.
    pub fn follow_mesh(
        &self,
        trust_domain: String,
    ) -> watch::Receiver<Arc<super::workloads::AddressIdentities>> {
        super::workloads::follow(self.client.clone(), trust_domain, Arc::clone(&self.metrics))
    }

    /// Whether the first lists of Namespaces and Pods are in.
    pub fn synced(&self) -> bool {
        let state = self.lock();
        state.synced.namespaces && state.synced.pods
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn watch<K>(self: Arc<Self>, api: Api<K>, config: watcher::Config)
    where
        K: Cached + Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        super::follow(
            api,
            config,
            K::KIND,
            &self.metrics,
            |k| k,
            |change| {
                {
                    let mut state = self.lock();
                    match change {
                        Change::Listed(objects) => K::replace_all(&mut state, objects),
                        Change::Applied(object) => object.upsert(&mut state),
                        Change::Deleted(object) => object.remove(&mut state),
                    }
                }
                self.changed.notify_one();
            },
        )
        .await;
    }

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            // Off the proxy's thread: a pass reads /proc and enters
            // namespaces, milliseconds the proxy's clients must not wait.
            let agent = Arc::clone(&self);
            let pending = tokio::task::spawn_blocking(move || agent.reconcile())
                .await
                .unwrap_or(true);
            let wait = if pending { PENDING_RETRY } else { RESYNC };
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass; returns whether some wanted pod is still without a
    /// namespace (so the next pass comes soon).
    fn reconcile(&self) -> bool {
        self.metrics.reconciled();
        let mut state = self.lock();
        if state.synced.services && state.synced.configmap {
            self.apply_targets(&mut state);
        }
        if !(state.synced.namespaces && state.synced.pods) {
            return true;
        }
        let selection = &self.config.selection;
        let wanted: Vec<(String, ObjectRef)> = state
            .pods
            .iter()
            .filter(|(_, pod)| {
                !pod.host_network
                    && !pod.finished
                    && !selection.pod_opted_out(&pod.labels)
                    && state
                        .namespaces
                        .get(&pod.key.namespace)
                        .is_some_and(|labels| selection.namespace_opted_in(labels))
            })
            .map(|(uid, pod)| (uid.clone(), pod.key.clone()))
            .collect();
        let wanted_uids: HashSet<&str> = wanted.iter().map(|(uid, _)| uid.as_str()).collect();

        // Pods no longer wanted (deleted, opted out, namespace unlabelled).
        let mut maps = self.maps();
        let leaving: Vec<(String, u64)> = state
            .enrolled
            .iter()
            .filter(|(uid, _)| !wanted_uids.contains(uid.as_str()))
            .map(|(uid, netns)| (uid.clone(), netns.cookie))
            .collect();
        for (uid, cookie) in leaving {
            state.enrolled.remove(&uid);
            let pod = state.pods.get(&uid).map(|p| p.key.to_string());
            match maps.unenroll(cookie) {
                Ok(_) => info!(
                    pod = pod.as_deref().unwrap_or(&uid),
                    netns_cookie = cookie,
                    "unenrolled"
                ),
                Err(e) => {
                    warn!(pod = pod.as_deref().unwrap_or(&uid), error = %e, "cannot unenroll")
                }
            }
        }
        state
            .cni_netns
            .retain(|uid, _| wanted_uids.contains(uid.as_str()));

        // Every RESYNC, the enrolled pods' processes are looked at again:
        // a sandbox re-created without a CNI ADD to say so (its pause
        // process died) lives in a new network namespace.
        let verify = state.last_verified.is_none_or(|t| t.elapsed() >= RESYNC);
        let unresolved = wanted.iter().any(|(uid, _)| {
            !state.enrolled.contains_key(uid) && !state.cni_netns.contains_key(uid)
        });
        let processes = if verify || unresolved {
            match pods::scan(&self.config.proc_root) {
                Ok(found) => found,
                Err(e) => {
                    warn!(error = %e, "cannot look for pods' processes");
                    HashMap::new()
                }
            }
        } else {
            HashMap::new()
        };
        if verify {
            state.last_verified = Some(Instant::now());
            let moved: Vec<String> = state
                .enrolled
                .iter()
                .filter(|(uid, netns)| {
                    !state.cni_netns.contains_key(*uid)
                        && processes.get(*uid).is_some_and(|pid| {
                            std::fs::metadata(self.config.proc_root.join(format!("{pid}/ns/net")))
                                .is_ok_and(|m| m.ino() != netns.inode)
                        })
                })
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in moved {
                if let Some(old) = state.enrolled.remove(&uid) {
                    let _ = maps.unenroll(old.cookie);
                    info!(pod = %uid, netns_cookie = old.cookie, "the pod's network namespace changed; enrolling the new one");
                }
            }
        }
        // Wanted pods not enrolled yet: by the CNI's namespace, else by a
        // process of the pod.
        let missing: Vec<&(String, ObjectRef)> = wanted
            .iter()
            .filter(|(uid, _)| !state.enrolled.contains_key(uid))
            .collect();
        let mut pending = 0;
        for (uid, key) in missing {
            let reference = match (state.cni_netns.get(uid), processes.get(uid)) {
                (Some(path), _) => NetnsRef::Path(path.clone()),
                (None, Some(pid)) => {
                    NetnsRef::Path(self.config.proc_root.join(format!("{pid}/ns/net")))
                }
                (None, None) => {
                    pending += 1;
                    continue;
                }
            };
            match self.enroll(&mut maps, &reference) {
                Ok(netns) => {
                    info!(pod = %key, netns = %reference, netns_cookie = netns.cookie, "enrolled");
                    state.enrolled.insert(uid.clone(), netns);
                }
                Err(e) => {
                    pending += 1;
                    warn!(pod = %key, error = %e, "cannot enroll");
                }
            }
        }

        // Namespaces enrolled that no wanted pod claims: left by pods
        // deleted while the agent was down, or by hand.
        let now = Instant::now();
        let since = *state.pending_since.get_or_insert(now);
        if pending == 0 {
            state.pending_since = None;
        }
        if pending == 0 || now.duration_since(since) >= STALE_GRACE {
            let claimed: HashSet<u64> = state.enrolled.values().map(|n| n.cookie).collect();
            match maps.enrolled() {
                Ok(entries) => {
                    for (cookie, _) in entries {
                        if !claimed.contains(&cookie) && maps.unenroll(cookie).is_ok() {
                            info!(netns_cookie = cookie, "removed an enrollment no pod claims");
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the enrollment map"),
            }
        }
        self.metrics.pods(state.enrolled.len(), pending);
        pending > 0
    }

    fn enroll(&self, maps: &mut Maps, reference: &NetnsRef) -> Result<Netns, String> {
        let netns = netns::resolve(reference).map_err(|e| e.to_string())?;
        if Some(netns.cookie) == self.host_netns {
            return Err(format!(
                "{reference} is the host network namespace; a hostNetwork pod is never enrolled"
            ));
        }
        maps.enroll(netns).map_err(|e| e.to_string())?;
        Ok(netns)
    }

    fn apply_targets(&self, state: &mut State) {
        let directives = match state.targets_text.as_deref().map(targets::parse) {
            None => Vec::new(),
            Some(Ok(directives)) => directives,
            Some(Err(e)) => {
                let message = format!(
                    "targets ConfigMap {}: {e}; keeping the targets in force",
                    self.config.targets_configmap
                );
                if state.targets_error.as_deref() != Some(&message) {
                    warn!("{message}");
                    state.targets_error = Some(message);
                }
                return;
            }
        };
        state.targets_error = None;
        // The daemon serves the backends and writes the target map (each
        // target with its backend's id); the agent only resolves them.
        let resolved = targets::resolve(&directives, &state.services);
        if state.applied_targets.as_ref() != Some(&resolved.targets) {
            for why in &resolved.unresolved {
                warn!(configmap = %self.config.targets_configmap, "{why}");
            }
            info!(%resolved, "Redis targets resolved");
            state.applied_targets = Some(resolved.targets.clone());
        }
        self.resolved.send_if_modified(|current| {
            let changed = *current != resolved;
            *current = resolved;
            changed
        });
    }

    /// The CNI plugin's request: enroll (or unenroll) a pod's namespace as
    /// its sandbox is set up (or torn down).
    pub async fn on_cni(self: Arc<Self>, request: Request) -> Reply {
        let pod = ObjectRef {
            namespace: request.pod_namespace.clone(),
            name: request.pod_name.clone(),
        };
        let (command, reply) = match request.command {
            Command::Add => ("ADD", self.cni_add(pod, request).await),
            Command::Del => ("DEL", self.cni_del(&pod, &request)),
        };
        let outcome = match &reply {
            Reply::Enrolled { .. } => "enrolled",
            Reply::Skipped { .. } => "skipped",
            Reply::Unenrolled { .. } => "unenrolled",
            Reply::Failed { .. } => "failed",
        };
        self.metrics.cni_request(command, outcome);
        reply
    }

    async fn cni_add(&self, pod: ObjectRef, request: Request) -> Reply {
        let deadline = Instant::now() + CNI_SYNC_WAIT;
        while !self.synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cached = self.lock().namespaces.get(&pod.namespace).cloned();
        let namespace_labels = match cached {
            Some(labels) => Some(labels),
            None => Api::<Namespace>::all(self.client.clone())
                .get_opt(&pod.namespace)
                .await
                .ok()
                .flatten()
                .map(|ns| ns.labels().clone()),
        };
        let selection = &self.config.selection;
        match namespace_labels {
            None => {
                return Reply::Failed {
                    error: format!("namespace {} is unknown to the agent", pod.namespace),
                };
            }
            Some(labels) if !selection.namespace_opted_in(&labels) => {
                return Reply::Skipped {
                    reason: format!("namespace {} is not opted in", pod.namespace),
                };
            }
            Some(_) => {}
        }
        // The pod as the API has it: from the watch, else asked directly
        // (the watch may lag the kubelet by a moment).
        let cached = self
            .lock()
            .pod_named(&pod)
            .map(|(uid, p)| (uid.clone(), p.clone()));
        let found = match cached {
            Some(found) => Some(found),
            None => Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
                .get_opt(&pod.name)
                .await
                .ok()
                .flatten()
                .and_then(|p| PodInfo::from_pod(&p)),
        };
        let Some((uid, info)) = found else {
            return Reply::Failed {
                error: format!("pod {pod} is unknown to the API server"),
            };
        };
        if selection.pod_opted_out(&info.labels) {
            return Reply::Skipped {
                reason: format!("pod {pod} opted out"),
            };
        }
        let Some(path) = self.netns_path(&request) else {
            return Reply::Failed {
                error: "the runtime gave no network namespace (CNI_NETNS)".into(),
            };
        };
        let mut state = self.lock();
        let result = self.enroll(&mut self.maps(), &NetnsRef::Path(path.clone()));
        match result {
            Ok(netns) => {
                info!(pod = %pod, netns = %path.display(), netns_cookie = netns.cookie, "enrolled at sandbox setup (CNI)");
                state.pods.entry(uid.clone()).or_insert(info);
                state.enrolled.insert(uid.clone(), netns);
                state.cni_netns.insert(uid, path);
                Reply::Enrolled {
                    netns_cookie: netns.cookie,
                }
            }
            Err(error) => Reply::Failed { error },
        }
    }

    /// The CNI request's network namespace, as this agent can open it.
    fn netns_path(&self, request: &Request) -> Option<PathBuf> {
        let path = request.netns.as_ref()?;
        Some(crate::pods::host_proc_path(&self.config.proc_root, path))
    }

    fn cni_del(&self, pod: &ObjectRef, request: &Request) -> Reply {
        let mut state = self.lock();
        let uid = request
            .pod_uid
            .as_ref()
            .map(|u| u.to_ascii_lowercase())
            .or_else(|| state.pod_named(pod).map(|(uid, _)| uid.clone()));
        let mut cookies = Vec::new();
        if let Some(uid) = &uid {
            cookies.extend(state.enrolled.remove(uid).map(|n| n.cookie));
            state.cni_netns.remove(uid);
        }
        if let Some(path) = self.netns_path(request)
            && let Ok(netns) = netns::resolve(&NetnsRef::Path(path))
        {
            cookies.push(netns.cookie);
        }
        let mut maps = self.maps();
        let mut was_enrolled = false;
        for cookie in cookies {
            was_enrolled |= maps.unenroll(cookie).unwrap_or(false);
        }
        if was_enrolled {
            info!(pod = %pod, "unenrolled at sandbox teardown (CNI)");
        }
        Reply::Unenrolled { was_enrolled }
    }
}

/// How each watched kind lands in the agent's state.
trait Cached: Sized {
    const KIND: &'static str;
    fn replace_all(state: &mut State, objects: Vec<Self>);
    fn upsert(self, state: &mut State);
    fn remove(self, state: &mut State);
}

impl Cached for Namespace {
    const KIND: &'static str = "namespaces";
    fn replace_all(state: &mut State, objects: Vec<Self>) {
        state.namespaces = objects
            .into_iter()
            .map(|ns| (ns.name_any(), ns.labels().clone()))
            .collect();
        state.synced.namespaces = true;
    }
    fn upsert(self, state: &mut State) {
        state
            .namespaces
            .insert(self.name_any(), self.labels().clone());
    }
    fn remove(self, state: &mut State) {
        state.namespaces.remove(&self.name_any());
    }
}

impl Cached for Pod {
    const KIND: &'static str = "pods";
    fn replace_all(state: &mut State, objects: Vec<Self>) {
        state.pods = objects.iter().filter_map(PodInfo::from_pod).collect();
        state.synced.pods = true;
    }
    fn upsert(self, state: &mut State) {
        if let Some((uid, info)) = PodInfo::from_pod(&self) {
            state.pods.insert(uid, info);
        }
    }
    fn remove(self, state: &mut State) {
        if let Some(uid) = &self.metadata.uid {
            state.pods.remove(&uid.to_ascii_lowercase());
        }
    }
}

fn service_entry(service: &Service) -> (ObjectRef, ServiceInfo) {
    let spec = service.spec.as_ref();
    let cluster_ips = super::cluster_ips(service);
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect()
        })
        .unwrap_or_default();
    (
        ObjectRef {
            namespace: service.namespace().unwrap_or_default(),
            name: service.name_any(),
        },
        ServiceInfo { cluster_ips, ports },
    )
}

impl Cached for Service {
    const KIND: &'static str = "services";
    fn replace_all(state: &mut State, objects: Vec<Self>) {
        state.services = objects.iter().map(service_entry).collect();
        state.synced.services = true;
    }
    fn upsert(self, state: &mut State) {
        let (key, info) = service_entry(&self);
        state.services.insert(key, info);
    }
    fn remove(self, state: &mut State) {
        state.services.remove(&service_entry(&self).0);
    }
}

fn targets_text(configmap: &ConfigMap) -> Option<String> {
    Some(
        configmap
            .data
            .as_ref()
            .and_then(|d| d.get(targets::KEY))
            .cloned()
            .unwrap_or_default(),
    )
}

impl Cached for ConfigMap {
    const KIND: &'static str = "configmaps";
    fn replace_all(state: &mut State, objects: Vec<Self>) {
        state.targets_text = objects.first().and_then(targets_text);
        state.synced.configmap = true;
    }
    fn upsert(self, state: &mut State) {
        state.targets_text = targets_text(&self);
    }
    fn remove(self, state: &mut State) {
        state.targets_text = None;
    }
}
