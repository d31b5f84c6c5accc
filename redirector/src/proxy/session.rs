//! One client connection.
//!
//! The session reads pipelined requests, routes each one, and keeps a queue
//! of pending replies in request order. A routed single-slot command is sent
//! on a shared upstream connection right here (the hot path: no task); its
//! reply slot is a oneshot receiver at its place in the queue. Anything
//! slower (redirects, retries, split or fan-out commands, transactions,
//! blocking commands) runs in a task of its own whose result lands at the
//! same place. Replies are written as soon as the head of the queue is
//! ready, coalesced into one write when several are.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
};

use super::{
    ClientSlot, Shared,
    exec::{self, Merge, Routed, Target},
    local::{self, Caller},
    pubsub, txn,
    upstream::{Conn, Inbox, Job, Sink},
};
use crate::{
    cluster::{
        commands::{CommandInfo, Flags},
        slot,
        topology::View,
    },
    metrics::{CommandCounters, UNKNOWN_COMMAND},
    resp::{
        Protocol,
        reply::{self, Reply},
        request::{self, Parsed, Request},
    },
};

const NOAUTH: &str = "NOAUTH Authentication required.";
const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// A client connection's addresses.
pub struct Addresses {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Where the client believes it is connected: the address it dialled
    /// (its original destination when steered), shown in cluster views.
    pub advertised: SocketAddr,
}

pub async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    Addresses {
        peer,
        local,
        advertised,
    }: Addresses,
    id: u64,
    _slot: ClientSlot,
) {
    // TCP_NODELAY is inherited from the listener.
    let mut session = Session {
        authed: !shared.settings.auth.required(),
        shared: Arc::clone(&shared),
        id,
        peer,
        local,
        advertised,
        protocol: Protocol::Resp2,
        user: "default".into(),
        name: None,
        multi: None,
        baton: None,
        pubsub: None,
        last_write_slot: None,
        closing: false,
        view: shared.topology.view(),
        conns: Vec::new(),
        inbox: Arc::new(Inbox::default()),
        next_seq: 0,
        batch: Vec::new(),
        metric_cache: Vec::new(),
        read_at: Instant::now(),
    };
    session.run(stream).await;
    tracing::debug!("client closed");
}

/// Per-command bookkeeping for metrics.
struct Meta {
    /// When the read carrying the command returned.
    started: Instant,
    /// Index into the session's metric cache.
    metric: usize,
}

enum Pending {
    Ready(Bytes, Option<Meta>),
    /// First attempt on a shared connection; the reply arrives in the
    /// session's inbox under `seq`.
    Upstream {
        seq: u64,
        routed: Routed,
        meta: Meta,
    },
    /// Work running in a task.
    Task(oneshot::Receiver<Bytes>, Option<Meta>),
    /// Close the connection once everything before has been written.
    Close,
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    advertised: SocketAddr,
    protocol: Protocol,
    authed: bool,
    user: String,
    name: Option<Bytes>,
    /// Between MULTI and EXEC.
    multi: Option<txn::Queued>,
    /// The WATCH state, handed from transaction step to step.
    baton: Option<txn::Baton>,
    pubsub: Option<pubsub::Handle>,
    /// For WAIT: the slot this client last wrote to.
    last_write_slot: Option<u16>,
    closing: bool,
    /// The slot map as of the last command (reloaded when its version moves).
    view: Arc<View>,
    /// Shared upstream connections this client used, by node: saves the
    /// pool lookups on the hot path.
    conns: Vec<(SocketAddr, Conn)>,
    /// Where shared connections deliver this client's replies.
    inbox: Arc<Inbox>,
    /// Sequence number of the next command sent through the inbox.
    next_seq: u64,
    /// Commands routed by the current read, per node, not yet sent.
    batch: Vec<(SocketAddr, BytesMut, Vec<u64>)>,
    metric_cache: Vec<(Box<[u8]>, CommandCounters)>,
    read_at: Instant,
}

enum Event {
    Resolved(Resolution),
    Read(std::io::Result<usize>),
    PubSub(Option<pubsub::Out>),
    Idle,
}

