//! Client-side caching (CLIENT TRACKING) for this proxy's clients.
//!
//! Redis tracks keys per connection and orders invalidations with the
//! replies of that connection. A tracking client therefore gets private
//! connections, one per master, each with tracking on and the client's own
//! options (BCAST and its prefixes, OPTIN/OPTOUT, NOLOOP): Redis decides
//! exactly what to invalidate, and invalidations arrive in order with the
//! replies. They reach the client:
//! - in RESP3 without REDIRECT, as the pushes they are, on its own
//!   connection;
//! - with REDIRECT, through a private listener connection per master (the
//!   upstream redirect target), forwarded to the proxy client the client
//!   named: a push for a RESP3 one, a `__redis__:invalidate` message for a
//!   RESP2 one in pub/sub mode, `tracking-redir-broken` once it is gone.
//!
//! A command that was redirected or retried (a slot moved, a master failed
//! over) may have read through another connection: the client is then
//! told to flush its whole cache (a null invalidation), which is always
//! correct. The validation of CLIENT TRACKING's options, and the flags
//! CLIENT TRACKINGINFO prints, follow Redis's own (networking.c).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, clients::flags, jobs::Job, upstream::Conn};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
    request,
    value::Value,
};

/// The channel RESP2 redirect targets receive invalidations on.
pub const INVALIDATE_CHANNEL: &[u8] = b"__redis__:invalidate";

/// CLIENT TRACKING's options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub redirect: u64,
    pub bcast: bool,
    pub optin: bool,
    pub optout: bool,
    pub noloop: bool,
    pub prefixes: BTreeSet<Bytes>,
}

/// What `CLIENT TRACKING` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Switch {
    On(Options),
    Off,
}

/// Parses `CLIENT TRACKING on|off [REDIRECT id] [BCAST] [PREFIX p]...
/// [OPTIN] [OPTOUT] [NOLOOP]` (the arguments after TRACKING), checking
/// what Redis checks before enabling, against the `current` options.
pub fn parse(
    args: &[Bytes],
    current: Option<&Options>,
    client_exists: impl Fn(u64) -> bool,
) -> Result<Switch, String> {
    let mut options = Options::default();
    let mut new_prefixes: Vec<Bytes> = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let word = args[i].to_ascii_lowercase();
        let more = i + 1 < args.len();
        match word.as_slice() {
            b"redirect" if more => {
                i += 1;
                if options.redirect != 0 {
                    return Err("ERR A client can only redirect to a single other client".into());
                }
                let id: i64 = std::str::from_utf8(&args[i])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or("ERR value is not an integer or out of range")?;
                let id = u64::try_from(id).unwrap_or(0);
                if !client_exists(id) {
                    return Err("ERR The client ID you want redirect to does not exist".into());
                }
                options.redirect = id;
            }
            b"bcast" => options.bcast = true,
            b"optin" => options.optin = true,
            b"optout" => options.optout = true,
            b"noloop" => options.noloop = true,
            b"prefix" if more => {
                i += 1;
                new_prefixes.push(args[i].clone());
            }
            _ => return Err("ERR syntax error".into()),
        }
        i += 1;
    }
    match args.first().map(|a| a.to_ascii_lowercase()).as_deref() {
        Some(b"off") => return Ok(Switch::Off),
        Some(b"on") => {}
        _ => return Err("ERR syntax error".into()),
    }
    if !options.bcast && !new_prefixes.is_empty() {
        return Err("ERR PREFIX option requires BCAST mode to be enabled".into());
    }
    if let Some(current) = current
        && current.bcast != options.bcast
    {
        return Err("ERR You can't switch BCAST mode on/off before disabling tracking for this client, and then re-enabling it with a different mode.".into());
    }
    if options.bcast && (options.optin || options.optout) {
        return Err("ERR OPTIN and OPTOUT are not compatible with BCAST".into());
    }
    if options.optin && options.optout {
        return Err("ERR You can't specify both OPTIN mode and OPTOUT mode".into());
    }
    if let Some(current) = current
        && ((options.optin && current.optout) || (options.optout && current.optin))
    {
        return Err("ERR You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, and then re-enabling it with a different mode.".into());
    }
    if options.bcast {
        let existing: Vec<Bytes> = current
            .map(|c| c.prefixes.iter().cloned().collect())
            .unwrap_or_default();
        for (n, prefix) in new_prefixes.iter().enumerate() {
            if let Some(old) = existing.iter().find(|old| overlaps(old, prefix)) {
                return Err(format!(
                    "ERR Prefix '{}' overlaps with an existing prefix '{}'. Prefixes for a single client must not overlap.",
                    String::from_utf8_lossy(prefix),
                    String::from_utf8_lossy(old)
                ));
            }
            if let Some(other) = new_prefixes[n + 1..].iter().find(|o| overlaps(prefix, o)) {
                return Err(format!(
                    "ERR Prefix '{}' overlaps with another provided prefix '{}'. Prefixes for a single client must not overlap.",
                    String::from_utf8_lossy(prefix),
                    String::from_utf8_lossy(other)
                ));
            }
        }
        options.prefixes = existing.into_iter().chain(new_prefixes).collect();
    }
    // Redis keeps earlier flags when tracking is enabled again (it adds),
    // but takes the redirect as given (none: none).
    if let Some(current) = current {
        options.noloop |= current.noloop;
        options.optin |= current.optin;
        options.optout |= current.optout;
    }
    Ok(Switch::On(options))
}

