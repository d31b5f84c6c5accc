//! Several backends behind one daemon (issue 13): two Redis Clusters and a
//! standalone primary on one node, a plain TCP backend carried over HBONE to
//! another node, and configurations the daemon must refuse at startup.
//! Real kernel, real namespaces, real `redis-server`, `redis-cli` and
//! `redis-benchmark`; the pods' clients run inside the pods' cgroups, so
//! their connects are steered by the eBPF programs.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use testbed::{
    TempDir,
    cluster::{RedisCluster, slot_of},
    daemon::{self, Daemon},
    exclusive,
    netns::Netns,
    ports::free_port,
    process::{Child, Place, path_str, wait_for},
    redis::RedisServer,
    require_kernel,
    topology::{Pod, REDIS_PORT, Topology, proxy_addr, proxy_addr6},
    two_nodes::{NODE_A, NODE_B, addr, link_nodes, mint_node_certs},
    unique,
};

// ---------------------------------------------------------------------------
// One node, three backends
// ---------------------------------------------------------------------------

/// The three backends of the node, in declaration order; pod `i` of the
/// topology belongs to backend `i`.
const CART: usize = 0;
const SHOP: usize = 1;
const SESSIONS: usize = 2;
const NAMES: [&str; 3] = ["cart", "shop", "sessions"];
const KINDS: [&str; 3] = ["cluster", "cluster", "standalone"];

/// The `n`th node of cluster `net` (10.96.<net>.<10+n>:6379).
fn node_addr(net: u8, n: u8) -> SocketAddr {
    SocketAddr::from(([10, 96, net, 10 + n], REDIS_PORT))
}

/// Each backend's service address: the first node of each cluster, and the
/// standalone primary.
fn service(backend: usize) -> SocketAddr {
    let net = u8::try_from(backend + 1).expect("three backends");
    node_addr(net, 0)
}

/// One node running two 3-master clusters (one replica each) and a
/// standalone primary with one replica, a daemon serving the three as
/// backends `cart`, `shop` and `sessions`, and three enrolled pods.
struct ThreeBackends {
    // Field order is drop order: Redis before the topology, whose cgroup
    // (the node's) cannot go while they run in it; the topology stops the
    // daemon and removes the working directory the servers use.
    cart: RedisCluster,
    shop: RedisCluster,
    primary: RedisServer,
    replica: RedisServer,
    topo: Topology,
}

