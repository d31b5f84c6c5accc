//! Pub/Sub for one client: an actor owning the client's subscription
//! connections, leased from the pools.
//!
//! - SUBSCRIBE/PSUBSCRIBE go to one connection to a master: classic
//!   messages are broadcast over the cluster bus, so any node delivers them.
//! - SSUBSCRIBE goes to the master owning the channel's slot, one
//!   connection per master.
//!
//! Every frame those connections send (confirmations and messages) is
//! forwarded to the client as is; the actor counts subscriptions from the
//! confirmations, so the session knows when the client leaves pub/sub mode.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use redis_protocol::{resp2, resp3};
use tokio::{io::AsyncWriteExt as _, sync::mpsc};

use super::{Shared, UpstreamError, dial::UpstreamWrite, local};
use crate::{
    cluster::slot,
    resp::{
        Protocol,
        reply::{self, Reply},
        request::Request,
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
        if is_subscribe(&req) {
            self.active.store(true, Ordering::Relaxed);
        }
        let _ = self.commands.send(req);
    }
}

fn name(req: &Request) -> Vec<u8> {
    req.name_lower()
}

fn is_subscribe(req: &Request) -> bool {
    matches!(
        name(req).as_slice(),
        b"subscribe" | b"psubscribe" | b"ssubscribe"
    )
}

/// Whether a command is one the actor handles.
pub fn handles(name: &[u8]) -> bool {
    matches!(
        name,
        b"subscribe"
            | b"psubscribe"
            | b"ssubscribe"
            | b"unsubscribe"
            | b"punsubscribe"
            | b"sunsubscribe"
    )
}

pub fn start(shared: Arc<Shared>, protocol: Protocol) -> Handle {
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (out_tx, out) = mpsc::unbounded_channel();
    let active = Arc::new(AtomicBool::new(false));
    tokio::spawn(
        Actor {
            shared,
            protocol,
            out: out_tx,
            active: Arc::clone(&active),
            conns: HashMap::new(),
            classic: None,
        }
        .run(commands_rx),
    );
    Handle {
        commands,
        out,
        active,
    }
}

struct SubConn {
    writer: UpstreamWrite,
    count: i64,
}

