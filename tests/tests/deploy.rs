//! The Kubernetes manifests under `deploy/`, rendered offline with the real
//! `kubectl kustomize` (no cluster): every object of a kind k8s-openapi knows
//! goes through its typed struct and back, and any field the struct drops (a
//! typo, a misplaced key) fails the test by path. Then the documented
//! properties are checked on the typed objects, and every `--flag` the
//! manifests pass to `redirector` is checked against the real binary's help.

#[path = "support/kustomize.rs"]
mod kustomize;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
};

use k8s_openapi::{
    Metadata,
    api::{
        apps::v1::DaemonSet,
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount,
            VolumeMount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "redirector-system";
const IMAGE: &str = "ghcr.io/redirector-dev/redirector:0.1.0";
const BINARY: &str = "/usr/local/bin/redirector";
const ADMIN_PORT: i32 = 15020;
/// The port a bare IP in `--metrics-addr` takes (`redirector run --help`).
const METRICS_PORT: i32 = 15020;
/// The port a bare IP in `--proxy-addr` takes (`redirector run --help`).
const PROXY_PORT: i32 = 15379;
const AGENT_DS: &str = "DaemonSet redirector-system/redirector";

/// The agent's command line, as the README documents it.
const AGENT_ARGS: &[&str] = &[
    "run",
    "--kubernetes",
    "--node-name=$(NODE_NAME)",
    "--proxy-addr=$(NODE_IPS)",
    "--admin-addr=127.0.0.1:15020",
    "--metrics-addr=$(NODE_IP)",
    "--ready-file=/run/redirector-pod/ready",
    "--drain-grace=20s",
    "--cgroup-root=/host/sys/fs/cgroup",
    "--pin-dir=/sys/fs/bpf/redirector",
    "--proc-root=/host/proc",
    "--cni-socket=/var/run/redirector/cni.sock",
    "--cni-conf-dir=/host/etc/cni/net.d",
    "--cni-bin-dir=/host/opt/cni/bin",
    "--targets-configmap=redirector-system/redirector-targets",
    "--namespace-label=redirector.io/steering=enabled",
    "--pod-opt-out-label=redirector.io/steering=disabled",
];
const CNI_INSTALL_ARGS: &[&str] = &[
    "cni",
    "install",
    "--conf-dir=/host/etc/cni/net.d",
    "--bin-dir=/host/opt/cni/bin",
    "--socket=/var/run/redirector/cni.sock",
    "--wait=300",
];
const UNINSTALL_ARGS: &[&str] = &["uninstall", "--pin-dir=/sys/fs/bpf/redirector"];
const CNI_UNINSTALL_ARGS: &[&str] = &[
    "cni",
    "uninstall",
    "--conf-dir=/host/etc/cni/net.d",
    "--bin-dir=/host/opt/cni/bin",
];
/// The mount-bpffs overlay's init container.
const MOUNT_BPFFS_ARGS: &[&str] = &["mount-bpffs", "/sys/fs/bpf"];
/// Where k3s keeps the CNI configuration and plugins (deploy/overlays/k3s).
const K3S_CNI_CONF: &str = "/var/lib/rancher/k3s/agent/etc/cni/net.d";
const K3S_CNI_BIN: &str = "/var/lib/rancher/k3s/data/cni";
/// The agent's capabilities, each justified in deploy/base/daemonset.yaml
/// and deploy/README.md.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

const BASE_OBJECTS: &[&str] = &[
    "ClusterRole redirector",
    "ClusterRoleBinding redirector",
    "ConfigMap redirector-system/redirector-grafana-dashboard",
    "ConfigMap redirector-system/redirector-targets",
    "DaemonSet redirector-system/redirector",
    "Namespace redirector-system",
    "ResourceQuota redirector-system/redirector-node-critical",
    "Role redirector-system/redirector-config",
    "RoleBinding redirector-system/redirector-config",
    "Service redirector-system/redirector-metrics",
    "ServiceAccount redirector-system/redirector",
];

// ---------------------------------------------------------------------------
// Rendering and the typed round trip

/// One `kubectl kustomize` render, every object parsed into its typed struct.
#[derive(Default)]
struct Rendered {
    dir: &'static str,
    docs: Vec<Value>,
    namespaces: Vec<Namespace>,
    quotas: Vec<ResourceQuota>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    service_monitors: Vec<ServiceMonitor>,
}

fn render(dir: &'static str) -> Rendered {
    let docs = kustomize::render_docs(dir);
    let mut rendered = Rendered {
        dir,
        ..Rendered::default()
    };
    let mut problems = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or("<no kind>");
        let p = &mut problems;
        match kind {
            "Namespace" => rendered.namespaces.extend(typed(doc, p)),
            "ResourceQuota" => rendered.quotas.extend(typed(doc, p)),
            "ServiceAccount" => rendered.service_accounts.extend(typed(doc, p)),
            "ClusterRole" => rendered.cluster_roles.extend(typed(doc, p)),
            "ClusterRoleBinding" => rendered.cluster_role_bindings.extend(typed(doc, p)),
            "Role" => rendered.roles.extend(typed(doc, p)),
            "RoleBinding" => rendered.role_bindings.extend(typed(doc, p)),
            "ConfigMap" => rendered.config_maps.extend(typed(doc, p)),
            "DaemonSet" => rendered.daemon_sets.extend(typed(doc, p)),
            "Service" => rendered.services.extend(typed(doc, p)),
            "ServiceMonitor" => rendered.service_monitors.extend(service_monitor(doc, p)),
            other => p.push(format!(
                "{}: kind {other} has no typed check here",
                doc_id(doc)
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "{dir}: objects that do not survive their typed struct:\n  {}",
        problems.join("\n  ")
    );
    rendered.docs = docs;
    rendered
}

/// `doc` through `T` and back: anything the typed struct drops, adds or
/// changes is reported by path.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, problems: &mut Vec<String>) -> Option<T> {
    let id = doc_id(doc);
    let object: T = match serde_json::from_value(doc.clone()) {
        Ok(object) => object,
        Err(e) => {
            problems.push(format!("{id}: does not parse as its type: {e}"));
            return None;
        }
    };
    let back = serde_json::to_value(&object).expect("typed objects serialize");
    let before = problems.len();
    diff(&id, "", doc, &back, problems);
    (problems.len() == before).then_some(object)
}

fn diff(id: &str, path: &str, original: &Value, typed: &Value, problems: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => diff(id, &here, value, other, problems),
                    None => problems.push(format!(
                        "{id}: {here} is not a field of the typed object (misspelt or \
                         misplaced?): {value}"
                    )),
                }
            }
            for (key, value) in b {
                if !a.contains_key(key) {
                    problems.push(format!("{id}: {path}.{key} appeared: {value}"));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(id, &format!("{path}[{i}]"), x, y, problems);
            }
        }
        _ if original == typed => {}
        _ => problems.push(format!("{id}: {path} {original} came back as {typed}")),
    }
}

