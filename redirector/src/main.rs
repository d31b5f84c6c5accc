//! The `redirector` command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use http::{Method, StatusCode};
use redirector::{
    admin, app,
    config::{self, RunConfig},
    hbone::{
        metrics::TunnelMetrics,
        outbound::{Origin, Outbound},
    },
    identity::{
        Identity, mint,
        tls::{CertFiles, Tls},
    },
    netns::{self, NetnsRef},
    proxy::{
        AuthMode, DownstreamAuth, ReadPolicy, Settings, UpstreamAuth, host::SessionLoop,
        pool::PoolConfig,
    },
    resp::request::Limits,
    status,
    steering::{self, Layout, Maps},
};

#[derive(Parser)]
#[command(
    version,
    about = "Node-level Redis Cluster redirector with eBPF connect steering"
)]
struct Cli {
    /// bpffs directory holding redirector's pinned maps and links.
    #[arg(long, global = true, env = "REDIRECTOR_PIN_DIR", default_value = steering::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install (or adopt) the eBPF programs and run the node proxy.
    Run(Box<RunArgs>),
    /// Opt a network namespace in: its connects to Redis targets are steered.
    Enroll {
        #[command(flatten)]
        netns: NetnsArgs,
        /// Allow enrolling the host's own network namespace (PID 1's), which
        /// steers every host process, kubelet included.
        #[arg(long)]
        allow_host_netns: bool,
    },
    /// Opt a network namespace out.
    Unenroll {
        #[command(flatten)]
        netns: NetnsArgs,
        /// The namespace's cookie, as `status` shows it (for a namespace that no longer exists).
        #[arg(long, conflicts_with_all = ["netns", "pid", "pod_uid"], required_unless_present_any = ["netns", "pid", "pod_uid"])]
        cookie: Option<u64>,
    },
    /// Show attached programs, the proxy, targets, enrolled namespaces and counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The running daemon's admin endpoint, asked for its readiness and
        /// backend health (best effort: the pins alone are read otherwise).
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin_addr: SocketAddr,
    },
    /// Detach every program and remove every pin.
    Uninstall,
    /// Mount bpffs (mode 0700) on DIR unless it is bpffs already: run on the
    /// host by the DaemonSet's opt-in init container, so pins survive the
    /// agent's restarts on nodes whose OS does not mount it (kind, k3d).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        dir: PathBuf,
    },
    /// Drain the running proxy (a preStop hook): new connects go direct,
    /// readiness fails, and this waits for its clients to leave.
    Drain {
        /// The running proxy's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin_addr: SocketAddr,
        /// Longest wait for client connections to close.
        #[arg(long, default_value = "20s", value_parser = config::parse_duration)]
        timeout: Duration,
    },
    /// Exit 0 if the daemon writing FILE (`run --ready-file`) is ready: an
    /// exec readiness probe that asks this pod's daemon, never another.
    Ready {
        #[arg(long)]
        file: PathBuf,
    },
    /// Install or remove the CNI plugin that enrolls pods before they start.
    #[command(subcommand)]
    Cni(redirector::cni::CniCommand),
    /// Mint a local CA and node certificates for HBONE (demo and tests;
    /// production nodes get theirs from the mesh's CA).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Open one HBONE tunnel stream to TARGET through the listener on
    /// TARGET's address, print the answer, and optionally exchange bytes:
    /// checks a peer node's certificates, policy and endpoint by hand.
    TunnelCheck {
        /// Directory with ca.pem, cert.pem and key.pem to dial with.
        #[arg(long)]
        hbone_certs: PathBuf,
        /// Identity the peer must prove [default: the dialling certificate's].
        #[arg(long)]
        hbone_peer_identity: Option<Identity>,
        #[arg(long, default_value_t = redirector::hbone::DEFAULT_PORT)]
        hbone_peer_port: u16,
        /// The listener to go through [default: TARGET's IP, --hbone-peer-port].
        #[arg(long)]
        via: Option<SocketAddr>,
        /// Bytes to send once connected (C escapes such as \r\n work); the reply is printed.
        #[arg(long)]
        send: Option<String>,
        target: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA: writes ca.pem and ca-key.pem into DIR.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a node certificate: writes ca.pem, cert.pem and key.pem into OUT,
    /// the directory `run --hbone-certs` takes.
    Issue {
        /// The CA directory (`certs ca --dir`).
        #[arg(long)]
        ca: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long)]
        identity: Identity,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
#[group(multiple = false)]
struct NetnsArgs {
    /// A network namespace file, e.g. /var/run/netns/pod-a.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// A process whose network namespace to use.
    #[arg(long)]
    pid: Option<u32>,
    /// A Kubernetes pod on this node, by UID: its namespace is found through
    /// the pod's cgroup under /proc (needs the host's PID namespace).
    #[arg(long)]
    pod_uid: Option<String>,
}

