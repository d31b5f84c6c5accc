//! A standalone Redis behind the proxy (`--backend NAME=standalone:PRIMARY,
//! REPLICA`): the same pooling and leases as for a cluster, no cluster view,
//! no CROSSSLOT, and reads on the replica under the read policy. Real
//! redis-server primary and replica, real redis-cli and phpredis.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use testbed::{
    TempDir,
    ports::free_port,
    process::{Place, wait_for},
    proxy::Proxy,
    redis::RedisServer,
    resp::RespClient,
    workspace_root,
};

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The proxy first, so it stops before the servers it fronts.
struct Setup {
    proxy: Proxy,
    replica: RedisServer,
    primary: RedisServer,
    _dirs: (TempDir, TempDir),
}

fn setup(extra: &[&str]) -> Setup {
    let (pdir, rdir) = (TempDir::new("rdr-primary-"), TempDir::new("rdr-replica-"));
    let place = Place::default();
    let primary = RedisServer::start(&place, &[LOCALHOST], free_port(), pdir.path(), &[]);
    let replica = RedisServer::start_replica(
        &place,
        &[LOCALHOST],
        free_port(),
        rdir.path(),
        primary.addr(),
    );
    let proxy = Proxy::start_standalone(primary.addr(), &[replica.addr()], extra);
    Setup {
        proxy,
        replica,
        primary,
        _dirs: (pdir, rdir),
    }
}

fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn call(c: &mut RespClient, args: &[&str]) -> String {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    String::from_utf8_lossy(&c.call(&args).expect("reply")).into_owned()
}

fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
}