fn doc_id(doc: &Value) -> String {
    let kind = doc["kind"].as_str().unwrap_or("?");
    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The Prometheus operator's ServiceMonitor (a CRD k8s-openapi does not
/// know), limited to the fields deploy/ uses; any other key fails.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(default)]
    relabelings: Vec<Relabeling>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

fn service_monitor(doc: &Value, problems: &mut Vec<String>) -> Option<ServiceMonitor> {
    let id = doc_id(doc);
    let monitor: ServiceMonitor = match serde_json::from_value(doc.clone()) {
        Ok(monitor) => monitor,
        Err(e) => {
            problems.push(format!(
                "{id}: not a ServiceMonitor as deploy/ uses it: {e}"
            ));
            return None;
        }
    };
    // Its metadata goes through ObjectMeta's round trip like any object's.
    let before = problems.len();
    typed::<ObjectMeta>(&doc["metadata"], problems);
    (problems.len() == before).then_some(monitor)
}

impl Rendered {
    /// "Kind namespace/name" of every object, sorted.
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.docs.iter().map(doc_id).collect();
        ids.sort();
        ids
    }

    fn doc(&self, id: &str) -> &Value {
        self.docs
            .iter()
            .find(|doc| doc_id(doc) == id)
            .unwrap_or_else(|| panic!("{}: no {id}", self.dir))
    }

    fn daemon_set(&self, name: &str) -> &DaemonSet {
        named(self.dir, &self.daemon_sets, name)
    }

    fn config_map(&self, name: &str) -> &ConfigMap {
        named(self.dir, &self.config_maps, name)
    }
}

fn named<'a, T: Metadata<Ty = ObjectMeta>>(dir: &str, items: &'a [T], name: &str) -> &'a T {
    items
        .iter()
        .find(|item| item.metadata().name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{dir}: no {} {name}", T::KIND))
}

// ---------------------------------------------------------------------------
// Accessors on the typed objects

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("DaemonSet has a pod spec")
}

fn pod_labels(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default()
}

fn init_containers(pod: &PodSpec) -> &[Container] {
    pod.init_containers.as_deref().unwrap_or_default()
}

fn all_containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    init_containers(pod).iter().chain(&pod.containers)
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    all_containers(pod)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Container) -> Vec<&str> {
    c.args
        .iter()
        .flatten()
        .map(String::as_str)
        .collect::<Vec<_>>()
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &[&'a str], name: &str) -> &'a str {
    let prefix = format!("{name}=");
    args.iter()
        .find_map(|arg| arg.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= in {args:?}"))
}

/// What `c` mounts at exactly `path`.
fn volume_mount<'a>(c: &'a Container, path: &str) -> &'a VolumeMount {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", c.name))
}

/// Where an environment variable's value comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EnvSource {
    Value(String),
    /// The downward API (`fieldRef.fieldPath`).
    Field(String),
    /// A Secret, a ConfigMap, a resource (none here).
    Other,
}

fn env(c: &Container) -> BTreeMap<String, EnvSource> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|from| from.field_ref.as_ref());
            let source = match (&e.value, field) {
                (_, Some(f)) => EnvSource::Field(f.field_path.clone()),
                (Some(value), None) => EnvSource::Value(value.clone()),
                (None, None) => EnvSource::Other,
            };
            (e.name.clone(), source)
        })
        .collect()
}

fn field(path: &str) -> EnvSource {
    EnvSource::Field(path.to_string())
}

/// The host path that `path` inside container `c` is, through its hostPath
/// mounts (the longest mount path that is a prefix of it), and whether that
/// mount is read-only.
fn host_path(pod: &PodSpec, c: &Container, path: &str) -> Option<(String, bool)> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("mount {} names no volume", mount.name));
    let host = volume.host_path.as_ref()?;
    let rest = Path::new(path)
        .strip_prefix(&mount.mount_path)
        .expect("prefix");
    let resolved = Path::new(&host.path).join(rest);
    Some((
        resolved.to_string_lossy().trim_end_matches('/').to_string(),
        mount.read_only == Some(true),
    ))
}

fn assert_host_path(pod: &PodSpec, c: &Container, path: &str, host: &str) -> bool {
    let (resolved, read_only) = host_path(pod, c, path)
        .unwrap_or_else(|| panic!("{}: {path} is on no hostPath mount", c.name));
    assert_eq!(
        resolved, host,
        "{}: {path} is not the host's {host}",
        c.name
    );
    read_only
}

fn capabilities(c: &Container) -> (BTreeSet<&str>, BTreeSet<&str>) {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|sc| sc.capabilities.as_ref());
    fn set(list: Option<&Vec<String>>) -> BTreeSet<&str> {
        list.into_iter().flatten().map(String::as_str).collect()
    }
    (
        set(caps.and_then(|c| c.add.as_ref())),
        set(caps.and_then(|c| c.drop.as_ref())),
    )
}