enum Resolution {
    Upstream(Result<Reply, super::UpstreamError>),
    Task(Bytes),
    /// The inbox got a reply: look again.
    Wake,
}

impl Session {
    async fn run(&mut self, mut stream: TcpStream) {
        // Borrowed halves: dropping the stream just closes it, where an
        // owned write half would cost a shutdown() syscall first.
        let (mut reader, mut writer) = stream.split();
        let settings = self.shared.settings.clone();
        // Small to start: a client that connects for one command (PHP-FPM)
        // should cost little; busy clients grow them.
        let mut inbuf = BytesMut::with_capacity(4 * 1024);
        let mut out = BytesMut::with_capacity(4 * 1024);
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut eof = false;
        let mut backlog = false;
        let inbox = Arc::clone(&self.inbox);
        loop {
            if !self.closing && !inbuf.is_empty() && pending.len() < settings.max_pipeline {
                backlog = self.parse_and_dispatch(&mut inbuf, &mut pending, &settings);
            }
            let close_now = self.drain(&mut pending, &mut out);
            if !out.is_empty() {
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
                if out.capacity() > 1024 * 1024 {
                    out = BytesMut::with_capacity(16 * 1024);
                }
            }
            if close_now {
                return;
            }
            // Requests already buffered wait only for room in the pipeline,
            // never for more input (the client may be done sending).
            if backlog && !self.closing && pending.len() < settings.max_pipeline {
                continue;
            }
            if eof && pending.is_empty() && !backlog {
                return;
            }

            let can_read = !eof && !self.closing && pending.len() < settings.max_pipeline;
            let subscribed = self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active);
            let idle = settings
                .idle_timeout
                .filter(|_| pending.is_empty() && !subscribed);
            if inbuf.capacity() - inbuf.len() < 1024 {
                inbuf.reserve(16 * 1024);
            }
            let event = tokio::select! {
                biased;
                resolution = head(pending.front_mut(), &inbox) => Event::Resolved(resolution),
                out = next_pubsub(self.pubsub.as_mut()) => Event::PubSub(out),
                read = reader.read_buf(&mut inbuf), if can_read => Event::Read(read),
                () = sleep_opt(idle) => Event::Idle,
            };
            match event {
                Event::Resolved(Resolution::Wake) => {}
                Event::Resolved(resolution) => self.resolve_head(&mut pending, resolution),
                Event::Read(Ok(0) | Err(_)) => eof = true,
                Event::Read(Ok(_)) => {}
                Event::PubSub(Some(pubsub::Out::Frame(frame))) => out.extend_from_slice(&frame),
                Event::PubSub(Some(pubsub::Out::Close) | None) => {
                    pending.push_back(Pending::Close);
                    self.closing = true;
                }
                Event::Idle => {
                    tracing::debug!("idle timeout");
                    return;
                }
            }
        }
    }

    /// Writes every resolved reply at the head of the queue into `out`.
    /// Returns true when the connection must close now.
    fn drain(&mut self, pending: &mut VecDeque<Pending>, out: &mut BytesMut) -> bool {
        // One clock read for every reply this drain writes.
        let mut now: Option<Instant> = None;
        loop {
            let resolution = match pending.front_mut() {
                None => return false,
                Some(Pending::Close) => return true,
                Some(Pending::Ready(..)) => None,
                Some(Pending::Upstream { seq, .. }) => match self.inbox.take(*seq) {
                    Some(result) => Some(Resolution::Upstream(result)),
                    None => return false,
                },
                Some(Pending::Task(rx, _)) => match rx.try_recv() {
                    Ok(raw) => Some(Resolution::Task(raw)),
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                    Err(oneshot::error::TryRecvError::Closed) => Some(Resolution::Task(
                        reply::error("ERR redirector: internal task failed"),
                    )),
                },
            };
            if let Some(resolution) = resolution {
                self.resolve_head(pending, resolution);
                continue;
            }
            if let Some(Pending::Ready(raw, meta)) = pending.pop_front() {
                if let Some(meta) = meta {
                    let now = *now.get_or_insert_with(Instant::now);
                    let ok = !matches!(raw.first(), Some(b'-' | b'!'));
                    self.metric_cache[meta.metric].1.record(ok);
                    self.shared.metrics.latency(now - meta.started);
                }
                out.extend_from_slice(&raw);
            }
        }
    }

    fn resolve_head(&mut self, pending: &mut VecDeque<Pending>, resolution: Resolution) {
        let Some(front) = pending.pop_front() else {
            return;
        };
        let resolved = match (front, resolution) {
            (Pending::Upstream { routed, meta, .. }, Resolution::Upstream(result)) => {
                match exec::judge_one(result, routed.target.readonly) {
                    exec::Verdict::Done(reply) => Pending::Ready(reply.raw, Some(meta)),
                    verdict => {
                        let shared = Arc::clone(&self.shared);
                        Pending::Task(
                            spawn_reply(
                                async move { exec::complete(shared, routed, verdict).await },
                            ),
                            Some(meta),
                        )
                    }
                }
            }
            (Pending::Task(_, meta), Resolution::Task(raw)) => Pending::Ready(raw, meta),
            (other, _) => other,
        };
        pending.push_front(resolved);
    }

    /// Parses and dispatches buffered requests until none is complete or
    /// the pipeline is full. Returns true when it stopped at the limit with
    /// bytes left, which the caller parses as soon as there is room.
    fn parse_and_dispatch(
        &mut self,
        inbuf: &mut BytesMut,
        pending: &mut VecDeque<Pending>,
        settings: &super::Settings,
    ) -> bool {
        let backlog = self.parse_requests(inbuf, pending, settings);
        self.flush_batch();
        backlog
    }

    fn parse_requests(
        &mut self,
        inbuf: &mut BytesMut,
        pending: &mut VecDeque<Pending>,
        settings: &super::Settings,
    ) -> bool {
        self.read_at = Instant::now();
        while pending.len() < settings.max_pipeline && !self.closing {
            match request::parse(inbuf, &settings.limits) {
                Ok(Parsed::Request(req)) => self.dispatch(req, pending),
                Ok(Parsed::Incomplete { needed }) => {
                    if needed > 0 {
                        inbuf.reserve(needed);
                    }
                    return false;
                }
                Err(e) => {
                    // As Redis: reply with the protocol error, then close.
                    self.shared.metrics.protocol_error();
                    tracing::debug!(error = %e, "malformed request");
                    pending.push_back(Pending::Ready(reply::error(&format!("ERR {e}")), None));
                    pending.push_back(Pending::Close);
                    self.closing = true;
                    inbuf.clear();
                    return false;
                }
            }
        }
        // Stopped at the pipeline limit: complete requests may remain.
        !self.closing && !inbuf.is_empty()
    }

    /// This session's counters for a command name (few distinct names per
    /// client: a short scan beats the shared map and its locking).
    fn metric_index(&mut self, name: &[u8]) -> usize {
        if let Some(i) = self.metric_cache.iter().position(|(n, _)| &n[..] == name) {
            return i;
        }
        self.metric_cache
            .push((name.into(), self.shared.metrics.command(name)));
        self.metric_cache.len() - 1
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            id: self.id,
            protocol: self.protocol,
            name: self.name.as_ref(),
            peer: self.peer,
            local: self.local,
            advertised: self.advertised,
            user: &self.user,
        }
    }

    fn dispatch(&mut self, req: Request, pending: &mut VecDeque<Pending>) {
        self.shared.count_command();
        let shared = Arc::clone(&self.shared);
        let info = shared.commands.lookup(&req.args);
        let mut lower = [0u8; 32];
        let name_len = req.args[0].len();
        let name: &[u8] = if name_len <= lower.len() {
            lower[..name_len].copy_from_slice(&req.args[0]);
            lower[..name_len].make_ascii_lowercase();
            &lower[..name_len]
        } else {
            UNKNOWN_COMMAND
        };
        let metric_name = if info.is_some() {
            name
        } else {
            UNKNOWN_COMMAND
        };
        let meta = Meta {
            started: self.read_at,
            metric: self.metric_index(metric_name),
        };
        let ready = |pending: &mut VecDeque<Pending>, raw: Bytes, meta: Meta| {
            pending.push_back(Pending::Ready(raw, Some(meta)));
        };

        if !self.authed && !matches!(name, b"auth" | b"hello" | b"quit" | b"reset") {
            return ready(pending, reply::error(NOAUTH), meta);
        }
        if self.multi.is_some()
            && !matches!(
                name,
                b"exec" | b"discard" | b"multi" | b"watch" | b"quit" | b"reset"
            )
        {
            let raw = self.queue_in_multi(req, info);
            return ready(pending, raw, meta);
        }
        let subscribed = self.pubsub.as_ref().is_some_and(pubsub::Handle::is_active);
        if subscribed
            && self.protocol == Protocol::Resp2
            && !pubsub::handles(name)
            && !matches!(name, b"ping" | b"quit" | b"reset")
        {
            let raw = reply::error(&format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                String::from_utf8_lossy(name)
            ));
            return ready(pending, raw, meta);
        }

        match name {
            b"ping" => ready(pending, local::ping(&req, self.protocol, subscribed), meta),
            b"echo" => ready(pending, local::echo(&req, self.protocol), meta),
            b"time" => ready(pending, local::time(self.protocol), meta),
            b"select" => ready(pending, local::select(&req), meta),
            b"quit" => {
                ready(pending, reply::ok(), meta);
                pending.push_back(Pending::Close);
                self.closing = true;
            }
            b"auth" => {
                let raw = self.auth(&req);
                ready(pending, raw, meta);
            }
            b"hello" => {
                let raw = self.hello(&req);
                ready(pending, raw, meta);
            }
            b"reset" => {
                self.reset();
                ready(pending, Bytes::from_static(b"+RESET\r\n"), meta);
            }
            b"readonly" | b"readwrite" | b"asking" => ready(pending, reply::ok(), meta),
            b"client" => match local::client(&req, &self.caller()) {
                local::ClientCommand::Reply(raw) => ready(pending, raw, meta),
                local::ClientCommand::SetName(name) => {
                    self.name = Some(name);
                    ready(pending, reply::ok(), meta);
                }
            },
            b"cluster" => match local::cluster(&req, &self.caller()) {
                Some(raw) => ready(pending, raw, meta),
                None => {
                    // COUNTKEYSINSLOT / GETKEYSINSLOT <slot>: to its owner.
                    let slot = req
                        .args
                        .get(2)
                        .and_then(|s| std::str::from_utf8(s).ok())
                        .and_then(|s| s.parse::<u16>().ok())
                        .filter(|&s| usize::from(s) < slot::SLOTS);
                    match slot {
                        Some(slot) => self.route(req, Some(slot), true, pending, meta),
                        None => ready(pending, reply::error("ERR Invalid slot"), meta),
                    }
                }
            },
            b"info" => {
                let section = req
                    .args
                    .get(1)
                    .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
                let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
                let rx = spawn_raw(async move { local::info(shared, protocol, section).await });
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
            b"multi" => {
                let raw = if self.multi.is_some() {
                    reply::error("ERR MULTI calls can not be nested")
                } else {
                    self.multi = Some(txn::Queued::default());
                    reply::ok()
                };
                ready(pending, raw, meta);
            }
            b"exec" => match self.multi.take() {
                None => ready(pending, reply::error("ERR EXEC without MULTI"), meta),
                Some(queued) => {
                    let (prev, next) = self.next_baton();
                    let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
                    let rx =
                        spawn_raw(
                            async move { txn::exec(shared, protocol, prev, next, queued).await },
                        );
                    pending.push_back(Pending::Task(rx, Some(meta)));
                }
            },
            b"discard" => match self.multi.take() {
                None => ready(pending, reply::error("ERR DISCARD without MULTI"), meta),
                Some(_) => {
                    let (prev, next) = self.next_baton();
                    let rx = spawn_raw(async move { txn::unwatch(prev, next).await });
                    pending.push_back(Pending::Task(rx, Some(meta)));
                }
            },
            b"watch" => self.watch(req, info, pending, meta),
            b"unwatch" => {
                let (prev, next) = self.next_baton();
                let rx = spawn_raw(async move { txn::unwatch(prev, next).await });
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
            name if pubsub::handles(name) => {
                let handle = self
                    .pubsub
                    .get_or_insert_with(|| pubsub::start(Arc::clone(&self.shared), self.protocol));
                handle.send(req);
                // Replies come from the subscription connections.
                self.metric_cache[meta.metric].1.record(true);
            }
            b"dbsize" => self.fan_out(req, exec::FanOut::SumIntegers, pending, meta),
            b"keys" => self.fan_out(req, exec::FanOut::ConcatArrays, pending, meta),
            b"flushall" | b"flushdb" => self.fan_out(req, exec::FanOut::First, pending, meta),
            b"script" => {
                let how = if req.arg_is(1, "exists") {
                    exec::FanOut::AndArrays
                } else {
                    exec::FanOut::First
                };
                self.fan_out(req, how, pending, meta);
            }
            b"function" => {
                let everywhere = ["load", "delete", "flush", "restore", "kill"]
                    .iter()
                    .any(|sub| req.arg_is(1, sub));
                if everywhere {
                    self.fan_out(req, exec::FanOut::First, pending, meta);
                } else {
                    self.route(req, None, true, pending, meta);
                }
            }
            b"scan" => {
                let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
                let rx = spawn_raw(async move { exec::scan(shared, protocol, req).await });
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
            b"mget" => self.split(req, Merge::Values, true, pending, meta),
            b"mset" => self.split(req, Merge::AllOk, false, pending, meta),
            b"del" | b"unlink" | b"touch" => self.split(req, Merge::Sum, false, pending, meta),
            b"exists" => self.split(req, Merge::Sum, true, pending, meta),
            b"wait" => {
                let slot = self.last_write_slot;
                self.blocking(req, slot, pending, meta);
            }
            b"monitor" | b"sync" | b"psync" | b"replicaof" | b"slaveof" | b"shutdown"
            | b"swapdb" | b"move" | b"failover" | b"debug" => {
                let what = String::from_utf8_lossy(name).to_uppercase();
                ready(pending, local::unsupported(&what), meta);
            }
            _ => self.keyed(req, info, pending, meta),
        }
    }

    fn next_baton(&mut self) -> (Option<txn::Baton>, txn::BatonTx) {
        let (tx, rx) = txn::baton();
        (self.baton.replace(rx), tx)
    }

    fn auth(&mut self, req: &Request) -> Bytes {
        let auth = &self.shared.settings.auth;
        let (user, password) = match req.args.len() {
            2 => (None, &req.args[1]),
            3 => (Some(&req.args[1][..]), &req.args[2]),
            _ => return local::wrong_arity("auth"),
        };
        if !auth.required() {
            return reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        }
        if auth.check(user, password) {
            self.authed = true;
            self.user = user.map_or_else(
                || "default".into(),
                |u| String::from_utf8_lossy(u).into_owned(),
            );
            reply::ok()
        } else {
            reply::error("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    fn hello(&mut self, req: &Request) -> Bytes {
        let mut protocol = self.protocol;
        if let Some(version) = req.args.get(1) {
            protocol = match &version[..] {
                b"2" => Protocol::Resp2,
                b"3" => Protocol::Resp3,
                _ => return reply::error("NOPROTO unsupported protocol version"),
            };
        }
        let mut i = 2;
        let mut name = None;
        while i < req.args.len() {
            if req.arg_is(i, "auth") && i + 2 < req.args.len() {
                let auth = &self.shared.settings.auth;
                if !auth.check(Some(&req.args[i + 1]), &req.args[i + 2]) {
                    return reply::error(
                        "WRONGPASS invalid username-password pair or user is disabled.",
                    );
                }
                self.authed = true;
                self.user = String::from_utf8_lossy(&req.args[i + 1]).into_owned();
                i += 3;
            } else if req.arg_is(i, "setname") && i + 1 < req.args.len() {
                name = Some(req.args[i + 1].clone());
                i += 2;
            } else {
                return reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&req.args[i])
                ));
            }
        }
        if !self.authed {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if name.is_some() {
            self.name = name;
        }
        if protocol != self.protocol {
            self.conns.clear();
        }
        self.protocol = protocol;
        local::hello_reply(&self.shared, &self.caller())
    }

    fn reset(&mut self) {
        self.multi = None;
        if self.baton.is_some() {
            let (prev, next) = self.next_baton();
            tokio::spawn(async move { txn::unwatch(prev, next).await });
        }
        self.pubsub = None;
        self.protocol = Protocol::Resp2;
        self.conns.clear();
        self.name = None;
        self.authed = !self.shared.settings.auth.required();
        self.user = "default".into();
    }

    /// A command between MULTI and EXEC: checked, then queued.
    fn queue_in_multi(&mut self, req: Request, info: Option<&CommandInfo>) -> Bytes {
        let (slot, refusal) = match keys_slot(&req, info) {
            Ok(slot) => (slot, None),
            Err(e) => (None, Some(e)),
        };
        let queued = self.multi.as_mut().expect("in MULTI");
        if let Some(refusal) = refusal {
            queued.dirty = true;
            return refusal;
        }
        match queued.push(req, slot) {
            Ok(()) => Bytes::from_static(b"+QUEUED\r\n"),
            Err(e) => e,
        }
    }

    /// Any other command: routed by its keys.
    fn keyed(
        &mut self,
        req: Request,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let Some(info) = info else {
            // Unknown to the cluster too: let Redis answer with its error.
            return self.route(req, None, false, pending, meta);
        };
        let flags = info.flags;
        let slot = match keys_slot(&req, Some(info)) {
            Ok(slot) => slot,
            Err(raw) => return pending.push_back(Pending::Ready(raw, Some(meta))),
        };
        let readonly = flags.contains(Flags::READONLY) && !flags.contains(Flags::WRITE);
        if flags.contains(Flags::WRITE) {
            self.last_write_slot = slot.or(self.last_write_slot);
        }
        if flags.contains(Flags::BLOCKING) && may_block(&req) {
            return self.blocking(req, slot, pending, meta);
        }
        self.route(req, slot, readonly, pending, meta);
    }
}

/// The one slot of a command's keys (`None`: no keys), or the error reply
/// Redis would give (unknown command, arity, CROSSSLOT).
fn keys_slot(req: &Request, info: Option<&CommandInfo>) -> Result<Option<u16>, Bytes> {
    {
        let Some(info) = info else {
            let name = String::from_utf8_lossy(&req.args[0]);
            return Err(reply::error(&format!(
                "ERR unknown command '{name}', with args beginning with: "
            )));
        };
        if !info.arity_ok(req.args.len()) {
            return Err(local::wrong_arity(&info.name));
        }
        // Fixed key positions (most commands): walk them without building
        // an index list. Movable keys need the key specs.
        let fixed = !info.flags.contains(Flags::MOVABLEKEYS) && info.first_key > 0;
        if fixed {
            let argc = req.args.len() as i64;
            let last = if info.last_key < 0 {
                argc + info.last_key
            } else {
                info.last_key
            };
            let step = info.step.max(1) as usize;
            let (first, last) = (info.first_key as usize, last.min(argc - 1).max(0) as usize);
            let mut slots = (first..=last)
                .step_by(step)
                .map(|i| slot::slot(&req.args[i]));
            let Some(head) = slots.next() else {
                return Ok(None);
            };
            if slots.any(|s| s != head) {
                return Err(reply::error(CROSSSLOT));
            }
            return Ok(Some(head));
        }
        let keys = info
            .key_indices(&req.args)
            .or_else(|_| info.key_indices_partial(&req.args))
            .unwrap_or_default();
        let mut slots = keys.iter().map(|&i| slot::slot(&req.args[i]));
        let Some(first) = slots.next() else {
            return Ok(None);
        };
        if slots.any(|s| s != first) {
            return Err(reply::error(CROSSSLOT));
        }
        Ok(Some(first))
    }
}

impl Session {
    /// The hot path: one command to one node on a shared connection.
    fn route(
        &mut self,
        req: Request,
        slot: Option<u16>,
        readonly: bool,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let routed = Routed {
            payload: req.raw,
            target: Target { slot, readonly },
            protocol: self.protocol,
        };
        if self.view.version != self.shared.topology.version() {
            self.view = self.shared.topology.view();
        }
        match exec::pick(&self.shared, &self.view, routed.target) {
            Ok(node) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                match self.batch.iter_mut().find(|(n, ..)| *n == node) {
                    Some((_, payload, seqs)) => {
                        payload.extend_from_slice(&routed.payload);
                        seqs.push(seq);
                    }
                    None => {
                        let payload = BytesMut::from(&routed.payload[..]);
                        self.batch.push((node, payload, vec![seq]));
                    }
                }
                pending.push_back(Pending::Upstream { seq, routed, meta });
            }
            Err(e) => {
                // No owner right now: wait for the topology like a retry.
                let shared = Arc::clone(&self.shared);
                let first = exec::Verdict::Retry {
                    reply: Reply::local(e),
                };
                let rx = spawn_reply(async move { exec::complete(shared, routed, first).await });
                pending.push_back(Pending::Task(rx, Some(meta)));
            }
        }
    }

    /// Sends what this read routed: one job per node, carrying every
    /// command for that node in request order, on this client's cached
    /// shared connection to it.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.inbox.open_until(self.next_seq);
        for (node, payload, seqs) in std::mem::take(&mut self.batch) {
            let job = Job {
                payload: payload.freeze(),
                replies: seqs.len(),
                sink: Sink::Inbox {
                    inbox: Arc::clone(&self.inbox),
                    seqs,
                },
            };
            let cached = self
                .conns
                .iter()
                .position(|(addr, conn)| *addr == node && !conn.is_closed());
            let conn = match cached {
                Some(i) => &self.conns[i].1,
                None => {
                    self.conns
                        .retain(|(addr, conn)| *addr != node && !conn.is_closed());
                    let conn = self.shared.pools.node(node, self.protocol).conn();
                    self.conns.push((node, conn));
                    &self.conns[self.conns.len() - 1].1
                }
            };
            if let Err(job) = conn.send(job) {
                job.fail(super::UpstreamError::NotSent(
                    node,
                    "connection closed".into(),
                ));
            }
        }
    }

    fn fan_out(
        &mut self,
        req: Request,
        how: exec::FanOut,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        let rx = spawn_raw(async move { exec::fan_out(shared, protocol, req, how).await });
        pending.push_back(Pending::Task(rx, Some(meta)));
    }

    /// MGET/MSET/DEL/UNLINK/EXISTS/TOUCH: one command when the keys share a
    /// slot, else one per slot, merged.
    fn split(
        &mut self,
        req: Request,
        merge: Merge,
        readonly: bool,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let name = String::from_utf8_lossy(&req.args[0]).to_ascii_lowercase();
        let step = if merge == Merge::AllOk { 2 } else { 1 };
        let argc = req.args.len();
        if argc < 2 || (step == 2 && argc.is_multiple_of(2)) {
            return pending.push_back(Pending::Ready(local::wrong_arity(&name), Some(meta)));
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for i in (1..argc).step_by(step) {
            let s = slot::slot(&req.args[i]);
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, keys)) => keys.push(i),
                None => groups.push((s, vec![i])),
            }
        }
        if !readonly {
            self.last_write_slot = groups.last().map(|(s, _)| *s);
        }
        if groups.len() == 1 {
            return self.route(req, Some(groups[0].0), readonly, pending, meta);
        }
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        let rx =
            spawn_raw(
                async move { exec::split(shared, protocol, req, groups, merge, readonly).await },
            );
        pending.push_back(Pending::Task(rx, Some(meta)));
    }

    fn watch(
        &mut self,
        req: Request,
        info: Option<&CommandInfo>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        if self.multi.is_some() {
            let raw = reply::error("ERR WATCH inside MULTI is not allowed");
            return pending.push_back(Pending::Ready(raw, Some(meta)));
        }
        let slot = match keys_slot(&req, info) {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                return pending.push_back(Pending::Ready(local::wrong_arity("watch"), Some(meta)));
            }
            Err(raw) => return pending.push_back(Pending::Ready(raw, Some(meta))),
        };
        let (prev, next) = self.next_baton();
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        let rx =
            spawn_raw(async move { txn::watch(shared, protocol, prev, next, req, slot).await });
        pending.push_back(Pending::Task(rx, Some(meta)));
    }

    /// A command that may block runs on a leased connection, so it never
    /// holds up a shared one.
    fn blocking(
        &mut self,
        req: Request,
        slot: Option<u16>,
        pending: &mut VecDeque<Pending>,
        meta: Meta,
    ) {
        let (shared, protocol) = (Arc::clone(&self.shared), self.protocol);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let work = blocking_call(shared, protocol, req, slot);
            tokio::pin!(work);
            let mut tx = tx;
            tokio::select! {
                raw = &mut work => { let _ = tx.send(raw); }
                // The client left: dropping the call closes the leased
                // connection, which is what unblocks Redis.
                () = tx.closed() => {}
            }
        });
        pending.push_back(Pending::Task(rx, Some(meta)));
    }
}

