//! Transactions: MULTI/EXEC/DISCARD/WATCH/UNWATCH.
//!
//! Between MULTI and EXEC commands are checked and queued by the session
//! (replying `QUEUED`), so a client thinking inside a transaction holds no
//! upstream connection. EXEC then runs `MULTI ... EXEC` in one write on a
//! connection leased from the owner's warm pool. WATCH must share that
//! connection, so it leases one at once and keeps it until EXEC, DISCARD
//! or UNWATCH.
//!
//! The WATCH state travels between the (asynchronous) transaction steps as
//! a baton: each step waits for the previous step's baton and hands the
//! state on, so pipelined `WATCH k` / `MULTI` / ... / `EXEC` run in order.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::{Shared, client_cmd, exec, lease::Leased, pool::NodePool};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
    request::{self, Request},
    value::Value,
};

const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";
const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// A watched connection.
pub struct Watch {
    pool: Arc<NodePool>,
    lease: Leased,
    slot: u16,
}

pub type Baton = oneshot::Receiver<Option<Watch>>;
pub type BatonTx = oneshot::Sender<Option<Watch>>;

pub fn baton() -> (BatonTx, Baton) {
    oneshot::channel()
}

async fn take(prev: Option<Baton>) -> Option<Watch> {
    match prev {
        Some(rx) => rx.await.unwrap_or(None),
        None => None,
    }
}

/// The commands between MULTI and EXEC.
#[derive(Debug, Default)]
pub struct Queued {
    pub commands: Vec<Request>,
    /// The slot every key so far hashes to.
    pub slot: Option<u16>,
    /// A command was refused while queueing: EXEC must abort.
    pub dirty: bool,
    /// A queued command writes: CLIENT PAUSE WRITE holds the EXEC.
    pub writes: bool,
    /// Positions of commands the proxy runs itself when EXEC reaches them
    /// (CLIENT PAUSE): the node's transaction goes without them.
    pub at_exec: Vec<usize>,
}

impl Queued {
    /// Adds a checked command; `Err` is the error reply (and the transaction
    /// is then dirty).
    pub fn push(&mut self, req: Request, slot: Option<u16>, writes: bool) -> Result<(), Bytes> {
        if let Some(slot) = slot {
            match self.slot {
                Some(current) if current != slot => {
                    self.dirty = true;
                    return Err(reply::error(CROSSSLOT));
                }
                _ => self.slot = Some(slot),
            }
        }
        self.writes |= writes;
        if client_cmd::runs_at_exec(&req) {
            self.at_exec.push(self.commands.len());
        }
        self.commands.push(req);
        Ok(())
    }
}

/// EXEC's array with the replies of the proxy's own commands put in
/// their places, run as EXEC reaches them; a nil or error EXEC (a WATCH
/// that fired, an abort) runs none of them.
fn with_own_replies(shared: &Shared, protocol: Protocol, queued: &Queued, exec: Reply) -> Bytes {
    if queued.at_exec.is_empty() {
        return exec.raw;
    }
    let Some(Value::Array(node_replies)) = Value::decode(&exec.raw, protocol) else {
        return exec.raw;
    };
    let mut node_replies = node_replies.into_iter();
    let mut raws: Vec<Bytes> = Vec::with_capacity(queued.commands.len());
    for (i, command) in queued.commands.iter().enumerate() {
        if queued.at_exec.contains(&i) {
            raws.push(client_cmd::run_at_exec(command, shared));
        } else if let Some(value) = node_replies.next() {
            raws.push(value.encode(protocol));
        }
    }
    reply::build(protocol, |e| {
        e.array(raws.len());
        for raw in &raws {
            e.raw(raw);
        }
    })
}

fn master_pool(
    shared: &Shared,
    protocol: Protocol,
    slot: Option<u16>,
) -> Result<Arc<NodePool>, Bytes> {
    let view = shared.topology.view();
    let node = match slot {
        Some(slot) => view.shard(slot).map(|s| s.master),
        None => view.masters().next(),
    }
    .ok_or_else(|| reply::error("CLUSTERDOWN Hash slot not served"))?;
    Ok(shared.pools.node(node, protocol))
}

fn redirect_in(replies: &[Reply]) -> Option<(u16, std::net::SocketAddr)> {
    replies.iter().find_map(|r| {
        let (slot, addr, _asking) = exec::parse_redirect(r.error_message()?)?;
        Some((slot, addr))
    })
}

async fn release_watch(watch: Option<Watch>) {
    if let Some(mut watch) = watch {
        let unwatch = request::encode(&[Bytes::from_static(b"UNWATCH")]);
        if watch.lease.call(&unwatch, 1).await.is_ok() {
            watch.pool.release(watch.lease);
        } else {
            watch.pool.forget();
        }
    }
}

