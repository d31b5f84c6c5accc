//! The proxy's front door, shared by every backend of the node: the
//! listeners, the accept loop, node-wide admission, and the choice of the
//! backend a connection belongs to.
//!
//! ```text
//! accept ─▶ rdr_orig_dst[peer, local] (steered: pod, original destination, backend_id)
//!        ─▶ route: backend_id → Redis backend (session) | tcp backend (relay)
//!                  unknown id (backend gone)       → relay to the original destination
//!                  not steered                     → the direct backend (the first declared)
//!        ─▶ admission (node-wide tally and quotas) ─▶ session / relay
//! ```
//!
//! The routing decision is pure ([`route`]); [`Front`] carries it out.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest, unix::AsyncFd},
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tracing::{Instrument as _, debug_span};

use super::{
    Error, Shared,
    admission::{self, Origin, Refusal, Tally},
    host::{self, SessionLoop},
    relay::TcpBackend,
    session,
};
use crate::{
    socket,
    steering::{OrigDstTable, orig_dst_addr},
};
use redirector_ebpf::OrigDst;

/// A backend as the accept path sees it.
#[derive(Clone)]
pub enum Route {
    /// A Redis Cluster or standalone Redis: sessions that speak RESP.
    Redis(Arc<Shared>),
    /// Bytes relayed as they are.
    Tcp(Arc<TcpBackend>),
}

impl Route {
    pub fn name(&self) -> &str {
        match self {
            Self::Redis(shared) => shared.metrics.backend(),
            Self::Tcp(tcp) => &tcp.name,
        }
    }
}

/// The backends serving now, by the id the kernel's target map carries.
#[derive(Clone, Default)]
pub struct Routes {
    pub by_id: HashMap<u32, Route>,
    /// The backend direct (unsteered) clients get: the first declared.
    pub direct: Option<u32>,
}

/// What to do with an accepted connection.
#[derive(Clone)]
pub enum Decision {
    Serve(Route),
    /// Steered for a backend that is not serving (not discovered yet, or
    /// removed): carried to where the client was going, as if never steered.
    RelayToOriginal,
    /// Direct, and the backend direct clients get is declared but not up
    /// yet (the daemon is starting).
    DirectBackendStarting,
    /// Direct, and no backend serves direct clients.
    NoDirectBackend,
}

/// The pure routing decision: `steered` is the backend id the kernel
/// recorded, `None` for a connection that dialled the proxy itself.
pub fn route(routes: &Routes, steered: Option<u32>) -> Decision {
    let id = match steered {
        Some(id) => id,
        None => match routes.direct {
            Some(id) => id,
            None => return Decision::NoDirectBackend,
        },
    };
    match (routes.by_id.get(&id), steered) {
        (Some(route), _) => Decision::Serve(route.clone()),
        (None, Some(_)) => Decision::RelayToOriginal,
        (None, None) => Decision::DirectBackendStarting,
    }
}

/// Node-wide admission: one tally across every backend, the node-wide
/// limit the kernel is told about, and the heartbeat's probe.
pub struct Gate {
    policy: admission::Policy,
    tally: Mutex<Tally>,
    /// At the node-wide limit: the kernel should send new connects direct.
    full: AtomicBool,
    /// Woken when `full` flips, so the flag reaches the kernel at once.
    pub full_changed: Notify,
    /// The heartbeat's own probe connection, answered without a backend.
    probe_peer: Mutex<Option<SocketAddr>>,
    orig_dst: Option<OrigDstTable>,
}

