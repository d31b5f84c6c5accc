//! `redirector run`: learn the cluster, serve the proxy, and (with steering)
//! install or adopt the kernel programs and keep the heartbeat that tells
//! them the proxy is alive.
//!
//! Start-up order matters: the cluster is discovered and the proxy bound
//! before the first heartbeat, so the programs never steer to a proxy that
//! cannot serve; until then steered namespaces go direct (fail open). On
//! shutdown the heartbeat is cleared first, so new connects go direct at
//! once.

use std::{sync::Arc, time::Duration};

use aya_log::EbpfLogger;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    admin,
    cluster::topology::Topology,
    config::{HboneConfig, RunConfig},
    hbone::{Mesh, inbound::Inbound, outbound::Outbound},
    identity::{
        Policy,
        tls::{CertFiles, Tls},
    },
    k8s::{K8sConfig, agent::Agent},
    metrics::MetricsRegistry,
    proxy::{self, Dialer, Proxy, Shared, discovery, pool::Pools},
    steering::{
        self, Layout, Listeners, Maps, OrigDstTable, TargetSpec, metrics::SteeringSnapshot,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Steering(#[from] steering::Error),
    #[error(transparent)]
    Mounts(#[from] steering::fs::Error),
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("HBONE certificates: {0}")]
    HboneCerts(#[from] crate::identity::tls::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::Error),
    #[error("cannot read this process's network namespace cookie: {0}")]
    OwnNetns(std::io::Error),
    #[error("cannot listen for HBONE tunnels on {addr}: {source}")]
    HboneListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Why `run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Signal,
    /// The pins vanished: someone ran `redirector uninstall`.
    Uninstalled,
}

/// How often to retry discovering the cluster while it is unreachable.
const DISCOVERY_RETRY: Duration = Duration::from_secs(1);
/// How often the node's CNI config is checked for a rewrite that dropped
/// redirector-cni (a stat; the file is read only when it changed).
const CNI_CHAIN_CHECK: Duration = Duration::from_secs(2);
/// Topology refreshes never come closer than this, however many MOVEDs.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);

/// What `run` keeps of the kernel side.
struct Kernel {
    maps: Maps,
    /// The daemon's own network namespace: its mark counts only there.
    netns_cookie: u64,
}

pub async fn run(config: RunConfig) -> Result<Exit, Error> {
    config.validate()?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    let layout = Layout::new(&config.pin_dir);
    let mut kernel = None;
    let mut orig_dst = None;
    if config.steering {
        let cgroup_root = steering::fs::resolve_cgroup_root(config.cgroup_root.as_deref())?;
        let installed = steering::install(&layout, &cgroup_root, kernel_log_level())?;
        warn_about_programs_ahead(&cgroup_root, &installed);
        tokio::spawn(forward_kernel_logs(installed.log_program_id()));
        let mut maps = Maps::open(&layout)?;
        let targets: Vec<_> = config.targets.iter().map(|t| (*t, 0)).collect();
        maps.set_targets(&targets)?;
        let netns_cookie = crate::netns::current_cookie().map_err(Error::OwnNetns)?;
        // Until the proxy is ready, steered namespaces go direct.
        maps.set_proxy(&config.proxy_entry(0, netns_cookie, false))?;
        kernel = Some(Kernel { maps, netns_cookie });
        orig_dst = Some(OrigDstTable::open(&layout)?);
        info!(cgroup = %cgroup_root.display(), pins = %layout.pin_dir.display(), "steering installed");
    }

    let mut metrics = MetricsRegistry::new();
    // The node agent: enrollment and targets from the API server.
    let agent = match &config.kubernetes {
        Some(k8s) => Some(start_agent(k8s, &layout, &config.targets, &mut metrics).await?),
        None => None,
    };
    if config.steering {
        // Handles of its own: scrapes never wait on the heartbeat's.
        let reader = std::sync::Mutex::new(Maps::open(&layout)?);
        let awaiting = OrigDstTable::open(&layout)?;
        metrics.register_steering(move || {
            let maps = reader.lock().unwrap_or_else(|e| e.into_inner());
            Some(SteeringSnapshot {
                counters: maps.counters().ok()?,
                enrolled: maps.enrolled().ok()?.len() as u64,
                awaiting_accept: awaiting.len() as u64,
            })
        });
    }
    let metrics = Arc::new(metrics);
    let proxy_metrics = metrics.proxy();
    let mut dialer = Dialer {
        // Marks exist only for the steering programs (and need CAP_NET_ADMIN).
        socket_mark: if config.steering {
            config.socket_mark
        } else {
            0
        },
        connect_timeout: config.connect_timeout,
        auth: config.upstream_auth.clone(),
        mesh: None,
        cluster: config.standalone.is_none(),
    };
    if let Some(hbone) = &config.hbone {
        dialer.mesh = start_hbone(hbone, &dialer, &metrics).await?;
    }
    let health = Arc::new(admin::Health::default());
    for (addr, scope) in [
        (config.admin_addr, admin::Scope::Full),
        (config.metrics_addr, admin::Scope::MetricsOnly),
    ] {
        let Some(addr) = addr else { continue };
        let listener = admin::bind(addr)
            .await
            .map_err(|source| Error::Admin { addr, source })?;
        tokio::spawn(admin::serve(
            listener,
            scope,
            Arc::clone(&metrics),
            Arc::clone(&health),
        ));
    }

    // Listeners first, then ready: the DaemonSet's readiness means "programs
    // attached and listener up", not "Redis reachable" (a Redis outage
    // must not stall a rolling upgrade). Steering itself waits for the
    // heartbeat, which waits for the backend.
    let proxy = Proxy::bind(&config.proxy_addrs)?;
    let listeners = proxy.local_addrs();
    if config.steering {
        let mut slots = Listeners::open(&layout)?;
        for (addr, socket) in proxy.sockets() {
            slots.register(addr, socket)?;
        }
    }
    health.set_ready();
    info!(listeners = ?listeners, steering = config.steering, "listening; waiting for the backend");

    // Seeds: given, or (node agent) from the targets ConfigMap once it
    // names a cluster.
    let seeds = match &agent {
        Some(agent) if config.seeds.is_empty() && config.standalone.is_none() => {
            info!("waiting for the targets ConfigMap to name the cluster");
            tokio::select! {
                seeds = agent.seeds() => seeds,
                _ = sigterm.recv() => return Ok(Exit::Signal),
                _ = sigint.recv() => return Ok(Exit::Signal),
            }
        }
        _ => config.seeds.clone(),
    };

    // Learn the cluster; a cluster that is not up yet is waited for.
    let topology = Arc::new(match &config.standalone {
        Some(standalone) => Topology::standalone(standalone.primary, standalone.replicas.clone()),
        None => Topology::new(seeds.clone()),
    });
    if let Some(agent) = &agent
        && config.seeds.is_empty()
        && config.standalone.is_none()
    {
        tokio::spawn(follow_seeds(agent.resolved(), Arc::clone(&topology)));
    }
    let (commands, redis_version) = loop {
        let discovered = async {
            discovery::refresh(&topology, &dialer, &proxy_metrics).await?;
            // A refresh that succeeded installed a map with a master.
            let master =
                topology
                    .view()
                    .masters()
                    .next()
                    .ok_or_else(|| discovery::Error::Reply {
                        addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                        message: "no master known yet".into(),
                    })?;
            discovery::fetch_commands(&dialer, master).await
        };
        tokio::select! {
            result = discovered => match result {
                Ok(found) => break found,
                Err(e) => {
                    warn!(error = %e, seeds = ?seeds, "cannot discover the cluster yet; retrying");
                    tokio::time::sleep(DISCOVERY_RETRY).await;
                }
            },
            _ = sigterm.recv() => return Ok(Exit::Signal),
            _ = sigint.recv() => return Ok(Exit::Signal),
        }
    };
    info!(
        commands = commands.len(),
        redis_version,
        masters = topology.view().shards().len(),
        "cluster discovered"
    );

    let pools = Pools::new(dialer.clone(), Arc::clone(&proxy_metrics), config.pool);
    let shared = Arc::new(Shared::new(
        config.proxy.clone(),
        Arc::clone(&topology),
        pools,
        commands,
        Arc::clone(&proxy_metrics),
        orig_dst,
        redis_version,
    ));
    let refresher_shared = Arc::clone(&shared);
    tokio::spawn(discovery::refresher(
        Arc::clone(&topology),
        Arc::new(dialer),
        proxy_metrics,
        config.refresh_interval,
        MIN_REFRESH_GAP,
        move |view| refresher_shared.pools.retain(&view.nodes()),
    ));
    let serving = tokio::spawn(proxy.serve(Arc::clone(&shared)));

    // The heartbeat: proven by a round trip through the proxy's own accept
    // path, so a proxy that is alive but wedged stops steering too.
    let probe_timeout = config.heartbeat_interval().min(Duration::from_secs(1));
    let mut beat = 0;
    if let Some(kernel) = kernel.as_mut() {
        if let Err(e) = proxy::probe(&shared, listeners[0], probe_timeout).await {
            warn!(error = %e, "the proxy does not answer its own probe");
        } else {
            beat = steering::boottime_ns();
        }
        kernel.beat(&config, beat, shared.is_full());
    }
    info!(
        listeners = ?listeners,
        steering = config.steering,
        admin = ?config.admin_addr,
        "redirector ready"
    );

    let mut heartbeat = tokio::time::interval(config.heartbeat_interval());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => break Exit::Signal,
            _ = sigint.recv() => break Exit::Signal,
            // The node-wide limit was reached or left: tell the kernel now.
            () = shared.full_changed.notified(), if kernel.is_some() => {
                if let Some(kernel) = kernel.as_mut() {
                    kernel.beat(&config, beat, shared.is_full());
                }
            }
            _ = heartbeat.tick(), if kernel.is_some() => {
                if !layout.is_installed() {
                    warn!("pins removed (redirector uninstall): shutting down");
                    break Exit::Uninstalled;
                }
                // Draining: no heartbeat, so new connects go direct while
                // the clients already here finish. A failed probe leaves the
                // last beat to age out.
                if health.is_draining() {
                    beat = 0;
                } else {
                    match proxy::probe(&shared, listeners[0], probe_timeout).await {
                        Ok(()) => beat = steering::boottime_ns(),
                        Err(e) => warn!(error = %e, "the proxy does not answer its own probe; not beating"),
                    }
                }
                if let Some(kernel) = kernel.as_mut() {
                    kernel.beat(&config, beat, shared.is_full());
                }
            }
        }
    };

    if exit == Exit::Signal
        && let Some(kernel) = kernel.as_mut()
    {
        // Connects go direct from now on instead of to a closing listener.
        kernel.beat(&config, 0, false);
    }
    serving.abort();
    info!(?exit, "redirector stopped");
    Ok(exit)
}

impl Kernel {
    /// Writes the proxy's entry: its liveness (`beat`, 0 = down) and whether
    /// it is full.
    fn beat(&mut self, config: &RunConfig, beat: u64, full: bool) {
        if let Err(e) = self
            .maps
            .set_proxy(&config.proxy_entry(beat, self.netns_cookie, full))
        {
            warn!(error = %e, "cannot update the proxy entry (heartbeat)");
        }
    }
}

/// Warns about programs that run on the connect hooks before ours: they may
/// rewrite a Service address before our target match sees it.
fn warn_about_programs_ahead(cgroup_root: &std::path::Path, installed: &steering::Installed) {
    let ours = installed.connect_program_ids();
    match steering::coexist::foreign_connect_programs(cgroup_root, &ours) {
        Ok(found) => {
            for program in found {
                warn!(
                    hook = program.hook,
                    prog_id = program.prog_id,
                    name = %program.name,
                    "a program attached before redirector's runs first on this hook; if it \
                     rewrites Service addresses (Cilium's socket LB), steering never matches: \
                     see deploy/README.md, \"Cilium\""
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot list the programs on the connect hooks"),
    }
}

/// Starts the node agent, the socket the CNI plugin asks it on, and the
/// keeper of the plugin's place in the node's CNI config.
async fn start_agent(
    k8s: &K8sConfig,
    layout: &Layout,
    targets: &[TargetSpec],
    metrics: &mut MetricsRegistry,
) -> Result<Arc<Agent>, Error> {
    let agent = Agent::start(
        k8s.clone(),
        Maps::open(layout)?,
        targets.to_vec(),
        metrics.register_agent(),
    )
    .await?;
    if let Some(path) = &k8s.cni_socket {
        let listener = crate::cni::server::bind(path).await.map_err(|source| {
            crate::k8s::Error::CniSocket {
                path: path.clone(),
                source,
            }
        })?;
        let handler: crate::cni::server::Handler = {
            let agent = Arc::clone(&agent);
            Arc::new(move |request| Box::pin(Arc::clone(&agent).on_cni(request)))
        };
        tokio::spawn(crate::cni::server::serve(listener, handler));
        info!(socket = %path.display(), "serving the CNI plugin");
    }
    if let Some(chain) = k8s.cni_chain.clone() {
        tokio::spawn(crate::cni::keeper::keep_chained(chain, CNI_CHAIN_CHECK));
    }
    Ok(agent)
}

/// Keeps the topology's seeds equal to the targets ConfigMap's (node
/// agent): they matter when no known node of the cluster answers.
async fn follow_seeds(
    mut resolved: tokio::sync::watch::Receiver<crate::k8s::targets::Resolved>,
    topology: Arc<Topology>,
) {
    while resolved.changed().await.is_ok() {
        let seeds = resolved.borrow_and_update().seeds.clone();
        if !seeds.is_empty() && seeds != topology.seeds() {
            info!(?seeds, "cluster seeds changed (targets ConfigMap)");
            topology.set_seeds(seeds);
        }
    }
}

/// Loads the node's certificates (and watches them), starts the inbound
/// listener, and returns the outbound side when endpoints are meshed.
async fn start_hbone(
    config: &HboneConfig,
    dialer: &Dialer,
    metrics: &MetricsRegistry,
) -> Result<Option<Arc<Mesh>>, Error> {
    let tls = Tls::load(CertFiles::in_dir(&config.certs))?;
    tls.spawn_reloader(config.reload_interval);
    let own = tls.current().identity.clone();
    if let Some(addr) = config.listen {
        let policy = Policy {
            trust_domain: config
                .allow_trust_domain
                .clone()
                .unwrap_or_else(|| own.trust_domain.clone()),
            namespaces: config.allow_namespaces.clone(),
        };
        let inbound = Inbound::bind(
            addr,
            Arc::clone(&tls),
            policy,
            metrics.tunnels(),
            dialer.socket_mark,
            dialer.connect_timeout,
        )
        .await
        .map_err(|source| Error::HboneListen { addr, source })?;
        info!(%addr, identity = %own, "HBONE listener up");
        tokio::spawn(inbound.run());
    }
    if config.meshed.is_empty() {
        return Ok(None);
    }
    let outbound = Outbound::new(
        tls,
        config.peer_port,
        config.peer_identity.clone().unwrap_or(own),
        metrics.tunnels(),
        dialer.socket_mark,
        dialer.connect_timeout,
        config.idle_timeout,
    );
    Ok(Some(Arc::new(Mesh {
        outbound,
        meshed: config.meshed.clone(),
    })))
}

/// The eBPF log level is fixed when the programs load; follow the daemon's
/// own filter for the `redirector_ebpf` target. The programs only log at
/// debug, so by default they emit nothing.
fn kernel_log_level() -> aya_log::Level {
    if tracing::enabled!(target: "redirector_ebpf", tracing::Level::TRACE) {
        aya_log::Level::Trace
    } else if tracing::enabled!(target: "redirector_ebpf", tracing::Level::DEBUG) {
        aya_log::Level::Debug
    } else {
        aya_log::Level::Info
    }
}

/// Forwards aya-log records from the programs into tracing.
async fn forward_kernel_logs(program_id: u32) {
    let logger = match EbpfLogger::init_from_id(program_id) {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "eBPF logs unavailable");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "eBPF logs unavailable");
            return;
        }
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
        // Bound the wake-up rate under a log flood.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