/// `WATCH key ...` (all keys in `slot`).
pub async fn watch(
    shared: Arc<Shared>,
    protocol: Protocol,
    prev: Option<Baton>,
    next: BatonTx,
    req: Request,
    slot: u16,
) -> Bytes {
    let mut state = take(prev).await;
    if let Some(w) = &state
        && w.slot != slot
    {
        let _ = next.send(state);
        return reply::error(CROSSSLOT);
    }
    for _ in 0..3 {
        let mut watch = match state.take() {
            Some(watch) => watch,
            None => {
                let pool = match master_pool(&shared, protocol, Some(slot)) {
                    Ok(pool) => pool,
                    Err(e) => {
                        let _ = next.send(None);
                        return e;
                    }
                };
                match pool.lease().await {
                    Ok(lease) => Watch { pool, lease, slot },
                    Err(e) => {
                        let _ = next.send(None);
                        return reply::error(&format!("ERR redirector: {e}"));
                    }
                }
            }
        };
        match watch.lease.call(req.raw(), 1).await {
            Ok(replies) => {
                if let Some((moved_slot, addr)) = redirect_in(&replies) {
                    // The slot moved: watch on the new owner instead. Keys
                    // watched earlier on this connection stay behind, so
                    // only a first WATCH can move.
                    shared.topology.moved(moved_slot, addr);
                    release_watch(Some(watch)).await;
                    continue;
                }
                let reply = replies.into_iter().next_back().map(|r| r.raw);
                let _ = next.send(Some(watch));
                return reply.unwrap_or_else(|| reply::error("ERR empty reply"));
            }
            Err(e) => {
                watch.pool.forget();
                let _ = next.send(None);
                return reply::error(&format!("ERR redirector: {e}"));
            }
        }
    }
    let _ = next.send(None);
    reply::error("TRYAGAIN the watched slot keeps moving")
}

/// `UNWATCH`, and DISCARD's unwatching.
pub async fn unwatch(prev: Option<Baton>, next: BatonTx) -> Bytes {
    release_watch(take(prev).await).await;
    let _ = next.send(None);
    reply::ok()
}

/// `EXEC` of a queued transaction. EXEC always ends the WATCH; the next
/// step only starts once this transaction is done.
pub async fn exec(
    shared: Arc<Shared>,
    protocol: Protocol,
    prev: Option<Baton>,
    next: BatonTx,
    queued: Queued,
) -> Bytes {
    let watch = take(prev).await;
    let reply = run_exec(shared, protocol, watch, queued).await;
    let _ = next.send(None);
    reply
}

async fn run_exec(
    shared: Arc<Shared>,
    protocol: Protocol,
    mut watch: Option<Watch>,
    queued: Queued,
) -> Bytes {
    if queued.dirty {
        release_watch(watch).await;
        return reply::error(EXECABORT);
    }
    if let (Some(w), Some(slot)) = (&watch, queued.slot)
        && w.slot != slot
    {
        release_watch(watch).await;
        return reply::error(CROSSSLOT);
    }
    let slot = queued.slot.or(watch.as_ref().map(|w| w.slot));
    let mut payload = BytesMut::new();
    request::encode_into(&mut payload, &[Bytes::from_static(b"MULTI")]);
    for (i, command) in queued.commands.iter().enumerate() {
        if !queued.at_exec.contains(&i) {
            payload.extend_from_slice(command.raw());
        }
    }
    request::encode_into(&mut payload, &[Bytes::from_static(b"EXEC")]);
    let payload = payload.freeze();
    let replies_expected = queued.commands.len() - queued.at_exec.len() + 2;

    for _ in 0..=shared.settings.max_redirects {
        let (pool, mut lease, watched) = match watch.take() {
            Some(w) => (w.pool, w.lease, true),
            None => {
                let pool = match master_pool(&shared, protocol, slot) {
                    Ok(pool) => pool,
                    Err(e) => return e,
                };
                match pool.lease().await {
                    Ok(lease) => (pool, lease, false),
                    Err(e) => return reply::error(&format!("ERR redirector: {e}")),
                }
            }
        };
        let replies = match lease.call(&payload, replies_expected).await {
            Ok(replies) => replies,
            Err(e) => {
                pool.forget();
                return reply::error(&format!(
                    "ERR redirector: {e}; the transaction may or may not have run"
                ));
            }
        };
        // EXEC answered (EXECABORT when a queued command was redirected),
        // so the connection is clean and the WATCH is gone either way.
        pool.release(lease);
        if let Some((moved_slot, addr)) = redirect_in(&replies[1..replies.len() - 1]) {
            shared.topology.moved(moved_slot, addr);
            if watched {
                // The watched keys' slot moved: as if they were touched.
                return reply::build(protocol, |e| match protocol {
                    Protocol::Resp2 => e.raw(b"*-1\r\n"),
                    Protocol::Resp3 => e.null(),
                });
            }
            continue;
        }
        return match replies.into_iter().next_back() {
            Some(exec) => with_own_replies(&shared, protocol, &queued, exec),
            None => reply::error("ERR empty reply"),
        };
    }
    reply::error("TRYAGAIN the transaction's slot keeps moving")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Request {
        Request::from_args(
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn queued_commands_must_share_a_slot() {
        let mut q = Queued::default();
        assert!(q.push(req(&["SET", "a", "1"]), Some(7), true).is_ok());
        assert!(q.push(req(&["PING"]), None, false).is_ok());
        assert!(q.push(req(&["GET", "a"]), Some(7), false).is_ok());
        assert!(!q.dirty);
        let err = q.push(req(&["GET", "b"]), Some(8), false).unwrap_err();
        assert!(err.starts_with(b"-CROSSSLOT"));
        assert!(q.dirty);
        assert_eq!(q.commands.len(), 3);
    }

    #[test]
    fn a_pause_queued_in_multi_is_the_proxys_to_run_at_exec() {
        let mut q = Queued::default();
        q.push(req(&["SET", "a", "1"]), Some(7), true).unwrap();
        q.push(req(&["client", "PAUSE", "100", "WRITE"]), None, false)
            .unwrap();
        q.push(req(&["SET", "a", "2"]), Some(7), true).unwrap();
        q.push(req(&["CLIENT", "unpause"]), None, false).unwrap();
        q.push(req(&["CLIENT", "SETNAME", "x"]), None, false)
            .unwrap();
        assert_eq!(q.at_exec, [1, 3]);
    }
}