/// What every container here must have: not privileged, every capability
/// dropped (some added back, checked by the caller), no privilege
/// escalation through exec, a read-only root, requests and limits, and no
/// Unconfined seccomp.
fn assert_hardened(pod: &PodSpec, c: &Container) {
    let sc = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no securityContext", c.name));
    assert_ne!(sc.privileged, Some(true), "{}: privileged", c.name);
    assert_eq!(
        capabilities(c).1,
        BTreeSet::from(["ALL"]),
        "{}: must drop ALL",
        c.name
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{}: allowPrivilegeEscalation",
        c.name
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{}: readOnlyRootFilesystem",
        c.name
    );
    let pod_seccomp = pod
        .security_context
        .as_ref()
        .and_then(|sc| sc.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .map(|p| p.type_.as_str())
        .or(pod_seccomp);
    assert_eq!(seccomp, Some("RuntimeDefault"), "{}: seccomp", c.name);
    assert_resources(c);
}

/// CPU and memory requests and limits.
fn assert_resources(c: &Container) {
    let resources = c
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no resources", c.name));
    for (what, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let list = list
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no resource {what}", c.name));
        for resource in ["cpu", "memory"] {
            assert!(
                list.contains_key(resource),
                "{}: no {resource} in {what}",
                c.name
            );
        }
    }
}

fn app_armor(c: &Container) -> Option<&str> {
    c.security_context
        .as_ref()
        .and_then(|sc| sc.app_armor_profile.as_ref())
        .map(|p| p.type_.as_str())
}

fn assert_tolerates_everything(ds: &DaemonSet) {
    let tolerations = pod_spec(ds).tolerations.as_deref().unwrap_or_default();
    assert!(
        !tolerations.is_empty(),
        "{:?}: no tolerations",
        ds.metadata.name
    );
    for t in tolerations {
        assert_eq!(t.operator.as_deref(), Some("Exists"), "{t:?}");
    }
    assert!(
        tolerations
            .iter()
            .any(|t| t.key.is_none() && t.effect.is_none()),
        "no toleration matches every taint (operator Exists, no key, no effect): {tolerations:?}"
    );
}

/// install-cni and the agent's keeper (`--cni-conf-dir`, `--cni-bin-dir`)
/// both write the node's CNI directories `conf` and `bin`.
fn assert_cni_dirs(pod: &PodSpec, conf: &str, bin: &str) {
    for (name, conf_flag, bin_flag) in [
        ("install-cni", "--conf-dir", "--bin-dir"),
        ("redirector", "--cni-conf-dir", "--cni-bin-dir"),
    ] {
        let c = container(pod, name);
        let a = args(c);
        for (dir, host) in [(flag(&a, conf_flag), conf), (flag(&a, bin_flag), bin)] {
            assert!(
                !assert_host_path(pod, c, dir, host),
                "{name}: {dir} is written"
            );
        }
    }
}

/// `--flag`'s value as a listen address: its host (an IP or a `$(VAR)`),
/// and its port, or `default_port` when it has none (as the binary reads a
/// bare IP).
fn listen_addr(value: &str, default_port: i32) -> (String, i32) {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return (addr.ip().to_string(), i32::from(addr.port()));
    }
    if value.parse::<std::net::IpAddr>().is_ok() {
        return (value.to_string(), default_port);
    }
    match value.rsplit_once(':') {
        Some((host, port)) if host.starts_with("$(") && host.ends_with(')') => (
            host.to_string(),
            port.parse().unwrap_or_else(|_| panic!("{value}: bad port")),
        ),
        _ if value.starts_with("$(") && value.ends_with(')') => (value.to_string(), default_port),
        _ => panic!("{value}: not IP, IP:PORT, $(VAR) or $(VAR):PORT"),
    }
}

// ---------------------------------------------------------------------------
// The base

#[test]
fn base_renders_the_documented_objects() {
    let base = render("deploy");
    assert_eq!(base.ids(), BASE_OBJECTS, "deploy/ renders");
    for doc in &base.docs {
        let id = doc_id(doc);
        let labels = &doc["metadata"]["labels"];
        for label in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            assert_eq!(labels[label], "redirector", "{id}: label {label}");
        }
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
        if !cluster_scoped.contains(&doc["kind"].as_str().unwrap_or_default()) {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{id}: namespace");
        }
    }
}

#[test]
fn agent_daemonset_is_a_host_agent_with_exact_capabilities() {
    let base = render("deploy");
    let ds = base.daemon_set("redirector");
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("redirector"));
    assert_tolerates_everything(ds);

    let spec = ds.spec.as_ref().expect("spec");
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            pod_labels(ds).get(key),
            Some(value),
            "selector {key}={value} does not select the pod template"
        );
    }
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(
        (rolling.max_unavailable.clone(), rolling.max_surge.clone()),
        (Some(IntOrString::Int(0)), Some(IntOrString::Int(1))),
        "a new agent starts beside the old one, which hands over"
    );
    for c in all_containers(pod) {
        assert!(
            c.ports.as_deref().unwrap_or_default().is_empty(),
            "{}: with hostNetwork a declared port is a hostPort, and the scheduler \
             never places the surge pod beside the old one",
            c.name
        );
    }

    let agent = container(pod, "redirector");
    assert_eq!(pod.containers.len(), 1, "one container");
    assert_eq!(agent.image.as_deref(), Some(IMAGE));
    assert_eq!(agent.command.as_deref(), Some(&[BINARY.to_string()][..]));
    assert_eq!(args(agent), AGENT_ARGS, "the agent's command line");
    for c in all_containers(pod) {
        assert_eq!(c.image.as_deref(), Some(IMAGE), "{}: image", c.name);
        assert_hardened(pod, c);
    }
    assert_eq!(
        capabilities(agent).0,
        AGENT_CAPABILITIES.iter().copied().collect(),
        "the agent's capabilities"
    );
    assert_eq!(app_armor(agent), Some("Unconfined"), "agent AppArmor");
    let install = container(pod, "install-cni");
    assert!(
        capabilities(install).0.is_empty(),
        "install-cni needs no capability"
    );
    assert_eq!(
        args(install),
        CNI_INSTALL_ARGS,
        "install-cni's command line"
    );

    // The downward API: every $(VAR) the args use is defined, and the node
    // facts come from the right fields.
    let env = env(agent);
    assert_eq!(env.get("NODE_NAME"), Some(&field("spec.nodeName")));
    assert_eq!(env.get("NODE_IP"), Some(&field("status.hostIP")));
    assert_eq!(env.get("NODE_IPS"), Some(&field("status.hostIPs")));
    for arg in args(agent) {
        if let Some((_, rest)) = arg.split_once("$(") {
            let var = rest.split(')').next().unwrap_or_default();
            assert!(env.contains_key(var), "{arg}: ${var} is not in env");
        }
    }
}

