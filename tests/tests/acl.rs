//! Apps keep their own credentials (ACL passthrough): with no password in
//! the proxy's configuration, a client's `AUTH` is checked by Redis itself
//! and its commands then run on upstream connections authenticated as its
//! own user, so Redis's ACL rules (keys, commands) apply to it. In proxy
//! auth mode, where clients run with the proxy's credentials, @admin and
//! @dangerous commands are refused. Real redis-server, real proxy binary.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use testbed::{TempDir, cluster::RedisCluster, proxy::Proxy, redis::RedisServer, resp::RespClient};

const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// The proxy first, so it stops before the server it fronts.
struct Setup {
    proxy: Proxy,
    server: RedisServer,
    _dir: TempDir,
}

/// A standalone Redis with the users `app` (its own keys, every command)
/// and `ro` (reads only); `default` stays open so the proxy discovers it
/// without a password of its own.
fn setup(extra: &[&str]) -> Setup {
    let dir = TempDir::new("rdr-acl-");
    let server = RedisServer::start_local(dir.path(), &[]);
    add_users(|args| server.cli(args));
    let proxy = Proxy::start_standalone(server.addr(), &[], extra);
    Setup {
        proxy,
        server,
        _dir: dir,
    }
}

fn add_users(cli: impl Fn(&[&str]) -> String) {
    for user in [
        &["ACL", "SETUSER", "app", "on", ">s3cret", "~app:*", "+@all"][..],
        &["ACL", "SETUSER", "ro", "on", ">r0", "~*", "+@read"],
    ] {
        assert_eq!(cli(user).trim(), "OK", "{user:?}");
    }
}

fn connect(addr: SocketAddr) -> RespClient {
    RespClient::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

fn call(c: &mut RespClient, args: &[&str]) -> String {
    c.call_str(args)
        .unwrap_or_else(|e| panic!("{args:?} through the proxy: {e}"))
}

/// A client authenticated as `user`.
fn login(addr: SocketAddr, user: &str, password: &str) -> RespClient {
    let mut c = connect(addr);
    assert_eq!(call(&mut c, &["AUTH", user, password]), "+OK\r\n", "{user}");
    c
}

/// The server's connections authenticated as `user` (its own CLIENT LIST,
/// asked as `default`).
fn connections_of(list: &str, user: &str) -> usize {
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == format!("user={user}")))
        .count()
}