impl Gate {
    pub fn new(policy: admission::Policy, orig_dst: Option<OrigDstTable>) -> Self {
        Self {
            policy,
            tally: Mutex::new(Tally::default()),
            full: AtomicBool::new(false),
            full_changed: Notify::new(),
            probe_peer: Mutex::new(None),
            orig_dst,
        }
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Client connections held on the node, every backend together.
    pub fn connected_clients(&self) -> usize {
        self.tally().total()
    }

    /// Whether the proxy is at its node-wide client limit (the kernel then
    /// sends new connects direct).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The local address of the heartbeat's probe connection, so that the
    /// accept path answers it without an original destination.
    pub fn set_probe_peer(&self, peer: Option<SocketAddr>) {
        *self.probe_peer.lock().unwrap_or_else(|e| e.into_inner()) = peer;
    }

    fn is_probe(&self, peer: SocketAddr) -> bool {
        *self.probe_peer.lock().unwrap_or_else(|e| e.into_inner()) == Some(peer)
    }

    /// Admits a connection from `origin` (or says why not), holding its
    /// place until the returned [`Place`] drops.
    pub fn admit(self: &Arc<Self>, origin: Origin) -> Result<Place, Refusal> {
        let mut tally = self.tally();
        admission::decide(&self.policy, &tally, origin)?;
        tally.add(origin);
        self.update_full(&tally);
        Ok(Place {
            gate: Arc::clone(self),
            origin,
        })
    }

    fn update_full(&self, tally: &Tally) {
        let was = self.full.load(Ordering::Relaxed);
        let now = admission::node_full(&self.policy, tally.total(), was);
        if now != was {
            self.full.store(now, Ordering::Relaxed);
            self.full_changed.notify_one();
        }
    }
}

/// A connection's place in the node's admission tally.
pub struct Place {
    gate: Arc<Gate>,
    origin: Origin,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut tally = self.gate.tally();
        tally.remove(self.origin);
        self.gate.update_full(&tally);
    }
}

/// The node's door: the gate and the backends behind it.
pub struct Front {
    pub gate: Arc<Gate>,
    routes: RwLock<Arc<Routes>>,
    /// Carries connections steered for a backend that is not serving to
    /// their original destination.
    pub unrouted: Arc<TcpBackend>,
    /// Woken whenever the routes change.
    pub changed: Notify,
    /// Connections this worker's listeners accepted.
    accepted: Counter,
    session_loop: SessionLoop,
}

impl Front {
    pub fn new(
        gate: Arc<Gate>,
        unrouted: Arc<TcpBackend>,
        accepted: Counter,
        session_loop: SessionLoop,
    ) -> Self {
        Self {
            gate,
            routes: RwLock::new(Arc::new(Routes::default())),
            unrouted,
            changed: Notify::new(),
            accepted,
            session_loop,
        }
    }

    /// The routes now: a snapshot, so the accept path holds no lock.
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes the routes (a backend up, replaced or removed).
    pub fn update(&self, change: impl FnOnce(&mut Routes)) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Routes::clone(&routes);
        change(&mut next);
        *routes = Arc::new(next);
        drop(routes);
        self.changed.notify_waiters();
    }
}

/// The proxy's sockets: bound at start (a taken address fails the start),
/// listening once the daemon can serve ([`Proxy::listen`]), accepting in
/// [`Proxy::serve`].
pub struct Proxy {
    sockets: Vec<(SocketAddr, StdTcpListener)>,
}

impl Proxy {
    /// Binds every address now, so a bind error surfaces before the daemon
    /// reports itself ready (and before the heartbeat turns steering on).
    /// Always with `SO_REUSEPORT`: several workers share the addresses (the
    /// kernel spreads connections), and so do an upgrade's old and new
    /// daemon while one hands over to the other (`handover`).
    pub fn bind(addrs: &[SocketAddr]) -> Result<Self, Error> {
        let sockets = addrs
            .iter()
            .map(|&addr| {
                let socket = crate::socket::bound(addr, crate::socket::Listening::Proxy)
                    .map_err(|source| Error::Bind { addr, source })?;
                // A port 0 request gets its real port here.
                let addr = socket
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                Ok((addr, socket))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { sockets })
    }

    /// Joins the addresses' `SO_REUSEPORT` groups: connections land here
    /// from now on (waiting in the backlog until [`Self::serve`]).
    pub fn listen(&self) -> Result<(), Error> {
        for (addr, socket) in &self.sockets {
            crate::socket::listen(socket).map_err(|source| Error::Bind {
                addr: *addr,
                source,
            })?;
        }
        Ok(())
    }

    /// The sockets, with their addresses, for `rdr_listener` (once
    /// listening) and the reuseport program.
    pub fn sockets(&self) -> impl Iterator<Item = (SocketAddr, &StdTcpListener)> {
        self.sockets.iter().map(|(addr, socket)| (*addr, socket))
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(addr, _)| *addr).collect()
    }