#[test]
fn agent_and_its_uninstaller_run_on_linux_nodes_only() {
    let linux = Some(BTreeMap::from([(
        "kubernetes.io/os".to_string(),
        "linux".to_string(),
    )]));
    let base = render("deploy");
    let agent = pod_spec(base.daemon_set("redirector"));
    assert_eq!(agent.node_selector, linux, "the agent's nodeSelector");
    let uninstall = render("deploy/uninstall");
    let cleaner = pod_spec(uninstall.daemon_set("redirector-uninstall"));
    assert_eq!(
        cleaner.node_selector, linux,
        "the uninstaller's nodeSelector: on other nodes it never becomes ready"
    );
}

#[test]
fn agent_sees_host_processes_through_proc_root_without_host_pid() {
    let base = render("deploy");
    let pod = pod_spec(base.daemon_set("redirector"));
    assert_ne!(pod.host_pid, Some(true), "no hostPID");
    // A procfs shows the PID namespace that mounted it: the host's /proc,
    // bind-mounted, lists every process on the node.
    let agent = container(pod, "redirector");
    assert!(
        assert_host_path(pod, agent, flag(&args(agent), "--proc-root"), "/proc"),
        "/proc is read-only"
    );
}

#[test]
fn agent_mounts_the_host_paths_its_flags_name() {
    let base = render("deploy");
    let pod = pod_spec(base.daemon_set("redirector"));
    let agent = container(pod, "redirector");
    let a = args(agent);
    let pin_dir = flag(&a, "--pin-dir");
    assert_host_path(pod, agent, pin_dir, "/sys/fs/bpf/redirector");
    assert!(
        assert_host_path(pod, agent, flag(&a, "--cgroup-root"), "/sys/fs/cgroup"),
        "the host cgroup mount is read-only (attaching opens the directory only)"
    );
    let socket = flag(&a, "--cni-socket");
    assert_host_path(pod, agent, socket, "/var/run/redirector/cni.sock");
    let bpffs = volume_mount(agent, "/sys/fs/bpf");
    assert!(Path::new(pin_dir).starts_with(&bpffs.mount_path));
    assert_ne!(bpffs.read_only, Some(true), "pins are written");
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "a bpffs the host mounts later is seen (Bidirectional needs privileged)"
    );

    assert_cni_dirs(pod, "/etc/cni/net.d", "/opt/cni/bin");
    let install = container(pod, "install-cni");
    assert_eq!(
        flag(&args(install), "--socket"),
        socket,
        "plugin and agent share a socket"
    );
    assert_host_path(pod, install, socket, "/var/run/redirector/cni.sock");
}

#[test]
fn agent_opens_runtime_netns_paths_as_the_host_sees_them() {
    let base = render("deploy");
    let pod = pod_spec(base.daemon_set("redirector"));
    let agent = container(pod, "redirector");
    // containerd and CRI-O bind each sandbox's netns there, and CNI_NETNS
    // names that path; the agent opens it in its own mount namespace.
    let netns = "/var/run/netns";
    let sandbox = format!("{netns}/cni-0c9e4d52-7a1b-4f3e-9d2c-5b6a7e8f9012");
    assert_host_path(pod, agent, &sandbox, &sandbox);
    assert_eq!(
        volume_mount(agent, netns).mount_propagation.as_deref(),
        Some("HostToContainer"),
        "sandboxes bound after the agent started must appear in its mount"
    );
}

#[test]
fn proxy_listens_on_every_node_address() {
    let base = render("deploy");
    let agent = container(pod_spec(base.daemon_set("redirector")), "redirector");
    let (host, port) = listen_addr(flag(&args(agent), "--proxy-addr"), PROXY_PORT);
    assert_eq!(host, "$(NODE_IPS)", "one listener per node address");
    assert_eq!(env(agent).get("NODE_IPS"), Some(&field("status.hostIPs")));
    assert_eq!(port, PROXY_PORT, "the documented proxy port");
}

#[test]
fn only_metrics_face_the_network_and_admin_stays_on_loopback() {
    let base = render("deploy");
    let agent = container(pod_spec(base.daemon_set("redirector")), "redirector");
    let a = args(agent);
    let admin: SocketAddr = flag(&a, "--admin-addr")
        .parse()
        .expect("--admin-addr is IP:PORT");
    assert!(admin.ip().is_loopback(), "admin endpoint on {admin}");
    assert_eq!(i32::from(admin.port()), ADMIN_PORT);

    let (host, port) = listen_addr(flag(&a, "--metrics-addr"), METRICS_PORT);
    assert_eq!(host, "$(NODE_IP)", "/metrics on the node address");
    assert_eq!(env(agent).get("NODE_IP"), Some(&field("status.hostIP")));
    assert_eq!(port, METRICS_PORT, "the port the Service targets");
}

#[test]
fn agent_readiness_asks_its_own_pod_and_sigterm_drains() {
    let base = render("deploy");
    let ds = base.daemon_set("redirector");
    let pod = pod_spec(ds);
    let agent = container(pod, "redirector");
    let a = args(agent);
    let admin: SocketAddr = flag(&a, "--admin-addr")
        .parse()
        .expect("--admin-addr is IP:PORT");

    // Two agents share the node's ports during an upgrade: readiness reads
    // this pod's own file, never the port.
    let ready_file = flag(&a, "--ready-file");
    let probe = agent
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.as_deref())
        .expect("an exec readiness probe");
    assert_eq!(
        probe,
        [BINARY, "ready", &format!("--file={ready_file}")],
        "readiness asks this pod's agent"
    );
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(ready_file).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .expect("the ready file's directory is a volume (the root is read-only)");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("volume");
    assert!(
        volume.empty_dir.is_some(),
        "the ready file lives in the pod's own emptyDir, not on the host: {volume:?}"
    );

    // Liveness: either agent answering is fine.
    let live = agent
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP liveness probe");
    assert_eq!(live.path.as_deref(), Some("/healthz/live"));
    assert_eq!(
        live.host,
        Some(admin.ip().to_string()),
        "the kubelet is on the node (hostNetwork)"
    );
    assert_eq!(live.port, IntOrString::Int(admin.port().into()));

    // SIGTERM drains; a preStop over 15020 could reach the new agent.
    assert!(
        agent
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .is_none(),
        "no preStop hook"
    );
    let grace: i64 = flag(&a, "--drain-grace")
        .trim_end_matches('s')
        .parse()
        .expect("--drain-grace in seconds");
    let period = pod.termination_grace_period_seconds.expect("grace period");
    assert!(
        period > grace,
        "terminationGracePeriodSeconds {period} must exceed --drain-grace {grace}s"
    );
}

