//! `CLIENT ...` as Redis answers it, for this proxy's own clients: the
//! registry ([`super::clients`]) is the server's client list. Error texts
//! and reply shapes follow Redis 7.0's `clientCommand` (networking.c).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{
    AuthMode, Shared,
    clients::{ClientEntry, KillFilter, PauseMode, flags},
    exec,
    plan::{self, wrong_arity},
    session::ReplyMode,
    tracking::{self, Switch},
};
use crate::resp::{Protocol, reply, request::Request};

/// What the session needs to carry out a CLIENT command.
pub struct Context<'a> {
    pub shared: &'a Arc<Shared>,
    pub entry: &'a Arc<ClientEntry>,
    pub protocol: Protocol,
    pub reply_mode: &'a mut ReplyMode,
    pub tracking: &'a mut Option<Box<tracking::Handle>>,
}

/// A CLIENT command's outcome.
pub enum Outcome {
    Reply(Bytes),
    /// Written even under CLIENT REPLY OFF (CLIENT REPLY ON's OK).
    Loud(Bytes),
    /// No reply at all (CLIENT REPLY OFF/SKIP).
    Silent,
    /// The reply comes later (it needs the nodes).
    Task(oneshot::Receiver<Bytes>),
    /// Reply, then close this connection (CLIENT KILL of oneself).
    ReplyThenClose(Bytes),
}

const HELP: &[&str] = &[
    "CACHING (YES|NO)",
    "    Enable/disable tracking of the keys for next command in OPTIN/OPTOUT modes.",
    "GETREDIR",
    "    Return the client ID we are redirecting to when tracking is enabled.",
    "GETNAME",
    "    Return the name of the current connection.",
    "ID",
    "    Return the ID of the current connection.",
    "INFO",
    "    Return information about the current client connection.",
    "KILL <ip:port>",
    "    Kill connection made from <ip:port>.",
    "KILL <option> <value> [<option> <value> [...]]",
    "    Kill connections. Options are:",
    "    * ADDR (<ip:port>|<unixsocket>:0)",
    "      Kill connections made from the specified address",
    "    * LADDR (<ip:port>|<unixsocket>:0)",
    "      Kill connections made to specified local address",
    "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
    "      Kill connections by type.",
    "    * USER <username>",
    "      Kill connections authenticated by <username>.",
    "    * SKIPME (YES|NO)",
    "      Skip killing current connection (default: yes).",
    "LIST [options ...]",
    "    Return information about client connections. Options:",
    "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
    "      Return clients of specified type.",
    "UNPAUSE",
    "    Stop the current client pause, resuming traffic.",
    "PAUSE <timeout> [WRITE|ALL]",
    "    Suspend all, or just write, clients for <timeout> milliseconds.",
    "REPLY (ON|OFF|SKIP)",
    "    Control the replies sent to the current connection.",
    "SETNAME <name>",
    "    Assign the name <name> to the current connection.",
    "UNBLOCK <clientid> [TIMEOUT|ERROR]",
    "    Unblock the specified blocked client.",
    "TRACKING (ON|OFF) [REDIRECT <id>] [BCAST] [PREFIX <prefix> [...]]",
    "         [OPTIN] [OPTOUT] [NOLOOP]",
    "    Control server assisted client side caching.",
    "TRACKINGINFO",
    "    Report tracking status for the current connection.",
    "NO-EVICT (ON|OFF)",
    "    Protect current client connection from eviction.",
];

