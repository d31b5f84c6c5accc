//! Pub/Sub for one client: an actor owning the client's subscriptions and
//! the leased connections that carry them.
//!
//! Where each subscription lives is chosen so that PUBLISH counts are
//! right, as on one Redis:
//! - a channel (SUBSCRIBE) on the master of its slot, where the proxy also
//!   sends every PUBLISH to it: that node's receiver count then includes
//!   every subscriber behind every proxy;
//! - a pattern (PSUBSCRIBE) on every master, so every PUBLISH counts it;
//!   Redis Cluster delivers each message to every node, so a pattern's
//!   message is forwarded only from the master of the message's channel,
//!   once;
//! - a sharded channel (SSUBSCRIBE) on the master of its slot, channels of
//!   several slots split across their masters, as one Redis accepts them.
//!
//! The actor keeps the subscription sets itself and writes the
//! confirmations (with the client's own counts) once every node involved
//! confirmed, so no message can be missed after a confirmation.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use tokio::{io::AsyncWriteExt as _, sync::mpsc};

use super::{Shared, UpstreamError, clients::ClientEntry, dial::UpstreamWrite};
use crate::{
    cluster::slot,
    resp::{
        Protocol,
        reply::{self, Reply},
        request::{self, Request},
        value::Value,
    },
};

/// What the actor sends the session.
pub enum Out {
    Frame(Bytes),
    /// A subscription connection died: the client must reconnect and
    /// subscribe again (as it would if its Redis went away).
    Close,
}

pub struct Handle {
    commands: mpsc::UnboundedSender<Request>,
    pub out: mpsc::UnboundedReceiver<Out>,
    active: Arc<AtomicBool>,
}

impl Handle {
    /// Whether the client has any subscription (RESP2 clients are then
    /// restricted to pub/sub commands).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn send(&self, req: Request) {
        // Subscribing takes effect as soon as it is sent.
        if matches!(
            req.name_lower().as_slice(),
            b"subscribe" | b"psubscribe" | b"ssubscribe"
        ) {
            self.active.store(true, Ordering::Relaxed);
        }
        let _ = self.commands.send(req);
    }
}

pub fn start(shared: Arc<Shared>, protocol: Protocol, client: Arc<ClientEntry>) -> Handle {
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (out_tx, out) = mpsc::unbounded_channel();
    let active = Arc::new(AtomicBool::new(false));
    tokio::spawn(
        Actor {
            shared,
            protocol,
            client,
            out: out_tx,
            active: Arc::clone(&active),
            conns: HashMap::new(),
            channels: BTreeSet::new(),
            patterns: BTreeSet::new(),
            shard_channels: BTreeSet::new(),
            waiting: VecDeque::new(),
        }
        .run(commands_rx),
    );
    Handle {
        commands,
        out,
        active,
    }
}

/// Subscription kinds, as Redis names their confirmations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Channel,
    Pattern,
    Shard,
}

impl Kind {
    fn confirm(self, subscribe: bool) -> &'static [u8] {
        match (self, subscribe) {
            (Self::Channel, true) => b"subscribe",
            (Self::Channel, false) => b"unsubscribe",
            (Self::Pattern, true) => b"psubscribe",
            (Self::Pattern, false) => b"punsubscribe",
            (Self::Shard, true) => b"ssubscribe",
            (Self::Shard, false) => b"sunsubscribe",
        }
    }

    fn of_confirmation(word: &[u8]) -> Option<(Self, bool)> {
        Some(match word {
            b"subscribe" => (Self::Channel, true),
            b"unsubscribe" => (Self::Channel, false),
            b"psubscribe" => (Self::Pattern, true),
            b"punsubscribe" => (Self::Pattern, false),
            b"ssubscribe" => (Self::Shard, true),
            b"sunsubscribe" => (Self::Shard, false),
            _ => return None,
        })
    }
}

/// A confirmation owed to the client once `nodes` confirmed upstream.
struct Waiting {
    kind: Kind,
    subscribe: bool,
    /// `None`: the reply to an argument-less unsubscribe with nothing to
    /// unsubscribe (Redis answers with a nil channel).
    name: Option<Bytes>,
    nodes: Vec<SocketAddr>,
    /// The client's subscription count right after this one, as Redis
    /// reports it in each confirmation.
    count: usize,
}