/// Whether one prefix is a prefix of the other.
fn overlaps(a: &[u8], b: &[u8]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// A tracking client's state.
pub struct Handle {
    client: u64,
    pub options: Options,
    /// CLIENT CACHING yes/no, for the next command.
    caching: Option<bool>,
    conns: Arc<PrivateConns>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// A tracking client's private connections, one per node it used, each
/// with tracking on in the client's options. Commands of the client (and
/// the per-slot parts of its split commands) run on them, so Redis tracks
/// exactly what the client read.
pub struct PrivateConns {
    /// The client's protocol, for connections opened from now on.
    protocol: Mutex<Protocol>,
    /// The client's options, for connections opened from now on.
    options: Mutex<Options>,
    pushes: mpsc::UnboundedSender<Reply>,
    conns: Mutex<Vec<(SocketAddr, Conn)>>,
    /// Upstream client ids of the redirect listeners, by node.
    listeners: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    /// Setup tasks, which also own the redirect listeners.
    setups: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PrivateConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateConns")
            .field("options", &self.options())
            .finish_non_exhaustive()
    }
}

impl Drop for PrivateConns {
    fn drop(&mut self) {
        for setup in self
            .setups
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            setup.abort();
        }
    }
}

impl PrivateConns {
    fn new(protocol: Protocol, options: Options, pushes: mpsc::UnboundedSender<Reply>) -> Self {
        Self {
            protocol: Mutex::new(protocol),
            options: Mutex::new(options),
            pushes,
            conns: Mutex::new(Vec::new()),
            listeners: Arc::new(Mutex::new(HashMap::new())),
            setups: Mutex::new(Vec::new()),
        }
    }

    fn protocol(&self) -> Protocol {
        *self.protocol.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn options(&self) -> Options {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn live(&self) -> Vec<(SocketAddr, Conn)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|(_, c)| !c.is_closed());
        conns.clone()
    }