impl ThreeBackends {
    fn start() -> Self {
        let mut topo = Topology::build(3);
        let cart_nodes: Vec<SocketAddr> = (0..6).map(|n| node_addr(1, n)).collect();
        let shop_nodes: Vec<SocketAddr> = (0..6).map(|n| node_addr(2, n)).collect();
        let (primary_addr, replica_addr) = (node_addr(3, 0), node_addr(3, 1));
        for addr in cart_nodes
            .iter()
            .chain(&shop_nodes)
            .chain([&primary_addr, &replica_addr])
        {
            topo.node
                .ip(&["addr", "add", &format!("{}/32", addr.ip()), "dev", "lo"]);
        }
        let dirs: Vec<std::path::PathBuf> = ["cart", "shop", "primary", "replica"]
            .iter()
            .map(|d| {
                let dir = topo.workdir().join(d);
                std::fs::create_dir_all(&dir).expect("redis dir");
                dir
            })
            .collect();
        let place = topo.node_place();
        // Both clusters at once: creating one takes seconds.
        let (cart, shop) = std::thread::scope(|s| {
            let cart = s.spawn(|| RedisCluster::start(&place, &cart_nodes, 1, &dirs[0]));
            let shop = s.spawn(|| RedisCluster::start(&place, &shop_nodes, 1, &dirs[1]));
            (
                cart.join().expect("cart cluster"),
                shop.join().expect("shop cluster"),
            )
        });
        let primary = RedisServer::start(&place, &[primary_addr.ip()], REDIS_PORT, &dirs[2], &[]);
        let replica = RedisServer::start_replica(
            &place,
            &[replica_addr.ip()],
            REDIS_PORT,
            &dirs[3],
            primary_addr,
        );

        let seeds = |nodes: &[SocketAddr]| {
            nodes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut args: Vec<String> = vec![
            "--proxy-addr".into(),
            format!("{},{}", proxy_addr(), proxy_addr6()),
            "--cgroup-root".into(),
            path_str(topo.attach_root()).into(),
            "--backend".into(),
            format!("cart=cluster:{}", seeds(&cart_nodes)),
            "--backend".into(),
            format!("shop=cluster:{}", seeds(&shop_nodes)),
            "--backend".into(),
            format!("sessions=standalone:{primary_addr},{replica_addr}"),
        ];
        for (backend, name) in NAMES.iter().enumerate() {
            args.extend([
                "--redis-target".into(),
                format!("{name}={}", service(backend)),
            ]);
        }
        topo.start_daemon(args);
        for pod in &topo.pods {
            topo.enroll(&pod.netns);
        }
        Self {
            cart,
            shop,
            primary,
            replica,
            topo,
        }
    }

    fn pod(&self, backend: usize) -> &Pod {
        self.topo.pod(backend)
    }

    /// Every key on the backend's primaries, read on the servers themselves
    /// (`KEYS *` on each master, or on the standalone primary).
    fn keys_on_servers(&self, backend: usize) -> BTreeSet<String> {
        let listing = match backend {
            CART | SHOP => {
                let cluster = self.cluster(backend);
                cluster
                    .masters()
                    .into_iter()
                    .map(|m| cluster.cli(m, &["KEYS", "*"]))
                    .collect::<String>()
            }
            _ => self.primary.cli(&["KEYS", "*"]),
        };
        listing
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// `GET key` on the server of `backend` that holds it (the slot's owner,
    /// or the standalone primary).
    fn get_on_server(&self, backend: usize, key: &str) -> String {
        match backend {
            CART | SHOP => {
                let cluster = self.cluster(backend);
                let owner = cluster.owner_of_slot(slot_of(key.as_bytes()));
                cluster.cli(owner, &["GET", key]).trim().to_string()
            }
            _ => self.primary.cli(&["GET", key]).trim().to_string(),
        }
    }

    fn cluster(&self, backend: usize) -> &RedisCluster {
        match backend {
            CART => &self.cart,
            SHOP => &self.shop,
            _ => panic!("backend {} is not a cluster", NAMES[backend]),
        }
    }

    fn log(&self) -> String {
        self.topo
            .daemon
            .as_ref()
            .map(Daemon::log)
            .unwrap_or_default()
    }
}

/// Plain `redis-cli` from `pod` to `backend`'s service address (the proxy
/// hides the cluster: no `-c`); stdout, trimmed, asserting success.
fn via(pod: &Pod, backend: usize, args: &[&str]) -> String {
    let addr = service(backend);
    let out = pod.redis_cli(addr.ip(), addr.port(), args);
    assert!(
        out.status.success(),
        "redis-cli {args:?} from pod {} to {} ({addr}): {out:?}",
        pod.ip,
        NAMES[backend]
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (other labels, such as `command` or `outcome`, summed over).
fn labelled(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let inner = series.strip_prefix(name)?.strip_prefix('{')?;
            let inner = inner.strip_suffix('}')?;
            let pairs: Vec<&str> = inner.split(',').collect();
            labels
                .iter()
                .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Keys only backend `b` is given, and one value per backend for keys all
/// three are given under the same name.
fn own_keys(backend: usize) -> Vec<String> {
    (0..12)
        .map(|n| format!("{}:user:{n}", NAMES[backend]))
        .collect()
}

const SHARED_KEYS: [&str; 4] = ["shared:a", "shared:b", "page:home", "counter"];

fn shared_value(backend: usize, key: &str) -> String {
    format!("{key}@{}", NAMES[backend])
}

#[test]
fn one_node_three_backends_keep_each_pods_keys_on_its_own_backend() {
    require_kernel!();
    let _kernel = exclusive();
    let started = Instant::now();
    let rig = ThreeBackends::start();
    println!("three backends up in {:?}", started.elapsed());
    let before = rig.topo.metrics();
    // redis-cli runs per backend service: each is one client connection.
    let mut connections = [0u32; 3];

    // Each pod writes and reads through its own service, with plain
    // redis-cli.
    for backend in [CART, SHOP, SESSIONS] {
        let pod = rig.pod(backend);
        for key in own_keys(backend) {
            assert_eq!(via(pod, backend, &["SET", &key, &format!("v-{key}")]), "OK");
            connections[backend] += 1;
        }
        for key in SHARED_KEYS {
            assert_eq!(
                via(pod, backend, &["SET", key, &shared_value(backend, key)]),
                "OK"
            );
            connections[backend] += 1;
        }
    }
    for backend in [CART, SHOP, SESSIONS] {
        let pod = rig.pod(backend);
        for key in own_keys(backend) {
            assert_eq!(via(pod, backend, &["GET", &key]), format!("v-{key}"));
            connections[backend] += 1;
        }
        for key in SHARED_KEYS {
            assert_eq!(
                via(pod, backend, &["GET", key]),
                shared_value(backend, key),
                "{key} through {}: another backend's value came back",
                NAMES[backend]
            );
            connections[backend] += 1;
        }
    }

    // On the servers themselves: each backend's keys are on its own Redis,
    // and on neither of the other two.
    let on_servers: Vec<BTreeSet<String>> = [CART, SHOP, SESSIONS]
        .iter()
        .map(|&b| rig.keys_on_servers(b))
        .collect();
    for backend in [CART, SHOP, SESSIONS] {
        for key in own_keys(backend) {
            assert_eq!(
                rig.get_on_server(backend, &key),
                format!("v-{key}"),
                "{key} is not on {}'s servers",
                NAMES[backend]
            );
            for other in [CART, SHOP, SESSIONS] {
                if other != backend {
                    assert!(
                        !on_servers[other].contains(&key),
                        "{key}, written through {}, is on {}'s servers",
                        NAMES[backend],
                        NAMES[other]
                    );
                }
            }
        }
        for key in SHARED_KEYS {
            assert_eq!(
                rig.get_on_server(backend, key),
                shared_value(backend, key),
                "{key} on {}'s servers",
                NAMES[backend]
            );
        }
    }
    // The standalone primary's replica holds the same keys: still its own
    // backend's.
    wait_for(
        "the sessions replica to catch up",
        Duration::from_secs(5),
        || {
            (rig.replica.cli(&["GET", "sessions:user:0"]).trim() == "v-sessions:user:0")
                .then_some(())
        },
    );

    // A key written through backend A is never visible through backend B:
    // neither from B's pod, nor from A's own pod dialling B's service (the
    // connection's destination picks the backend, not the pod).
    for a in [CART, SHOP, SESSIONS] {
        for b in [CART, SHOP, SESSIONS] {
            if a == b {
                continue;
            }
            for key in own_keys(a).iter().take(2) {
                for pod in [rig.pod(b), rig.pod(a)] {
                    assert_eq!(
                        via(pod, b, &["GET", key]),
                        "",
                        "{key}, written through {}, read through {} from pod {}",
                        NAMES[a],
                        NAMES[b],
                        pod.ip
                    );
                    assert_eq!(via(pod, b, &["EXISTS", key]), "0");
                    connections[b] += 2;
                }
            }
        }
    }

    // Per-backend metrics: every connection counted under its backend.
    let after = rig.topo.metrics();
    for backend in [CART, SHOP, SESSIONS] {
        let labels = [("backend", NAMES[backend])];
        let opened = labelled(
            &after,
            "redirector_client_connections_opened_total",
            &labels,
        ) - labelled(
            &before,
            "redirector_client_connections_opened_total",
            &labels,
        );
        let commands = labelled(&after, "redirector_commands_total", &labels)
            - labelled(&before, "redirector_commands_total", &labels);
        println!(
            "{}: {opened} client connections, {commands} commands counted; {} redis-cli runs",
            NAMES[backend], connections[backend]
        );
        assert!(
            opened >= f64::from(connections[backend]),
            "{} counted {opened} connections for {} redis-cli runs:\n{after}",
            NAMES[backend],
            connections[backend]
        );
        assert!(
            commands >= f64::from(connections[backend]),
            "{} counted {commands} commands:\n{after}",
            NAMES[backend]
        );
    }

    // `redirector status`: the three backends, their kinds and targets; the
    // eBPF target map gives each service its own backend id.
    let status: serde_json::Value =
        serde_json::from_str(&rig.topo.node_cli(&["status", "--json"])).expect("status --json");
    let backends = status["daemon"]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no daemon.backends in status: {status:#}"));
    let listed: BTreeMap<&str, &serde_json::Value> = backends
        .iter()
        .map(|b| (b["name"].as_str().unwrap_or_default(), b))
        .collect();
    assert_eq!(
        listed.keys().copied().collect::<BTreeSet<_>>(),
        NAMES.iter().copied().collect::<BTreeSet<_>>(),
        "{status:#}"
    );
    for backend in [CART, SHOP, SESSIONS] {
        let entry = listed[NAMES[backend]];
        assert_eq!(entry["kind"], KINDS[backend], "{entry:#}");
        assert!(
            entry["targets"]
                .to_string()
                .contains(&service(backend).to_string()),
            "{} does not list its target {}: {entry:#}",
            NAMES[backend],
            service(backend)
        );
    }
    let targets = status["targets"].as_array().expect("targets");
    let ids: BTreeMap<String, u64> = targets
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap_or_default().to_string(),
                t["backend_id"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    let service_ids: BTreeSet<u64> = [CART, SHOP, SESSIONS]
        .iter()
        .map(|&b| {
            *ids.get(&service(b).to_string())
                .unwrap_or_else(|| panic!("{} not in the target map: {ids:?}", service(b)))
        })
        .collect();
    assert_eq!(
        service_ids.len(),
        3,
        "the three services share backend ids: {ids:?}"
    );
    let text = rig.topo.node_cli(&["status"]);
    for name in NAMES {
        assert!(
            text.contains(name),
            "`redirector status` omits {name}:\n{text}"
        );
    }
    let log = rig.log();
    for name in NAMES {
        assert!(
            log.contains(&format!("backend={name}"))
                || log.contains(&format!("backend=\"{name}\"")),
            "the log never names backend {name}:\n{log}"
        );
    }

    // No view crosses backends: the standalone one shows no cluster, the
    // cart cluster's view names none of the others' servers, and CLIENT
    // LIST through a backend lists only that backend's clients.
    let slots = via(rig.pod(SESSIONS), SESSIONS, &["CLUSTER", "SLOTS"]);
    assert!(
        slots.contains("cluster support disabled"),
        "sessions shows a cluster view: {slots}"
    );
    let view = via(rig.pod(CART), CART, &["CLUSTER", "NODES"]);
    assert!(
        !view.contains("10.96.2.") && !view.contains("10.96.3."),
        "cart's cluster view names another backend's server:\n{view}"
    );
    let holder = |backend: usize| {
        let addr = service(backend);
        let mut cmd = rig.pod(backend).place().command("redis-cli");
        cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-r", "300", "-i", "0.1", "PING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Child::spawn(format!("{} client", NAMES[backend]), cmd)
    };
    let _holders = [holder(CART), holder(SHOP), holder(SESSIONS)];
    for backend in [CART, SHOP, SESSIONS] {
        let own = rig.pod(backend).ip.to_string();
        let list = wait_for(
            &format!("CLIENT LIST through {} to show its client", NAMES[backend]),
            Duration::from_secs(5),
            || {
                let list = via(rig.pod(backend), backend, &["CLIENT", "LIST"]);
                (list.matches(&format!("addr={own}:")).count() >= 2).then_some(list)
            },
        );
        for other in [CART, SHOP, SESSIONS] {
            let ip = rig.pod(other).ip.to_string();
            assert!(
                other == backend || !list.contains(&format!("addr={ip}:")),
                "CLIENT LIST through {} shows {}'s client {ip}:\n{list}",
                NAMES[backend],
                NAMES[other]
            );
        }
    }
    println!(
        "one_node_three_backends_keep_each_pods_keys_on_its_own_backend: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Isolation under failure
// ---------------------------------------------------------------------------

/// p99 latency in milliseconds of SET and GET from `redis-benchmark` run in
/// `pod` (steered, one connection, `n` sequential round trips each) against
/// `backend`'s service.
fn p99s(pod: &Pod, backend: usize, n: u32) -> (f64, f64) {
    let addr = service(backend);
    let (host, port, n) = (
        addr.ip().to_string(),
        addr.port().to_string(),
        n.to_string(),
    );
    let out = pod.place().output(
        "timeout",
        &[
            "60",
            "redis-benchmark",
            "-h",
            &host,
            "-p",
            &port,
            "-c",
            "1",
            "-n",
            &n,
            "-r",
            "10000",
            "-t",
            "set,get",
            "--csv",
        ],
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
    // "p95_latency_ms","p99_latency_ms","max_latency_ms"
    let p99 = |test: &str| {
        csv.lines()
            .find_map(|l| {
                let fields: Vec<&str> = l.split(',').map(|f| f.trim_matches('"')).collect();
                (fields.first() == Some(&test))
                    .then(|| fields.get(6)?.parse::<f64>().ok())
                    .flatten()
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {test} row from redis-benchmark against {} ({addr}): {out:?}",
                    NAMES[backend]
                )
            })
    };
    (p99("SET"), p99("GET"))
}

/// [`p99s`] for `cart`, then `shop`, from their own pods. One after the
/// other: two benchmarks at once, with the proxy, three Redis servers and
/// the sessions clients, kept a 2-core machine's run queue long enough for
/// scheduling delays alone to reach the p99.
fn measure(rig: &ThreeBackends, n: u32) -> [(f64, f64); 2] {
    [p99s(rig.pod(CART), CART, n), p99s(rig.pod(SHOP), SHOP, n)]
}

/// Clients of `sessions` that keep going whatever happens to it, paced so
/// that they load the proxy alike before and during the failure without
/// taking the machine's CPUs from the clients measured, all in the
/// sessions pod:
/// - four long-lived `redis-cli -r -1 -i 0.005` connections, reconnecting
///   when theirs breaks;
/// - two clients that open a new connection for each command, as PHP-FPM
///   does, every 20 ms: one Python process each ([`ONE_SHOT_CLIENT`]).
///   Not loops of one-shot `redis-cli`: two fork-and-execs every 20 ms took
///   enough of a 2-core machine to move the measured clients' p99 by
///   themselves (0.56 ms quiet, 3.4 ms loaded in one CI run), and the bound
///   is against the lower of the quiet and loaded figures.
fn hammer_sessions(rig: &ThreeBackends) -> Vec<Child> {
    let addr = service(SESSIONS);
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let place = rig.pod(SESSIONS).place();
    let script = |i: usize| {
        let (command, value) = if i.is_multiple_of(2) {
            ("SET", " x")
        } else {
            ("GET", "")
        };
        if i < 4 {
            format!(
                "while :; do redis-cli -h {host} -p {port} -r -1 -i 0.005 \
                 {command} hammer:{i}{value}; sleep 0.05; done"
            )
        } else {
            format!(
                "exec /usr/bin/python3 -c '{ONE_SHOT_CLIENT}' {host} {port} {command} \
                 hammer:{i}{value}"
            )
        }
    };
    (0..6)
        .map(|i| {
            let mut cmd = place.command("sh");
            cmd.args(["-c", &script(i)])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Child::spawn(format!("sessions client loop {i}"), cmd)
        })
        .collect()
}

/// `python3 -c` source: `HOST PORT ARG...` sends the command with redis-py
/// on a new connection every 20 ms, waits for its reply (an error reply
/// or a failed connect counts as one), closes.
const ONE_SHOT_CLIENT: &str = r#"
import sys, time, redis
host, port, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
while True:
    client = redis.Redis(host=host, port=port, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.execute_command(*args)
    except redis.RedisError:
        pass
    finally:
        client.close()
    time.sleep(0.02)
"#;

#[test]
fn killing_one_backends_redis_does_not_slow_the_other_two() {
    require_kernel!();
    let _kernel = exclusive();
    const ROUND_TRIPS: u32 = 5000;
    let mut rig = ThreeBackends::start();
    // Warm the pools, then the figures with the third backend idle: with
    // its clients' load, the lower of the two is the baseline.
    measure(&rig, 500);
    let quiet = measure(&rig, ROUND_TRIPS);
    // Load the third backend for the rest of the run.
    let hammers = hammer_sessions(&rig);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        via(rig.pod(SESSIONS), SESSIONS, &["SET", "alive", "1"]),
        "OK",
        "sessions serves before its Redis is killed"
    );

    let before = measure(&rig, ROUND_TRIPS);
    let metrics_before = rig.topo.metrics();
    let killed = Instant::now();
    rig.primary.kill();
    let during = measure(&rig, ROUND_TRIPS);
    let measured_for = killed.elapsed();

    // The failure was real, and its clients still at it.
    let addr = service(SESSIONS);
    let out = rig
        .pod(SESSIONS)
        .redis_cli(addr.ip(), addr.port(), &["SET", "dead", "1"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("OK"),
        "sessions accepted a write with its primary killed: {out:?}"
    );
    drop(hammers);

    let floor_ms = 1.0;
    println!(
        "p99 (SET, GET) with sessions idle: cart {:?}, shop {:?} ms",
        quiet[0], quiet[1]
    );
    // The proxy was handling the failure while the others were measured:
    // the sessions clients' commands were in its hands, failing to connect.
    let sessions_metrics = rig.topo.metrics();
    let grew = |name: &str, labels: &[(&str, &str)]| {
        labelled(&sessions_metrics, name, labels) - labelled(&metrics_before, name, labels)
    };
    let connect_failures = grew(
        "redirector_upstream_connect_failures_total",
        &[("backend", "sessions")],
    );
    let clients_opened = grew(
        "redirector_client_connections_opened_total",
        &[("backend", "sessions")],
    );
    println!(
        "sessions during the failure: {connect_failures} upstream connect failures, \
         {clients_opened} client connections opened, {} commands ok, {} errors at the proxy",
        grew(
            "redirector_commands_total",
            &[("backend", "sessions"), ("outcome", "ok")]
        ),
        grew(
            "redirector_commands_total",
            &[("backend", "sessions"), ("outcome", "error")]
        ),
    );
    assert!(
        connect_failures >= 1.0,
        "the proxy never tried the dead primary while the others were measured:\n{sessions_metrics}"
    );
    // The proxy's p99 before the failure, quiet and loaded: the median of
    // its four series (cart and shop, SET and GET), which take the same path
    // through the same worker. One series' lucky run must not set the bar
    // (a CI run had shop GET at 2.2 ms quiet, the other three near 4 ms).
    // The lower of the two: the sessions clients' load must not hide a
    // slowdown.
    let (quiet_p99, loaded_p99) = (median_p99(&quiet), median_p99(&before));
    let limit = 2.0 * quiet_p99.min(loaded_p99).max(floor_ms);
    println!(
        "proxy p99 before the failure: {quiet_p99:.3} ms quiet, {loaded_p99:.3} ms with sessions \
         loaded; every series must stay within {limit:.3} ms while sessions is down"
    );
    for (i, backend) in [CART, SHOP].into_iter().enumerate() {
        for (test, q, b, d) in [
            ("SET", quiet[i].0, before[i].0, during[i].0),
            ("GET", quiet[i].1, before[i].1, during[i].1),
        ] {
            println!(
                "{} {test} p99: {q:.3} ms quiet, {b:.3} ms with sessions loaded, {d:.3} ms with \
                 sessions' primary dead ({ROUND_TRIPS} round trips, measured within \
                 {measured_for:?} of the kill)",
                NAMES[backend]
            );
            assert!(
                d <= limit,
                "{} {test} p99 went from {q:.3} ms (quiet) / {b:.3} ms (loaded) to {d:.3} ms \
                 (limit {limit:.3} ms: twice the proxy's p99 before the failure) while \
                 sessions was down\n--- daemon log\n{}",
                NAMES[backend],
                tail(&rig.log(), 40)
            );
        }
    }
    // The other backends still serve, and nothing of theirs failed.
    assert_eq!(via(rig.pod(CART), CART, &["SET", "after", "1"]), "OK");
    assert_eq!(via(rig.pod(SHOP), SHOP, &["SET", "after", "1"]), "OK");
    let metrics = rig.topo.metrics();
    for backend in [CART, SHOP] {
        let labels = [("backend", NAMES[backend]), ("outcome", "error")];
        let errors = labelled(&metrics, "redirector_commands_total", &labels)
            - labelled(&metrics_before, "redirector_commands_total", &labels);
        assert_eq!(
            errors, 0.0,
            "{} commands failed while sessions was down:\n{metrics}",
            NAMES[backend]
        );
    }
}

/// The median of the four p99s of one [`measure`]: the middle two's mean.
fn median_p99(series: &[(f64, f64); 2]) -> f64 {
    let mut all = [series[0].0, series[0].1, series[1].0, series[1].1];
    all.sort_by(f64::total_cmp);
    f64::midpoint(all[1], all[2])
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// A tcp backend across nodes, through HBONE
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*): every byte value, no
/// protocol in sight.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What the byte server on node B saw of its one connection.
struct Served {
    peer: SocketAddr,
    received: Vec<u8>,
}

/// A server that speaks first (`greeting`), then echoes every byte back
/// until its client goes quiet for 10 s or closes. Serves one connection.
fn byte_server(listener: TcpListener, greeting: &'static [u8]) -> std::thread::JoinHandle<Served> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nobody reached the byte server");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(greeting).expect("greeting");
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        Served { peer, received }
    })
}

/// The pod's client: connects to HOST:PORT, reads the server's greeting
/// line, sends the file's bytes while reading as many back, and writes
/// greeting and echo to stdout.
const BYTE_CLIENT: &str = r#"
import socket, sys, threading
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
s = socket.create_connection((host, port), timeout=20)
greeting = b""
while not greeting.endswith(b"\n"):
    chunk = s.recv(1)
    if not chunk:
        sys.exit("closed before the greeting: %r" % greeting)
    greeting += chunk
sender = threading.Thread(target=s.sendall, args=(data,))
sender.start()
echo = bytearray()
while len(echo) < len(data):
    chunk = s.recv(65536)
    if not chunk:
        break
    echo += chunk
sender.join()
s.close()
sys.stdout.buffer.write(greeting + bytes(echo))
"#;

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn a_tcp_backend_relays_any_bytes_exactly_across_nodes_through_hbone() {
    require_kernel!();
    let _kernel = exclusive();
    const GREETING: &[u8] = b"HELLO\x00\xff\n";
    const ECHO_PORT: u16 = 7777;
    // Drop order: B's daemon, B's namespace, node A's topology (daemon,
    // pods, cgroups, namespace), then the files.
    struct Rig {
        daemon_b: Daemon,
        b: Netns,
        topo: Topology,
        dir: TempDir,
    }
    let dir = TempDir::new("rdr-tcp-hbone");
    let mut topo = Topology::build(1);
    let b = Netns::create(&unique("rdr-nb"));
    link_nodes(&topo.node, &b);
    mint_node_certs(dir.path());

    let target = addr(NODE_B, ECHO_PORT);
    let server = byte_server(b.place().listen(target).expect("listen on B"), GREETING);
    let daemon_b = Daemon::start(
        &b.place(),
        &dir.path().join("pins-b"),
        [
            "--steering",
            "off",
            "--allow-direct-from",
            NODE_B,
            "--proxy-addr",
            &format!("{NODE_B}:7379"),
            "--admin-addr",
            &format!("{NODE_B}:15020"),
            "--hbone-listen",
            &format!("{NODE_B}:15008"),
            "--hbone-certs",
            path_str(&dir.path().join("b")),
            "--backend",
            "legacy=tcp",
            "--redis-target",
            &format!("legacy={target}"),
        ]
        .iter()
        .map(ToString::to_string)
        .collect(),
        vec![("RUST_LOG".into(), "info".into())],
        dir.path().join("b.log"),
    );
    let args: Vec<String> = [
        "--proxy-addr",
        &format!("{},{}", proxy_addr(), proxy_addr6()),
        "--cgroup-root",
        path_str(topo.attach_root()),
        "--backend",
        "legacy=tcp",
        "--redis-target",
        &format!("legacy={target}"),
        "--hbone-listen",
        &format!("{NODE_A}:15008"),
        "--hbone-certs",
        path_str(&dir.path().join("a")),
        "--mesh-endpoints",
        &format!("{NODE_B}/32"),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    topo.start_daemon(args);
    let rig = Rig {
        daemon_b,
        b,
        topo,
        dir,
    };
    let pod = rig.topo.pod(0);
    rig.topo.enroll(&pod.netns);

    // Not RESP: an unterminated array header, a bulk length beyond any
    // limit, NUL and 0xff, then 1 MiB of noise.
    let mut data = b"*2\r\n$999999999999\r\n\x00\xff\xfeGET / HTTP/1.1\r\n\r\n".to_vec();
    data.extend(noise(1 << 20, 0x9e37_79b9_7f4a_7c15));
    let input = rig.dir.path().join("bytes.bin");
    std::fs::write(&input, &data).expect("write bytes");
    let script = rig.dir.path().join("byte_client.py");
    std::fs::write(&script, BYTE_CLIENT).expect("write client");

    let before = rig.topo.metrics();
    let started = Instant::now();
    let out = pod.place().output(
        "timeout",
        &[
            "60",
            "/usr/bin/python3",
            path_str(&script),
            NODE_B,
            &ECHO_PORT.to_string(),
            path_str(&input),
        ],
    );
    let took = started.elapsed();
    let served = server.join().expect("byte server");
    let log_a = rig
        .topo
        .daemon
        .as_ref()
        .map(Daemon::log)
        .unwrap_or_default();
    let logs = format!(
        "--- node A's daemon\n{}\n--- node B's daemon\n{}",
        tail(&log_a, 30),
        tail(&rig.daemon_b.log(), 30)
    );
    assert!(
        out.status.success(),
        "the pod's client failed: {}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = GREETING.to_vec();
    expected.extend_from_slice(&data);
    println!(
        "{} bytes each way between the pod on A and {target} on B in {took:?}",
        data.len()
    );
    assert!(
        served.received == data,
        "B's server received {} of {} bytes, first difference at {:?}\n{logs}",
        served.received.len(),
        data.len(),
        first_difference(&served.received, &data)
    );
    assert!(
        out.stdout == expected,
        "the pod got back {} of {} bytes, first difference at {:?}\n{logs}",
        out.stdout.len(),
        expected.len(),
        first_difference(&out.stdout, &expected)
    );
    // The server was reached from B's own tunnel endpoint, not from A.
    assert_eq!(
        served.peer.ip(),
        NODE_B.parse::<IpAddr>().expect("ip"),
        "the byte server was dialled from {}, not through B's HBONE listener",
        served.peer
    );
    // B's HBONE listener carried the stream.
    let metrics_b = testbed::http::get_in(&rig.b.place(), addr(NODE_B, 15020), "/metrics");
    let b_sample = |name: &str| testbed::http::sample(&metrics_b, name);
    assert!(
        b_sample("redirector_hbone_connect_responses_total{status=\"200\"}") >= 1.0,
        "B answered no CONNECT:\n{metrics_b}"
    );
    let data_len = data.len() as f64;
    assert!(
        b_sample("redirector_hbone_received_bytes_total") >= data_len,
        "B's tunnels received fewer bytes than sent:\n{metrics_b}"
    );
    assert!(
        b_sample("redirector_hbone_sent_bytes_total") >= data_len,
        "B's tunnels sent fewer bytes than echoed:\n{metrics_b}"
    );
    // A counted the connection and its bytes under the tcp backend.
    let after = rig.topo.metrics();
    let grew = |name: &str, labels: &[(&str, &str)]| {
        labelled(&after, name, labels) - labelled(&before, name, labels)
    };
    assert!(
        grew(
            "redirector_client_connections_opened_total",
            &[("backend", "legacy")]
        ) >= 1.0,
        "no client connection counted for backend legacy:\n{after}"
    );
    for direction in ["upstream", "downstream"] {
        assert!(
            grew(
                "redirector_relay_bytes_total",
                &[("backend", "legacy"), ("direction", direction)]
            ) >= data_len,
            "relay bytes {direction} for legacy:\n{after}"
        );
    }
    assert!(
        rig.topo.counters().steered >= 1,
        "the pod's connect was not steered"
    );
}

// ---------------------------------------------------------------------------
// Bad configuration
// ---------------------------------------------------------------------------

/// `redirector run --steering off` on free loopback ports with `args`: it
/// must exit non-zero within 15 s (a daemon that starts is killed by
/// `timeout` and fails the test), without ever being ready. Returns stderr.
fn refused(args: &[&str]) -> String {
    let pins = TempDir::new("rdr-badcfg-");
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut full = vec![
        "--steering",
        "off",
        "--proxy-addr",
        &proxy,
        "--admin-addr",
        &admin,
    ];
    full.extend_from_slice(args);
    refused_in(&Place::default(), pins.path(), &full)
}

/// [`refused`] with steering on: the daemon run in `topo`'s node, attaching
/// at its cgroup; on top, no program may be left attached.
fn refused_steering(topo: &Topology, args: &[&str]) -> String {
    let proxy = format!("{},{}", proxy_addr(), proxy_addr6());
    let mut full = vec![
        "--proxy-addr",
        &proxy,
        "--cgroup-root",
        path_str(topo.attach_root()),
    ];
    full.extend_from_slice(args);
    let stderr = refused_in(&topo.node_place(), topo.pin_dir(), &full);
    let attached = testbed::bpftool::cgroup_program_ids(path_str(topo.attach_root()));
    assert!(
        attached.is_empty(),
        "programs {attached:?} left attached after refusing {args:?}"
    );
    stderr
}

/// `redirector --pin-dir <pins> run <args>` in `place`, which must refuse
/// to start: non-zero exit within 15 s (a daemon that starts is killed by
/// `timeout` and fails the test), an error line, never ready. Returns
/// stderr.
fn refused_in(place: &Place, pins: &Path, args: &[&str]) -> String {
    let binary = daemon::binary();
    let mut cmd = place.command("timeout");
    cmd.args(["-k", "2", "15"])
        .arg(&binary)
        .arg("--pin-dir")
        .arg(pins)
        .arg("run")
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let out: Output = cmd.output().expect("run redirector");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !matches!(out.status.code(), Some(124 | 137)) && took < Duration::from_secs(15),
        "redirector run {args:?} was still running after {took:?} instead of refusing:\n{stderr}"
    );
    assert!(
        !out.status.success(),
        "redirector run {args:?} exited successfully:\n{stderr}"
    );
    assert!(
        // Command-line syntax is clap's to refuse (`error: invalid value`).
        stderr.contains("redirector: ") || stderr.contains("error: "),
        "no error line for {args:?}:\n{stderr}"
    );
    assert!(
        !stderr.contains(daemon::READY),
        "redirector run {args:?} became ready before refusing:\n{stderr}"
    );
    println!("refused in {took:?}: {}", stderr.trim());
    stderr
}

/// The line number after `line ` in `text`.
fn line_number(text: &str) -> Option<usize> {
    let at = text.find("line ")? + "line ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn assert_mentions(stderr: &str, what: &[&str]) {
    for w in what {
        assert!(
            stderr.contains(w),
            "the error does not name {w:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_backend_configuration_is_refused_at_startup_with_the_offending_line() {
    require_kernel!();
    let _kernel = exclusive();
    let dir = TempDir::new("rdr-badcfg-files-");
    // Nothing listens on these: no backend could be reached anyway.
    let (p1, p2) = (free_port(), free_port());
    let cart = format!("cart=cluster:127.0.0.1:{p1}");
    let sessions = format!("sessions=standalone:127.0.0.1:{p2}");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write backends file");
        path_str(&path).to_string()
    };

    // A target that maps to two backends, on the command line.
    let err = refused(&[
        "--backend",
        &cart,
        "--backend",
        &sessions,
        "--redis-target",
        "cart=10.96.0.10:6379",
        "--redis-target",
        "sessions=10.96.0.10:6379",
    ]);
    assert_mentions(&err, &["10.96.0.10:6379", "cart", "sessions"]);

    // The same in a backends file: the second backend's block (lines 7-11)
    // is the offending one.
    let duplicate = file(
        "duplicate.toml",
        &format!(
            "[[backend]]\n\
             name = \"cart\"\n\
             kind = \"cluster\"\n\
             seeds = [\"127.0.0.1:{p1}\"]\n\
             targets = [\"10.96.0.10:6379\"]\n\
             \n\
             [[backend]]\n\
             name = \"sessions\"\n\
             kind = \"standalone\"\n\
             primary = \"127.0.0.1:{p2}\"\n\
             targets = [\"10.96.0.10:6379\"]\n"
        ),
    );
    let err = refused(&["--backends-file", &duplicate]);
    assert_mentions(&err, &["10.96.0.10:6379", "cart", "sessions", &duplicate]);
    let line = line_number(&err);
    assert!(
        line.is_some_and(|l| (7..=11).contains(&l)),
        "the error names line {line:?}, not the second backend's (7-11):\n{err}"
    );

    // One backend on the command line, one in the file, same target.
    let half = file(
        "half.toml",
        "[[backend]]\n\
         name = \"sessions\"\n\
         kind = \"standalone\"\n\
         primary = \"127.0.0.1:1\"\n\
         targets = [\"10.96.0.10:6379\"]\n",
    );
    let err = refused(&[
        "--backend",
        &cart,
        "--redis-target",
        "cart=10.96.0.10:6379",
        "--backends-file",
        &half,
    ]);
    assert_mentions(&err, &["10.96.0.10:6379", "cart", "sessions"]);

    // An unknown kind: the file's line 9 says it.
    let unknown = file(
        "unknown.toml",
        &format!(
            "[[backend]]\n\
             name = \"cart\"\n\
             kind = \"cluster\"\n\
             seeds = [\"127.0.0.1:{p1}\"]\n\
             targets = [\"10.96.0.10:6379\"]\n\
             \n\
             [[backend]]\n\
             name = \"x\"\n\
             kind = \"memcached\"\n\
             targets = [\"10.96.9.10:6379\"]\n"
        ),
    );
    let err = refused(&["--backends-file", &unknown]);
    assert_mentions(&err, &["memcached", &unknown]);
    assert_eq!(line_number(&err), Some(9), "{err}");
    // And on the command line.
    let err = refused(&[
        "--backend",
        &format!("x=memcached:127.0.0.1:{p1}"),
        "--redis-target",
        "x=10.96.0.10:6379",
    ]);
    assert_mentions(&err, &["memcached", "x"]);

    // A backend with no target: with steering on, targets are how a
    // backend is reached at all.
    let topo = Topology::build(0);
    let err = refused_steering(
        &topo,
        &[
            "--backend",
            &cart,
            "--backend",
            &sessions,
            "--redis-target",
            "cart=10.96.0.10:6379",
        ],
    );
    assert_mentions(&err, &["sessions", "no target"]);
    let untargeted = file(
        "untargeted.toml",
        &format!(
            "[[backend]]\n\
             name = \"cart\"\n\
             kind = \"cluster\"\n\
             seeds = [\"127.0.0.1:{p1}\"]\n\
             targets = [\"10.96.0.10:6379\"]\n\
             \n\
             [[backend]]\n\
             name = \"sessions\"\n\
             kind = \"standalone\"\n\
             primary = \"127.0.0.1:{p2}\"\n\
             targets = []\n"
        ),
    );
    let untargeted_err = refused_steering(&topo, &["--backends-file", &untargeted]);
    assert_mentions(&untargeted_err, &["sessions", "no target"]);
    drop(topo);

    // An unreachable seed with --require-backends: the daemon does not
    // start with the one backend that answers. While it waits for the
    // other it neither serves clients nor reports ready; then it exits,
    // naming that backend and its address.
    let redis_dir = TempDir::new("rdr-badcfg-redis-");
    let live = RedisServer::start_local(redis_dir.path(), &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let log = dir.path().join("require-backends.log");
    let pins = TempDir::new("rdr-badcfg-");
    let mut cmd = Place::default().command(daemon::binary());
    cmd.arg("--pin-dir")
        .arg(pins.path())
        .args(["run", "--steering", "off"])
        .args(["--proxy-addr", &proxy.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--backend", &format!("sessions=standalone:{}", live.addr())])
        .args(["--backend", &format!("cart=cluster:{dead}")])
        .args(["--redis-target", "sessions=10.96.0.11:6379"])
        .args(["--redis-target", "cart=10.96.0.10:6379"])
        .args(["--require-backends", "--connect-timeout", "4s"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let started = Instant::now();
    let mut waiting = Child::spawn("redirector run --require-backends", cmd);
    // `sessions` answers within milliseconds; `cart` never will.
    std::thread::sleep(Duration::from_secs(1));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let served = Place::default().output(
        "timeout",
        &[
            "3",
            "redis-cli",
            "-p",
            &proxy.port().to_string(),
            "SET",
            "half-configured",
            "1",
        ],
    );
    let ready =
        std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).map(|mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = write!(s, "GET /healthz/ready HTTP/1.0\r\n\r\n");
            let mut response = String::new();
            let _ = s.read_to_string(&mut response);
            response
        });
    wait_for(
        "the daemon to give up on cart",
        Duration::from_secs(15),
        || (!waiting.is_running()).then_some(()),
    );
    let took = started.elapsed();
    let status = waiting.terminate(Duration::ZERO);
    let err = log_text();
    println!(
        "--require-backends gave up after {took:?}: {status:?}\n{}",
        tail(&err, 3)
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "redirector run --require-backends exited with {status:?}:\n{err}"
    );
    assert_mentions(&err, &["redirector: ", "cart", &dead]);
    assert!(!err.contains(daemon::READY), "{err}");
    assert_eq!(
        live.cli(&["EXISTS", "half-configured"]).trim(),
        "0",
        "a client's write reached sessions while the daemon waited for cart \
         (redis-cli said {:?}; /healthz/ready answered {:?}):\n{err}",
        String::from_utf8_lossy(&served.stdout),
        ready
            .as_ref()
            .map(|r| r.lines().next().unwrap_or_default().to_string())
    );
    assert!(
        !String::from_utf8_lossy(&served.stdout).contains("OK"),
        "a client was served while the daemon waited for cart: {served:?}"
    );
    if let Ok(response) = &ready {
        assert!(
            !response.starts_with("HTTP/1.1 200") && !response.starts_with("HTTP/1.0 200"),
            "/healthz/ready said ready while the daemon waited for cart:\n{response}"
        );
    }

    // Last, as it names the file's offending block: the backend with no
    // target in the file (its table, lines 7-11).
    assert_mentions(&untargeted_err, &[&untargeted]);
    let line = line_number(&untargeted_err);
    assert!(
        line.is_some_and(|l| (7..=11).contains(&l)),
        "the error names line {line:?}, not the untargeted backend's (7-11):\n{untargeted_err}"
    );
}
