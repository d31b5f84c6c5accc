//! The Kubernetes node agent (`redirector run --kubernetes`) against an
//! API endpoint speaking the list/watch protocol (`testbed::kubeapi`), on a
//! real node: pods are network namespaces with processes in kubelet-style
//! cgroups, steering is the real eBPF programs, and "steered" means a
//! redis-cli in the pod reached the node proxy.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{Value, json};
use testbed::{
    exclusive,
    kubeapi::{ApiServer, Kind},
    process::{path_str, wait_for},
    require_kernel,
    topology::{Kubelet, SERVICE_VIP, SERVICE_VIP6, Topology},
};

const VIP: IpAddr = IpAddr::V4(SERVICE_VIP);
const NODE: &str = "node-a";
const OPT_IN: (&str, &str) = ("redirector.io/steering", "enabled");
const OPT_OUT: (&str, &str) = ("redirector.io/steering", "disabled");

fn labels(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn namespace(name: &str, pairs: &[(&str, &str)]) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": name, "labels": labels(pairs)}})
}

fn pod(namespace: &str, name: &str, uid: &str, node: &str, pairs: &[(&str, &str)]) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels(pairs)},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "php:fpm"}]},
        "status": {"phase": "Running"},
    })
}

fn service(namespace: &str, name: &str, ips: &[&str], port: u16) -> Value {
    json!({
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ports": [{"port": port, "protocol": "TCP"}]},
    })
}

fn targets(text: &str) -> Value {
    json!({
        "kind": "ConfigMap",
        "metadata": {"name": "redirector-targets", "namespace": "redirector-system"},
        "data": {"targets": text},
    })
}

/// A node with `pods` pod namespaces, the service cluster, and the API
/// endpoint (in the node, where the agent reaches it on loopback) holding
/// the Redis Service, the targets ConfigMap and the `shop` namespace.
fn node(pods: usize) -> (Topology, ApiServer) {
    let mut topo = Topology::build(pods);
    topo.start_service_cluster();
    let listener = topo
        .node_place()
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("API listener in the node");
    let api = ApiServer::serve(listener);
    api.apply(namespace("redis", &[]));
    api.apply(namespace("redirector-system", &[]));
    api.apply(service(
        "redis",
        "redis-cluster",
        &[&SERVICE_VIP.to_string(), &SERVICE_VIP6.to_string()],
        6379,
    ));
    api.apply(targets(
        "# the cluster the shop dials\nservice redis/redis-cluster:6379\n",
    ));
    (topo, api)
}

fn agent_args(topo: &Topology, api: &ApiServer, extra: &[&str]) -> Vec<String> {
    agent_args_with_cni(topo, api, "none", extra)
}

fn agent_args_with_cni(
    topo: &Topology,
    api: &ApiServer,
    cni_socket: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--proxy-addr".into(),
        format!(
            "{},{}",
            testbed::topology::proxy_addr(),
            testbed::topology::proxy_addr6()
        ),
        "--cgroup-root".into(),
        path_str(topo.attach_root()).into(),
        "--kubernetes".into(),
        "--node-name".into(),
        NODE.into(),
        "--kube-api".into(),
        api.url(),
        "--cni-socket".into(),
        cni_socket.into(),
    ];
    args.extend(extra.iter().map(ToString::to_string));
    args
}

fn steered(topo: &Topology, index: usize) -> bool {
    topo.pod(index).through_proxy(VIP)
}

fn wait_steered(topo: &Topology, index: usize, want: bool, why: &str) {
    wait_for(why, Duration::from_secs(15), || {
        (steered(topo, index) == want).then_some(())
    });
}

fn enrolled_count(topo: &Topology) -> usize {
    topo.status()["enrolled"].as_array().map_or(0, Vec::len)
}

const UID_WEB0: &str = "0a1b2c3d-0000-4000-8000-000000000001";
const UID_HOSTNET: &str = "0a1b2c3d-0000-4000-8000-000000000002";
const UID_ELSEWHERE: &str = "0a1b2c3d-0000-4000-8000-000000000003";
const UID_WEB1: &str = "0a1b2c3d-0000-4000-8000-000000000004";