impl NetnsArgs {
    fn reference(&self) -> anyhow::Result<Option<NetnsRef>> {
        Ok(match (&self.netns, self.pid, &self.pod_uid) {
            (Some(path), ..) => Some(NetnsRef::Path(path.clone())),
            (None, Some(pid), _) => Some(NetnsRef::Pid(pid)),
            (None, None, Some(uid)) => {
                let pid = redirector::pods::find_process(std::path::Path::new("/proc"), uid)?
                    .with_context(|| format!("no process of pod {uid} runs on this node"))?;
                Some(NetnsRef::Pid(pid))
            }
            (None, None, None) => None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AuthModeArg {
    Auto,
    Passthrough,
    Proxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Args)]
struct RunArgs {
    /// Load the eBPF programs and steer enrolled namespaces (needs root);
    /// `off` runs only the proxy, which clients then dial themselves.
    #[arg(long, default_value = "on")]
    steering: OnOff,
    /// Redis Cluster nodes to discover the cluster from [default: the IP:PORT redis targets].
    #[arg(
        long = "cluster-seed",
        env = "REDIRECTOR_CLUSTER_SEEDS",
        value_delimiter = ','
    )]
    seeds: Vec<SocketAddr>,
    /// A Redis deployment behind the proxy, as NAME=KIND:ADDR[,ADDR...]:
    /// `cluster:SEED,...`, `standalone:PRIMARY[,REPLICA...]` or `tcp` (a
    /// plain relay). Repeatable; its targets are `--redis-target NAME=...`.
    /// `--cluster-seed` is the one-cluster shorthand.
    #[arg(long = "backend", value_name = "NAME=KIND:ADDRS")]
    backends: Vec<redirector::backend::BackendSpec>,
    /// Backends (with their targets and settings) from a TOML file: one
    /// `[[backend]]` table each, see README.
    #[arg(long, env = "REDIRECTOR_BACKENDS_FILE")]
    backends_file: Option<PathBuf>,
    /// Exit at start unless every backend answers within --connect-timeout
    /// (otherwise an unreachable backend is retried while the others serve).
    #[arg(long)]
    require_backends: bool,
    /// Whose credentials clients use: `passthrough` (Redis checks each
    /// client's own AUTH), `proxy` (--auth-* and --upstream-*); auto:
    /// proxy when any of those flags is given, else passthrough.
    #[arg(long, default_value = "auto")]
    auth_mode: AuthModeArg,
    /// In proxy auth mode, let clients run @admin and @dangerous commands
    /// (CONFIG SET, FLUSHALL, DEBUG, ...) with the proxy's credentials.
    #[arg(long)]
    allow_admin_commands: bool,
    /// Where reads go.
    #[arg(long, value_enum, default_value = "master")]
    read_policy: ReadPolicy,
    /// Password clients must AUTH with (the `default` user).
    #[arg(long, env = "REDIRECTOR_AUTH_PASSWORD", hide_env_values = true)]
    auth_password: Option<String>,
    /// Further ACL-style users, USER:PASSWORD (AUTH user password).
    #[arg(
        long = "auth-user",
        env = "REDIRECTOR_AUTH_USERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    auth_users: Vec<String>,
    /// User the proxy authenticates to Redis as (default user when absent).
    #[arg(long, env = "REDIRECTOR_UPSTREAM_USER")]
    upstream_user: Option<String>,
    /// Password the proxy authenticates to Redis with.
    #[arg(long, env = "REDIRECTOR_UPSTREAM_PASSWORD", hide_env_values = true)]
    upstream_password: Option<String>,
    /// Shared upstream connections per Redis node (and protocol). One
    /// batches the most commands per write (measured: fewer syscalls).
    #[arg(long, default_value_t = 1)]
    upstream_connections: usize,
    /// Warm dedicated connections kept per node for transactions, blocking commands and pub/sub.
    #[arg(long, default_value_t = 8)]
    idle_leases: usize,
    /// Most client connections on this node; at the limit new steered
    /// connects go direct (fail open), others are refused with Redis' error.
    #[arg(long, default_value_t = 10_000)]
    max_clients: usize,
    /// Most connections one pod (network namespace) may hold; 0: no limit
    /// beyond --max-clients.
    #[arg(long, default_value_t = 1_000)]
    max_clients_per_pod: usize,
    /// Most connections one direct (unsteered) source address may hold; 0:
    /// no limit beyond --max-clients.
    #[arg(long, default_value_t = 0)]
    max_clients_per_source: usize,
    /// Sources that may dial the proxy without being steered (CIDRs or
    /// addresses); every other unsteered connection is refused.
    #[arg(
        long,
        env = "REDIRECTOR_ALLOW_DIRECT_FROM",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1"
    )]
    allow_direct_from: Vec<redirector::cidr::Cidr>,
    /// Close clients idle this long (0: never).
    #[arg(long, default_value = "0", value_parser = config::parse_duration)]
    idle_timeout: Duration,
    /// Replies a client may have outstanding before the proxy stops reading from it.
    #[arg(long, default_value_t = 1024)]
    max_pipeline: usize,
    /// What a client may be owed before it is disconnected, as Redis's
    /// `client-output-buffer-limit` (`<class> <hard> <soft> <seconds>`...,
    /// classes normal, replica, pubsub; unnamed classes keep Redis's
    /// defaults: normal 0 0 0, pubsub 32mb 8mb 60).
    #[arg(long, default_value = "pubsub 32mb 8mb 60")]
    client_output_buffer_limit: redirector::proxy::output_limit::OutputLimits,
    /// Largest bulk string accepted from clients, in bytes (Redis' proto-max-bulk-len).
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    max_bulk_len: usize,
    /// How long commands are retried through failovers, TRYAGAIN and CLUSTERDOWN.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    retry_window: Duration,
    /// Periodic topology refresh (MOVED and failures also trigger one).
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    topology_refresh: Duration,
    /// The admin endpoint: /metrics, /healthz/*, /status, /dashboard and
    /// POST /drain; keep it on loopback. `none` disables.
    #[arg(long, env = "REDIRECTOR_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    admin_addr: String,
    /// A /metrics-only listener for Prometheus, e.g. the node address: IP
    /// (port 15020) or IP:PORT.
    #[arg(long, env = "REDIRECTOR_METRICS_ADDR", value_parser = config::parse_metrics_addr)]
    metrics_addr: Option<SocketAddr>,
    /// A file that exists while this process is ready (serving, not
    /// draining), for `redirector ready`: during an upgrade two daemons
    /// answer on the admin port, so an HTTP readiness probe may reach the
    /// other one.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Node address the proxy listens on and steered connects are rewritten
    /// to, one per address family: IP (port 15379), IP:PORT or [IPv6]:PORT.
    /// Pods must be able to reach it.
    #[arg(
        long = "proxy-addr",
        env = "REDIRECTOR_PROXY_ADDR",
        value_delimiter = ',',
        required = true,
        value_parser = config::parse_proxy_addr
    )]
    proxy_addrs: Vec<SocketAddr>,
    /// Redis service to steer, [NAME=]TARGET: IP:PORT, [IPv6]:PORT, or :PORT
    /// for any address; NAME picks the backend (needed with several)
    /// [default: :6379; with --kubernetes, none beyond the targets ConfigMap].
    #[arg(
        long = "redis-target",
        env = "REDIRECTOR_REDIS_TARGETS",
        value_delimiter = ','
    )]
    targets: Vec<redirector::backend::NamedTarget>,
    /// cgroup v2 directory to attach to [default: the host's cgroup v2 root, mounted if needed].
    #[arg(long, env = "REDIRECTOR_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// SO_MARK of the proxy's own sockets, which are never steered.
    #[arg(long, default_value = "0x1000", value_parser = config::parse_u32)]
    socket_mark: u32,
    /// Mark bits (VALUE/MASK) set on every steered socket, so that a pod's
    /// own redirection leaves it to the node proxy; for Istio ambient,
    /// ztunnel's 0x539/0xfff (the ambient overlay sets it).
    #[arg(long, env = "REDIRECTOR_STEERED_SOCKET_MARK")]
    steered_socket_mark: Option<config::MarkBits>,
    /// Connects go direct when the proxy's heartbeat is older than this (fail open); 0 always steers (fail closed).
    #[arg(long, default_value = "3s", value_parser = config::parse_duration)]
    liveness: Duration,
    /// On SIGTERM: how long clients still connected may stay (idle ones
    /// are closed at a request boundary sooner); then the daemon exits.
    /// Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value = "20s", value_parser = config::parse_duration)]
    drain_grace: Duration,
    /// Upstream connect timeout.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    connect_timeout: Duration,
    /// Proxy workers: threads, each with its own runtime, SO_REUSEPORT
    /// listeners, upstream connections and metric shards.
    #[arg(long, env = "REDIRECTOR_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Which loop runs client sessions: `epoll` (each worker's own epoll
    /// loop) or `task` (a tokio task per client, the earlier default; see
    /// ARCHITECTURE.md, "Who runs a session").
    #[arg(long, env = "REDIRECTOR_SESSION_LOOP", value_enum, default_value_t = SessionLoop::Epoll)]
    session_loop: SessionLoop,
    #[command(flatten)]
    hbone: HboneArgs,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
}

