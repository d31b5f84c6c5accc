//! AUTH in ACL passthrough: Redis itself checks a client's user and
//! password, on a connection of its own. When Redis accepts them the
//! session runs as that user, over the user's pools; when it refuses, the
//! client gets Redis's own words and its address's next AUTH waits longer
//! (see [`super::acl`] for the decisions, made there without I/O).

use std::{net::IpAddr, sync::Arc};

use bytes::Bytes;

use super::{
    Shared, UpstreamError,
    acl::{self, DryRun},
    clients::KillFilter,
    dial::UpstreamAuth,
    exec,
    lease::Leased,
};
use crate::resp::{Protocol, reply, request};

/// Credentials as the client gave them (`AUTH pass` has no user).
pub struct Credentials {
    pub user: Option<Bytes>,
    pub password: Bytes,
}

/// A login Redis accepted.
pub struct Accepted {
    /// The session's handle as this user (none: it keeps its own).
    pub shared: Option<Arc<Shared>>,
    pub user: String,
}

enum CheckError {
    /// Redis answered the AUTH with this error.
    Refused(String),
    /// Redis could not be asked.
    Unreachable(UpstreamError),
}

/// Waits as long as the client's address must, then has Redis check the
/// credentials (unless it accepted the same ones moments ago).
pub async fn passthrough(
    shared: Arc<Shared>,
    ip: IpAddr,
    credentials: Credentials,
) -> Result<Accepted, Bytes> {
    let delay = shared.logins.delay(ip);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let user: &[u8] = credentials.user.as_deref().unwrap_or(b"default");
    // Connections are opened with these again later: the dialer takes text.
    let (Ok(user_name), Ok(password)) = (
        std::str::from_utf8(user),
        std::str::from_utf8(&credentials.password),
    ) else {
        return Err(reply::error(
            "ERR redirector: user names and passwords must be UTF-8",
        ));
    };
    let fingerprint = acl::fingerprint(user, &credentials.password);
    let mut checked = None;
    if !shared.logins.is_fresh(user, &credentials.password) {
        match check(&shared, &credentials).await {
            Ok(lease) => checked = Some(lease),
            Err(CheckError::Refused(message)) => {
                shared.logins.failed(ip);
                return Err(reply::error(&message));
            }
            Err(CheckError::Unreachable(e)) => {
                return Err(reply::error(&format!(
                    "ERR redirector: cannot have Redis check the credentials: {e}"
                )));
            }
        }
        shared.logins.remember(user, fingerprint);
    }
    let me = shared.as_user(
        fingerprint,
        UpstreamAuth {
            user: Some(user_name.to_owned()),
            password: password.to_owned(),
        },
    );
    // The checking connection is the user's now: a warm lease.
    if let Some(lease) = checked {
        shared.metrics.upstream_opened(lease.addr);
        me.pools.node(lease.addr, Protocol::Resp2).release(lease);
    }
    Ok(Accepted {
        shared: Some(me),
        user: user_name.to_owned(),
    })
}

/// Sends the client's AUTH, as it gave it, on a new connection without
/// credentials to the master of slot 0. Accepted: that connection, now
/// authenticated as the user.
async fn check(shared: &Shared, credentials: &Credentials) -> Result<Leased, CheckError> {
    let view = shared.topology.view();
    let node = view
        .shard(0)
        .map(|s| s.master)
        .or_else(|| view.masters().next())
        .ok_or_else(|| {
            CheckError::Unreachable(UpstreamError::Connect(
                std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                "no master known".into(),
            ))
        })?;
    // Not the cluster handshake: READONLY would come before the AUTH (a
    // lease to a master needs none).
    let dialer = super::Dialer {
        auth: None,
        cluster: false,
        ..(**shared.pools.dialer()).clone()
    };
    let mut lease = Leased::open(&dialer, node, Protocol::Resp2)
        .await
        .map_err(CheckError::Unreachable)?;
    let mut auth = vec![Bytes::from_static(b"AUTH")];
    auth.extend(credentials.user.iter().cloned());
    auth.push(credentials.password.clone());
    let replies = lease
        .call(&request::encode(&auth), 1)
        .await
        .map_err(CheckError::Unreachable)?;
    if let Some(message) = replies.first().and_then(|r| r.error_message()) {
        return Err(CheckError::Refused(
            String::from_utf8_lossy(message).into_owned(),
        ));
    }
    Ok(lease)
}

/// Whether `user` may run the command `args` (named `name` in the
/// command table), by Redis's ACL: `ACL DRYRUN` on the user's own
/// connection (an answer when the user may ask it), else on a connection
/// of the proxy's own identity. Without an answer, no. `CLIENT KILL USER
/// name` also needs the user to exist, as Redis has it.
pub async fn permitted(
    shared: Arc<Shared>,
    user: String,
    args: Vec<Bytes>,
    name: String,
) -> Result<(), Bytes> {
    let view = shared.topology.view();
    let Some(node) = view
        .shard(0)
        .map(|s| s.master)
        .or_else(|| view.masters().next())
    else {
        return Err(reply::error("CLUSTERDOWN Hash slot not served"));
    };
    let killed_user = (name == "client|kill")
        .then(|| {
            KillFilter::parse(args.get(2..).unwrap_or_default())
                .ok()?
                .user
        })
        .flatten();
    let mut command = vec![Bytes::from(user.clone())];
    command.extend(args);
    match dry_run(&shared, node, command).await {
        DryRun::Allowed => {}
        DryRun::Denied => return Err(reply::error(&acl::no_permission(&name))),
        DryRun::Unknown(why) => {
            return Err(reply::error(&format!(
                "NOPERM redirector: cannot tell whether user '{user}' may run '{name}' (ACL DRYRUN: {why})"
            )));
        }
    }
    if let Some(killed) = killed_user {
        let probe = vec![Bytes::from(killed.clone()), Bytes::from_static(b"PING")];
        if let DryRun::Unknown(why) = dry_run(&shared, node, probe).await
            && why.contains("not found")
        {
            return Err(reply::error(&format!("ERR No such user '{killed}'")));
        }
    }
    Ok(())
}

/// `ACL DRYRUN` with `command` (the user first) as the client's own
/// identity, else as the proxy's.
async fn dry_run(shared: &Arc<Shared>, node: std::net::SocketAddr, command: Vec<Bytes>) -> DryRun {
    let mut args = vec![Bytes::from_static(b"ACL"), Bytes::from_static(b"DRYRUN")];
    args.extend(command);
    let payload = request::encode(&args);
    let verdict = |replies: Result<Vec<reply::Reply>, UpstreamError>| match replies {
        Ok(replies) => replies.first().map_or_else(
            || DryRun::Unknown("no reply".into()),
            |r| acl::dry_run(&r.raw),
        ),
        Err(e) => DryRun::Unknown(e.to_string()),
    };
    let own = exec::send(shared, None, Protocol::Resp2, node, payload.clone(), 1).await;
    let answer = verdict(
        own.unwrap_or_else(|_| Err(UpstreamError::NotSent(node, "connection closed".into()))),
    );
    if !matches!(answer, DryRun::Unknown(_)) {
        return answer;
    }
    // The user may not ask (or its connection failed): the proxy asks.
    let asked = async {
        let mut lease = Leased::open(&shared.control, node, Protocol::Resp2).await?;
        lease.call(&payload, 1).await
    };
    verdict(asked.await)
}
