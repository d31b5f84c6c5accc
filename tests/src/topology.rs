//! A node and its pods, the shape of a Kubernetes node, built from network
//! namespaces, veth pairs and cgroups:
//!
//! ```text
//!  pod-0 netns               node netns
//!  eth0 10.200.1.2/24 ─veth─ pod0 10.200.1.1/24      lo: 10.96.0.10  (Redis service address)
//!       fd00:200:1::2/64         fd00:200:1::1/64        10.200.0.1  (node address: proxy)
//!  pod-1 netns                                           fd00:96::10, fd00:200::1
//!  eth0 10.200.2.2/24 ─veth─ pod1 10.200.2.1/24
//! ```
//!
//! Pods route only the service and node ranges to the node; there is no
//! default route anywhere, so no packet can leave the machine.
//!
//! cgroups mirror a node too: `<attach root>/node` holds the daemon and Redis,
//! `<attach root>/pod-N` each pod's processes, and the programs attach at the
//! root, reaching the pods through the hierarchy as they would on a node.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use crate::{
    TempDir,
    cgroup::{Cgroup, Cgroup2Mount},
    cluster::RedisCluster,
    daemon::{self, Daemon},
    netns::Netns,
    process::{Child, Place, path_str},
    unique,
};

pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const REDIS_PORT: u16 = 6379;
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
pub const PROXY_PORT: u16 = 15379;

pub fn proxy_addr() -> SocketAddr {
    SocketAddr::from((NODE_ADDR, PROXY_PORT))
}

pub fn proxy_addr6() -> SocketAddr {
    SocketAddr::from((NODE_ADDR6, PROXY_PORT))
}

pub struct Pod {
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub netns: Netns,
    pub cgroup: Cgroup,
}

impl Pod {
    pub fn place(&self) -> Place {
        Place {
            netns: Some(self.netns.path()),
            cgroup: Some(self.cgroup.path().into()),
        }
    }

    /// `redis-cli -h <host> -p <port> <args>` from inside the pod, with a
    /// deadline so a broken path fails the test instead of hanging it.
    pub fn redis_cli(&self, host: IpAddr, port: u16, args: &[&str]) -> std::process::Output {
        let (host, port) = (host.to_string(), port.to_string());
        let mut full = vec!["20", "redis-cli", "-h", host.as_str(), "-p", port.as_str()];
        full.extend_from_slice(args);
        self.place().output("timeout", &full)
    }