#[test]
fn namespace_label_steers_its_pods_and_enrollment_follows_the_api() {
    require_kernel!();
    let _kernel = exclusive();
    let (mut topo, api) = node(5);
    let kubelet = Kubelet::new(&topo);

    api.apply(namespace("shop", &[]));
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[("app", "web")]));
    // A hostNetwork pod: its process is put in a namespace of its own here
    // so that enrolling it by mistake would show.
    let mut host_net = pod("shop", "node-exporter", UID_HOSTNET, NODE, &[]);
    host_net["spec"]["hostNetwork"] = json!(true);
    api.apply(host_net);
    api.apply(pod("shop", "web-elsewhere", UID_ELSEWHERE, "node-b", &[]));
    let _web0 = kubelet.start_pod(&topo, 0, UID_WEB0);
    let _host_net = kubelet.start_pod(&topo, 1, UID_HOSTNET);
    let _elsewhere = kubelet.start_pod(&topo, 2, UID_ELSEWHERE);

    let args = agent_args(&topo, &api, &[]);
    topo.start_daemon(args);
    // Targets came from the ConfigMap, resolved through the Service.
    let targets: Vec<String> = topo.status()["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["target"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        targets.contains(&format!("{SERVICE_VIP}:6379"))
            && targets.contains(&format!("[{SERVICE_VIP6}]:6379")),
        "the Service's ClusterIPs are not targets: {targets:?}"
    );
    assert!(
        !steered(&topo, 0),
        "a pod is steered before its namespace opts in"
    );
    assert_eq!(enrolled_count(&topo), 0);

    // Opting the namespace in steers its pod that is already running.
    api.apply(namespace("shop", &[OPT_IN]));
    wait_steered(
        &topo,
        0,
        true,
        "the running pod steered after the namespace label",
    );
    assert!(!steered(&topo, 1), "a hostNetwork pod was enrolled");
    assert!(!steered(&topo, 2), "a pod of another node was enrolled");
    assert_eq!(enrolled_count(&topo), 1, "{}", topo.status());

    // The pod-level opt-out, and back.
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[OPT_OUT]));
    wait_steered(&topo, 0, false, "the opted-out pod goes direct");
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[("app", "web")]));
    wait_steered(&topo, 0, true, "the pod steered again without its opt-out");

    // A new pod: in the API first, its process a moment later.
    api.apply(pod("shop", "web-1", UID_WEB1, NODE, &[]));
    std::thread::sleep(Duration::from_millis(300));
    let web1 = kubelet.start_pod(&topo, 3, UID_WEB1);
    wait_steered(&topo, 3, true, "the new pod steered once its process runs");

    // History compacted (410 Gone on every watch), and a change made then
    // is only in the next list: the agent must relist to see it.
    let lists_before = api.lists_of("pods");
    api.expire();
    api.apply(pod("shop", "web-1", UID_WEB1, NODE, &[OPT_OUT]));
    wait_steered(
        &topo,
        3,
        false,
        "the opt-out made during the 410 seen by a relist",
    );
    assert!(
        api.lists_of("pods") > lists_before,
        "no relist of pods after 410: {:?}",
        api.requests()
    );
    assert!(
        steered(&topo, 0),
        "web-0 lost its enrollment over the relist"
    );
    // A command through the proxy, so its upstream series exist too.
    assert_eq!(topo.pod(0).redis(&["SET", "k8s", "agent"]), "OK");
    let metrics = topo.metrics();
    let sample = |name: &str| testbed::http::sample(&metrics, name);
    assert_eq!(
        sample("redirector_k8s_pods{state=\"enrolled\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(sample("redirector_k8s_pods{state=\"waiting\"}"), 0.0);
    assert!(
        sample("redirector_k8s_lists_total{resource=\"pods\"}") >= 2.0,
        "{metrics}"
    );
    // Every Grafana panel, the agent's included, has its metrics here.
    let missing = testbed::grafana::missing_from(&metrics, |_| true);
    assert!(
        missing.is_empty(),
        "dashboard metrics the agent does not export: {missing:?}"
    );

    // The agent dies; the API changes meanwhile; a new agent converges:
    // the deleted pod's namespace is unenrolled (its process lingers, as a
    // terminating pod's may), the other pod's opt-out lifted.
    topo.daemon().kill();
    assert!(api.delete(Kind::Pod, "shop", "web-0"));
    api.apply(pod("shop", "web-1", UID_WEB1, NODE, &[]));
    topo.daemon().start_again();
    wait_steered(&topo, 3, true, "web-1 steered by the restarted agent");
    wait_steered(
        &topo,
        0,
        false,
        "the deleted pod unenrolled by the restarted agent",
    );
    assert_eq!(enrolled_count(&topo), 1, "{}", topo.status());

    // web-1's sandbox is re-created (its processes died; the kubelet made a
    // new sandbox in a new network namespace) with no event from the API:
    // the agent's periodic look at the pods' processes follows it.
    drop(web1);
    let _web1 = kubelet.start_pod(&topo, 4, UID_WEB1);
    // Within one resync (10 s).
    wait_for(
        "the re-created sandbox's namespace enrolled",
        Duration::from_secs(25),
        || steered(&topo, 4).then_some(()),
    );
    assert!(
        !steered(&topo, 3),
        "the old sandbox's namespace is still enrolled"
    );
    assert_eq!(enrolled_count(&topo), 1, "{}", topo.status());

    // Unlabelling the namespace takes every pod out.
    api.apply(namespace("shop", &[]));
    wait_steered(
        &topo,
        4,
        false,
        "pods go direct once the namespace label is gone",
    );
    assert_eq!(enrolled_count(&topo), 0, "{}", topo.status());
    let log = topo.daemon().log();
    assert!(log.contains("enrolled"), "{log}");
}