pub fn client(req: &Request, cx: &mut Context<'_>) -> Outcome {
    let protocol = cx.protocol;
    let Some(sub) = req.args().get(1).map(|s| s.to_ascii_lowercase()) else {
        return Outcome::Reply(wrong_arity("client"));
    };
    // The server's table knows the subcommands and their arity.
    match plan::lookup(&cx.shared.commands, req) {
        Some(info) if info.name.contains('|') => {
            if !info.arity_ok(req.argc()) {
                return Outcome::Reply(wrong_arity(&info.name));
            }
        }
        _ if sub == b"help" => {}
        _ => {
            return Outcome::Reply(reply::error(&format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&req.args()[1])
                    .chars()
                    .take(128)
                    .collect::<String>()
            )));
        }
    }
    let arg = |i: usize| req.args().get(i).map(|a| a.to_ascii_lowercase());
    let entry = cx.entry;
    let int = |n: i64| reply::build(protocol, |e| e.integer(n));
    let raw = match sub.as_slice() {
        b"help" => reply::build(protocol, |e| {
            e.array(HELP.len() + 3);
            e.simple("CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
            for line in HELP {
                e.simple(line);
            }
            e.simple("HELP");
            e.simple("    Prints this help.");
        }),
        b"id" => int(i64::try_from(entry.id).unwrap_or(i64::MAX)),
        b"getname" => reply::build(protocol, |e| match entry.name() {
            Some(name) => e.bulk(&name),
            None => e.null(),
        }),
        b"setname" => {
            let name = &req.args()[2];
            if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                )
            } else {
                entry.set_name((!name.is_empty()).then(|| name.clone()));
                reply::ok()
            }
        }
        b"info" => reply::build(protocol, |e| e.verbatim(&format!("{}\n", entry.line()))),
        b"list" => list(req, cx.shared, protocol),
        b"kill" => return kill(req, cx.shared, entry, protocol),
        b"reply" => {
            match arg(2).as_deref() {
                Some(b"on") => {
                    *cx.reply_mode = ReplyMode::On;
                    return Outcome::Loud(reply::ok());
                }
                Some(b"off") => *cx.reply_mode = ReplyMode::Off,
                Some(b"skip") => {
                    if *cx.reply_mode != ReplyMode::Off {
                        *cx.reply_mode = ReplyMode::Skip;
                    }
                }
                _ => return Outcome::Reply(reply::error("ERR syntax error")),
            }
            return Outcome::Silent;
        }
        b"no-evict" => match arg(2).as_deref() {
            Some(b"on") => {
                entry.set_flag(flags::NO_EVICT, true);
                reply::ok()
            }
            Some(b"off") => {
                entry.set_flag(flags::NO_EVICT, false);
                reply::ok()
            }
            _ => reply::error("ERR syntax error"),
        },
        b"pause" => pause(req, cx.shared),
        b"unpause" => {
            cx.shared.clients.unpause();
            reply::ok()
        }
        b"unblock" => return unblock(req, cx.shared, protocol),
        b"getredir" => int(match cx.tracking {
            Some(handle) => i64::try_from(handle.options.redirect).unwrap_or(-1),
            None => -1,
        }),
        b"tracking" => return tracking(req, cx),
        b"trackinginfo" => tracking_info(cx, protocol),
        b"caching" => caching(req, cx),
        // 7.2's library identification, for the servers that have it.
        b"setinfo" | b"no-touch" => reply::ok(),
        _ => reply::error(&format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&req.args()[1])
        )),
    };
    Outcome::Reply(raw)
}

/// `CLIENT LIST [TYPE type] [ID id ...]`.
fn list(req: &Request, shared: &Shared, protocol: Protocol) -> Bytes {
    let all = shared.clients.all();
    let chosen: Vec<Arc<ClientEntry>> = if req.argc() == 4 && req.arg_is(2, "type") {
        let kind = req.args()[3].to_ascii_lowercase();
        match kind.as_slice() {
            b"normal" => all.into_iter().filter(|c| !c.is_pubsub()).collect(),
            b"pubsub" => all.into_iter().filter(|c| c.is_pubsub()).collect(),
            // No replicas or masters among a proxy's clients.
            b"master" | b"replica" | b"slave" => Vec::new(),
            _ => {
                return reply::error(&format!(
                    "ERR Unknown client type '{}'",
                    String::from_utf8_lossy(&req.args()[3])
                ));
            }
        }
    } else if req.argc() > 3 && req.arg_is(2, "id") {
        let mut out = Vec::new();
        for id in &req.args()[3..] {
            let Some(id) = std::str::from_utf8(id)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            else {
                return reply::error("ERR Invalid client ID");
            };
            if let Some(found) = u64::try_from(id).ok().and_then(|id| shared.clients.get(id)) {
                out.push(found);
            }
        }
        out
    } else if req.argc() != 2 {
        return reply::error("ERR syntax error");
    } else {
        all
    };
    let mut text = String::new();
    for client in chosen {
        text.push_str(&client.line());
        text.push('\n');
    }
    reply::build(protocol, |e| e.verbatim(&text))
}