    /// The private connection to `node`, opened on first use (a master
    /// that appeared after tracking started, a replica the read policy
    /// picked).
    pub fn conn(&self, shared: &Arc<Shared>, node: SocketAddr) -> Conn {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, conn)) = conns.iter().find(|(n, c)| *n == node && !c.is_closed()) {
            return conn.clone();
        }
        conns.retain(|(n, c)| *n != node && !c.is_closed());
        drop(conns);
        self.open(shared, node).0
    }

    /// Opens the private connection to `node`. Its first job (tracking on,
    /// redirected to the node's listener for a client that redirects)
    /// goes out before any command; the receiver gets Redis's answer.
    fn open(&self, shared: &Arc<Shared>, node: SocketAddr) -> (Conn, oneshot::Receiver<Bytes>) {
        let (first, first_rx) = oneshot::channel();
        let pools = &shared.pools;
        let parts = (
            Arc::clone(pools.dialer()),
            Arc::clone(pools.metrics()),
            Arc::clone(pools.health()),
        );
        let conn = Conn::spawn_private(node, self.protocol(), parts, self.pushes.clone(), first_rx);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((node, conn.clone()));
        let (answer, answer_rx) = oneshot::channel();
        // Redirected invalidations go through a listener whatever the
        // client's protocol, so a later HELLO changes nothing upstream.
        let options = self.options();
        let listen = options.redirect != 0;
        let (shared, pushes) = (Arc::clone(shared), self.pushes.clone());
        let listeners = Arc::clone(&self.listeners);
        let setup = tokio::spawn(async move {
            let listener = if listen {
                match listen_on(&shared, node, pushes).await {
                    Ok(found) => {
                        listeners
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(node, found.0);
                        Some(found)
                    }
                    Err(e) => {
                        let _ = answer.send(reply::error(&e));
                        return;
                    }
                }
            } else {
                None
            };
            let enable =
                enable_payload(&options, listener.as_ref().map(|l| l.0), &options.prefixes);
            let (job, rx) = Job::new(enable, 1);
            let _ = first.send(job);
            let _ = answer.send(first_reply(rx.await));
            // The listener lives as long as this task, which ends with the
            // connections (aborting it aborts the listener too).
            if let Some((_, reading)) = listener {
                let mut reading = AbortOnDrop(reading);
                let _ = (&mut reading.0).await;
            }
        });
        self.setups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(setup);
        (conn, answer_rx)
    }

    /// Sends `payload` (one command) on every live connection; resolves to
    /// the first refusal, or OK.
    fn on_each(
        &self,
        payload: impl Fn(SocketAddr) -> Bytes,
        switch_to: Option<Protocol>,
    ) -> oneshot::Receiver<Bytes> {
        let mut answers = Vec::new();
        for (node, conn) in self.live() {
            let (mut job, rx) = Job::new(payload(node), 1);
            job.switch_to = switch_to;
            if conn.send(job).is_ok() {
                answers.push(rx);
            }
        }
        let (tx, out) = oneshot::channel();
        tokio::spawn(async move {
            let mut result = reply::ok();
            for answer in answers {
                let raw = first_reply(answer.await);
                if raw.first() == Some(&b'-') {
                    result = raw;
                    break;
                }
            }
            let _ = tx.send(result);
        });
        out
    }
}

/// Counts a leased connection closed when dropped.
struct Forget(Arc<super::pool::NodePool>);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0.forget();
    }
}

/// Aborts a task when dropped (a listener when its setup task is).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The one reply of a one-command job, or the error it ended with.
fn first_reply(result: Result<super::jobs::JobResult, oneshot::error::RecvError>) -> Bytes {
    match result {
        Ok(Ok(replies)) => replies
            .into_iter()
            .next()
            .map_or_else(|| reply::error("ERR empty reply"), |r| r.raw),
        Ok(Err(e)) => reply::error(&format!("ERR redirector: {e}")),
        Err(_) => reply::error("ERR redirector: tracking connection failed"),
    }
}

impl Handle {
    /// Turns tracking on for `client`: a private connection to every
    /// master (BCAST invalidations come from anywhere, and Redis checks the
    /// options as it enables them). Usable at once (each connection enables
    /// tracking before any command); the receiver gets CLIENT TRACKING's
    /// reply once every master answered.
    pub fn start(
        shared: &Arc<Shared>,
        client: u64,
        protocol: Protocol,
        options: Options,
    ) -> (Self, oneshot::Receiver<Bytes>) {
        let (pushes, rx) = mpsc::unbounded_channel();
        let forwarder = tokio::spawn(forward(Arc::clone(shared), client, rx));
        let mut handle = Self {
            client,
            options: options.clone(),
            caching: None,
            conns: Arc::new(PrivateConns::new(protocol, options, pushes)),
            forwarder,
        };
        let reply = handle.connect_all(shared);
        (handle, reply)
    }