/// The Kubernetes node agent (off unless --kubernetes is given).
#[derive(Args)]
struct KubernetesArgs {
    /// Enroll pods from the API server: those on this node in namespaces
    /// with the opt-in label; targets and seeds from the targets ConfigMap.
    #[arg(long, env = "REDIRECTOR_KUBERNETES")]
    kubernetes: bool,
    /// This node's name (`spec.nodeName` of its pods).
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    node_name: Option<String>,
    /// API server URL [default: in-cluster service account, else kubeconfig].
    #[arg(long)]
    kube_api: Option<String>,
    /// Namespace label (KEY=VALUE) that opts every pod of the namespace in.
    #[arg(long = "namespace-label", value_delimiter = ',', default_value = redirector::k8s::DEFAULT_NAMESPACE_LABEL)]
    namespace_labels: Vec<redirector::k8s::Label>,
    /// Pod label (KEY=VALUE) that opts one pod out.
    #[arg(long = "pod-opt-out-label", value_delimiter = ',', default_value = redirector::k8s::DEFAULT_POD_OPT_OUT_LABEL)]
    pod_opt_out_labels: Vec<redirector::k8s::Label>,
    /// Also honour Istio ambient's labels: namespaces with
    /// istio.io/dataplane-mode=ambient, pods opting out with
    /// istio.io/dataplane-mode=none.
    #[arg(long)]
    ambient_label: bool,
    /// The ConfigMap (NAMESPACE/NAME) declaring Redis targets and seeds.
    #[arg(long, default_value = redirector::k8s::DEFAULT_TARGETS_CONFIGMAP)]
    targets_configmap: redirector::k8s::ObjectRef,
    /// Unix socket the CNI plugin asks for enrollment on; `none` disables.
    #[arg(long, default_value = redirector::cni::wire::DEFAULT_SOCKET)]
    cni_socket: String,
    /// The host's /proc (a mount of it: a procfs shows the PID namespace that
    /// mounted it), to find pods' processes and their network namespaces.
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Keep redirector-cni chained in this CNI config dir (the node's
    /// /etc/cni/net.d), re-adding it when the network plugin rewrites its
    /// config; unset: only `redirector cni install` chains it.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin dir, where redirector-cni is (re)installed.
    #[arg(long, default_value = redirector::cni::conf::DEFAULT_BIN_DIR)]
    cni_bin_dir: PathBuf,
    /// The chained plugin fails sandbox setup when the agent cannot enroll
    /// (as `cni install --fail-closed`).
    #[arg(long)]
    cni_fail_closed: bool,
}

impl KubernetesArgs {
    fn into_config(self) -> anyhow::Result<Option<redirector::k8s::K8sConfig>> {
        use redirector::k8s::{
            AMBIENT_NAMESPACE_LABEL, AMBIENT_POD_OPT_OUT_LABEL, K8sConfig, Selection,
        };
        if !self.kubernetes {
            return Ok(None);
        }
        let mut selection = Selection {
            namespace_labels: self.namespace_labels,
            pod_opt_out_labels: self.pod_opt_out_labels,
        };
        if self.ambient_label {
            selection.namespace_labels.push(
                AMBIENT_NAMESPACE_LABEL
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            );
            selection.pod_opt_out_labels.push(
                AMBIENT_POD_OPT_OUT_LABEL
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            );
        }
        let cni_socket = match self.cni_socket.as_str() {
            "none" | "" => None,
            path => Some(PathBuf::from(path)),
        };
        let cni_chain = match (self.cni_conf_dir, &cni_socket) {
            (Some(conf_dir), Some(socket)) => Some(redirector::cni::conf::InstallOptions {
                conf_dir,
                bin_dir: self.cni_bin_dir,
                plugin_bin: std::env::current_exe()
                    .context("cannot find this executable")?
                    .with_file_name(redirector::cni::PLUGIN_TYPE),
                settings: redirector::cni::conf::PluginSettings {
                    agent_socket: socket.clone(),
                    fail_closed: self.cni_fail_closed,
                },
                wait: Duration::ZERO,
            }),
            (Some(_), None) => {
                bail!("--cni-conf-dir needs --cni-socket: the plugin asks the agent there")
            }
            (None, _) => None,
        };
        Ok(Some(K8sConfig {
            cni_chain,
            node_name: self
                .node_name
                .context("--node-name (or NODE_NAME) is required with --kubernetes")?,
            api_server: self.kube_api,
            selection,
            targets_configmap: self.targets_configmap,
            cni_socket,
            proc_root: self.proc_root,
        }))
    }
}

/// HBONE tunnels between nodes (off unless --hbone-certs is given).
#[derive(Args)]
struct HboneArgs {
    /// Directory with this node's ca.pem, cert.pem and key.pem; enables HBONE.
    /// Files are reloaded when they change.
    #[arg(
        long,
        env = "REDIRECTOR_HBONE_CERTS",
        conflicts_with = "istio_ca_address"
    )]
    hbone_certs: Option<PathBuf>,
    /// Istio's CA (istiod's gRPC CreateCertificate), e.g.
    /// https://istiod.istio-system.svc:15012: HBONE certificates are asked
    /// for there (a key kept in memory, renewed half-way through each
    /// certificate's life) instead of read from --hbone-certs; enables HBONE.
    #[arg(long, env = "REDIRECTOR_ISTIO_CA_ADDRESS")]
    istio_ca_address: Option<String>,
    /// The mesh root (the istio-ca-root-cert ConfigMap's root-cert.pem).
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    istio_ca_root_cert: PathBuf,
    /// The projected ServiceAccount token with the istio-ca audience.
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    istio_token: PathBuf,
    /// Istio's cluster id.
    #[arg(long, default_value = "Kubernetes")]
    istio_cluster_id: String,
    /// The identity to ask istiod for: spiffe://TD/ns/NS/sa/SA, this pod's
    /// ServiceAccount.
    #[arg(long, env = "REDIRECTOR_ISTIO_IDENTITY")]
    istio_identity: Option<Identity>,
    /// The certificate lifetime asked of istiod (24 hours).
    #[arg(long, default_value = "1440m", value_parser = config::parse_duration)]
    istio_cert_lifetime: Duration,
    /// Inbound tunnel listener; `none` accepts no tunnels.
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone_listen: String,
    /// Port of the peers' tunnel listeners.
    #[arg(long, default_value_t = redirector::hbone::DEFAULT_PORT)]
    hbone_peer_port: u16,
    /// Redis endpoints on meshed nodes, reached through their node's
    /// listener: addresses or CIDRs, answered by a peer node (its identity:
    /// --hbone-peer-identity); `ADDR=spiffe://TD/ns/NS/sa/SA` names the
    /// workload identity that must answer for an address instead (repeat
    /// for its Services' SANs). Everything else is dialled directly.
    #[arg(long = "mesh-endpoints", value_delimiter = ',')]
    mesh_endpoints: Vec<redirector::hbone::MeshEndpoint>,
    /// Istio ambient: pods of ambient namespaces (and Services selecting
    /// them) are meshed, each answered by its own workload identity (pod:
    /// namespace and serviceAccountName; Service: its pods' and the
    /// alpha.istio.io/kubernetes-serviceaccounts annotation's), read from
    /// the API. Needs --kubernetes; --mesh-endpoints entries win.
    #[arg(long)]
    mesh_identities_from_api: bool,
    /// Identity peer nodes must prove [default: this node's own].
    #[arg(long)]
    hbone_peer_identity: Option<Identity>,
    /// IP=DIR: tunnels accepted on the local address IP present the
    /// certificates in DIR (a fronted workload's identity, which a caller
    /// such as ztunnel expects for that address) instead of the node's.
    /// Repeatable.
    #[arg(long = "hbone-workload-certs", value_parser = config::parse_workload_certs)]
    hbone_workload_certs: Vec<(std::net::IpAddr, PathBuf)>,
    /// Trust domain allowed to open tunnels here [default: this node's].
    #[arg(long)]
    hbone_allow_trust_domain: Option<String>,
    /// Namespaces allowed to open tunnels here [default: all of the trust domain].
    #[arg(long = "hbone-allow-namespace", value_delimiter = ',')]
    hbone_allow_namespaces: Vec<String>,
    /// Outbound tunnels with no streams for this long are closed.
    #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
    hbone_idle_timeout: Duration,
    /// How often the certificate files are checked for changes.
    #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
    hbone_reload_interval: Duration,
}