#[test]
fn apps_keep_their_own_credentials() {
    let s = setup(&[]);
    let p = s.proxy.addr();

    // app: its keys, every command; NOPERM elsewhere, in Redis's words.
    let mut app = login(p, "app", "s3cret");
    assert_eq!(call(&mut app, &["SET", "app:1", "v"]), "+OK\r\n");
    assert_eq!(call(&mut app, &["GET", "app:1"]), "$1\r\nv\r\n");
    assert_eq!(call(&mut app, &["ACL", "WHOAMI"]), "$3\r\napp\r\n");
    let denied = call(&mut app, &["SET", "other:1", "v"]);
    assert!(denied.starts_with("-NOPERM"), "{denied}");
    let mut direct = login(s.server.addr(), "app", "s3cret");
    assert_eq!(denied, call(&mut direct, &["SET", "other:1", "v"]));
    drop(direct);

    // ro: reads only.
    let mut ro = login(p, "ro", "r0");
    assert_eq!(call(&mut ro, &["GET", "app:1"]), "$1\r\nv\r\n");
    let denied = call(&mut ro, &["SET", "app:2", "v"]);
    assert!(denied.starts_with("-NOPERM"), "{denied}");
    assert_eq!(call(&mut app, &["GET", "app:2"]), "$-1\r\n");

    // A wrong password: Redis's own error, and the session is unchanged.
    assert_eq!(call(&mut app, &["AUTH", "app", "nope"]), WRONGPASS);
    assert_eq!(call(&mut app, &["ACL", "WHOAMI"]), "$3\r\napp\r\n");
    let mut stranger = connect(p);
    assert_eq!(call(&mut stranger, &["AUTH", "nobody", "x"]), WRONGPASS);
    // `AUTH pass` is the default user's, as Redis has it (no password set).
    let reply = call(&mut stranger, &["AUTH", "x"]);
    assert!(
        reply.starts_with("-ERR AUTH <password> called without any password configured"),
        "{reply}"
    );

    // HELLO 3 AUTH logs in and switches protocol at once.
    let mut hello = connect(p);
    let reply = call(&mut hello, &["HELLO", "3", "AUTH", "app", "nope"]);
    assert_eq!(reply, WRONGPASS);
    let reply = call(&mut hello, &["HELLO", "3", "AUTH", "app", "s3cret"]);
    assert!(reply.starts_with('%'), "{reply}");
    assert_eq!(call(&mut hello, &["GET", "app:1"]), "$1\r\nv\r\n");
    assert!(call(&mut hello, &["GET", "other:1"]).starts_with("-NOPERM"));

    // What the proxy answers itself, Redis's ACL still gates: ro may not
    // list or kill clients, app may.
    for command in [
        &["CLIENT", "LIST"][..],
        &["CLIENT", "KILL", "USER", "app"],
        &["MONITOR"],
        &["SLOWLOG", "GET"],
    ] {
        let reply = call(&mut ro, command);
        assert!(
            reply.starts_with("-NOPERM this user has no permissions to run the '"),
            "{command:?}: {reply}"
        );
    }
    let list = call(&mut app, &["CLIENT", "LIST"]);
    assert!(list.contains("user=ro"), "{list}");

    // Upstream, each user has connections of its own.
    let list = s.server.cli(&["CLIENT", "LIST"]);
    assert!(connections_of(&list, "app") >= 1, "{list}");
    assert!(connections_of(&list, "ro") >= 1, "{list}");

    // RESET: back to the unauthenticated client (the open default user).
    assert_eq!(call(&mut app, &["RESET"]), "+RESET\r\n");
    assert_eq!(call(&mut app, &["ACL", "WHOAMI"]), "$7\r\ndefault\r\n");
    assert_eq!(call(&mut app, &["SET", "other:1", "v"]), "+OK\r\n");

    // AUTH inside MULTI would switch a leased connection's user.
    assert_eq!(call(&mut ro, &["MULTI"]), "+OK\r\n");
    assert!(call(&mut ro, &["AUTH", "app", "s3cret"]).starts_with("-ERR"));
    assert!(call(&mut ro, &["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(call(&mut ro, &["ACL", "WHOAMI"]), "$2\r\nro\r\n");
}

#[test]
fn a_changed_password_holds_at_once() {
    let s = setup(&[]);
    let p = s.proxy.addr();
    drop(login(p, "app", "s3cret"));
    // Changed through the proxy: the check it remembers is forgotten.
    let mut admin = connect(p);
    let reply = call(&mut admin, &["ACL", "SETUSER", "app", "resetpass", ">n3w"]);
    assert_eq!(reply, "+OK\r\n");
    assert_eq!(call(&mut connect(p), &["AUTH", "app", "s3cret"]), WRONGPASS);
    let mut app = login(p, "app", "n3w");
    assert_eq!(call(&mut app, &["SET", "app:k", "1"]), "+OK\r\n");
}

#[test]
fn a_client_never_gets_the_proxys_rights() {
    // The proxy has an admin identity of its own (for discovery), and the
    // default user needs a password: a client that has not authenticated
    // is served without credentials, so Redis refuses it.
    let dir = TempDir::new("rdr-acl-");
    let server = RedisServer::start_local(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    add_users(cli);
    assert_eq!(
        cli(&[
            "ACL", "SETUSER", "admin", "on", ">adm1n", "~*", "&*", "+@all"
        ])
        .trim(),
        "OK"
    );
    assert_eq!(
        cli(&["CONFIG", "SET", "requirepass", "d3fault"]).trim(),
        "OK"
    );
    let proxy = Proxy::start_standalone(
        server.addr(),
        &[],
        &[
            "--auth-mode",
            "passthrough",
            "--upstream-user",
            "admin",
            "--upstream-password",
            "adm1n",
        ],
    );
    let mut c = connect(proxy.addr());
    let reply = call(&mut c, &["GET", "app:1"]);
    assert!(reply.starts_with("-NOAUTH"), "{reply}");
    let reply = call(&mut c, &["CONFIG", "SET", "requirepass", "x"]);
    assert!(reply.starts_with("-NOAUTH"), "{reply}");
    // Its own user's rights, once it logs in.
    assert_eq!(call(&mut c, &["AUTH", "app", "s3cret"]), "+OK\r\n");
    assert_eq!(call(&mut c, &["SET", "app:1", "v"]), "+OK\r\n");
    let reply = call(&mut c, &["CONFIG", "SET", "requirepass", "x"]);
    // app has +@all: Redis lets it, as it would directly; then back.
    assert_eq!(reply, "+OK\r\n");
    assert_eq!(
        call(&mut c, &["CONFIG", "SET", "requirepass", "d3fault"]),
        "+OK\r\n"
    );
    let mut ro = login(proxy.addr(), "ro", "r0");
    assert!(call(&mut ro, &["CONFIG", "GET", "requirepass"]).starts_with("-NOPERM"));
    assert!(call(&mut ro, &["FLUSHALL"]).starts_with("-NOPERM"));
    assert_eq!(call(&mut ro, &["GET", "app:1"]), "$1\r\nv\r\n");
    drop(proxy);
}

#[test]
fn a_hundred_clients_of_one_user_share_a_few_connections() {
    let s = setup(&[]);
    let p = s.proxy.addr();
    // One connection per request, one after the other (PHP-FPM)...
    for i in 0..100 {
        let mut c = login(p, "app", "s3cret");
        let key = format!("app:seq:{i}");
        assert_eq!(call(&mut c, &["SET", &key, "1"]), "+OK\r\n");
    }
    // ...and a hundred at once.
    let workers: Vec<_> = (0..100)
        .map(|i| {
            thread::spawn(move || {
                let mut c = login(p, "app", "s3cret");
                let key = format!("app:par:{i}");
                assert_eq!(call(&mut c, &["SET", &key, "1"]), "+OK\r\n");
                assert_eq!(call(&mut c, &["GET", &key]), "$1\r\n1\r\n");
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("client thread");
    }
    let list = s.server.cli(&["CLIENT", "LIST"]);
    let upstream = connections_of(&list, "app");
    assert!(
        (1..=10).contains(&upstream),
        "{upstream} upstream connections for 200 clients of app:\n{list}"
    );
}

#[test]
fn repeated_wrong_passwords_are_slowed_down() {
    let s = setup(&[]);
    let mut c = connect(s.proxy.addr());
    let mut took = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        assert_eq!(call(&mut c, &["AUTH", "app", "guess"]), WRONGPASS);
        took.push(started.elapsed());
    }
    assert!(
        took[5] >= took[0] + Duration::from_millis(300),
        "the 6th failure took {:?}, the 1st {:?}: {took:?}",
        took[5],
        took[0]
    );
    // The right password waits as long (its speed would tell), then works.
    let started = Instant::now();
    assert_eq!(call(&mut c, &["AUTH", "app", "s3cret"]), "+OK\r\n");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(call(&mut c, &["SET", "app:k", "v"]), "+OK\r\n");
}

#[test]
fn proxy_mode_refuses_admin_commands_and_keeps_serving() {
    let dir = TempDir::new("rdr-acl-");
    let server = RedisServer::start_local(dir.path(), &[]);
    assert_eq!(
        server.cli(&["CONFIG", "SET", "requirepass", "up"]).trim(),
        "OK"
    );
    let proxy = Proxy::start_standalone(server.addr(), &[], &["--upstream-password", "up"]);
    let mut c = connect(proxy.addr());
    let reply = call(&mut c, &["CONFIG", "SET", "requirepass", "x"]);
    assert!(reply.starts_with("-NOPERM"), "{reply}");
    assert!(reply.contains("'sessions'"), "names the backend: {reply}");
    assert!(
        reply.contains("--allow-admin-commands"),
        "names the flag: {reply}"
    );
    assert!(call(&mut c, &["FLUSHALL"]).starts_with("-NOPERM"));
    // Inside a transaction: a queue-time error, EXEC aborts.
    assert_eq!(call(&mut c, &["MULTI"]), "+OK\r\n");
    assert!(call(&mut c, &["CONFIG", "SET", "requirepass", "x"]).starts_with("-NOPERM"));
    assert!(call(&mut c, &["EXEC"]).starts_with("-EXECABORT"));
    // Still serving, with its password unchanged on Redis.
    assert_eq!(call(&mut c, &["SET", "k", "v"]), "+OK\r\n");
    assert_eq!(
        call(&mut connect(proxy.addr()), &["GET", "k"]),
        "$1\r\nv\r\n"
    );
    let password = server.cli(&[
        "--no-auth-warning",
        "-a",
        "up",
        "CONFIG",
        "GET",
        "requirepass",
    ]);
    assert_eq!(password, "requirepass\nup\n");
    drop(proxy);

    // Allowed by the operator: they run.
    let proxy = Proxy::start_standalone(
        server.addr(),
        &[],
        &["--upstream-password", "up", "--allow-admin-commands"],
    );
    let mut c = connect(proxy.addr());
    let reply = call(&mut c, &["CONFIG", "GET", "maxmemory-policy"]);
    assert!(reply.contains("noeviction"), "{reply}");
}

#[test]
fn passthrough_on_a_cluster() {
    let cluster = RedisCluster::start_local(3, 1);
    for node in cluster.nodes() {
        add_users(|args| cluster.cli(node, args));
    }
    let proxy = Proxy::start(&cluster.seeds(), &["--read-policy", "prefer-replica"]);
    let p = proxy.addr();
    let mut app = login(p, "app", "s3cret");
    let keys: Vec<String> = (0..20).map(|i| format!("app:{i}")).collect();
    for key in &keys {
        assert_eq!(call(&mut app, &["SET", key, "v"]), "+OK\r\n", "{key}");
    }
    // Split over the shards, each part as app.
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let reply = call(&mut app, &mget);
    assert_eq!(reply.matches("$1\r\nv\r\n").count(), keys.len(), "{reply}");
    assert!(call(&mut app, &["SET", "other", "v"]).starts_with("-NOPERM"));
    // ro may not even run READONLY: it reads all the same.
    let mut ro = login(p, "ro", "r0");
    for key in &keys {
        let reply = call(&mut ro, &["GET", key]);
        assert!(
            reply == "$1\r\nv\r\n" || reply == "$-1\r\n",
            "{key}: {reply}"
        );
    }
    assert!(call(&mut ro, &["SET", "app:0", "w"]).starts_with("-NOPERM"));
    let per_node: usize = cluster
        .nodes()
        .iter()
        .map(|&n| connections_of(&cluster.cli(n, &["CLIENT", "LIST"]), "app"))
        .sum();
    assert!(per_node >= 3, "app's connections on the nodes: {per_node}");
}