    /// Opens a private connection to every master; resolves to the first
    /// refusal, or OK.
    fn connect_all(&mut self, shared: &Arc<Shared>) -> oneshot::Receiver<Bytes> {
        let masters: Vec<SocketAddr> = shared.topology.view().masters().collect();
        let answers: Vec<_> = masters
            .into_iter()
            .map(|master| self.conns.open(shared, master).1)
            .collect();
        let (tx, reply) = oneshot::channel();
        tokio::spawn(async move {
            let mut result = reply::ok();
            for answer in answers {
                let raw = answer
                    .await
                    .unwrap_or_else(|_| reply::error("ERR redirector: tracking setup failed"));
                if raw.first() == Some(&b'-') {
                    result = raw;
                    break;
                }
            }
            let _ = tx.send(result);
        });
        reply
    }

    /// Tracking enabled again with other options (Redis adds them, and
    /// so does every node: the new flags and prefixes are sent on each
    /// connection). Starting or stopping to redirect needs listeners set
    /// up or gone: the connections are then reopened, and their closing
    /// tells the client to flush.
    pub fn reconfigure(
        &mut self,
        shared: &Arc<Shared>,
        options: Options,
    ) -> oneshot::Receiver<Bytes> {
        let old = std::mem::replace(&mut self.options, options.clone());
        if (old.redirect == 0) != (options.redirect == 0) {
            self.conns = Arc::new(PrivateConns::new(
                self.conns.protocol(),
                options,
                self.conns.pushes.clone(),
            ));
            return self.connect_all(shared);
        }
        let added: BTreeSet<Bytes> = options
            .prefixes
            .difference(&old.prefixes)
            .cloned()
            .collect();
        let listeners = self
            .conns
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let answer = self.conns.on_each(
            |node| enable_payload(&options, listeners.get(&node).copied(), &added),
            None,
        );
        *self.conns.options.lock().unwrap_or_else(|e| e.into_inner()) = options;
        answer
    }

    pub fn client(&self) -> u64 {
        self.client
    }

    /// The connections the client's commands run on.
    pub fn conns(&self) -> &Arc<PrivateConns> {
        &self.conns
    }

    /// CLIENT CACHING yes/no: for the next command.
    pub fn set_caching(&mut self, yes: bool) {
        self.caching = Some(yes);
    }

    /// The CLIENT CACHING to send before the next command, if any.
    pub fn take_caching(&mut self) -> Option<Bytes> {
        let yes = self.caching.take()?;
        Some(request::encode(&[
            Bytes::from_static(b"CLIENT"),
            Bytes::from_static(b"CACHING"),
            Bytes::from_static(if yes { b"YES" } else { b"NO" }),
        ]))
    }

    /// The client switched protocol (HELLO): its connections switch too,
    /// in place, so what they track stays tracked.
    pub fn set_protocol(&mut self, protocol: Protocol) {
        if protocol == self.conns.protocol() {
            return;
        }
        *self
            .conns
            .protocol
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = protocol;
        let hello = request::encode(&[
            Bytes::from_static(b"HELLO"),
            Bytes::from_static(if protocol == Protocol::Resp3 {
                b"3"
            } else {
                b"2"
            }),
        ]);
        drop(self.conns.on_each(|_| hello.clone(), Some(protocol)));
    }

    /// CLIENT TRACKINGINFO's flags.
    pub fn flags(&self, broken: bool) -> Vec<&'static str> {
        let o = &self.options;
        let mut out = vec!["on"];
        if o.bcast {
            out.push("bcast");
        }
        if o.optin {
            out.push("optin");
            if self.caching == Some(true) {
                out.push("caching-yes");
            }
        }
        if o.optout {
            out.push("optout");
            if self.caching == Some(false) {
                out.push("caching-no");
            }
        }
        if o.noloop {
            out.push("noloop");
        }
        if broken {
            out.push("broken_redirect");
        }
        out
    }
}