/// A daemon that has just started listens before its backend is up (the
/// DaemonSet's readiness does not wait for Redis); a direct client
/// arriving then waits for the backend instead of an error.
#[test]
fn a_direct_client_of_a_starting_proxy_waits_for_its_backend() {
    let dir = TempDir::new("rdr-late-primary-");
    let late = SocketAddr::new(LOCALHOST, free_port());
    let proxy = Proxy::start_until(
        &["--backend".into(), format!("sessions=standalone:{late}")],
        testbed::daemon::LISTENING,
    );
    let addr = proxy.addr();
    let early = std::thread::spawn(move || cli(addr, &["PING"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!early.is_finished(), "answered before any Redis ran");
    let _primary = RedisServer::start(
        &Place::default(),
        &[LOCALHOST],
        late.port(),
        dir.path(),
        &[],
    );
    assert_eq!(early.join().expect("client").trim(), "PONG");
    assert_eq!(cli(addr, &["PING"]).trim(), "PONG");
}

#[test]
fn a_standalone_primary_serves_keys_of_any_slot_without_a_cluster_view() {
    let s = setup(&[]);
    let p = s.proxy.addr();
    // Keys in different slots, together: one Redis has no CROSSSLOT.
    assert_eq!(cli(p, &["MSET", "a", "1", "b", "2"]).trim(), "OK");
    assert_eq!(cli(p, &["MSETNX", "c", "3", "d", "4"]).trim(), "1");
    assert_eq!(cli(p, &["MGET", "a", "b", "c", "d"]), "1\n2\n3\n4\n");
    // The keys are on the primary itself.
    assert_eq!(s.primary.cli(&["MGET", "a", "b", "c", "d"]), "1\n2\n3\n4\n");
    // No cluster view: a standalone Redis has none to show.
    assert!(
        cli(p, &["CLUSTER", "SLOTS"]).contains("cluster support disabled"),
        "{}",
        cli(p, &["CLUSTER", "SLOTS"])
    );
    assert!(cli(p, &["INFO", "cluster"]).contains("cluster_enabled:0"));

    // A transaction over keys of any slot, on a lease.
    let mut c = RespClient::connect(p).expect("connect");
    assert_eq!(call(&mut c, &["MULTI"]), "+OK\r\n");
    assert_eq!(call(&mut c, &["INCR", "a"]), "+QUEUED\r\n");
    assert_eq!(call(&mut c, &["INCR", "b"]), "+QUEUED\r\n");
    assert_eq!(call(&mut c, &["EXEC"]), "*2\r\n:2\r\n:3\r\n");

    // BLPOP on a lease, released by another client's push.
    let mut blocked = RespClient::connect(p).expect("connect");
    blocked
        .send(&[b"BLPOP", b"jobs", b"5"])
        .expect("send BLPOP");
    wait_for("the BLPOP to block", Duration::from_secs(5), || {
        (info_field(&s.primary.cli(&["INFO", "clients"]), "blocked_clients") == Some(1))
            .then_some(())
    });
    assert_eq!(cli(p, &["RPUSH", "jobs", "j1"]).trim(), "1");
    assert_eq!(
        String::from_utf8_lossy(&blocked.read_reply().expect("BLPOP reply")),
        "*2\r\n$4\r\njobs\r\n$2\r\nj1\r\n"
    );

    // SUBSCRIBE through the proxy, PUBLISH through the proxy.
    let mut sub = RespClient::connect(p).expect("connect");
    sub.send(&[b"SUBSCRIBE", b"news"]).expect("send");
    assert!(
        String::from_utf8_lossy(&sub.read_reply().expect("confirmation")).contains("subscribe")
    );
    assert_eq!(cli(p, &["PUBLISH", "news", "hi"]).trim(), "1");
    assert_eq!(
        String::from_utf8_lossy(&sub.read_reply().expect("message")),
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
    );
    assert!(
        cli(p, &["SELECT", "1"]).contains("database 0 only"),
        "pooled connections serve database 0"
    );
}

#[test]
fn reads_follow_the_read_policy_to_the_replica() {
    let s = setup(&["--read-policy", "replica"]);
    let p = s.proxy.addr();
    assert_eq!(cli(p, &["SET", "k", "v"]).trim(), "OK");
    wait_for("the write to replicate", Duration::from_secs(5), || {
        (s.replica.cli(&["GET", "k"]).trim() == "v").then_some(())
    });
    let gets = |server: &RedisServer| {
        server
            .cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (primary_before, replica_before) = (gets(&s.primary), gets(&s.replica));
    for _ in 0..20 {
        assert_eq!(cli(p, &["GET", "k"]).trim(), "v");
    }
    assert_eq!(
        gets(&s.primary),
        primary_before,
        "reads reached the primary"
    );
    assert!(
        gets(&s.replica) >= replica_before + 20,
        "the replica served {} reads",
        gets(&s.replica) - replica_before
    );
    // Writes still go to the primary.
    assert_eq!(cli(p, &["SET", "k", "w"]).trim(), "OK");
    assert_eq!(s.primary.cli(&["GET", "k"]).trim(), "w");
}

#[test]
fn phpredis_connections_per_request_share_a_few_upstream_connections() {
    assert!(
        testbed::require::on_path("php"),
        "php is not installed (cargo xtask setup installs php-cli and php-redis)"
    );
    const REQUESTS: u32 = 300;
    let s = setup(&[]);
    let script: PathBuf = workspace_root().join("tests/clients/phpredis_per_request.php");
    let out = Command::new("timeout")
        .args(["-k", "5", "120", "php"])
        .arg(&script)
        .args([
            "127.0.0.1",
            &s.proxy.addr().port().to_string(),
            &REQUESTS.to_string(),
        ])
        .output()
        .expect("php");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("requests: {REQUESTS}"),
        "{}\n--- proxy log\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.proxy.log()
    );
    // Counted on the server: the proxy's pooled connections, not one per
    // request.
    let clients = s
        .primary
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| !l.contains("flags=S") && !l.contains("cmd=client"))
        .count();
    assert!(
        clients <= 8,
        "{REQUESTS} PHP requests left {clients} connections on the primary:\n{}",
        s.primary.cli(&["CLIENT", "LIST"])
    );
    let total = info_field(
        &s.primary.cli(&["INFO", "stats"]),
        "total_connections_received",
    )
    .unwrap_or(u64::MAX);
    assert!(
        total < u64::from(REQUESTS) / 10,
        "{total} connections reached the primary for {REQUESTS} requests"
    );
}