    /// Accepts until the task is dropped; the listeners close with it.
    /// Runs on the worker's runtime, whose reactor the sockets join here.
    pub async fn serve(self, front: Arc<Front>) {
        let mut tasks = tokio::task::JoinSet::new();
        for (addr, socket) in self.sockets {
            match Acceptor::new(socket, front.session_loop) {
                Ok(listener) => {
                    tasks.spawn(accept_loop(listener, Arc::clone(&front)));
                }
                Err(e) => tracing::error!(%addr, error = %e, "cannot accept on the proxy listener"),
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// A proxy listener, in tokio's reactor. For the epoll session loop it
/// accepts plain sockets, which go straight into the worker's loop instead
/// of joining tokio's reactor first.
enum Acceptor {
    Tokio(TcpListener),
    Plain(AsyncFd<StdTcpListener>),
}

impl Acceptor {
    fn new(socket: StdTcpListener, session_loop: SessionLoop) -> io::Result<Self> {
        match session_loop {
            SessionLoop::Task => TcpListener::from_std(socket).map(Self::Tokio),
            SessionLoop::Epoll => {
                // SAFETY: the listener's fd is valid and open, owned by the
                // listener, which the `AsyncFd` owns and never replaces.
                unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
                    .map(Self::Plain)
                    .map_err(Into::into)
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tokio(listener) => listener.local_addr(),
            Self::Plain(listener) => listener.get_ref().local_addr(),
        }
    }

    async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        match self {
            Self::Tokio(listener) => {
                let (client, peer) = listener.accept().await?;
                Ok((Accepted::Tokio(client), peer))
            }
            Self::Plain(listener) => {
                let (client, peer) = listener
                    .async_io(Interest::READABLE, socket::accept_plain)
                    .await?;
                Ok((Accepted::Plain(client), peer))
            }
        }
    }
}

/// An accepted client's socket: in tokio's reactor, or a plain one no
/// reactor has seen (see [`Acceptor`]).
enum Accepted {
    Tokio(TcpStream),
    Plain(std::net::TcpStream),
}

impl Accepted {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tokio(client) => client.local_addr(),
            Self::Plain(client) => client.local_addr(),
        }
    }

    /// In the worker's reactor, for a task to serve.
    fn into_tokio(self) -> io::Result<TcpStream> {
        match self {
            Self::Tokio(client) => Ok(client),
            Self::Plain(client) => TcpStream::from_std(client),
        }
    }

    /// Out of any reactor, for the worker's epoll loop.
    fn into_plain(self) -> io::Result<std::net::TcpStream> {
        match self {
            Self::Tokio(client) => client.into_std(),
            Self::Plain(client) => Ok(client),
        }
    }
}

async fn accept_loop(listener: Acceptor, front: Arc<Front>) {
    // A listener on a specific address accepts only connections to that
    // address: no getsockname per client then.
    let bound = listener
        .local_addr()
        .ok()
        .filter(|addr| !addr.ip().is_unspecified());
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        front.accepted.inc();
        let local = bound.or_else(|| client.local_addr().ok()).unwrap_or(peer);
        // Taken here, once: the entry is the proof that the kernel steered
        // this connection from an enrolled pod.
        let steered = front
            .gate
            .orig_dst
            .as_ref()
            .and_then(|table| table.take(peer, local));
        if steered.is_none() && front.gate.is_probe(peer) {
            tokio::spawn(answer_probe(client));
            continue;
        }
        let origin = match &steered {
            Some(orig) => Origin::Steered {
                pod: orig.netns_cookie,
            },
            None => Origin::Direct { source: peer.ip() },
        };
        let route = match route(&front.routes(), steered.as_ref().map(|o| o.backend_id)) {
            Decision::Serve(route) => route,
            Decision::RelayToOriginal => Route::Tcp(Arc::clone(&front.unrouted)),
            Decision::DirectBackendStarting => {
                tokio::spawn(serve_when_up(Arc::clone(&front), client, peer, local));
                continue;
            }
            Decision::NoDirectBackend => {
                tracing::debug!(%peer, "direct client refused: no backend serves direct clients");
                tokio::spawn(refuse_bytes(
                    client,
                    b"-ERR no backend of this proxy serves direct clients\r\n",
                ));
                continue;
            }
        };
        serve_route(&front, client, peer, local, steered, origin, route);
    }
}

/// A direct client arriving while the backend direct clients get is still
/// coming up (the daemon has just started) waits for it, as long as a
/// client would wait on a connect, rather than get an error at once.
async fn serve_when_up(front: Arc<Front>, client: Accepted, peer: SocketAddr, local: SocketAddr) {
    let deadline = tokio::time::Instant::now() + DIRECT_BACKEND_WAIT;
    loop {
        let changed = front.changed.notified();
        tokio::pin!(changed);
        // Registered before the routes are read: no change is missed.
        changed.as_mut().enable();
        match route(&front.routes(), None) {
            Decision::Serve(route) => {
                let origin = Origin::Direct { source: peer.ip() };
                return serve_route(&front, client, peer, local, None, origin, route);
            }
            Decision::NoDirectBackend => break,
            Decision::DirectBackendStarting | Decision::RelayToOriginal => {}
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            break;
        }
    }
    tracing::debug!(%peer, "direct client refused: its backend did not come up in time");
    refuse_bytes(client, b"-ERR the backend of this proxy is not up yet\r\n").await;
}

/// Admission, then the session (or relay) of an accepted, routed client.
fn serve_route(
    front: &Arc<Front>,
    client: Accepted,
    peer: SocketAddr,
    local: SocketAddr,
    steered: Option<OrigDst>,
    origin: Origin,
    route: Route,
) {
    let place = match front.gate.admit(origin) {
        Ok(place) => place,
        Err(refusal) => {
            match &route {
                Route::Redis(shared) => shared.count_refused(&refusal),
                Route::Tcp(tcp) => tcp.metrics.client_rejected(refusal.reason()),
            }
            tracing::debug!(%peer, backend = route.name(), reason = refusal.reason(), "client refused");
            tokio::spawn(refuse_bytes(client, refusal.reply()));
            return;
        }
    };
    match route {
        Route::Redis(shared) => {
            let slot = shared.register_client(place, peer, local);
            let id = slot.entry().id;
            let span = debug_span!("client", backend = shared.metrics.backend(), id, %peer);
            // A steered client believes it talks to the address it dialled.
            let advertised = steered.as_ref().map_or(local, orig_dst_addr);
            let addresses = session::Addresses { advertised };
            match front.session_loop {
                SessionLoop::Task => {
                    let Some(client) = in_reactor(client, peer) else {
                        return;
                    };
                    let session = session::serve(shared, client, addresses, id, slot);
                    tokio::spawn(session.instrument(span));
                }
                SessionLoop::Epoll => {
                    let hosted = session::Hosted::new(shared, addresses, id, slot);
                    let adopted = client
                        .into_plain()
                        .map_err(host::Error::Adopt)
                        .and_then(|client| host::adopt(hosted, client, span));
                    if let Err(e) = adopted {
                        tracing::warn!(%peer, error = %e, "client dropped");
                    }
                }
            }
        }
        Route::Tcp(tcp) => {
            // A relay needs somewhere to go: a direct client of a tcp
            // backend has no original destination.
            let Some(orig) = steered.as_ref().map(orig_dst_addr) else {
                tokio::spawn(refuse_bytes(
                    client,
                    b"-ERR this proxy's direct backend is a tcp relay, which needs a steered connection\r\n",
                ));
                return;
            };
            let Some(client) = in_reactor(client, peer) else {
                return;
            };
            let span = debug_span!("relay", backend = %tcp.name, %peer, %orig);
            tokio::spawn(tcp.relay(client, orig, place).instrument(span));
        }
    }
}

/// The client as tokio's, for a task; `None` (logged) if it cannot join
/// the reactor.
fn in_reactor(client: Accepted, peer: SocketAddr) -> Option<TcpStream> {
    client
        .into_tokio()
        .inspect_err(|e| tracing::warn!(%peer, error = %e, "client dropped"))
        .ok()
}

/// Tells a refused client why, as Redis does, and closes.
async fn refuse_bytes(client: Accepted, reply: &'static [u8]) {
    let Ok(mut client) = client.into_tokio() else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(reply)).await;
}