/// `CLIENT TRACKING ON` with `o`'s flags and `prefixes` (REDIRECT to the
/// node's listener, if it has one).
fn enable_payload(o: &Options, listener: Option<u64>, prefixes: &BTreeSet<Bytes>) -> Bytes {
    let mut args = vec![
        Bytes::from_static(b"CLIENT"),
        Bytes::from_static(b"TRACKING"),
        Bytes::from_static(b"ON"),
    ];
    if let Some(id) = listener {
        args.push(Bytes::from_static(b"REDIRECT"));
        args.push(Bytes::from(id.to_string()));
    }
    for (on, word) in [
        (o.bcast, "BCAST"),
        (o.optin, "OPTIN"),
        (o.optout, "OPTOUT"),
        (o.noloop, "NOLOOP"),
    ] {
        if on {
            args.push(Bytes::from_static(word.as_bytes()));
        }
    }
    for prefix in prefixes {
        args.push(Bytes::from_static(b"PREFIX"));
        args.push(prefix.clone());
    }
    request::encode(&args)
}

/// A listener on `node` for a RESP2 client that redirects: a RESP3
/// connection the private connection redirects its invalidations to.
/// Returns its upstream client id and the task reading its pushes.
async fn listen_on(
    shared: &Arc<Shared>,
    node: SocketAddr,
    pushes: mpsc::UnboundedSender<Reply>,
) -> Result<(u64, tokio::task::JoinHandle<()>), String> {
    let pool = shared.pools.node(node, Protocol::Resp3);
    let mut lease = pool
        .lease()
        .await
        .map_err(|e| format!("ERR redirector: {e}"))?;
    let id_request = request::encode(&[Bytes::from_static(b"CLIENT"), Bytes::from_static(b"ID")]);
    let replies = lease
        .call(&id_request, 1)
        .await
        .map_err(|e| format!("ERR redirector: {e}"))?;
    let id = match replies.first().map(|r| r.kind) {
        Some(reply::ReplyKind::Integer(id)) => u64::try_from(id).unwrap_or(0),
        _ => return Err("ERR redirector: no client id from the listener".into()),
    };
    let (mut reader, writer) = lease.split();
    let reading = tokio::spawn(async move {
        // The writer must live as long as the listener; the connection is
        // counted closed however the task ends (aborted included).
        let _writer = writer;
        let _closed = Forget(pool);
        while let Ok(frame) = reader.next().await {
            if pushes.send(frame).is_err() {
                return;
            }
        }
        // What it would have forwarded is lost: the client must flush.
        let _ = pushes.send(Reply::local(Bytes::from_static(super::upstream::FLUSH_ALL)));
    });
    Ok((id, reading))
}

/// An invalidation for `keys` (`None`: flush everything), in the form its
/// receiver takes: a RESP3 push, or a RESP2 pub/sub message.
pub fn invalidation(protocol: Protocol, keys: Option<&[Value]>) -> Bytes {
    let mut out = BytesMut::new();
    let mut e = reply::Encoder {
        out: &mut out,
        protocol,
    };
    if protocol == Protocol::Resp2 {
        e.array(3);
        e.bulk(b"message");
        e.bulk(INVALIDATE_CHANNEL);
    } else {
        e.raw(b">2\r\n");
        e.bulk(b"invalidate");
    }
    match keys {
        Some(keys) => {
            e.array(keys.len());
            for key in keys {
                key.write(&mut e);
            }
        }
        None => match protocol {
            Protocol::Resp2 => e.raw(b"*-1\r\n"),
            Protocol::Resp3 => e.null(),
        },
    }
    out.freeze()
}

/// Routes the pushes of a client's private connections: invalidations to
/// the client itself or its redirect target, in the target's protocol.
async fn forward(shared: Arc<Shared>, client: u64, mut pushes: mpsc::UnboundedReceiver<Reply>) {
    while let Some(frame) = pushes.recv().await {
        let Some(items) = Value::decode(&frame.raw, Protocol::Resp3).and_then(Value::into_items)
        else {
            continue;
        };
        // RESP3 push `invalidate [keys]` (or a RESP2 listener's message:
        // `message __redis__:invalidate [keys]`).
        let keys = match items.as_slice() {
            [kind, keys] if kind.as_bytes() == Some(b"invalidate") => keys.clone(),
            [kind, channel, keys]
                if kind.as_bytes() == Some(b"message")
                    && channel.as_bytes() == Some(INVALIDATE_CHANNEL) =>
            {
                keys.clone()
            }
            _ => continue,
        };
        let keys = match keys {
            Value::Array(keys) => Some(keys),
            _ => None,
        };
        deliver(&shared, client, keys.as_deref());
    }
}