    /// Like [`Self::redis_cli`] against the service address; asserts success.
    pub fn redis(&self, args: &[&str]) -> String {
        let out = self.redis_cli(IpAddr::V4(SERVICE_VIP), REDIS_PORT, args);
        assert!(
            out.status.success(),
            "redis-cli {args:?} from pod {}: {out:?}",
            self.ip
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The address Redis sees this pod's connection come from (`CLIENT
    /// INFO` of the connection itself), through whatever path the kernel
    /// picks for a connect to `host`.
    pub fn through_proxy(&self, host: IpAddr) -> bool {
        self.try_through_proxy(host)
            .unwrap_or_else(|out| panic!("INFO server failed: {out}"))
    }

    /// Whether a connect to `host` from this pod reaches the node proxy
    /// (whose `INFO server` names redirector) or Redis itself; redis-cli's
    /// output when neither answers.
    pub fn try_through_proxy(&self, host: IpAddr) -> Result<bool, String> {
        let out = self.redis_cli(host, REDIS_PORT, &["INFO", "server"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("redis_version:") {
            return Err(format!("{out:?}"));
        }
        Ok(text.contains("redirector_version:"))
    }
}

/// The service cluster's nodes.
pub fn cluster_nodes() -> impl Iterator<Item = SocketAddr> {
    (10..16).map(|last| SocketAddr::from(([10, 96, 0, last], REDIS_PORT)))
}

pub struct Topology {
    /// Stopped first on drop.
    pub daemon: Option<Daemon>,
    pub cluster: Option<RedisCluster>,
    pub pods: Vec<Pod>,
    pub node: Netns,
    node_cgroup: Cgroup,
    attach_root: Cgroup,
    // Held for its Drop: unmounted after the cgroups in it are gone.
    _cgroup_mount: Cgroup2Mount,
    pin_dir: PathBuf,
    workdir: TempDir,
}

impl Topology {
    pub fn build(pods: usize) -> Self {
        let id = unique("rdr-t");
        let workdir = TempDir::new("rdr-work-");
        let cgroup_mount = Cgroup2Mount::new(workdir.path().join("cgroup2"));
        let attach_root = Cgroup::create(cgroup_mount.path().join(&id));
        let node_cgroup = Cgroup::create(attach_root.path().join("node"));

        let node = Netns::create(&format!("{id}-node"));
        node.sysctl("net.ipv6.conf.all.disable_ipv6", "0");
        for addr in [
            format!("{SERVICE_VIP}/32"),
            format!("{NODE_ADDR}/32"),
            format!("{SERVICE_VIP6}/128"),
            format!("{NODE_ADDR6}/128"),
        ] {
            node.ip(&["addr", "add", &addr, "dev", "lo"]);
        }

        let pods = (0..pods)
            .map(|i| {
                let subnet = u8::try_from(i + 1).expect("at most 254 pods");
                let netns = Netns::create(&format!("{id}-pod{i}"));
                netns.sysctl("net.ipv6.conf.all.disable_ipv6", "0");
                let host_if = format!("pod{i}");
                node.ip(&[
                    "link",
                    "add",
                    &host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    netns.name(),
                ]);
                let gw = Ipv4Addr::new(10, 200, subnet, 1);
                let ip = Ipv4Addr::new(10, 200, subnet, 2);
                let gw6 = Ipv6Addr::new(0xfd00, 0x200, u16::from(subnet), 0, 0, 0, 0, 1);
                let ip6 = Ipv6Addr::new(0xfd00, 0x200, u16::from(subnet), 0, 0, 0, 0, 2);
                node.ip(&["addr", "add", &format!("{gw}/24"), "dev", &host_if]);
                node.ip(&[
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    &host_if,
                    "nodad",
                ]);
                node.ip(&["link", "set", &host_if, "up"]);
                netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
                netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
                netns.ip(&["link", "set", "eth0", "up"]);
                for range in ["10.96.0.0/16", "10.200.0.0/24"] {
                    netns.ip(&["route", "add", range, "via", &gw.to_string()]);
                }
                for range in ["fd00:96::/64", "fd00:200::/64"] {
                    netns.ip(&["-6", "route", "add", range, "via", &gw6.to_string()]);
                }
                let cgroup = Cgroup::create(attach_root.path().join(format!("pod-{i}")));
                Pod {
                    ip,
                    ip6,
                    netns,
                    cgroup,
                }
            })
            .collect();

        Self {
            daemon: None,
            cluster: None,
            pods,
            node,
            node_cgroup,
            attach_root,
            _cgroup_mount: cgroup_mount,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            workdir,
        }
    }

    pub fn node_place(&self) -> Place {
        Place {
            netns: Some(self.node.path()),
            cgroup: Some(self.node_cgroup.path().into()),
        }
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where this build's maps are pinned (`<pin dir>/maps-v<ABI>`).
    pub fn maps_dir(&self) -> PathBuf {
        self.pin_dir
            .join(format!("maps-v{}", redirector_ebpf::ABI_VERSION))
    }

    /// Where this topology mounted cgroup v2: the root of the hierarchy,
    /// above every process on the machine.
    pub fn cgroup2_root(&self) -> &Path {
        self._cgroup_mount.path()
    }

    /// The cgroup the programs attach to.
    pub fn attach_root(&self) -> &Path {
        self.attach_root.path()
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// A Redis Cluster of 3 masters and 3 replicas in the node netns, on
    /// 10.96.0.10-15:6379; the service address is its first node, as a
    /// Kubernetes service would lead to one of the cluster's pods.
    pub fn start_service_cluster(&mut self) -> &RedisCluster {
        let nodes: Vec<SocketAddr> = cluster_nodes().collect();
        for node in &nodes[1..] {
            self.node
                .ip(&["addr", "add", &format!("{}/32", node.ip()), "dev", "lo"]);
        }
        let dir = self.workdir().join("cluster");
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let cluster = RedisCluster::start(&self.node_place(), &nodes, 1, &dir);
        self.cluster.insert(cluster)
    }

    pub fn cluster(&self) -> &RedisCluster {
        self.cluster.as_ref().expect("cluster started")
    }

    /// Default daemon arguments for this topology: listener on the node
    /// address, attached at the topology's cgroup, steering the service.
    pub fn daemon_args(&self) -> Vec<String> {
        self.daemon_args_at(self.attach_root())
    }

    /// [`Self::daemon_args`], attached at `cgroup_root` instead.
    pub fn daemon_args_at(&self, cgroup_root: &Path) -> Vec<String> {
        vec![
            "--proxy-addr".into(),
            format!("{},{}", proxy_addr(), proxy_addr6()),
            "--redis-target".into(),
            format!("{SERVICE_VIP}:{REDIS_PORT},[{SERVICE_VIP6}]:{REDIS_PORT}"),
            "--cgroup-root".into(),
            path_str(cgroup_root).into(),
        ]
    }

    /// Starts `redirector run` in the node netns with `args`, with eBPF
    /// debug logs on so tests can see aya-log records arrive.
    pub fn start_daemon(&mut self, args: Vec<String>) -> &mut Daemon {
        self.start_daemon_logging(args, "info,redirector_ebpf=debug")
    }

    /// [`Self::start_daemon`] with a given `RUST_LOG`.
    pub fn start_daemon_logging(&mut self, args: Vec<String>, rust_log: &str) -> &mut Daemon {
        self.start_daemon_until(args, rust_log, daemon::READY)
    }

    /// Starts the daemon and waits for `ready_line` in its log (e.g.
    /// [`daemon::LISTENING`] when no backend will answer).
    pub fn start_daemon_until(
        &mut self,
        args: Vec<String>,
        rust_log: &str,
        ready_line: &'static str,
    ) -> &mut Daemon {
        assert!(self.daemon.is_none(), "daemon already started");
        let daemon = Daemon::start_until(
            &self.node_place(),
            &self.pin_dir,
            args,
            vec![("RUST_LOG".into(), rust_log.into())],
            self.workdir().join("redirector.log"),
            ready_line,
        );
        self.daemon.insert(daemon)
    }

    /// A topology with the Redis Cluster behind the service address and the
    /// daemon running with [`Self::daemon_args`] plus `extra_args`.
    pub fn running(pods: usize, extra_args: &[&str]) -> Self {
        let mut topo = Self::build(pods);
        topo.start_service_cluster();
        let mut args = topo.daemon_args();
        args.extend(extra_args.iter().map(ToString::to_string));
        topo.start_daemon(args);
        topo
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon started")
    }

    /// `redirector --pin-dir <this topology's> <args>`, asserting success.
    pub fn cli(&self, args: &[&str]) -> String {
        daemon::cli_ok(&self.pin_dir, args)
    }

    /// `redirector --pin-dir <this topology's> <args>` run in the node,
    /// where the daemon's admin endpoint is (so `status` shows the
    /// daemon's own report); returns stdout, asserting success.
    pub fn node_cli(&self, args: &[&str]) -> String {
        let mut full = vec!["--pin-dir", path_str(&self.pin_dir)];
        full.extend_from_slice(args);
        let binary = daemon::binary();
        let out = self.node_place().output(path_str(&binary), &full);
        assert!(
            out.status.success(),
            "redirector {args:?} in the node: {out:?}"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        daemon::status(&self.pin_dir)
    }

    /// Summed steering counters, as `redirector status` reports them.
    pub fn counters(&self) -> Counters {
        let status = self.status();
        let c = &status["counters"];
        let get = |name: &str| c[name].as_u64().unwrap_or_else(|| panic!("counter {name}"));
        Counters {
            steered: get("steered"),
            passed: get("passed"),
            proxy_own: get("proxy_own"),
            proxy_down: get("proxy_down"),
            proxy_full: get("proxy_full"),
            loopback: get("loopback"),
            foreign_mark: get("foreign_mark"),
            errors: get("errors"),
        }
    }

    /// The daemon's `/metrics`, from its default admin address in the node.
    pub fn metrics(&self) -> String {
        crate::http::get_in(
            &self.node_place(),
            SocketAddr::from(([127, 0, 0, 1], 15020)),
            "/metrics",
        )
    }

    pub fn enroll(&self, netns: &Netns) {
        self.cli(&["enroll", "--netns", path_str(&netns.path())]);
    }

    pub fn unenroll(&self, netns: &Netns) {
        self.cli(&["unenroll", "--netns", path_str(&netns.path())]);
    }
}

pub use redirector_ebpf::Counters;

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes first (cgroups cannot be removed while they hold any),
        // then the pins, then cgroups and namespaces as fields drop.
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
        self.cluster = None;
        if self.pin_dir.exists() {
            let out = daemon::cli(&self.pin_dir, &["uninstall"]);
            if !out.status.success() {
                eprintln!(
                    "warning: uninstall of {} failed: {out:?}",
                    self.pin_dir.display()
                );
            }
        }
    }
}

/// kubelet's cgroup layout under a topology's attach root (cgroupfs
/// driver): `kubepods/besteffort/pod<uid>/<container>`, where the node
/// agent and `enroll --pod-uid` look for a pod's processes.
pub struct Kubelet {
    // Dropped leaf first: the pods' guards before these.
    qos: Cgroup,
    _kubepods: Cgroup,
}

impl Kubelet {
    pub fn new(topo: &Topology) -> Self {
        let kubepods = Cgroup::create(topo.attach_root().join("kubepods"));
        let qos = Cgroup::create(kubepods.path().join("besteffort"));
        Self {
            qos,
            _kubepods: kubepods,
        }
    }

    /// A process of pod `uid` as kubelet places it: in the network
    /// namespace of the topology's pod `index`, and in the pod's container
    /// cgroup.
    pub fn start_pod(&self, topo: &Topology, index: usize, uid: &str) -> KubeletPod {
        let pod = Cgroup::create(self.qos.path().join(format!("pod{uid}")));
        let container = Cgroup::create(pod.path().join("c0ffee"));
        let place = Place {
            netns: Some(topo.pod(index).netns.path()),
            cgroup: Some(container.path().to_path_buf()),
        };
        let app = Child::spawn(format!("pod {uid}"), {
            let mut cmd = place.command("sleep");
            cmd.arg("600");
            cmd
        });
        KubeletPod {
            app,
            _container: container,
            _pod: pod,
        }
    }
}

/// A pod's process and its cgroups, ended and removed on drop.
pub struct KubeletPod {
    // Dropped first: the cgroups can only go once the process has.
    app: Child,
    _container: Cgroup,
    _pod: Cgroup,
}

impl KubeletPod {
    pub fn pid(&self) -> u32 {
        self.app.pid()
    }
}
