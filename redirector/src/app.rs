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
    config::{HboneConfig, RunConfig},
    handover,
    hbone::{Mesh, inbound::Inbound, outbound::Outbound},
    identity::{
        Policy,
        tls::{CertFiles, Tls},
    },
    k8s::{K8sConfig, agent::Agent},
    metrics::MetricsRegistry,
    proxy::{
        self, Dialer,
        front::{self, Front, Gate, Proxy},
        relay::TcpBackend,
    },
    serving::{Defaults, Serving},
    steering::{
        self, Layout, Listeners, Maps, OrigDstTable, TargetSpec, metrics::SteeringSnapshot,
    },
    workers::{self, Worker},
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
    #[error(transparent)]
    Workers(#[from] workers::Error),
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    AdminServer(#[from] admin::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("HBONE certificates: {0}")]
    HboneCerts(#[from] crate::identity::tls::Error),
    #[error("HBONE certificates from istiod: {0}")]
    Istiod(#[from] crate::identity::istiod::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::Error),
    #[error("cannot read this process's network namespace cookie: {0}")]
    OwnNetns(std::io::Error),
    #[error(transparent)]
    BackendDown(#[from] crate::serving::NotUp),
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

/// How often the node's CNI config is checked for a rewrite that dropped
/// redirector-cni (a stat; the file is read only when it changed).
const CNI_CHAIN_CHECK: Duration = Duration::from_secs(2);

/// What `run` keeps of the kernel side.
struct Kernel {
    maps: Maps,
    /// The daemon's own network namespace: its mark counts only there.
    netns_cookie: u64,
}

pub async fn run(config: RunConfig) -> Result<Exit, Error> {
    config.validate()?;
    // A file left by a crashed run of this container must not say ready.
    if let Some(path) = &config.ready_file {
        let _ = std::fs::remove_file(path);
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    let layout = Layout::new(&config.pin_dir);
    let mut kernel = None;
    let mut orig_dst = None;
    let mut reuseport = None;
    if config.steering {
        let cgroup_root = steering::fs::resolve_cgroup_root(config.cgroup_root.as_deref())?;
        let installed = steering::install(&layout, &cgroup_root, kernel_log_level())?;
        warn_about_programs_ahead(&cgroup_root, &installed);
        tokio::spawn(forward_kernel_logs(installed.log_program_id()));
        reuseport = installed.reuseport;
        let maps = Maps::open(&layout)?;
        let netns_cookie = crate::netns::current_cookie().map_err(Error::OwnNetns)?;
        let mut kernel_side = Kernel { maps, netns_cookie };
        // Until the proxy is ready, steered namespaces go direct; but a
        // beating entry is an old daemon still serving (an upgrade): its
        // heartbeat stands until this one beats (a dead daemon's listener
        // has left rdr_listener, so its last beat steers nothing).
        if kernel_side
            .maps
            .proxy()
            .map_or(true, |entry| entry.heartbeat_ns == 0)
        {
            kernel_side.beat(&config, 0, false);
        }
        kernel = Some(kernel_side);
        orig_dst = Some(OrigDstTable::open(&layout)?);
        info!(cgroup = %cgroup_root.display(), pins = %layout.pin_dir.display(), "steering installed");
    }

    let mut metrics = MetricsRegistry::with_workers(config.workers);
    // The node agent: enrollment and backends from the API server.
    let agent = match &config.kubernetes {
        Some(k8s) => Some(start_agent(k8s, &layout, &mut metrics).await?),
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
        cluster: true,
    };
    let mut tunnels_in = None;
    if let Some(hbone) = &config.hbone {
        let (mesh, drain) = start_hbone(hbone, &dialer, &metrics, agent.as_deref()).await?;
        dialer.mesh = mesh;
        tunnels_in = drain;
    }
    let gate = Arc::new(Gate::new(config.proxy.admission.clone(), orig_dst));
    // Each worker's routes: the node-wide gate, and its own relay for
    // connections no backend serves.
    let unrouted_dialer = Arc::new(Dialer {
        auth: None,
        ..dialer.clone()
    });
    let make_front = |worker: usize| {
        let unrouted = Arc::new(TcpBackend::new(
            "unrouted".into(),
            Arc::clone(&unrouted_dialer),
            Arc::new(
                metrics
                    .proxy()
                    .backend_on("unrouted", worker)
                    .without_health(),
            ),
        ));
        Arc::new(Front::new(
            Arc::clone(&gate),
            unrouted,
            metrics.proxy().worker_accepted(worker),
            config.session_loop,
        ))
    };
    let front = make_front(0);
    // Bound now, listening below: the DaemonSet's readiness means "programs
    // attached and listener up", not "Redis reachable" (a Redis outage
    // must not stall a rolling upgrade). Steering itself waits for the
    // heartbeat, which waits for a backend.
    let proxy = Proxy::bind(&config.proxy_addrs)?;
    let listeners = proxy.local_addrs();
    // Another daemon listening there: an upgrade, this is the new one.
    let predecessor = handover::others_listen(&listeners, 0);
    if !predecessor && let Some(kernel) = kernel.as_mut() {
        // A beat still fresh with nobody listening is a crashed daemon's:
        // it would steer clients to this listener before its backends are
        // up (they would get errors instead of going direct).
        kernel.beat(&config, 0, false);
    }
    let (extra, start_extra) = workers::start_extra(config.workers, &listeners, make_front)?;
    let mut all_workers = vec![Worker {
        index: 0,
        front: Arc::clone(&front),
    }];
    all_workers.extend(extra);
    let serving = Serving::new(
        all_workers,
        metrics.proxy(),
        Defaults {
            settings: config.proxy.clone(),
            pool: config.pool,
            dialer,
            refresh_interval: config.refresh_interval,
        },
    );
    let health = Arc::new(admin::Health::default());
    {
        let serving = Arc::clone(&serving);
        health.set_backends_report(move || serving.report());
    }
    let mut admin_listeners = Vec::new();
    for (addr, scope) in [
        (config.admin_addr, admin::Scope::Full),
        (config.metrics_addr, admin::Scope::MetricsOnly),
    ] {
        let Some(addr) = addr else { continue };
        let listener = admin::bind(addr).map_err(|source| Error::Admin { addr, source })?;
        admin_listeners.push((listener, scope));
    }
    // Served on its own thread until `run` returns.
    let _admin = admin::AdminServer::start(
        admin_listeners,
        admin::Limits::default(),
        Arc::clone(&metrics),
        Arc::clone(&health),
    )?;

    // The backends, and the kernel's targets leading to them.
    let targets = serving.apply(&config.backends);
    if config.require_backends {
        // Nothing is served, and readiness fails, until every backend
        // answers: the daemon does not start half-configured.
        tokio::select! {
            result = serving.require_up(config.connect_timeout) => result?,
            _ = sigterm.recv() => return Ok(Exit::Signal),
            _ = sigint.recv() => return Ok(Exit::Signal),
        }
    } else if predecessor {
        // The old daemon serves meanwhile: a connection given to this one
        // before its backend is up would be relayed as is (a cluster
        // client sees MOVED). Bounded, so a Redis down for both does not
        // hold the upgrade.
        info!("another redirector serves the proxy addresses: listening once the backends are up");
        tokio::select! {
            result = serving.require_up(handover::PREDECESSOR_WAIT) => {
                if let Err(e) = result {
                    warn!(error = %e, "listening beside the old daemon with a backend not up");
                }
            }
            _ = sigterm.recv() => return Ok(Exit::Signal),
            _ = sigint.recv() => return Ok(Exit::Signal),
        }
    }
    proxy.listen()?;
    // One attach per address's group (the other workers' listeners join
    // it), once in the group.
    for (addr, socket) in proxy.sockets() {
        if let Some(Err(e)) = reuseport.as_ref().map(|p| p.attach(socket)) {
            warn!(%addr, error = %e, "cannot attach redir_reuseport: an upgrade resets the connections queued on this listener");
        }
    }
    if config.steering {
        let mut slots = Listeners::open(&layout)?;
        for (addr, socket) in proxy.sockets() {
            slots.register(addr, socket)?;
        }
    }
    health.set_ready();
    let ready_file = config.ready_file.as_deref().map(ReadyFile::new);
    if let Some(file) = &ready_file {
        file.follow(&health);
    }
    info!(listeners = ?listeners, steering = config.steering, "listening; waiting for the backend");
    if let Some(kernel) = kernel.as_mut() {
        kernel.set_targets(&targets);
    }
    if let Some(agent) = &agent {
        tokio::spawn(follow_configmap(
            agent.resolved(),
            Arc::clone(&serving),
            config.backends.clone(),
            Maps::open(&layout)?,
        ));
    }
    let serving_task = tokio::spawn(proxy.serve(Arc::clone(&front)));
    start_extra.serve();

    // The heartbeat: proven by a round trip through the proxy's own accept
    // path, so a proxy that is alive but wedged stops steering too. It
    // beats while any backend serves: one team's Redis being down must not
    // stop steering to the others (their connections are relayed to where
    // they were going until it is back).
    let probe_timeout = config.heartbeat_interval().min(Duration::from_secs(1));
    let mut beat = 0;
    let mut ready_logged = false;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => break Exit::Signal,
            _ = sigint.recv() => break Exit::Signal,
            // The node-wide limit was reached or left: tell the kernel now.
            () = gate.full_changed.notified(), if kernel.is_some() => {
                if let Some(kernel) = kernel.as_mut() {
                    kernel.beat(&config, beat, gate.is_full());
                }
                continue;
            }
            // A backend came up (or went): beat at once rather than at the
            // next tick.
            () = front.changed.notified() => {}
            _ = heartbeat.tick() => {}
        }
        if kernel.is_some() && !layout.is_installed() {
            warn!("pins removed (redirector uninstall): shutting down");
            break Exit::Uninstalled;
        }
        // Draining: no heartbeat, so new connects go direct while the
        // clients already here finish. A failed probe leaves the last beat
        // to age out.
        if health.is_draining() || !serving.any_up() {
            beat = 0;
        } else if kernel.is_some() {
            match front::probe(&gate, listeners[0], probe_timeout).await {
                Ok(()) => beat = steering::boottime_ns(),
                Err(e) => {
                    warn!(error = %e, "the proxy does not answer its own probe; not beating");
                }
            }
        }
        if let Some(kernel) = kernel.as_mut() {
            kernel.beat(&config, beat, gate.is_full());
        }
        // POST /drain turns readiness off on the admin thread.
        if let Some(file) = &ready_file {
            file.follow(&health);
        }
        if !ready_logged && serving.all_up() {
            ready_logged = true;
            info!(
                listeners = ?listeners,
                steering = config.steering,
                admin = ?config.admin_addr,
                "redirector ready"
            );
        }
    };

    if exit == Exit::Signal {
        health.drain();
        if let Some(file) = &ready_file {
            file.follow(&health);
        }
        if handover::others_listen(&listeners, config.workers) {
            // Its heartbeat keeps steering on; ours stops with us.
            info!("a new redirector listens on the proxy addresses: handing over to it");
        } else if let Some(kernel) = kernel.as_mut() {
            // Connects go direct from now on instead of to a closing listener.
            kernel.beat(&config, 0, false);
        }
        // Closing the listeners moves their queued connections to the
        // successor's (redir_reuseport); the clients here are drained.
        serving_task.abort();
        let _ = serving_task.await;
        start_extra.stop_accepting();
        // Peers open new tunnels to the successor; open streams finish.
        if let Some(tunnels) = &tunnels_in {
            tunnels.start();
        }
        tokio::select! {
            () = drain(&gate, &serving, tunnels_in.as_ref(), config.drain_grace) => {}
            _ = sigterm.recv() => info!("second signal: not waiting for clients"),
            _ = sigint.recv() => info!("second signal: not waiting for clients"),
        }
    } else {
        serving_task.abort();
    }
    info!(?exit, "redirector stopped");
    Ok(exit)
}

/// `--ready-file`: exists exactly while this process is ready.
struct ReadyFile {
    path: std::path::PathBuf,
}

impl ReadyFile {
    fn new(path: &std::path::Path) -> Self {
        Self { path: path.into() }
    }

    fn follow(&self, health: &admin::Health) {
        let ready = health.is_ready();
        if ready == self.path.exists() {
            return;
        }
        let result = if ready {
            std::fs::write(&self.path, format!("{}\n", std::process::id()))
        } else {
            std::fs::remove_file(&self.path)
        };
        if let Err(e) = result {
            warn!(path = %self.path.display(), error = %e, "cannot update the ready file");
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits for the connected clients, and the streams and tunnels peers
/// opened through this node's HBONE listener, to leave: idle clients are
/// asked to, at a request boundary; the rest have `grace`.
async fn drain(
    gate: &Gate,
    serving: &Serving,
    tunnels_in: Option<&crate::hbone::inbound::Drain>,
    grace: Duration,
) {
    let started = tokio::time::Instant::now();
    loop {
        // Again each time: a client accepted just before the listeners
        // closed registers a moment later.
        serving.ask_clients_to_leave();
        let left = gate.connected_clients();
        let streams = tunnels_in.map_or(0, crate::hbone::inbound::Drain::open_streams);
        // Tunnels without streams close within a round trip of their GOAWAY
        // (with TLS close_notify): wait for that too, or peers see an
        // unexpected EOF when this process exits.
        let tunnels = tunnels_in.map_or(0, crate::hbone::inbound::Drain::open_tunnels);
        if left == 0 && streams == 0 && tunnels == 0 {
            info!(took = ?started.elapsed(), "every client has left");
            return;
        }
        if started.elapsed() >= grace {
            info!(
                left,
                streams,
                tunnels,
                ?grace,
                "drain grace period over: closing the clients and tunnel streams left"
            );
            return;
        }
        tokio::time::sleep(handover::DRAIN_CHECK).await;
    }
}

/// Keeps the served backends and the kernel's targets equal to the targets
/// ConfigMap's (plus the command line's), without a restart: new backends
/// start, removed ones drain, a Service whose kind changed is served by a
/// new backend while the old one drains.
async fn follow_configmap(
    mut resolved: tokio::sync::watch::Receiver<crate::k8s::targets::Resolved>,
    serving: Arc<Serving>,
    static_backends: Vec<crate::backend::Declared>,
    mut maps: Maps,
) {
    loop {
        let from_api = resolved.borrow_and_update().backends.clone();
        let mut wanted = static_backends.clone();
        wanted.extend(from_api);
        match crate::backend::validate_declared(&wanted, true) {
            Ok(()) => {
                let targets = serving.apply(&wanted);
                let list: Vec<String> = targets.iter().map(|(t, id)| format!("{t}→{id}")).collect();
                match maps.set_targets(&targets) {
                    Ok(()) => info!(targets = ?list, "Redis targets loaded"),
                    Err(e) => warn!(error = %e, "cannot load the Redis targets"),
                }
            }
            Err(e) => warn!(error = %e, "targets ConfigMap: keeping the backends in force"),
        }
        if resolved.changed().await.is_err() {
            return;
        }
    }
}

impl Kernel {
    fn set_targets(&mut self, targets: &[(TargetSpec, u32)]) {
        if let Err(e) = self.maps.set_targets(targets) {
            warn!(error = %e, "cannot load the Redis targets");
        }
    }

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
    metrics: &mut MetricsRegistry,
) -> Result<Arc<Agent>, Error> {
    let agent = Agent::start(k8s.clone(), Maps::open(layout)?, metrics.register_agent()).await?;
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

/// Loads the node's certificates (and watches them), starts the inbound
/// listener, and returns the outbound side when endpoints are meshed.
async fn start_hbone(
    config: &HboneConfig,
    dialer: &Dialer,
    metrics: &MetricsRegistry,
    agent: Option<&Agent>,
) -> Result<(Option<Arc<Mesh>>, Option<crate::hbone::inbound::Drain>), Error> {
    let tls = match &config.certs {
        crate::config::CertSource::Files(dir) => {
            let tls = Tls::load(CertFiles::in_dir(dir))?;
            tls.spawn_reloader(config.reload_interval);
            tls
        }
        crate::config::CertSource::Istiod(settings) => {
            let client = Arc::new(crate::identity::istiod::CaClient::new(settings.clone())?);
            // Nothing serves tunnels without a certificate: ask until one
            // comes, or the daemon is stopped.
            let configs = loop {
                match client.issue().await {
                    Ok(configs) => break configs,
                    Err(e) => {
                        warn!(error = %e, "no HBONE certificate from istiod yet; asking again");
                        tokio::time::sleep(crate::identity::istiod::RETRY).await;
                    }
                }
            };
            info!(identity = %configs.identity, ca = %settings.address, "HBONE certificate from istiod");
            let leaf = configs.leaf.clone();
            let tls = Tls::in_memory(configs);
            crate::identity::istiod::spawn_rotation(client, Arc::clone(&tls), leaf);
            tls
        }
    };
    let mut drain = None;
    let own = tls.current().identity.clone();
    if let Some(addr) = config.listen {
        let policy = Policy {
            trust_domain: config
                .allow_trust_domain
                .clone()
                .unwrap_or_else(|| own.trust_domain.clone()),
            namespaces: config.allow_namespaces.clone(),
        };
        let mut workloads = Vec::new();
        for (ip, dir) in &config.workload_certs {
            let tls = Tls::load(CertFiles::in_dir(dir))?;
            tls.spawn_reloader(config.reload_interval);
            info!(%ip, identity = %tls.current().identity, "HBONE workload certificate");
            workloads.push((*ip, tls));
        }
        let inbound = Inbound::bind(
            addr,
            Arc::clone(&tls),
            workloads,
            policy,
            metrics.tunnels(),
            dialer.socket_mark,
            dialer.connect_timeout,
        )
        .await
        .map_err(|source| Error::HboneListen { addr, source })?;
        info!(%addr, identity = %own, "HBONE listener up");
        drain = Some(inbound.drain());
        tokio::spawn(inbound.run());
    }
    // Validated: identities from the API come with the agent.
    let learned = agent
        .filter(|_| config.identities_from_api)
        .map(|agent| agent.follow_mesh(own.trust_domain.clone()));
    if config.meshed.is_empty() && learned.is_none() {
        return Ok((None, drain));
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
    Ok((
        Some(Arc::new(Mesh {
            outbound,
            meshed: config.meshed.clone(),
            learned,
        })),
        drain,
    ))
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::identity::{
        Identity,
        istiod::fake::{Files, fake_istiod},
        mint::Ca,
    };

    /// With `--istio-ca-address` the daemon's tunnels, both ways, carry the
    /// certificate istiod issued: its own outbound side dials its own
    /// listener, expecting its own identity (a peer node's), and an echo
    /// answers through the stream.
    #[tokio::test]
    async fn with_istiod_both_tunnel_ends_carry_the_certificate_istiod_issued() {
        let ca = Arc::new(Ca::new("cluster.local").expect("ca"));
        let istiod = fake_istiod(Arc::clone(&ca), "token", Duration::from_secs(3600)).await;
        let files = Files::new("app", ca.cert_pem(), "token");
        let me = Identity::new("cluster.local", "redirector-system", "redirector");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = HboneConfig {
            certs: crate::config::CertSource::Istiod(istiod.settings(
                &files,
                me,
                Duration::from_secs(3600),
            )),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            peer_port: port,
            meshed: vec!["127.0.0.0/8".parse().expect("cidr")],
            identities_from_api: false,
            workload_certs: Vec::new(),
            peer_identity: None,
            allow_trust_domain: None,
            allow_namespaces: Vec::new(),
            idle_timeout: Duration::from_secs(30),
            reload_interval: Duration::from_secs(1),
        };
        let metrics = MetricsRegistry::with_workers(1);
        let (mesh, _drain) = start_hbone(&config, &Dialer::plain(), &metrics, None)
            .await
            .expect("HBONE up with istiod's certificate");
        assert_eq!(
            istiod.signed.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one certificate asked for"
        );
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut tcp, _) = echo.accept().await.expect("accept");
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let mesh = mesh.expect("meshed endpoints: an outbound side");
        let mut stream = mesh
            .connect(target, crate::hbone::outbound::Origin::default())
            .await
            .expect("a tunnel proven by istiod's certificate both ways");
        stream.write_all(b"PING").await.expect("write");
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"PING");
    }
}