#[test]
fn rbac_is_read_only_and_least_privilege() {
    let base = render("deploy");
    let role = named(base.dir, &base.cluster_roles, "redirector");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let mut verbs: Vec<&str> = rule.verbs.iter().map(String::as_str).collect();
        verbs.sort_unstable();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert((group.as_str(), resource.as_str()));
            }
        }
    }
    // Nothing watches EndpointSlices: Services are resolved to their
    // ClusterIPs only.
    assert_eq!(
        granted,
        BTreeSet::from([("", "namespaces"), ("", "pods"), ("", "services")]),
        "the ClusterRole grants exactly these"
    );

    let config = named(base.dir, &base.roles, "redirector-config");
    assert_eq!(config.metadata.namespace.as_deref(), Some(NAMESPACE));
    let rules = config.rules.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["configmaps".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);

    for doc in &base.docs {
        let rules = &doc["rules"];
        assert!(
            !rules.to_string().contains("\"*\""),
            "{}: a wildcard",
            doc_id(doc)
        );
    }

    let sa = named(base.dir, &base.service_accounts, "redirector");
    let subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let subjects = subjects.as_deref().unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        (
            subjects[0].kind.clone(),
            subjects[0].name.clone(),
            subjects[0].namespace.clone(),
        )
    };
    let agent_sa = (
        "ServiceAccount".to_string(),
        sa.metadata.name.clone().unwrap_or_default(),
        sa.metadata.namespace.clone(),
    );
    let crb = named(base.dir, &base.cluster_role_bindings, "redirector");
    assert_eq!(
        (crb.role_ref.kind.as_str(), crb.role_ref.name.as_str()),
        ("ClusterRole", "redirector")
    );
    assert_eq!(subject(&crb.subjects), agent_sa);
    let rb = named(base.dir, &base.role_bindings, "redirector-config");
    assert_eq!(
        (rb.role_ref.kind.as_str(), rb.role_ref.name.as_str()),
        ("Role", "redirector-config")
    );
    assert_eq!(subject(&rb.subjects), agent_sa);
}

#[test]
fn metrics_service_selects_the_agent_pods() {
    let base = render("deploy");
    let ds = base.daemon_set("redirector");
    let service = named(base.dir, &base.services, "redirector-metrics");
    let spec = service.spec.as_ref().expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(!selector.is_empty());
    let labels = pod_labels(ds);
    for (key, value) in &selector {
        assert_eq!(labels.get(key), Some(value), "selector {key}={value}");
    }
    assert_eq!(
        Some(&selector),
        ds.spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref()),
        "the Service selects exactly the DaemonSet's pods"
    );
    // The metrics-only listener (`--metrics-addr`), not the admin
    // endpoint, which is on the node's loopback.
    let agent = container(pod_spec(ds), "redirector");
    let (_, metrics_port) = listen_addr(flag(&args(agent), "--metrics-addr"), METRICS_PORT);
    let ports = spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("http-metrics"));
    assert_eq!(ports[0].port, metrics_port);
    // targetPort defaults to port.
    let target = ports[0]
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(ports[0].port));
    assert_eq!(
        target,
        IntOrString::Int(metrics_port),
        "the Service targets the metrics listener"
    );
}

#[test]
fn configmaps_carry_the_targets_and_the_dashboard_file() {
    let base = render("deploy");
    let dashboard = base.config_map("redirector-grafana-dashboard");
    assert_eq!(
        dashboard
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("grafana_dashboard"))
            .map(String::as_str),
        Some("1"),
        "the Grafana sidecar's label"
    );
    let file = testbed::workspace_root().join("deploy/grafana/redirector-node.json");
    let expected = std::fs::read_to_string(&file).expect("read the dashboard");
    let data = dashboard.data.clone().unwrap_or_default();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["redirector-node.json"],
        "one dashboard"
    );
    assert!(
        data["redirector-node.json"] == expected,
        "the ConfigMap is not {} byte for byte",
        file.display()
    );
    let json: Value = serde_json::from_str(&data["redirector-node.json"]).expect("dashboard JSON");
    assert!(json["panels"].is_array(), "a Grafana dashboard");

    let agent = container(pod_spec(base.daemon_set("redirector")), "redirector");
    let reference = flag(&args(agent), "--targets-configmap").to_string();
    let targets = base.config_map("redirector-targets");
    assert_eq!(
        reference,
        format!(
            "{}/{}",
            targets.metadata.namespace.as_deref().unwrap_or_default(),
            targets.metadata.name.as_deref().unwrap_or_default()
        ),
        "--targets-configmap names the targets ConfigMap"
    );
    let text = targets
        .data
        .as_ref()
        .and_then(|d| d.get("targets"))
        .expect("key `targets`");
    let directives: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(directives, ["service redis/redis-cluster:6379"]);
    for example in ["# address ", "# port ", "# seed "] {
        assert!(text.contains(example), "the commented {example:?} example");
    }
}

// ---------------------------------------------------------------------------
// Overlays and uninstall

/// The base's documents except `skip`, as JSON, to show an overlay changed
/// nothing else.
fn others(rendered: &Rendered, skip: &[&str]) -> BTreeMap<String, Value> {
    rendered
        .docs
        .iter()
        .filter(|doc| !skip.contains(&doc_id(doc).as_str()))
        .map(|doc| (doc_id(doc), doc.clone()))
        .collect()
}

