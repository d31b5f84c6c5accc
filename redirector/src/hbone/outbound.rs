//! Dialing through HBONE: a pool of mTLS HTTP/2 connections to peer nodes,
//! each carrying up to [`MAX_STREAMS`] `CONNECT` streams.
//!
//! Connections are keyed by (our identity, the identities the peer may
//! prove, the peer's address), as ztunnel keys its pool, so a certificate
//! rotation on either side starts new connections instead of reusing ones
//! proven by the old certificate, and a destination that must be answered
//! by a given workload never shares a connection proven by another. A per-key guard makes a burst of callers open one
//! connection, not one each. A connection that died (keepalive, reset,
//! GOAWAY) is dropped from the pool, and a `CONNECT` that fails on a pooled
//! connection before any answer is retried once on a fresh one: a stale
//! connection never fails a caller. Connections without streams for the
//! idle timeout are closed.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hasher as _},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS, STREAM_WINDOW, Stream, StreamGuard, keepalive,
    metrics::TunnelMetrics, tls_handshake,
};
use crate::identity::{
    Identity, PeerIdentities, peer_identity,
    tls::{ALPN_H2, Tls},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HBONE peer {0}: connect failed: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("HBONE peer {0}: TLS handshake failed: {1}")]
    Handshake(SocketAddr, io::Error),
    #[error("HBONE peer {addr}: expected identity {expected}, the certificate says {found}")]
    WrongPeer {
        addr: SocketAddr,
        expected: PeerIdentities,
        found: String,
    },
    #[error("HBONE peer {0}: HTTP/2: {1}")]
    Http2(SocketAddr, h2::Error),
    #[error("HBONE peer {peer}: CONNECT {target} answered {status}")]
    Status {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    local: Identity,
    peer: PeerIdentities,
    addr: SocketAddr,
}

/// One pooled connection.
#[derive(Clone)]
struct Tunnel {
    send: SendRequest<Bytes>,
    /// Streams open or being opened on it (slots are taken before the
    /// CONNECT is sent, so concurrent callers never overshoot the limit).
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// When it last had no streams (ms since the pool started).
    idle_since: Arc<AtomicU64>,
    /// This end of the TCP connection: the origin of streams that serve no
    /// single client (the proxy's shared upstream connections).
    local: SocketAddr,
}