struct SubConn {
    writer: UpstreamWrite,
}

struct Actor {
    shared: Arc<Shared>,
    protocol: Protocol,
    client: Arc<ClientEntry>,
    out: mpsc::UnboundedSender<Out>,
    active: Arc<AtomicBool>,
    conns: HashMap<SocketAddr, SubConn>,
    channels: BTreeSet<Bytes>,
    patterns: BTreeSet<Bytes>,
    shard_channels: BTreeSet<Bytes>,
    /// Confirmations in the order the client asked for them.
    waiting: VecDeque<Waiting>,
}

type Frames = mpsc::UnboundedSender<(SocketAddr, Result<Reply, UpstreamError>)>;

impl Actor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Request>) {
        let (frames_tx, mut frames) = mpsc::unbounded_channel();
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(req) = command else { return };
                    if let Err(e) = self.command(req, &frames_tx).await {
                        tracing::debug!(error = %e, "subscription connection failed");
                        self.emit(reply::error(&format!("ERR redirector: {e}")));
                        let _ = self.out.send(Out::Close);
                        return;
                    }
                }
                frame = frames.recv() => {
                    let Some((addr, frame)) = frame else { return };
                    match frame {
                        Ok(reply) => self.frame(addr, &reply),
                        // A connection we let go of (no subscriptions left).
                        Err(_) if !self.conns.contains_key(&addr) => {}
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "subscription connection lost");
                            let _ = self.out.send(Out::Close);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn emit(&self, raw: Bytes) {
        let _ = self.out.send(Out::Frame(raw));
    }

    /// The master of `channel`'s slot.
    fn owner(&self, channel: &[u8]) -> Option<SocketAddr> {
        let view = self.shared.topology.view();
        view.shard(slot::slot(channel)).map(|s| s.master)
    }

    async fn command(&mut self, req: Request, frames: &Frames) -> Result<(), UpstreamError> {
        let name = req.name_lower();
        let names: Vec<Bytes> = req.args()[1..].to_vec();
        match name.as_slice() {
            b"subscribe" => self.subscribe(Kind::Channel, names, frames).await,
            b"ssubscribe" => self.subscribe(Kind::Shard, names, frames).await,
            b"psubscribe" => self.subscribe(Kind::Pattern, names, frames).await,
            b"unsubscribe" => self.unsubscribe(Kind::Channel, names).await,
            b"sunsubscribe" => self.unsubscribe(Kind::Shard, names).await,
            b"punsubscribe" => self.unsubscribe(Kind::Pattern, names).await,
            _ => {
                self.emit(reply::error("ERR redirector: not a pub/sub command"));
                Ok(())
            }
        }
    }

    fn set(&mut self, kind: Kind) -> &mut BTreeSet<Bytes> {
        match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
            Kind::Shard => &mut self.shard_channels,
        }
    }

    /// Where a subscription of `kind` to `name` lives.
    fn nodes_for(&self, kind: Kind, name: &[u8]) -> Vec<SocketAddr> {
        let masters = || self.shared.topology.view().masters().collect();
        match kind {
            Kind::Pattern => masters(),
            Kind::Channel => match notification(name) {
                // Keyspace notifications stay on the node that raised them.
                Some(Notification::Keyspace(key)) => self.owner_of_key(key).into_iter().collect(),
                Some(Notification::Keyevent) => masters(),
                None => self.owner(name).into_iter().collect(),
            },
            Kind::Shard => self.owner(name).into_iter().collect(),
        }
    }

    fn owner_of_key(&self, key: &[u8]) -> Option<SocketAddr> {
        let view = self.shared.topology.view();
        view.shard(slot::slot(key)).map(|s| s.master)
    }

    async fn subscribe(
        &mut self,
        kind: Kind,
        names: Vec<Bytes>,
        frames: &Frames,
    ) -> Result<(), UpstreamError> {
        if names.is_empty() {
            let word = String::from_utf8_lossy(kind.confirm(true)).into_owned();
            self.emit(super::plan::wrong_arity(&word));
            return Ok(());
        }
        for name in names {
            let nodes = self.nodes_for(kind, &name);
            if nodes.is_empty() {
                self.emit(reply::error("CLUSTERDOWN Hash slot not served"));
                continue;
            }
            self.set(kind).insert(name.clone());
            let count = self.total(kind);
            let command = match kind {
                Kind::Channel => "SUBSCRIBE",
                Kind::Pattern => "PSUBSCRIBE",
                Kind::Shard => "SSUBSCRIBE",
            };
            let payload = request::encode(&[Bytes::from_static(command.as_bytes()), name.clone()]);
            for &node in &nodes {
                self.write(node, &payload, frames).await?;
            }
            self.waiting.push_back(Waiting {
                kind,
                subscribe: true,
                name: Some(name),
                nodes,
                count,
            });
        }
        self.publish_counts();
        Ok(())
    }

    async fn unsubscribe(&mut self, kind: Kind, names: Vec<Bytes>) -> Result<(), UpstreamError> {
        let names: Vec<Bytes> = if names.is_empty() {
            self.set(kind).iter().cloned().collect()
        } else {
            names
        };
        if names.is_empty() {
            // Nothing to unsubscribe from: Redis answers with a nil name.
            let count = self.total(kind);
            self.waiting.push_back(Waiting {
                kind,
                subscribe: false,
                name: None,
                nodes: Vec::new(),
                count,
            });
            self.flush_confirmations();
            return Ok(());
        }
        for name in names {
            let subscribed = self.set(kind).remove(&name);
            let count = self.total(kind);
            let nodes = if subscribed {
                self.nodes_for(kind, &name)
                    .into_iter()
                    .filter(|n| self.conns.contains_key(n))
                    .collect()
            } else {
                Vec::new()
            };
            let command = match kind {
                Kind::Channel => "UNSUBSCRIBE",
                Kind::Pattern => "PUNSUBSCRIBE",
                Kind::Shard => "SUNSUBSCRIBE",
            };
            let payload = request::encode(&[Bytes::from_static(command.as_bytes()), name.clone()]);
            for &node in &nodes {
                if let Some(conn) = self.conns.get_mut(&node) {
                    conn.writer
                        .write_all(&payload)
                        .await
                        .map_err(|e| UpstreamError::Lost(node, e.to_string()))?;
                }
            }
            self.waiting.push_back(Waiting {
                kind,
                subscribe: false,
                name: Some(name),
                nodes,
                count,
            });
        }
        self.flush_confirmations();
        self.publish_counts();
        Ok(())
    }

    fn total(&self, kind: Kind) -> usize {
        match kind {
            // Redis counts channels and patterns together, sharded apart.
            Kind::Channel | Kind::Pattern => self.channels.len() + self.patterns.len(),
            Kind::Shard => self.shard_channels.len(),
        }
    }

    fn publish_counts(&self) {
        let len = |s: &BTreeSet<Bytes>| u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.client.set_subscriptions(
            len(&self.channels),
            len(&self.patterns),
            len(&self.shard_channels),
        );
    }

    /// Writes every confirmation at the head whose nodes all confirmed.
    fn flush_confirmations(&mut self) {
        while let Some(head) = self.waiting.front() {
            if !head.nodes.is_empty() {
                return;
            }
            let done = self.waiting.pop_front().expect("checked");
            self.emit(confirmation(
                self.protocol,
                done.kind.confirm(done.subscribe),
                done.name.as_deref(),
                done.count,
            ));
        }
        let any = self.total(Kind::Channel) + self.total(Kind::Shard) > 0;
        self.active.store(any, Ordering::Relaxed);
        if !any && self.waiting.is_empty() {
            // Leaving pub/sub mode: the connections close (their reader
            // tasks end when Redis sees the close).
            self.conns.clear();
        }
    }

    async fn write(
        &mut self,
        addr: SocketAddr,
        payload: &[u8],
        frames: &Frames,
    ) -> Result<(), UpstreamError> {
        if !self.conns.contains_key(&addr) {
            let pool = self.shared.pools.node(addr, self.protocol);
            let (mut reader, writer) = pool.lease().await?.split();
            let frames = frames.clone();
            tokio::spawn(async move {
                loop {
                    let frame = reader.next().await;
                    let failed = frame.is_err();
                    if frames.send((addr, frame)).is_err() || failed {
                        pool.forget();
                        return;
                    }
                }
            });
            self.conns.insert(addr, SubConn { writer });
        }
        let conn = self.conns.get_mut(&addr).expect("inserted above");
        conn.writer
            .write_all(payload)
            .await
            .map_err(|e| UpstreamError::Lost(addr, e.to_string()))
    }

    /// A frame from a subscription connection: a confirmation (ours to
    /// answer once every node confirmed), or a message to forward.
    fn frame(&mut self, addr: SocketAddr, reply: &Reply) {
        let Some(parts) = Value::decode(&reply.raw, self.protocol).and_then(Value::into_items)
        else {
            return;
        };
        let word = parts
            .first()
            .and_then(Value::as_bytes)
            .map(<[u8]>::to_ascii_lowercase)
            .unwrap_or_default();
        if let Some((kind, subscribe)) = Kind::of_confirmation(&word) {
            let name = parts.get(1).and_then(Value::as_bytes);
            let pending = self.waiting.iter_mut().find(|w| {
                w.kind == kind
                    && w.subscribe == subscribe
                    && w.name.as_deref() == name
                    && w.nodes.contains(&addr)
            });
            if let Some(w) = pending {
                w.nodes.retain(|n| *n != addr);
            }
            self.flush_confirmations();
            return;
        }
        if word == b"pmessage" {
            // Every master delivers a published message (the cluster bus
            // spreads it): forward the copy of the channel's own master
            // only. Keyspace notifications are raised by one node and
            // never spread: forward them from wherever they come.
            let channel = parts.get(2).and_then(Value::as_bytes).unwrap_or_default();
            if notification(channel).is_none() && self.owner(channel) != Some(addr) {
                return;
            }
        }
        self.emit(reply.raw.clone());
    }
}