/// `CLIENT KILL addr` (OK or an error) or `CLIENT KILL filter value ...`
/// (how many were killed). Killing oneself closes after the reply.
fn kill(req: &Request, shared: &Shared, me: &ClientEntry, protocol: Protocol) -> Outcome {
    let filter = match KillFilter::parse(&req.args()[2..]) {
        Ok(filter) => filter,
        Err(e) => return Outcome::Reply(reply::error(e)),
    };
    // The proxy knows its own users only; in passthrough they are Redis's.
    if let Some(user) = &filter.user
        && shared.settings.auth_mode == AuthMode::Proxy
        && !shared.settings.auth.has_user(user)
    {
        return Outcome::Reply(reply::error(&format!("ERR No such user '{user}'")));
    }
    let mut killed = 0;
    let mut myself = false;
    for client in shared.clients.all() {
        if !filter.matches(&client, me.id) {
            continue;
        }
        if client.id == me.id {
            myself = true;
        } else {
            client.kill();
        }
        killed += 1;
    }
    let raw = if filter.legacy {
        if killed == 0 {
            reply::error("ERR No such client")
        } else {
            reply::ok()
        }
    } else {
        reply::build(protocol, |e| e.integer(killed))
    };
    if myself {
        Outcome::ReplyThenClose(raw)
    } else {
        Outcome::Reply(raw)
    }
}

/// Whether a CLIENT command queued in MULTI is the proxy's to run at EXEC
/// (a pause of this proxy's clients), rather than the node's.
pub fn runs_at_exec(req: &Request) -> bool {
    req.arg_is(0, "client") && (req.arg_is(1, "pause") || req.arg_is(1, "unpause"))
}

/// Runs a command [`runs_at_exec`] chose, as EXEC reaches it: a pause
/// queued in a transaction starts when the transaction ends.
pub fn run_at_exec(req: &Request, shared: &Shared) -> Bytes {
    if req.arg_is(1, "pause") {
        pause(req, shared)
    } else {
        shared.clients.unpause();
        reply::ok()
    }
}

/// `CLIENT PAUSE timeout [WRITE|ALL]`: holds this proxy's clients.
fn pause(req: &Request, shared: &Shared) -> Bytes {
    let mode = match req.args().get(3).map(|m| m.to_ascii_lowercase()).as_deref() {
        None | Some(b"all") => PauseMode::All,
        Some(b"write") => PauseMode::Write,
        Some(_) => return reply::error("ERR CLIENT PAUSE mode must be WRITE or ALL"),
    };
    let Some(ms) = std::str::from_utf8(&req.args()[2])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return reply::error("ERR timeout is not an integer or out of range");
    };
    let Ok(ms) = u64::try_from(ms) else {
        return reply::error("ERR timeout is negative");
    };
    shared
        .clients
        .pause(mode, Instant::now() + Duration::from_millis(ms));
    reply::ok()
}