struct Actor {
    shared: Arc<Shared>,
    protocol: Protocol,
    out: mpsc::UnboundedSender<Out>,
    active: Arc<AtomicBool>,
    conns: HashMap<SocketAddr, SubConn>,
    /// The node carrying SUBSCRIBE/PSUBSCRIBE.
    classic: Option<SocketAddr>,
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
                        self.emit(reply::error(&format!("ERR redirector: {e}")));
                    }
                }
                frame = frames.recv() => {
                    let Some((addr, frame)) = frame else { return };
                    match frame {
                        Ok(reply) => self.frame(addr, reply),
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

    async fn command(&mut self, req: Request, frames: &Frames) -> Result<(), UpstreamError> {
        let view = self.shared.topology.view();
        match name(&req).as_slice() {
            b"subscribe" | b"psubscribe" => {
                let addr = match self.classic {
                    Some(addr) => addr,
                    None => {
                        let masters: Vec<SocketAddr> = view.masters().collect();
                        let Some(&addr) =
                            masters.get(self.shared.next_index() % masters.len().max(1))
                        else {
                            self.emit(reply::error("CLUSTERDOWN Hash slot not served"));
                            return Ok(());
                        };
                        self.classic = Some(addr);
                        addr
                    }
                };
                self.write(addr, &req.raw, frames).await
            }
            b"unsubscribe" | b"punsubscribe" => match self.classic {
                Some(addr) if self.conns.contains_key(&addr) => {
                    self.write(addr, &req.raw, frames).await
                }
                _ => {
                    self.not_subscribed(&req);
                    Ok(())
                }
            },
            b"ssubscribe" => {
                let Some(channel_slot) = self.channel_slot(&req) else {
                    return Ok(());
                };
                let Some(shard) = view.shard(channel_slot) else {
                    self.emit(reply::error("CLUSTERDOWN Hash slot not served"));
                    return Ok(());
                };
                self.write(shard.master, &req.raw, frames).await
            }
            b"sunsubscribe" => {
                if req.args.len() == 1 {
                    let sharded: Vec<SocketAddr> = self
                        .conns
                        .keys()
                        .copied()
                        .filter(|a| Some(*a) != self.classic)
                        .collect();
                    if sharded.is_empty() {
                        self.not_subscribed(&req);
                    }
                    for addr in sharded {
                        self.write(addr, &req.raw, frames).await?;
                    }
                    return Ok(());
                }
                let Some(channel_slot) = self.channel_slot(&req) else {
                    return Ok(());
                };
                match view.shard(channel_slot).map(|s| s.master) {
                    Some(addr) if self.conns.contains_key(&addr) => {
                        self.write(addr, &req.raw, frames).await
                    }
                    _ => {
                        self.not_subscribed(&req);
                        Ok(())
                    }
                }
            }
            _ => {
                self.emit(local::unsupported("this command in the pub/sub actor"));
                Ok(())
            }
        }
    }

    /// The slot all channels of a sharded (un)subscribe share.
    fn channel_slot(&self, req: &Request) -> Option<u16> {
        let mut slots = req.args[1..].iter().map(|c| slot::slot(c));
        let first = slots.next()?;
        if slots.any(|s| s != first) {
            self.emit(reply::error(
                "CROSSSLOT Keys in request don't hash to the same slot",
            ));
            return None;
        }
        Some(first)
    }

    /// What Redis answers to an unsubscribe from channels it never had.
    fn not_subscribed(&self, req: &Request) {
        let kind = name(req);
        let channels: Vec<Option<&Bytes>> = if req.args.len() == 1 {
            vec![None]
        } else {
            req.args[1..].iter().map(Some).collect()
        };
        for channel in channels {
            self.emit(reply::build(self.protocol, |e| {
                match self.protocol {
                    Protocol::Resp2 => e.array(3),
                    Protocol::Resp3 => e.raw(b">3\r\n"),
                }
                e.bulk(&kind);
                match channel {
                    Some(c) => e.bulk(c),
                    None => e.null(),
                }
                e.integer(0);
            }));
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
            self.conns.insert(addr, SubConn { writer, count: 0 });
        }
        let conn = self.conns.get_mut(&addr).expect("inserted above");
        conn.writer
            .write_all(payload)
            .await
            .map_err(|e| UpstreamError::Lost(addr, e.to_string()))
    }

    fn frame(&mut self, addr: SocketAddr, reply: Reply) {
        if let Some(count) = subscription_count(&reply.raw, self.protocol)
            && let Some(conn) = self.conns.get_mut(&addr)
        {
            conn.count = count;
            let total: i64 = self.conns.values().map(|c| c.count).sum();
            self.active.store(total > 0, Ordering::Relaxed);
            if total == 0 {
                // Leaving pub/sub mode: the connections close (their reader
                // tasks end when Redis sees the close).
                self.conns.clear();
                self.classic = None;
            }
        }
        self.emit(reply.raw);
    }
}

/// The subscription count in a (un)subscribe confirmation, if it is one.
fn subscription_count(raw: &Bytes, protocol: Protocol) -> Option<i64> {
    const KINDS: [&[u8]; 6] = [
        b"subscribe",
        b"unsubscribe",
        b"psubscribe",
        b"punsubscribe",
        b"ssubscribe",
        b"sunsubscribe",
    ];
    match protocol {
        Protocol::Resp2 => {
            let resp2::types::BytesFrame::Array(items) = reply::frame2(raw)? else {
                return None;
            };
            let (resp2::types::BytesFrame::BulkString(kind), resp2::types::BytesFrame::Integer(n)) =
                (items.first()?, items.get(2)?)
            else {
                return None;
            };
            KINDS.contains(&&kind[..]).then_some(*n)
        }
        Protocol::Resp3 => {
            let (resp3::types::BytesFrame::Push { data, .. }
            | resp3::types::BytesFrame::Array { data, .. }) = reply::frame3(raw)?
            else {
                return None;
            };
            let kind = match data.first()? {
                resp3::types::BytesFrame::BlobString { data, .. }
                | resp3::types::BytesFrame::SimpleString { data, .. } => data.clone(),
                _ => return None,
            };
            let resp3::types::BytesFrame::Number { data: n, .. } = data.get(2)? else {
                return None;
            };
            KINDS.contains(&&kind[..]).then_some(*n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_carry_the_count() {
        let raw = Bytes::from_static(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:2\r\n");
        assert_eq!(subscription_count(&raw, Protocol::Resp2), Some(2));
        let message = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n");
        assert_eq!(subscription_count(&message, Protocol::Resp2), None);
        let push = Bytes::from_static(b">3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n");
        assert_eq!(subscription_count(&push, Protocol::Resp3), Some(0));
    }
}