async fn blocking_call(
    shared: Arc<Shared>,
    protocol: Protocol,
    req: Request,
    slot: Option<u16>,
) -> Bytes {
    for _ in 0..=shared.settings.max_redirects {
        let view = shared.topology.view();
        let node = match exec::pick(
            &shared,
            &view,
            Target {
                slot,
                readonly: false,
            },
        ) {
            Ok(node) => node,
            Err(e) => return e,
        };
        let pool = shared.pools.node(node, protocol);
        let mut lease = match pool.lease().await {
            Ok(lease) => lease,
            Err(e) => {
                shared.topology.request_refresh();
                return reply::error(&format!("ERR redirector: {e}"));
            }
        };
        match lease.call(&req.raw, 1).await {
            Ok(mut replies) => {
                pool.release(lease);
                let Some(reply) = replies.pop() else {
                    return reply::error("ERR empty reply");
                };
                match exec::judge_one(Ok(reply), false) {
                    exec::Verdict::Redirect {
                        slot,
                        addr,
                        asking: false,
                        ..
                    } => {
                        shared.topology.moved(slot, addr);
                        continue;
                    }
                    exec::Verdict::Done(reply)
                    | exec::Verdict::Retry { reply }
                    | exec::Verdict::Redirect { reply, .. } => return reply.raw,
                }
            }
            Err(e) => {
                pool.forget();
                return reply::error(&format!("ERR redirector: {e}"));
            }
        }
    }
    reply::error("TRYAGAIN the slot keeps moving")
}