/// `CLIENT UNBLOCK id [TIMEOUT|ERROR]`: the blocked command's node is asked
/// to unblock the proxy's connection that carries it.
fn unblock(req: &Request, shared: &Arc<Shared>, protocol: Protocol) -> Outcome {
    let error = match req.args().get(3).map(|m| m.to_ascii_lowercase()).as_deref() {
        None | Some(b"timeout") => false,
        Some(b"error") => true,
        Some(_) => {
            return Outcome::Reply(reply::error(
                "ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR",
            ));
        }
    };
    let Some(id) = std::str::from_utf8(&req.args()[2])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return Outcome::Reply(reply::error("ERR value is not an integer or out of range"));
    };
    let zero = || Outcome::Reply(reply::build(protocol, |e| e.integer(0)));
    let Some(target) = u64::try_from(id).ok().and_then(|id| shared.clients.get(id)) else {
        return zero();
    };
    let Some((node, upstream_id)) = target.blocked_on() else {
        return zero();
    };
    let payload = crate::resp::request::encode(&[
        Bytes::from_static(b"CLIENT"),
        Bytes::from_static(b"UNBLOCK"),
        Bytes::from(upstream_id.to_string()),
        Bytes::from_static(if error { b"ERROR" } else { b"TIMEOUT" }),
    ]);
    let rx = exec::send(shared, None, protocol, node, payload, 1);
    let (tx, out) = oneshot::channel();
    tokio::spawn(async move {
        let raw = match exec::await_job(rx, node).await {
            Ok(mut replies) => replies
                .pop()
                .map_or_else(|| reply::error("ERR empty reply"), |r| r.raw),
            Err(e) => reply::error(&format!("ERR redirector: {e}")),
        };
        let _ = tx.send(raw);
    });
    Outcome::Task(out)
}

/// `CLIENT TRACKING on|off ...`.
fn tracking(req: &Request, cx: &mut Context<'_>) -> Outcome {
    let shared = cx.shared;
    let current = cx.tracking.as_ref().map(|h| &h.options);
    let switch = tracking::parse(&req.args()[2..], current, |id| {
        shared.clients.get(id).is_some()
    });
    let options = match switch {
        Err(e) => return Outcome::Reply(reply::error(&e)),
        Ok(Switch::Off) => {
            *cx.tracking = None;
            cx.entry.set_flag(flags::TRACKING, false);
            cx.entry.set_flag(flags::TRACKING_BROKEN_REDIR, false);
            cx.entry.set_redirect(0);
            return Outcome::Reply(reply::ok());
        }
        Ok(Switch::On(options)) => options,
    };
    cx.entry.set_redirect(options.redirect);
    cx.entry.set_flag(flags::TRACKING, true);
    let answer = match cx.tracking {
        Some(handle) => handle.reconfigure(shared, options),
        None => {
            let (handle, answer) =
                tracking::Handle::start(shared, cx.entry.id, cx.protocol, options);
            *cx.tracking = Some(Box::new(handle));
            answer
        }
    };
    Outcome::Task(answer)
}

/// `CLIENT TRACKINGINFO`.
fn tracking_info(cx: &Context<'_>, protocol: Protocol) -> Bytes {
    let broken = cx.entry.has_flag(flags::TRACKING_BROKEN_REDIR);
    let (flags, redirect, prefixes): (Vec<&str>, i64, Vec<Bytes>) = match &cx.tracking {
        Some(handle) => (
            handle.flags(broken),
            i64::try_from(handle.options.redirect).unwrap_or(-1),
            // BCAST without PREFIX tracks the empty prefix, every key.
            if handle.options.bcast && handle.options.prefixes.is_empty() {
                vec![Bytes::new()]
            } else {
                handle.options.prefixes.iter().cloned().collect()
            },
        ),
        None => (vec!["off"], -1, Vec::new()),
    };
    reply::build(protocol, |e| {
        e.map(3);
        e.bulk(b"flags");
        e.set(flags.len());
        for flag in flags {
            e.bulk(flag.as_bytes());
        }
        e.bulk(b"redirect");
        e.integer(redirect);
        e.bulk(b"prefixes");
        e.array(prefixes.len());
        for prefix in prefixes {
            e.bulk(&prefix);
        }
    })
}

/// `CLIENT CACHING yes|no`: for the next command, in OPTIN/OPTOUT mode.
fn caching(req: &Request, cx: &mut Context<'_>) -> Bytes {
    let Some(handle) = cx.tracking.as_mut() else {
        return reply::error(
            "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
        );
    };
    match req.args()[2].to_ascii_lowercase().as_slice() {
        b"yes" if handle.options.optin => handle.set_caching(true),
        b"yes" => {
            return reply::error(
                "ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.",
            );
        }
        b"no" if handle.options.optout => handle.set_caching(false),
        b"no" => {
            return reply::error(
                "ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.",
            );
        }
        _ => return reply::error("ERR syntax error"),
    }
    reply::ok()
}