#[test]
fn servicemonitor_overlay_scrapes_the_metrics_service() {
    let base = render("deploy");
    let overlay = render("deploy/overlays/servicemonitor");
    let id = "ServiceMonitor redirector-system/redirector";
    let mut expected: Vec<String> = BASE_OBJECTS.iter().map(ToString::to_string).collect();
    expected.push(id.to_string());
    expected.sort();
    assert_eq!(overlay.ids(), expected);
    assert_eq!(
        others(&overlay, &[id]),
        others(&base, &[]),
        "the base unchanged"
    );

    let [monitor] = &overlay.service_monitors[..] else {
        panic!("one ServiceMonitor")
    };
    assert_eq!(monitor.api_version, "monitoring.coreos.com/v1");
    assert_eq!(monitor.kind, "ServiceMonitor");
    assert_eq!(monitor.metadata.namespace.as_deref(), Some(NAMESPACE));
    let service = named(overlay.dir, &overlay.services, "redirector-metrics");
    let service_labels = service.metadata.labels.clone().unwrap_or_default();
    let selector = monitor
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && monitor.spec.selector.match_expressions.is_none(),
        "select by labels"
    );
    for (key, value) in &selector {
        assert_eq!(
            service_labels.get(key),
            Some(value),
            "the ServiceMonitor's {key}={value} does not select the Service"
        );
    }
    assert_eq!(
        monitor.spec.namespace_selector.match_names,
        [service.metadata.namespace.clone().unwrap_or_default()]
    );
    let port_names: Vec<Option<&str>> = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.name.as_deref())
        .collect();
    assert!(!monitor.spec.endpoints.is_empty());
    for endpoint in &monitor.spec.endpoints {
        assert!(
            port_names.contains(&Some(endpoint.port.as_str())),
            "endpoint port {} is not a port of the Service: {port_names:?}",
            endpoint.port
        );
        assert_eq!(endpoint.path, "/metrics");
        assert!(endpoint.interval.ends_with('s'), "{}", endpoint.interval);
        for relabel in &endpoint.relabelings {
            assert!(!relabel.source_labels.is_empty() && !relabel.target_label.is_empty());
        }
    }
}

/// The base and the overlay in `dir`, which changes only the agent's
/// DaemonSet: the same objects, every other one as the base has it.
fn render_agent_overlay(dir: &'static str) -> (Rendered, Rendered) {
    let base = render("deploy");
    let overlay = render(dir);
    assert_eq!(overlay.ids(), BASE_OBJECTS, "{dir}: the base's objects");
    assert_eq!(
        others(&overlay, &[AGENT_DS]),
        others(&base, &[AGENT_DS]),
        "{dir}: the rest unchanged"
    );
    (base, overlay)
}

/// The pod spec of a rendered DaemonSet document, as JSON.
fn pod_doc(ds: &mut Value) -> &mut Value {
    &mut ds["spec"]["template"]["spec"]
}

/// Istio ambient's labels, and ztunnel's mark on steered sockets, so that
/// istio-cni's in-pod capture leaves them to the node proxy (node_safety.rs
/// checks the mark against that capture on the real kernel).
const AMBIENT_ARGS: &[&str] = &[
    "--ambient-label",
    "--steered-socket-mark=0x539/0xfff",
    "--istio-ca-address=https://istiod.istio-system.svc:15012",
    "--istio-identity=spiffe://cluster.local/ns/redirector-system/sa/redirector",
    "--mesh-identities-from-api",
];

#[test]
fn ambient_overlay_only_appends_ambient_labels_ztunnels_mark_and_the_istiod_ca() {
    let (base, overlay) = render_agent_overlay("deploy/overlays/ambient");
    let agent = container(pod_spec(overlay.daemon_set("redirector")), "redirector");
    let mut expected = AGENT_ARGS.to_vec();
    expected.extend(AMBIENT_ARGS);
    assert_eq!(
        args(agent),
        expected,
        "the base's args and the ambient flags"
    );

    // The istiod client's token (istio-ca audience) and the mesh root,
    // where the flags' defaults read them.
    let help = help(&["run"]).expect("run --help");
    for default in [
        "/var/run/secrets/tokens/istio-token",
        "/var/run/secrets/istio/root-cert.pem",
    ] {
        assert!(help.contains(default), "run --help names {default}");
    }
    let pod = pod_spec(overlay.daemon_set("redirector"));
    let token = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "istio-token")
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .expect("a projected ServiceAccount token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));
    assert_eq!(token.path, "istio-token");
    assert_eq!(
        volume_mount(agent, "/var/run/secrets/tokens").name,
        "istio-token"
    );
    let root = volume_mount(agent, "/var/run/secrets/istio");
    let root_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == root.name)
        .and_then(|v| v.config_map.as_ref())
        .expect("the mesh root from a ConfigMap");
    assert_eq!(root_volume.name, "istio-ca-root-cert");

    // Nothing but those differs.
    let mut patched = base.doc(AGENT_DS).clone();
    let pod_doc = pod_doc(&mut patched);
    pod_doc["containers"][0]["args"]
        .as_array_mut()
        .expect("args")
        .extend(AMBIENT_ARGS.iter().map(|a| Value::from(*a)));
    pod_doc["containers"][0]["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .extend([
            serde_json::json!({"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}),
            serde_json::json!({"name": "istio-ca-root-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true}),
        ]);
    pod_doc["volumes"].as_array_mut().expect("volumes").extend([
        serde_json::json!({"name": "istio-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}
        ]}}),
        serde_json::json!({"name": "istio-ca-root-cert", "configMap": {"name": "istio-ca-root-cert"}}),
    ]);
    assert_eq!(&patched, overlay.doc(AGENT_DS));
}

#[test]
fn k3s_overlay_only_moves_the_cni_directories_to_k3s_paths() {
    let (base, overlay) = render_agent_overlay("deploy/overlays/k3s");
    let mut patched = base.doc(AGENT_DS).clone();
    let volumes = pod_doc(&mut patched)["volumes"]
        .as_array_mut()
        .expect("volumes");
    for (name, path) in [("cni-conf", K3S_CNI_CONF), ("cni-bin", K3S_CNI_BIN)] {
        let volume = volumes
            .iter_mut()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        volume["hostPath"]["path"] = path.into();
    }
    assert_eq!(
        &patched,
        overlay.doc(AGENT_DS),
        "only the cni-conf and cni-bin hostPaths differ"
    );
    // The installer's and the keeper's flags land there.
    assert_cni_dirs(
        pod_spec(overlay.daemon_set("redirector")),
        K3S_CNI_CONF,
        K3S_CNI_BIN,
    );
}