/// XREAD/XREADGROUP only block with BLOCK (before STREAMS); the rest of the
/// `blocking` commands always may.
fn may_block(req: &Request) -> bool {
    let name = req.name_lower();
    if name != b"xread" && name != b"xreadgroup" {
        return true;
    }
    req.args
        .iter()
        .take_while(|a| !a.eq_ignore_ascii_case(b"streams"))
        .any(|a| a.eq_ignore_ascii_case(b"block"))
}

fn spawn_raw(work: impl Future<Output = Bytes> + Send + 'static) -> oneshot::Receiver<Bytes> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(work.await);
    });
    rx
}

fn spawn_reply(work: impl Future<Output = Reply> + Send + 'static) -> oneshot::Receiver<Bytes> {
    spawn_raw(async move { work.await.raw })
}

async fn head(front: Option<&mut Pending>, inbox: &Inbox) -> Resolution {
    match front {
        Some(Pending::Upstream { .. }) => {
            inbox.wait().await;
            Resolution::Wake
        }
        Some(Pending::Task(rx, _)) => Resolution::Task(
            rx.await
                .unwrap_or_else(|_| reply::error("ERR redirector: internal task failed")),
        ),
        _ => std::future::pending().await,
    }
}

async fn next_pubsub(handle: Option<&mut pubsub::Handle>) -> Option<pubsub::Out> {
    match handle {
        Some(handle) => handle.out.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