#[test]
fn ambient_label_and_targets_follow_the_configmap_and_services() {
    require_kernel!();
    let _kernel = exclusive();
    let (mut topo, api) = node(1);
    let kubelet = Kubelet::new(&topo);
    api.apply(namespace("mesh", &[("istio.io/dataplane-mode", "ambient")]));
    api.apply(pod("mesh", "api-0", UID_WEB0, NODE, &[]));
    let _api0 = kubelet.start_pod(&topo, 0, UID_WEB0);

    let args = agent_args(&topo, &api, &["--ambient-label"]);
    topo.start_daemon(args);
    wait_steered(&topo, 0, true, "a pod of an ambient namespace steered");
    // Ambient's own pod opt-out is honoured too.
    api.apply(pod(
        "mesh",
        "api-0",
        UID_WEB0,
        NODE,
        &[("istio.io/dataplane-mode", "none")],
    ));
    wait_steered(&topo, 0, false, "ambient's pod opt-out honoured");
    api.apply(pod("mesh", "api-0", UID_WEB0, NODE, &[]));
    wait_steered(&topo, 0, true, "steered again");

    let target_list = |topo: &Topology| -> Vec<String> {
        let mut list: Vec<String> = topo.status()["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|t| t["target"].as_str().unwrap_or_default().to_string())
            .collect();
        list.sort();
        list
    };
    // A port directive added to the ConfigMap reaches the map live.
    api.apply(targets(
        "service redis/redis-cluster:6379\nport 7000\naddress 10.96.0.77:6380\n",
    ));
    wait_for(
        "the ConfigMap's new targets loaded",
        Duration::from_secs(10),
        || {
            let list = target_list(&topo);
            (list.contains(&"*:7000".to_string()) && list.contains(&"10.96.0.77:6380".to_string()))
                .then_some(())
        },
    );
    // The Service's ClusterIP changes (re-created): the old one is dropped.
    api.apply(service("redis", "redis-cluster", &["10.96.0.11"], 6379));
    wait_for(
        "the Service's new ClusterIP loaded",
        Duration::from_secs(10),
        || {
            let list = target_list(&topo);
            (list.contains(&"10.96.0.11:6379".to_string())
                && !list.contains(&format!("{SERVICE_VIP}:6379")))
            .then_some(())
        },
    );
    assert!(
        !steered(&topo, 0),
        "the old ClusterIP is still steered after the Service moved"
    );
    // The Service's addresses are the cluster's seeds too.
    wait_for(
        "the seeds follow the Service",
        Duration::from_secs(10),
        || {
            let log = topo.daemon.as_ref().expect("daemon").log();
            log.lines()
                .any(|l| l.contains("cluster seeds changed") && l.contains("10.96.0.11:6379"))
                .then_some(())
        },
    );
    // A broken ConfigMap is reported and the targets in force are kept.
    let before = target_list(&topo);
    api.apply(targets("service redis/redis-cluster:6379\nredis 1.2.3.4\n"));
    wait_for(
        "the broken ConfigMap reported",
        Duration::from_secs(10),
        || {
            topo.daemon
                .as_ref()
                .expect("daemon")
                .log()
                .contains("unknown directive `redis`")
                .then_some(())
        },
    );
    assert_eq!(
        target_list(&topo),
        before,
        "a broken ConfigMap changed the targets"
    );
    // Deleting the ConfigMap leaves only command-line targets (none here).
    assert!(api.delete(Kind::ConfigMap, "redirector-system", "redirector-targets"));
    wait_for(
        "targets cleared with the ConfigMap",
        Duration::from_secs(10),
        || target_list(&topo).is_empty().then_some(()),
    );
}

/// The CNI path: the runtime runs the real bridge plugin (host-local IPAM)
/// and then redirector-cni for a pod sandbox; the agent enrolls the pod's
/// namespace before any process of the pod exists, so even an init
/// container's first connect is steered. No kubelet-style cgroup is made
/// here, so the agent cannot have found the pod through /proc.
#[test]
fn cni_add_enrolls_the_sandbox_before_any_container_runs() {
    use testbed::cni::{Sandbox, compact, inject, plugin_dir, redirector_cni};
    require_kernel!();
    let _kernel = exclusive();
    let (mut topo, api) = node(2);
    api.apply(namespace("shop", &[OPT_IN]));
    api.apply(namespace("batch", &[]));
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[]));
    api.apply(pod("shop", "cron-0", UID_WEB1, NODE, &[OPT_OUT]));
    api.apply(pod("batch", "job-0", UID_ELSEWHERE, NODE, &[]));
    let socket = topo.workdir().join("run/cni.sock");
    // The node's CNI config, as a network plugin (flannel here) wrote it.
    let conf_dir = topo.workdir().join("net.d");
    let bin_dir = topo.workdir().join("cni-bin");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let conflist = conf_dir.join("10-flannel.conflist");
    let flannel = include_str!("../../redirector/src/cni/testdata/10-flannel.conflist");
    std::fs::write(&conflist, flannel).expect("write the flannel conflist");
    let args = agent_args_with_cni(
        &topo,
        &api,
        path_str(&socket),
        &[
            "--cni-conf-dir",
            path_str(&conf_dir),
            "--cni-bin-dir",
            path_str(&bin_dir),
        ],
    );
    topo.start_daemon(args);
    assert!(!steered(&topo, 0), "steered before the sandbox was set up");
    let chained = |why: &str| {
        wait_for(why, Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&conflist).unwrap_or_default();
            let list: Value = serde_json::from_str(&text).ok()?;
            let types: Vec<&str> = list["plugins"]
                .as_array()?
                .iter()
                .filter_map(|p| p["type"].as_str())
                .collect();
            (types == ["flannel", "portmap", "redirector-cni"]).then_some(())
        });
    };
    chained("the agent chains redirector-cni last");
    assert!(
        bin_dir.join("redirector-cni").exists(),
        "the plugin binary was not installed"
    );

    const NETWORK: &str = "k8s-pod-network";
    let ipam = topo.workdir().join("ipam");
    // A second interface, so the topology's own eth0 stays as it is.
    let bridge_conf = json!({
        "type": "bridge", "bridge": "rdrk8s0",
        "ipam": {"type": "host-local", "subnet": "10.79.0.0/24", "dataDir": path_str(&ipam)},
    });
    let ours = json!({"type": "redirector-cni", "agentSocket": path_str(&socket)});
    let sandbox = |index: usize, namespace: &str, name: &str, uid: &str| Sandbox {
        container_id: format!("sandbox-{name}"),
        netns: Some(topo.pod(index).netns.path()),
        ifname: "net1".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
        ),
    };
    let node_place = topo.node_place();
    let chain_add = |sandbox: &Sandbox| -> String {
        let added = sandbox.run(
            &node_place,
            &plugin_dir().join("bridge"),
            "ADD",
            &inject(&bridge_conf, NETWORK, "1.0.0", None),
        );
        assert!(added.status.success(), "bridge ADD: {added:?}");
        let prev = compact(&String::from_utf8_lossy(&added.stdout));
        let ours_out = sandbox.run(
            &node_place,
            &redirector_cni(),
            "ADD",
            &inject(&ours, NETWORK, "1.0.0", Some(&prev)),
        );
        assert!(
            ours_out.status.success(),
            "redirector-cni ADD: {ours_out:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&ours_out.stdout),
            prev,
            "prevResult not passed through byte for byte"
        );
        prev
    };
    let chain_del = |sandbox: &Sandbox, prev: &str| {
        for plugin in [redirector_cni(), plugin_dir().join("bridge")] {
            let config = if plugin.ends_with("bridge") {
                inject(&bridge_conf, NETWORK, "1.0.0", Some(prev))
            } else {
                inject(&ours, NETWORK, "1.0.0", Some(prev))
            };
            let out = sandbox.run(&node_place, &plugin, "DEL", &config);
            assert!(out.status.success(), "{} DEL: {out:?}", plugin.display());
        }
    };

    let web = sandbox(0, "shop", "web-0", UID_WEB0);
    let prev = chain_add(&web);
    // Enrolled when ADD returned: no waiting, no process needed.
    assert!(
        steered(&topo, 0),
        "the pod is not steered right after CNI ADD"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        steered(&topo, 0),
        "the reconcile loop dropped the CNI enrollment"
    );

    // An opted-out pod and a pod of a namespace not opted in: the chain
    // succeeds, nothing is enrolled.
    let before = enrolled_count(&topo);
    let cron = sandbox(1, "shop", "cron-0", UID_WEB1);
    let cron_prev = chain_add(&cron);
    chain_del(&cron, &cron_prev);
    let job = sandbox(1, "batch", "job-0", UID_ELSEWHERE);
    let job_prev = chain_add(&job);
    assert!(
        !steered(&topo, 1),
        "an opted-out or not-opted-in pod was enrolled"
    );
    assert_eq!(enrolled_count(&topo), before);
    chain_del(&job, &job_prev);

    let metrics = topo.metrics();
    let sample = |name: &str| testbed::http::sample(&metrics, name);
    assert_eq!(
        sample("redirector_k8s_cni_requests_total{command=\"ADD\",outcome=\"enrolled\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample("redirector_k8s_cni_requests_total{command=\"ADD\",outcome=\"skipped\"}"),
        2.0,
        "{metrics}"
    );

    // The node's /dashboard page shows the agent's figures.
    let dom = testbed::browser::Chromium::new()
        .dom(&topo.node_place(), "http://127.0.0.1:15020/dashboard");
    assert!(
        dom.contains("data-refreshed") && !dom.contains("id=\"agent\" hidden"),
        "the page hides the agent's figures:\n{dom}"
    );
    assert_eq!(
        testbed::browser::data_value(&dom, "agent-cni"),
        3.0,
        "{dom}"
    );

    // Sandbox teardown unenrolls.
    chain_del(&web, &prev);
    assert!(!steered(&topo, 0), "the pod is still steered after CNI DEL");
    assert_eq!(enrolled_count(&topo), 0, "{}", topo.status());

    // flannel restarts and writes its config again, without our entry:
    // the agent puts it back.
    std::fs::write(&conflist, flannel).expect("rewrite the flannel conflist");
    chained("the agent re-chains redirector-cni after the rewrite");
}