/// Answers the heartbeat's probe: its `ECHO` comes back as a bulk string.
/// It proves the accept loop and the runtime's tasks run, without asking
/// any backend (a Redis outage must not stop steering to the others).
async fn answer_probe(client: Accepted) {
    let Ok(mut client) = client.into_tokio() else {
        return;
    };
    let mut request = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1), client.read(&mut request)).await;
    if matches!(read, Ok(Ok(n)) if n > 0) {
        let _ = client.write_all(b"$5\r\nprobe\r\n").await;
    }
}

/// The heartbeat's liveness probe: one connection through the proxy's own
/// listener and accept path. A proxy whose accept loop or tasks no longer
/// run fails it, and then stops beating, so the kernel sends connects
/// direct. The gate learns the probe's address first, so the accept path
/// answers it without an original destination.
pub async fn probe(gate: &Gate, listener: SocketAddr, timeout: Duration) -> io::Result<()> {
    // A wildcard listener (no steering) is reached on loopback.
    let listener = match listener.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, listener.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listener.port()))
        }
        _ => listener,
    };
    // During an upgrade two daemons listen on the address, and the kernel
    // may hand the probe to the other one, which refuses it as an unknown
    // direct client: another connection lands by another hash.
    let exchange = async {
        for _ in 0..PROBE_ATTEMPTS {
            if probe_once(gate, listener).await? {
                return Ok(());
            }
        }
        Err(io::Error::other(format!(
            "{PROBE_ATTEMPTS} probes in a row were refused (by another daemon on the address?)"
        )))
    };
    let result = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")));
    gate.set_probe_peer(None);
    result
}