#[test]
fn mount_bpffs_overlay_adds_one_privileged_init_container_first() {
    let (base, overlay) = render_agent_overlay("deploy/overlays/mount-bpffs");
    let mut unpatched = overlay.doc(AGENT_DS).clone();
    pod_doc(&mut unpatched)["initContainers"]
        .as_array_mut()
        .expect("initContainers")
        .remove(0);
    assert_eq!(
        &unpatched,
        base.doc(AGENT_DS),
        "the base's DaemonSet and one init container"
    );

    let pod = pod_spec(overlay.daemon_set("redirector"));
    let names: Vec<&str> = init_containers(pod)
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["mount-bpffs", "install-cni"], "mount-bpffs first");
    let mount = container(pod, "mount-bpffs");
    assert_eq!(mount.image.as_deref(), Some(IMAGE));
    assert_eq!(mount.command.as_deref(), Some(&[BINARY.to_string()][..]));
    assert_eq!(args(mount), MOUNT_BPFFS_ARGS, "its command line");
    let sc = mount.security_context.as_ref().expect("securityContext");
    assert_eq!(
        sc.privileged,
        Some(true),
        "a Bidirectional mount needs privileged"
    );
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_resources(mount);
    let dir = MOUNT_BPFFS_ARGS[1];
    let bpffs = volume_mount(mount, dir);
    assert_eq!(bpffs.name, "bpffs");
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "its mount reaches the host"
    );
    assert!(
        !assert_host_path(pod, mount, dir, "/sys/fs/bpf"),
        "mounts onto the host's /sys/fs/bpf, read-write"
    );

    // The agent sees that bpffs, and stays as unprivileged as in the base.
    let agent = container(pod, "redirector");
    assert!(Path::new(flag(&args(agent), "--pin-dir")).starts_with(dir));
    assert_eq!(
        volume_mount(agent, dir).mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    for c in all_containers(pod).filter(|c| c.name != "mount-bpffs") {
        assert_hardened(pod, c);
    }
    assert_eq!(
        capabilities(agent).0,
        AGENT_CAPABILITIES.iter().copied().collect(),
        "the agent's capabilities"
    );
}

#[test]
fn uninstall_daemonset_cleans_every_node() {
    let base = render("deploy");
    let uninstall = render("deploy/uninstall");
    assert_eq!(
        uninstall.ids(),
        [
            "DaemonSet redirector-system/redirector-uninstall",
            "Namespace redirector-system",
            "ResourceQuota redirector-system/redirector-node-critical",
        ]
    );
    for id in [
        "Namespace redirector-system",
        "ResourceQuota redirector-system/redirector-node-critical",
    ] {
        assert_eq!(uninstall.doc(id), base.doc(id), "{id}: the base's own");
    }

    let ds = uninstall.daemon_set("redirector-uninstall");
    let pod = pod_spec(ds);
    assert_tolerates_everything(ds);
    assert_eq!(pod.host_network, Some(true), "out of the CNI chain");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let agent_ds = base.daemon_set("redirector");
    assert_eq!(
        pod.tolerations,
        pod_spec(agent_ds).tolerations,
        "the agent's tolerations"
    );
    let agent_selector = &agent_ds.spec.as_ref().expect("spec").selector.match_labels;
    let labels = pod_labels(ds);
    assert!(
        agent_selector
            .iter()
            .flatten()
            .any(|(k, v)| labels.get(k) != Some(v)),
        "the agent's selector (and the metrics Service) must not match uninstall pods"
    );

    let commands: Vec<Vec<&str>> = init_containers(pod).iter().map(args).collect();
    assert_eq!(
        commands,
        [UNINSTALL_ARGS.to_vec(), CNI_UNINSTALL_ARGS.to_vec()],
        "the init containers run both uninstall commands"
    );
    for c in init_containers(pod) {
        assert_eq!(c.image.as_deref(), Some(IMAGE));
        assert_eq!(c.command.as_deref(), Some(&[BINARY.to_string()][..]));
    }
    for c in all_containers(pod) {
        assert_hardened(pod, c);
    }

    // They clean what the agent and its installer used.
    let agent_pod = pod_spec(agent_ds);
    let agent_args = args(container(agent_pod, "redirector"));
    let install_args = args(container(agent_pod, "install-cni"));
    let ebpf = container(pod, "uninstall-ebpf");
    let pin_dir = flag(&args(ebpf), "--pin-dir");
    assert_eq!(pin_dir, flag(&agent_args, "--pin-dir"));
    assert_host_path(pod, ebpf, pin_dir, "/sys/fs/bpf/redirector");
    let caps = capabilities(ebpf).0;
    assert!(
        caps.iter().all(|c| AGENT_CAPABILITIES.contains(c)),
        "uninstall-ebpf has no more than the agent: {caps:?}"
    );
    assert_eq!(app_armor(ebpf), Some("Unconfined"), "removes bpffs pins");
    let cni = container(pod, "uninstall-cni");
    assert!(capabilities(cni).0.is_empty());
    for name in ["--conf-dir", "--bin-dir"] {
        let dir = flag(&args(cni), name);
        assert_eq!(dir, flag(&install_args, name), "{name}");
        let installed = host_path(agent_pod, container(agent_pod, "install-cni"), dir);
        let removed = host_path(pod, cni, dir);
        assert_eq!(removed, installed, "{name}: the same host directory");
    }
    let main: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        main,
        ["pause"],
        "the main container only keeps the pod Ready"
    );
}

// ---------------------------------------------------------------------------
// The flags exist

/// One command line the manifests run `redirector` with, and the
/// environment its `$(VAR)`s expand from (none for an exec probe: the
/// kubelet expands only a container's command and args).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct CommandLine {
    args: Vec<String>,
    env: BTreeMap<String, EnvSource>,
}