#[path = "support/kustomize.rs"]
mod kustomize;

/// The agent as the DaemonSet runs it: in a private mount namespace built
/// from the rendered manifest's own hostPath volumes, mount propagation,
/// read-only flags, command and arguments (read with k8s-openapi, not
/// copied by hand), on the node's network. With no Redis Service in the
/// API, its readiness probe passes. A CNI ADD naming a containerd-style
/// `/var/run/netns/cni-…` (bound on the host after the agent started)
/// enrolls the sandbox: the manifest must mount /var/run/netns with
/// HostToContainer for the agent to open it.
#[test]
fn the_daemonsets_own_mounts_let_the_agent_enroll_a_containerd_sandbox() {
    use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::HTTPGetAction};
    use std::collections::BTreeMap;
    use testbed::{
        TempDir,
        cni::{Sandbox, inject, redirector_cni},
        container::{ContainerFs, HostMount, ImageFile, Propagation, VolumeMount},
        process::Child,
    };
    require_kernel!();
    let _kernel = exclusive();

    let rendered = kustomize::render_docs("deploy");
    let ds_doc = rendered
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "redirector")
        .expect("the agent DaemonSet");
    let ds: DaemonSet = serde_json::from_value(ds_doc.clone()).expect("a typed DaemonSet");
    let pod_spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("a pod template");
    assert_eq!(
        pod_spec.host_network,
        Some(true),
        "the test runs the agent on the node's network"
    );
    let agent = pod_spec
        .containers
        .iter()
        .find(|c| c.name == "redirector")
        .expect("the agent container");

    // The node, its API (no Redis Service: only a ConfigMap naming one),
    // and a pod of an opted-in namespace.
    let topo = Topology::build(1);
    let listener = topo
        .node_place()
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("API listener in the node");
    let api = ApiServer::serve(listener);
    api.apply(namespace("redirector-system", &[]));
    api.apply(targets("service redis/redis-cluster:6379\n"));
    api.apply(namespace("shop", &[OPT_IN]));
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[]));

    // The test's stand-in for the node's filesystem: every hostPath of the
    // manifest under it, except the kernel's own (a fresh bpffs, the
    // topology's cgroup, the real /proc).
    let host = TempDir::new("rdr-host-");
    let bpffs_dir = host.path().join("sys/fs/bpf");
    std::fs::create_dir_all(&bpffs_dir).expect("bpffs dir");
    let bpffs = HostMount::new(&["-t", "bpf", "bpf"], &bpffs_dir);
    let netns_dir = host.path().join("var/run/netns");
    std::fs::create_dir_all(&netns_dir).expect("netns dir");
    // containerd binds sandboxes under a shared mount (as /run is on a
    // systemd host), so they propagate to containers that follow it.
    let netns_mount = HostMount::new(&["--bind", path_str(&netns_dir)], &netns_dir).shared();
    let stand_in = |host_path: &str| -> std::path::PathBuf {
        match host_path {
            "/sys/fs/bpf" => bpffs.path().to_path_buf(),
            "/sys/fs/cgroup" => topo.attach_root().to_path_buf(),
            "/proc" => "/proc".into(),
            other => {
                let dir = host.path().join(other.trim_start_matches('/'));
                std::fs::create_dir_all(&dir).expect("hostPath stand-in");
                dir
            }
        }
    };
    let host_paths: BTreeMap<&str, &str> = pod_spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            // The pod's own emptyDir (the ready file): a directory of its
            // own under the stand-in, as the kubelet would make.
            let path = match (&v.host_path, &v.empty_dir) {
                (Some(host), _) => host.path.as_str(),
                (None, Some(_)) => "/var/lib/kubelet/pods/agent/volumes/empty-dir",
                (None, None) => return None,
            };
            Some((v.name.as_str(), path))
        })
        .collect();
    let volumes: Vec<VolumeMount> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| VolumeMount {
            host: stand_in(host_paths[m.name.as_str()]),
            container: m.mount_path.clone().into(),
            propagation: Propagation::from_spec(m.mount_propagation.as_deref()),
            read_only: m.read_only == Some(true),
        })
        .collect();
    // The network plugin's config, for the agent's CNI keeper.
    std::fs::write(
        stand_in("/etc/cni/net.d").join("10-flannel.conflist"),
        include_str!("../../redirector/src/cni/testdata/10-flannel.conflist"),
    )
    .expect("flannel conflist");
    // The image: the two binaries, and the CA bundle deploy/Dockerfile
    // installs (ca-certificates).
    let image = vec![
        ImageFile {
            host: testbed::daemon::binary(),
            container: "/usr/local/bin/redirector".into(),
        },
        ImageFile {
            host: "/etc/ssl/certs".into(),
            container: "/etc/ssl/certs".into(),
        },
        ImageFile {
            host: redirector_cni(),
            container: "/usr/local/bin/redirector-cni".into(),
        },
    ];
    let fs = ContainerFs::new(image, volumes);

    // The container's command line, with the downward API's values.
    let node_ips = format!(
        "{},{}",
        testbed::topology::NODE_ADDR,
        testbed::topology::NODE_ADDR6
    );
    let downward = |field: &str| match field {
        "spec.nodeName" => NODE.to_string(),
        "status.hostIP" => testbed::topology::NODE_ADDR.to_string(),
        "status.hostIPs" => node_ips.clone(),
        other => panic!("the test does not know downward API field {other}"),
    };
    let env: Vec<(String, String)> = agent
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from)) => downward(
                    &from
                        .field_ref
                        .as_ref()
                        .expect("env from a pod field")
                        .field_path,
                ),
                (None, None) => String::new(),
            };
            (e.name.clone(), value)
        })
        .collect();
    let expand = |arg: &str| {
        env.iter().fold(arg.to_string(), |arg, (name, value)| {
            arg.replace(&format!("$({name})"), value)
        })
    };
    let command = agent.command.as_ref().expect("the agent's command");
    let mut args: Vec<String> = command[1..]
        .iter()
        .chain(agent.args.iter().flatten())
        .map(|a| expand(a))
        .collect();
    // In-cluster config needs a service account token; the test's API is
    // plain HTTP on the node's loopback.
    args.extend(["--kube-api".into(), api.url()]);

    let log = topo.workdir().join("agent-in-container.log");
    let mut agent_process = Child::spawn("the agent in its DaemonSet mounts", {
        let mut cmd = fs.command(&topo.node_place(), &command[0], &args);
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        cmd
    });
    wait_for("the agent listening", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            agent_process.is_running(),
            "the agent exited in its DaemonSet mounts:\n{text}"
        );
        text.contains(testbed::daemon::LISTENING).then_some(())
    });

    // The manifest's probes, as kubelet runs them, pass without Redis:
    // readiness is an exec in the container (its own ready file),
    let exec = agent
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("an exec readiness probe");
    wait_for(
        "the readiness probe to pass",
        Duration::from_secs(10),
        || {
            let status = fs
                .command(&topo.node_place(), &exec[0], &exec[1..])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run the readiness probe");
            status.success().then_some(())
        },
    );
    // liveness an HTTP GET on the admin port.
    {
        let (what, probe) = ("liveness", &agent.liveness_probe);
        let HTTPGetAction {
            host, path, port, ..
        } = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("an HTTP {what} probe"));
        let port = match port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) => {
                u16::try_from(port).expect("a port")
            }
            named => panic!("{what} probe: named port {named:?}"),
        };
        let ip: IpAddr = host
            .as_deref()
            .unwrap_or(&testbed::topology::NODE_ADDR.to_string())
            .parse()
            .expect("probe host");
        let answer = testbed::http::get_in(
            &topo.node_place(),
            SocketAddr::new(ip, port),
            path.as_deref().unwrap_or("/"),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
    }

    // containerd sets up the sandbox: its netns, bound at
    // /var/run/netns/cni-<id> on the host after the agent started.
    let sandbox_name = "cni-3f0d29a1-7b64-4c55-9e1c-52b7e8a1d6f0";
    let sandbox_file = netns_dir.join(sandbox_name);
    std::fs::write(&sandbox_file, b"").expect("netns mount point");
    let sandbox_mount = HostMount::new(
        &["--bind", path_str(&topo.pod(0).netns.path())],
        &sandbox_file,
    );
    let socket = stand_in("/var/run/redirector").join("cni.sock");
    let ours = json!({"type": "redirector-cni", "agentSocket": path_str(&socket)});
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[]}"#;
    let sandbox = Sandbox {
        container_id: "3f0d29a17b64".into(),
        netns: Some(std::path::PathBuf::from("/var/run/netns").join(sandbox_name)),
        ifname: "eth0".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID={UID_WEB0}"
        ),
    };
    let added = sandbox.run(
        &topo.node_place(),
        &redirector_cni(),
        "ADD",
        &inject(&ours, "k8s-pod-network", "1.0.0", Some(prev)),
    );
    assert!(added.status.success(), "redirector-cni ADD: {added:?}");
    let pin_dir = bpffs.path().join("redirector");
    let status = testbed::daemon::status(&pin_dir);
    let inode = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(topo.pod(0).netns.path())
            .expect("pod netns")
            .ino()
    };
    assert_eq!(
        status["enrolled"][0]["netns_inode"].as_u64(),
        Some(inode),
        "the sandbox is not enrolled: {status}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&added.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    agent_process.kill();
    drop(sandbox_mount);
    testbed::daemon::cli(&pin_dir, &["uninstall"]);
    drop(netns_mount);
    drop(bpffs);
}