/// Probes in one heartbeat before it counts as failed.
const PROBE_ATTEMPTS: usize = 8;
/// How long a direct client waits for a starting daemon's backend.
const DIRECT_BACKEND_WAIT: Duration = Duration::from_secs(5);

/// One probe: true if this daemon answered, false if refused (another
/// daemon's listener took it).
async fn probe_once(gate: &Gate, listener: SocketAddr) -> io::Result<bool> {
    let socket = match listener {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(listener.ip(), 0))?;
    gate.set_probe_peer(Some(socket.local_addr()?));
    let mut stream = socket.connect(listener).await?;
    stream
        .write_all(b"*2\r\n$4\r\nECHO\r\n$5\r\nprobe\r\n")
        .await?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).await?;
    match reply[..n].first() {
        Some(b'$') => Ok(true),
        Some(b'-') => Ok(false),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no RESP reply to the probe's ECHO",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{dial::Dialer, metrics::ProxyMetrics};

    fn tcp(name: &str) -> Route {
        Route::Tcp(Arc::new(TcpBackend::new(
            name.into(),
            Arc::new(Dialer::plain()),
            Arc::new(ProxyMetrics::detached()),
        )))
    }

    fn name(decision: &Decision) -> String {
        match decision {
            Decision::Serve(route) => route.name().into(),
            Decision::RelayToOriginal => "relay".into(),
            Decision::DirectBackendStarting => "wait".into(),
            Decision::NoDirectBackend => "refused".into(),
        }
    }

    #[test]
    fn the_kernels_backend_id_picks_the_backend() {
        let routes = Routes {
            by_id: HashMap::from([(0, tcp("cart")), (3, tcp("sessions"))]),
            direct: Some(0),
        };
        assert_eq!(name(&route(&routes, Some(3))), "sessions");
        assert_eq!(name(&route(&routes, Some(0))), "cart");
        // Direct clients get the first declared backend.
        assert_eq!(name(&route(&routes, None)), "cart");
    }

    #[test]
    fn a_connection_for_a_backend_not_serving_goes_where_it_was_going() {
        let routes = Routes {
            by_id: HashMap::from([(0, tcp("cart"))]),
            direct: Some(1),
        };
        assert_eq!(name(&route(&routes, Some(7))), "relay");
        // The direct backend is not up yet: direct clients wait for it.
        assert_eq!(name(&route(&routes, None)), "wait");
        // None is declared for them: nowhere to send them.
        assert_eq!(name(&route(&Routes::default(), None)), "refused");
    }
}