/// Every `redirector` command line in the base, the overlays and
/// `uninstall/`, each once.
fn command_lines() -> Vec<CommandLine> {
    let mut lines = BTreeSet::new();
    for (dir, name) in [
        ("deploy", "redirector"),
        ("deploy/overlays/ambient", "redirector"),
        ("deploy/overlays/k3s", "redirector"),
        ("deploy/overlays/mount-bpffs", "redirector"),
        ("deploy/overlays/servicemonitor", "redirector"),
        ("deploy/uninstall", "redirector-uninstall"),
    ] {
        let rendered = render(dir);
        for c in all_containers(pod_spec(rendered.daemon_set(name))) {
            if c.command.as_deref() == Some(&[BINARY.to_string()][..]) {
                lines.insert(CommandLine {
                    args: c.args.clone().unwrap_or_default(),
                    env: env(c),
                });
            }
            let probe = c
                .readiness_probe
                .as_ref()
                .and_then(|p| p.exec.as_ref())
                .and_then(|e| e.command.as_deref());
            if let Some([binary, rest @ ..]) = probe {
                assert_eq!(binary, BINARY, "the probe runs the image's redirector");
                lines.insert(CommandLine {
                    args: rest.to_vec(),
                    env: BTreeMap::new(),
                });
            }
        }
    }
    lines.into_iter().collect()
}

/// `redirector WORDS --help`, or why it failed.
fn help(words: &[&str]) -> Result<String, String> {
    let binary = testbed::daemon::binary();
    let out = Command::new(&binary)
        .args(words)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The subcommand words a command line starts with (`cni install`), as the
/// binary's help lists its commands; what follows are arguments.
fn subcommand(line: &[String]) -> Vec<&str> {
    let mut words = Vec::new();
    for word in line {
        let listed = help(&words).is_ok_and(|help| {
            help.lines()
                .skip_while(|l| *l != "Commands:")
                .skip(1)
                .take_while(|l| !l.is_empty())
                .any(|l| l.split_whitespace().next() == Some(word.as_str()))
        });
        if !listed {
            break;
        }
        words.push(word.as_str());
    }
    words
}

#[test]
fn every_flag_in_the_manifests_exists_in_the_binary() {
    let lines = command_lines();
    let subcommands: BTreeSet<Vec<&str>> = lines.iter().map(|l| subcommand(&l.args)).collect();
    for expected in [
        vec!["run"],
        vec!["cni", "install"],
        vec!["cni", "uninstall"],
        vec!["ready"],
        vec!["uninstall"],
        vec!["mount-bpffs"],
    ] {
        assert!(subcommands.contains(&expected), "no {expected:?} line");
    }

    let mut missing = Vec::new();
    for line in &lines {
        let words = subcommand(&line.args);
        let shown = format!("redirector {} --help", words.join(" "));
        let help = match help(&words) {
            Ok(help) => help,
            Err(e) => {
                missing.push(format!("{shown} fails: {e}"));
                continue;
            }
        };
        let known: BTreeSet<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--"))
            .collect();
        for arg in line.args.iter().filter(|a| a.starts_with("--")) {
            let name = arg.split('=').next().unwrap_or_default();
            if !known.contains(name) {
                missing.push(format!("{shown} has no {name} (used as {arg})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} does not take what deploy/ passes it:\n  {}",
        testbed::daemon::binary().display(),
        missing.join("\n  ")
    );
}

/// A node as the downward API describes it.
struct Node {
    kind: &'static str,
    host_ip: &'static str,
    host_ips: &'static str,
}

const NODES: &[Node] = &[
    Node {
        kind: "IPv4",
        host_ip: "10.0.0.5",
        host_ips: "10.0.0.5",
    },
    Node {
        kind: "dual-stack",
        host_ip: "10.0.0.5",
        host_ips: "10.0.0.5,fd00:10::5",
    },
    Node {
        kind: "IPv6-only",
        host_ip: "fd00:10::5",
        host_ips: "fd00:10::5",
    },
];

impl Node {
    fn value(&self, source: &EnvSource) -> String {
        match source {
            EnvSource::Value(value) => value.clone(),
            EnvSource::Field(path) => match path.as_str() {
                "spec.nodeName" => "node-a".into(),
                "status.hostIP" => self.host_ip.into(),
                "status.hostIPs" => self.host_ips.into(),
                other => panic!("no sample for the downward API's {other}"),
            },
            EnvSource::Other => panic!("no sample for a variable not from the downward API"),
        }
    }

    /// `arg` with each defined `$(VAR)` replaced, as the kubelet does
    /// (undefined ones stay as written).
    fn expand(&self, arg: &str, env: &BTreeMap<String, EnvSource>) -> String {
        let mut out = String::new();
        let mut rest = arg;
        while let Some((before, after)) = rest.split_once("$(") {
            out.push_str(before);
            match after.split_once(')') {
                Some((var, tail)) if env.contains_key(var) => {
                    out.push_str(&self.value(&env[var]));
                    rest = tail;
                }
                _ => {
                    out.push_str("$(");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

#[test]
fn every_command_line_parses_on_ipv4_dual_stack_and_ipv6_nodes() {
    // With --help last, the binary parses every argument before it (values
    // included) and exits 0 only if all of them are valid.
    let mut failed = Vec::new();
    for line in command_lines() {
        for node in NODES {
            let args: Vec<String> = line
                .args
                .iter()
                .map(|arg| node.expand(arg, &line.env))
                .collect();
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = help(&words) {
                failed.push(format!(
                    "{} node: redirector {}: {e}",
                    node.kind,
                    args.join(" ")
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn bare_node_addresses_take_the_documented_ports() {
    // `--proxy-addr=$(NODE_IPS)` and `--metrics-addr=$(NODE_IP)` carry no
    // port: the binary's defaults must be the ones the Service and the
    // docs name.
    let help = help(&["run"]).expect("redirector run --help");
    for (name, port) in [
        ("--proxy-addr", PROXY_PORT),
        ("--metrics-addr", METRICS_PORT),
    ] {
        let text: Vec<&str> = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(&format!("{name} ")))
            .take_while(|l| !l.trim_start().starts_with("--") || l.contains(name))
            .collect();
        assert!(
            text.join(" ").contains(&format!("(port {port})")),
            "`redirector run --help` does not give {name} a default port of {port}:\n{}",
            text.join("\n")
        );
    }
}