/// The targets ConfigMap names backends and their kinds per Service; edits
/// apply without a restart: a standalone backend is added (its keys land
/// on its own Redis), the Service's kind changes to `tcp` (bytes relayed
/// to the Service, counted under the backend), and the backend is removed
/// (its target leaves the map, its pods go direct, its series go).
#[test]
fn configmap_edits_add_rekind_and_remove_backends_live() {
    require_kernel!();
    let _kernel = exclusive();
    let (mut topo, api) = node(1);
    let kubelet = Kubelet::new(&topo);
    // A standalone Redis behind its own Service address, in the node.
    let sessions_ip: IpAddr = "10.96.5.10".parse().expect("ip");
    topo.node
        .ip(&["addr", "add", &format!("{sessions_ip}/32"), "dev", "lo"]);
    let dir = topo.workdir().join("sessions");
    std::fs::create_dir_all(&dir).expect("dir");
    let sessions =
        testbed::redis::RedisServer::start(&topo.node_place(), &[sessions_ip], 6379, &dir, &[]);
    api.apply(namespace("shop", &[OPT_IN]));
    api.apply(service(
        "shop",
        "sessions",
        &[&sessions_ip.to_string()],
        6379,
    ));
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[]));
    let _web0 = kubelet.start_pod(&topo, 0, UID_WEB0);
    let args = agent_args(&topo, &api, &[]);
    topo.start_daemon(args);
    wait_steered(&topo, 0, true, "the pod steered to the cluster backend");
    assert!(
        !topo.pod(0).through_proxy(sessions_ip),
        "the sessions Service is steered before the ConfigMap names it"
    );

    // Added: a standalone backend for the sessions Service.
    api.apply(targets(
        "service redis/redis-cluster:6379\nservice shop/sessions:6379 standalone\n",
    ));
    wait_for(
        "the standalone backend serving",
        Duration::from_secs(15),
        || topo.pod(0).through_proxy(sessions_ip).then_some(()),
    );
    let pod = topo.pod(0);
    let set = pod.redis_cli(sessions_ip, 6379, &["SET", "session:1", "alice"]);
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK");
    assert_eq!(sessions.cli(&["GET", "session:1"]).trim(), "alice");
    let opened = r#"redirector_client_connections_opened_total{backend="shop/sessions"}"#;
    assert!(
        testbed::http::sample(&topo.metrics(), opened) >= 1.0,
        "{}",
        topo.metrics()
    );
    // A standalone backend shows no cluster.
    let cluster = pod.redis_cli(sessions_ip, 6379, &["CLUSTER", "INFO"]);
    assert!(
        String::from_utf8_lossy(&cluster.stdout).contains("cluster support disabled"),
        "{cluster:?}"
    );

    // Re-kinded: the same Service as a plain tcp relay, no restart.
    api.apply(targets(
        "service redis/redis-cluster:6379\nservice shop/sessions:6379 tcp\n",
    ));
    wait_for(
        "the Service relayed as tcp",
        Duration::from_secs(15),
        || {
            (!topo.pod(0).through_proxy(sessions_ip)
                && testbed::http::sample(
                    &topo.metrics(),
                    r#"redirector_relay_bytes_total{backend="shop/sessions",direction="upstream"}"#,
                ) > 0.0)
                .then_some(())
        },
    );
    let get = topo
        .pod(0)
        .redis_cli(sessions_ip, 6379, &["GET", "session:1"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "alice");
    let status = topo.status();
    let targets_now = status["targets"].to_string();
    assert!(targets_now.contains("10.96.5.10:6379"), "{targets_now}");

    // Removed: the target leaves the map, the pod goes direct, the series go.
    api.apply(targets("service redis/redis-cluster:6379\n"));
    wait_for(
        "the backend's target removed",
        Duration::from_secs(15),
        || (!topo.status()["targets"].to_string().contains("10.96.5.10")).then_some(()),
    );
    let before = topo.counters();
    let get = topo
        .pod(0)
        .redis_cli(sessions_ip, 6379, &["GET", "session:1"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "alice");
    assert_eq!(
        topo.counters().steered,
        before.steered,
        "still steered after removal"
    );
    wait_for(
        "the removed backend's series dropped",
        Duration::from_secs(15),
        || (!topo.metrics().contains(r#"backend="shop/sessions""#)).then_some(()),
    );
    // The cluster backend never blinked.
    assert!(steered(&topo, 0));
}

/// The Redis pods' workload identity, as the stand-in for their ztunnel
/// proves it.
const REDIS_IDENTITY: &str = "spiffe://cluster.local/ns/redis/sa/redis-server";
const STANDIN_ADMIN: &str = "127.0.0.1:15021";

/// A pod of the `redis` namespace on another node, at `ip`, running as
/// `account`.
fn redis_pod(index: usize, ip: IpAddr, account: &str) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {
            "name": format!("redis-{index}"),
            "namespace": "redis",
            "uid": format!("0a1b2c3d-0000-4000-8000-0000000001{index:02}"),
        },
        "spec": {"nodeName": "node-b", "serviceAccountName": account, "containers": [{"name": "redis", "image": "redis"}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// Istio ambient: with `--mesh-identities-from-api`, the Redis pods of an
/// ambient namespace are reached through the HBONE listener on their own
/// address (ztunnel's place in the pod; here a second redirector that
/// presents the pod's workload certificate there, as ztunnel does), and
/// that listener must prove the pod's service account as the API names
/// it: a pod the API says runs as another account is refused, and the
/// same address is accepted once the API agrees with the certificate.
#[test]
fn ambient_redis_pods_are_reached_through_hbone_as_the_account_the_api_names() {
    use testbed::{
        daemon::Daemon,
        http::{get_in, sample},
        topology::cluster_nodes,
        two_nodes::{NODE_IDENTITY, certs},
    };
    require_kernel!();
    let _kernel = exclusive();
    let (mut topo, api) = node(1);
    let kubelet = Kubelet::new(&topo);
    api.apply(namespace("shop", &[OPT_IN]));
    api.apply(pod("shop", "web-0", UID_WEB0, NODE, &[]));
    let _web0 = kubelet.start_pod(&topo, 0, UID_WEB0);
    // The Redis pods are in the ambient mesh, and the API first says they
    // run as an account their certificate does not name.
    api.apply(namespace(
        "redis",
        &[("istio.io/dataplane-mode", "ambient")],
    ));
    let redis_ips: Vec<IpAddr> = cluster_nodes().map(|n| n.ip()).collect();
    for (i, ip) in redis_ips.iter().enumerate() {
        api.apply(redis_pod(i, *ip, "intruder"));
    }

    let dir = topo.workdir().join("mesh");
    let ca = dir.join("ca");
    certs(&["ca", "--dir", path_str(&ca)]);
    for (identity, out) in [(NODE_IDENTITY, "node"), (REDIS_IDENTITY, "redis")] {
        certs(&[
            "issue",
            "--ca",
            path_str(&ca),
            "--identity",
            identity,
            "--out",
            path_str(&dir.join(out)),
        ]);
    }
    // ztunnel's stand-in: tunnels to the Redis pods' addresses are
    // answered with their workload certificate.
    let mut standin_args: Vec<String> = [
        "--steering",
        "off",
        "--proxy-addr",
        "127.0.0.1:16379",
        "--cluster-seed",
        "10.96.0.11:6379",
        "--admin-addr",
        STANDIN_ADMIN,
        "--hbone-listen",
        "0.0.0.0:15008",
        "--hbone-certs",
        path_str(&dir.join("node")),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for ip in &redis_ips {
        standin_args.push("--hbone-workload-certs".into());
        standin_args.push(format!("{ip}={}", path_str(&dir.join("redis"))));
    }
    let _standin = Daemon::start(
        &topo.node_place(),
        &dir.join("standin-pins"),
        standin_args,
        vec![],
        dir.join("standin.log"),
    );

    let node_certs = dir.join("node");
    let args = agent_args(
        &topo,
        &api,
        &[
            "--hbone-certs",
            path_str(&node_certs),
            "--hbone-listen",
            "none",
            "--mesh-identities-from-api",
        ],
    );
    topo.start_daemon(args);
    wait_for(
        "the six Redis pods meshed from the API",
        Duration::from_secs(15),
        || (sample(&topo.metrics(), "redirector_k8s_mesh_addresses") == 6.0).then_some(()),
    );
    wait_for(
        "the pods' listener refused for not proving the account the API names",
        Duration::from_secs(15),
        || {
            (sample(
                &topo.metrics(),
                "redirector_hbone_tls_handshake_failures_total{reason=\"wrong_identity\"}",
            ) >= 1.0)
                .then_some(())
        },
    );
    // What the steered client sees meanwhile: the refusal, named.
    wait_for(
        "the client told which identity was expected",
        Duration::from_secs(15),
        || {
            let refusal = topo.pod(0).try_through_proxy(VIP).err()?;
            (refusal.contains("CLUSTERDOWN")
                && refusal
                    .contains("expected identity spiffe://cluster.local/ns/redis/sa/intruder"))
            .then_some(())
        },
    );
    let standin_metrics = || {
        get_in(
            &topo.node_place(),
            STANDIN_ADMIN.parse().expect("addr"),
            "/metrics",
        )
    };
    assert_eq!(
        sample(
            &standin_metrics(),
            "redirector_hbone_connect_responses_total{status=\"200\"}"
        ),
        0.0,
        "a CONNECT went through to a listener of the wrong identity"
    );

    // The API now agrees with the certificate: the same addresses pass.
    for (i, ip) in redis_ips.iter().enumerate() {
        api.apply(redis_pod(i, *ip, "redis-server"));
    }
    wait_for(
        "the cluster reached once the API names the certificate's account",
        Duration::from_secs(15),
        || (topo.pod(0).try_through_proxy(VIP) == Ok(true)).then_some(()),
    );
    let web = topo.pod(0);
    for i in 0..30 {
        let key = format!("ambient:{i}");
        assert_eq!(web.redis(&["SET", &key, &format!("v{i}")]), "OK");
        assert_eq!(web.redis(&["GET", &key]), format!("v{i}"));
    }
    let through = sample(
        &standin_metrics(),
        "redirector_hbone_connect_responses_total{status=\"200\"}",
    );
    assert!(
        through >= 3.0,
        "the three masters are reached through their pods' listener: {through} CONNECTs"
    );
    // Every key landed in the cluster, read directly from the node.
    let cluster = topo.cluster();
    for i in 0..30 {
        let key = format!("ambient:{i}");
        let owner = cluster.owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
        assert_eq!(cluster.cli(owner, &["GET", &key]).trim(), format!("v{i}"));
    }
    // A pod leaving the ambient mesh is no longer meshed.
    api.apply(namespace("redis", &[]));
    wait_for(
        "the namespace's opt-out unmeshes its pods",
        Duration::from_secs(15),
        || (sample(&topo.metrics(), "redirector_k8s_mesh_addresses") == 0.0).then_some(()),
    );
}