impl HboneArgs {
    fn into_config(self) -> anyhow::Result<Option<config::HboneConfig>> {
        let certs = match (self.hbone_certs, self.istio_ca_address) {
            (Some(dir), _) => config::CertSource::Files(dir),
            (None, Some(address)) => {
                let identity = self.istio_identity.context(
                    "--istio-ca-address needs --istio-identity (this pod's spiffe://TD/ns/NS/sa/SA)",
                )?;
                config::CertSource::Istiod(redirector::identity::istiod::Settings {
                    address,
                    root_cert: self.istio_ca_root_cert,
                    token: self.istio_token,
                    cluster_id: self.istio_cluster_id,
                    identity,
                    lifetime: self.istio_cert_lifetime,
                    server_name: None,
                })
            }
            (None, None) => {
                if !self.mesh_endpoints.is_empty() || self.mesh_identities_from_api {
                    bail!(
                        "--mesh-endpoints and --mesh-identities-from-api need --hbone-certs or --istio-ca-address: tunnels need this node's certificates"
                    );
                }
                return Ok(None);
            }
        };
        let listen = match self.hbone_listen.as_str() {
            "none" | "" => None,
            addr => Some(
                addr.parse()
                    .with_context(|| format!("--hbone-listen `{addr}`"))?,
            ),
        };
        Ok(Some(config::HboneConfig {
            certs,
            listen,
            peer_port: self.hbone_peer_port,
            meshed: self.mesh_endpoints,
            identities_from_api: self.mesh_identities_from_api,
            workload_certs: self.hbone_workload_certs,
            peer_identity: self.hbone_peer_identity,
            allow_trust_domain: self.hbone_allow_trust_domain,
            allow_namespaces: self.hbone_allow_namespaces,
            idle_timeout: self.hbone_idle_timeout,
            reload_interval: self.hbone_reload_interval.max(Duration::from_millis(100)),
        }))
    }
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("redirector: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping causes a message already quotes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Also installs the log->tracing bridge that carries aya-log records.
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(&cli.pin_dir);
    match cli.command {
        Command::Run(args) => run(cli.pin_dir, *args),
        Command::Enroll {
            netns,
            allow_host_netns,
        } => {
            let reference = netns
                .reference()?
                .context("--netns, --pid or --pod-uid is required")?;
            let resolved = netns::resolve(&reference)?;
            // Where PID 1's namespace cannot be read (a sandbox), there is
            // nothing to compare with and the check is skipped.
            if !allow_host_netns {
                let host = netns::resolve(&NetnsRef::Pid(1)).ok();
                if host.is_some_and(|host| host.cookie == resolved.cookie) {
                    bail!(
                        "{reference} is the host network namespace; enrolling it steers every host \
                         process (pass --allow-host-netns if that is really wanted)"
                    );
                }
            }
            let mut maps = Maps::open(&layout)?;
            let new = maps.enroll(resolved)?;
            println!(
                "{} {reference} (netns cookie {}, inode {})",
                if new { "enrolled" } else { "already enrolled" },
                resolved.cookie,
                resolved.inode
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Unenroll { netns, cookie } => {
            let (cookie, what) = match (netns.reference()?, cookie) {
                (Some(reference), _) => (netns::resolve(&reference)?.cookie, reference.to_string()),
                (None, Some(cookie)) => (cookie, format!("netns cookie {cookie}")),
                (None, None) => bail!("--netns, --pid, --pod-uid or --cookie is required"),
            };
            let mut maps = Maps::open(&layout)?;
            if maps.unenroll(cookie)? {
                println!("unenrolled {what} (netns cookie {cookie})");
            } else {
                println!("{what} (netns cookie {cookie}) was not enrolled");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, admin_addr } => {
            let mut status = status::read(&layout)?;
            status.daemon = admin_request(admin_addr, Method::GET, "/status")
                .ok()
                .filter(|reply| reply.status == StatusCode::OK)
                .and_then(|reply| serde_json::from_str(&reply.body).ok());
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{status}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Ca { dir, trust_domain }) => {
            let ca = mint::Ca::new(&trust_domain)?;
            ca.save(&dir)?;
            println!("CA for {trust_domain} written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Issue { ca, identity, out }) => {
            let ca = mint::Ca::load(&ca)?;
            ca.issue_into(&identity, &out)?;
            println!("certificate for {identity} written to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::TunnelCheck {
            hbone_certs,
            hbone_peer_identity,
            hbone_peer_port,
            via,
            send,
            target,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let via = via.unwrap_or(SocketAddr::new(target.ip(), hbone_peer_port));
            runtime.block_on(tunnel_check(
                hbone_certs,
                hbone_peer_identity,
                via,
                send,
                target,
            ))
        }
        Command::Drain {
            admin_addr,
            timeout,
        } => drain(admin_addr, timeout),
        Command::Ready { file } => {
            if file.exists() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("not ready: {} does not exist", file.display());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Cni(command) => {
            let said = redirector::cni::run_command(command)?;
            if !said.is_empty() {
                println!("{said}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MountBpffs { dir } => {
            if steering::fs::mount_bpffs(&dir)? {
                println!(
                    "mounted bpffs on {} ({})",
                    dir.display(),
                    steering::fs::BPFFS_MODE
                );
            } else {
                println!("{} is bpffs already", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall => {
            let removed = steering::uninstall(&layout)?;
            if removed == steering::Removed::default() {
                println!("nothing to uninstall under {}", layout.pin_dir.display());
            } else {
                println!(
                    "uninstalled: detached {} programs, removed {} maps and {}",
                    removed.links,
                    removed.maps,
                    layout.pin_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn tunnel_check(
    certs: PathBuf,
    peer_identity: Option<Identity>,
    via: SocketAddr,
    send: Option<String>,
    target: SocketAddr,
) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tls = Tls::load(CertFiles::in_dir(&certs))?;
    let peer = peer_identity.unwrap_or_else(|| tls.current().identity.clone());
    let outbound = Outbound::new(
        tls,
        via.port(),
        peer,
        std::sync::Arc::new(TunnelMetrics::detached()),
        0,
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let mut stream = outbound
        .connect_via(via, target, Origin::default())
        .await
        .with_context(|| format!("tunnel to {target} via {via}"))?;
    println!("200 OK: tunnel to {target} via {via} open");
    if let Some(text) = send {
        stream.write_all(&unescape(&text)).await?;
        let mut reply = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut reply))
            .await
            .context("no reply within 5 s")??;
        print!("{}", String::from_utf8_lossy(&reply[..n]));
    }
    Ok(ExitCode::SUCCESS)
}

/// One HTTP/1.1 exchange with the admin endpoint (hyper's client).
fn admin_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> anyhow::Result<admin::client::Reply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok(runtime.block_on(admin::client::request(addr, method, path))?)
}

/// `redirector drain`: stop steering new connects to this node's proxy,
/// then wait (up to `timeout`) for its client connections to close.
fn drain(admin: SocketAddr, timeout: Duration) -> anyhow::Result<ExitCode> {
    let reply = admin_request(admin, Method::POST, "/drain")?;
    if reply.status != StatusCode::OK {
        bail!(
            "{admin} refused to drain: {}: {}",
            reply.status,
            reply.body.trim()
        );
    }
    let started = std::time::Instant::now();
    loop {
        // Every backend's series, summed.
        let active = admin_request(admin, Method::GET, "/metrics")
            .ok()
            .map(|reply| {
                reply
                    .body
                    .lines()
                    .filter(|line| line.starts_with("redirector_client_connections_active"))
                    .filter_map(|line| line.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                    .sum::<f64>()
            });
        match active {
            Some(n) if n < 1.0 => {
                println!(
                    "drained: no client connections left after {:.1?}",
                    started.elapsed()
                );
                return Ok(ExitCode::SUCCESS);
            }
            // Gone already: nothing left to wait for.
            None => {
                println!("drained: the proxy no longer answers");
                return Ok(ExitCode::SUCCESS);
            }
            Some(n) if started.elapsed() >= timeout => {
                println!("drain timed out after {timeout:?} with {n} client connections open");
                return Ok(ExitCode::SUCCESS);
            }
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The backends the command line and the backends file declare, each with
/// its targets. Without any, the one-cluster shorthand: `--cluster-seed`
/// (or the IP:PORT targets as seeds) and `--redis-target` (default :6379).
fn declared_backends(
    args: &mut RunArgs,
    kubernetes: bool,
) -> anyhow::Result<Vec<redirector::backend::Declared>> {
    use redirector::backend::{self, BackendSpec, Declared, Kind, NamedTarget};
    if let Some(first) = args.backends.first()
        && !args.seeds.is_empty()
    {
        bail!(
            "--backend {} and --cluster-seed both name the Redis behind the proxy: give one",
            first.name
        );
    }
    if args.backends.is_empty() && args.backends_file.is_none() {
        // The one-cluster shorthand.
        if kubernetes && args.seeds.is_empty() && args.targets.is_empty() {
            return Ok(Vec::new());
        }
        if args.targets.is_empty() {
            args.targets = vec![NamedTarget {
                backend: None,
                target: config::DEFAULT_REDIS_TARGET
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            }];
        }
        if let Some(named) = args.targets.iter().find(|t| t.backend.is_some()) {
            bail!(
                "--redis-target {}={}: no --backend is declared",
                named.backend.as_deref().unwrap_or_default(),
                named.target
            );
        }
        // Service addresses given exactly are cluster endpoints too.
        let seeds: Vec<SocketAddr> = if args.seeds.is_empty() {
            args.targets
                .iter()
                .filter_map(|t| t.target.addr.map(|ip| SocketAddr::new(ip, t.target.port)))
                .collect()
        } else {
            args.seeds.clone()
        };
        if seeds.is_empty() {
            return Ok(Vec::new());
        }
        return Ok(vec![Declared {
            spec: BackendSpec {
                name: "cluster".into(),
                kind: Kind::Cluster { seeds },
            },
            targets: args.targets.iter().map(|t| t.target).collect(),
            options: backend::Options::default(),
            source: "--cluster-seed".into(),
        }]);
    }
    let mut declared: Vec<Declared> = std::mem::take(&mut args.backends)
        .into_iter()
        .map(|spec| Declared {
            source: format!("--backend {}", spec.name),
            spec,
            targets: Vec::new(),
            options: backend::Options::default(),
        })
        .collect();
    if let Some(path) = &args.backends_file {
        declared.extend(backend::read_file(path)?);
    }
    backend::attach_targets(&mut declared, &args.targets)?;
    Ok(declared)
}

/// `\r`, `\n`, `\t` and `\\` escapes, for protocol text on a command line.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let c = if c == '\\' {
            match chars.next() {
                Some('r') => '\r',
                Some('n') => '\n',
                Some('t') => '\t',
                Some(other) => other,
                None => '\\',
            }
        } else {
            c
        };
        let mut utf8 = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out
}

/// Raises the open-files limit to its hard limit, as servers do: every
/// client and upstream connection is a descriptor, and the soft limit
/// (often 1024) would refuse clients long before `--max-clients`.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

fn run(pin_dir: PathBuf, mut args: RunArgs) -> anyhow::Result<ExitCode> {
    raise_fd_limit();
    let steering = args.steering == OnOff::On;
    let on_kubernetes = args.kubernetes.kubernetes;
    let backends = declared_backends(&mut args, on_kubernetes)?;
    let kubernetes = args.kubernetes.into_config()?;
    let users = args
        .auth_users
        .iter()
        .map(|u| {
            u.split_once(':')
                .map(|(user, pass)| (user.to_string(), pass.to_string()))
                .with_context(|| format!("--auth-user `{u}` is not USER:PASSWORD"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let admin_addr = match args.admin_addr.as_str() {
        "none" | "" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--admin-addr `{addr}`"))?,
        ),
    };
    let auth_mode = match args.auth_mode {
        AuthModeArg::Passthrough => AuthMode::Passthrough,
        AuthModeArg::Proxy => AuthMode::Proxy,
        AuthModeArg::Auto
            if args.auth_password.is_some()
                || !users.is_empty()
                || args.upstream_password.is_some() =>
        {
            AuthMode::Proxy
        }
        AuthModeArg::Auto => AuthMode::Passthrough,
    };
    let config = RunConfig {
        steering,
        backends,
        require_backends: args.require_backends,
        proxy: Settings {
            limits: Limits {
                max_bulk_len: args.max_bulk_len,
                ..Limits::default()
            },
            admission: redirector::proxy::admission::Policy {
                allow_direct: args.allow_direct_from,
                max_clients: args.max_clients,
                max_per_pod: args.max_clients_per_pod,
                max_per_source: args.max_clients_per_source,
            },
            idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
            max_pipeline: args.max_pipeline.max(1),
            output_limits: args.client_output_buffer_limit,
            read_policy: args.read_policy,
            auth: DownstreamAuth {
                password: args.auth_password,
                users,
            },
            auth_mode,
            allow_admin_commands: args.allow_admin_commands,
            retry_window: args.retry_window,
            ..Settings::default()
        },
        pool: PoolConfig {
            shared_per_node: args.upstream_connections.max(1),
            idle_leases_per_node: args.idle_leases,
        },
        upstream_auth: args.upstream_password.map(|password| UpstreamAuth {
            user: args.upstream_user,
            password,
        }),
        admin_addr,
        metrics_addr: args.metrics_addr,
        ready_file: args.ready_file,
        refresh_interval: args.topology_refresh.max(Duration::from_millis(100)),
        workers: args.workers.max(1),
        session_loop: args.session_loop,
        pin_dir,
        cgroup_root: args.cgroup_root,
        proxy_addrs: args.proxy_addrs,
        socket_mark: args.socket_mark,
        steered_mark: args.steered_socket_mark,
        liveness: args.liveness,
        drain_grace: args.drain_grace,
        connect_timeout: args.connect_timeout,
        hbone: args.hbone.into_config()?,
        kubernetes,
    };
    // Each worker is a current-thread runtime (this one is the first; see
    // `workers`). Its run queue is FIFO, so the upstream writers run after
    // every client that queued work for them, and one write carries many
    // clients' commands (the multi-thread scheduler's LIFO slot would run a
    // writer right after each client).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(app::run(config))?;
    Ok(ExitCode::SUCCESS)
}