/// Sends an invalidation for `client`'s tracking to wherever it goes.
pub fn deliver(shared: &Shared, client: u64, keys: Option<&[Value]>) {
    let Some(me) = shared.clients.get(client) else {
        return;
    };
    let redirect = me.redirect();
    if redirect == 0 {
        if let Some(protocol) = me.protocol_if_resp3() {
            me.push(invalidation(protocol, keys));
        }
        return;
    }
    match shared.clients.get(redirect) {
        Some(target) => {
            let protocol = target.protocol();
            // A RESP2 target gets them only as a subscriber (Redis's rule).
            if protocol == Protocol::Resp3 || target.has_flag(flags::PUBSUB) {
                target.push(invalidation(protocol, keys));
            }
        }
        None => {
            me.set_flag(flags::TRACKING_BROKEN_REDIR, true);
            if let Some(protocol) = me.protocol_if_resp3() {
                me.push(reply::build(protocol, |e| {
                    e.raw(b">2\r\n");
                    e.bulk(b"tracking-redir-broken");
                    e.integer(i64::try_from(redirect).unwrap_or(0));
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_args as args;

    fn on(words: &[&str], current: Option<&Options>) -> Result<Options, String> {
        match parse(&args(words), current, |id| id == 7)? {
            Switch::On(options) => Ok(options),
            Switch::Off => Err("off".into()),
        }
    }

    #[test]
    fn options_are_checked_as_redis_checks_them() {
        let o = on(&["on", "redirect", "7", "noloop"], None).unwrap();
        assert_eq!((o.redirect, o.noloop), (7, true));
        assert_eq!(
            on(&["on", "redirect", "8"], None).unwrap_err(),
            "ERR The client ID you want redirect to does not exist"
        );
        assert!(
            on(&["on", "prefix", "a"], None)
                .unwrap_err()
                .contains("requires BCAST")
        );
        assert!(
            on(&["on", "bcast", "optin"], None)
                .unwrap_err()
                .contains("not compatible with BCAST")
        );
        assert!(
            on(&["on", "optin", "optout"], None)
                .unwrap_err()
                .contains("both OPTIN")
        );
        let err = on(&["on", "bcast", "prefix", "FOOBAR", "prefix", "FOO"], None).unwrap_err();
        assert!(
            err.starts_with("ERR Prefix 'FOOBAR' overlaps with another provided prefix 'FOO'"),
            "{err}"
        );
        let current = on(&["on", "bcast", "prefix", "FOO", "prefix", "BAR"], None).unwrap();
        let err = on(&["on", "bcast", "prefix", "FO"], Some(&current)).unwrap_err();
        assert!(
            err.starts_with("ERR Prefix 'FO' overlaps with an existing prefix 'FOO'"),
            "{err}"
        );
        let added = on(&["on", "bcast", "prefix", "baz"], Some(&current)).unwrap();
        assert_eq!(added.prefixes.len(), 3);
        assert!(
            on(&["on"], Some(&current))
                .unwrap_err()
                .contains("switch BCAST")
        );
        assert_eq!(parse(&args(&["off"]), None, |_| true), Ok(Switch::Off));
        assert!(parse(&args(&["maybe"]), None, |_| true).is_err());
    }

    #[test]
    fn invalidations_take_their_receivers_form() {
        let keys = [Value::Bulk(Bytes::from_static(b"a"))];
        assert_eq!(
            &invalidation(Protocol::Resp3, Some(&keys))[..],
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n"
        );
        assert_eq!(
            &invalidation(Protocol::Resp2, Some(&keys))[..],
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\na\r\n"
        );
        assert_eq!(
            &invalidation(Protocol::Resp3, None)[..],
            b">2\r\n$10\r\ninvalidate\r\n_\r\n"
        );
    }
}