impl Tunnel {
    fn limit(&self) -> usize {
        self.send
            .current_max_send_streams()
            .min(MAX_STREAMS as usize)
            .max(1)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Takes a stream slot if one is free.
    fn reserve(&self) -> bool {
        let limit = self.limit();
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Who dials: the node's certificates, and which identity peers must have.
pub struct Outbound {
    shared: Arc<Shared>,
}

struct Shared {
    tls: Arc<Tls>,
    /// The port peers' HBONE listeners use.
    port: u16,
    /// What peer nodes must prove (a destination may name others).
    peer_identity: PeerIdentities,
    metrics: Arc<TunnelMetrics>,
    socket_mark: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    started: Instant,
    pool: Mutex<HashMap<Key, Vec<Tunnel>>>,
    guards: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// What the `CONNECT` tells the far side about the stream's origin.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin {
    /// The client the stream serves (the `forwarded: for=` header);
    /// `None`: this node itself (the tunnel's own source address).
    pub client: Option<SocketAddr>,
}

impl Outbound {
    /// Must be called inside the runtime: it starts the idle reaper.
    pub fn new(
        tls: Arc<Tls>,
        port: u16,
        peer_identity: Identity,
        metrics: Arc<TunnelMetrics>,
        socket_mark: u32,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            tls,
            port,
            peer_identity: PeerIdentities::one(peer_identity),
            metrics,
            socket_mark,
            connect_timeout,
            idle_timeout,
            started: Instant::now(),
            pool: Mutex::new(HashMap::new()),
            guards: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&shared);
        let every = (idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(shared) => shared.evict_idle(),
                    None => return,
                }
            }
        });
        Self { shared }
    }

    /// Opens a stream to `target` through the HBONE listener on the
    /// target's address (Istio's convention: a meshed endpoint's node
    /// answers on the endpoint's IP).
    pub async fn connect(&self, target: SocketAddr, origin: Origin) -> Result<Stream, Error> {
        self.connect_expecting(target, origin, None).await
    }

    /// [`Self::connect`], from a peer proving one of `expected` (`None`:
    /// the peer nodes' identity).
    pub async fn connect_expecting(
        &self,
        target: SocketAddr,
        origin: Origin,
        expected: Option<PeerIdentities>,
    ) -> Result<Stream, Error> {
        let peer = SocketAddr::new(target.ip(), self.shared.port);
        self.open(peer, target, origin, expected).await
    }

    /// Opens a stream to `target` through the HBONE listener at `peer`.
    pub async fn connect_via(
        &self,
        peer: SocketAddr,
        target: SocketAddr,
        origin: Origin,
    ) -> Result<Stream, Error> {
        self.open(peer, target, origin, None).await
    }

    async fn open(
        &self,
        peer: SocketAddr,
        target: SocketAddr,
        origin: Origin,
        expected: Option<PeerIdentities>,
    ) -> Result<Stream, Error> {
        let configs = self.shared.tls.current();
        let key = Key {
            local: configs.identity.clone(),
            peer: expected.unwrap_or_else(|| self.shared.peer_identity.clone()),
            addr: peer,
        };
        let mut fresh_tried = false;
        loop {
            let (tunnel, fresh) = self.shared.checkout(&key, &configs.client).await?;
            match self.shared.open_stream(&tunnel, &key, target, origin).await {
                Ok(stream) => return Ok(stream),
                // Failed before any answer: the connection is dead, and the
                // peer never saw the request. Once more, on a new one.
                Err(Attempt::Stale(e)) => {
                    tunnel.closed.store(true, Ordering::Relaxed);
                    if fresh || fresh_tried {
                        return Err(Error::Http2(key.addr, e));
                    }
                    fresh_tried = true;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    /// Open connections to peers (for tests and status).
    pub fn connections(&self) -> usize {
        let pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.values().flatten().filter(|t| !t.is_closed()).count()
    }
}

enum Attempt {
    Stale(h2::Error),
    Failed(Error),
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A pooled connection with a free slot (reserved), else a new one.
    /// The flag says whether it is new.
    async fn checkout(
        self: &Arc<Self>,
        key: &Key,
        client: &Arc<rustls::ClientConfig>,
    ) -> Result<(Tunnel, bool), Error> {
        if let Some(tunnel) = self.find(key) {
            return Ok((tunnel, false));
        }
        let guard = {
            let mut guards = self.guards.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(guards.entry(key.clone()).or_default())
        };
        let _opening = guard.lock().await;
        // Someone else may have opened one while we waited.
        if let Some(tunnel) = self.find(key) {
            return Ok((tunnel, false));
        }
        let tunnel = self.open_tunnel(key, client).await?;
        tunnel.streams.fetch_add(1, Ordering::AcqRel);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(tunnel.clone());
        Ok((tunnel, true))
    }

    fn find(&self, key: &Key) -> Option<Tunnel> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let tunnels = pool.get_mut(key)?;
        tunnels.retain(|t| !t.is_closed());
        tunnels.iter().find(|t| t.reserve()).cloned()
    }

    fn evict_idle(&self) {
        let now = self.now_ms();
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for tunnels in pool.values_mut() {
            tunnels.retain(|t| {
                let idle = t.streams.load(Ordering::Acquire) == 0
                    && now.saturating_sub(t.idle_since.load(Ordering::Relaxed)) >= idle_ms;
                // Dropping the last handle ends the connection task.
                !t.is_closed() && !idle
            });
        }
        pool.retain(|_, tunnels| !tunnels.is_empty());
        let mut guards = self.guards.lock().unwrap_or_else(|e| e.into_inner());
        guards.retain(|key, guard| pool.contains_key(key) || Arc::strong_count(guard) > 1);
    }

    async fn open_tunnel(
        self: &Arc<Self>,
        key: &Key,
        client: &Arc<rustls::ClientConfig>,
    ) -> Result<Tunnel, Error> {
        let addr = key.addr;
        let tcp = crate::socket::connect_marked(addr, self.socket_mark, self.connect_timeout)
            .await
            .map_err(|e| Error::Connect(addr, e))?;
        let local = tcp.local_addr().map_err(|e| Error::Connect(addr, e))?;
        let connector = TlsConnector::from(Arc::clone(client));
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tls_handshake(&self.metrics, connector.connect(name, tcp), |tls| {
            tls.get_ref().1.alpn_protocol() == Some(ALPN_H2)
        })
        .await
        .map_err(|e| Error::Handshake(addr, e))?;
        // The chain is verified; now the name: is this the peer we meant?
        match peer_identity(tls.get_ref().1.peer_certificates()) {
            Ok(found) if key.peer.accepts(&found) => {}
            found => {
                self.metrics.handshake_failed("wrong_identity");
                return Err(Error::WrongPeer {
                    addr,
                    expected: key.peer.clone(),
                    found: match found {
                        Ok(id) => id.to_string(),
                        Err(e) => e.to_string(),
                    },
                });
            }
        }
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(MAX_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Error::Http2(addr, e))?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = conn.ping_pong();
        let metrics = Arc::clone(&self.metrics);
        metrics.tunnel_opened("outbound");
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            let alive = async {
                match ping {
                    Some(ping) => keepalive(ping).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(%addr, error = %e, "HBONE connection ended");
                    }
                }
                () = alive => tracing::info!(%addr, "HBONE peer missed its keepalive; connection dropped"),
            }
            ended.store(true, Ordering::Relaxed);
            metrics.tunnel_closed("outbound");
        });
        Ok(Tunnel {
            send,
            streams: Arc::new(AtomicUsize::new(0)),
            closed,
            idle_since: Arc::new(AtomicU64::new(self.now_ms())),
            local,
        })
    }

    /// Sends the `CONNECT` on a reserved slot of `tunnel`.
    async fn open_stream(
        self: &Arc<Self>,
        tunnel: &Tunnel,
        key: &Key,
        target: SocketAddr,
        origin: Origin,
    ) -> Result<Stream, Attempt> {
        // The slot is ours from here: give it back however this ends.
        let slot = SlotRelease {
            shared: Arc::clone(self),
            tunnel: tunnel.clone(),
            armed: true,
        };
        let mut send = tunnel.send.clone().ready().await.map_err(Attempt::Stale)?;
        let client = origin.client.unwrap_or(tunnel.local);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(
                "baggage",
                format!(
                    "k8s.namespace.name={},service.name=redirector",
                    key.local.namespace
                ),
            )
            .header("traceparent", traceparent())
            .header("forwarded", format!("for=\"{client}\""))
            .body(())
            .expect("an ip:port authority and ASCII headers make a valid request");
        let (response, send_stream) = send.send_request(request, false).map_err(Attempt::Stale)?;
        let response = response.await.map_err(Attempt::Stale)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(Attempt::Failed(Error::Status {
                peer: key.addr,
                target,
                status,
            }));
        }
        let release = slot.disarm();
        let guard = StreamGuard::new(Arc::clone(&self.metrics), Some(Box::new(release)));
        Ok(Stream::new(send_stream, response.into_body(), guard))
    }
}

/// Returns a reserved stream slot, and notes when the tunnel went idle.
struct SlotRelease {
    shared: Arc<Shared>,
    tunnel: Tunnel,
    armed: bool,
}

impl SlotRelease {
    fn release(shared: &Shared, tunnel: &Tunnel) {
        if tunnel.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            tunnel.idle_since.store(shared.now_ms(), Ordering::Relaxed);
        }
    }

    /// Hands the release to the stream, to run when the stream closes.
    fn disarm(mut self) -> impl FnOnce() + Send + Sync + 'static {
        self.armed = false;
        let (shared, tunnel) = (Arc::clone(&self.shared), self.tunnel.clone());
        move || Self::release(&shared, &tunnel)
    }
}

impl Drop for SlotRelease {
    fn drop(&mut self) {
        if self.armed {
            Self::release(&self.shared, &self.tunnel);
        }
    }
}

/// A W3C `traceparent` with fresh random trace and span IDs, sampled off:
/// enough for a mesh's tracing to join the stream to its own spans.
fn traceparent() -> String {
    let random = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.finish()
    };
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        random(),
        random(),
        random() | 1
    )
}