/// Redis's keyspace notification channels.
enum Notification<'a> {
    /// `__keyspace@<db>__:<key>`: raised by the key's master.
    Keyspace(&'a [u8]),
    /// `__keyevent@<db>__:<event>`: raised by any master.
    Keyevent,
}

fn notification(channel: &[u8]) -> Option<Notification<'_>> {
    let (kind, rest) = if let Some(rest) = channel.strip_prefix(b"__keyspace@") {
        (true, rest)
    } else {
        (false, channel.strip_prefix(b"__keyevent@")?)
    };
    let at = rest.windows(3).position(|w| w == b"__:")?;
    let tail = &rest[at + 3..];
    Some(if kind {
        Notification::Keyspace(tail)
    } else {
        Notification::Keyevent
    })
}

/// A (un)subscribe confirmation as Redis writes it.
fn confirmation(protocol: Protocol, kind: &[u8], name: Option<&[u8]>, count: usize) -> Bytes {
    reply::build(protocol, |e| {
        match protocol {
            Protocol::Resp2 => e.array(3),
            Protocol::Resp3 => e.raw(b">3\r\n"),
        }
        e.bulk(kind);
        match name {
            Some(name) => e.bulk(name),
            None => e.null(),
        }
        e.integer(i64::try_from(count).unwrap_or(i64::MAX));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_are_written_as_redis_writes_them() {
        assert_eq!(
            &confirmation(Protocol::Resp2, b"subscribe", Some(b"ch"), 2)[..],
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:2\r\n"
        );
        assert_eq!(
            &confirmation(Protocol::Resp3, b"unsubscribe", None, 0)[..],
            b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"
        );
        assert_eq!(
            Kind::of_confirmation(b"psubscribe"),
            Some((Kind::Pattern, true))
        );
        assert_eq!(Kind::of_confirmation(b"message"), None);
    }

    #[test]
    fn keyspace_notification_channels_are_recognised() {
        assert!(matches!(
            notification(b"__keyspace@0__:user:1"),
            Some(Notification::Keyspace(b"user:1"))
        ));
        assert!(matches!(
            notification(b"__keyevent@0__:set"),
            Some(Notification::Keyevent)
        ));
        assert!(notification(b"news").is_none());
        assert!(notification(b"__keyspace@0").is_none());
    }
}
